"""The torchrun environment, shared by train and evaluate: one process per GPU (NCCL), or CPU
processes (gloo) where there is no GPU."""
import contextlib
import os

import torch
import torch.distributed as dist


def setup(device_name="auto"):
    """(rank, world_size, device) from torchrun's variables; joins the process group when
    WORLD_SIZE > 1. device_name: auto (cuda if available), cuda or cpu."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but torch sees no CUDA GPU: use --device cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        kw = {"device_id": device} if use_cuda else {}
        dist.init_process_group("nccl" if use_cuda else "gloo", **kw)
    return rank, world, device


def parse_cpulist(text):
    """'0-3,8,10-11' (Linux cpulist format) -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus = []
    for part in text.strip().split(","):
        if part:
            low, _, high = part.partition("-")
            cpus += range(int(low), int(high or low) + 1)
    return cpus


def gpu_local_cpus(index):
    """The CPUs on GPU `index`'s NUMA node (from sysfs), or None where that is not known."""
    try:
        p = torch.cuda.get_device_properties(index)
        path = f"/sys/bus/pci/devices/{p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0/local_cpulist"
        with open(path) as f:
            return set(parse_cpulist(f.read()))
    except (AttributeError, OSError, ValueError, RuntimeError):
        return None


def rank_cpus(allowed, local_rank, local_world, near=None):
    """This rank's share of the `allowed` CPUs: one contiguous block per local rank (all of them
    used: the loader workers need the cores), each rank taking, in rank order, the free block with
    the most CPUs near its GPU (`near[r]`: a set, or None where unknown)."""
    allowed = sorted(allowed)
    size = len(allowed) // local_world
    if size == 0:
        return allowed
    blocks = [allowed[i * size:(i + 1) * size] for i in range(local_world)]
    blocks[-1] += allowed[local_world * size:]
    free = list(range(local_world))
    for r in range(local_rank + 1):
        local = (near[r] if near else None) or set()
        best = max(free, key=lambda b: (len(local.intersection(blocks[b])), -b))
        free.remove(best)
    return blocks[best]


def bind_cpus(device, mode="auto"):
    """auto: with several GPU ranks on this node (torchrun), pin this process, its threads and its
    future loader workers to this rank's share of the CPUs (rank_cpus), so ranks do not take each
    other's cores. Returns the CPUs, or None when nothing was pinned."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if mode == "none" or device.type != "cuda" or local_world < 2 or not hasattr(os, "sched_setaffinity"):
        return None
    near = [gpu_local_cpus(i) for i in range(local_world)]
    cpus = rank_cpus(os.sched_getaffinity(0), device.index or 0, local_world, near)
    for tid in os.listdir("/proc/self/task"):  # threads already started (CUDA's, torch's) too
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that ended meanwhile
            pass
    return cpus


def work_stream(device):
    """Context for a process's GPU work: a CUDA stream of its own, not PyTorch's default stream.

    The default (legacy NULL) stream is implicitly synchronised with every blocking stream of the
    process, and libnvjpeg (the GPU data path's decoders) works on blocking streams of its own: on
    the default stream, the training step and the decode wait on each other. On a side stream the
    H200 bench fed AlexNet-BN 19.3k / 18.9k img/s against 16.8k / 14.6k (bench/NOTES-gpu.md)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.Stream(device))


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
