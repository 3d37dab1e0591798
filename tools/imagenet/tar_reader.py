"""Reads the shard stage's tar shards: each shard mapped into memory and its headers parsed by hand.

    from tools.imagenet.tar_reader import shard_samples
    for sample in shard_samples("W/shards/train-000000.tar"):   # {"__key__", "__url__", "cls", "jpg"}
        label, jpeg = int(sample["cls"]), sample["jpg"]
    shard_samples(path, stride=4, offset=1)                       # samples 1, 5, 9, ... only

WebDataset's reader (Python's tarfile under it) builds a TarInfo per member, which costs more than
the rest of a GPU-path loader worker's work per image (bench/bench_shard_read.py). The shard stage
writes plain ustar members (tools/shard.py, _tar_header), so this reads those with a few slices
each, checksums checked. A shard holding anything else (PAX headers for long names, GNU
extensions, links, directories) is read by WebDataset's reader instead; the samples are the same
either way. Samples are grouped as WebDataset groups them: consecutive members that share the
name up to the first dot of the file name make a sample, each member kept under the rest of its
name, lower-cased; members named like __meta__ are skipped.
"""
import mmap
import os
import re
from pathlib import Path

from webdataset.tariterators import tarfile_samples

BLOCK = 512
_END = bytes(BLOCK)
_USTAR = b"ustar\x00"  # POSIX ustar (what tarfile writes); GNU tar's "ustar  " goes to tarfile
_REGULAR = (ord("0"), 0)
_META = re.compile(r"__[^/]*__($|/)")


def _octal(field):
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def plain_members(data, path):
    """[(name, start, size)] of the tar in `data` (bytes or a read-only mmap), or None where a
    member is not a plain ustar regular file. Raises ValueError naming `path` where a header's
    checksum is wrong or the archive ends early."""
    members, pos, end = [], 0, len(data)
    while True:
        if pos + BLOCK > end:
            raise ValueError(f"{path}: the archive ends at byte {end} without its end marker (cut short?); "
                             f"rerun the shard stage")
        header = data[pos:pos + BLOCK]
        if header == _END:
            return members
        if header[156] not in _REGULAR or header[257:263] != _USTAR or header[124] & 0x80:
            return None
        # the checksum counts its own 8 bytes as spaces
        if _octal(header[148:156]) != sum(header) - sum(header[148:156]) + 8 * 32:
            raise ValueError(f"{path}: the tar header at byte {pos} fails its checksum (damaged shard); "
                             f"rerun the shard stage")
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
        size, start = _octal(header[124:136]), pos + BLOCK
        if start + size > end:
            raise ValueError(f"{path}: member {name.decode(errors='replace')} runs past the end of the "
                             f"archive (cut short?); rerun the shard stage")
        members.append((name.decode("utf-8", "surrogateescape"), start, size))
        pos = start + size + (-size % BLOCK)


def _grouped(members, path):
    """[(key, {suffix: (start, size)})] in archive order, as WebDataset's group_by_keys groups."""
    samples = []
    for name, start, size in members:
        base = name.rfind("/") + 1
        dot = name.find(".", base)
        if dot <= base or _META.match(name):
            continue  # no key or no suffix: WebDataset skips such members too
        key, suffix = name[:dot], name[dot + 1:].lower()
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        parts = samples[-1][1]
        if suffix in parts:
            raise ValueError(f"{path}: {name} is in the shard twice; rerun the shard stage")
        parts[suffix] = (start, size)
    return samples


def shard_samples(path, stride=1, offset=0):
    """The samples of one shard, every stride-th from offset (0-based) on, as dicts of bytes."""
    path = Path(path)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError(f"{path} is empty; rerun the shard stage")
        # mapped, not read: the shard stays in the page cache, not in each worker's memory, however
        # large the shards (train_shards: N can make them hundreds of MB)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            members = plain_members(data, path)
            if members is not None:
                url = str(path)
                for key, parts in _grouped(members, path)[offset::stride]:
                    sample = {"__key__": key, "__url__": url}
                    for suffix, (start, size) in parts.items():
                        sample[suffix] = data[start:start + size]
                    yield sample
                return
    for i, sample in enumerate(tarfile_samples([{"url": str(path)}])):
        if i % stride == offset:
            yield sample
