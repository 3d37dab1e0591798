"""tools/train.py on the CPU, in one process: outputs, exact resume, NaN stop, schedules."""
import inspect
import json
import math

import pytest
import torch

from tests._shards import write_shards
from tools import train
from tools.imagenet import checkpoint as ckpt
from tools.imagenet.schedule import Schedule, regime

ARCH = "mobilenet_v3_small"  # a torchvision model with batch norm, tiny at 6 classes and 64 px


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), train_counts=[10, 7, 3, 9],
                        val_counts=[5, 4, 3])


def run(shards, out, *extra, epochs=2):
    return train.main(["--shards", str(shards["dir"]), "--out", str(out), "--arch", ARCH,
                       "--crop-size", "64", "--batch-size", "8", "--epochs", str(epochs),
                       "--device", "cpu", "--log-every", "2", "--deterministic", *map(str, extra)])


def test_outputs(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(shards, out, "--workers", 0, "--keep-checkpoints", 1) == 0
    assert "final val top-1 error" in capsys.readouterr().out
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["model_002.pt"]
    state = ckpt.load(out / "model_002.pt")
    for key in ("model", "arch", "num_classes", "classes", "mean", "std", "crop_size",
                "resize_size", "epoch", "optimizer", "scheduler", "rng", "settings", "metrics"):
        assert key in state, key
    assert state["epoch"] == 2 and state["arch"] == ARCH and state["num_classes"] == 6
    assert not any(k.startswith("module.") for k in state["model"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(r["val_count"] == shards["val_total"] for r in epochs)
    assert epochs[0]["steps_per_rank"] == [29 // 8]
    assert any(r["kind"] == "train" for r in records)
    for name in ("train.log", "test.log"):
        lines = (out / name).read_text().splitlines()
        assert len(lines) == 3 and lines[0].startswith("epoch\t")
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    settings = json.loads((out / "settings.json").read_text())
    assert settings["versions"]["world_size"] == 1 and settings["settings"]["arch"] == ARCH
    final = json.loads((out / "final.json").read_text())
    assert final["epoch"] == 2 and final["checkpoint"].endswith("model_002.pt")
    # A finished run refuses to be overwritten silently.
    with pytest.raises(SystemExit, match="--resume"):
        run(shards, out, "--workers", 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_identical_weights(shards, tmp_path, workers):
    full, split = tmp_path / "full", tmp_path / "split"
    assert run(shards, full, "--workers", workers, "--aug", "rrc", epochs=2) == 0
    assert run(shards, split, "--workers", workers, "--aug", "rrc", epochs=1) == 0
    assert run(shards, split, "--workers", workers, "--aug", "rrc", "--resume", epochs=2) == 0
    a, b = ckpt.load(full / "model_002.pt"), ckpt.load(split / "model_002.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["metrics"]["val_loss"] == b["metrics"]["val_loss"]
    # The resumed run's logs hold each epoch once.
    epochs = [json.loads(line)["epoch"] for line in (split / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in line]
    assert epochs == [1, 2]


def test_nan_loss_stops_and_keeps_the_last_checkpoint(shards, tmp_path, capsys):
    out = tmp_path / "nan"
    # Epoch 1 at LR 0.01, epoch 2 at 1e30: diverges in epoch 2.
    rc = run(shards, out, "--workers", 0, "--schedule", "step", "--lr", 0.01,
             "--lr-step-epochs", 1, "--lr-gamma", 1e32, "--lr-scaling", "none", "--log-every", 1)
    assert rc == 1
    err = capsys.readouterr().err
    assert "epoch 2, iteration" in err and ("nan" in err or "inf" in err) and "checkpoint" in err
    assert [e for e, _ in ckpt.list_checkpoints(out)] == [1]
    state = ckpt.load(out / "model_001.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "final.json").exists()


def test_sigterm_stops_after_the_step_and_resume_restarts_the_epoch(shards, tmp_path, monkeypatch):
    out = tmp_path / "term"
    original = train.train_epoch

    def preempted(epoch, *args, **kwargs):
        stop = inspect.signature(original).bind(epoch, *args, **kwargs).arguments["stop"]
        if epoch == 2:
            stop.set = True  # what the SIGTERM handler does
        return original(epoch, *args, **kwargs)

    monkeypatch.setattr(train, "train_epoch", preempted)
    assert run(shards, out, "--workers", 0) == train.INTERRUPTED
    assert [e for e, _ in ckpt.list_checkpoints(out)] == [1]
    monkeypatch.setattr(train, "train_epoch", original)
    assert run(shards, out, "--workers", 0, "--resume") == 0
    assert [e for e, _ in ckpt.list_checkpoints(out)] == [1, 2]


def test_stop_flag_catches_sigterm():
    import os
    import signal
    with train.StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.set


def test_regime_table_and_linear_scaling():
    assert regime(1) == (1e-2, 5e-4) and regime(18) == (1e-2, 5e-4)
    assert regime(19) == (5e-3, 5e-4) and regime(29) == (5e-3, 5e-4)
    assert regime(30) == (1e-3, 0.0) and regime(43) == (1e-3, 0.0)
    assert regime(44) == (5e-4, 0.0) and regime(52) == (5e-4, 0.0)
    assert regime(53) == (1e-4, 0.0) and regime(90) == (1e-4, 0.0)
    assert Schedule("regime", global_batch=1024).lr_wd(1) == (8e-2, 5e-4)
    assert Schedule("regime", global_batch=1024, scaling="none").lr_wd(20) == (5e-3, 5e-4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert Schedule("regime", global_batch=256).apply(opt, 30) == pytest.approx(2e-3)
    assert opt.param_groups[0]["weight_decay"] == 0.0


def test_step_and_cosine_schedules_and_state():
    step = Schedule("step", lr=0.1, step_epochs=[2, 4], gamma=0.1, weight_decay=1e-4)
    assert [round(step.lr_wd(e)[0], 6) for e in (1, 2, 3, 4, 5)] == [0.1, 0.1, 0.01, 0.01, 0.001]
    assert step.lr_wd(1)[1] == 1e-4
    cos = Schedule("cosine", lr=0.1, epochs=10, warmup_epochs=1)
    assert cos.lr_wd(1, 0.5)[0] == pytest.approx(0.05, rel=1e-2)
    assert cos.lr_wd(2)[0] == pytest.approx(0.1)
    assert cos.lr_wd(6, 0.5)[0] == pytest.approx(0.05)
    assert cos.lr_wd(10, 1.0)[0] == pytest.approx(0.0, abs=1e-12)
    restored = Schedule()
    restored.load_state_dict(cos.state_dict())
    assert restored.lr_wd(4, 0.3) == cos.lr_wd(4, 0.3)
    assert math.isclose(Schedule("step", lr=0.1, global_batch=64).lr_wd(1)[0], 0.05)


def test_trains_on_the_shard_stage_output(mini_shards, tmp_path):
    out = tmp_path / "mini"
    assert train.main(["--shards", str(mini_shards), "--out", str(out), "--arch", ARCH,
                       "--crop-size", "64", "--resize-size", "72", "--batch-size", "16",
                       "--epochs", "1", "--epoch-size", "3", "--workers", "2", "--device", "cpu",
                       "--log-every", "1"]) == 0
    final = json.loads((out / "final.json").read_text())
    val = json.loads((mini_shards / "val.json").read_text())
    assert final["val_count"] == val["num_samples"] and final["steps_per_rank"] == [3]
    state = ckpt.load(out / "model_001.pt")
    assert state["classes"] == val["classes"] and state["resize_size"] == 72


def test_gpu_step_timer():
    cpu = train.GpuStepTimer(torch.device("cpu"))
    cpu.start(), cpu.stop()
    assert cpu.seconds() == 0.0
    if not torch.cuda.is_available():
        return
    timer = train.GpuStepTimer(torch.device("cuda"))
    for _ in range(2):
        timer.start()
        torch.cuda._sleep(50_000_000)  # tens of ms of GPU time, none of host time
        timer.stop()
        torch.cuda._sleep(50_000_000)  # between steps: not counted
    one_sleep = timer.seconds() / 2
    timer.start()
    torch.cuda._sleep(50_000_000)
    timer.stop()
    assert timer.seconds() == pytest.approx(one_sleep, rel=0.2) and one_sleep > 0.005
    assert timer.seconds() == 0.0  # read and reset


def test_profile_steps_writes_a_trace_and_a_per_thread_table(shards, tmp_path):
    out = tmp_path / "run"
    assert run(shards, out, "--workers", 0, "--profile-steps", 2, epochs=1) == 0
    trace = json.loads((out / "profile_rank0.json").read_text())
    assert any(e.get("cat") == "cpu_op" for e in trace["traceEvents"])
    table = (out / "profile_rank0.txt").read_text()
    assert table.startswith("2 steps, rank 0") and "(training loop)" in table
    assert "aten::" in table
