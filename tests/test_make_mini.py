"""The mini ImageNet generator: real archive layout, determinism, planted quirks, labels."""
import csv
import io
import re
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.conftest import run_tool
from tools.imagenet.classes import class_names
from tools.make_mini import generate


def read_tar(path):
    """[(name, bytes)] in member order."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def member_bytes(info, rel):
    """Bytes of a member given its extracted-tree path (`train/<wnid>/<file>` or `val/<wnid>/<file>`)."""
    split, wnid, fname = rel.split("/")
    if split == "val":
        return dict(read_tar(info["val_tar"]))[fname]
    inner = dict(read_tar(info["train_tar"]))[f"{wnid}.tar"]
    with tarfile.open(fileobj=io.BytesIO(inner)) as tar:
        return tar.extractfile(fname).read()


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("mini"), num_classes=5, train_per_class=6, val_per_class=4,
                    quirks=True, seed=3)


def test_layout(mini):
    wnids = mini["wnids"]
    assert len(wnids) == 5 and wnids == sorted(wnids) and set(wnids) <= set(class_names())
    outer = read_tar(mini["train_tar"])
    assert sorted(name for name, _ in outer) == [f"{w}.tar" for w in wnids]
    total = 0
    for name, data in outer:
        wnid = name[:-4]
        with tarfile.open(fileobj=io.BytesIO(data)) as inner:
            members = inner.getmembers()
        assert all(m.isfile() and re.fullmatch(rf"{wnid}_\d+\.JPEG", m.name) for m in members)
        assert len(members) >= 6
        total += len(members)
    assert total == mini["num_train"] == 5 * 6 + 1  # + the non-image file
    val = read_tar(mini["val_tar"])
    names = [name for name, _ in val]
    assert sorted(names) == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 21)]
    assert names != sorted(names), "val member order must not be sorted"


def test_labels_match_val_members(mini):
    with open(mini["labels_csv"], newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["filename", "wnid"]
    labels = dict(rows[1:])
    assert set(labels) == {name for name, _ in read_tar(mini["val_tar"])}
    counts = {w: list(labels.values()).count(w) for w in mini["wnids"]}
    assert counts == {w: 4 for w in mini["wnids"]}


def test_deterministic(tmp_path):
    a = generate(tmp_path / "a", num_classes=3, train_per_class=4, val_per_class=3, quirks=True, seed=7)
    b = generate(tmp_path / "b", num_classes=3, train_per_class=4, val_per_class=3, quirks=True, seed=7)
    c = generate(tmp_path / "c", num_classes=3, train_per_class=4, val_per_class=3, quirks=True, seed=8)
    for key in ("train_tar", "val_tar", "labels_csv"):
        assert a[key].read_bytes() == b[key].read_bytes()
    assert a["train_tar"].read_bytes() != c["train_tar"].read_bytes()


def test_quirks_found_by_content(mini):
    q = mini["quirks"]
    assert set(q) == {"cmyk_train", "cmyk_val", "png_as_jpeg", "grayscale_train", "grayscale_val", "palette_png",
                      "png16", "exif_rotated", "large", "not_an_image"}
    assert all(path.endswith(".JPEG") for path in q.values())
    assert q["cmyk_train"].startswith("train/") and q["cmyk_val"].startswith("val/")

    def open_(name):
        return Image.open(io.BytesIO(member_bytes(mini, q[name])))

    assert (open_("cmyk_train").format, open_("cmyk_train").mode) == ("JPEG", "CMYK")
    assert (open_("cmyk_val").format, open_("cmyk_val").mode) == ("JPEG", "CMYK")
    assert open_("png_as_jpeg").format == "PNG" and open_("png_as_jpeg").mode == "RGB"
    assert (open_("grayscale_train").format, open_("grayscale_train").mode) == ("JPEG", "L")
    assert open_("grayscale_val").mode == "L"
    assert (open_("palette_png").format, open_("palette_png").mode) == ("PNG", "P")
    assert open_("png16").format == "PNG" and open_("png16").mode.startswith("I")
    assert np.asarray(open_("png16")).max() > 255  # really 16-bit values
    exif = open_("exif_rotated")
    assert exif.getexif().get(0x0112) == 6
    assert ImageOps.exif_transpose(exif).size == exif.size[::-1] != exif.size
    assert open_("large").size == (4000, 3000)
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(io.BytesIO(member_bytes(mini, q["not_an_image"])))


def test_class_pattern_survives_in_quirks(mini):
    """Quirk images are real samples: the CMYK one has its class's colours, like a plain sample does."""
    wnid = mini["quirks"]["cmyk_train"].split("/")[1]
    inner = dict(read_tar(mini["train_tar"]))[f"{wnid}.tar"]
    with tarfile.open(fileobj=io.BytesIO(inner)) as tar:
        imgs = [Image.open(io.BytesIO(tar.extractfile(m).read())) for m in tar.getmembers()]
    plain = [im for im in imgs if im.mode == "RGB"]
    cmyk = [im for im in imgs if im.mode == "CMYK"][0].convert("RGB")

    def top_colour(im):  # the most saturated pixels are the shape's foreground colour
        a = np.asarray(im.convert("RGB"), dtype=float).reshape(-1, 3)
        sat = a.max(1) - a.min(1)
        return a[sat >= np.quantile(sat, 0.95)].mean(0)

    ref = np.mean([top_colour(im) for im in plain], axis=0)
    assert np.abs(top_colour(cmyk) - ref).max() < 40


