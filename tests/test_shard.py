"""Shard stage: deterministic WebDataset shards, every image once with its class, exact mean/std."""
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from tests.conftest import run_tool
from tools.shard import sample_key


def _images(resized, split):
    """{key: (bytes, wnid)} of the resize stage's output for one split."""
    return {p.name.split(".")[0]: (p.read_bytes(), p.parent.name) for p in sorted((resized / split).glob("*/*"))}


def _read_shards(shards, split):
    """[(key, jpg bytes, cls int)] in shard order, as WebDataset yields them."""
    manifest = json.loads((shards / f"{split}.json").read_text())
    urls = [str(shards / s["name"]) for s in manifest["shards"]]
    return [(s["__key__"], s["jpg"], int(s["cls"])) for s in wds.WebDataset(urls, shardshuffle=False)]


@pytest.fixture(scope="module")
def second_run(mini_resized, tmp_path_factory):
    """The same shards written again, by one worker instead of two."""
    out = tmp_path_factory.mktemp("shard2") / "shards"
    run_tool("shard", "--src", mini_resized, "--out", out, "--train-shard-size", 20, "--val-shard-size", 7,
             "--seed", 0, "--workers", 1)
    return out


def test_two_runs_are_byte_identical(mini_shards, second_run):
    names = sorted(p.name for p in mini_shards.iterdir())
    assert names == sorted(p.name for p in second_run.iterdir())
    assert "train.json" in names and "val.json" in names and "train-000000.tar" in names
    for name in names:
        assert (mini_shards / name).read_bytes() == (second_run / name).read_bytes(), name


def test_every_image_once_with_its_class_and_bytes(mini_resized, mini_shards):
    for split in ("train", "val"):
        manifest = json.loads((mini_shards / f"{split}.json").read_text())
        classes = sorted(p.name for p in (mini_resized / "train").iterdir())
        assert manifest["classes"] == classes and manifest["num_classes"] == len(classes)
        images = _images(mini_resized, split)
        samples = _read_shards(mini_shards, split)
        keys = [k for k, _, _ in samples]
        assert sorted(keys) == sorted(images), split
        assert len(keys) == len(set(keys)) == manifest["num_samples"]
        for key, jpg, cls in samples:
            assert "." not in key
            data, wnid = images[key]
            assert jpg == data, key
            assert cls == classes.index(wnid), key
        if split == "val":
            assert keys == sorted(keys)


def test_tar_members_are_fixed_and_shards_match_the_manifest(mini_shards):
    for split in ("train", "val"):
        manifest = json.loads((mini_shards / f"{split}.json").read_text())
        size = manifest["shard_size"]
        assert [s["name"] for s in manifest["shards"]] == [f"{split}-{i:06d}.tar" for i in
                                                           range(len(manifest["shards"]))]
        for i, entry in enumerate(manifest["shards"]):
            data = (mini_shards / entry["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"]
            assert len(data) == entry["bytes"]
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                members = tar.getmembers()
            assert len(members) == 2 * entry["num_samples"]
            assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.isfile()
                       for m in members)
            if i < len(manifest["shards"]) - 1:
                assert entry["num_samples"] == size
        assert sum(s["num_samples"] for s in manifest["shards"]) == manifest["num_samples"]


def test_train_is_shuffled_across_classes(mini_shards):
    samples = _read_shards(mini_shards, "train")
    classes = [cls for _, _, cls in samples]
    assert classes != sorted(classes)
    manifest = json.loads((mini_shards / "train.json").read_text())
    start = 0
    for entry in manifest["shards"]:
        in_shard = set(classes[start:start + entry["num_samples"]])
        start += entry["num_samples"]
        assert len(in_shard) >= 2, entry["name"]


def test_mean_std_equal_a_direct_computation(mini_resized, mini_shards):
    pixels = np.concatenate([np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
                             .reshape(-1, 3) for data, _ in _images(mini_resized, "train").values()]) / 255.0
    manifest = json.loads((mini_shards / "train.json").read_text())
    np.testing.assert_allclose(manifest["mean"], pixels.mean(axis=0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(manifest["std"], pixels.std(axis=0), rtol=0, atol=1e-10)
    assert "mean" not in json.loads((mini_shards / "val.json").read_text())


def _jpeg(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _tree(root, files):
    for rel, data in files.items():
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return Path(root)


def test_val_class_missing_from_train_is_a_clear_error(tmp_path):
    src = _tree(tmp_path / "src", {"train/n00000001/n00000001_1.JPEG": _jpeg("red"),
                                   "val/n00000002/ILSVRC2012_val_00000001.JPEG": _jpeg("blue")})
    proc = run_tool("shard", "--src", src, "--out", tmp_path / "shards", "--workers", 1, check=False)
    assert proc.returncode != 0
    assert "n00000002" in proc.stderr and "train" in proc.stderr
    assert not (tmp_path / "shards").exists()


def test_dotted_names_give_keys_without_dots(tmp_path):
    assert sample_key("n01440764_10026.JPEG") == "n01440764_10026"
    assert sample_key("img.v2.final.jpg") == "img_v2_final"
    src = _tree(tmp_path / "src", {"train/a/x.v1.JPEG": _jpeg("red"), "train/b/y.JPEG": _jpeg("green"),
                                   "val/b/z.v2.JPEG": _jpeg("blue")})
    run_tool("shard", "--src", src, "--out", tmp_path / "shards", "--workers", 1)
    keys = sorted(k for k, _, _ in _read_shards(tmp_path / "shards", "train"))
    assert keys == ["x_v1", "y"]
    assert [(k, c) for k, _, c in _read_shards(tmp_path / "shards", "val")] == [("z_v2", 1)]


def test_fast_tar_header_is_a_valid_fixed_ustar_header():
    from tools.shard import _tar_header, _tar_header_pax
    for name, size in [("n01440764_10026.jpg", 40321), ("ILSVRC2012_val_00000001.cls", 3), ("a.jpg", 0),
                       ("k" * 96 + ".jpg", 12_345_678), ("k" * 120 + ".jpg", 5), ("dé.jpg", 7)]:
        header = _tar_header(name, size)
        if len(header) == tarfile.BLOCKSIZE:  # the long and non-ASCII names go through tarfile's PAX header
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")  # also checks the checksum
            assert (info.name, info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname,
                    info.type) == (name, size, 0, 0o444, 0, 0, "", "", tarfile.REGTYPE)
        # Python >= 3.11.4 / 3.12 leave device numbers of regular files empty: then bytes match tarfile's
        if _tar_header_pax("x", 0)[329:337] == bytes(8):
            assert header == _tar_header_pax(name, size), name


def test_shard_count_setting_gives_that_many_shards(mini_resized, tmp_path):
    out = tmp_path / "shards"
    run_tool("shard", "--src", mini_resized, "--out", out, "--train-shards", 4, "--val-shards", 3, "--workers", 1)
    train, val = (json.loads((out / f"{s}.json").read_text()) for s in ("train", "val"))
    assert len(train["shards"]) == 4 and len(val["shards"]) == 3
    counts = [s["num_samples"] for s in train["shards"]]
    assert sum(counts) == train["num_samples"] and max(counts) - min(counts) <= 1
    assert train["resize_size"] == json.loads((mini_resized / "resize.json").read_text())["short_side"]


def test_shard_bounds_give_exactly_the_count():
    from tools.shard import shard_bounds
    assert len(shard_bounds(400, num_shards=64)) == 65 and len(shard_bounds(10, num_shards=6)) == 7
    assert shard_bounds(10, num_shards=20) == list(range(11))
    assert shard_bounds(10, shard_size=4) == [0, 4, 8, 10]
