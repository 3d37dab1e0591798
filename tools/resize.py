"""Resize stage: every image to a short side of 256 px, written as an RGB baseline JPEG.

Usage:
    python -m tools.resize --src W/extracted --dst W/resized --short-side 256 --quality 90 \
        --workers 16 --rejected W/rejected.tsv --max-rejected-fraction 0.001

`--dst` mirrors the folders of `--src` (same split/class folders, same file names; files at the
top of `--src`, such as extract.json, are not images and are left out). Each image is found by its
content, not its name (ImageNet has a PNG named .JPEG and CMYK JPEGs), converted to 8-bit RGB
(CMYK, grayscale, palette, alpha on white, 16-bit scaled down, EXIF orientation applied, ICC
profiles converted to sRGB), shrunk so its short side is `--short-side` (never enlarged: smaller
images are only re-encoded) and saved without metadata. Files that cannot be decoded are listed in
`--rejected` (`path<TAB>reason`, path relative to --src) and skipped; the stage fails only when
their share exceeds `--max-rejected-fraction`. `--dst` appears only when the stage succeeded
(it is written in a temporary folder beside it and renamed), with `resize.json` inside (settings
and counts).
"""
import argparse
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms
from tqdm import tqdm

from tools.imagenet import fsutil

# Same mapping as PIL.ImageOps.exif_transpose; applied after the resize, where it is cheaper.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112
# Antialiased bicubic (a = -0.5), the filter of Pillow's and torchvision's default resize. Two
# implementations give the same pixels within +-1: torch's uint8 kernel (AVX2, about 0.7 ms on a
# 500x375 ImageNet JPEG) and Pillow's (about 3 ms, then the largest cost of the whole stage, which
# keeps Pillow below 5x ImageMagick's speed). torch is the default; Pillow is there for machines
# without torch. reducing_gap: Pillow first reduce()s by an integer factor while the image is still
# >= 3x the target (after the JPEG draft this only matters for big PNGs and other non-JPEG images).
_RESAMPLE = Image.Resampling.BICUBIC
_REDUCING_GAP = 3.0
RESAMPLERS = ("torch", "pillow")

_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_icc_cache = {}  # per process: sha1(profile)+mode -> transform, or None where no transform is needed


def target_size(width, height, short_side):
    """(w, h) with the short side at `short_side`, aspect kept; the input size if already small."""
    short = min(width, height)
    if short <= short_side:
        return width, height
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def _icc_transform(icc, mode):
    """A cached ImageCms transform from the embedded profile to sRGB, or None (sRGB already, or unusable)."""
    key = (hashlib.sha1(icc).digest(), mode)
    if key not in _icc_cache:
        transform = None
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            description = ImageCms.getProfileDescription(profile) or ""
            # Most ImageNet profiles are sRGB already: skip the (costly) identity transform.
            if "srgb" not in description.lower():
                transform = ImageCms.buildTransform(profile, _SRGB, mode, "RGB")
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            transform = None  # a broken profile: fall back to a plain conversion
        if len(_icc_cache) > 64:
            _icc_cache.clear()
        _icc_cache[key] = transform
    return _icc_cache[key]


def _scale_to_8bit(img):
    """16/32-bit integer and float grayscale to L, scaling the value range (not clipping it)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr = arr.astype(np.uint32)
        out = (arr * 255 + 32767) // 65535
    elif img.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64))
        out = np.rint(np.clip(arr * 255.0 if arr.max(initial=0) <= 1.0 else arr, 0, 255))
    else:  # "I": 32-bit signed; PNG 16-bit data lands here in some Pillow versions
        arr = np.clip(arr.astype(np.int64), 0, None)
        hi = int(arr.max(initial=0))
        if hi <= 255:
            out = arr
        elif hi <= 65535:
            out = (arr * 255 + 32767) // 65535
        else:
            out = (arr * 255 + hi // 2) // hi
    return Image.fromarray(out.astype(np.uint8), "L")


def _on_white(img):
    """Composite an image with alpha onto a white background; returns RGB."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_8bit(img):
    """Any PIL mode to L or RGB (8 bits); the ICC profile, if any, converted to sRGB."""
    mode = img.mode
    icc = img.info.get("icc_profile")
    if icc and mode in ("RGB", "CMYK"):
        transform = _icc_transform(icc, mode)
        if transform is not None:
            try:
                return ImageCms.applyTransform(img, transform)
            except (ImageCms.PyCMSError, ValueError, OSError):
                pass
    if mode in ("RGB", "L"):
        # a tRNS chunk (PNG) marks one colour as transparent: show it as white like any alpha
        return _on_white(img) if "transparency" in img.info else img
    if mode == "P":
        if "transparency" in img.info:
            return _on_white(img)
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _on_white(img)
    if mode.startswith("I") or mode == "F":
        return _scale_to_8bit(img)
    if mode == "1":
        return img.convert("L")
    # CMYK (PIL reads JPEG CMYK with Adobe's inverted convention), YCbCr, LAB, HSV
    return img.convert("RGB")


