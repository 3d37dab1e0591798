"""Evaluate a trained checkpoint on the val shards: top-1/top-5 error, loss, per-class accuracy and
the most confused class pairs, written to eval.json beside the run.

Usage:
    python -m tools.evaluate --run W/runs/alexnetowtbn --shards W/shards
    python -m tools.evaluate --run W/runs/alexnetowtbn --shards W/shards --ten-crop --output W/eval10.json
    torchrun --nproc-per-node 8 -m tools.evaluate --run-dir W/runs/alexnetowtbn --shards W/shards

The default checkpoint is the newest `model_NNN.pt` of the run. Under torchrun every process reads
its share of the val shards (each image exactly once) and the counts are summed, so the numbers do
not depend on the number of processes (gloo on CPU, nccl on GPUs). Errors are in percent; the loss
is the mean cross-entropy. With --ten-crop each image scores the mean of the softmax probabilities
of ten crops (four corners, center and their mirrors) of the resized image.

--decode gpu (the default "auto" picks it where CUDA works, for center crops): the loader workers
only read the shards, and the JPEGs are decoded (nvJPEG) and center-cropped on the GPU
(tools.imagenet.gpu_data), several times faster than PIL in the workers; same crop geometry. Ten
crops always decode on the CPU. An image that cannot be decoded is reported and the run fails.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tools.imagenet import checkpoint as ckpt_io
from tools.imagenet import fsutil
from tools.imagenet.classes import class_name
from tools.imagenet.distributed import (AMP_DTYPES, add_cuda_connections_flag, amp_dtype, cuda_connections, setup,
                                        work_stream)
from tools.imagenet.evaluation import evaluate, most_confused
from tools.imagenet.gpu_data import GPU_DECODERS
from tools.imagenet.loader import read_manifest, resolve_decode, val_loader



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", "--run-dir", dest="run", type=Path,
                   help="the training run's folder (holds model_NNN.pt); required unless --checkpoint is "
                        "given. Under torchrun spell it --run-dir (torchrun takes --run for its --run-path)")
    p.add_argument("--checkpoint", type=Path,
                   help="checkpoint to evaluate (default: the newest model_NNN.pt of --run)")
    p.add_argument("--shards", type=Path, required=True,
                   help="the shard stage's folder (val-NNNNNN.tar + val.json)")
    p.add_argument("--ten-crop", action="store_true",
                   help="average ten crops (corners, center, their mirrors) instead of the center crop")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch and process (default: 128)")
    p.add_argument("--workers", type=int, default=4,
                   help="loader processes per process; 0 loads in the main process (default: 4)")
    p.add_argument("--device", default="auto",
                   help="auto (GPU if there is one), cpu or cuda; under torchrun each process takes "
                        "GPU LOCAL_RANK")
    p.add_argument("--decode", choices=["auto", "cpu", "gpu"], default="auto",
                   help="where the JPEGs are decoded and cropped: cpu (PIL in the loader workers), gpu "
                        "(nvJPEG + a crop kernel on the device; on a CPU device the same code runs on "
                        "the CPU) or auto (gpu where CUDA works, cpu for --ten-crop) (default: auto)")
    p.add_argument("--gpu-decoder", choices=list(GPU_DECODERS), default="auto",
                   help="--decode gpu: engine (libnvjpeg on the JPEG engines of A100/H100/H200), nvjpeg "
                        "(torchvision), hardware (nvImageCodec) or auto (engine where there is one, else "
                        "nvjpeg) (default: auto)")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), default="none",
                   help="autocast dtype for the forward pass (default: none, full fp32)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (faster on GPUs)")
    add_cuda_connections_flag(p)
    p.add_argument("--top-confused", type=int, default=20,
                   help="how many of the most confused class pairs eval.json lists (default: 20)")
    p.add_argument("--output", type=Path,
                   help="where to write the results (default: <run>/eval.json, or beside --checkpoint)")
    args = p.parse_args(argv)
    if args.run is None and args.checkpoint is None:
        p.error("give --run (newest checkpoint) or --checkpoint")
    if args.batch_size < 1 or args.workers < 0:
        p.error("--batch-size must be >= 1 and --workers >= 0")
    if args.device not in ("auto", "cpu", "cuda"):
        p.error("--device must be auto, cpu or cuda")
    return args


def find_checkpoint(args):
    if args.checkpoint is not None:
        if not args.checkpoint.is_file():
            raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file")
        return args.checkpoint
    path = ckpt_io.latest(args.run)
    if path is None:
        raise FileNotFoundError(f"--run {args.run}: no model_NNN.pt in it; train first (tools.train) "
                                f"or pass --checkpoint")
    return path


def report(result, ckpt, path, args, settings, seconds):
    """The eval.json document."""
    classes = ckpt["classes"]
    per_class = []
    for i, wnid in enumerate(classes):
        n, ok = result["class_count"][i], result["class_correct"][i]
        per_class.append({"index": i, "wnid": wnid, "name": class_name(wnid), "count": n, "correct": ok,
                          "accuracy": 100.0 * ok / n if n else None})
    confused = [{"true_wnid": classes[t], "true_name": class_name(classes[t]),
                 "pred_wnid": classes[p], "pred_name": class_name(classes[p]), "count": n}
                for t, p, n in most_confused(result["confusion"], args.top_confused)]
    return {
        "checkpoint": str(path),
        "epoch": ckpt.get("epoch"),
        "arch": ckpt["arch"],
        "top1_error": result["top1_error"],
        "top5_error": result["top5_error"],
        "loss": result["loss"],
        "count": result["count"],
        "correct1": result["correct1"],
        "correct5": result["correct5"],
        "per_class": per_class,
        "most_confused": confused,
        "settings": settings,
        "seconds": round(seconds, 3),
    }


def summary(doc, worst=5):
    """A few lines for people: the errors, the hardest classes and the commonest confusions."""
    s = doc["settings"]
    lines = [f"evaluate: {doc['checkpoint']} (epoch {doc['epoch']}, {doc['arch']}) on {doc['count']} val images, "
             f"{'ten crops' if s['ten_crop'] else 'center crop'} {s['crop_size']}, {s['world_size']} process(es)",
             f"  top-1 error {doc['top1_error']:.2f} %   top-5 error {doc['top5_error']:.2f} %   "
             f"loss {doc['loss']:.4f}"]
    scored = sorted((c for c in doc["per_class"] if c["count"]), key=lambda c: (c["accuracy"], c["index"]))
    if scored:
        lines.append("  hardest classes (top-1 accuracy):")
        lines += [f"    {c['accuracy']:6.2f} %  {c['wnid']}  {c['name']}" for c in scored[:worst]]
    if doc["most_confused"]:
        lines.append("  most confused (true -> predicted, images):")
        lines += [f"    {m['count']:5d}  {m['true_wnid']} {m['true_name']}  ->  {m['pred_wnid']} {m['pred_name']}"
                  for m in doc["most_confused"][:worst]]
    return "\n".join(lines)


def run(args):
    if args.device != "cpu":
        cuda_connections(args.cuda_connections)
    rank, world, device = setup(args.device)
    with work_stream(device):
        return run_on(args, rank, world, device)


def run_on(args, rank, world, device):
    path = find_checkpoint(args)
    model, ckpt = ckpt_io.load_model(path, device)
    manifest = read_manifest(args.shards, "val")
    if list(manifest["classes"]) != list(ckpt["classes"]):
        raise ValueError(f"{path} was trained on {len(ckpt['classes'])} classes that differ from the "
                         f"{len(manifest['classes'])} of {args.shards / 'val.json'}: evaluate with the "
                         f"shards it was trained on")
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    decode = resolve_decode(args.decode, args.ten_crop) if device.type == "cuda" or args.decode != "auto" \
        else "cpu"
    batches = val_loader(args.shards, args.batch_size, rank, world, args.workers, ckpt["crop_size"],
                         ten_crop=args.ten_crop, decode=decode)
    if decode == "gpu":
        from tools.imagenet.gpu_data import val_pipeline
        batches = val_pipeline(batches, device, ckpt["crop_size"], ckpt["mean"], ckpt["std"],
                               on_failure=lambda key, reason: print(f"evaluate: cannot decode {key}: {reason}",
                                                                    file=sys.stderr, flush=True),
                               decoder=args.gpu_decoder)
    start = time.perf_counter()
    result = evaluate(model, batches, device, ckpt["mean"], ckpt["std"], amp_dtype=amp_dtype(args.amp, device),
                      channels_last=args.channels_last, num_classes=ckpt["num_classes"], progress=True)
    seconds = time.perf_counter() - start
    if result["count"] != manifest["num_samples"]:
        raise RuntimeError(f"evaluated {result['count']} images but {args.shards / 'val.json'} lists "
                           f"{manifest['num_samples']}: the val shards changed or are incomplete; rerun the shard stage")
    settings = {"shards": str(args.shards), "ten_crop": args.ten_crop, "averaging": "softmax" if args.ten_crop
                else None, "batch_size": args.batch_size, "workers": args.workers, "device": device.type, "decode": decode,
                "gpu_decoder": args.gpu_decoder if decode == "gpu" else None,
                "world_size": world, "amp": args.amp, "channels_last": args.channels_last,
                "crop_size": ckpt["crop_size"], "resize_size": ckpt.get("resize_size"),
                "mean": ckpt["mean"], "std": ckpt["std"]}
    doc = report(result, ckpt, path, args, settings, seconds)
    if rank == 0:
        output = args.output or (args.run or Path(path).parent) / "eval.json"
        fsutil.write_json_atomic(output, doc)
        print(summary(doc))
        print(f"evaluate: wrote {output}", file=sys.stderr)
    return doc


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
