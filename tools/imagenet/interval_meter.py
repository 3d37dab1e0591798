"""The training log's figures per interval of steps, read one interval late so that the host never
waits for the GPU in the middle of an epoch.

    meter = IntervalMeter(device, rank, world, group=host_group(device))
    for each step:
        meter.step_started(); loss, logits = ...; meter.step_ended()
        meter.add(loss, top1, top5, len(y))
    at each log boundary:
        for rec in meter.close(seen=..., data_wait=..., step_host=..., elapsed=..., stop=...,
                               final=it == n, **anything_else_to_keep):
            ...  # rec: the host values given for that interval, summed over the ranks where
                 # they are counts, per rank where they are shares, and "stopping"

Reading a device number on the host (`.tolist()`, an event's synchronize) waits until the GPU has
run everything queued before it: at every log line the GPU's queue ran dry, and both GPUs of a
DDP run then waited for the slower host to queue the next step. Here a boundary only queues a
copy of the interval's sums to pinned memory; the sums are read at the next boundary, when the
GPU finished them long ago, and summed over the ranks on the host (a gloo group beside NCCL), so
no collective enters the GPU's queue either. The last interval of an epoch (final=True) is read
at once, as the epoch ends anyway.
"""
import torch
import torch.distributed as dist


class GpuStepTimer:
    """GPU seconds the current stream spends inside training steps, from CUDA events (no host
    sync until read). With the interval's wall time it tells a GPU that waits (for data, the host
    or another rank: a gap before its steps) from one that computes; off a GPU it reads 0."""

    def __init__(self, device):
        self.cuda, self.spans = device.type == "cuda", []

    def _event(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self):
        if self.cuda:
            self.spans.append([self._event(), None])

    def stop(self):
        if self.cuda:
            self.spans[-1][1] = self._event()

    def take(self):
        """The steps timed since the last take (their events may still be pending)."""
        spans, self.spans = self.spans, []
        return spans

    @staticmethod
    def span_seconds(spans):
        """GPU seconds in `spans`; waits for the last one to finish."""
        if not spans:
            return 0.0
        spans[-1][1].synchronize()
        return sum(a.elapsed_time(b) for a, b in spans) / 1000


def host_group(device):
    """A process group for small host-side sums: a gloo group beside a NCCL default group (a NCCL
    collective would queue behind the GPU's work), the default group otherwise, None alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if device.type == "cuda" and dist.get_backend() == "nccl":
        return dist.new_group(backend="gloo")
    return dist.group.WORLD


class IntervalMeter:
    """Loss, top-1 and top-5 sums on the device, per-rank host and GPU times, reduced one log
    interval late (module docstring). Per rank: data_wait, step_host (host seconds), the GPU's
    seconds in steps and, on the GPU data path, raw_wait (its fetch thread waiting for the loader
    workers) and decode_busy (its decode threads' host seconds, divided by their number), turned into
    shares of each interval's `elapsed` (this rank's wall time). A rank that waits for data with its
    raw_wait near 1 is fed too slowly by its workers; with decode_busy near 1, by its decoders."""

    # each per-rank share (logged as <name>_ranks) and what it says, for tables of the logs
    PER_RANK = {"data_share": "data wait", "step_host": "host issuing steps", "gpu_busy": "GPU busy in steps",
                "raw_wait": "fetch waiting for workers", "decode_busy": "decode threads busy"}

    def __init__(self, device, rank, world, group=None):
        self.device, self.rank, self.world, self.group = device, rank, world, group
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.timer = GpuStepTimer(device)
        self.pending = None

    def step_started(self):
        self.timer.start()

    def step_ended(self):
        self.timer.stop()

    def add(self, loss, top1, top5, count):
        """One step's mean loss (device scalar) and top-1 / top-5 hit counts; no host sync."""
        self.sums += torch.stack([loss.detach().double() * count, top1.double(), top5.double()])

    def close(self, seen, data_wait, step_host, elapsed, stop=False, final=False, raw_wait=0.0,
              decode_busy=0.0, **keep):
        """Ends an interval; returns the records now readable: the previous interval's, and with
        final=True this one's too. Every rank must call it at the same iterations."""
        snapshot = torch.empty(3, dtype=torch.float64, pin_memory=self.device.type == "cuda")
        snapshot.copy_(self.sums, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.sums.zero_()
        current = (snapshot, event, self.timer.take(),
                   dict(keep, seen=seen, data_wait=data_wait, step_host=step_host, elapsed=elapsed,
                        raw_wait=raw_wait, decode_busy=decode_busy))
        ready = [] if self.pending is None else [self._reduce(self.pending, stop)]
        self.pending = current
        if final:
            ready.append(self._reduce(self.pending, stop))
            self.pending = None
        return ready

    def flush(self, stop=False):
        """The pending interval's record, read now ([] if none); every rank at once."""
        if self.pending is None:
            return []
        ready, self.pending = [self._reduce(self.pending, stop)], None
        return ready

    def _reduce(self, item, stop):
        snapshot, event, spans, host = item
        if event is not None:
            event.synchronize()
        w = self.world
        values = torch.zeros(5 + len(self.PER_RANK) * w, dtype=torch.float64)
        values[:3] = snapshot
        values[3], values[4] = float(host["seen"]), float(bool(stop))
        mine = (host["data_wait"], host["step_host"], GpuStepTimer.span_seconds(spans), host["raw_wait"],
                host["decode_busy"])
        for i, seconds in enumerate(mine):
            values[5 + i * w + self.rank] = seconds
        if self.group is not None:
            dist.all_reduce(values, group=self.group)
        loss_sum, c1, c5, count, stopping = values[:5].tolist()
        elapsed = host["elapsed"]
        rec = {k: v for k, v in host.items()
               if k not in ("seen", "data_wait", "step_host", "raw_wait", "decode_busy")}
        rec.update(loss_sum=loss_sum, top1_correct=c1, top5_correct=c5, count=count,
                   stopping=stopping > 0,
                   **{f"{name}_ranks": [min(1.0, v / elapsed) for v in values[5 + i * w:5 + (i + 1) * w].tolist()]
                      for i, name in enumerate(self.PER_RANK)})
        return rec
