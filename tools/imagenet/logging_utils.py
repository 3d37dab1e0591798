"""Training records: `metrics.jsonl`, the seed's `train.log` / `test.log`, and `curves.png`.

Usage:
    log = MetricsLog(out / "metrics.jsonl")
    log.write({"kind": "epoch", "epoch": 1, ...})
    write_epoch_logs(out, log.records())
    plot_curves(out / "curves.png", log.records())
"""
import json
from pathlib import Path

from tools.imagenet import fsutil

TRAIN_COLUMNS = ["epoch", "train_loss", "train_top1_err", "train_top5_err", "lr", "images_per_s",
                 "epoch_time_s"]
TEST_COLUMNS = ["epoch", "val_loss", "val_top1_err", "val_top5_err", "val_count"]


class MetricsLog:
    """One JSON object per line, appended and flushed as it happens."""

    def __init__(self, path):
        self.path = Path(path)

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def records(self):
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, last_epoch):
        """Drop what was logged after epoch `last_epoch` ended (resume of an interrupted run)."""
        kept = [r for r in self.records() if r.get("epoch", 0) <= last_epoch]
        fsutil.write_text_atomic(self.path, "".join(json.dumps(r, sort_keys=True) + "\n"
                                                    for r in kept))


def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_epoch_logs(out_dir, records):
    """train.log / test.log: one tab-separated line per epoch under a header (as the seed's)."""
    epochs = [r for r in records if r.get("kind") == "epoch"]
    for name, cols in (("train.log", TRAIN_COLUMNS), ("test.log", TEST_COLUMNS)):
        lines = ["\t".join(cols)] + ["\t".join(_fmt(r.get(c, "")) for c in cols) for r in epochs]
        fsutil.write_text_atomic(Path(out_dir) / name, "\n".join(lines) + "\n")


def format_line(epoch, it, total, loss, top1, top5, lr, images_per_s, data_share):
    return (f"epoch {epoch} [{it}/{total}] loss {loss:.4f} top1-err {top1:6.2f}% "
            f"top5-err {top5:6.2f}% lr {lr:.3g} {images_per_s:,.0f} img/s data {data_share:4.0%}")


def plot_curves(path, records):
    """Loss and error curves, train (per log interval and per epoch) and val (per epoch)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        x = [r["epoch"] - 1 + r["iteration"] / r["iterations"] for r in train]
        ax_loss.plot(x, [r["loss"] for r in train], color="tab:blue", alpha=0.3, lw=0.8)
        ax_err.plot(x, [r["top1_err"] for r in train], color="tab:blue", alpha=0.3, lw=0.8)
    if epochs:
        x = [r["epoch"] for r in epochs]
        ax_loss.plot(x, [r["train_loss"] for r in epochs], "o-", color="tab:blue", label="train")
        ax_loss.plot(x, [r["val_loss"] for r in epochs], "o-", color="tab:orange", label="val")
        ax_err.plot(x, [r["train_top1_err"] for r in epochs], "o-", color="tab:blue",
                    label="train top-1")
        ax_err.plot(x, [r["val_top1_err"] for r in epochs], "o-", color="tab:orange",
                    label="val top-1")
        ax_err.plot(x, [r["val_top5_err"] for r in epochs], "s--", color="tab:orange",
                    label="val top-5")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_err.set(xlabel="epoch", ylabel="error (%)", title="error")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    with fsutil.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
