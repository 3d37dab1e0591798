"""Classify image files with a trained checkpoint (replaces the seed's testHook).

Usage:
    python -m tools.predict W/runs/alexnetowtbn/model_053.pt photo.jpg holiday/ 'scans/*.png'
    python -m tools.predict W/runs/alexnetowtbn/model_053.pt holiday/ --json > predictions.json

The checkpoint alone is enough: architecture, class list, normalization, crop and resize sizes come
from it (no dataset needed). Arguments may be files (decoded by content whatever their name),
folders (searched recursively for image extensions, any case) or glob patterns (quote them; `**`
works). Each image is prepared as the training pipeline prepared the val set: decoded to 8-bit RGB
(CMYK, grayscale, palette, 16-bit, alpha, EXIF orientation), short side scaled down to the
checkpoint's resize size (never enlarged, as the resize stage does), then the center crop.
An image whose short side is below the crop size is first enlarged so that the crop fits.

Prints the top-k classes per image (wnid, name, probability); `--json` prints one JSON document
instead: [{"path", "top": [{"wnid", "name", "index", "prob"}]} or {"path", "error"}].
A file that cannot be read is reported (stderr, or its "error" field) and the others are still
predicted; the exit code is then 1 (2: the checkpoint itself could not be loaded).

Predictions from the resized files equal evaluation's; from original photos they differ only by
the resize stage's JPEG encode, which --resize-quality replays.
"""
import argparse
import glob
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from tools.imagenet import checkpoint as ckpt_io
from tools.imagenet import preprocess as pp
from tools.imagenet.classes import class_name
from tools.imagenet.fsutil import default_workers


def expand_inputs(args):
    """Files to predict, in argument order (folders and globs sorted); [(path, error or None)]."""
    out = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in pp.IMAGE_EXTENSIONS)
            if not found:
                out.append((arg, f"folder holds no image files ({', '.join(sorted(pp.IMAGE_EXTENSIONS))})"))
            out += [(str(f), None) for f in found]
        elif p.exists():
            out.append((arg, None))
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                out.append((arg, "no file matches this pattern"))
            for m in matches:
                out += expand_inputs([m]) if Path(m).is_dir() else [(m, None)]
        else:
            out.append((arg, "no such file or folder"))
    return out


load_checkpoint = ckpt_io.load_model


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA GPU: use --device cpu")
    return torch.device(name)


def _load(path, resize_size, crop_size, ten, jpeg_quality):
    try:
        return pp.load_for_model(path, resize_size, crop_size, ten, jpeg_quality), None
    except Exception as e:  # noqa: BLE001 - any undecodable file is that file's error, not the run's
        return None, f"cannot read image: {type(e).__name__}: {e}"


def predict(model, ckpt, paths, device, batch_size=32, top_k=5, ten_crop=False, jpeg_quality=None, threads=None):
    """Yield {"path", "top": [...]} or {"path", "error"} per path, in order."""
    classes = ckpt["classes"]
    top_k = min(top_k, len(classes))
    threads = threads or min(8, default_workers())
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            loaded = list(pool.map(
                lambda p: _load(p, ckpt["resize_size"], ckpt["crop_size"], ten_crop, jpeg_quality), chunk))
            ok = [x for x, err in loaded if err is None]
            probs = iter(())
            if ok:
                x = torch.stack(ok).to(device)
                crops = x.shape[1] if ten_crop else 0
                with torch.inference_mode():
                    logits = model(pp.normalize(x.flatten(0, 1) if crops else x, ckpt["mean"], ckpt["std"]))
                    p = F.softmax(logits.float(), dim=1)
                    if crops:  # as evaluation: the mean of the crops' probabilities
                        p = p.view(-1, crops, p.shape[1]).mean(dim=1)
                probs = iter(p.cpu())
            for path, (_, err) in zip(chunk, loaded):
                if err is not None:
                    yield {"path": path, "error": err}
                    continue
                values, indices = next(probs).topk(top_k)
                yield {"path": path, "top": [
                    {"wnid": classes[i], "name": class_name(classes[i]), "index": i, "prob": v}
                    for v, i in zip(values.tolist(), indices.tolist())]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a model_NNN.pt written by tools.train")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER_OR_GLOB",
                   help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image (default: 5)")
    p.add_argument("--ten-crop", action="store_true",
                   help="average the probabilities of ten crops (corners, center and their mirrors) "
                        "instead of the single center crop")
    p.add_argument("--resize-quality", type=int, metavar="Q",
                   help="replay the resize stage's JPEG encode at quality Q (its --quality, config resize.quality) "
                        "so that an original photo scores exactly as its copy in the val shards "
                        "(default: off, the resized pixels go to the model directly)")
    args = p.parse_args(argv)
    if args.resize_quality is not None and not 1 <= args.resize_quality <= 100:
        p.error("--resize-quality must be in 1..100")
    if args.batch_size < 1 or args.top_k < 1:
        p.error("--batch-size and --top-k must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        model, ckpt = load_checkpoint(args.checkpoint, device)
    except RuntimeError as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 2
    inputs = expand_inputs(args.inputs)
    predicted = predict(model, ckpt, [p for p, err in inputs if err is None], device, args.batch_size,
                        args.top_k, args.ten_crop, args.resize_quality)
    results = [{"path": p, "error": err} if err is not None else next(predicted) for p, err in inputs]
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"predict: error: {r['path']}: {r['error']}", file=sys.stderr)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for r in results:
            if "top" in r:
                print(r["path"])
                for rank, t in enumerate(r["top"], 1):
                    print(f"  {rank}. {100 * t['prob']:6.2f} %  {t['wnid']}  {t['name']}")
    if failed:
        print(f"predict: {len(failed)} of {len(results)} inputs could not be predicted", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
