"""Benchmark: how fast each data path feeds a training step, against the synthetic-tensor ceiling.

Usage:
    python bench/bench_loader.py --loader-only --images 1024 --workers 2          # CPU machine: (b) vs (c)
    python bench/bench_loader.py --images 12800 --workers 16 --json out.json      # GPU machine, ~6 min

Generates N ImageNet-like JPEGs on the spot (500x375 / 375x500 / 500x333 photo-like scenes: smooth
colour field + texture, resized to short side 256, quality 90, about 31 KB each as prepared ImageNet), then
an ImageFolder tree of them and WebDataset shards (plain tarfile, per the shard contract), and measures images/s, each for
--steps steps after --warmup steps, median over --repeats windows:
  (a) synthetic    train step on in-memory GPU tensors (the ceiling)
  (b) imagefolder  torchvision ImageFolder + DataLoader(workers) + PIL RandomResizedCrop/flip/
                   ToTensor/Normalize, as pytorch/examples/imagenet
  (c) cpu          the shards through tools.imagenet.loader.train_loader (PIL decode + crop in
                   workers), uint8 to the GPU, normalised there
  (d) nvjpeg       train_loader(decode="gpu"): workers hand over raw JPEG bytes; GpuBatchPipeline
                   decodes (torchvision's nvJPEG, on the SMs) and crops (Triton kernel) on the GPU in
                   --decode-threads threads with their own streams, overlapped with the step
                   (what tools.train --decode gpu --gpu-decoder nvjpeg runs)
  (e) nvjpeg+cpu   as (d), with a fraction (--hybrid-fractions) of every batch decoded and cropped by
                   the workers (tools.train --cpu-fraction)
  (f) hardware     as (d) with nvImageCodec on the GPU's hardware JPEG engines, off the SMs
                   (--gpu-decoder hardware), where nvidia-nvimgcodec is installed
  (g) hw+cpu       as (f) plus CPU workers (--hardware-fractions)
  (h) engine       as (d) with tools.imagenet.nvjpeg (libnvjpeg's hardware backend called directly:
                   a decoder per thread, no host wait; --gpu-decoder engine)
  (i) engine+cpu   as (h) plus CPU workers (--engine-fractions)
--priority-ab adds (d) and (h) with decode streams of high priority (the default is normal).
plus, for the data path alone (no model): stage costs of one batch (decode with each decoder,
the phase-1 pad + roi_align crop against the in-place crop in torch and Triton), decode
throughput from 1-3 threads, and (d)/(f) with 1-3 decode threads.
Models: --models (alexnetowtbn eager / torch.compile, resnet50; bf16 autocast, channels_last).
Prints a table (images/s, share of the ceiling) last.
--loader-only: (b) vs (c) with no model and no GPU.
"""
import argparse
import contextlib
import io
import json
import math
import os
import random
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.imagenet import gpu_data  # noqa: E402
from tools.imagenet.distributed import add_cuda_connections_flag, cuda_connections  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SCENES = [(500, 375), (375, 500), (500, 333), (500, 375)]


# ----------------------------------------------------------------------------------------- data

