"""The GPU data pipeline in a process of its own, handing batches to the training process over CUDA IPC.

    feed = ProcessFeed(functools.partial(make_batches, ...), device)   # make_batches(..., epoch)
    with contextlib.closing(feed):
        for epoch in range(1, epochs + 1):
            for x, y in feed.epoch(epoch):   # x, y: valid until the next batch is asked for
                step(x, y)

Why: in one process the training loop's Python (launching the step's kernels) and the pipeline's
fetch and decode threads share one GIL, and each of them waits for it a little on every operation;
with the step and the decoding on the same GPU both slow down (bench/NOTES-gpu.md, phase 5). Here
the training process only waits on a pipe and a CUDA event per batch.

The child process (spawned, one per rank) calls `make(epoch)` for each epoch: any iterable of
(x, y) on the device with a len(), in practice a GpuBatchPipeline over the rank's train loader. It
copies every batch into one of `slots` pairs of buffers it shares with the parent once (CUDA IPC),
records an interprocess event after the copy and sends the slot number; the parent's stream waits
on that event, runs the step, and records its own event for the slot, which the child's stream waits
on before writing the slot again. Neither side blocks its host thread on the GPU. On a CPU device the
buffers are shared memory and the copies are synchronous; the protocol is the same (tests run it).
"""
import contextlib
import signal
import traceback

import torch
import torch.multiprocessing as mp


class FeedError(RuntimeError):
    """The data process reported an exception (its traceback is in the message)."""


def _alloc(like, cuda):
    buf = torch.empty_like(like)  # keeps channels_last
    return buf if cuda else buf.share_memory_()


def _fits(buf, x):
    return (buf is not None and buf.shape[0] >= x.shape[0] and buf.shape[1:] == x.shape[1:]
            and buf.dtype == x.dtype and buf[:x.shape[0]].stride() == x.stride())


class _Child:
    """The data process's side of the protocol."""

    def __init__(self, conn, make, device, slots):
        self.conn, self.make, self.device = conn, make, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.free = list(range(slots))
        self.buffers = [(None, None)] * slots
        self.stream = None
        if self.cuda:
            torch.cuda.set_device(self.device)
            self.stream = torch.cuda.Stream(self.device)
            self.ready = [torch.cuda.Event(interprocess=True) for _ in range(slots)]
            handles = conn.recv()
            self.slot_free = [torch.cuda.Event.from_ipc_handle(self.device, h) for h in handles]
            conn.send(("events", [e.ipc_handle() for e in self.ready]))
        else:
            conn.recv()
            conn.send(("events", None))

    def serve(self):
        while True:
            msg = self.conn.recv()
            if msg[0] == "free":
                self.free.append(msg[1])
            elif msg[0] == "epoch":
                try:
                    if not self.run_epoch(msg[1]):
                        return
                except Exception:
                    self.conn.send(("error", traceback.format_exc()))
            elif msg[0] == "close":
                return

    def take_messages(self, block):
        """Frees and commands that came in; returns "stop"/"close" when the parent wants no more."""
        while block and not self.free or self.conn.poll():
            msg = self.conn.recv()
            if msg[0] == "free":
                self.free.append(msg[1])
            elif msg[0] in ("stop", "close"):
                return msg[0]
        return None

    def run_epoch(self, epoch):
        """Streams one epoch; False when the parent closed the feed meanwhile."""
        batches = self.make(epoch)
        self.conn.send(("len", len(batches), getattr(batches, "num_samples", None)))
        it = iter(batches)
        command = None
        try:
            with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
                for x, y in it:
                    command = self.take_messages(block=True)
                    if command:
                        break
                    self.send_batch(x, y)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # stops a GpuBatchPipeline's threads and loader workers
        self.conn.send(("end", getattr(batches, "stats", None)))
        return command != "close"

    def send_batch(self, x, y):
        k, n = self.free.pop(0), len(y)
        bx, by = self.buffers[k]
        new = None
        if not (_fits(bx, x) and _fits(by, y)):
            bx, by = self.buffers[k] = new = (_alloc(x, self.cuda), _alloc(y, self.cuda))
        if self.cuda:
            self.stream.wait_event(self.slot_free[k])  # the parent's last step on this slot
        bx[:n].copy_(x, non_blocking=True)
        by[:n].copy_(y, non_blocking=True)
        if self.cuda:
            self.ready[k].record(self.stream)
        self.conn.send(("batch", k, n, new))


