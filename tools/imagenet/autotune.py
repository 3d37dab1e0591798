"""cuDNN's algorithm search on a quiet GPU, before the data pipeline starts.

    from tools.imagenet.autotune import cudnn_searches, search_quietly
    if cudnn_searches(device):
        search_quietly(model, device, train_batch=256, val_batch=256, crop_size=224,
                       input_dtype=torch.bfloat16, amp_dtype=torch.bfloat16, channels_last=True)

With torch.backends.cudnn.benchmark on, the first call of each convolution shape times cuDNN's
algorithms once each and keeps the fastest for the rest of the process. In training that first
call comes with the first batch, while the GPU data path's threads decode and crop the next
batches on the same GPU: the timings are disturbed, and a slower algorithm can be kept for the
whole run. A run-long slow mode is what 2-GPU runs of one setting showed on 2 x H200 (a whole
epoch at ~32k or at ~38k img/s; bench/NOTES-gpu.md phase 8). Here the search runs first, on a
synthetic batch of the training shapes (forward and backward in train mode, forward in eval mode
for validation), on a copy of the model: the model, its gradients, BatchNorm statistics and every
RNG are left as they were, so a run with the search trains exactly like one without.
"""
import copy
import time

import torch
import torch.nn.functional as F


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
    devices = [device] if device.type == "cuda" else []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.random.fork_rng(devices=devices):
        def batch(n):
            x = torch.randn(n, 3, crop_size, crop_size, device=device).to(input_dtype)
            return x.contiguous(memory_format=fmt)

        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            probe.train()
            logits = probe(batch(train_batch))
            target = torch.zeros(train_batch, dtype=torch.int64, device=device)
            F.cross_entropy(logits, target).backward()
            if val_batch:
                probe.eval()
                with torch.no_grad():
                    probe(batch(val_batch))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del probe
    return time.perf_counter() - start
