"""tools/train.py under torchrun with gloo on the CPU: 2 ranks on one node, and 2 simulated nodes."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._shards import write_shards
from tests.conftest import project_env
from tools.imagenet import checkpoint as ckpt
from tools.imagenet.loader import val_loader
from tools.imagenet.models import build_model
from tools.train import run_validation

ROOT = Path(__file__).resolve().parent.parent
ARCH = "mobilenet_v3_small"


def _env():
    return project_env(OMP_NUM_THREADS="1")


def _train_args(shards, out, *extra):
    return ["-m", "tools.train", "--shards", str(shards), "--out", str(out), "--arch", ARCH,
            "--crop-size", "64", "--device", "cpu", "--log-every", "2", "--deterministic",
            *map(str, extra)]


def _epochs(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"kind": "epoch"' in line]


def test_two_ranks_equal_steps_and_val_once(tmp_path):
    # 20 train images in 3 uneven shards (fewer than 2 ranks x 2 workers), 18 val in 4.
    info = write_shards(tmp_path / "shards", train_counts=[10, 7, 3], val_counts=[5, 4, 3, 6])
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()),
           *_train_args(info["dir"], out, "--batch-size", 6, "--epochs", 2, "--workers", 2,
                        "--val-batch-size", 4, "--step-alone", 2)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # each rank timed the step alone after training
    alone = json.loads((out / "final.json").read_text())["step_alone_images_per_s"]
    assert len(alone) == 2 and all(r > 0 for r in alone)
    assert "train step alone (synthetic batches, no all-reduce), images/s per rank" in proc.stdout
    epochs = _epochs(out)
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        assert r["steps_per_rank"] == [20 // 6] * 2
        assert r["val_count"] == info["val_total"] == 18
        assert sum(r["val_count_per_rank"]) == 18
    assert json.loads((out / "settings.json").read_text())["versions"]["world_size"] == 2
    # every log line carries each rank's data wait: a rank starved of data stalls both
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert train_records and all(len(r["data_share_ranks"]) == len(r["gpu_busy_ranks"])
                                 == len(r["step_host_ranks"]) == 2
                                 for r in train_records)
    assert all(0 <= v <= 1 for r in train_records for v in r["data_share_ranks"])
    assert any(v > 0 for r in train_records for v in r["data_share_ranks"])
    assert all(v > 0 for r in train_records for v in r["step_host_ranks"])

    # The 2-rank validation equals a single-process one of the saved checkpoint.
    state = ckpt.load(out / "model_002.pt")
    model = build_model(ARCH, state["num_classes"])
    model.load_state_dict(state["model"])
    single = run_validation(model, val_loader(info["dir"], 5, 0, 1, 0, 64), torch.device("cpu"),
                            state["mean"], state["std"])
    assert single["count"] == 18
    assert abs(single["loss"] - epochs[-1]["val_loss"]) < 1e-5
    assert abs(single["top1_err"] - epochs[-1]["val_top1_err"]) < 1e-9
    assert abs(single["top5_err"] - epochs[-1]["val_top5_err"]) < 1e-9


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost(tmp_path):
    info = write_shards(tmp_path / "shards", train_counts=[6, 5], val_counts=[3, 4])
    out = tmp_path / "run"
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
           "--rdzv-id", f"test{port}", "--max-restarts", "0",
           *_train_args(info["dir"], out, "--batch-size", 4, "--epochs", 1, "--workers", 0)]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outputs = [n.communicate(timeout=240)[0] for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(outputs)
    (epoch,) = _epochs(out)
    assert epoch["steps_per_rank"] == [11 // 4] * 2 and epoch["val_count"] == 7
    assert json.loads((out / "final.json").read_text())["checkpoint"].endswith("model_001.pt")


def _one_epoch_on_two_ranks(shards, out, *flags):
    """The checkpoint of a 2-rank gloo run of one epoch with these extra flags."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()),
           *_train_args(shards, out, "--batch-size", 6, "--epochs", 1, "--workers", 0, *flags)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return ckpt.load(out / "model_001.pt")


