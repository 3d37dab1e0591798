"""Generate a mini ImageNet in the exact layout of the real ILSVRC2012 archives.

    python -m tools.make_mini --out /tmp/mini --classes 10 --train-per-class 40 --val-per-class 10 --quirks

writes

    /tmp/mini/ILSVRC2012_img_train.tar   one inner `nXXXXXXXX.tar` per class of `nXXXXXXXX_N.JPEG`
    /tmp/mini/ILSVRC2012_img_val.tar     flat `ILSVRC2012_val_NNNNNNNN.JPEG`, member order shuffled
    /tmp/mini/val_labels.csv             `filename,wnid` (header), sorted by file name

Every class is visually distinct (its own shape, foreground colour and background stripe
angle/frequency) while position, scale, rotation, colour and noise vary inside the class, so a
small CNN learns it from 64-px crops and a wrong label anywhere in the pipeline costs accuracy.
Image sides vary from 80 to 400 px (many under 256, so "never enlarge" is exercised).

With --quirks the real archives' oddities are planted, each one a genuine sample of its class:
a CMYK JPEG (train and val), an RGB PNG named .JPEG, grayscale JPEGs (train and val), a palette
PNG, a 16-bit PNG, a JPEG with EXIF orientation 6, one 4000x3000 JPEG, and one train file that is
not an image at all (an extra member, on top of --train-per-class). `generate()` returns their
locations as paths relative to the extracted tree (`train/<wnid>/<file>`, `val/<wnid>/<file>`).

Output is byte-identical for a given seed (fixed tar mtime/uid/gid/order, deterministic encoders).
"""
import argparse
import colorsys
import contextlib
import csv
import io
import json
import multiprocessing
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from tools.imagenet.classes import class_names
from tools.imagenet.fsutil import atomic_path, default_workers

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
LABELS_CSV = "val_labels.csv"
# 2012-06-01: any fixed value works; a fixed one makes the tars byte-identical across runs.
TAR_MTIME = 1338508800
NOISE = 8.0  # per-pixel noise of the drawn images (standard deviation, 0-255 scale)
SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond", "frame", "half_disc")
NOT_AN_IMAGE = (b"<html><head><title>Photo unavailable</title></head>\n"
                b"<body>This photo is no longer available.</body></html>\n")

# quirk name -> (split, encoding); planted on distinct samples in this order.
TRAIN_QUIRKS = {
    "cmyk_train": "cmyk",
    "png_as_jpeg": "png",
    "grayscale_train": "gray",
    "palette_png": "palette",
    "png16": "png16",
    "exif_rotated": "exif",
    "large": "large",
}
VAL_QUIRKS = {"cmyk_val": "cmyk", "grayscale_val": "gray"}


def pick_wnids(num_classes):
    """Real ILSVRC wnids spread evenly over the sorted bundled class list."""
    all_wnids = sorted(class_names())
    if not 1 <= num_classes <= len(all_wnids):
        raise ValueError(f"--classes must be between 1 and {len(all_wnids)}, got {num_classes}")
    step = len(all_wnids) / num_classes
    return [all_wnids[int(i * step)] for i in range(num_classes)]


def class_spec(k, num_classes):
    """The fixed look of class k: shape, foreground colour, background colour, stripe angle/frequency."""
    hue = k / num_classes  # evenly spaced hues: classes that share a shape differ most in colour
    fg = np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.95)) * 255
    bg = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.35, 0.55)) * 255
    return {
        "shape": SHAPES[k % len(SHAPES)],
        "fg": fg,
        "bg": bg,
        "angle": np.deg2rad((k * 67) % 180),
        "freq": 4.0 + (k * 3) % 7,  # stripe cycles per short side
    }


def shape_mask(shape, u, v):
    """Boolean mask of a unit-size shape in rotated, radius-normalised coordinates (u, v)."""
    rho2 = u * u + v * v
    au, av = np.abs(u), np.abs(v)
    if shape == "disc":
        return rho2 < 1
    if shape == "square":
        return np.maximum(au, av) < 0.85
    if shape == "triangle":
        return (v < 0.7) & (v > -1) & (au < (v + 1) * 0.6)
    if shape == "ring":
        return (rho2 < 1) & (rho2 > 0.4)
    if shape == "cross":
        return ((au < 0.3) & (av < 1)) | ((av < 0.3) & (au < 1))
    if shape == "diamond":
        return au + av < 1.1
    if shape == "frame":
        m = np.maximum(au, av)
        return (m < 0.9) & (m > 0.55)
    if shape == "half_disc":
        return (rho2 < 1) & (v > -0.1)
    raise ValueError(shape)


