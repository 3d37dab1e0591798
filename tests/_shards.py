"""Tiny WebDataset shards + manifests written per the shard contract with tarfile and PIL, so the
training tests do not depend on the shard stage.

Usage:
    from tests._shards import write_shards
    info = write_shards(tmp_path / "shards", num_classes=6, train_counts=[10, 7, 3], val_counts=[5, 4])
"""
import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331",
         "n01498041", "n01514668", "n01514859", "n01518878"]


def _image(cls, rng, short_side):
    # A class-coloured image with noise: learnable by a tiny net in a few steps.
    w, h = short_side, short_side + rng.randrange(0, short_side // 3 + 1)
    if rng.random() < 0.5:
        w, h = h, w
    base = [(cls * 97 + 40 * c) % 256 for c in range(3)]
    img = Image.new("RGB", (w, h), tuple(base))
    noise = Image.effect_noise((w, h), 40).convert("RGB")
    img = Image.blend(img, noise, 0.3)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_shards(out_dir, num_classes=6, train_counts=(10, 7, 3), val_counts=(5, 4),
                 short_side=72, seed=0):
    """Write train-NNNNNN.tar / val-NNNNNN.tar with the given per-shard counts and their manifests.
    Returns {"dir", "train_total", "val_total", "val_keys"}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    classes = WNIDS[:num_classes]
    result = {"dir": out, "val_keys": []}
    for split, counts in (("train", train_counts), ("val", val_counts)):
        shards, n = [], 0
        for s, count in enumerate(counts):
            name = f"{split}-{s:06d}.tar"
            with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tar:
                for _ in range(count):
                    cls = rng.randrange(num_classes)
                    key = (f"{classes[cls]}_{n}" if split == "train"
                           else f"ILSVRC2012_val_{n + 1:08d}")
                    if split == "val":
                        result["val_keys"].append(key)
                    _add(tar, key + ".jpg", _image(cls, rng, short_side))
                    _add(tar, key + ".cls", str(cls).encode())
                    n += 1
            data = (out / name).read_bytes()
            shards.append({"name": name, "num_samples": count, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
        manifest = {"split": split, "num_samples": n, "num_classes": num_classes,
                    "classes": classes, "shards": shards, "shard_size": max(counts), "seed": seed}
        if split == "train":
            manifest["mean"] = [0.45, 0.44, 0.42]
            manifest["std"] = [0.25, 0.24, 0.26]
        (out / f"{split}.json").write_text(json.dumps(manifest, indent=2))
        result[f"{split}_total"] = n
    return result


def corrupt_sample(shard, index, data=b"<html>not an image</html>"):
    """Replace the jpg of the shard's `index`-th sample by `data`; returns its key."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    key = [m.name for m, _ in members if m.name.endswith(".jpg")][index].split(".")[0]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, blob in members:
            if m.name == f"{key}.jpg":
                blob = data
                m.size = len(blob)
            tar.addfile(m, io.BytesIO(blob))
    return key
