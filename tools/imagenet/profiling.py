"""Where a training step's host time goes: torch.profiler over a few steps of one epoch.

    profiler = StepProfiler(out_dir, rank, steps=20, skip=30)   # steps 31-50 of the epoch
    for x, y in loader:
        ...  # the step
        profiler.step()
    profiler.close()

Writes profile_rank{R}.json (Chrome trace: chrome://tracing or ui.perfetto.dev) and
profile_rank{R}.txt: for each host thread, the time it spent per CUDA runtime call (a long
cudaStreamSynchronize or cudaMalloc in the training thread is a stall) and per top-level
operator, over the profiled steps.
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


class StepProfiler:
    """Profiles `steps` steps after `skip` (0 steps: does nothing)."""

    def __init__(self, out_dir, rank, steps, skip=30):
        self.out_dir, self.rank, self.steps = Path(out_dir), rank, steps
        self.prof = None
        if steps > 0:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts, on_trace_ready=self._write,
                                schedule=schedule(skip_first=skip, wait=0, warmup=1, active=steps))
            self.main_tid = threading.get_native_id()
            self.prof.start()

    def step(self):
        if self.prof is not None:
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
            f"{self.steps} steps, rank {self.rank}\n" + thread_summary(trace, self.main_tid))
