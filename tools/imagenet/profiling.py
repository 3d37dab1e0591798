"""Where a training step's host time goes: torch.profiler over a few steps of one epoch.

    profiler = StepProfiler(out_dir, rank, steps=20, skip=30)   # steps 31-50 of the epoch
    for x, y in loader:
        ...  # the step
        profiler.step()
    profiler.close()

Writes profile_rank{R}.json (Chrome trace: chrome://tracing or ui.perfetto.dev) and
profile_rank{R}.txt: for each host thread, the time it spent per CUDA runtime call (a long
cudaStreamSynchronize or cudaMalloc in the training thread is a stall) and per top-level
operator, over the profiled steps; then for each GPU stream its busy time and largest kernels,
and how long several streams ran at once (the data path's kernels beside the step's).
"""
import collections
import json
import threading
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule


def thread_summary(trace, main_tid, top=15):
    """Text table from a Chrome trace dict: per thread (the training thread first), total
    milliseconds per CUDA runtime call and per CPU operator (an operator's time includes the
    operators and calls inside it)."""
    per_thread = collections.defaultdict(lambda: collections.defaultdict(float))
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X" or ev.get("cat") not in ("cuda_runtime", "cpu_op", "cuda_driver"):
            continue
        per_thread[ev.get("tid")][(ev["cat"], ev["name"])] += ev.get("dur", 0) / 1000
    lines = []
    for tid in sorted(per_thread, key=lambda t: (t != main_tid, str(t))):
        totals = per_thread[tid]
        lines.append(f"thread {tid}{' (training loop)' if tid == main_tid else ''}")
        for cat in ("cuda_runtime", "cuda_driver", "cpu_op"):
            rows = sorted(((ms, name) for (c, name), ms in totals.items() if c == cat), reverse=True)
            for ms, name in rows[:top]:
                lines.append(f"  {cat:12s} {ms:10.2f} ms  {name}")
    return "\n".join(lines) + "\n"


_GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def _merged(spans):
    """(start, end) spans -> the sorted, disjoint [start, end] spans of their union."""
    merged = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def _union_ms(spans):
    """Milliseconds covered by the union of (start, end) microsecond spans."""
    return sum(b - a for a, b in _merged(spans)) / 1000


def gpu_summary(trace, top=8):
    """Text table from a Chrome trace dict: the GPU window (first to last GPU event), the time any
    stream ran and the time two or more ran at once; per stream its busy time and largest kernels
    (copies and memsets included). Empty where the trace has no GPU events."""
    per_stream = collections.defaultdict(list)
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") == "X" and ev.get("cat") in _GPU_CATS:
            per_stream[(ev.get("pid"), ev.get("tid"))].append(ev)
    if not per_stream:
        return ""
    spans = {k: [(e["ts"], e["ts"] + e.get("dur", 0)) for e in evs] for k, evs in per_stream.items()}
    every = [s for v in spans.values() for s in v]
    window = (max(b for _, b in every) - min(a for a, _ in every)) / 1000
    # time with >= 2 streams busy: sweep over the per-stream unions' edges
    edges = []
    for v in spans.values():
        merged = _merged(v)
        edges += [(a, 1) for a, _ in merged] + [(b, -1) for _, b in merged]
    overlap, depth, last = 0.0, 0, None
    for t, d in sorted(edges):
        if depth >= 2:
            overlap += t - last
        depth, last = depth + d, t
    lines = [f"GPU: window {window:.2f} ms, any stream busy {_union_ms(every):.2f} ms, "
             f"two or more streams at once {overlap / 1000:.2f} ms"]
    for key in sorted(per_stream, key=lambda k: -_union_ms(spans[k])):
        totals = collections.defaultdict(lambda: [0, 0.0])
        for e in per_stream[key]:
            totals[e["name"]][0] += 1
            totals[e["name"]][1] += e.get("dur", 0) / 1000
        lines.append(f"stream {key[1]} (device {key[0]}): busy {_union_ms(spans[key]):.2f} ms, "
                     f"{len(per_stream[key])} events")
        for name, (count, ms) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]:
            lines.append(f"  {ms:10.2f} ms  {count:5d}x  {name[:110]}")
    return "\n".join(lines) + "\n"


def profiler_activities(gpu_only, cuda):
    """torch.profiler activities: the host's operators and CUDA calls, plus the GPU's activity
    where there is CUDA; gpu_only keeps the GPU's alone (the host then runs unslowed)."""
    gpu = [ProfilerActivity.CUDA] if cuda else []
    return gpu if gpu_only and gpu else [ProfilerActivity.CPU] + gpu


class StepProfiler:
    """Profiles `steps` steps after `skip` (0 steps: does nothing). gpu_only: the GPU's activity
    alone (kernels, copies), without tracing the host's operators and CUDA calls, which slows
    the host about twofold: the GPU's idle gaps are then those of an unprofiled run, so "any
    stream busy" against the window tells a GPU waiting for launches from one computing slowly."""

    def __init__(self, out_dir, rank, steps, skip=30, gpu_only=False):
        self.out_dir, self.rank, self.steps = Path(out_dir), rank, steps
        self.prof, self.calls, self.cuda = None, 0, torch.cuda.is_available()
        # the step() call that ends the window: skipped steps, one warm-up step, the profiled ones
        self.last_call = skip + 1 + steps
        if steps > 0:
            acts = profiler_activities(gpu_only, torch.cuda.is_available())
            self.prof = profile(activities=acts, on_trace_ready=self._write,
                                schedule=schedule(skip_first=skip, wait=0, warmup=1, active=steps))
            self.main_tid = threading.get_native_id()
            self.prof.start()

    def step(self):
        if self.prof is not None:
            self.calls += 1
            if self.cuda and self.calls == self.last_call:
                # the host runs ahead of the GPU: kernels still queued when the window closes
                # would be missing from the trace
                torch.cuda.synchronize()
            self.prof.step()

    def close(self):
        if self.prof is not None:
            self.prof.stop()
            self.prof = None

    def _write(self, prof):
        trace_path = self.out_dir / f"profile_rank{self.rank}.json"
        prof.export_chrome_trace(str(trace_path))
        trace = json.loads(trace_path.read_text())
        (self.out_dir / f"profile_rank{self.rank}.txt").write_text(
            f"{self.steps} steps, rank {self.rank}\n" + thread_summary(trace, self.main_tid)
            + gpu_summary(trace))
