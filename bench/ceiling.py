"""The GPU ceiling: train-step and inference images/s of a model on synthetic in-memory tensors.

    python bench/ceiling.py --arch alexnetowtbn --batch 256                 # one GPU
    torchrun --nproc-per-node 2 bench/ceiling.py --arch alexnetowtbn --batch 256   # DDP, per-GPU batch

No data loading at all: what the loader-fed numbers of bench_e2e.py / bench_loader.py are compared
with. bf16 autocast and channels_last as in training; prints one JSON line per measurement (rank 0).
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.imagenet.autotune import timed_rate  # noqa: E402
from tools.imagenet.distributed import (NCCL_PROTOCOLS, add_cuda_connections_flag,  # noqa: E402
                                        cuda_connections, nccl_protocol, work_stream)
from tools.imagenet.graphed import WARMUP, GraphedStep, before_process_group  # noqa: E402
from tools.imagenet.models import build_model  # noqa: E402
from tools.imagenet.step import SGD_KERNELS, eager_step, sgd  # noqa: E402


def measure(arch, batch, crop=224, num_classes=1000, amp=True, channels_last=True, compile_model=False,
            warmup=10, steps=30, repeats=3, world=1, cuda_graphs=False, sgd_kernel="fused", infer=True):
    if not cuda_graphs:
        return _measure(**locals())
    warmup = max(warmup, WARMUP + 2)
    with work_stream(torch.device("cuda", torch.cuda.current_device())):  # as in tools.train
        return _measure(**locals())


def _measure(arch, batch, crop, num_classes, amp, channels_last, compile_model, warmup, steps, repeats,
             world, cuda_graphs, sgd_kernel, infer):
    device = torch.device("cuda", torch.cuda.current_device())
    torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(arch, num_classes).to(device, memory_format=fmt)
    # DDP as tools.train wraps it (bn_stats_sync epoch: no buffer broadcast per step)
    net = (torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False, gradient_as_bucket_view=True)
           if world > 1 else model)
    if compile_model:
        net = torch.compile(net)
    opt = sgd(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4, kernel=sgd_kernel)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, 3, crop, crop, device=device, generator=gen).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch,), device=device, generator=gen)

    amp_dtype = torch.bfloat16 if amp else None
    step = GraphedStep(net, opt, amp_dtype, batch) if cuda_graphs else eager_step(net, opt, amp_dtype, device)

    def train_step():
        step(x, y)

    @torch.no_grad()
    def infer_step():
        with torch.autocast("cuda", torch.bfloat16, enabled=amp):
            model(x).argmax(1)

    model.train()
    result = {"arch": arch, "batch_per_gpu": batch, "gpus": world, "compile": compile_model,
              "cuda_graphs": cuda_graphs, "sgd_kernel": sgd_kernel,
              "train_images_per_s": timed_rate(train_step, batch * world, warmup, steps, repeats, device)}
    if infer:  # per GPU: eval has no collective
        model.eval()
        result["infer_images_per_s_per_gpu"] = timed_rate(infer_step, batch, warmup, steps, repeats, device)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", action="append", help="model(s) to measure (repeatable; default alexnetowtbn)")
    p.add_argument("--batch", type=int, default=256, help="batch per GPU (default 256)")
    p.add_argument("--crop", type=int, default=224, help="input size (default 224)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model too")
    p.add_argument("--cuda-graphs", action="store_true", help="the train step as one CUDA graph "
                   "(tools/imagenet/graphed.py)")
    p.add_argument("--steps", type=int, default=30, help="steps per timed window (default 30)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--nccl-proto", default="Simple", choices=NCCL_PROTOCOLS,
                   help="NCCL protocol under torchrun, as tools.train's --nccl-proto (default Simple)")
    p.add_argument("--sgd-kernel", default="fused", choices=SGD_KERNELS,
                   help="SGD update as tools.train's --sgd-kernel (default fused)")
    p.add_argument("--no-infer", action="store_true", help="time the train step only")
    add_cuda_connections_flag(p)
    args = p.parse_args(argv)
    cuda_connections(args.cuda_connections)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        if args.cuda_graphs:
            before_process_group()
        nccl_protocol(args.nccl_proto)
        dist.init_process_group("nccl")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    for arch in args.arch or ["alexnetowtbn"]:
        r = measure(arch, args.batch, args.crop, amp=not args.fp32, compile_model=args.compile,
                    steps=args.steps, world=world, cuda_graphs=args.cuda_graphs,
                    sgd_kernel=args.sgd_kernel, infer=not args.no_infer)
        if int(os.environ.get("RANK", 0)) == 0:
            print(json.dumps(r), flush=True)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