def _child_main(conn, make, device, slots):
    # The parent decides when this process stops (it closes the pipe or sends "close"): a Ctrl-C or
    # a SIGTERM to the process group must not kill the feed under a training loop finishing its step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        _Child(conn, make, device, slots).serve()
    except EOFError:  # the parent went away
        pass
    except Exception:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class ProcessFeed:
    """`make(epoch)`'s batches made in a child process (module docstring). `make` must pickle
    (a module-level function or a functools.partial of one): the child is spawned."""

    def __init__(self, make, device, slots=4, poll_seconds=1.0):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:  # IPC events need the index; the child gets it too
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.poll_seconds = poll_seconds
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        # not a daemon: the child starts loader worker processes of its own
        self.proc = ctx.Process(target=_child_main, args=(child_conn, make, str(self.device), slots),
                                name="data-feed", daemon=False)
        self.proc.start()
        child_conn.close()
        self.buffers = [(None, None)] * slots
        self.slot_free = self.ready = None
        if self.cuda:
            self.slot_free = [torch.cuda.Event(interprocess=True) for _ in range(slots)]
            self.conn.send([e.ipc_handle() for e in self.slot_free])
        else:
            self.conn.send(None)
        handles = self._recv("events")[1]
        if self.cuda:
            self.ready = [torch.cuda.Event.from_ipc_handle(self.device, h) for h in handles]
        self.stats = None
        self._active = None  # the epoch iterator in use

    def _recv(self, *expected):
        while not self.conn.poll(self.poll_seconds):
            if not self.proc.is_alive():
                raise RuntimeError(f"the data process exited (code {self.proc.exitcode}) without a "
                                   f"word; its output is above")
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(timeout=5)
            raise RuntimeError(f"the data process closed its pipe (exit code {self.proc.exitcode})") from None
        if msg[0] == "error":
            raise FeedError(f"the data process failed:\n{msg[1]}")
        if expected and msg[0] not in expected:
            raise RuntimeError(f"data process protocol: got {msg[0]!r}, expected one of {expected}")
        return msg

    def epoch(self, epoch):
        """The epoch's batches (an iterable with len() and num_samples); iterate it to the end, or
        break out (the child then stops that epoch when the next one is asked for)."""
        self._end_active()
        self.conn.send(("epoch", epoch))
        _, length, num_samples = self._recv("len")
        return _Epoch(self, length, num_samples)

    def _take(self, msg):
        _, k, n, new = msg
        if new is not None:
            self.buffers[k] = new
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[k])
        bx, by = self.buffers[k]
        return k, bx[:n], by[:n]

    def _free(self, k):
        if self.cuda:  # everything queued so far on this stream is what used slot k
            self.slot_free[k].record(torch.cuda.current_stream(self.device))
        self.conn.send(("free", k))

    def _iterate(self):
        ended, k = False, None
        try:
            while True:
                try:
                    msg = self._recv("batch", "end")
                except FeedError:
                    ended = True  # the child has left the epoch
                    raise
                if msg[0] == "end":
                    ended, self.stats = True, msg[1]
                    return
                k, x, y = self._take(msg)
                yield x, y
                self._free(k)
                k = None
        finally:
            if k is not None:
                self._free(k)
            if not ended and self.proc.is_alive():  # the consumer broke off: stop the child's epoch
                with contextlib.suppress(RuntimeError, OSError):
                    self.conn.send(("stop",))
                    while (msg := self._recv("batch", "end"))[0] == "batch":
                        self._free(msg[1])

    def _end_active(self):
        if self._active is not None:
            self._active.close()  # a consumer that broke off: ends the child's epoch
            self._active = None

    def close(self):
        self._end_active()
        self.buffers = [(None, None)] * len(self.buffers)
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(("close",))
            self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


class _Epoch:
    def __init__(self, feed, length, num_samples):
        self.feed, self.length, self.num_samples = feed, length, num_samples

    def __len__(self):
        return self.length

    def __iter__(self):
        it = self.feed._active = self.feed._iterate()
        return it
