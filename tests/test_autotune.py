"""tools/imagenet/autotune.py: cuDNN's algorithm search on a synthetic batch, run before the data
pipeline starts, changes nothing about the training (on the CPU the search's forward and backward
still run; only the algorithm timing itself needs cuDNN)."""
import json

import torch
from torch import nn

from tests._shards import write_shards
from tools import train
from tools.imagenet import checkpoint as ckpt
from tools.imagenet.autotune import cudnn_searches, search_quietly, synthetic_step_rate


def small_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def test_search_feeds_the_training_shapes_and_leaves_model_and_rng_alone():
    torch.manual_seed(0)
    model = small_model().to(memory_format=torch.channels_last)
    seen = []
    model[0].register_forward_hook(lambda m, inputs, output: seen.append(
        (tuple(inputs[0].shape), m.training, inputs[0].dtype,
         inputs[0].is_contiguous(memory_format=torch.channels_last))))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    seconds = search_quietly(model, "cpu", train_batch=6, val_batch=4, crop_size=16,
                             input_dtype=torch.float32, channels_last=True)

    assert seconds >= 0
    # a train-mode forward (then its backward) at the train batch, an eval forward at the val batch
    assert seen == [((6, 3, 16, 16), True, torch.float32, True), ((4, 3, 16, 16), False, torch.float32, True)]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training


def test_step_rate_trains_a_copy_only():
    torch.manual_seed(0)
    model = small_model()
    calls = []
    model[0].register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    rate = synthetic_step_rate(model, "cpu", batch=3, crop_size=8, steps=4, warmup=1)
    assert rate > 0 and calls == [(3, 3, 8, 8)] * 5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and torch.equal(torch.get_rng_state(), rng)


def test_no_val_forward_without_a_val_batch():
    model = small_model()
    modes = []
    model[0].register_forward_hook(lambda m, i, o: modes.append(m.training))
    search_quietly(model, "cpu", train_batch=2, val_batch=None, crop_size=8)
    assert modes == [True]


def test_only_cuda_with_cudnn_benchmarking_searches(monkeypatch):
    assert not cudnn_searches(torch.device("cpu"))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert not cudnn_searches("cuda")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    assert cudnn_searches("cuda") == torch.backends.cudnn.enabled


def test_training_with_the_search_equals_training_without(tmp_path, monkeypatch, capsys):
    info = write_shards(tmp_path / "shards", train_counts=[6, 5, 4], val_counts=[3, 2])
    calls = []

    def searching(device):  # as on a GPU with cuDNN benchmarking
        calls.append(device)
        return True
    monkeypatch.setattr(train, "cudnn_searches", searching)

    def run(out, mode, *extra):
        return train.main(["--shards", str(info["dir"]), "--out", str(out), "--arch", "mobilenet_v3_small",
                           "--crop-size", "32", "--batch-size", "4", "--epochs", "2", "--device", "cpu",
                           "--workers", "0", "--deterministic", "--cudnn-autotune", mode, *extra])
    assert run(tmp_path / "quiet", "quiet", "--step-alone", "2") == 0
    assert "cuDNN algorithms chosen on a quiet GPU" in capsys.readouterr().out and len(calls) == 1
    assert len(json.loads((tmp_path / "quiet/final.json").read_text())["step_alone_images_per_s"]) == 1
    assert run(tmp_path / "inline", "inline") == 0
    assert "cuDNN algorithms" not in capsys.readouterr().out and len(calls) == 1
    a, b = ckpt.load(tmp_path / "quiet/model_002.pt"), ckpt.load(tmp_path / "inline/model_002.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["metrics"]["val_loss"] == b["metrics"]["val_loss"]
    assert a["settings"]["cudnn_autotune"] == "quiet"
