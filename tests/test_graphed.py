"""tools/imagenet/graphed.py: the static-buffer step (padding, weighted loss, re-capture on an LR
change) against the eager step; the capture itself and DDP capture on GPUs."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tests._shards import write_shards
from tests.conftest import project_env
from tools.imagenet.graphed import WARMUP, GraphedStep
from tools.imagenet.step import SGD_KERNELS, sgd
from tools.train import eager_step, parse_args

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()


def _net(bn=True):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1)] + ([nn.BatchNorm2d(8)] if bn else []) + [
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)]
    return nn.Sequential(*layers)


def _batches(n, batch, device, short=()):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        size = batch - 3 if i in short else batch
        out.append((torch.randn(size, 3, 8, 8, generator=g).to(device),
                    torch.randint(0, 5, (size,), generator=g).to(device)))
    return out


def _train(step_kind, device, batches, bn=True, lr_change_at=None, sgd_kernel="foreach"):
    model = _net(bn).to(device)
    opt = sgd(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, kernel=sgd_kernel)
    if step_kind == "eager":
        step = eager_step(model, opt, None, torch.device(device))
    else:
        step = GraphedStep(model, opt, None, batch_size=len(batches[0][1]), capture=step_kind == "graph")
    losses = []
    for i, (x, y) in enumerate(batches):
        if i == lr_change_at:
            for group in opt.param_groups:
                group["lr"] = 0.01
        logits, loss = step(x, y)
        assert logits.shape == (len(y), 5)
        losses.append(loss.item())
    return model.state_dict(), losses, step


def _close(a, b, tol):
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=tol, rtol=tol), k


def test_static_buffers_train_like_the_eager_step():
    batches = _batches(WARMUP + 6, 16, "cpu")
    eager, eager_losses, _ = _train("eager", "cpu", batches)
    static, static_losses, _ = _train("static", "cpu", batches)
    _close(eager, static, 1e-5)
    assert static_losses == pytest.approx(eager_losses, rel=1e-5)


def test_a_short_batch_is_padded_with_zero_weight():
    # Without BatchNorm the repeats change nothing: the same weights as eager steps on the short batch
    batches = _batches(6, 16, "cpu", short={2, 5})
    eager, eager_losses, _ = _train("eager", "cpu", batches, bn=False)
    static, static_losses, _ = _train("static", "cpu", batches, bn=False)
    _close(eager, static, 1e-5)
    assert static_losses == pytest.approx(eager_losses, rel=1e-5)


def test_cuda_graphs_flag_refuses_what_it_cannot_capture():
    base = ["--shards", "s", "--out", "o", "--cuda-graphs"]
    for extra in (["--compile"], ["--schedule", "cosine"], ["--parallel", "owt"], ["--device", "cpu"]):
        with pytest.raises(SystemExit):
            parse_args(base + extra)
    assert parse_args(base).cuda_graphs


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("sgd_kernel", SGD_KERNELS)
def test_captured_step_trains_like_the_eager_step(sgd_kernel):
    batches = _batches(WARMUP + 12, 32, "cuda", short={WARMUP + 4})
    with torch.cuda.stream(torch.cuda.Stream()):  # as tools.train: never the legacy default stream
        eager, eager_losses, _ = _train("static", "cuda", batches, lr_change_at=WARMUP + 8, sgd_kernel=sgd_kernel)
        graphed, graphed_losses, step = _train("graph", "cuda", batches, lr_change_at=WARMUP + 8,
                                               sgd_kernel=sgd_kernel)
    assert step.captures == 2 and step.replays == 12  # the first replay, then the LR change
    _close(eager, graphed, 1e-4)
    assert graphed_losses == pytest.approx(eager_losses, rel=1e-4)


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_ddp_training_with_cuda_graphs_on_two_gpus(tmp_path):
    info = write_shards(tmp_path / "shards", train_counts=[40, 40, 40, 40], val_counts=[10, 10])
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tools.train", "--shards", str(info["dir"]), "--out", str(out), "--arch", "alexnetowtbn",
           "--crop-size", "64", "--batch-size", "16", "--epochs", "2", "--workers", "2", "--log-every", "2",
           "--amp", "bf16", "--channels-last", "--cuda-graphs"]
    proc = subprocess.run(cmd, cwd=ROOT, env=project_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (out / "final.json").is_file() and (out / "model_002.pt").is_file()
    # 2 x 10 steps: 11 eager, then one capture and 9 replays
    assert "cuda graphs: 9 steps replayed, 1 capture(s) so far" in proc.stdout
