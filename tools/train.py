"""Train an ImageNet classifier from the WebDataset shards, on the CPU, one GPU or many (DDP).

Usage:
    torchrun --nproc-per-node 8 -m tools.train --shards W/shards --out W/runs/alexnetowtbn \\
        --arch alexnetowtbn --batch-size 1024 --workers 12 --amp bf16 --channels-last --compile
    python -m tools.train --shards W/shards --out W/runs/tiny --arch alexnetowtbn --device cpu \\
        --crop-size 64 --epochs 2 --epoch-size 5
    torchrun ... -m tools.train ... --resume          # continue from the newest model_NNN.pt
    torchrun --nproc-per-node 8 -m tools.train ... --parallel owt   # one weird trick

One process per GPU (torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; multi-node through torchrun's
rendezvous, with --out on a filesystem all nodes share). --batch-size is the GLOBAL batch, split
evenly over the ranks; the seed's LRs are for a global batch of 128 and are scaled linearly
(--lr-scaling). SIGTERM stops after the current step (exit code 143); --resume then restarts the
interrupted epoch from the last checkpoint. A NaN/inf loss stops the run (exit code 1). Every epoch
ends with a validation over all val images (each counted once across ranks), a checkpoint
model_NNN.pt, metrics.jsonl, train.log / test.log and curves.png in --out; final.json marks a
finished run. --parallel owt (Krizhevsky's one weird trick, tools/imagenet/owt.py) keeps the conv
trunk data parallel and splits the classifier's neurons over the ranks; checkpoints have the plain
model's layout in both modes, so a run resumes under either.
--decode gpu (auto picks it where CUDA works): the loader workers only read the shards, and the
JPEGs are decoded (nvJPEG) and cropped on the GPU in side streams while the previous step trains
(tools.imagenet.gpu_data), validation too; --cpu-fraction of each batch is decoded by the workers
(hybrid). An image nothing can decode is dropped from its batch and listed in bad_samples.tsv.
"""
import argparse
import copy
import math
import os
import platform
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from tools.imagenet import checkpoint as ckpt
from tools.imagenet.autotune import cudnn_searches, search_quietly, synthetic_step_rate
from tools.imagenet.distributed import (AUTO_FREE_SMS, NCCL_PROTOCOLS, add_cuda_connections_flag, all_reduce,
                                        cuda_connections, nccl_protocol, setup, work_stream)
from tools.imagenet.distributed import amp_dtype as autocast_dtype
from tools.imagenet import fsutil, nvjpeg
from tools.imagenet.evaluation import evaluate
from tools.imagenet.graphed import GraphedStep, before_process_group
from tools.imagenet import gpu_data
from tools.imagenet.loader import (IMAGENET_MEAN, IMAGENET_STD, batches_per_epoch, normalize,
                                   read_manifest, resolve_decode, train_loader, val_loader)
from tools.imagenet.logging_utils import MetricsLog, format_line, plot_curves, write_epoch_logs
from tools.imagenet.models import build_model
from tools.imagenet.owt import OWTModel, wrap_owt
from tools.imagenet.interval_meter import IntervalMeter, host_group
from tools.imagenet.profiling import StepProfiler
from tools.imagenet.schedule import Schedule
from tools.imagenet.step import SGD_KERNELS, eager_step, sgd, sgd_flags

INTERRUPTED = 143  # 128 + SIGTERM, what a preempted job reports
GPU_PREFETCH = 8  # decoded batches ready under --decode gpu (bench/NOTES-gpu.md phase 17)


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


