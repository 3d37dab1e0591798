"""The torchrun environment, shared by train and evaluate: one process per GPU (NCCL), or CPU
processes (gloo) where there is no GPU."""
import contextlib
import os

import torch
import torch.distributed as dist


def split_cpus(allowed, local_rank, local_world):
    """This rank's share of the CPUs `allowed`: contiguous, equal shares (the remainder unused);
    all of them when there is less than one CPU per rank."""
    cpus = sorted(allowed)
    share = len(cpus) // max(local_world, 1)
    return cpus[local_rank * share:(local_rank + 1) * share] if share else cpus


def pin_cpus():
    """Keep this rank (and the threads and loader processes it starts from now on) on its share
    of the CPUs the job may use: one GPU's ranks then never preempt another's training thread
    and decode threads. Returns the CPUs (None where the OS has no affinity call)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    mine = split_cpus(os.sched_getaffinity(0), int(os.environ.get("LOCAL_RANK", 0)),
                      int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    os.sched_setaffinity(0, mine)
    return mine


def setup(device_name="auto", high_priority=False):
    """(rank, world_size, device) from torchrun's variables; joins the process group when
    WORLD_SIZE > 1. device_name: auto (cuda if available), cuda or cpu. high_priority: NCCL's
    collectives on a high-priority CUDA stream."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but torch sees no CUDA GPU: use --device cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        kw = {"device_id": device} if use_cuda else {}
        if use_cuda and high_priority:
            kw["pg_options"] = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
        dist.init_process_group("nccl" if use_cuda else "gloo", **kw)
    return rank, world, device


def work_stream(device, priority=0):
    """Context for a process's GPU work: a CUDA stream of its own, not PyTorch's default stream.

    The default (legacy NULL) stream is implicitly synchronised with every blocking stream of the
    process, and libnvjpeg (the GPU data path's decoders) works on blocking streams of its own: on
    the default stream, the training step and the decode wait on each other. On a side stream the
    H200 bench fed AlexNet-BN 19.3k / 18.9k img/s against 16.8k / 14.6k (bench/NOTES-gpu.md).
    priority -1: the GPU schedules this stream's kernels before those of normal streams (the data
    path's)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.Stream(device, priority=priority))


def all_reduce(t):
    """Sum over the ranks in place (a no-op in a single process); returns t."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(name, device):
    """The autocast dtype for a setting: autocast on GPUs only (on the CPU it is slow and changes
    the numbers for no gain), so CPU runs and CPU evaluations compute alike."""
    return AMP_DTYPES[name] if device.type == "cuda" else None
