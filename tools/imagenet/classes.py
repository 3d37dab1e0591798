"""ImageNet class facts bundled with the tools: wnids, human names, val labels.

The class index everywhere in the project is the position of the wnid in sorted order
(torchvision ImageFolder order). Never key by name: two classes are both called "crane".
"""
import csv
import functools
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BUNDLED_VAL_LABELS = DATA_DIR / "imagenet_val_labels.csv"
BUNDLED_CLASSES = DATA_DIR / "imagenet_classes.tsv"

# Totals of the real ILSVRC2012 archives, checked by extract when the real archives are detected.
REAL_TRAIN_IMAGES = 1_281_167
REAL_VAL_IMAGES = 50_000
REAL_CLASSES = 1000


@functools.lru_cache(maxsize=None)
def class_names() -> dict:
    """wnid -> human-readable name (the WordNet synonyms) of the 1000 ILSVRC2012 classes."""
    with open(BUNDLED_CLASSES, newline="") as f:
        return {row["wnid"]: row["name"] for row in csv.DictReader(f, delimiter="\t")}


def class_name(wnid: str) -> str:
    """Human name of a wnid; the wnid itself for a class outside ILSVRC2012 (custom datasets)."""
    return class_names().get(wnid, wnid)


def read_val_labels(path=BUNDLED_VAL_LABELS) -> dict:
    """Read a `filename,wnid` CSV (header optional) into {filename: wnid}."""
    labels = {}
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row or row[0] == "filename":
                continue
            if len(row) != 2:
                raise ValueError(f"{path}: expected 'filename,wnid' rows, got {row!r}")
            labels[row[0].strip()] = row[1].strip()
    return labels
