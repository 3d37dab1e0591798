"""tools/imagenet/tar_reader: the shard reader gives the samples WebDataset's reader gives, reads
the shard stage's shards itself, and names the shard and the place where one is damaged."""
import io
import tarfile

import pytest
from webdataset.tariterators import tarfile_samples

from tools import shard
from tools.imagenet.tar_reader import plain_members, shard_samples


def _webdataset(path, stride=1, offset=0):
    return [s for i, s in enumerate(tarfile_samples([{"url": str(path)}])) if i % stride == offset]


def _same(ours, theirs):
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs]
    for a, b in zip(ours, theirs):
        assert a == {k: v for k, v in b.items() if k in a}
        assert set(b) - set(a) <= {"__local_path__"}


def _shard(tmp_path, keys, name="train-000000.tar"):
    """A shard written by the shard stage, each key's JPEG a different length."""
    samples = []
    for i, key in enumerate(keys):
        image = tmp_path / f"{i}.jpg"
        image.write_bytes(shard.JPEG_MAGIC + bytes([i % 251]) * (100 + 37 * i))
        samples.append((key, str(image), i % 3))
    path = tmp_path / name
    shard.write_shard(path, samples)
    return path


@pytest.mark.parametrize("stride,offset", [(1, 0), (3, 0), (3, 2), (20, 5)])
def test_the_shard_stages_shards_read_as_webdataset_reads_them(tmp_path, stride, offset):
    path = _shard(tmp_path, [f"n01440764_{i}" for i in range(11)])
    assert plain_members(path.read_bytes(), path) is not None  # read here, not by tarfile
    ours = list(shard_samples(path, stride, offset))
    _same(ours, _webdataset(path, stride, offset))
    assert len(ours) == len(range(offset, 11, stride))
    assert all(s["jpg"].startswith(shard.JPEG_MAGIC) and s["__url__"] == str(path) for s in ours)


def test_a_shard_with_long_names_goes_to_webdatasets_reader_with_the_same_samples(tmp_path):
    long_key = "n" * 120  # over ustar's 100 bytes: the shard stage writes a PAX header for it
    path = _shard(tmp_path, ["a_1", long_key, "b_2"])
    assert plain_members(path.read_bytes(), path) is None
    ours = list(shard_samples(path, 2, 1))
    _same(ours, _webdataset(path, 2, 1))
    assert [s["__key__"] for s in ours] == [long_key]


def test_members_without_a_key_or_named_as_metadata_are_skipped_as_webdataset_skips_them(tmp_path):
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("__meta__", b"m"), ("README", b"r"), ("dir/k1.JPG", b"j1"), ("dir/k1.cls", b"1"),
                           ("k2.seg.png", b"p"), ("k2.cls", b"2"), (".hidden", b"h")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ours = list(shard_samples(path))
    _same(ours, _webdataset(path))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in ours] == [
        ("dir/k1", ["cls", "jpg"]), ("k2", ["cls", "seg.png"])]
    twice = tmp_path / "twice.tar"
    with tarfile.open(twice, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("k1.jpg", "k1.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"j"))
    with pytest.raises(ValueError, match=rf"{twice}: k1.jpg is in the shard twice"):
        list(shard_samples(twice))


def test_a_damaged_or_cut_shard_is_refused_naming_it_and_where(tmp_path):
    path = _shard(tmp_path, ["a_1", "b_2"])
    data = bytearray(path.read_bytes())
    first = 512 + 512  # the .cls header and its block, then the .jpg header
    data[first + 3] ^= 0x01  # one bit of a member's name
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{path}: the tar header at byte {first} fails its checksum"):
        list(shard_samples(path))
    good = _shard(tmp_path, ["a_1", "b_2"], name="good.tar").read_bytes()
    # inside a header, inside a JPEG, and before the end marker (a_1.cls at 0, a_1.jpg at 1024, b_2 from 2048)
    for cut in (1024 + 50, 1536 + 10, 4096):
        path.write_bytes(good[:cut])
        with pytest.raises(ValueError, match=rf"{path}: .*(cut short|ends at byte)"):
            list(shard_samples(path))
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{path} is empty"):
        list(shard_samples(path))


def test_the_reading_benchmark_compares_both_readers_on_the_same_shards(tmp_path, capsys):
    import sys
    from pathlib import Path
    from tests._shards import write_shards
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import bench_shard_read
    write_shards(tmp_path / "shards", num_classes=3, train_counts=[10, 7, 3], val_counts=[2, 2])
    assert bench_shard_read.main(["--shards", str(tmp_path / "shards"), "--repeats", "1", "--batches", "2",
                                  "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "3 shards, 20 images" in out
    rows = [line for line in out.splitlines() if line.startswith("| samples only") or line.startswith("| GPU-path")]
    assert len(rows) == 2 and all(line.rstrip(" |").endswith("x") for line in rows)