def step_sms_setting(text):
    """--step-sms's value: auto, or a whole number of SMs (0: the whole GPU)."""
    if text == "auto":
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: auto, 0 (the whole GPU) or a number of SMs")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--shards", required=True, type=Path, help="folder with train/val shards and manifests")
    a("--out", required=True, type=Path, help="run folder: checkpoints, logs, curves, final.json")
    a("--arch", default="alexnetowtbn", help="alexnet, alexnetowt, alexnetowtbn, overfeat or a "
      "torchvision classification model name")
    a("--init", default="default", choices=["default", "kaiming", "xavier"],
      help="weight initialisation")
    a("--epochs", type=int, default=55, help="train until this epoch (1-based, inclusive)")
    a("--batch-size", type=int, default=128, help="GLOBAL batch size, divided over the ranks")
    a("--epoch-size", type=int, default=None, help="batches per epoch (unset or 0: the train "
      "set once, floor(train images / batch size); more than that repeats images within an "
      "epoch, fewer leaves some out)")
    a("--val-batch-size", type=int, default=None, help="val batch per rank (default: the "
      "per-rank train batch)")
    a("--workers", type=int, default=4, help="loader processes per rank (0: load in the main "
      "process, full stack traces)")
    a("--crop-size", type=int, default=224, help="train and val crop size")
    a("--resize-size", type=int, default=256, help="short side the shards' images were resized "
      "to (recorded in checkpoints for prediction)")
    a("--aug", default="crop", choices=["crop", "rrc"], help="crop: the seed's random crop + "
      "flip; rrc: RandomResizedCrop + flip")
    a("--decode", default="auto", choices=["auto", "cpu", "gpu"], help="cpu: PIL decode + crop "
      "in the loader workers; gpu: workers read bytes only, nvJPEG decode + crop kernel on the "
      "device, overlapped with training (on a CPU device the same code runs on the CPU); auto: "
      "gpu when CUDA works")
    a("--cpu-fraction", type=float, default=0.0, help="--decode gpu: share of each batch the "
      "workers decode and crop on the CPU (hybrid; raise it when the GPU decoder is the limit)")
    a("--gpu-decoder", default="auto", choices=list(gpu_data.GPU_DECODERS), help="--decode gpu: "
      "engine (libnvjpeg's batched decode on the JPEG engines of A100/H100/H200, a few Python "
      "operations per batch: the fastest on an H200), nvjpeg (torchvision's decode_jpeg), hardware "
      "(nvImageCodec; needs nvidia-nvimgcodec) or auto (engine where the GPU has one, else nvjpeg)")
    a("--decode-threads", type=int, default=2, help="--decode gpu: host threads decoding and "
      "cropping batches ahead, each with its own CUDA stream")
    a("--pin-raw", action="store_true", help="--decode gpu: the DataLoader's pin thread copies each "
      "raw batch's JPEG bytes into pinned memory, where the engine decoder reads them in place; by "
      "default the decoder copies them in its own thread (experimental: frees the decode threads, "
      "which limit a DDP rank's data path, of a copy per batch; bench/NOTES-gpu.md phase 19)")
    a("--engine-turn", default="lock", choices=nvjpeg.PROCESS_TURNS, help="--decode gpu, engine "
      "decoder: how a process's decode threads take their turns at nvJPEG's decode call (one at a "
      "time: two at once hang). lock: a Python lock, which the thread back from the call keeps "
      "until it has the GIL again; native: a mutex taken and given up inside the call's own native "
      "code (tools/imagenet/engine_turn.c, compiled on first use with the C compiler; a Python lock "
      "where there is none), so the turn passes without waiting for the GIL (experimental)")
    a("--gil-switch-ms", type=float, default=0.0, help="--decode gpu: Python's GIL switch interval "
      "in ms (0: Python's own, 5). An engine decode thread back from nvJPEG's call waits up to one "
      "interval for the GIL while it still holds the process's decode lock, and the engines idle "
      "meanwhile (experimental; bench/probe_engine.py --switch-ms, bench/NOTES-gpu.md phase 20)")
    a("--gpu-prefetch", type=int, default=GPU_PREFETCH, help="--decode gpu: decoded batches kept ready "
      "beyond the ones being decoded (~77 MB each for 256 AlexNet crops in bf16): the slack that "
      "absorbs the data path's stalls, which under DDP would stall every rank (8 against 3: 2-GPU "
      "runs 1.94x against 1.66x of one GPU in one call, the same on one GPU; bench/NOTES-gpu.md "
      "phase 17)")
    a("--shuffle-buffer", type=int, default=1000, help="samples in each loader's shuffle buffer")
    a("--normalize", default="manifest", choices=["manifest", "imagenet"],
      help="mean/std from the train manifest or the usual ImageNet constants")
    a("--schedule", default="regime", choices=["regime", "step", "cosine"],
      help="regime: the seed's LR/WD table by epoch; step: --lr times --lr-gamma after each of "
      "--lr-step-epochs; cosine: --lr with --warmup-epochs linear warm-up")
    a("--lr", type=float, default=0.01, help="base LR for step/cosine, for a global batch of 128")
    a("--lr-step-epochs", type=int, nargs="+", default=[30, 60],
      help="step schedule: multiply the LR by --lr-gamma after these epochs")
    a("--lr-gamma", type=float, default=0.1, help="step schedule factor")
    a("--warmup-epochs", type=float, default=0.0, help="cosine schedule warm-up length")
    a("--weight-decay", type=float, default=5e-4, help="weight decay for step/cosine (the "
      "regime sets its own)")
    a("--lr-scaling", default="linear", choices=["linear", "none"],
      help="linear: multiply LRs by batch-size/128")
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--sgd-kernel", default="fused", choices=SGD_KERNELS, help="how the SGD update runs: fused "
      "(one pass over parameters, gradients and momentum, weight decay included) or foreach "
      "(PyTorch's default: a pass per term, ~2x the memory traffic); the same arithmetic")
    a("--seed", type=int, default=0, help="seeds the weights, shard order, crops and dropout")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if present")
    a("--parallel", default="ddp", choices=["ddp", "owt"], help="ddp: data parallel over the "
      "ranks; owt: data-parallel conv trunk, classifier neurons split over the ranks (one weird "
      "trick; archs with .features/.avgpool/.classifier, e.g. the seed's); on one process both "
      "train the plain model")
    a("--amp", default="none", choices=["bf16", "none"], help="autocast to bfloat16 on GPUs (no effect on the CPU)")
    a("--channels-last", action="store_true", help="NHWC memory format for model and input")
    a("--compile", action="store_true", help="torch.compile the model (under --parallel owt "
      "its .features only)")
    a("--backend", default="cudnn", choices=["cudnn", "native"],
      help="cudnn: cuDNN with autotuning; native: cuDNN off (the seed's cunn)")
    a("--cudnn-autotune", default="quiet", choices=["quiet", "inline"], help="where cuDNN "
      "times its convolution algorithms (--backend cudnn, not --deterministic): quiet: on a "
      "synthetic batch before the data pipeline starts; inline: on the first real batches, "
      "beside the GPU data path's decode, which can disturb the timings and keep a slow "
      "algorithm for the whole run")
    a("--step-alone", type=int, default=0, metavar="STEPS", help="after the last epoch, "
      "time STEPS train steps (forward, backward, SGD; no all-reduce) on a synthetic batch "
      "through a copy of the model on every rank: what each GPU takes alone, to read the run's "
      "images/s against (a rank far below the others kept slow cuDNN algorithms); printed and "
      "in final.json as step_alone_images_per_s; 0: off")
    a("--deterministic", action="store_true", help="deterministic algorithms, no autotuning "
      "(for tests and exact resumes)")
    a("--log-every", type=int, default=50, help="log line and metrics record every N iterations, "
      "written one interval late so the GPU's queue never runs dry (also where DDP ranks check "
      "for NaN and SIGTERM)")
    a("--keep-checkpoints", type=int, default=0, help="keep only the newest K model_NNN.pt "
      "(0: keep all)")
    a("--bn-stats-sync", default="epoch", choices=["step", "epoch"], help="--parallel ddp: "
      "epoch: rank 0's BatchNorm statistics go to all ranks at each epoch end, before "
      "validation and the checkpoint; step: before every forward too (DDP's default). Both "
      "save and validate rank 0's statistics (a forward in train mode normalises with the "
      "batch's own); epoch saves a collective per step")
    a("--nccl-proto", default="Simple", choices=NCCL_PROTOCOLS, help="NCCL "
      "protocol of the gradient all-reduces (NCCL_PROTO; an NCCL_PROTO in the environment wins): "
      "Simple, the bulk protocol, kept 2 x H200 runs fed by the GPU data path fast where NCCL's "
      "own choice (auto) was 15 %% slower in most runs (bench/NOTES-gpu.md phase 9)")
    add_cuda_connections_flag(p)
    a("--bucket-mb", type=float, default=25.0, help="--parallel ddp: gradient bucket size in "
      "MB (one all-reduce per bucket, overlapped with the backward)")
    a("--grad-allreduce", default="fp32", choices=["fp32", "bf16"], help="--parallel ddp: "
      "dtype the gradients travel in; bf16 halves the bytes of each all-reduce (DDP's "
      "bf16_compress_hook: sum in bf16, then back to fp32 for the optimizer)")
    a("--cuda-graphs", action="store_true", help="capture the training step (forward, "
      "backward, DDP's all-reduces, SGD) in one CUDA graph after 11 eager steps and replay it: "
      "one host call per step instead of hundreds, for a host busy feeding the GPU. Captures "
      "again when the LR or weight decay changes; needs CUDA, --schedule regime or step, no "
      "--compile, --parallel ddp")
    a("--step-sms", type=step_sms_setting, default=0, help="GPU: run the training step on a "
      "CUDA green context of about this many SMs (rounded by the driver, e.g. to 8 on H100/H200), "
      "leaving the rest to DDP's all-reduce kernels and the GPU data path's decode kernels, which "
      "otherwise queue behind the step's; 0: the whole GPU; auto: all but "
      f"{AUTO_FREE_SMS} SMs when training on several GPUs, the whole GPU on one (and where the "
      "driver has no green contexts, which need CUDA 12.4+). Experimental: faster on 2 x H200, "
      "but 2 of 12 such 2-GPU runs there hung in the CUDA driver (bench/NOTES-gpu.md phase 13)")
    a("--profile-steps", type=int, default=0, help="profile this many steps of the first "
      "epoch, after 30 steps (a third of the epoch if shorter), with torch.profiler: "
      "profile_rank{R}.json (Chrome trace) and profile_rank{R}.txt (per host thread: time in "
      "CUDA calls and operators) in --out")
    a("--profile-gpu-only", action="store_true", help="--profile-steps traces the GPU's kernels "
      "and copies only, not the host's operators (which slow the host about twofold): the GPU's "
      "idle time in the table is then an unprofiled run's (GPU only; the CPU traces the host)")
    a("--resume", action="store_true", help="continue from the newest model_NNN.pt in --out "
      "(starts fresh when there is none)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "crop_size", "log_every", "gpu_prefetch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.gil_switch_ms < 0:
        p.error("--gil-switch-ms must be 0 (Python's own) or more")
    if args.step_alone < 0:
        p.error("--step-alone must be 0 (off) or a number of steps")
    if args.cuda_graphs:
        clash = {"--compile": args.compile, "--parallel owt": args.parallel == "owt",
                 "--schedule cosine (a new LR every step)": args.schedule == "cosine",
                 "--device cpu": args.device == "cpu"}
        if any(clash.values()):
            p.error(f"--cuda-graphs does not go with {', '.join(k for k, v in clash.items() if v)}")
    return args


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_backends(args, device):
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.enabled = args.backend == "cudnn"
        torch.backends.cudnn.benchmark = args.backend == "cudnn" and not args.deterministic


def versions(world, device):
    import PIL
    import torchvision
    import webdataset
    v = {"python": platform.python_version(), "torch": torch.__version__,
         "torchvision": torchvision.__version__, "webdataset": webdataset.__version__,
         "pillow": PIL.__version__, "numpy": np.__version__, "cuda": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
         "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
         "host": platform.node(), "world_size": world, "device": str(device)}
    return v


def topk_correct(logits, y):
    """(# top-1 correct, # top-5 correct) as tensors, without a host sync."""
    k = min(5, logits.shape[1])
    hit = logits.topk(k, dim=1).indices.eq(y[:, None])
    return hit[:, 0].sum(), hit.any(dim=1).sum()


def prepare(x, device, mean, std, channels_last):
    if x.is_floating_point():  # the GPU data path: already normalised, on the device
        return x
    x = normalize(x.to(device, non_blocking=True), mean, std)
    return x.contiguous(memory_format=torch.channels_last if channels_last
                        else torch.contiguous_format)


def run_validation(model, loader, device, mean, std, amp_dtype=None, channels_last=False):
    """Loss and top-1/top-5 error (%) over the loader's images; under DDP the sums of all ranks
    (each image once). `model` must be the plain (not DDP-wrapped) module: ranks may see
    different numbers of batches."""
    r = evaluate(model, loader, device, mean, std, amp_dtype=amp_dtype, channels_last=channels_last)
    return {"loss": r["loss"], "top1_err": r["top1_error"], "top5_err": r["top5_error"],
            "count": r["count"]}


class StopFlag:
    """Set by SIGTERM; the training loop stops after the current step."""

    def __init__(self):
        self.set = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no preemption handling
            self.previous = None
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


# the GPU data path's stages in an epoch's record (ms of host time per batch, per rank) and their
# gpu_data.GpuBatchPipeline.stats keys: the fetch thread waiting for the workers, a decode thread
# decoding (of which, with the engine decoder, its timed parts but the header probes, which the
# loader workers do: tools.imagenet.nvjpeg.PARTS, its "decode" named "call" here) and cropping
DATA_PATH_STAGES = {"fetch": "fetch_s", "decode": "decode_s",
                    **{f"decode_{'call' if part == 'decode' else part}": f"engine_{part}_s"
                       for part in nvjpeg.PARTS if part != "probe"},
                    "crop": "augment_s"}


class ProducerClock:
    """Host seconds the GPU data path's threads spent since the last lap (gpu_data.GpuBatchPipeline's
    stats): raw_wait, its fetch thread waiting for the loader workers; decode_busy, its decode
    threads decoding and cropping, per thread. Zero for the CPU loader, which has no such threads."""

    def __init__(self, loader):
        self.stats = getattr(loader, "stats", None)
        self.threads = max(1, getattr(loader, "threads", 1))
        self.last = self._read()

    def _read(self):
        s = self.stats or {}
        return s.get("fetch_s", 0.0), s.get("decode_s", 0.0) + s.get("augment_s", 0.0)

    def lap(self):
        now = self._read()
        (fetch0, busy0), self.last = self.last, now
        return {"raw_wait": now[0] - fetch0, "decode_busy": (now[1] - busy0) / self.threads}

    def per_batch_ms(self):
        """Host ms per batch of each of DATA_PATH_STAGES so far; None without the GPU path's threads."""
        if self.stats is None:
            return None
        batches = max(1, self.stats.get("batches", 0))
        return [1000 * self.stats.get(key, 0.0) / batches for key in DATA_PATH_STAGES.values()]


def train_epoch(epoch, model, optimizer, schedule, loader, device, mean, std, args, rank, world,
                stop, log, train_step, on_step=None, metrics_group=None):
    """One epoch of train_step (eager_step or a GraphedStep); returns the epoch's global train
    numbers or None when interrupted. on_step: called after each step (a profiler's). The log
    lines come one interval late (tools.imagenet.interval_meter), the last ones at the epoch's end."""
    n = len(loader)
    lr = schedule.apply(optimizer, epoch)
    model.train()
    meter = IntervalMeter(device, rank, world, metrics_group)
    total = torch.zeros(4, dtype=torch.float64)
    t_epoch = t_interval = time.perf_counter()
    data_wait, step_host, it_start, steps, seen = 0.0, 0.0, 1, 0, 0
    bar = tqdm(total=n, desc=f"epoch {epoch}", disable=rank != 0, leave=False, file=sys.stderr)

    def report(records):
        """Logs reduced intervals; True when the ranks agreed to stop."""
        stopping = False
        for r in records:
            loss_sum, count = r["loss_sum"], r["count"]
            if not math.isfinite(loss_sum):
                bar.close()
                raise Diverged(f"loss is {loss_sum / count} at epoch {epoch}, iteration {r['iteration']}/{n} "
                               f"(first seen in iterations {r['first']}-{r['iteration']}); the last good "
                               f"checkpoint in {args.out} is untouched: lower the LR")
            total.add_(torch.tensor([loss_sum, r["top1_correct"], r["top5_correct"], count]))
            rec = {"kind": "train", "epoch": epoch, "iteration": r["iteration"], "iterations": n,
                   "loss": loss_sum / count, "top1_err": 100 * (1 - r["top1_correct"] / count),
                   "top5_err": 100 * (1 - r["top5_correct"] / count), "lr": r["lr"],
                   "images_per_s": count / r["elapsed"], "data_share": r["data_share_ranks"][0],
                   # per rank, shares of the interval: a rank that waits on its data stalls
                   # them all at the next collective; the host's time issuing the steps near
                   # the GPU's time in them means the host limits the rate, not the GPU
                   **{f"{name}_ranks": r[f"{name}_ranks"] for name in IntervalMeter.PER_RANK}}
            if rank == 0:
                log.write(rec)
                tqdm.write(format_line(epoch, r["iteration"], n, rec["loss"], rec["top1_err"],
                                       rec["top5_err"], r["lr"], rec["images_per_s"], rec["data_share"]))
            stopping = stopping or r["stopping"]
        return stopping

    producer = ProducerClock(loader)
    t_data = time.perf_counter()
    for it, (x, y) in enumerate(loader, 1):
        data_wait += time.perf_counter() - t_data
        x, y = prepare(x, device, mean, std, args.channels_last), y.to(device, non_blocking=True)
        meter.step_started()
        t_step = time.perf_counter()
        if schedule.per_step:
            lr = schedule.apply(optimizer, epoch, (it - 1) / n)
        logits, loss = train_step(x, y)
        meter.step_ended()
        step_host += time.perf_counter() - t_step
        steps += 1
        top1, top5 = topk_correct(logits.detach(), y)
        meter.add(loss, top1, top5, len(y))
        seen += len(y)
        bar.update()
        # Under DDP the ranks sync only at agreed iterations (a rank entering a collective early
        # would deadlock), so SIGTERM takes effect at a log boundary there (one interval late).
        if it % args.log_every == 0 or it == n or (world == 1 and stop.set):
            # One host-side collective per interval: global metrics, every rank agrees on NaN/stop
            records = meter.close(seen, data_wait, step_host, time.perf_counter() - t_interval,
                                  stop=stop.set, final=it == n or (world == 1 and stop.set),
                                  iteration=it, first=it_start, lr=lr, **producer.lap())
            if report(records):
                report(meter.flush(stop=True))
                bar.close()
                return None
            seen = 0
            t_interval, data_wait, step_host, it_start = time.perf_counter(), 0.0, 0.0, it + 1
        if on_step is not None:
            on_step()
        t_data = time.perf_counter()
    bar.close()
    per_rank = torch.zeros(world, dtype=torch.float64, device=device)
    per_rank[rank] = steps
    loss_sum, c1, c5, count = total.tolist()
    record = {"train_loss": loss_sum / count, "train_top1_err": 100 * (1 - c1 / count),
              "train_top5_err": 100 * (1 - c5 / count), "lr": lr,
              "images_per_s": count / (time.perf_counter() - t_epoch),
              "epoch_time_s": time.perf_counter() - t_epoch,
              "steps_per_rank": [int(s) for s in all_reduce(per_rank).tolist()]}
    stages_ms = producer.per_batch_ms()  # every rank has the same loader kind
    if stages_ms is not None:
        table = torch.zeros(len(DATA_PATH_STAGES), world, dtype=torch.float64, device=device)
        table[:, rank] = torch.tensor(stages_ms, dtype=torch.float64)
        record["data_path_ms_per_batch"] = {name: [round(v, 3) for v in row] for name, row in
                                            zip(DATA_PATH_STAGES, all_reduce(table).tolist())}
    return record


def sync_buffers(model):
    """Give every rank rank 0's BN statistics, so the ranks validate the same (saved) model."""
    if dist.is_available() and dist.is_initialized():
        for b in model.buffers():
            dist.broadcast(b, 0)


def parallelize(raw, args, world, device):
    """(the module the training step calls, a plain module on `device` to validate).

    Validation needs a module without collectives: ranks see different numbers of val batches."""
    if args.parallel == "owt" and world > 1:
        val_model = copy.deepcopy(raw).to(device)  # gets the gathered weights before validating
        if args.compile:
            raw.features.compile()  # the trunk only: owt's collectives stay outside the graph
        try:
            # The GPU data path may drop an undecodable image, so local batches can differ.
            even = not (device.type == "cuda" and args.decode != "cpu")
            return wrap_owt(raw, device=device, even_batches=even), val_model
        except ValueError as exc:
            raise SystemExit(f"error: --parallel owt: {exc}; use --parallel ddp") from None
    raw.to(device)
    fwd = torch.compile(raw) if args.compile else raw
    if world == 1:
        return fwd, fwd
    # gradient_as_bucket_view: the .grad tensors are the all-reduce buckets, no copy in and out
    ddp = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None,
              broadcast_buffers=args.bn_stats_sync == "step", bucket_cap_mb=args.bucket_mb,
              gradient_as_bucket_view=True)
    if args.grad_allreduce == "bf16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return ddp, fwd