def test_bn_stats_synced_per_epoch_save_what_per_step_saves(tmp_path):
    # Train mode normalises with the batch's own statistics, and rank 0 keeps its own running
    # statistics either way (DDP broadcasts rank 0's): the saved models must be equal.
    info = write_shards(tmp_path / "shards", train_counts=[10, 7, 3], val_counts=[5, 4])
    states = {mode: _one_epoch_on_two_ranks(info["dir"], tmp_path / mode, "--bn-stats-sync", mode,
                                            "--bucket-mb", 0.5)["model"]
              for mode in ("step", "epoch")}
    assert any("running_mean" in k for k in states["step"])
    for k, v in states["step"].items():
        assert torch.equal(v, states["epoch"][k]), k


def test_gradients_travel_in_bf16_when_asked(tmp_path):
    # bf16 all-reduce rounds the summed gradients: close to the fp32 run's weights, not equal
    info = write_shards(tmp_path / "shards", train_counts=[10, 7, 3], val_counts=[5, 4])
    states = {dtype: _one_epoch_on_two_ranks(info["dir"], tmp_path / dtype, "--grad-allreduce", dtype)
              for dtype in ("fp32", "bf16")}
    assert states["bf16"]["settings"]["grad_allreduce"] == "bf16"
    weights = [k for k, v in states["fp32"]["model"].items() if v.is_floating_point() and "weight" in k]
    diffs = [(states["fp32"]["model"][k] - states["bf16"]["model"][k]).abs().max().item() for k in weights]
    assert max(diffs) > 0
    assert all(torch.allclose(states["fp32"]["model"][k], states["bf16"]["model"][k], atol=2e-3, rtol=2e-2)
               for k in weights)


def test_nccl_protocol_is_simple_unless_the_environment_or_auto_says_otherwise():
    from tools import train
    from tools.imagenet.distributed import nccl_protocol
    assert train.parse_args(["--shards", "s", "--out", "o"]).nccl_proto == "Simple"
    env = {}
    assert nccl_protocol("Simple", env) == "Simple" and env == {"NCCL_PROTO": "Simple"}
    env = {"NCCL_PROTO": "LL128"}  # the user's own setting wins
    assert nccl_protocol("Simple", env) == "LL128" and env == {"NCCL_PROTO": "LL128"}
    env = {}
    assert nccl_protocol("auto", env) == "auto" and env == {}


def test_cuda_connections_are_32_unless_the_environment_or_0_says_otherwise():
    from tools import train
    from tools.imagenet.distributed import cuda_connections
    assert train.parse_args(["--shards", "s", "--out", "o"]).cuda_connections == 32
    env = {}
    assert cuda_connections(32, env) == 32 and env == {"CUDA_DEVICE_MAX_CONNECTIONS": "32"}
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}  # the user's own setting wins
    assert cuda_connections(32, env) == 1 and env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    env = {}
    assert cuda_connections(0, env) == 0 and env == {}  # the driver's own
    with pytest.raises(ValueError, match="give 1 to 32"):
        cuda_connections(33, {})
    with pytest.raises(SystemExit):
        train.parse_args(["--shards", "s", "--out", "o", "--cuda-connections", "33"])


@pytest.mark.parametrize("tool,argv", [("train", ["--shards", "s", "--out", "o"]),
                                       ("evaluate", ["--shards", "s", "--run-dir", "r"])])
def test_train_and_evaluate_set_the_cuda_connections_before_they_first_touch_the_gpu(monkeypatch, tool, argv):
    """CUDA reads CUDA_DEVICE_MAX_CONNECTIONS when it makes the process's context: the tools set it
    before setup() (their first CUDA call), and only for a GPU run."""
    import importlib
    import os
    module = importlib.import_module(f"tools.{tool}")
    for name in ("CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_PROTO"):  # restored after the test
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    seen = []

    class Stop(Exception):
        pass

    def setup(device):
        seen.append((device, os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")))
        raise Stop

    monkeypatch.setattr(module, "setup", setup)
    for flags in ([], ["--cuda-connections", "16"]):
        with pytest.raises(Stop):
            module.main([*argv, "--device", "cuda", *flags])
        monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS")
    with pytest.raises(Stop):
        module.main([*argv, "--device", "cpu"])
    assert seen == [("cuda", "32"), ("cuda", "16"), ("cpu", None)]
