"""The training step, op by op: what tools.train runs each batch (unless --cuda-graphs, whose
GraphedStep captures the same operations), bench/ceiling.py times, and autotune's rate alone uses.

    step = eager_step(model, optimizer, torch.bfloat16, device)
    logits, loss = step(x, y)
"""
import torch
import torch.nn.functional as F


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
