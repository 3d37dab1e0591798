"""One-weird-trick model parallelism: equal to single-process training (2 gloo ranks under torchrun,
the real launch path), checkpoint layout round trips, and the bytes-per-step arithmetic."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.imagenet.models import build_model
from tools.imagenet.owt import bytes_per_step, comm_breakdown, split_sizes, wrap_owt

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ["alexnetowt", "alexnetowtbn", "overfeat"]


def test_owt_matches_single_process_under_torchrun():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "owt_worker.py"), *ARCHS]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    for arch in ARCHS:
        assert f"OWT OK {arch}" in proc.stdout, out[-6000:]


def test_split_sizes():
    assert split_sizes(4096, 2) == [2048, 2048]
    assert split_sizes(7, 2) == [4, 3]
    assert split_sizes(1000, 3) == [334, 333, 333]
    assert sum(split_sizes(10, 4)) == 10


def test_bytes_per_step_alexnet():
    model = build_model("alexnetowt", 1000)
    n, w = 256, 2
    # Ring collectives, per rank: all-reduce 2(W-1)/W * S, all-gather/reduce-scatter (W-1)/W * S.
    params, trunk = 61_100_840, 23_296 + 307_392 + 663_936 + 884_992 + 590_080
    assert bytes_per_step(model, n, w, "ddp") == params * 4  # 2 * (1/2) * params * 4 bytes
    expected = (trunk * 4                      # trunk gradient all-reduce
                + 2 * n * 9216 * 4 // 2        # features all-gather + its reduce-scatter
                + 2 * n * (4096 + 4096) * 4 // 2  # two hidden layers' gathers
                + 2 * n * 500 * 4 // 2)        # logits all-to-all (500 columns per rank) there and back
    assert bytes_per_step(model, n, w, "owt") == expected
    parts = comm_breakdown(model, n, w, "owt", act_bytes=2)
    assert parts["trunk_grad_allreduce"] == trunk * 4
    assert parts["features_gather_fwd_bwd"] == n * 9216 * 2
    # The point of the trick: far less traffic than all-reducing the classifier's gradients.
    assert bytes_per_step(model, n, w, "owt") < bytes_per_step(model, n, w, "ddp") / 8
    # One GPU: nothing to send.
    assert bytes_per_step(model, n, 1, "owt") == bytes_per_step(model, n, 1, "ddp") == 0
    with pytest.raises(ValueError, match="mode"):
        bytes_per_step(model, n, w, "fsdp")


def test_owt_refuses_models_without_a_classifier_sequential():
    with pytest.raises(ValueError, match="features"):
        wrap_owt(build_model("resnet18", 10))