def decoder_pools(first, device):
    """(train pool, validation pool) of GPU decoders, `first` in the train pool. The decode threads
    of every epoch share the train pool's decoders, validation's those of its own: each decoder then
    sees one batch size (a short last batch is padded up to it, tools.imagenet.nvjpeg.PAD_SIDE), so
    none sizes its buffers again mid-run, which waits for the whole GPU (bench/NOTES-gpu.md
    phases 14 and 16), nor pads every batch of the smaller of two sizes."""
    pools = gpu_data.DecoderPool(), gpu_data.DecoderPool()
    pools[0].give(first.kind, device, first)
    return pools


def plain_state(model, raw, optimizer):
    """(model, optimizer) state_dicts in the plain model's layout, with every rank holding rank
    0's BatchNorm statistics. Collective: every rank calls it."""
    if isinstance(model, OWTModel):
        return model.full_state_dict(), model.full_optimizer_state(optimizer)
    sync_buffers(raw)
    return raw.state_dict(), optimizer.state_dict()


def load_optimizer(model, optimizer, state, kernel):
    if isinstance(model, OWTModel):
        model.load_full_optimizer_state(optimizer, state)
    else:
        optimizer.load_state_dict(state)
    # load_state_dict takes the saved run's fused/foreach flags too: keep this run's choice
    for group in optimizer.param_groups:
        group.update(sgd_flags(kernel))