_torch = None


def _import_torch():
    """torch, imported once per process, single-threaded: the pool gives the parallelism."""
    global _torch
    if _torch is None:
        import torch
        torch.set_num_threads(1)
        _torch = torch
    return _torch


def _resize_torch(img, size):
    torch = _import_torch()
    arr = np.array(img)  # writable copy: torch refuses read-only buffers
    x = torch.from_numpy(arr)
    # HWC memory seen as NCHW is channels_last, the layout torch's fast uint8 kernel wants.
    x = x[None, None] if arr.ndim == 2 else x.permute(2, 0, 1)[None]
    y = torch.nn.functional.interpolate(x, (size[1], size[0]), mode="bicubic", antialias=True)
    y = y[0, 0] if arr.ndim == 2 else y[0].permute(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(y.numpy()), img.mode)


def resample(img, size, resampler="torch"):
    """Antialiased bicubic resize of an L or RGB image to size (w, h)."""
    if resampler == "torch":
        return _resize_torch(img, size)
    return img.resize(size, _RESAMPLE, reducing_gap=_REDUCING_GAP)


def _orientation(img):
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # broken EXIF must not cost the image
        return 1


def resize_image(src, short_side=256, quality=90, resampler="torch"):
    """Decode the image file `src` (any format PIL knows), return (jpeg_bytes, (w, h)).

    Raises on anything that cannot be decoded, including truncated files."""
    with Image.open(src) as img:
        orientation = _orientation(img)
        tw, th = target_size(img.width, img.height, short_side)
        if img.format == "JPEG" and (tw, th) != img.size:
            # DCT-domain downscale by 1/2, 1/4 or 1/8 while staying >= the target: big JPEGs decode
            # several times faster, and the bicubic pass below does the final, accurate step.
            img.draft("RGB", (tw, th))
        img.load()
        out = to_8bit(img)
        if out.size != (tw, th):
            out = resample(out, (tw, th), resampler)
        if out.mode != "RGB":
            out = out.convert("RGB")
        if orientation in _ORIENTATION:
            out = out.transpose(_ORIENTATION[orientation])
        out.info = {}  # no EXIF, ICC or comments in the output
        buf = io.BytesIO()
        out.save(buf, "JPEG", quality=quality, optimize=False, progressive=False)
        return buf.getvalue(), out.size


def _work(task):
    """Pool task: resize one file into the temporary destination; (rel, reason or None, (w, h) or None)."""
    rel, src_root, dst_root, short_side, quality, resampler = task
    try:
        data, size = resize_image(os.path.join(src_root, rel), short_side, quality, resampler)
    except Exception as e:  # noqa: BLE001 - every undecodable file is a rejection, never a crash
        reason = f"{type(e).__name__}: {e}".replace("\t", " ").replace("\n", " ")
        return rel, reason, None
    with open(os.path.join(dst_root, rel), "wb") as f:
        f.write(data)
    return rel, None, size


def list_files(src):
    """Regular files in the subfolders of src (relative paths, sorted) and all subfolders.

    Files at the top of src are the previous stage's records (extract.json), not images; hidden
    names are temporary files of an atomic write."""
    files, dirs = [], []
    for root, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_root = os.path.relpath(root, src)
        for d in dirnames:
            dirs.append(os.path.normpath(os.path.join(rel_root, d)))
        if rel_root == ".":
            continue
        for name in filenames:
            if not name.startswith("."):
                files.append(os.path.normpath(os.path.join(rel_root, name)))
    return sorted(files), dirs


