"""Shard stage: the resized images as WebDataset tar shards plus a manifest per split.

Usage:
    python -m tools.shard --src W/resized --out W/shards --train-shard-size 1000 --val-shard-size 500 \
        --seed 0 --workers 16

reads `--src/{train,val}/<wnid>/<file>` (the resize stage's output) and writes

    W/shards/train-000000.tar ...   train samples, globally shuffled with --seed
    W/shards/val-000000.tar ...     val samples, sorted by file name
    W/shards/train.json, val.json   manifests: classes, shards (samples, bytes, sha256), and for train
                                    the per-channel RGB mean and std (0..1) over all train pixels

Each sample is `<key>.cls` (class index, ASCII decimal: position of the wnid in the sorted train class
list) and `<key>.jpg` (the JPEG bytes as they are, no re-encode); the key is the file name without its
extension (`n01440764_10026`, `ILSVRC2012_val_00000001`), with any other dot replaced by `_` because
WebDataset cuts keys at the first dot. Shards are byte-identical across runs and worker counts: fixed
tar headers (mtime 0, uid/gid 0, no user/group names, mode 0444), fixed member order, each shard
written whole by one worker. `--out` appears only when every shard and manifest is written (the stage
works in a temporary folder beside it and renames it).

Default shard sizes, for the full 1,281,167 / 50,000 images read by 8 GPUs x 8 loader workers = 64
readers:
  * train 1000 per shard -> 1282 shards (256-px JPEGs at quality 90 weigh 25-40 KB, so 25-40 MB a
    shard: long sequential reads, yet 20 shards per reader per epoch, so the per-epoch shard shuffle
    mixes well and the readers differ by at most one shard, about 5 %, which the loader's fixed
    batches-per-epoch absorbs). Many more, smaller shards only add open() calls; far fewer would
    leave readers idle (fewer shards than readers leaves workers empty or hangs DDP).
  * val 500 per shard -> 100 shards: at least one per reader with 64 readers, so none is empty, and
    a pass over val stays short.
"""
import argparse
import hashlib
import io
import json
import math
import os
import random
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from tools.imagenet import fsutil
from tools.imagenet.fsutil import default_workers  # noqa: F401 - bench/bench_shard.py imports it from here

TAR_BLOCK = tarfile.BLOCKSIZE  # 512
TAR_RECORD = tarfile.RECORDSIZE  # 20 blocks: the archive is padded to a whole record, like tar(1) and tarfile
SHARD_NAME = "{split}-{index:06d}.tar"
JPEG_MAGIC = b"\xff\xd8"


class ShardError(RuntimeError):
    """Bad input: the message names the file and what to do."""


def sample_key(filename):
    """`n01440764_10026.JPEG` -> `n01440764_10026`; remaining dots become `_` (WebDataset keys end at a dot)."""
    stem = os.path.splitext(filename)[0]
    return stem.replace(".", "_")


def _tar_header_pax(name, size):
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


# The fixed parts of a ustar header (mode 0444, uid/gid 0, mtime 0, regular file, no user/group
# names, empty device numbers), laid out as tarfile writes them. Built by hand because
# TarInfo.tobuf costs ~50 us a member, more than reading and hashing a 40 KB JPEG.
_MODE_UID_GID = b"0000444\x00" + b"0000000\x00" * 2
_MTIME = b"%011o\x00" % 0
_TAIL = b"0" + bytes(100) + b"ustar\x0000" + bytes(32 + 32 + 8 + 8 + 155 + 12)
_TAIL_SUM = sum(_TAIL) + sum(_MODE_UID_GID) + sum(_MTIME) + 8 * ord(" ")