def draw(rng, spec, height, width, noise=NOISE):
    """One HxWx3 uint8 sample of a class: striped background, jittered shape, per-pixel noise of
    standard deviation `noise` (what sets the JPEGs' size: see --noise)."""
    short = min(height, width)
    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    # Background stripes at the class angle, jittered phase/frequency/colour.
    angle = spec["angle"] + rng.uniform(-0.15, 0.15)
    freq = spec["freq"] * rng.uniform(0.85, 1.15) / short
    proj = xx * np.float32(np.cos(angle) * freq) + yy * np.float32(np.sin(angle) * freq)
    shade = np.where((proj + np.float32(rng.uniform())) % 1 < 0.5, np.float32(1.0), np.float32(0.6))
    bg = np.clip(spec["bg"] + rng.uniform(-20, 20, 3), 0, 255).astype(np.float32)
    img = shade[..., None] * bg
    # Foreground shape: random centre, radius, rotation and colour jitter.
    cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width
    radius = rng.uniform(0.25, 0.42) * short
    rot = rng.uniform(-0.3, 0.3)
    dx, dy = (xx - np.float32(cx)) / np.float32(radius), (yy - np.float32(cy)) / np.float32(radius)
    cos, sin = np.float32(np.cos(rot)), np.float32(np.sin(rot))
    mask = shape_mask(spec["shape"], dx * cos + dy * sin, dy * cos - dx * sin)
    fg = np.clip(spec["fg"] * rng.uniform(0.8, 1.1) + rng.uniform(-15, 15, 3), 0, 255)
    img[mask] = fg
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise)
    return np.clip(img, 0, 255).astype(np.uint8)


def random_size(rng, min_side=80, max_side=400):
    """(height, width): sides min_side..max_side with aspect ratios up to 2:1 either way."""
    while True:
        h, w = (int(s) for s in rng.integers(min_side, max_side + 1, 2))
        if max(h, w) <= 2 * min(h, w):
            return h, w


