"""The training step, op by op: what tools.train runs each batch (unless --cuda-graphs, whose
GraphedStep captures the same operations), bench/ceiling.py times, and autotune's rate alone uses.

    optimizer = sgd(model.parameters(), lr=0.01, momentum=0.9, kernel="fused")
    step = eager_step(model, optimizer, torch.bfloat16, device)
    logits, loss = step(x, y)
"""
import torch
import torch.nn.functional as F


SGD_KERNELS = ("fused", "foreach")


def sgd(params, lr, momentum, weight_decay=0.0, kernel="fused"):
    """SGD whose update runs as `kernel`: fused reads each parameter, gradient and momentum buffer
    once in one pass (weight decay included); foreach, PyTorch's default, runs a pass per term and
    with weight decay writes a decayed copy of every gradient first: ~2x the memory traffic and
    more kernel launches per step (AlexNet: 61 M parameters). The same arithmetic either way."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **sgd_flags(kernel))


def sgd_flags(kernel):
    """torch.optim.SGD's flags (and param_groups entries) for `kernel`."""
    if kernel not in SGD_KERNELS:
        raise ValueError(f"SGD kernel {kernel!r}: choose one of {', '.join(SGD_KERNELS)}")
    return {"fused": kernel == "fused", "foreach": kernel == "foreach"}


def autocast(device, amp_dtype):
    """Autocast to amp_dtype on `device`; amp_dtype None: off."""
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def eager_step(model, optimizer, amp_dtype, device):
    """The training step, op by op: (x, y) -> (logits, loss)."""
    def step(x, y):
        with autocast(device, amp_dtype):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return logits, loss
    return step
