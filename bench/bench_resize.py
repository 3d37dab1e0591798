"""Benchmark: the resize stage's per-image function vs ImageMagick, one core each, same files, same run.

Usage:
    .venv/bin/python bench/bench_resize.py [--count 200] [--short-side 256] [--quality 90] [--keep DIR]

Generates ImageNet-like JPEGs (mostly 500x375 / 375x500 / 500x333 at quality ~90, a few 1000-1600 px
and a few 2000-4000 px, like the ILSVRC2012 size distribution), then times
  * ours:        tools.resize.resize_image + write, in this process (one core), with the default
                 torch resampler and with --resampler pillow
  * ImageMagick: `/usr/bin/convert IN -resize "256^>" -quality 90 OUT`, one process per image as the
                 Torch7 seed's preprocessing did, with MAGICK_THREAD_LIMIT=1
and prints images/s for each, the ratio (goal >= 5x) and the projection for 1.28 M images on 16 cores.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.resize import resize_image  # noqa: E402

CONVERT = "/usr/bin/convert"
IMAGENET_TRAIN = 1_281_167


def natural_image(rng, w, h):
    """A photo-like image: smooth low-frequency colour field plus fine texture (JPEG sizes like ImageNet's)."""
    small = rng.integers(0, 256, (max(2, h // 40), max(2, w // 40), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    texture = rng.normal(0, 12, (h, w, 1)).astype(np.int16)
    return Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8))


def imagenet_like_sizes(rng, count):
    """~90 % typical (500 px long side), ~7 % 1000-1600 px, ~3 % 2000-4000 px; both orientations."""
    sizes = []
    for i in range(count):
        r = i % 100
        if r < 90:
            w, h = [(500, 375), (500, 333), (375, 500), (500, 400)][i % 4]
        elif r < 97:
            long = int(rng.integers(1000, 1601))
            w, h = long, long * 3 // 4
        else:
            long = int(rng.integers(2000, 4001))
            w, h = long, long * 3 // 4
        if i % 7 == 0:
            w, h = h, w
        sizes.append((w, h))
    return sizes


def make_images(folder, count, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(imagenet_like_sizes(rng, count)):
        path = folder / f"n00000000_{i}.JPEG"
        natural_image(rng, w, h).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def ours(resampler):
    def run(path, out, short_side, quality):
        data, _ = resize_image(path, short_side, quality, resampler)
        (out / path.name).write_bytes(data)
    return run


def imagemagick(path, out, short_side, quality):
    env = {**os.environ, "MAGICK_THREAD_LIMIT": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([CONVERT, str(path), "-resize", f"{short_side}x{short_side}^>", "-quality", str(quality),
                    str(out / path.name)], check=True, env=env)


METHODS = {
    "ours (default: torch resampler)": ours("torch"),
    "ours --resampler pillow": ours("pillow"),
    "ImageMagick convert": imagemagick,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=200, help="number of generated images (default: 200)")
    p.add_argument("--short-side", type=int, default=256, help="target short side (default: 256)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default: 90)")
    p.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp folder)")
    args = p.parse_args(argv)
    if not os.path.exists(CONVERT):
        print(f"{CONVERT} not found: install ImageMagick to run the baseline", file=sys.stderr)
        return 1
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_resize_"))
    try:
        src = work / "src"
        paths = make_images(src, args.count)
        total_mb = sum(p.stat().st_size for p in paths) / 1e6
        # Warm the page cache so both contenders read from memory.
        for p in paths:
            p.read_bytes()
        outs = {}
        for i, name in enumerate(METHODS):
            outs[name] = work / f"out{i}"
            shutil.rmtree(outs[name], ignore_errors=True)
            outs[name].mkdir(parents=True)
        ours("torch")(paths[0], outs[next(iter(METHODS))], args.short_side, args.quality)  # import torch untimed
        import torch
        torch.set_num_threads(1)  # one core each, as the stage's pool workers run
        # Interleaved image by image, so a load change on a shared machine hits all methods alike.
        results = dict.fromkeys(METHODS, 0.0)
        for path in paths:
            for name, fn in METHODS.items():
                start = time.perf_counter()
                fn(path, outs[name], args.short_side, args.quality)
                results[name] += time.perf_counter() - start
        print(f"{len(paths)} ImageNet-like JPEGs ({total_mb:.1f} MB), short side -> {args.short_side}, "
              f"quality {args.quality}, one core\n")
        print(f"{'method':<34} {'seconds':>8} {'images/s':>9}")
        for name, seconds in results.items():
            print(f"{name:<34} {seconds:>8.2f} {len(paths) / seconds:>9.1f}")
        ours_s, pillow_s, im = results.values()
        rate = len(paths) / ours_s
        print(f"\nratio ours / ImageMagick: {im / ours_s:.1f}x (goal >= 5x); "
              f"with --resampler pillow: {im / pillow_s:.1f}x")
        hours = IMAGENET_TRAIN / (16 * rate) / 3600
        im_hours = IMAGENET_TRAIN / (16 * len(paths) / im) / 3600
        print(f"projection, {IMAGENET_TRAIN:,} train images on 16 cores (linear scaling): "
              f"ours {hours * 60:.0f} min, ImageMagick {im_hours * 60:.0f} min")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
