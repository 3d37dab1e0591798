"""Validation metrics of a classifier over batches of uint8 images, on one or many processes.

Usage:
    from tools.imagenet.evaluation import evaluate
    result = evaluate(model, batches, torch.device("cuda"), mean, std, amp_dtype=torch.bfloat16)
    print(result["top1_error"], result["top5_error"], result["loss"], result["count"])

`batches` yields (images, labels): images uint8 N x C x H x W (center crops) or N x 10 x C x H x W
(ten crops), labels int64 N; or float center crops already normalised with mean/std (what
tools.imagenet.gpu_data.GpuBatchPipeline makes), used as they are. Ten-crop scores are the average
of the ten crops' softmax probabilities (the seed's 10-crop test averaged the crops' outputs); loss and top-k use that average.

Under torch.distributed every count is summed over the ranks (all_reduce), so every rank returns the
same numbers whichever way the val set was split. The loss is summed per sample in fixed point
(2^-24 steps, int64), which makes the sum independent of the order and of the split.
"""
import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from tools.imagenet.preprocess import normalize

LOSS_SCALE = 2 ** 24


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t, maximum=False):
    """Sum (or max) an integer tensor over the ranks; gloo needs CPU tensors, nccl CUDA ones."""
    if not _distributed():
        return t
    device = t.device
    if dist.get_backend() == "nccl":
        work = t.cuda() if device.type != "cuda" else t
    else:
        work = t.cpu()
    dist.all_reduce(work, op=dist.ReduceOp.MAX if maximum else dist.ReduceOp.SUM)
    return work.to(device)


def _log_probs(logits, crops):
    """log of the class probabilities; with crops, log of the mean of the crops' probabilities."""
    logp = F.log_softmax(logits.float(), dim=1)
    if crops:
        logp = logp.view(-1, crops, logp.shape[1]).logsumexp(dim=1) - math.log(crops)
    return logp


def evaluate(model, batches, device, mean, std, amp_dtype=None, channels_last=False, num_classes=None,
             keep_predictions=False, progress=False):
    """Loss, top-1/top-5 error, per-class and confusion counts of `model` over `batches`.

    Returns a dict:
      loss (mean cross-entropy), top1_error, top5_error (percent), count, correct1, correct5,
      class_correct, class_count (lists, index = class), confusion (int64 CPU tensor C x C,
      [true, predicted top-1]), ten_crop (bool); with keep_predictions also "predictions":
      {"label", "top1" (int64), "probs" (float32 N x C)} of THIS rank's samples in batch order.
    `num_classes` defaults to the model's output width.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.int64, device=device)
    counts = None  # [count, correct1, correct5]; per-class and confusion below
    class_correct = class_count = confusion = None
    kept = {"label": [], "top1": [], "probs": []}
    ten = False
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else None
    show = progress and (not _distributed() or dist.get_rank() == 0)
    # The val loader knows its sample count (this rank's share): the bar counts images.
    bar = tqdm(total=getattr(batches, "num_samples", None), desc="evaluate", unit="img", file=sys.stderr,
               disable=not show, leave=False)
    with torch.inference_mode(), bar:
        for images, labels in batches:
            bar.update(labels.shape[0])
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True).long()
            crops = 0
            if images.dim() == 5:
                crops = images.shape[1]
                images = images.flatten(0, 1)
                ten = True
            # the GPU data path hands over crops already normalised (float) on the device
            x = images if images.is_floating_point() else normalize(images, mean, std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if autocast is not None:
                with autocast:
                    logits = model(x)
            else:
                logits = model(x)
            logp = _log_probs(logits, crops)
            if counts is None:
                c = num_classes or logp.shape[1]
                counts = torch.zeros(3, dtype=torch.int64, device=device)
                class_correct = torch.zeros(c, dtype=torch.int64, device=device)
                class_count = torch.zeros(c, dtype=torch.int64, device=device)
                confusion = torch.zeros(c * c, dtype=torch.int64, device=device)
            c = class_count.numel()
            if logp.shape[1] != c:
                raise ValueError(f"the model gives {logp.shape[1]} scores per image, expected {c} classes")
            top = logp.topk(min(5, c), dim=1).indices
            pred = top[:, 0]
            hit1 = pred == labels
            hit5 = (top == labels[:, None]).any(dim=1)
            nll = -logp.gather(1, labels[:, None]).squeeze(1)
            loss_sum += (nll.double() * LOSS_SCALE).round().long().sum()
            # Device-side only: no host sync per batch (a new tensor from a Python int, bincount
            # and boolean indexing on CUDA would each be one).
            counts[0] += labels.numel()
            counts[1] += hit1.sum()
            counts[2] += hit5.sum()
            class_count.index_add_(0, labels, torch.ones_like(labels))
            class_correct.index_add_(0, labels, hit1.long())
            confusion.index_put_((labels * c + pred,), torch.ones_like(pred), accumulate=True)
            if keep_predictions:
                kept["label"].append(labels.cpu())
                kept["top1"].append(pred.cpu())
                kept["probs"].append(logp.exp().cpu())
    model.train(was_training)

    # Ranks that saw no batch still take part in the reductions with zeros of the common size.
    local_c = class_count.numel() if class_count is not None else (num_classes or 0)
    c = int(_all_reduce(torch.tensor([local_c], dtype=torch.int64, device=device), maximum=True).item())
    if c == 0:
        raise ValueError("no batches to evaluate and num_classes not given")
    if counts is None:
        counts = torch.zeros(3, dtype=torch.int64, device=device)
        class_correct = torch.zeros(c, dtype=torch.int64, device=device)
        class_count = torch.zeros(c, dtype=torch.int64, device=device)
        confusion = torch.zeros(c * c, dtype=torch.int64, device=device)
    ten = bool(_all_reduce(torch.tensor([int(ten)], dtype=torch.int64, device=device), maximum=True).item())
    packed = torch.cat([loss_sum.view(1), counts, class_correct, class_count, confusion])
    packed = _all_reduce(packed).cpu()
    loss_sum, count, correct1, correct5 = (int(v) for v in packed[:4])
    class_correct = packed[4:4 + c].tolist()
    class_count = packed[4 + c:4 + 2 * c].tolist()
    confusion = packed[4 + 2 * c:].view(c, c).clone()

    def error(correct):
        return 100.0 * (1 - correct / count) if count else float("nan")

    result = {
        "loss": loss_sum / LOSS_SCALE / count if count else float("nan"),
        "top1_error": error(correct1),
        "top5_error": error(correct5),
        "count": count,
        "correct1": correct1,
        "correct5": correct5,
        "class_correct": class_correct,
        "class_count": class_count,
        "confusion": confusion,
        "ten_crop": ten,
    }
    if keep_predictions:
        result["predictions"] = {
            "label": torch.cat(kept["label"]) if kept["label"] else torch.zeros(0, dtype=torch.int64),
            "top1": torch.cat(kept["top1"]) if kept["top1"] else torch.zeros(0, dtype=torch.int64),
            "probs": torch.cat(kept["probs"]) if kept["probs"] else torch.zeros(0, c),
        }
    return result


def most_confused(confusion, k=20):
    """[(true, predicted, count)] of the k largest off-diagonal counts: largest first, ties by index."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    flat = off.flatten()
    values = flat.tolist()
    idx = torch.nonzero(flat > 0).flatten().tolist()
    idx.sort(key=lambda i: (-values[i], i))
    c = confusion.shape[1]
    return [(i // c, i % c, values[i]) for i in idx[:k]]
