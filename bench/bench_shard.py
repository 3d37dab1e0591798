"""Benchmark: the shard stage's tar writer vs `tar -cf` of the same files, same run.

Usage:
    .venv/bin/python bench/bench_shard.py [--count 4000] [--shard-size 500] [--repeats 7] [--workers N] [--keep DIR]

Generates resize-stage-like files (256-px short side, quality-90 JPEGs of photo-like content, under
train/<wnid>/), reads them all once so both contenders start from a warm page cache (dropping the
cache needs root), then times, alternating, best of --repeats:
  * ours, 1 process: tools.shard.write_shard over all samples in --shard-size chunks, in the shuffled
          train order, sha256 computed while writing (the mean/std pass off)
  * ours, N processes: the same shards written by a pool of --workers processes, each writing whole
          shards, as the stage does with --workers N (default: all cores)
  * tar:  `tar -cf OUT.tar -C SRC train` (GNU tar, one process, no checksum)
and prints MB/s of input for each and the ratios (goal >= 0.8x). The mean/std pass (tools.shard.pixel_sums:
PIL decode + exact integer sums) is timed separately, in images/s, as the stage does it on top.
"""
import argparse
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_resize import natural_image  # noqa: E402
from tools.shard import default_workers, pixel_sums, shuffled, write_shard  # noqa: E402

IMAGENET_TRAIN = 1_281_167
RESIZED = [(341, 256), (384, 256), (256, 341), (256, 256), (456, 256)]


def make_resized(src, count, classes=10, seed=0):
    """[(key, path, cls)] of `count` 256-px JPEGs under src/train/<wnid>/."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        cls = i % classes
        wnid = f"n{cls:08d}"
        folder = src / "train" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{wnid}_{i}.JPEG"
        w, h = RESIZED[i % len(RESIZED)]
        natural_image(rng, w, h).save(path, "JPEG", quality=90)
        samples.append((path.stem, str(path), cls))
    return samples


def _write(task):
    return write_shard(*task)


def time_ours(samples, out, shard_size, pool=None):
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tasks = [(out / f"train-{i // shard_size:06d}.tar", samples[i:i + shard_size])
             for i in range(0, len(samples), shard_size)]
    start = time.perf_counter()
    if pool is None:
        for task in tasks:
            _write(task)
    else:
        list(pool.imap_unordered(_write, tasks))
    return time.perf_counter() - start


def time_tar(src, out):
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    subprocess.run(["tar", "-cf", str(out / "all.tar"), "-C", str(src), "train"], check=True)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=4000, help="number of generated images (default: 4000)")
    p.add_argument("--shard-size", type=int, default=500,
                   help="samples per shard (default: 500, so that several processes have shards to share)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (default: 7)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes of the parallel row (default: all cores)")
    p.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp folder)")
    args = p.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_shard_"))
    try:
        src = work / "resized"
        shutil.rmtree(src, ignore_errors=True)
        samples = shuffled(make_resized(src, args.count), seed=0)
        total = sum(Path(path).stat().st_size for _, path, _ in samples)
        for _, path, _ in samples:  # warm the page cache for both
            Path(path).read_bytes()
        one, many = "ours, 1 process", f"ours, {args.workers} processes"
        times = {one: [], many: [], "tar -cf": []}
        with multiprocessing.Pool(args.workers) as pool:
            for _ in range(args.repeats):  # alternating, so load changes on a shared machine hit all alike
                times[one].append(time_ours(samples, work / "ours", args.shard_size))
                times[many].append(time_ours(samples, work / "ours", args.shard_size, pool))
                times["tar -cf"].append(time_tar(src, work / "tar"))
        best = {name: min(t) for name, t in times.items()}
        # per-round ratios, median: robust to a busy neighbour slowing down one round
        median = {name: statistics.median(tar / t for tar, t in zip(times["tar -cf"], ts))
                  for name, ts in times.items()}
        start = time.perf_counter()
        for _, path, _ in samples:
            pixel_sums(Path(path).read_bytes())
        stats_s = time.perf_counter() - start

        print(f"{len(samples)} resized JPEGs, {total / 1e6:.1f} MB ({total / len(samples) / 1e3:.1f} KB each), "
              f"warm page cache, best of {args.repeats} alternating rounds\n")
        print(f"{'method':<34} {'seconds':>8} {'MB/s':>8} {'images/s':>9}")
        for name, seconds in best.items():
            print(f"{name:<34} {seconds:>8.3f} {total / 1e6 / seconds:>8.1f} {len(samples) / seconds:>9.0f}")
        print(f"{'mean/std pass (pixel_sums)':<34} {stats_s:>8.3f} {total / 1e6 / stats_s:>8.1f} "
              f"{len(samples) / stats_s:>9.0f}")
        ours, ours_many, tar = best.values()
        print(f"\nratio ours / tar -cf (throughput), best times: 1 process {tar / ours:.2f}x, "
              f"{args.workers} processes {tar / ours_many:.2f}x; median of per-round ratios: "
              f"{median[one]:.2f}x, {median[many]:.2f}x (goal >= 0.8x)")
        per_image = ours / len(samples) + stats_s / len(samples)
        print(f"projection, {IMAGENET_TRAIN:,} train images on 16 cores (linear scaling): writing "
              f"{IMAGENET_TRAIN * ours / len(samples) / 16 / 60:.1f} min, with the mean/std pass "
              f"{IMAGENET_TRAIN * per_image / 16 / 60:.1f} min")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
