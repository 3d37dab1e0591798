"""The torchrun environment, shared by train and evaluate: one process per GPU (NCCL), or CPU
processes (gloo) where there is no GPU."""
import argparse
import contextlib
import os
import sys

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


NCCL_PROTOCOLS = ("Simple", "LL", "LL128", "auto")  # NCCL_PROTO's values, auto: NCCL's own choice


def nccl_protocol(proto, environ=os.environ):
    """Sets NCCL_PROTO to `proto` for the process group made next, unless the environment names
    one already (it wins) or proto is "auto" (NCCL picks per message size); returns what is in
    effect ("auto" where unset). Simple is NCCL's bulk protocol: on 2 x H200 beside the GPU data
    path, AlexNet-BN trained at 36.4-41.3k img/s with it against 32.4-38.6k with NCCL's own
    choice (5 runs each, interleaved, two machines; bench/NOTES-gpu.md phase 9)."""
    if proto != "auto":
        environ.setdefault("NCCL_PROTO", proto)
    return environ.get("NCCL_PROTO", "auto")


# The GPU's hardware work queues (CUDA_DEVICE_MAX_CONNECTIONS; the driver's default 8, at most 32).
# A process's streams share them, and a kernel waits behind everything queued before it on its
# queue, whatever its stream. nvJPEG's hardware decode runs small kernels per image on ~28 streams
# of its own, which with 8 queues wait behind the training step's kernels: on 1 x H200 its decode
# call beside back-to-back matmuls took 120 ms per batch of 256 with 8 queues and 27 with 32, and
# AlexNet-BN fed by the GPU data path trained at 22.1k (1 GPU) and 39.3k img/s (2 GPUs, DDP) with 32
# against 19.4k and 30.1k with 8 (medians of 3 and 5 runs on 2 x H200 hosts, bench/NOTES-gpu.md
# phase 21).
CUDA_CONNECTIONS = 32


def _connection_count(text):
    count = int(text)
    if not 0 <= count <= 32:
        raise argparse.ArgumentTypeError(f"{count}: give 1 to 32, or 0 for the driver's own (8)")
    return count


def add_cuda_connections_flag(parser):
    """--cuda-connections, for every tool and bench that runs on a GPU (then call cuda_connections
    with its value before the first CUDA call)."""
    parser.add_argument("--cuda-connections", type=_connection_count, default=CUDA_CONNECTIONS,
                        help="GPUs: hardware work queues the process's CUDA streams share "
                        "(CUDA_DEVICE_MAX_CONNECTIONS, 1-32; 0: the driver's own, 8; one in the "
                        "environment wins). Work waits behind all work queued before it on its "
                        "queue: with 8, nvJPEG's small per-image kernels wait behind the model's; "
                        "32 made AlexNet-BN fed by the GPU data path train at 22.1k/39.3k img/s on "
                        "1/2 x H200 against 19.4k/30.1k (bench/NOTES-gpu.md phase 21)")


def cuda_connections(count, environ=os.environ):
    """Sets CUDA_DEVICE_MAX_CONNECTIONS to `count` for the CUDA context made next (so before the
    process first touches the GPU), unless the environment names a count already (it wins) or
    count is 0 (the driver's own, 8); returns what is in effect (0 where unset). Where the
    context exists already it is too late: said, and left alone."""
    if not 0 <= count <= 32:
        raise ValueError(f"CUDA connections {count}: give 1 to 32, or 0 for the driver's own")
    if count and "CUDA_DEVICE_MAX_CONNECTIONS" not in environ:
        if environ is os.environ and torch.cuda.is_initialized():
            print(f"warning: CUDA is already initialised, CUDA_DEVICE_MAX_CONNECTIONS={count} "
                  "would not take effect; left unset", file=sys.stderr, flush=True)
            return 0
        environ["CUDA_DEVICE_MAX_CONNECTIONS"] = str(count)
    return int(environ.get("CUDA_DEVICE_MAX_CONNECTIONS", 0))


AUTO_FREE_SMS = 12  # SMs --step-sms auto keeps off a multi-GPU step (a green context's size goes by 8)


def step_sms_for(setting, world, total_sms):
    """The SMs the training step gets (0: the whole GPU) for --step-sms `setting`: a number as it
    is; "auto": in a run of several GPU processes all but AUTO_FREE_SMS of the GPU's total_sms,
    rounded down to the 8 SMs green contexts are cut in, and the whole GPU in a 1-GPU run.

    Why: DDP's all-reduce kernels (and the data path's decode kernels) queue behind the backward's
    kernels when those fill every SM, and the ranks then wait on each other. Experimental: faster
    on 2 x H200, but some such runs hung inside the CUDA driver (figures: bench/NOTES-gpu.md
    phase 13). On one GPU it changed nothing, and a compute-bound model would only lose the SMs."""
    if setting != "auto":
        return int(setting)
    if world < 2:
        return 0
    return max(8, (total_sms - AUTO_FREE_SMS) // 8 * 8)


def work_stream(device, sms=0, world=1):
    """Context for a process's GPU work: a CUDA stream of its own, not PyTorch's default stream.

    The default (legacy NULL) stream is implicitly synchronised with every blocking stream of the
    process, and libnvjpeg (the GPU data path's decoders) works on blocking streams of its own: on
    the default stream, the training step and the decode wait on each other. On a side stream the
    H200 bench fed AlexNet-BN 19.3k / 18.9k img/s against 16.8k / 14.6k (bench/NOTES-gpu.md).
    sms: a number > 0 or "auto" (step_sms_for): the stream of a CUDA green context on about that
    many SMs (tools.imagenet.sm_partition), so NCCL's and the data path's kernels find SMs free
    beside the step. "auto" falls back to the whole GPU where the driver has no green contexts."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    count = sms and step_sms_for(sms, world, torch.cuda.get_device_properties(device).multi_processor_count)
    if count:
        from tools.imagenet.sm_partition import partitioned_stream
        try:
            stream, got, total = partitioned_stream(device, count)
        except RuntimeError as exc:
            if sms != "auto":
                raise
            print(f"work stream: the whole GPU ({exc})", flush=True)
        else:
            print(f"work stream: {got} of the GPU's {total} SMs, the rest left to NCCL and the data path",
                  flush=True)
            return torch.cuda.stream(stream)
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
