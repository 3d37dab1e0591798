"""Profile: where the GPU data path's time goes beside a training step (torch.profiler, CUDA trace).

    python bench/profile_pipeline.py --work /tmp/bl --decoder engine --threads 2    # GPU machine

Runs bench_loader's GPU path (its generated shards, made if missing) feeding the AlexNet-BN step,
profiles --steps steps after a warm-up and prints: GPU busy time (union of kernels and copies) per
CUDA stream and in all, the kernels by total time, and the host's CUDA runtime calls by total time
per thread (who waits on what). --trace writes the Chrome trace too.
"""
import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_loader as bl  # noqa: E402


def union_ms(intervals):
    total, end = 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total / 1000


def summarise(trace, wall_ms, top=12):
    events = trace["traceEvents"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    by_stream = collections.defaultdict(list)
    for e in gpu:
        by_stream[e.get("args", {}).get("stream", "?")].append((e["ts"], e["ts"] + e["dur"]))
    print(f"\nwall {wall_ms:.1f} ms; GPU busy {union_ms([i for v in by_stream.values() for i in v]):.1f} ms")
    for stream, iv in sorted(by_stream.items(), key=lambda kv: -sum(e - s for s, e in kv[1])):
        print(f"  stream {stream}: busy {union_ms(iv):8.1f} ms in {len(iv)} ops")
    kernels = collections.defaultdict(lambda: [0, 0.0, set()])
    for e in gpu:
        k = kernels[e["name"][:90]]
        k[0] += 1
        k[1] += e["dur"] / 1000
        k[2].add(e.get("args", {}).get("stream", "?"))
    print("\nGPU ops by total time (ms, count, streams):")
    for name, (n, ms, streams) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {ms:8.1f} {n:6d} {sorted(map(str, streams))} {name}")
    runtime = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") == "cuda_runtime" and "dur" in e:
            r = runtime[(e.get("tid"), e["name"])]
            r[0] += 1
            r[1] += e["dur"] / 1000
    print("\nhost CUDA runtime calls by total time (thread, call, ms, count):")
    for (tid, name), (n, ms) in sorted(runtime.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {str(tid):>10s} {name:40s} {ms:8.1f} {n:6d}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=None, help="bench_loader's data folder (made if missing)")
    p.add_argument("--images", type=int, default=12800, help="JPEGs to generate if the folder is empty")
    p.add_argument("--decoder", default="nvjpeg", help="gpu_data decoder: nvjpeg, hardware or engine")
    p.add_argument("--threads", type=int, default=2, help="decode threads")
    p.add_argument("--priority", type=int, default=0, help="decode stream priority (-1 high, 0 normal)")
    p.add_argument("--cpu-fraction", type=float, default=0.0, help="share the workers decode")
    p.add_argument("--workers", type=int, default=4, help="loader workers (raw bytes only, or hybrid)")
    p.add_argument("--arch", default="alexnetowtbn", help="model of the step ('none': no step)")
    p.add_argument("--steps", type=int, default=30, help="profiled steps")
    p.add_argument("--trace", type=Path, default=None, help="write the Chrome trace here")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="profile_"))
    shards = work / "shards"
    if not (shards / "train.json").exists():
        bl.make_dataset(work, args.images, 100, 16, max(64, args.images // 64))
    total = 40 + args.steps + 4
    source = bl.gpu_batches(shards, 256, args.workers, 224, "rrc", total, args.cpu_fraction,
                            decoder=args.decoder, threads=args.threads, priority=args.priority)
    step = bl.make_step(args.arch, False) if args.arch != "none" else bl.touch_step
    it = iter(source)
    for _ in range(40):
        step(*next(it))
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(*next(it))
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1000
    print(f"{args.decoder} t{args.threads} priority {args.priority} cpu {args.cpu_fraction} {args.arch}: "
          f"{256 * args.steps / wall * 1000:.0f} img/s under the profiler; {torch.cuda.get_device_name()}")
    path = args.trace or Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(path))
    summarise(json.loads(path.read_text()), wall)
    del it
    return 0


if __name__ == "__main__":
    sys.exit(main())