def encode(rng, pixels, kind):
    """Encode a sample the way `kind` says; returns the file's bytes."""
    img = Image.fromarray(pixels)
    buf = io.BytesIO()
    if kind == "jpeg":
        img.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
    elif kind == "cmyk":
        img.convert("CMYK").save(buf, "JPEG", quality=90)
    elif kind == "gray":
        img.convert("L").save(buf, "JPEG", quality=90)
    elif kind == "png":
        img.save(buf, "PNG", compress_level=6)
    elif kind == "palette":
        img.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(buf, "PNG")
    elif kind == "png16":
        gray16 = np.asarray(img.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(gray16.astype("<u2")).save(buf, "PNG")
    elif kind == "exif":
        # Orientation 6 = "rotate 90 degrees clockwise to display": store the picture turned the other way.
        exif = Image.Exif()
        exif[0x0112] = 6
        img.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    elif kind == "large":
        img.resize((4000, 3000), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=85)
    else:
        raise ValueError(kind)
    return buf.getvalue()


def render(job):
    """Bytes of one sample; job = (seed, split, class, index, kind, class spec, min side, max side,
    noise)."""
    seed, split, k, j, kind, spec, min_side, max_side, noise = job
    rng = np.random.default_rng([seed, split, k, j])
    h, w = random_size(rng, min_side, max_side)
    if kind == "exif" and h == w:
        w += 40  # a non-square image shows whether the rotation was applied
    if kind == "large":
        h, w = 300, 400
    return encode(rng, draw(rng, spec, h, w, noise), kind)


def _tarinfo(name, size):
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def tar_bytes(members):
    """A tar (GNU format, like the real archives) of [(name, bytes)] in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
    return buf.getvalue()


def generate(out_dir, num_classes=10, train_per_class=40, val_per_class=10, quirks=False, seed=0,
             min_side=80, max_side=400, workers=1, noise=NOISE) -> dict:
    """Write the mini archives and labels into out_dir; return where everything is (see module doc)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError("--train-per-class and --val-per-class must be at least 1")
    if not 16 <= min_side <= max_side:
        raise ValueError("need 16 <= --min-side <= --max-side")
    if not 0 <= noise <= 64:
        raise ValueError("need 0 <= --noise <= 64")
    if quirks and (num_classes * train_per_class < len(TRAIN_QUIRKS)
                   or num_classes * val_per_class < len(VAL_QUIRKS)):
        raise ValueError(f"--quirks needs at least {len(TRAIN_QUIRKS)} train and {len(VAL_QUIRKS)} val samples")
    rng = np.random.default_rng(seed)
    wnids = pick_wnids(num_classes)
    specs = [class_spec(k, num_classes) for k in range(num_classes)]

    # Quirk slots walk the classes first, so quirks spread over different classes.
    def slots(table):
        return {(i % num_classes, i // num_classes): (name, kind) for i, (name, kind) in enumerate(table.items())}
    train_slots = slots(TRAIN_QUIRKS) if quirks else {}
    val_slots = slots(VAL_QUIRKS) if quirks else {}
    found = {}

    # Each image draws from its own generator, so the output does not depend on how many processes render.
    jobs, train_names = [], []
    for k, wnid in enumerate(wnids):
        numbers = sorted(int(n) for n in rng.choice(np.arange(1, 20000), train_per_class, replace=False))
        for j, number in enumerate(numbers):
            qname, kind = train_slots.get((k, j), (None, "jpeg"))
            if qname:
                found[qname] = f"train/{wnid}/{wnid}_{number}.JPEG"
            jobs.append((seed, 0, k, j, kind, specs[k], min_side, max_side, noise))
            train_names.append((k, f"{wnid}_{number}.JPEG"))

    # Val: balanced classes assigned to file numbers at random, tar member order shuffled too.
    num_val = num_classes * val_per_class
    val_class = [int(k) for k in rng.permutation(np.repeat(np.arange(num_classes), val_per_class))]
    seen = [0] * num_classes
    labels = []
    for i, k in enumerate(val_class):
        fname = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        qname, kind = val_slots.get((k, seen[k]), (None, "jpeg"))
        if qname:
            found[qname] = f"val/{wnids[k]}/{fname}"
        jobs.append((seed, 1, k, seen[k], kind, specs[k], min_side, max_side, noise))
        seen[k] += 1
        labels.append((fname, wnids[k]))
    order = rng.permutation(num_val)

    with multiprocessing.get_context("fork").Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        rendered = (pool.imap if pool else map)(render, jobs, *([64] if pool else []))
        images = list(tqdm(rendered, total=len(jobs), desc="make_mini", unit="img", disable=None))

    inner = []
    for k, wnid in enumerate(wnids):
        members = [(name, data) for (kk, name), data in zip(train_names, images) if kk == k]
        if quirks and k == 1 % num_classes:
            fname = f"{wnid}_{20000 + k}.JPEG"
            members.append((fname, NOT_AN_IMAGE))
            found["not_an_image"] = f"train/{wnid}/{fname}"
        members.sort(key=lambda m: m[0])
        inner.append((f"{wnid}.tar", tar_bytes(members)))
    val_images = images[len(train_names):]
    val_members = [(labels[i][0], val_images[i]) for i in order]

    train_tar, val_tar, labels_csv = out_dir / TRAIN_TAR, out_dir / VAL_TAR, out_dir / LABELS_CSV
    for path, data in ((train_tar, tar_bytes(inner)), (val_tar, tar_bytes(val_members))):
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    with atomic_path(labels_csv) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["filename", "wnid"])
            writer.writerows(labels)
    return {
        "raw_dir": out_dir,
        "train_tar": train_tar,
        "val_tar": val_tar,
        "labels_csv": labels_csv,
        "wnids": sorted(wnids),
        "quirks": found,
        "num_train": num_classes * train_per_class + (1 if quirks else 0),
        "num_val": num_val,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder to write the two archives and val_labels.csv into")
    p.add_argument("--classes", type=int, default=10, help="number of classes (real wnids, spread over the list)")
    p.add_argument("--train-per-class", type=int, default=40, help="train images per class")
    p.add_argument("--val-per-class", type=int, default=10, help="val images per class")
    p.add_argument("--quirks", action="store_true",
                   help="plant the real archives' oddities (CMYK, PNG as .JPEG, grayscale, palette/16-bit PNG, "
                        "EXIF rotation, a 4000x3000 image, a non-image file)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives byte-identical output")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes that render images (default: the CPU cores this process may use); "
                        "output does not depend on it")
    p.add_argument("--min-side", type=int, default=80,
                   help="smallest image side in pixels (default 80: many images under 256 test 'never enlarge')")
    p.add_argument("--max-side", type=int, default=400,
                   help="largest image side in pixels (e.g. --min-side 256 --max-side 500 for ImageNet-like sizes)")
    p.add_argument("--noise", type=float, default=NOISE,
                   help=f"standard deviation of the per-pixel noise, which sets the JPEGs' size (default {NOISE:g}: "
                        "about 23 KiB once resized to 256 px at quality 90; 16: about 31 KiB, like "
                        "bench/bench_loader.py's photo-like scenes)")
    args = p.parse_args(argv)
    try:
        info = generate(args.out, args.classes, args.train_per_class, args.val_per_class, args.quirks, args.seed,
                        args.min_side, args.max_side, args.workers, args.noise)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