def test_classes_distinct_without_quirks(tmp_path):
    info = generate(tmp_path, num_classes=4, train_per_class=3, val_per_class=1, seed=1)
    assert info["quirks"] == {}
    sizes = []
    for _, data in read_tar(info["train_tar"]):
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for m in tar.getmembers():
                im = Image.open(tar.extractfile(m))
                assert (im.format, im.mode) == ("JPEG", "RGB")
                sizes.append(im.size)
    assert all(80 <= s <= 400 for size in sizes for s in size)
    assert len(set(sizes)) > 1


def test_cli(tmp_path):
    run_tool("make_mini", "--out", tmp_path, "--classes", 2, "--train-per-class", 2, "--val-per-class", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "val_labels.csv"]
    proc = run_tool("make_mini", "--out", tmp_path, "--classes", 0, check=False)
    assert proc.returncode == 2 and "--classes" in proc.stderr


def _train_jpeg_bytes(info):
    total = 0
    for _, data in read_tar(info["train_tar"]):
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            total += sum(m.size for m in tar.getmembers())
    return total


def test_noise_sets_the_jpeg_sizes_and_the_default_keeps_the_output(tmp_path):
    """--noise: the benchmarks' knob for JPEGs as large as ImageNet's (the same images otherwise)."""
    args = dict(num_classes=2, train_per_class=6, val_per_class=1, seed=3, min_side=256, max_side=400)
    default = generate(tmp_path / "default", **args)
    assert generate(tmp_path / "eight", noise=8, **args)["train_tar"].read_bytes() == \
        default["train_tar"].read_bytes()
    noisy = generate(tmp_path / "noisy", noise=16, **args)
    assert _train_jpeg_bytes(noisy) > 1.2 * _train_jpeg_bytes(default)
    run_tool("make_mini", "--out", tmp_path / "cli", "--classes", 2, "--train-per-class", 6, "--val-per-class", 1,
             "--seed", 3, "--min-side", 256, "--max-side", 400, "--noise", 16, "--workers", 1)
    assert (tmp_path / "cli/ILSVRC2012_img_train.tar").read_bytes() == noisy["train_tar"].read_bytes()
    proc = run_tool("make_mini", "--out", tmp_path / "bad", "--noise", -1, check=False)
    assert proc.returncode == 2 and "--noise" in proc.stderr
