"""Benchmark: reading shards with tools.imagenet.tar_reader against WebDataset's reader (tarfile),
in one process on the same shards: the samples alone, and a GPU-path loader worker's whole work
(read, shuffle buffer, JPEG frame headers, packed raw batches: loader.TrainStream, decode="gpu").

    python bench/bench_shard_read.py                      # generates 4,096 256-px JPEGs, ~1 min
    python bench/bench_shard_read.py --shards W/shards    # the prepared dataset's shards

Prints images/s per reader and the ratio, medians of --repeats passes, the readers interleaved.
"""
import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

from webdataset.tariterators import tarfile_samples

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_loader as bl  # noqa: E402
from tools.imagenet import loader  # noqa: E402
from tools.imagenet.tar_reader import shard_samples  # noqa: E402


def webdataset_samples(path, stride=1, offset=0):
    """WebDataset's reader, as tools.imagenet.loader read shards before tar_reader."""
    for i, sample in enumerate(tarfile_samples([{"url": str(path)}])):
        if i % stride == offset:
            yield sample


READERS = {"webdataset": webdataset_samples, "tar_reader": shard_samples}


@contextlib.contextmanager
def loader_reading_with(reader):
    before, loader.shard_samples = loader.shard_samples, reader
    try:
        yield
    finally:
        loader.shard_samples = before


def read_all(paths, reader):
    """Images read from every shard, and the seconds it took."""
    t0, n = time.perf_counter(), 0
    for path in paths:
        for sample in reader(path):
            n += len(sample["jpg"]) > 0
    return n, time.perf_counter() - t0


def worker_stream(shards_dir, shards, batches, batch):
    """What one GPU-path loader worker does for `batches` raw batches; (images, seconds)."""
    stream = loader.TrainStream(shards_dir, shards, batch, 1, 0, 0, 1, 1, 224, "crop", 1000, decode="gpu")
    it = iter(stream)
    next(it)  # the shuffle buffer filled
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, default=None, help="shards to read (default: generate some)")
    p.add_argument("--images", type=int, default=4096, help="images to generate without --shards")
    p.add_argument("--repeats", type=int, default=5, help="passes per reader (median reported)")
    p.add_argument("--batches", type=int, default=12, help="raw batches per worker-stream pass")
    p.add_argument("--batch", type=int, default=256, help="images per raw batch")
    args = p.parse_args(argv)
    shards_dir = args.shards
    if shards_dir is None:
        work = Path(tempfile.mkdtemp(prefix="bench_shard_read_"))
        shards_dir = bl.make_dataset(work, args.images, 20, 2, 256)[1]
    manifest = loader.read_manifest(shards_dir, "train")
    shards = loader._shard_list(manifest)
    paths = [Path(shards_dir) / name for name, _ in shards]
    rates = {(task, name): [] for task in ("read", "worker") for name in READERS}
    for _ in range(args.repeats):
        for name, reader in READERS.items():
            n, dt = read_all(paths, reader)
            rates["read", name].append(n / dt)
            with loader_reading_with(reader):
                n, dt = worker_stream(shards_dir, shards, args.batches, args.batch)
            rates["worker", name].append(n / dt)
    print(f"{len(paths)} shards, {sum(n for _, n in shards)} images, {args.repeats} passes each")
    print("| task | webdataset img/s | tar_reader img/s | ratio |\n|---|---|---|---|")
    for task, label in (("read", "samples only"), ("worker", "GPU-path loader worker")):
        old, new = (statistics.median(rates[task, name]) for name in READERS)
        print(f"| {label} | {old:,.0f} | {new:,.0f} | {new / old:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