def default_workers():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run(src, dst, rejected, short_side=256, quality=90, workers=None, max_rejected_fraction=0.001,
        resampler="torch"):
    """Resize every file of src into dst; returns the summary dict. Raises RuntimeError when too many are rejected."""
    src, dst, rejected = Path(src), Path(dst), Path(rejected)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} is not a folder: run the extract stage first")
    workers = workers or default_workers()
    if resampler == "torch":
        _import_torch()  # before the pool forks, so workers inherit it instead of importing it each
    files, dirs = list_files(src)
    if not files:
        raise RuntimeError(f"--src {src} holds no files: is it the extract stage's output folder?")
    failures, sizes = [], {"smaller_than_target": 0}
    with fsutil.atomic_path(dst) as tmp:
        tmp.mkdir(parents=True)
        for d in dirs:
            (tmp / d).mkdir(parents=True, exist_ok=True)
        tasks = ((rel, str(src), str(tmp), short_side, quality, resampler) for rel in files)
        if workers == 1:
            results = map(_work, tasks)
            pool = None
        else:
            import multiprocessing
            # started before the progress bar: tqdm's monitor thread must not exist when the pool forks
            pool = multiprocessing.Pool(workers, initializer=_import_torch if resampler == "torch" else None)
            chunk = max(1, min(64, len(files) // (workers * 16)))
            results = pool.imap_unordered(_work, tasks, chunksize=chunk)
        bar = tqdm(total=len(files), desc="resize", unit="img", file=sys.stderr, smoothing=0.05)
        try:
            for rel, reason, size in results:
                if reason is not None:
                    failures.append((rel, reason))
                elif min(size) < short_side:
                    sizes["smaller_than_target"] += 1
                bar.update()
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
        failures.sort()
        rows = "".join(f"{rel}\t{reason}\n" for rel, reason in failures)
        fsutil.write_text_atomic(rejected, "path\treason\n" + rows)
        fraction = len(failures) / len(files)
        summary = {
            "short_side": short_side,
            "quality": quality,
            "resampler": resampler,
            "max_rejected_fraction": max_rejected_fraction,
            "total": len(files),
            "written": len(files) - len(failures),
            "rejected": len(failures),
            "smaller_than_target": sizes["smaller_than_target"],
            "pillow": Image.__version__,
        }
        if fraction > max_rejected_fraction:
            examples = "; ".join(f"{rel}: {reason}" for rel, reason in failures[:3])
            raise RuntimeError(
                f"{len(failures)} of {len(files)} files ({fraction:.4%}) could not be decoded, more than "
                f"--max-rejected-fraction {max_rejected_fraction}. See {rejected} (e.g. {examples}). "
                "Check the source archives, or raise --max-rejected-fraction to accept the loss.")
        with open(tmp / "resize.json", "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
            f.write("\n")
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, type=Path,
                   help="folder to read (the extract stage's output: train/<wnid>/*, val/<wnid>/*)")
    p.add_argument("--dst", required=True, type=Path,
                   help="folder to write: same relative paths and names as --src, plus resize.json; "
                        "replaced as a whole when the run succeeds")
    p.add_argument("--short-side", type=int, default=256,
                   help="length of the short side after resizing, in pixels; smaller images keep their size "
                        "(default: 256)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the output, 1-100 (default: 90)")
    p.add_argument("--resampler", choices=RESAMPLERS, default="torch",
                   help="implementation of the antialiased bicubic filter: torch (about 4x faster) or pillow; "
                        "pixels agree within +-1 (default: torch)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes; 1 runs in this process (default: all CPU cores available)")
    p.add_argument("--rejected", type=Path, required=True,
                   help="TSV written with every file that could not be decoded (path<TAB>reason, "
                        "path relative to --src, header line)")
    p.add_argument("--max-rejected-fraction", type=float, default=0.001,
                   help="fail (exit 1, no --dst) when more than this share of files is rejected (default: 0.001)")
    args = p.parse_args(argv)
    if args.short_side < 1:
        p.error("--short-side must be >= 1")
    if not 1 <= args.quality <= 100:
        p.error("--quality must be in 1..100")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args.src, args.dst, args.rejected, args.short_side, args.quality, args.workers,
                      args.max_rejected_fraction, args.resampler)
    except (RuntimeError, FileNotFoundError) as e:
        print(f"resize: error: {e}", file=sys.stderr)
        return 1
    print(f"resize: wrote {summary['written']} images to {args.dst} "
          f"({summary['rejected']} rejected, listed in {args.rejected})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