def _tar_header(name, size):
    """512-byte header of a regular member; byte-identical to TarInfo.tobuf(PAX_FORMAT) with the fixed fields."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or not name.isascii() or size >= 8 ** 11:
        return _tar_header_pax(name, size)  # long names need a PAX extended header: leave it to tarfile
    size_field = b"%011o\x00" % size
    checksum = _TAIL_SUM + sum(raw) + sum(size_field)
    return b"".join((raw.ljust(100, b"\x00"), _MODE_UID_GID, size_field, _MTIME,
                     b"%06o\x00 " % checksum, _TAIL))


def _class_folders(split_dir):
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _files(class_dir):
    return sorted(p.name for p in class_dir.iterdir() if p.is_file() and not p.name.startswith("."))


def collect(src):
    """(classes, {"train": [(key, path, cls)], "val": [...]}) in shard order (train unshuffled yet)."""
    src = Path(src)
    train_dir, val_dir = src / "train", src / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise ShardError(f"{d} is missing: --src must be the resize stage's output ({src}/train/<wnid>/..., "
                             f"{src}/val/<wnid>/...)")
    classes = _class_folders(train_dir)
    if not classes:
        raise ShardError(f"{train_dir} holds no class folders: run the resize stage first")
    index = {wnid: i for i, wnid in enumerate(classes)}
    val_classes = _class_folders(val_dir)
    unknown = [w for w in val_classes if w not in index]
    if unknown:
        raise ShardError(f"val classes {unknown[:5]}{' ...' if len(unknown) > 5 else ''} ({len(unknown)} in all) "
                         f"have no train folder under {train_dir}: the class index comes from the train classes, "
                         "so check the val labels (--val-labels of the extract stage) against the train archive")
    splits = {}
    for split, split_dir, wnids in (("train", train_dir, classes), ("val", val_dir, val_classes)):
        samples, seen = [], {}
        for wnid in wnids:
            names = _files(split_dir / wnid)
            if split == "train" and not names:
                raise ShardError(f"train class folder {split_dir / wnid} is empty: every class needs images")
            for name in names:
                key = sample_key(name)
                path = split_dir / wnid / name
                if key in seen:
                    raise ShardError(f"{path} and {seen[key]} give the same sample key {key!r}: "
                                     "file names must be unique within a split (apart from the extension)")
                seen[key] = path
                samples.append((key, str(path), index[wnid]))
        if not samples:
            raise ShardError(f"{split_dir} holds no images: run the resize stage first")
        splits[split] = samples
    splits["val"].sort(key=lambda s: s[0])
    return classes, splits


def shuffled(samples, seed):
    """Train order: a global shuffle with random.Random(seed) of the samples sorted by (class, name)."""
    samples = sorted(samples, key=lambda s: (s[2], s[0]))
    random.Random(seed).shuffle(samples)
    return samples


_LEVELS = np.arange(256, dtype=np.int64)


def pixel_sums(jpeg):
    """(sum, sum of squares, pixel count) per RGB channel of one JPEG as PIL decodes it, exact integers."""
    with Image.open(io.BytesIO(jpeg)) as img:
        rgb = img.convert("RGB")
        # Pillow's 768-bin histogram (R, G, B) is 5x faster than numpy sums over the pixels, and
        # turns both sums into exact integer dot products.
        hist = np.array(rgb.histogram(), dtype=np.int64).reshape(3, 256)
    sums = hist @ _LEVELS
    squares = hist @ (_LEVELS * _LEVELS)
    return [int(v) for v in sums], [int(v) for v in squares], rgb.width * rgb.height


def write_shard(path, samples, stats=False):
    """Write one tar shard of [(key, image path, cls)]; return its manifest entry (+ pixel sums if stats)."""
    digest = hashlib.sha256()
    size = 0
    sums, squares, pixels = [0, 0, 0], [0, 0, 0], 0

    def put(f, data):
        nonlocal size
        f.write(data)
        digest.update(data)
        size += len(data)

    with open(path, "wb", buffering=1 << 20) as f:
        for key, image_path, cls in samples:
            with open(image_path, "rb") as img:
                jpeg = img.read()
            if not jpeg.startswith(JPEG_MAGIC):
                raise ShardError(f"{image_path} is not a JPEG: shard the resize stage's output, not raw images")
            label = str(cls).encode()
            # one write and one hash update per sample: fewer calls, same bytes
            put(f, b"".join((_tar_header(f"{key}.cls", len(label)), label, bytes(-len(label) % TAR_BLOCK),
                             _tar_header(f"{key}.jpg", len(jpeg)), jpeg, bytes(-len(jpeg) % TAR_BLOCK))))
            if stats:
                s, q, n = pixel_sums(jpeg)
                sums = [a + b for a, b in zip(sums, s)]
                squares = [a + b for a, b in zip(squares, q)]
                pixels += n
        # end of archive: two zero blocks, then zeros up to a whole record (as tar(1) and tarfile do)
        end = size + 2 * TAR_BLOCK
        put(f, bytes(2 * TAR_BLOCK + (-end) % TAR_RECORD))
    entry = {"name": Path(path).name, "num_samples": len(samples), "bytes": size, "sha256": digest.hexdigest()}
    if stats:
        entry["_sums"] = (sums, squares, pixels)
    return entry


def _write_task(task):
    index, split, path, samples, stats = task
    try:
        return split, index, write_shard(path, samples, stats)
    except ShardError:
        raise
    except Exception as e:  # a worker's traceback alone would not say which file broke
        raise ShardError(f"writing {path}: {type(e).__name__}: {e}") from None


def mean_std(sums, squares, pixels):
    """Per-channel mean and population std on the 0..1 scale from exact integer sums."""
    mean = [s / pixels / 255.0 for s in sums]
    # N*Q - S^2 is exact in integers; only the final division rounds.
    std = [math.sqrt(max(0, pixels * q - s * s)) / pixels / 255.0 for s, q in zip(sums, squares)]
    return mean, std


def shard_bounds(num_samples, shard_size=0, num_shards=0):
    """[start, ..., end] sample offsets of the shards: fixed-size shards, or exactly `num_shards` shards
    whose sizes differ by at most one (fewer only when there are fewer samples than shards)."""
    if num_shards:
        num_shards = max(1, min(num_shards, num_samples))
        return [i * num_samples // num_shards for i in range(num_shards + 1)]
    return list(range(0, num_samples, shard_size)) + [num_samples]


def run(src, out, train_shard_size=1000, val_shard_size=500, seed=0, workers=None, train_shards=0, val_shards=0):
    """Write shards and manifests for both splits into `out`; returns {"train": manifest, "val": manifest}.
    A shard count (train_shards / val_shards > 0) takes precedence over the shard size."""
    classes, splits = collect(src)
    splits["train"] = shuffled(splits["train"], seed)
    sizes = {"train": train_shard_size, "val": val_shard_size}
    counts = {"train": train_shards, "val": val_shards}
    # The resize stage's short side travels with the data, so training records it for predict.
    resize_info = Path(src) / "resize.json"
    short_side = json.loads(resize_info.read_text()).get("short_side") if resize_info.exists() else None
    workers = workers or fsutil.default_workers()
    out = Path(out)
    manifests = {}
    with fsutil.atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        tasks = []
        for split, samples in splits.items():
            bounds = shard_bounds(len(samples), sizes[split], counts[split])
            for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
                name = SHARD_NAME.format(split=split, index=i)
                tasks.append((i, split, str(tmp / name), samples[start:end], split == "train"))
        # Biggest work first so the last shards do not leave cores idle at the end.
        tasks.sort(key=lambda t: (-len(t[3]) * (2 if t[4] else 1), t[1], t[0]))
        entries = {"train": {}, "val": {}}
        pool = None
        if workers == 1:
            results = map(_write_task, tasks)
        else:
            import multiprocessing
            # started before the progress bar: tqdm's monitor thread must not exist when the pool forks
            pool = multiprocessing.Pool(min(workers, len(tasks)))
            results = pool.imap_unordered(_write_task, tasks, chunksize=1)
        bar = tqdm(total=sum(len(s) for s in splits.values()), desc="shard", unit="img", file=sys.stderr)
        try:
            for split, index, entry in results:
                entries[split][index] = entry
                bar.update(entry["num_samples"])
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
        for split, samples in splits.items():
            shards = [entries[split][i] for i in range(len(entries[split]))]
            manifest = {
                "split": split,
                "num_samples": len(samples),
                "num_classes": len(classes),
                "classes": classes,
                "shard_size": None if counts[split] else sizes[split],
                "num_shards": len(shards),
                "resize_size": short_side,
                "seed": seed,
                "shuffled": split == "train",
                "shards": [{k: v for k, v in e.items() if not k.startswith("_")} for e in shards],
            }
            if split == "train":
                sums, squares, pixels = [0, 0, 0], [0, 0, 0], 0
                for e in shards:
                    s, q, n = e["_sums"]
                    sums = [a + b for a, b in zip(sums, s)]
                    squares = [a + b for a, b in zip(squares, q)]
                    pixels += n
                manifest["mean"], manifest["std"] = mean_std(sums, squares, pixels)
            with open(tmp / f"{split}.json", "w") as f:
                json.dump(manifest, f, indent=2, sort_keys=True)
                f.write("\n")
            manifests[split] = manifest
    return manifests


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, type=Path,
                   help="the resize stage's output folder (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG)")
    p.add_argument("--out", required=True, type=Path,
                   help="folder to write shards and manifests into; replaced as a whole when the run succeeds")
    p.add_argument("--train-shard-size", type=int, default=1000,
                   help="train samples per shard (default: 1000, i.e. 1282 shards for ImageNet; see above)")
    p.add_argument("--val-shard-size", type=int, default=500,
                   help="val samples per shard (default: 500, i.e. 100 shards for ImageNet)")
    p.add_argument("--train-shards", type=int, default=0,
                   help="number of train shards instead of a size: e.g. a multiple of GPUs x loader workers "
                        "(default: 0, use --train-shard-size)")
    p.add_argument("--val-shards", type=int, default=0,
                   help="number of val shards instead of a size (default: 0, use --val-shard-size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the global train shuffle (default: 0)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes writing shards in parallel, each a whole shard; 1 writes in this process "
                        "(default: all CPU cores available)")
    args = p.parse_args(argv)
    if args.train_shard_size < 1 or args.val_shard_size < 1:
        p.error("shard sizes must be >= 1")
    if args.train_shards < 0 or args.val_shards < 0:
        p.error("shard counts must be >= 0")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    fsutil.exit_on_sigterm()
    try:
        manifests = run(args.src, args.out, args.train_shard_size, args.val_shard_size, args.seed, args.workers,
                        args.train_shards, args.val_shards)
    except ShardError as e:
        print(f"shard: error: {e}", file=sys.stderr)
        return 1
    for split, m in manifests.items():
        print(f"shard: {split}: {m['num_samples']} samples in {len(m['shards'])} shards", file=sys.stderr)
    print(f"shard: train mean {[round(v, 4) for v in manifests['train']['mean']]} "
          f"std {[round(v, 4) for v in manifests['train']['std']]} -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
