"""tools.evaluate and tools.imagenet.evaluation: metrics against plain torch, the same numbers on one
process and on two (torchrun, gloo), eval.json, ten-crop.

The shared setup (also used by test_predict.py): the mini dataset resized by the resize stage, put
into shards written here per the shard contract (36 val images in 5 val shards: an odd count, split
unevenly over 2 ranks), and an alexnetowtbn trained on them for one epoch by tools.train.
"""
import fcntl
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import ROOT, project_env, run_tool
from tools import evaluate as E
from tools.imagenet import preprocess as pp
from tools.imagenet.classes import class_name
from tools.imagenet.evaluation import evaluate, most_confused

VAL_SHARD_SIZE = 8


def write_shards(resized, out, train_shard_size=20, val_shard_size=VAL_SHARD_SIZE, seed=0):
    """Shards + manifests of a resized tree, per the shard contract (tarfile, bytes as they are)."""
    out.mkdir(parents=True)
    classes = sorted(p.name for p in (resized / "train").iterdir() if p.is_dir())
    for split, size in (("train", train_shard_size), ("val", val_shard_size)):
        files = sorted((resized / split).rglob("*.JPEG"), key=lambda p: p.name)
        if split == "train":
            random.Random(seed).shuffle(files)
        shards = []
        for start in range(0, len(files), size):
            name = f"{split}-{start // size:06d}.tar"
            with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tar:
                for f in files[start:start + size]:
                    for ext, data in (("jpg", f.read_bytes()), ("cls", str(classes.index(f.parent.name)).encode())):
                        info = tarfile.TarInfo(f"{f.stem}.{ext}")
                        info.size, info.mtime = len(data), 0
                        tar.addfile(info, io.BytesIO(data))
            data = (out / name).read_bytes()
            shards.append({"name": name, "num_samples": len(files[start:start + size]), "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
        manifest = {"split": split, "num_samples": len(files), "num_classes": len(classes), "classes": classes,
                    "shards": shards, "shard_size": size, "seed": seed}
        if split == "train":
            manifest.update(mean=[0.45, 0.45, 0.45], std=[0.25, 0.25, 0.25])
        (out / f"{split}.json").write_text(json.dumps(manifest))
    return out


def trained_run(tmp_path_factory, mini_resized):
    """(shards, run folder with model_001.pt): built once per session, whichever test file asks
    first, and once for all pytest-xdist workers (their temp folders share a parent; the mini
    dataset is the same on every worker, generated from the same seed)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    base = root / "evaluate_setup"
    shards, run = base / "shards", base / "run"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "evaluate_setup.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / "done").exists():
            shutil.rmtree(base, ignore_errors=True)
            write_shards(mini_resized, shards)
            run_tool("train", "--shards", shards, "--out", run, "--arch", "alexnetowtbn", "--device", "cpu",
                     "--crop-size", 64, "--resize-size", 72, "--epochs", 1, "--batch-size", 16, "--workers", 0,
                     "--schedule", "step", "--lr", 0.1, "--seed", 0, "--log-every", 100)
            (base / "done").touch()
    return shards, run


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mini_resized):
    return trained_run(tmp_path_factory, mini_resized)


def test_metrics_match_plain_torch():
    torch.manual_seed(0)
    c = 7
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, c))
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    batches = [(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8), torch.randint(0, c, (n,)))
               for n in (5, 9, 1, 16)]
    r = evaluate(model, batches, "cpu", mean, std, keep_predictions=True)

    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        logits = model((x.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
    top5 = logits.topk(5, 1).indices
    pred = top5[:, 0]
    assert r["count"] == 31
    assert r["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-6)
    assert r["correct1"] == int((pred == y).sum())
    assert r["correct5"] == int((top5 == y[:, None]).any(1).sum())
    assert r["top1_error"] == pytest.approx(100 * (1 - r["correct1"] / 31))
    assert r["top5_error"] == pytest.approx(100 * (1 - r["correct5"] / 31))
    assert r["class_count"] == torch.bincount(y, minlength=c).tolist()
    assert r["class_correct"] == torch.bincount(y[pred == y], minlength=c).tolist()
    confusion = torch.zeros(c, c, dtype=torch.int64)
    for t, p in zip(y.tolist(), pred.tolist()):
        confusion[t, p] += 1
    assert torch.equal(r["confusion"], confusion)
    assert torch.equal(r["predictions"]["top1"], pred) and torch.equal(r["predictions"]["label"], y)
    assert not r["ten_crop"]

    pairs = most_confused(confusion, k=3)
    off = [(int(confusion[t, p]), t, p) for t in range(c) for p in range(c) if t != p and confusion[t, p]]
    assert [(t, p, n) for n, t, p in sorted(off, key=lambda e: (-e[0], e[1], e[2]))[:3]] == pairs


def test_ten_crop_geometry_and_softmax_average():
    x = torch.arange(3 * 7 * 9).view(3, 7, 9)
    crops = pp.ten_crop(x, 4)
    assert crops.shape == (10, 3, 4, 4)
    assert torch.equal(crops[0], x[:, :4, :4]) and torch.equal(crops[1], x[:, :4, 5:])
    assert torch.equal(crops[2], x[:, 3:, :4]) and torch.equal(crops[3], x[:, 3:, 5:])
    assert torch.equal(crops[4], pp.center_crop(x, 4)) and torch.equal(crops[4], x[:, 1:5, 2:6])
    assert torch.equal(crops[5:], crops[:5].flip(-1))

    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    images = torch.randint(0, 256, (3, 10, 3, 4, 4), dtype=torch.uint8)
    labels = torch.tensor([0, 3, 4])
    r = evaluate(model, [(images, labels)], "cpu", [0.5] * 3, [0.25] * 3)
    with torch.no_grad():
        probs = F.softmax(model(pp.normalize(images.flatten(0, 1), [0.5] * 3, [0.25] * 3)), 1).view(3, 10, 5).mean(1)
    assert r["ten_crop"] and r["count"] == 3
    assert r["loss"] == pytest.approx(F.nll_loss(probs.log(), labels).item(), abs=1e-6)
    assert r["correct1"] == int((probs.argmax(1) == labels).sum())


def _numbers(doc):
    return {k: v for k, v in doc.items() if k not in ("seconds", "settings")}


def test_one_and_two_processes_agree(prepared, tmp_path, capsys):
    shards, run = prepared
    out1 = tmp_path / "eval1.json"
    assert E.main(["--run", str(run), "--shards", str(shards), "--workers", "0", "--batch-size", "5",
                   "--device", "cpu", "--output", str(out1)]) == 0
    summary = capsys.readouterr().out
    one = json.loads(out1.read_text())
    # torchrun itself: two CPU processes over gloo; the 5 val shards split 3 (20 images) / 2 (16).
    out2 = tmp_path / "eval2.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tools.evaluate", "--run-dir", str(run), "--shards", str(shards), "--workers", "0",
           "--batch-size", "4", "--device", "cpu", "--output", str(out2)]
    p = subprocess.run(cmd, cwd=ROOT, env=project_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    two = json.loads(out2.read_text())

    # Counts are exact; the loss is summed in fixed point (order-free), so only a kernel that rounds
    # differently for another batch size could move it, and then by ~1e-7.
    assert {**_numbers(one), "loss": None} == {**_numbers(two), "loss": None}
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-6)
    assert two["settings"]["world_size"] == 2 and one["settings"]["world_size"] == 1
    classes = json.loads((shards / "val.json").read_text())["classes"]
    assert one["count"] == 36 and one["epoch"] == 1 and one["checkpoint"].endswith("model_001.pt")
    assert 0 <= one["top1_error"] <= 100 and 0 <= one["top5_error"] <= one["top1_error"]
    assert [c["wnid"] for c in one["per_class"]] == classes
    for c in one["per_class"]:
        assert c["name"] == class_name(c["wnid"]) and c["count"] == 6
        assert c["accuracy"] == pytest.approx(100 * c["correct"] / 6)
    assert sum(c["correct"] for c in one["per_class"]) == one["correct1"]
    for m in one["most_confused"]:
        assert m["true_wnid"] != m["pred_wnid"] and m["count"] >= 1
        assert m["true_name"] == class_name(m["true_wnid"]) and m["pred_name"] == class_name(m["pred_wnid"])
    assert sum(m["count"] for m in one["most_confused"]) <= 36 - one["correct1"]
    assert f"top-1 error {one['top1_error']:.2f} %" in summary
    assert class_name(one["per_class"][0]["wnid"]) in summary or one["most_confused"]


def test_ten_crop_and_newest_checkpoint(prepared, tmp_path):
    shards, run = prepared
    run2 = tmp_path / "run"
    run2.mkdir()
    (run2 / "model_009.pt").write_bytes(b"not a checkpoint: must not be the one picked")
    shutil.copy(run / "model_001.pt", run2 / "model_010.pt")
    assert E.main(["--run", str(run2), "--shards", str(shards), "--workers", "2", "--batch-size", "7",
                   "--device", "cpu", "--ten-crop"]) == 0
    doc = json.loads((run2 / "eval.json").read_text())
    assert doc["checkpoint"].endswith("model_010.pt")
    assert doc["settings"]["ten_crop"] and doc["settings"]["averaging"] == "softmax"
    assert doc["count"] == 36 and len(doc["per_class"]) == 6


def test_clear_errors(prepared, tmp_path, capsys):
    shards, run = prepared
    assert E.main(["--run", str(tmp_path), "--shards", str(shards), "--device", "cpu"]) == 1
    assert "no model_NNN.pt" in capsys.readouterr().err
    assert E.main(["--run", str(run), "--shards", str(tmp_path), "--device", "cpu"]) == 1
    assert "val.json" in capsys.readouterr().err
