"""Resize stage: every real-ImageNet quirk comes out as an RGB baseline JPEG of the right size."""
import csv
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, project_env, run_tool
from tools.imagenet import image
from tools.resize import resize_image, target_size

SHORT = 64
WNID = "n01440764"


def _jpeg(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _photo(w, h, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def _quirks():
    """{name: (bytes, displayed (w, h))}: the oddities of the real archives, made with PIL."""
    out = {}
    out["plain.JPEG"] = (_jpeg(_photo(160, 120)), (160, 120))
    out["cmyk.JPEG"] = (_jpeg(_photo(150, 100).convert("CMYK")), (150, 100))
    out["png_named_jpeg.JPEG"] = (_png(_photo(100, 130)), (100, 130))
    out["gray.JPEG"] = (_jpeg(_photo(120, 90).convert("L")), (120, 90))
    # palette PNG: left half transparent (index 0), right half opaque red (index 1)
    pal = Image.new("P", (100, 80), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(0, (0, 0, 50, 80))
    out["palette.JPEG"] = (_png(pal, transparency=0), (100, 80))
    # 16-bit grayscale at half scale: 8-bit 128 when scaled properly, 255 when clipped
    i16 = Image.fromarray(np.full((90, 120), 128 * 257, dtype=np.uint16))
    assert i16.mode.startswith("I")
    out["png16.JPEG"] = (_png(i16), (120, 90))
    rgba = _photo(90, 110).convert("RGBA")
    rgba.putalpha(128)
    out["rgba.JPEG"] = (_png(rgba), (90, 110))
    out["la.JPEG"] = (_png(_photo(90, 110).convert("LA")), (90, 110))
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): stored 160x120, left red / right blue
    rot = Image.new("RGB", (160, 120), (255, 0, 0))
    rot.paste((0, 0, 255), (80, 0, 160, 120))
    exif = rot.getexif()
    exif[0x0112] = 6
    out["exif6.JPEG"] = (_jpeg(rot, exif=exif), (120, 160))
    out["large.JPEG"] = (_jpeg(_photo(4000, 3000)), (4000, 3000))
    out["small.JPEG"] = (_jpeg(_photo(50, 40)), (50, 40))  # under the target: re-encoded, not enlarged
    out["progressive.JPEG"] = (_jpeg(_photo(130, 100), progressive=True), (130, 100))
    return out


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    """Quirk files under src/train/<wnid>/ plus a non-image and a truncated JPEG; resized with 2 workers."""
    tmp = tmp_path_factory.mktemp("resize")
    src = tmp / "src"
    (src / "train" / WNID).mkdir(parents=True)
    (src / "val" / WNID).mkdir(parents=True)
    quirks = _quirks()
    for name, (data, _) in quirks.items():
        (src / "train" / WNID / name).write_bytes(data)
    (src / "train" / WNID / "not_an_image.JPEG").write_bytes(b"<html>This photo is no longer available</html>")
    full = _jpeg(_photo(160, 120, seed=3))
    (src / "train" / WNID / "truncated.JPEG").write_bytes(full[: len(full) // 2])
    (src / "val" / WNID / "ILSVRC2012_val_00000001.JPEG").write_bytes(_jpeg(_photo(70, 90)))
    # what a SIGKILLed earlier run (pid 999999, gone) left beside --dst: a half-written copy
    stale = tmp / ".dst.tmp-999999"
    (stale / "train" / WNID).mkdir(parents=True)
    (stale / "train" / WNID / "plain.JPEG").write_bytes(b"half")
    proc = run_tool("resize", "--src", src, "--dst", tmp / "dst", "--short-side", SHORT, "--quality", 90,
                    "--workers", 2, "--rejected", tmp / "rejected.tsv", "--max-rejected-fraction", 0.2)
    return {"tmp": tmp, "src": src, "dst": tmp / "dst", "quirks": quirks, "proc": proc}


def _expected(w, h):
    return target_size(w, h, SHORT)


def test_each_quirk_is_an_rgb_baseline_jpeg_of_the_right_size(resized):
    for name, (_, (w, h)) in resized["quirks"].items():
        path = resized["dst"] / "train" / WNID / name
        with Image.open(path) as img:
            assert img.format == "JPEG", name
            assert img.mode == "RGB", name
            assert not img.info.get("progressive") and not img.info.get("progression"), name
            assert "exif" not in img.info and "icc_profile" not in img.info, name
            ow, oh = img.size
        if min(w, h) <= SHORT:
            assert (ow, oh) == (w, h), f"{name} was resized although smaller than the target"
        else:
            assert min(ow, oh) == SHORT, name
            # aspect kept within 1 px, orientation (portrait/landscape) kept
            assert (ow >= oh) == (w >= h), name
            assert abs(max(ow, oh) - max(w, h) * SHORT / min(w, h)) <= 1, name


def test_pixels_of_special_modes(resized):
    train = resized["dst"] / "train" / WNID
    # 16-bit scaled to 8 bits, not clipped
    assert abs(np.asarray(Image.open(train / "png16.JPEG")).astype(int).mean() - 128) <= 2
    # palette transparency composited on white; the opaque half keeps its red
    pal = np.asarray(Image.open(train / "palette.JPEG")).astype(int)
    assert (pal[:, :20] >= 245).all()
    assert np.abs(pal[:, -20:] - [255, 0, 0]).max() <= 10
    # EXIF orientation 6 applied: stored left half (red) ends up on top, displayed as portrait
    rot = np.asarray(Image.open(train / "exif6.JPEG")).astype(int)
    assert rot.shape[:2] == (_expected(120, 160)[1], SHORT)
    assert np.abs(rot[:20].mean(axis=(0, 1)) - [255, 0, 0]).max() < 20
    assert np.abs(rot[-20:].mean(axis=(0, 1)) - [0, 0, 255]).max() < 20
    # grayscale stays gray in RGB
    gray = np.asarray(Image.open(train / "gray.JPEG")).astype(int)
    assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 2


def test_rejected_files_are_listed_and_the_stage_succeeds(resized):
    assert resized["proc"].returncode == 0
    with open(resized["tmp"] / "rejected.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["path", "reason"]
    rejected = {path: reason for path, reason in rows[1:]}
    assert set(rejected) == {f"train/{WNID}/not_an_image.JPEG", f"train/{WNID}/truncated.JPEG"}
    assert all(reason for reason in rejected.values())
    assert not (resized["dst"] / "train" / WNID / "not_an_image.JPEG").exists()
    # everything else mirrored, with the same relative names, and the summary beside it
    written = sorted(p.relative_to(resized["dst"]).as_posix() for p in resized["dst"].rglob("*.JPEG"))
    expected = sorted(p.relative_to(resized["src"]).as_posix() for p in resized["src"].rglob("*.JPEG")
                      if p.relative_to(resized["src"]).as_posix() not in rejected)
    assert written == expected
    assert (resized["dst"] / "resize.json").exists()
    assert not list(resized["tmp"].glob(".dst.tmp-*"))  # its own temporary folder and the stale one


def test_stale_temporary_folder_of_a_killed_run_is_removed(resized):
    assert not (resized["tmp"] / ".dst.tmp-999999").exists()


def test_sigterm_removes_the_temporary_output(tmp_path):
    """Slurm and Snakemake stop a job with SIGTERM: the half-written copy must not stay behind."""
    src = tmp_path / "src" / "train" / WNID
    src.mkdir(parents=True)
    (src / "a.JPEG").write_bytes(_jpeg(_photo(160, 120)))
    os.mkfifo(src / "b.JPEG")  # opening it blocks: the run is certainly in progress when the signal comes
    cmd = [sys.executable, "-m", "tools.resize", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"),
           "--workers", "2", "--rejected", str(tmp_path / "rejected.tsv")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=project_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not list(tmp_path.glob(".dst.tmp-*")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert list(tmp_path.glob(".dst.tmp-*")), proc.stderr.read() if proc.poll() is not None else "no tmp"
        time.sleep(0.5)  # let the pool start and a worker block on the FIFO
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert not list(tmp_path.glob(".dst.tmp-*")) and not (tmp_path / "dst").exists()


def test_shared_decode_leaves_torch_threads_alone():
    """image.load_resized is called from predict's threads and the GPU data path: the stage's
    one-thread-per-worker setting must not leak into them."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        img = image.load_resized(_jpeg(_photo(400, 300)), SHORT)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert img.size == _expected(400, 300) and img.mode == "RGB"
    # the stage's bytes are exactly load_resized + the encode
    assert resize_image(io.BytesIO(_jpeg(_photo(400, 300))), SHORT, 90)[0] == _jpeg(img, optimize=False)


def test_too_many_rejections_fail_with_a_clear_message_and_no_output(resized):
    tmp = resized["tmp"]
    proc = run_tool("resize", "--src", resized["src"], "--dst", tmp / "dst_fail", "--short-side", SHORT,
                    "--workers", 2, "--rejected", tmp / "rejected_fail.tsv", "--max-rejected-fraction", 0.1,
                    check=False)
    assert proc.returncode != 0
    assert "max-rejected-fraction" in proc.stderr and "not_an_image.JPEG" in proc.stderr
    assert not (tmp / "dst_fail").exists()
    assert (tmp / "rejected_fail.tsv").read_text().count("\n") == 3


def test_one_worker_and_two_workers_give_identical_bytes(resized):
    tmp = resized["tmp"]
    run_tool("resize", "--src", resized["src"], "--dst", tmp / "dst1", "--short-side", SHORT, "--quality", 90,
             "--workers", 1, "--rejected", tmp / "rejected1.tsv", "--max-rejected-fraction", 0.2)
    a = {p.relative_to(resized["dst"]): p.read_bytes() for p in resized["dst"].rglob("*") if p.is_file()}
    b = {p.relative_to(tmp / "dst1"): p.read_bytes() for p in (tmp / "dst1").rglob("*") if p.is_file()}
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert (tmp / "rejected.tsv").read_text() == (tmp / "rejected1.tsv").read_text()


def test_pillow_resampler_agrees_with_torch(resized):
    path = resized["src"] / "train" / WNID / "large.JPEG"
    a, size_a = resize_image(path, SHORT, 95, "torch")
    b, size_b = resize_image(path, SHORT, 95, "pillow")
    assert size_a == size_b == _expected(4000, 3000)
    diff = np.abs(np.asarray(Image.open(io.BytesIO(a))).astype(int) - np.asarray(Image.open(io.BytesIO(b))))
    assert diff.mean() < 1.5


def test_mini_imagenet_quirks(mini_raw, mini_extracted, mini_resized):
    """The project generator's planted quirks all come out right; only the non-image is rejected."""
    rejected = (mini_resized.parent / "rejected.tsv").read_text().splitlines()
    assert rejected[0] == "path\treason"
    assert [line.split("\t")[0] for line in rejected[1:]] == [mini_raw["quirks"]["not_an_image"]]
    for name, rel in mini_raw["quirks"].items():
        if name == "not_an_image":
            continue
        with Image.open(mini_extracted / rel) as src:
            src_size = src.size
        with Image.open(mini_resized / rel) as img:
            assert (img.format, img.mode) == ("JPEG", "RGB"), name
            assert min(img.size) == min(min(src_size), 72), name
    n_src = sum(1 for p in mini_extracted.glob("*/*/*") if p.is_file())
    n_dst = sum(1 for p in mini_resized.rglob("*.JPEG"))
    assert n_dst == n_src - 1
