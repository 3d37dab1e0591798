"""cuDNN's algorithm search on a quiet GPU, before the data pipeline starts; the step's rate alone.

    from tools.imagenet.autotune import cudnn_searches, search_quietly, synthetic_step_rate
    if cudnn_searches(device):
        search_quietly(model, device, train_batch=256, val_batch=256, crop_size=224,
                       input_dtype=torch.bfloat16, amp_dtype=torch.bfloat16, channels_last=True)
    ...  # training
    images_per_s = synthetic_step_rate(model, device, 256, 224, torch.bfloat16, torch.bfloat16, True)

With torch.backends.cudnn.benchmark on, the first call of each convolution shape times cuDNN's
algorithms once each and keeps the fastest for the rest of the process. In training that first
call comes with the first batch, while the GPU data path's threads decode and crop the next
batches on the same GPU: the timings are disturbed, and a slower algorithm can be kept for the
whole run. A run-long slow mode is what 2-GPU runs of one setting showed on 2 x H200 (a whole
epoch at ~32k or at ~38k img/s; bench/NOTES-gpu.md phase 8). Here the search runs first, on a
synthetic batch of the training shapes (forward and backward in train mode, forward in eval mode
for validation), on a copy of the model: the model, its gradients, BatchNorm statistics and every
RNG are left as they were, so a run with the search trains exactly like one without.

synthetic_step_rate times the train step (forward, backward, SGD) the same way after training: a
rank whose process kept a slow algorithm shows a lower rate than its peers and than other runs.
"""
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from tools.imagenet.step import autocast, eager_step, sgd


def cudnn_searches(device):
    """True where the first call of a convolution shape runs cuDNN's algorithm search."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.backends.cudnn.enabled
            and torch.backends.cudnn.benchmark)


def search_quietly(model, device, train_batch, val_batch, crop_size, input_dtype=torch.float32,
                   amp_dtype=None, channels_last=False):
    """One train step's forward and backward (no optimizer step) at train_batch, and one eval
    forward at val_batch (None: none), on a copy of `model` on `device`, with synthetic inputs of
    the shapes, dtype and memory format the training loop feeds; returns the seconds it took.
    Nothing of `model` nor of the RNG states changes."""
    device = torch.device(device)
    start = time.perf_counter()
    probe = copy.deepcopy(model).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with autocast(device, amp_dtype):
            probe.train()
            x, y = _synthetic(train_batch, crop_size, input_dtype, channels_last, device)
            F.cross_entropy(probe(x), y).backward()
            if val_batch:
                probe.eval()
                with torch.no_grad():
                    probe(_synthetic(val_batch, crop_size, input_dtype, channels_last, device)[0])
        _sync(device)
    return time.perf_counter() - start


def synthetic_step_rate(model, device, batch, crop_size, input_dtype=torch.float32, amp_dtype=None,
                        channels_last=False, steps=20, warmup=3, sgd_kernel="fused"):
    """Images/s of `steps` train steps (forward, backward, SGD; no collective) on one synthetic
    batch, through a copy of `model` on `device`, after `warmup` untimed ones: the rate this
    process's GPU takes the step at with nothing beside it. `model` and the RNGs stay untouched."""
    device = torch.device(device)
    probe = copy.deepcopy(model).to(device).train()
    step = eager_step(probe, sgd(probe.parameters(), lr=1e-3, momentum=0.9, kernel=sgd_kernel), amp_dtype,
                      device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x, y = _synthetic(batch, crop_size, input_dtype, channels_last, device)
        return timed_rate(lambda: step(x, y), batch, warmup, steps, device=device)


def timed_rate(step, images, warmup, steps, repeats=1, device="cuda"):
    """Median images/s of `repeats` windows of `steps` calls of step() (each `images` images),
    after `warmup` untimed calls; waits for `device` before and after each window."""
    device = torch.device(device)
    for _ in range(warmup):
        step()
    _sync(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        rates.append(images * steps / (time.perf_counter() - start))
    return statistics.median(rates)


def _synthetic(n, crop_size, dtype, channels_last, device):
    x = torch.randn(n, 3, crop_size, crop_size, device=device).to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt), torch.zeros(n, dtype=torch.int64, device=device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
