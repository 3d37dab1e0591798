"""tools.predict: every quirk of the real archives read as the resize stage reads it, bad files
reported while the others are predicted, --json, folders and globs, and the same answers as
evaluation on the val images (model: alexnetowtbn trained one epoch by tools.train, see
test_evaluate.trained_run)."""
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_tool
from tests.test_evaluate import trained_run
from tools import predict as P
from tools.imagenet import loader
from tools.imagenet import image
from tools.imagenet import preprocess as pp
from tools.imagenet.classes import class_name
from tools.imagenet.evaluation import evaluate

QUIRKS = ("cmyk_val", "cmyk_train", "png_as_jpeg", "grayscale_train", "palette_png", "png16", "exif_rotated",
          "large")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mini_resized):
    return trained_run(tmp_path_factory, mini_resized)


def test_decodes_every_quirk_as_the_resize_stage(mini_raw, mini_extracted, mini_resized):
    for name in QUIRKS:
        rel = mini_raw["quirks"][name]
        img = image.load_resized(mini_extracted / rel, 72)
        assert img.mode == "RGB", name
        # the very pixels the resize stage encoded: its JPEG encode of them gives its file, byte for byte
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90, optimize=False, progressive=False)
        assert buf.getvalue() == (mini_resized / rel).read_bytes(), name
    with Image.open(mini_extracted / mini_raw["quirks"]["exif_rotated"]) as raw:
        stored, orientation = raw.size, raw.getexif().get(0x0112)
    rotated = image.load_resized(mini_extracted / mini_raw["quirks"]["exif_rotated"], 72).size
    assert orientation in (5, 6, 7, 8) and (rotated[0] > rotated[1]) != (stored[0] > stored[1])


def test_small_image_enlarged_as_the_val_loader_does(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(tmp_path / "small.jpg")
    x = pp.load_for_model(tmp_path / "small.jpg", 72, 64)
    assert x.shape == (3, 64, 64) and x.dtype == torch.uint8
    sample = {"__key__": "small", "jpg": (tmp_path / "small.jpg").read_bytes()}
    via_loader = loader.center_crop(loader._open_rgb(tmp_path, sample, 64), 64)
    assert torch.equal(x, pp.to_tensor(via_loader))
    assert pp.load_for_model(tmp_path / "small.jpg", 72, 64, ten=True).shape == (10, 3, 64, 64)


def test_expand_inputs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/a.JPG", "d/sub/b.png", "d/notes.txt", "c.Jpeg"):
        (tmp_path / name).write_bytes(b"x")
    got = P.expand_inputs([str(tmp_path / "d"), str(tmp_path / "*.Jpeg"), str(tmp_path / "*.nothing"),
                           str(tmp_path / "missing.jpg"), str(tmp_path / "d" / "notes.txt")])
    assert [(p.replace(str(tmp_path), ""), err is None) for p, err in got] == [
        ("/d/a.JPG", True), ("/d/sub/b.png", True),  # a folder: image extensions in any case, recursive
        ("/c.Jpeg", True),
        ("/*.nothing", False), ("/missing.jpg", False),
        ("/d/notes.txt", True),  # named explicitly: decoded by content, whatever its name
    ]


def test_quirky_files_garbage_and_json(prepared, mini_raw, mini_extracted, tmp_path, capsys):
    _, run = prepared
    ckpt = run / "model_001.pt"
    classes = torch.load(ckpt, map_location="cpu", weights_only=False)["classes"]
    folder = tmp_path / "in"
    (folder / "deeper").mkdir(parents=True)
    for i, name in enumerate(QUIRKS):
        shutil.copy(mini_extracted / mini_raw["quirks"][name], folder / ("deeper" if i % 2 else "") / f"{name}.JPEG")
    (folder / "broken.jpg").write_bytes(b"<html>Photo unavailable</html>")
    (folder / "notes.txt").write_text("not picked up from a folder")
    Image.new("L", (20, 30), 128).save(folder / "tiny.PNG")

    proc = run_tool("predict", ckpt, folder, "--json", "--batch-size", "3", check=False)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in doc}
    assert sorted(by_name) == sorted([f"{n}.JPEG" for n in QUIRKS] + ["broken.jpg", "tiny.PNG"])
    assert "cannot read image" in by_name["broken.jpg"]["error"] and "broken.jpg" in proc.stderr
    for name, r in by_name.items():
        if name == "broken.jpg":
            continue
        probs = [t["prob"] for t in r["top"]]
        assert len(r["top"]) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
        for t in r["top"]:
            assert classes[t["index"]] == t["wnid"] and t["name"] == class_name(t["wnid"])

    # text output, a glob and a missing file; exit code 0 once every input is readable
    cmyk = folder / "cmyk_val.JPEG"
    assert P.main([str(ckpt), str(cmyk), str(folder / "deeper" / "*.JPEG"), str(tmp_path / "gone.jpg")]) == 1
    out, err = capsys.readouterr()
    assert str(cmyk) in out and out.count("  1. ") == 1 + sum(1 for i in range(len(QUIRKS)) if i % 2)
    top = by_name["cmyk_val.JPEG"]["top"][0]
    assert f"{top['wnid']}  {top['name']}" in out
    assert "gone.jpg" in err and "no such file" in err
    assert P.main([str(ckpt), str(cmyk), "--top-k", "2", "--ten-crop"]) == 0
    assert capsys.readouterr().out.count("  2. ") == 1


def as_probs(results):
    results = list(results)
    probs = torch.zeros(len(results), 6)
    for i, r in enumerate(results):
        for t in r["top"]:
            probs[i, t["index"]] = t["prob"]
    return probs


def test_agrees_with_evaluate(prepared, mini_resized, mini_extracted):
    shards, run = prepared
    model, ckpt = P.load_checkpoint(run / "model_001.pt", torch.device("cpu"))
    batches = loader.val_loader(shards, 5, 0, 1, 0, ckpt["crop_size"])
    r = evaluate(model, batches, "cpu", ckpt["mean"], ckpt["std"], keep_predictions=True)
    assert r["top1_error"] < 60  # trained: far better than chance (83 %)

    manifest = json.loads((shards / "val.json").read_text())
    keys = []
    for shard in manifest["shards"]:
        with tarfile.open(shards / shard["name"]) as tar:
            keys += [m.name[:-4] for m in tar.getmembers() if m.name.endswith(".jpg")]
    labels = r["predictions"]["label"].tolist()
    wnids = [ckpt["classes"][y] for y in labels]
    assert len(keys) == len(labels) == 36

    resized = [str(mini_resized / "val" / w / f"{k}.JPEG") for w, k in zip(wnids, keys)]
    probs = as_probs(P.predict(model, ckpt, resized, torch.device("cpu"), batch_size=7, top_k=6))
    assert probs.argmax(1).tolist() == r["predictions"]["top1"].tolist()
    assert torch.allclose(probs, r["predictions"]["probs"], atol=1e-4)

    # from the original files (CMYK and grayscale among them), replaying the resize stage's encode
    original = [str(mini_extracted / "val" / w / f"{k}.JPEG") for w, k in zip(wnids, keys)]
    again = as_probs(P.predict(model, ckpt, original, torch.device("cpu"), batch_size=7, top_k=6, jpeg_quality=90))
    assert torch.allclose(again, probs, atol=1e-6)