def checkpoint_dict(model_state, optimizer_state, schedule, args, manifest, mean, std, epoch,
                    metrics):
    return {"model": model_state, "arch": args.arch,
            "num_classes": manifest["num_classes"], "classes": manifest["classes"],
            "mean": list(mean), "std": list(std), "crop_size": args.crop_size,
            "resize_size": manifest.get("resize_size", args.resize_size), "epoch": epoch,
            "optimizer": optimizer_state, "scheduler": schedule.state_dict(),
            "rng": ckpt.rng_state(), "settings": settings_of(args), "metrics": metrics}


def settings_of(args):
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def train(args, rank, world, device, stop):
    """The training run; returns the process exit code."""
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} does not divide over {world} ranks")
    manifest = read_manifest(args.shards, "train")
    read_manifest(args.shards, "val")
    if args.normalize == "manifest":
        if "mean" not in manifest or "std" not in manifest:
            raise SystemExit(f"error: {args.shards / 'train.json'} has no mean/std; rerun the "
                             f"shard stage or pass --normalize imagenet")
        mean, std = manifest["mean"], manifest["std"]
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    configure_backends(args, device)
    seed_all(args.seed)  # identical initial weights on every rank
    # On the CPU: under owt only this rank's slice of the classifier goes to the device.
    raw = build_model(args.arch, manifest["num_classes"], args.init)
    if args.parallel == "owt" and not all(hasattr(raw, a) for a in ("features", "classifier")):
        raise SystemExit(f"error: --parallel owt splits a model's .classifier (alexnet, alexnetowt, "
                         f"alexnetowtbn, overfeat); {args.arch} has none: use --parallel ddp")
    if args.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    schedule = Schedule(args.schedule, lr=args.lr, weight_decay=args.weight_decay,
                        step_epochs=args.lr_step_epochs, gamma=args.lr_gamma,
                        warmup_epochs=args.warmup_epochs, epochs=args.epochs,
                        global_batch=args.batch_size, scaling=args.lr_scaling)

    out, log = args.out, MetricsLog(args.out / "metrics.jsonl")
    found = ckpt.latest(out)
    if world > 1:  # rank 0 decides, so all ranks resume from the same epoch (--out must be shared)
        box = [found]
        dist.broadcast_object_list(box, src=0)
        found = box[0]
    if found is not None and not args.resume:
        raise SystemExit(f"error: {out} already holds checkpoints ({found.name}); pass --resume "
                         f"to continue or choose another --out")
    start, state = 1, None
    if args.resume and found is not None:
        state = ckpt.load(found)
        raw.load_state_dict(state["model"])  # the plain layout, whichever mode saved it
    amp_dtype = autocast_dtype(args.amp, device)
    local_batch = args.batch_size // world
    decode = resolve_decode(args.decode) if device.type == "cuda" or args.decode != "auto" else "cpu"
    # the GPU data path hands over batches in the autocast dtype, the CPU path in float32
    input_dtype = (amp_dtype or torch.float32) if decode == "gpu" else torch.float32
    if args.cudnn_autotune == "quiet" and cudnn_searches(device):
        seconds = search_quietly(raw, device, local_batch, args.val_batch_size or local_batch,
                                 args.crop_size, input_dtype, amp_dtype, args.channels_last)
        if rank == 0:
            print(f"cuDNN algorithms chosen on a quiet GPU in {seconds:.1f} s", flush=True)
    model, val_model = parallelize(raw, args, world, device)
    # After wrapping: under owt the optimizer holds this rank's classifier slices.
    optimizer = sgd(model.parameters(), lr=args.lr, momentum=args.momentum, kernel=args.sgd_kernel)
    if state is not None:
        load_optimizer(model, optimizer, state["optimizer"], args.sgd_kernel)
        # The schedule comes from the command line (e.g. --epochs raised to train longer); the
        # RNG needs no restore: every epoch reseeds from (seed, epoch, rank).
        if state["scheduler"] != schedule.state_dict() and rank == 0:
            print(f"note: the schedule differs from the checkpoint's ({state['scheduler']}); "
                  f"continuing with the command line's ({schedule.state_dict()})", flush=True)
        start = state["epoch"] + 1
        if rank == 0:
            print(f"resuming from {found} (epoch {state['epoch']}, saved under --parallel "
                  f"{state['settings'].get('parallel', 'ddp')})", flush=True)
        del state
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        log.truncate(start - 1)
        fsutil.write_json_atomic(out / "settings.json", {"settings": settings_of(args),
                                                         "versions": versions(world, device)})

    bad_log = gpu_data.failure_log(out / "bad_samples.tsv", rank=rank)
    # the first GPU decoder is made here so that a missing hardware decoder fails now, not in a
    # loader thread
    decoder, decoders, val_decoders = None, None, None
    if decode == "gpu":
        first = gpu_data.gpu_decoder(args.gpu_decoder, device)
        decoder = first.kind
        if device.type == "cuda":  # (on a CPU the pipeline decodes without a decoder object)
            decoders, val_decoders = decoder_pools(first, device)
    val = val_loader(args.shards, args.val_batch_size or local_batch, rank, world, args.workers,
                     args.crop_size, decode=decode, pin_raw=args.pin_raw)
    if decode == "gpu":
        val = gpu_data.val_pipeline(val, device, args.crop_size, mean, std, on_failure=bad_log,
                                    decoder=decoder, pool=val_decoders)
    n = batches_per_epoch(manifest["num_samples"], args.batch_size, args.epoch_size)
    if rank == 0:
        print(f"{args.arch}: {world} rank(s) on {device.type} ({args.parallel}), global batch "
              f"{args.batch_size}, {n} iterations/epoch, epochs {start}-{args.epochs}, decode "
              f"{decode}{f' ({decoder})' if decoder and device.type == 'cuda' else ''}", flush=True)

    if args.cuda_graphs:
        if device.type != "cuda":
            raise SystemExit("error: --cuda-graphs needs a CUDA GPU")
        train_step = GraphedStep(model, optimizer, amp_dtype, local_batch)
    else:
        train_step = eager_step(model, optimizer, amp_dtype, device)
    metrics, metrics_group = None, host_group(device)
    for epoch in range(start, args.epochs + 1):
        seed_all(args.seed * 100003 + epoch * 1009 + rank)  # dropout etc.: depends on epoch only
        loader = train_loader(args.shards, args.batch_size, epoch, args.seed, rank, world,
                              args.workers, args.crop_size, args.aug, args.shuffle_buffer,
                              args.epoch_size, decode=decode, cpu_fraction=args.cpu_fraction,
                              pin_raw=args.pin_raw)
        if decode == "gpu":  # crops seeded by seed, epoch and rank, like the CPU workers' crops
            aug = gpu_data.GpuAugment(args.crop_size, mode=args.aug, mean=mean, std=std,
                                      dtype=amp_dtype or torch.float32,
                                      seed=args.seed * 100003 + epoch * 1009 + rank,
                                      channels_last=args.channels_last)
            loader = gpu_data.GpuBatchPipeline(loader, aug, device, threads=args.decode_threads,
                                               prefetch=args.gpu_prefetch,
                                               on_failure=bad_log, decoder=decoder, pool=decoders)
        # the window skips the warm-up (cuDNN autotuning) where the epoch is long enough
        profiler = StepProfiler(out, rank, args.profile_steps if epoch == start else 0,
                                skip=min(30, n // 3), gpu_only=args.profile_gpu_only)
        train_metrics = train_epoch(epoch, model, optimizer, schedule, loader, device, mean, std,
                                    args, rank, world, stop, log, train_step, on_step=profiler.step,
                                    metrics_group=metrics_group)
        profiler.close()
        if train_metrics is None:
            if rank == 0:
                print(f"interrupted in epoch {epoch}; resume with --resume (restarts epoch "
                      f"{epoch})", file=sys.stderr, flush=True)
            return INTERRUPTED
        model_state, optimizer_state = plain_state(model, raw, optimizer)
        if isinstance(model, OWTModel):
            val_model.load_state_dict(model_state)
        v = run_validation(val_model, val, device, mean, std, amp_dtype, args.channels_last)
        counts = torch.zeros(world, dtype=torch.float64, device=device)
        counts[rank] = val.num_samples
        metrics = {"kind": "epoch", "epoch": epoch, **train_metrics, "val_loss": v["loss"],
                   "val_top1_err": v["top1_err"], "val_top5_err": v["top5_err"],
                   "val_count": v["count"],
                   "val_count_per_rank": [int(c) for c in all_reduce(counts).tolist()]}
        if rank == 0:
            path = ckpt.checkpoint_path(out, epoch)
            ckpt.save(path, checkpoint_dict(model_state, optimizer_state, schedule, args, manifest,
                                            mean, std, epoch, metrics))
            ckpt.prune(out, args.keep_checkpoints)
            log.write(metrics)
            write_epoch_logs(out, log.records())
            plot_curves(out / "curves.png", log.records())
            if args.cuda_graphs:
                print(f"cuda graphs: {train_step.replays} steps replayed, {train_step.captures} "
                      f"capture(s) so far", flush=True)
            print(f"epoch {epoch}: train loss {metrics['train_loss']:.4f} top1-err "
                  f"{metrics['train_top1_err']:.2f}% | val loss {v['loss']:.4f} top1-err "
                  f"{v['top1_err']:.2f}% top5-err {v['top5_err']:.2f}% ({v['count']} images) "
                  f"| {metrics['images_per_s']:,.0f} img/s", flush=True)

    alone = None
    if args.step_alone:
        rates = torch.zeros(world, dtype=torch.float64, device=device)
        rates[rank] = synthetic_step_rate(val_model if isinstance(model, OWTModel) else raw, device,
                                          local_batch, args.crop_size, input_dtype, amp_dtype,
                                          args.channels_last, steps=args.step_alone,
                                          sgd_kernel=args.sgd_kernel)
        alone = [round(r) for r in all_reduce(rates).tolist()]
        if rank == 0:
            print(f"train step alone (synthetic batches, no all-reduce), images/s per rank: "
                  f"{', '.join(f'{r:,}' for r in alone)}", flush=True)
    if rank == 0:
        last = ckpt.latest(out)
        if metrics is None and last is not None:  # resumed a finished run
            metrics = ckpt.load(last)["metrics"]
        fsutil.write_json_atomic(out / "final.json", {**(metrics or {}), "checkpoint": str(last),
                                                      "curves": str(out / "curves.png"),
                                                      **({"step_alone_images_per_s": alone} if alone else {})})
        if metrics:
            print(f"final val top-1 error {metrics['val_top1_err']:.2f}%, top-5 error "
                  f"{metrics['val_top5_err']:.2f}% (epoch {metrics['epoch']}); curves: "
                  f"{out / 'curves.png'}", flush=True)
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.cuda_graphs:
        before_process_group()
    if args.device != "cpu":
        nccl_protocol(args.nccl_proto)
        cuda_connections(args.cuda_connections)
    rank, world, device = setup(args.device)
    turn = nvjpeg.use_turn(args.engine_turn)
    switch = sys.getswitchinterval()
    if args.gil_switch_ms:
        sys.setswitchinterval(args.gil_switch_ms / 1000)
    try:
        with StopFlag() as stop, work_stream(device, args.step_sms, world):
            return train(args, rank, world, device, stop)
    except Diverged as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        sys.setswitchinterval(switch)
        nvjpeg.use_turn(turn)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
