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
import io
import json
import os
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from tools.imagenet import fsutil
from tools.imagenet.image import RESAMPLERS, load_resized, target_size, to_8bit  # noqa: F401 - re-exported


def resize_image(src, short_side=256, quality=90, resampler="torch"):
    """Decode the image file `src` (path, file object or bytes; any format PIL knows), return
    (jpeg_bytes, (w, h)): tools.imagenet.image.load_resized, then a baseline JPEG encode.

    Raises on anything that cannot be decoded, including truncated files."""
    out = load_resized(src, short_side, resampler)
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue(), out.size


def _worker_setup(resampler):
    """Pool initializer: one torch thread per worker process, since the pool gives the parallelism."""
    if resampler == "torch":
        import torch
        torch.set_num_threads(1)


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


def run(src, dst, rejected, short_side=256, quality=90, workers=None, max_rejected_fraction=0.001,
        resampler="torch"):
    """Resize every file of src into dst; returns the summary dict. Raises RuntimeError when too many are rejected."""
    src, dst, rejected = Path(src), Path(dst), Path(rejected)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} is not a folder: run the extract stage first")
    workers = workers or fsutil.default_workers()
    if resampler == "torch":
        import torch  # noqa: F401 - before the pool forks, so workers inherit it instead of importing it each
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
            pool = multiprocessing.Pool(workers, initializer=_worker_setup, initargs=(resampler,))
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
                   help="worker processes; 1 runs in this process (default: the CPU cores this process may use, "
                        "e.g. those Slurm allotted)")
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
    fsutil.exit_on_sigterm()
    if args.workers == 1:
        _worker_setup(args.resampler)  # this process is the one worker: keep to the one core asked for
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