def _make_image(args):
    """One photo-like scene (smooth colour field + fine texture, so JPEG sizes are like ImageNet's
    25-40 KB at 256 px), resized to short side 256 and saved at quality 90 like the resize stage."""
    i, num_classes, out_dir, wnids = args
    rng = np.random.default_rng(i)
    k = i % num_classes
    w, h = SCENES[i % len(SCENES)]
    small = rng.integers(0, 256, (max(2, h // 40), max(2, w // 40), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    texture = rng.normal(0, 16, (h, w, 1)).astype(np.int16)
    img = Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8))
    s = 256 / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.Resampling.BILINEAR, reducing_gap=3.0)
    split = "val" if (i // num_classes) % 50 == 49 else "train"
    path = Path(out_dir) / split / wnids[k] / f"{wnids[k]}_{i}.JPEG"
    img.save(path, "JPEG", quality=90)
    return path.stat().st_size


def write_shards(src, out, shard_size, seed=0):
    """Plain-tarfile WebDataset shards + manifest per the shard contract (train only, shuffled):
    `<key>.jpg` as is, `<key>.cls` = index of the wnid in sorted order; fixed mtime."""
    classes = sorted(p.name for p in (src / "train").iterdir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((src / "train" / c).iterdir())]
    random.Random(seed).shuffle(files)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for n, start in enumerate(range(0, len(files), shard_size)):
        name = f"train-{n:06d}.tar"
        chunk = files[start:start + shard_size]
        with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for f, cls in chunk:
                for ext, data in (("cls", str(cls).encode()), ("jpg", f.read_bytes())):
                    info = tarfile.TarInfo(f"{f.stem}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
        shards.append({"name": name, "num_samples": len(chunk), "bytes": (out / name).stat().st_size})
    manifest = {"split": "train", "num_samples": len(files), "num_classes": len(classes), "classes": classes,
                "shards": shards, "shard_size": shard_size, "seed": seed, "mean": MEAN, "std": STD}
    (out / "train.json").write_text(json.dumps(manifest, indent=1))
    return out


def make_jpegs(num_images, workers=16, num_classes=10):
    """num_images generated JPEGs (as bytes, in file order) for the decode probes."""
    from multiprocessing import Pool
    work = Path(tempfile.mkdtemp(prefix="jpegs_"))
    wnids = [f"n{k:08d}" for k in range(num_classes)]
    for split in ("train", "val"):
        for w in wnids:
            (work / split / w).mkdir(parents=True, exist_ok=True)
    with Pool(workers) as pool:
        pool.map(_make_image, [(i, num_classes, work, wnids) for i in range(num_images)], chunksize=16)
    return [f.read_bytes() for f in sorted(work.rglob("*.JPEG"))]


def make_dataset(work, num_images, num_classes, workers, shard_size):
    """An ImageFolder tree work/resized/{train,val}/<wnid>/*.JPEG and shards in work/shards."""
    from multiprocessing import Pool
    from tools.make_mini import pick_wnids
    wnids = pick_wnids(num_classes)
    src = work / "resized"
    for split in ("train", "val"):
        for w in wnids:
            (src / split / w).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with Pool(workers) as pool:
        sizes = pool.map(_make_image, [(i, num_classes, src, wnids) for i in range(num_images)], chunksize=16)
    print(f"generated {num_images} JPEGs, mean {np.mean(sizes) / 1024:.1f} KiB, "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return src, write_shards(src, work / "shards", shard_size)


# ----------------------------------------------------------------------------------------- sources

def imagefolder_batches(root, batch, workers, crop):
    """(b): pytorch/examples' ImageNet loader, endless (sampling with replacement, no epoch ends)."""
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.RandomResizedCrop(crop), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    ds = datasets.ImageFolder(str(root), tf)
    sampler = RandomSampler(ds, replacement=True, num_samples=10 ** 8)
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      prefetch_factor=4 if workers else None)


def cpu_batches(shards, batch, workers, crop, aug, total):
    """(c): the project's CPU loader; long enough for `total` batches."""
    from tools.imagenet.loader import train_loader
    loader = train_loader(shards, global_batch_size=batch, epoch=1, seed=0, rank=0, world_size=1,
                          workers=workers, crop_size=crop, aug=aug)
    if getattr(loader, "num_batches", total) < total:
        loader.num_batches = total  # the train stream is endless; only the epoch length stops it
    return loader


def gpu_batches(shards, batch, workers, crop, aug, total, cpu_fraction=0.0, decoder="nvjpeg", threads=1,
                priority=0):
    """(d)-(g): the project's GPU path, as tools.train --decode gpu [--gpu-decoder] [--cpu-fraction]
    runs it (its decoded-batch queue as deep as tools.train's default)."""
    from tools.train import GPU_PREFETCH
    from tools.imagenet.loader import train_loader
    loader = train_loader(shards, global_batch_size=batch, epoch=1, seed=0, rank=0, world_size=1,
                          workers=workers, crop_size=crop, aug=aug, decode="gpu", cpu_fraction=cpu_fraction)
    loader.num_batches = max(loader.num_batches, total)
    augment = gpu_data.GpuAugment(crop, mode=aug, mean=MEAN, std=STD, dtype=torch.bfloat16, seed=0)
    return gpu_data.GpuBatchPipeline(loader, augment, device="cuda", decoder=decoder, threads=threads,
                                     priority=priority, prefetch=GPU_PREFETCH)


def one_raw_batch(shards, batch, crop, aug):
    from tools.imagenet.loader import train_loader
    loader = train_loader(shards, global_batch_size=batch, epoch=1, seed=0, rank=0, world_size=1,
                          workers=0, crop_size=crop, aug=aug, decode="gpu")
    return next(iter(loader))


# ----------------------------------------------------------------------------------------- timing

def measure(source, step, warmup, steps, repeats, to_device=None):
    """Median images/s over `repeats` windows of `steps` steps, after `warmup` steps."""
    cuda = torch.cuda.is_available()
    it = iter(source)
    try:
        for _ in range(warmup):
            x, y = next(it)
            step(*(to_device(x, y) if to_device else (x, y)))
        rates = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            t0, n = time.perf_counter(), 0
            for _ in range(steps):
                x, y = next(it)
                step(*(to_device(x, y) if to_device else (x, y)))
                n += len(y)
            if cuda:
                torch.cuda.synchronize()
            rates.append(n / (time.perf_counter() - t0))
        return statistics.median(rates), rates
    finally:
        del it
        stats = getattr(source, "stats", None)
        if stats and stats["batches"]:
            per = {k: round(v / stats["batches"] * 1000, 2) for k, v in stats.items() if k != "batches"}
            print(f"  producer host ms per batch: {per}", file=sys.stderr, flush=True)


def uint8_to_gpu(x, y):
    from tools.imagenet.loader import normalize
    x = x.cuda(non_blocking=True)
    return normalize(x, MEAN, STD), y.cuda(non_blocking=True)


def float_to_gpu(x, y):
    return x.cuda(non_blocking=True).contiguous(memory_format=torch.channels_last), y.cuda(non_blocking=True)


def make_step(arch, compile_model, num_classes=1000):
    """tools.train's step (fused SGD, bf16 autocast) on a channels_last model, compiled or not."""
    from tools.imagenet.models import build_model
    from tools.imagenet.step import eager_step, sgd
    model = build_model(arch, num_classes).cuda().to(memory_format=torch.channels_last).train()
    opt = sgd(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, kernel="fused")
    fwd = torch.compile(model) if compile_model else model
    return eager_step(fwd, opt, torch.bfloat16, torch.device("cuda"))


def no_step(x, y):
    pass


def touch_step(x, y):
    x[:1, :1, :1, :1].sum()  # a GPU op on the batch so the wait on its event is real


# ----------------------------------------------------------------------------------------- main

def pad_roi_align(images, boxes, crop):
    """Phase 1's crop, for comparison: a zero-padded 4-channel batch (one copy per image) and one
    torchvision roi_align; the 4th channel renormalises samples that touch the padding."""
    from torchvision.ops import roi_align
    n, device = len(images), images[0].device
    hs = torch.tensor([im.shape[-2] for im in images])
    ws = torch.tensor([im.shape[-1] for im in images])
    out = torch.zeros((n, 4, int(hs.max()), int(ws.max())), device=device)
    for i, im in enumerate(images):
        out[i, :3, :im.shape[-2], :im.shape[-1]].copy_(im, non_blocking=True)
        out[i, 3, :im.shape[-2], :im.shape[-1]] = 1
    w = (boxes[:, 2] - boxes[:, 0]).abs()
    sampling = max(1, math.ceil(float(torch.maximum(w, boxes[:, 3] - boxes[:, 1]).max()) / crop - 1e-9))
    rois = torch.cat([torch.arange(n, dtype=torch.float64)[:, None], boxes.double()], 1).float().to(device)
    r = roi_align(out, rois, (crop, crop), 1.0, sampling, True)
    return gpu_data.normalize(r[:, :3] / r[:, 3:], MEAN, STD, torch.bfloat16)


def micro(shards, batch, crop, aug, decoders, reps=10):
    """Stage costs of the GPU path on one batch, alone, in ms (CUDA-synchronised host clock), and
    decode throughput from one and from two threads."""
    raw = one_raw_batch(shards, batch, crop, aug)
    blobs = gpu_data.unpack_jpegs(raw["data"], raw["offsets"])
    augment = gpu_data.GpuAugment(crop, mode=aug, mean=MEAN, std=STD, dtype=torch.bfloat16)

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            t.append((time.perf_counter() - t0) * 1000)
        return statistics.median(t)
    out = {}
    for name, dec in decoders.items():
        out[f"decode_{name}_ms"] = timed(lambda: gpu_data.decode_jpegs(blobs, "cuda", decoder=dec))
    images, _ = gpu_data.decode_jpegs(blobs, "cuda")
    sizes = [tuple(im.shape[-2:]) for im in images]
    boxes = augment.boxes(sizes)
    crop_args = (images, boxes, crop, MEAN, STD, torch.bfloat16)
    ref = gpu_data.crop_batch(*crop_args, backend="torch").float()
    tri = gpu_data.crop_batch(*crop_args, backend="triton").float()
    old = pad_roi_align(images, boxes, crop).float()
    out["triton_vs_torch_max_abs"] = (tri - ref).abs().max().item()
    out["roi_align_vs_torch_mean_abs"] = (old - ref).abs().mean().item()
    out.update({"boxes_ms": timed(lambda: augment.boxes(sizes)),
                "flatten_ms": timed(lambda: gpu_data.flatten_images(images)),
                "crop_pad_roi_align_ms": timed(lambda: pad_roi_align(images, boxes, crop)),
                "crop_flat_torch_ms": timed(lambda: gpu_data.crop_batch(*crop_args, backend="torch")),
                "crop_flat_triton_ms": timed(lambda: gpu_data.crop_batch(*crop_args, backend="triton")),
                "augment_ms": timed(lambda: augment(images))})
    if "hardware" in decoders:  # the crop reading nvImageCodec's interleaved images in place
        hw_images, _ = gpu_data.decode_jpegs(blobs, "cuda", decoder=decoders["hardware"])
        out["augment_hardware_images_ms"] = timed(lambda: augment(hw_images))
    if "engine" in decoders:  # the same engines as torchvision's nvJPEG: the same pixels
        eng_images, _ = gpu_data.decode_jpegs(blobs, "cuda", decoder=decoders["engine"])
        out["engine_vs_nvjpeg_max_abs"] = max(
            (a.int() - b.int()).abs().max().item() for a, b in zip(eng_images, images))
        out["augment_engine_images_ms"] = timed(lambda: augment(eng_images))
    # decode from several threads at once (own streams, own decoders): does the decoder serialise?
    import threading
    makers = {name: (lambda device, name=name: gpu_data.gpu_decoder(name, device)) for name in decoders}
    for name in decoders:
        for nthreads in (1, 2, 3):
            ready = threading.Barrier(nthreads + 1)

            def work(dec):
                with torch.cuda.stream(torch.cuda.Stream()):
                    gpu_data.decode_jpegs(blobs, "cuda", decoder=dec)  # a new decoder's first call: untimed
                    torch.cuda.current_stream().synchronize()
                    ready.wait()
                    for _ in range(reps):
                        gpu_data.decode_jpegs(blobs, "cuda", decoder=dec)
                    torch.cuda.current_stream().synchronize()
            ths = [threading.Thread(target=work, args=(makers[name]("cuda"),)) for _ in range(nthreads)]
            for t in ths:
                t.start()
            ready.wait()
            t0 = time.perf_counter()
            for t in ths:
                t.join()
            out[f"decode_{name}_{nthreads}threads_img_per_s"] = nthreads * reps * batch / (time.perf_counter() - t0)
    out["augment_img_per_s"] = batch / out["augment_ms"] * 1000
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=12800, help="JPEGs to generate (default 12800)")
    p.add_argument("--classes", type=int, default=100, help="classes of the generated set (default 100)")
    p.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--crop", type=int, default=224, help="crop size (default 224)")
    p.add_argument("--aug", choices=["rrc", "crop"], default="rrc",
                   help="train augmentation of paths c-e: RandomResizedCrop (as b) or the seed's crop")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="DataLoader workers of the decoding paths b, c, e (default: all cores)")
    p.add_argument("--raw-workers", type=int, default=8,
                   help="workers of the GPU paths d, f, h, which only read shards (default 8, as the "
                        "workflow's train.workers)")
    p.add_argument("--decode-threads", default="1,2",
                   help="GPU paths: decode threads of GpuBatchPipeline; a comma list runs (d) with each, "
                        "the others with the last (default 1,2)")
    p.add_argument("--hybrid-fractions", default="0.1,0.2,0.3",
                   help="comma list: shares of each batch the workers decode in the hybrid path e")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window (default 20)")
    p.add_argument("--warmup", type=int, default=8,
                   help="untimed steps first (default 8; raised to 4 x workers + 4 for loader paths)")
    p.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported (default 3)")
    p.add_argument("--hardware-fractions", default="0.1,0.2",
                   help="CPU shares for (g), the hardware decoder plus CPU workers (default 0.1,0.2)")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="sys.setswitchinterval for this process (seconds; Python's default 0.005)")
    p.add_argument("--models", default="alexnetowtbn+compile,alexnetowtbn,resnet50",
                   help="comma list; '+compile' wraps the model in torch.compile")
    p.add_argument("--engine-fractions", default="0.1",
                   help="CPU shares for (i), the engine decoder plus CPU workers (default 0.1)")
    p.add_argument("--step-sms", type=int, default=0,
                   help="run the step on this many SMs (a green context), the rest left to the data path")
    p.add_argument("--step-stream", choices=["default", "side"], default="side",
                   help="the CUDA stream of the step (and the hand-over): a side stream of its own, as "
                        "tools.train runs it (default), or PyTorch's default stream")
    add_cuda_connections_flag(p)
    p.add_argument("--priority-ab", action="store_true",
                   help="also run (d) and (h) with decode streams of high priority")
    p.add_argument("--paths", default="a,b,c,d,e,f,g,h,i", help="comma list of the paths a-g to run")
    p.add_argument("--loader-only", action="store_true", help="(b) vs (c) without a model or GPU")
    p.add_argument("--work", type=Path, default=None, help="folder for the generated data (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write all figures to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda_connections(args.cuda_connections)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    torch.backends.cudnn.benchmark = True
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_loader_"))
    work.mkdir(parents=True, exist_ok=True)
    shard_size = max(64, args.images // max(4 * args.workers, 16))
    src, shards = make_dataset(work, args.images, args.classes, args.workers, shard_size)
    paths = set(args.paths.split(","))
    total = max(args.warmup, 4 * args.workers + 4) + args.steps * args.repeats + 2
    rows = []

    def record(model, path, rate, rates, ceiling=None):
        rows.append({"model": model, "path": path, "images_per_s": rate, "windows": rates,
                     "share": rate / ceiling if ceiling else None})
        share = f" ({rate / ceiling:.0%} of ceiling)" if ceiling else ""
        print(f"{model:24s} {path:20s} {rate:9.0f} img/s{share}", file=sys.stderr, flush=True)

    W, B, C = args.workers, args.batch, args.crop
    HW = max(1, W - 2)  # hybrid: leave cores to the main process and the GPU decode thread
    timing = (args.warmup, args.steps, args.repeats)

    def run(model, path, make_source, step, to_device=None, ceiling=None):
        """One measurement; a failure is reported and recorded, the others still run.
        The warm-up is at least the batches the workers can hold ready (workers x prefetch 4), so
        the timed windows measure the steady rate, not a buffer filled while nothing was timed."""
        workers = {"b": W, "c": W, "e": HW, "g": HW, "i": HW}.get(path[0], args.raw_workers if path[0] in "dfh" else 0)
        warm = max(args.warmup, 4 * workers + 4)
        try:
            record(model, path, *measure(make_source(), step, warm, args.steps, args.repeats,
                                         to_device=to_device), ceiling)
        except Exception as exc:
            print(f"{model:24s} {path:16s} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            rows.append({"model": model, "path": path, "images_per_s": float("nan"), "windows": [],
                         "share": None, "error": f"{type(exc).__name__}: {exc}"})

    if args.loader_only or not torch.cuda.is_available():
        run("none", "b imagefolder", lambda: imagefolder_batches(src / "train", B, W, C), no_step)
        run("none", "c cpu", lambda: cpu_batches(shards, B, W, C, args.aug, total), no_step)
    else:
        card = torch.cuda.get_device_name()
        print(f"card: {card}; torch {torch.__version__}; {W} workers", file=sys.stderr)
        step_stream = contextlib.nullcontext()
        if args.step_stream == "side":  # as tools.train (distributed.work_stream), not the default stream
            from tools.imagenet.distributed import work_stream
            step_stream = work_stream(torch.device("cuda"))
            rows.append({"model": "none", "path": "step on a side stream", "share": None,
                         "windows": [], "images_per_s": float("nan")})
        if args.step_sms:
            from tools.imagenet.sm_partition import partitioned_stream
            stream, got, total_sms = partitioned_stream("cuda", args.step_sms)
            print(f"step on {got} of {total_sms} SMs", file=sys.stderr)
            rows.append({"model": "none", "path": f"step SMs {got} of {total_sms}", "share": None,
                         "windows": [], "images_per_s": float("nan")})
            step_stream = torch.cuda.stream(stream)
        threads = [int(t) for t in str(args.decode_threads).split(",")]
        T = threads[-1]  # the others: path d only
        decoders = {"nvjpeg": gpu_data.torchvision_gpu_decoder("cuda")}
        try:
            decoders["hardware"] = gpu_data.hardware_jpeg_decoder("cuda")
        except RuntimeError as exc:
            print(f"hardware decoder unusable: {exc}", file=sys.stderr)
        try:
            decoders["engine"] = gpu_data.gpu_decoder("engine", "cuda")
        except RuntimeError as exc:
            print(f"engine decoder unusable: {exc}", file=sys.stderr)
        try:
            m = micro(shards, B, C, args.aug, decoders)
            for name in decoders:
                rows.append({"model": "none", "path": f"micro decode {name}", "share": None, "windows": [],
                             "images_per_s": B / m[f"decode_{name}_ms"] * 1000, "micro": m})
            rows.append({"model": "none", "path": "micro augment", "share": None, "windows": [],
                         "images_per_s": m["augment_img_per_s"]})
            print("micro:", json.dumps(m), file=sys.stderr, flush=True)
        except Exception as exc:  # the table below still comes out
            print(f"micro failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        fractions = [float(f) for f in args.hybrid_fractions.split(",") if f]
        hw = "hardware" in decoders
        sources = {
            "b imagefolder": (lambda: imagefolder_batches(src / "train", B, W, C), float_to_gpu),
            "c cpu": (lambda: cpu_batches(shards, B, W, C, args.aug, total), uint8_to_gpu),
        }
        for t in threads:
            sources[f"d nvjpeg t{t}"] = (lambda t=t: gpu_batches(shards, B, args.raw_workers, C, args.aug, total,
                                                                 threads=t), None)
        for f in fractions:
            sources[f"e nvjpeg+cpu {f:.2f}"] = (lambda f=f: gpu_batches(shards, B, HW, C, args.aug, total, f,
                                                                        threads=T), None)
        if hw:
            sources[f"f hardware t{T}"] = (lambda: gpu_batches(shards, B, args.raw_workers, C, args.aug, total,
                                                               decoder="hardware", threads=T), None)
            for f in [float(f) for f in args.hardware_fractions.split(",") if f]:
                sources[f"g hw+cpu {f:.2f}"] = (lambda f=f: gpu_batches(
                    shards, B, HW, C, args.aug, total, f, decoder="hardware", threads=T), None)
        try:
            gpu_data.gpu_decoder("engine", "cuda")
            engine = True
        except RuntimeError as exc:
            print(f"engine decoder unusable: {exc}", file=sys.stderr)
            engine = False
        if engine:
            for t in threads:
                sources[f"h engine t{t}"] = (lambda t=t: gpu_batches(
                    shards, B, args.raw_workers, C, args.aug, total, decoder="engine", threads=t), None)
            for f in [float(f) for f in args.engine_fractions.split(",") if f]:
                sources[f"i engine+cpu {f:.2f}"] = (lambda f=f: gpu_batches(
                    shards, B, HW, C, args.aug, total, f, decoder="engine", threads=T), None)
        if args.priority_ab:
            sources[f"d nvjpeg t{T} p-1"] = (lambda: gpu_batches(
                shards, B, args.raw_workers, C, args.aug, total, threads=T, priority=-1), None)
            if engine:
                sources[f"h engine t{T} p-1"] = (lambda: gpu_batches(
                    shards, B, args.raw_workers, C, args.aug, total, decoder="engine", threads=T,
                    priority=-1), None)
        chosen = {k: v for k, v in sources.items() if k[0] in paths}
        # the data paths alone (a trivial GPU op per batch)
        for path, (make, to_dev) in chosen.items():
            if path[0] != "b":
                run("none", path, make, touch_step, to_dev)
        for key, name in (("d", "nvjpeg"), ("f", "hardware")):
            if key in paths and name in decoders:
                for t in sorted({1, 2, 3} - set(threads if key == "d" else [T])):
                    run("none", f"{key} {name} t{t}", lambda t=t, name=name: gpu_batches(
                        shards, B, args.raw_workers, C, args.aug, total, decoder=name, threads=t), touch_step)
        for spec in args.models.split(","):
            arch, _, opt = spec.partition("+")
            try:
                step = make_step(arch, opt == "compile")
                x = torch.randn(B, 3, C, C, device="cuda").to(memory_format=torch.channels_last)
                y = torch.randint(0, 1000, (B,), device="cuda")
                torch.cuda.synchronize()
                with step_stream:
                    ceiling, rates = measure(iter(lambda: (x, y), None), step, *timing)
            except Exception as exc:
                print(f"{spec}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                continue
            record(spec, "a synthetic", ceiling, rates, ceiling)
            for path, (make, to_dev) in chosen.items():
                with step_stream:
                    run(spec, path, make, step, to_dev, ceiling)
            del step
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu only"
    if args.json:
        args.json.write_text(json.dumps({"device": device, "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=1))
    print(f"\nbench_loader: {args.images} JPEGs, batch {B}, crop {C}, aug {args.aug}, {W} workers, "
          f"device: {device}")
    print(f"{'model':24s} {'path':20s} {'images/s':>9s} {'of ceiling':>10s} {'vs b':>6s}")
    base = {r["model"]: r["images_per_s"] for r in rows if r["path"].startswith("b ")}
    for r in rows:
        share = f"{r['share']:.0%}" if r["share"] else ("FAILED" if r.get("error") else "-")
        vs_b = f"{r['images_per_s'] / base[r['model']]:.1f}x" if base.get(r["model"]) else "-"
        print(f"{r['model']:24s} {r['path']:20s} {r['images_per_s']:9.0f} {share:>10s} {vs_b:>6s}")
    if args.loader_only:
        b = next(r for r in rows if r["path"].startswith("b"))["images_per_s"]
        c = next(r for r in rows if r["path"].startswith("c"))["images_per_s"]
        print(f"cpu path / imagefolder: {c / b:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
