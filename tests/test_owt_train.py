"""tools/train.py --parallel owt under torchrun (2 gloo ranks on the CPU): its checkpoint
evaluates to the numbers the run logged, and runs resume across modes (owt -> ddp -> owt) from the
plain layout."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._shards import write_shards
from tests.conftest import project_env
from tools import evaluate, train
from tools.imagenet import checkpoint as ckpt
from tools.imagenet.models import build_model

ROOT = Path(__file__).resolve().parent.parent
ARCH = "alexnetowtbn"  # BatchNorm in the trunk (per rank) and in the split classifier


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _torchrun(shards, out, parallel, epochs, *extra):
    # Epoch 1 at LR 0.01, then LR 0 (step schedule, gamma 0; the schedule's settings travel in
    # the checkpoint): SGD leaves the weights exactly as loaded, which shows what a resume loaded.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "tools.train", "--shards", str(shards),
           "--out", str(out), "--arch", ARCH, "--crop-size", "64", "--device", "cpu",
           "--workers", "0", "--deterministic", "--log-every", "1", "--batch-size", "4",
           "--epoch-size", "2", "--val-batch-size", "3", "--schedule", "step", "--lr", "0.01",
           "--lr-scaling", "none", "--lr-step-epochs", "1", "--lr-gamma", "0",
           "--parallel", parallel, "--epochs", str(epochs), *extra]
    env = project_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout


def _epoch_records(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "epoch"]


def _check_plain_layout(state, plain):
    """Full-size weights and SGD momentum buffers, as an optimizer over the plain model has them."""
    shapes = [p.shape for p in plain.parameters()]
    assert {k: v.shape for k, v in state["model"].items()} == \
        {k: v.shape for k, v in plain.state_dict().items()}
    momentum = state["optimizer"]["state"]
    assert sorted(momentum) == list(range(len(shapes)))
    assert [momentum[i]["momentum_buffer"].shape for i in range(len(shapes))] == shapes


def test_owt_checkpoint_evaluates_as_logged_and_resumes_across_modes(tmp_path):
    # Val shards of 7 and 2 images at 3 per batch: the ranks validate 3 and 1 batches.
    info = write_shards(tmp_path / "shards", train_counts=[8, 8], val_counts=[7, 2])
    out = tmp_path / "run"
    assert "(owt)" in _torchrun(info["dir"], out, "owt", 1)

    torch.manual_seed(0)  # what the runs start from (--seed 0) when nothing is loaded
    plain = build_model(ARCH, 6)
    first = ckpt.load(out / "model_001.pt")
    assert first["settings"]["parallel"] == "owt"
    _check_plain_layout(first, plain)
    (logged,) = _epoch_records(out)
    assert logged["val_count"] == 9 and logged["val_count_per_rank"] == [7, 2]

    # One process, the plain model, the saved weights: the numbers the 2-rank owt run logged.
    assert evaluate.main(["--checkpoint", str(out / "model_001.pt"), "--shards", str(info["dir"]),
                          "--device", "cpu", "--workers", "0", "--batch-size", "4",
                          "--output", str(tmp_path / "eval.json")]) == 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["count"] == 9
    assert abs(ev["loss"] - logged["val_loss"]) < 1e-5
    assert abs(ev["top1_error"] - logged["val_top1_err"]) < 1e-9
    assert abs(ev["top5_error"] - logged["val_top5_err"]) < 1e-9

    # owt -> ddp -> owt. LR 0 after epoch 1: each resumed run's weights are the loaded ones; its
    # SGD steps use the loaded momentum buffers (a sharded or missing one would fail the step).
    _torchrun(info["dir"], out, "ddp", 2, "--resume")
    second = ckpt.load(out / "model_002.pt")
    assert second["settings"]["parallel"] == "ddp"
    _check_plain_layout(second, plain)
    _torchrun(info["dir"], out, "owt", 3, "--resume")
    third = ckpt.load(out / "model_003.pt")
    assert third["settings"]["parallel"] == "owt"
    _check_plain_layout(third, plain)
    for name, _ in plain.named_parameters():
        w = first["model"][name]
        assert torch.equal(w, second["model"][name]) and torch.equal(w, third["model"][name]), name
    assert not torch.equal(first["model"]["classifier.1.weight"], plain.classifier[1].weight)
    assert [r["epoch"] for r in _epoch_records(out)] == [1, 2, 3]


def test_owt_refuses_a_model_without_a_classifier(tmp_path):
    info = write_shards(tmp_path / "shards", train_counts=[4], val_counts=[2])
    with pytest.raises(SystemExit, match="--parallel ddp"):
        train.main(["--shards", str(info["dir"]), "--out", str(tmp_path / "run"), "--arch",
                    "resnet18", "--device", "cpu", "--parallel", "owt"])
