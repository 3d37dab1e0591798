"""Learning-rate and weight-decay schedules: the seed's regime table, step decay, cosine.

Usage:
    sched = Schedule("regime", global_batch=256)          # seed's table, LRs x 256/128
    lr = sched.apply(optimizer, epoch=1, frac=0.25)        # sets lr and weight_decay on all groups

All LRs are given for a global batch of 128 (the seed's) and scaled by global_batch / 128 with
scaling="linear" (Goyal et al.), or used as they are with scaling="none".
"""
import math

REFERENCE_BATCH = 128

# The seed's regime (epochs inclusive, 1-based): (first, last, lr, weight decay).
REGIME = [(1, 18, 1e-2, 5e-4), (19, 29, 5e-3, 5e-4), (30, 43, 1e-3, 0.0), (44, 52, 5e-4, 0.0),
          (53, math.inf, 1e-4, 0.0)]
KINDS = ("regime", "step", "cosine")


def regime(epoch):
    """(lr, weight decay) of the seed's table for a 1-based epoch, at batch 128."""
    for first, last, lr, wd in REGIME:
        if first <= epoch <= last:
            return lr, wd
    raise ValueError(f"epoch must be >= 1, got {epoch}")


class Schedule:
    """LR/WD as a function of (epoch, fraction of the epoch done); its state is its settings."""

    def __init__(self, kind="regime", lr=0.01, weight_decay=5e-4, step_epochs=(30, 60),
                 gamma=0.1, warmup_epochs=0.0, epochs=90, global_batch=REFERENCE_BATCH,
                 scaling="linear"):
        if kind not in KINDS:
            raise ValueError(f"unknown schedule {kind!r}: choose one of {', '.join(KINDS)}")
        if scaling not in ("linear", "none"):
            raise ValueError(f"unknown lr scaling {scaling!r}: choose linear or none")
        self.settings = dict(kind=kind, lr=lr, weight_decay=weight_decay,
                             step_epochs=list(step_epochs), gamma=gamma,
                             warmup_epochs=warmup_epochs, epochs=epochs,
                             global_batch=global_batch, scaling=scaling)

    @property
    def scale(self):
        s = self.settings
        return s["global_batch"] / REFERENCE_BATCH if s["scaling"] == "linear" else 1.0

    def lr_wd(self, epoch, frac=0.0):
        """(lr, weight decay) for 1-based `epoch`, `frac` of it done (cosine/warmup use it)."""
        s = self.settings
        if s["kind"] == "regime":
            lr, wd = regime(epoch)
        elif s["kind"] == "step":
            lr = s["lr"] * s["gamma"] ** sum(epoch > e for e in s["step_epochs"])
            wd = s["weight_decay"]
        else:
            t, warm = epoch - 1 + frac, s["warmup_epochs"]
            if t < warm:
                lr = s["lr"] * (t + 1e-3) / warm
            else:
                progress = min(1.0, (t - warm) / max(1e-9, s["epochs"] - warm))
                lr = s["lr"] * 0.5 * (1 + math.cos(math.pi * progress))
            wd = s["weight_decay"]
        return lr * self.scale, wd

    def apply(self, optimizer, epoch, frac=0.0):
        lr, wd = self.lr_wd(epoch, frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd
        return lr

    @property
    def per_step(self):
        """True when the LR changes within an epoch (cosine), so it must be set every step."""
        return self.settings["kind"] == "cosine"

    def state_dict(self):
        return dict(self.settings)

    def load_state_dict(self, state):
        self.settings = dict(state)
