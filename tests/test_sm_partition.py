"""tools/imagenet/sm_partition.py and tools.train --step-sms: the training step on a CUDA green
context (part of the SMs), eager and captured as a CUDA graph, trains as on the whole GPU."""
import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._shards import write_shards
from tests.test_graphed import _batches, _close, _train
from tests.conftest import project_env
from tools.imagenet.distributed import step_sms_for, work_stream
from tools.imagenet.graphed import WARMUP
from tools.train import parse_args

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()


def test_step_sms_flag():
    base = ["--shards", "s", "--out", "o"]
    assert parse_args(base).step_sms == 0
    assert parse_args(base + ["--step-sms", "auto"]).step_sms == "auto"
    assert parse_args(base + ["--step-sms", "120"]).step_sms == 120
    assert parse_args(base + ["--step-sms", "0"]).step_sms == 0
    for bad in ("-8", "half", "1.5"):
        with pytest.raises(SystemExit):
            parse_args(base + ["--step-sms", bad])


def test_auto_keeps_sms_free_on_several_gpus_only():
    assert step_sms_for("auto", 1, 132) == 0  # one GPU: the whole of it
    assert step_sms_for("auto", 2, 132) == 120  # H100/H200: 12 SMs left free
    assert step_sms_for("auto", 4, 108) == 96  # A100: rounded down to the 8-SM granularity
    assert step_sms_for("auto", 2, 10) == 8  # never an empty partition
    assert step_sms_for(64, 1, 132) == 64 and step_sms_for(0, 8, 132) == 0


def test_work_stream_on_the_cpu_ignores_sms():
    assert isinstance(work_stream(torch.device("cpu"), 120), contextlib.nullcontext)
    assert isinstance(work_stream(torch.device("cpu"), "auto", 2), contextlib.nullcontext)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_green_context_step_trains_like_the_whole_gpu():
    from tools.imagenet.sm_partition import partitioned_stream
    stream, got, total = partitioned_stream("cuda:0", 64)
    assert 0 < got < total
    batches = _batches(WARMUP + 6, 32, "cuda")
    with torch.cuda.stream(torch.cuda.Stream()):
        whole, whole_losses, _ = _train("static", "cuda", batches)
    with torch.cuda.stream(stream):
        eager, eager_losses, _ = _train("static", "cuda", batches)
        graphed, graphed_losses, step = _train("graph", "cuda", batches)
    assert step.replays == 6
    for state, losses in ((eager, eager_losses), (graphed, graphed_losses)):
        _close(whole, state, 1e-4)
        assert losses == pytest.approx(whole_losses, rel=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_train_with_step_sms_and_cuda_graphs(tmp_path):
    info = write_shards(tmp_path / "shards", train_counts=[40, 40, 40, 40], val_counts=[10, 10])
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tools.train", "--shards", str(info["dir"]), "--out", str(out),
           "--arch", "alexnetowtbn", "--crop-size", "64", "--batch-size", "8", "--epochs", "1",
           "--workers", "2", "--log-every", "5", "--amp", "bf16", "--channels-last", "--decode", "gpu",
           "--cuda-graphs", "--step-sms", "64"]
    proc = subprocess.run(cmd, cwd=ROOT, env=project_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "work stream: " in proc.stdout and (out / "final.json").is_file()
    assert "cuda graphs: 9 steps replayed" in proc.stdout
