"""Checkpoints `model_NNN.pt` (NNN = 1-based epoch), written atomically, plus RNG capture/restore.

Usage:
    save(checkpoint_path(out, epoch), {"model": ..., "rng": rng_state(), ...})
    path = latest(out)                      # None when there is none
    ckpt = load(path)                       # on CPU, works without a GPU
    set_rng_state(ckpt["rng"])
"""
import random
import re
from pathlib import Path

import numpy as np
import torch

from tools.imagenet import fsutil
from tools.imagenet.models import build_model

NAME = re.compile(r"^model_(\d{3,})\.pt$")


def checkpoint_path(out_dir, epoch):
    return Path(out_dir) / f"model_{epoch:03d}.pt"


def list_checkpoints(out_dir):
    """[(epoch, path)] of the complete checkpoints in out_dir, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := NAME.match(p.name))]
    return sorted(found)


def latest(out_dir):
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def save(path, obj):
    """torch.save to a temporary name, then rename: a crash never leaves a half checkpoint."""
    with fsutil.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise RuntimeError(f"{path}: cannot load checkpoint ({exc}); delete it to resume from "
                           f"the one before") from exc


def load_model(path, device="cpu"):
    """(model in eval mode on device, checkpoint dict): everything predict and evaluate need comes
    from the checkpoint alone (arch, classes, normalisation, crop and resize sizes)."""
    state = load(path)
    missing = [k for k in ("model", "arch", "num_classes", "classes", "mean", "std", "crop_size", "resize_size")
               if k not in state]
    if missing:
        raise RuntimeError(f"{path} is not a checkpoint of tools.train (missing {', '.join(missing)})")
    model = build_model(state["arch"], state["num_classes"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def prune(out_dir, keep):
    """Delete all but the newest `keep` checkpoints (keep <= 0: keep all)."""
    if keep and keep > 0:
        for _, path in list_checkpoints(out_dir)[:-keep]:
            path.unlink()


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # resumed on another GPU count: seed each device from the saved first one
            for i in range(torch.cuda.device_count()):
                torch.cuda.set_rng_state(cuda[0], i)
