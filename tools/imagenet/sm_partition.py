"""A CUDA stream whose kernels run on a subset of the GPU's SMs (a CUDA green context), so that
the rest stay free for other work of the process: the GPU data path's decode kernels, which
otherwise queue behind every kernel of the training step.

    from tools.imagenet.sm_partition import partitioned_stream
    stream, sms, total = partitioned_stream("cuda:0", 124)     # the step on 124 of 132 SMs
    with torch.cuda.stream(stream):
        train()

Driver API through ctypes (libcuda, CUDA 12.4+ drivers), no cuda-python needed.
"""
import ctypes

import torch

_TYPE_SM = 1
_GREEN_CTX_DEFAULT_STREAM = 0x1
_STREAM_NON_BLOCKING = 0x1
_KEEP = []  # green contexts live as long as the process: streams made from them outlive callers


class _DevResource(ctypes.Structure):
    # CUdevResource (cuda.h, RESOURCE_ABI_VERSION 1): type, 92 bytes of padding, a 48-byte union
    # whose SM member starts with smCount, minSmPartitionSize, smCoscheduledAlignment
    _fields_ = [("type", ctypes.c_int), ("_padding", ctypes.c_ubyte * 92), ("sm_count", ctypes.c_uint),
                ("min_partition", ctypes.c_uint), ("alignment", ctypes.c_uint),
                ("_rest", ctypes.c_ubyte * 36)]


def _driver():
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise RuntimeError(f"libcuda not found: {exc}") from exc


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"{what} failed: CUresult {status}")


def partitioned_stream(device, num_sms):
    """(stream, SMs it got, SMs of the GPU): a torch stream of a green context limited to about
    num_sms SMs (rounded by the driver to the GPU's partition granularity, e.g. 8 on H100/H200).
    Raises RuntimeError where the driver cannot (old driver, no CUDA)."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.empty(1, device=f"cuda:{index}")  # the primary context first (the green one derives from it)
    cu = _driver()
    dev = ctypes.c_int()
    _check(cu.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
    whole, part, rest = _DevResource(), (_DevResource * 1)(), _DevResource()
    try:
        _check(cu.cuDeviceGetDevResource(dev, ctypes.byref(whole), _TYPE_SM), "cuDeviceGetDevResource")
    except AttributeError as exc:
        raise RuntimeError("this CUDA driver has no green contexts (needs 12.4+)") from exc
    groups = ctypes.c_uint(1)
    _check(cu.cuDevSmResourceSplitByCount(part, ctypes.byref(groups), ctypes.byref(whole), ctypes.byref(rest),
                                          0, ctypes.c_uint(num_sms)), "cuDevSmResourceSplitByCount")
    desc, ctx, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    _check(cu.cuDevResourceGenerateDesc(ctypes.byref(desc), part, 1), "cuDevResourceGenerateDesc")
    _check(cu.cuGreenCtxCreate(ctypes.byref(ctx), desc, dev, _GREEN_CTX_DEFAULT_STREAM), "cuGreenCtxCreate")
    _check(cu.cuGreenCtxStreamCreate(ctypes.byref(stream), ctx, _STREAM_NON_BLOCKING, 0),
           "cuGreenCtxStreamCreate")
    _KEEP.append(ctx)
    return torch.cuda.ExternalStream(stream.value, device=f"cuda:{index}"), part[0].sm_count, whole.sm_count
