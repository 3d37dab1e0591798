"""Benchmark: data parallelism (DDP) against Krizhevsky's one weird trick (DDP trunk, model-parallel
classifier, tools.imagenet.owt) for training steps on synthetic GPU tensors.

Usage:
    torchrun --nproc-per-node 8 bench/bench_owt.py                        # alexnetowtbn, 128 per GPU
    torchrun --nproc-per-node 2 bench/bench_owt.py --arch overfeat --batch-size 64 --steps 30
    torchrun --nproc-per-node 2 bench/bench_owt.py --cpu --size 64 --batch-size 4 --steps 2 \
        --warmup 1 --num-classes 10                                       # smoke test, gloo on CPU

Each mode builds the model from the same seed, runs --warmup steps, then times --steps SGD steps
(momentum 0.9, weight decay 5e-4) with bf16 autocast and channels_last (unless --fp32 /
--no-channels-last) on one fixed random batch per rank (the loader is not measured). The time is
the slowest rank's. Bytes per step are what each rank sends (tools.imagenet.owt.comm_breakdown;
ring collectives; activations in bf16 under autocast, gradients in fp32). Rank 0 prints a table
with images/s and the ratio to ddp measured in the same run.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.imagenet.models import build_model, param_count  # noqa: E402
from tools.imagenet.owt import comm_breakdown, wrap_owt  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="alexnetowtbn", help="model name (tools.imagenet.models)")
    p.add_argument("--modes", default="ddp,owt", help="comma-separated modes to time: ddp, owt")
    p.add_argument("--batch-size", type=int, default=128, help="images per GPU per step")
    p.add_argument("--size", type=int, default=224, help="crop size of the synthetic images")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs")
    p.add_argument("--steps", type=int, default=50, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (cuDNN autotuning)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW memory format")
    p.add_argument("--cpu", action="store_true", help="gloo on the CPU (a smoke test, not a timing)")
    return p.parse_args(argv)


def build(mode, args, device, world):
    torch.manual_seed(0)
    model = build_model(args.arch, args.num_classes)
    if not args.no_channels_last:
        model = model.to(memory_format=torch.channels_last)
    if mode == "ddp":
        model = model.to(device)
        ids = [device.index] if device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=ids)
        comm = comm_breakdown(model, args.batch_size * world, world, "ddp")
    else:
        comm = comm_breakdown(model, args.batch_size * world, world, "owt",
                              act_bytes=4 if args.fp32 else 2)
        wrapped = wrap_owt(model, device=device, even_batches=True)
    return wrapped, comm


def time_mode(mode, args, device, world):
    model, comm = build(mode, args, device, world)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator(device=device).manual_seed(dist.get_rank())
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device, generator=gen)
    if not args.no_channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device, generator=gen)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.fp32)

    def step():
        with amp:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    seconds = float(elapsed)
    ips = args.steps * args.batch_size * world / seconds
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    result = {"mode": mode, "images_per_s": ips, "ms_per_step": 1000 * seconds / args.steps,
              "bytes": sum(comm.values()), "comm": comm, "loss": loss.item(), "peak_gib": peak}
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return result


def main(argv=None):
    args = parse_args(argv)
    if "RANK" not in os.environ:
        print("run under torchrun, e.g. torchrun --nproc-per-node 2 bench/bench_owt.py", file=sys.stderr)
        return 2
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.cpu:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for mode in args.modes.split(","):
        r = time_mode(mode.strip(), args, device, world)
        results.append(r)
        if rank == 0:
            print(f"{mode}: {r['images_per_s']:.0f} images/s, {r['ms_per_step']:.1f} ms/step, "
                  f"{r['bytes'] / 1e6:.1f} MB sent per rank per step {r['comm']}, "
                  f"peak {r['peak_gib']:.2f} GiB, loss {r['loss']:.3f}", flush=True)
    if rank == 0:
        base = next((r["images_per_s"] for r in results if r["mode"] == "ddp"), None)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"\n{args.arch} ({param_count(build_model(args.arch, args.num_classes)):,} params), "
              f"{world} x {name}, {args.batch_size}/GPU, {args.size}px, "
              f"{'fp32' if args.fp32 else 'bf16 autocast'}, "
              f"{'NCHW' if args.no_channels_last else 'channels_last'}, torch {torch.__version__}")
        print(f"{'mode':<6}{'images/s':>12}{'ms/step':>10}{'vs ddp':>9}{'MB/rank/step':>15}")
        for r in results:
            ratio = f"{r['images_per_s'] / base:.2f}x" if base else "-"
            print(f"{r['mode']:<6}{r['images_per_s']:>12.0f}{r['ms_per_step']:>10.1f}{ratio:>9}"
                  f"{r['bytes'] / 1e6:>15.1f}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
