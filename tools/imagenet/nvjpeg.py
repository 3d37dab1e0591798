"""Batched JPEG decode on the GPU's hardware JPEG engines through libnvjpeg itself (ctypes).

    from tools.imagenet.nvjpeg import NvjpegDecoder
    decode = NvjpegDecoder("cuda")                     # one per decode thread
    images = decode(list_of_uint8_cpu_tensors)         # 3 x H x W uint8 views, None = not decodable here
    flat, ok, sizes, starts = decode.decode_packed(data, offsets)   # the same from a packed batch

Why not torchvision's decode_jpeg(list, device="cuda"), which drives the same engines (nvJPEG's
hardware backend on A100/H100/H200): it holds a process-wide lock for the whole batch, on its own
stream, and waits on the host for the batch to finish; and a list of tensors in and out costs a few
Python-level operations per image, each of which gives up the GIL and waits to get it back from the
training loop (bench/NOTES-gpu.md, phase 4). Here each decoder has its own nvJPEG state, takes a
packed batch (one buffer, offsets) and returns one buffer plus numpy arrays, orders its work with
the caller's stream and returns without waiting for the GPU; the decoders of a process take turns
only for the call that hands a batch to the engines (phase 5: two at once hung in it). nvJPEG's
internal streams are blocking streams: keep the work that consumes the images off PyTorch's default
stream (tools.imagenet.distributed.work_stream), or the two wait on each other.

The whole batch lands in one device buffer (planar RGB, image after image); each image is a view of
it. Images the batched hardware decode does not take (progressive, CMYK, 12-bit, not a JPEG ...)
come back as None (not ok): gpu_data.decode_jpegs / decode_packed decode those on the CPU.
"""
import collections
import contextlib
import ctypes
import functools
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

_BACKEND_HARDWARE = 3
# nvjpegOutputFormat_t values this decoder can ask for. Training uses planar RGB. The others are
# for bench/probe_engine.py --outputs, which asks whether the decode call still waits for the SMs
# when the engines' output needs no conversion kernel: planar YUV (the chroma planes subsampled as
# the JPEG is; each plane gets a full h x w of space, pitch w) and interleaved RGB (one plane,
# pitch 3w). Their pixels are not what the crop expects.
OUTPUTS = {"rgb": 3, "yuv": 1, "rgbi": 5}
_STATUS_ARCH_MISMATCH = 8
_MAX_COMPONENT = 4
_DECODE_LOCK = threading.Lock()
# nvJPEG sizes the engines' buffers for the largest image (either side), the largest bitstream and
# the most images of any batch so far: a batch beyond any of those makes it free and reallocate
# them inside the decode call, and cuMemFree waits for all of the GPU's work, a rank's NCCL
# all-reduce included, which waits for the other rank (a 2-GPU run hung there: bench/NOTES-gpu.md
# phase 14, bench/probe_sync.py). So each decoder sizes them once, on its first batch, for that
# many images of MAX_SIDE x MAX_SIDE and MAX_BYTES each, and leaves larger images (aspect over 3:1
# at the prepared 256 short side, or over 256 kB: none of the prepared ImageNet's) to the CPU.
MAX_SIDE = 768
MAX_BYTES = 256 * 1024
# A batch with fewer engine images than the buffers were sized for (an epoch's or validation's last
# batch, images left to the CPU) is padded up to that count with PAD_SIDE x PAD_SIDE JPEGs of a few
# kB decoded into a scratch buffer: nvjpegDecodeBatchedInitialize then runs once per decoder, never
# with a new count mid-run, as a decoder kept across pipelines (gpu_data.DecoderPool) would
# otherwise do after validation's short last batch (a 2-GPU run with the pool hung: phase 16).
PAD_SIDE = 256  # the prepared images' size, which the engines take
# the parts of decode_packed's host time, in order, kept in NvjpegDecoder.seconds: header probes,
# the pinned copy, the call's set-up in Python and numpy, waiting for the other decoders' turn at
# the decode call, the call with the turn held (it runs without the GIL; with a Python lock it
# ends when this thread has the GIL back, with the native turn it is timed in C), and from giving
# the turn up to running on (the GIL again, if another thread took it meanwhile). "decode" x batches per second is the share of time a process's turn is held:
# near 1, the engines of that process are fed as fast as one turn at a time allows.
PARTS = ("probe", "copy", "setup", "lock", "decode", "after")
# the ways a decoder takes the process's one turn at the decode call: a Python lock (the thread
# back from the call keeps the turn until it has the GIL again), a mutex taken and given up in the
# same native call as the decode (tools.imagenet.engine_turn, experimental), or none (probes only)
TURNS = ("lock", "native", "free")
PROCESS_TURNS = TURNS[:2]  # the kinds a process's decoders can be set to take (use_turn)
_PROCESS_TURN = ["lock"]  # what decoders made without a turn of their own take (use_turn)


def use_turn(kind):
    """Makes `kind` (PROCESS_TURNS: lock or native) the turn this process's decoders take from now on
    (tools.train --engine-turn); a process's decoders must all take the same kind. Returns the
    kind it replaces."""
    if kind not in PROCESS_TURNS:
        raise ValueError(f"engine turn {kind!r}: give lock or native")
    before, _PROCESS_TURN[0] = _PROCESS_TURN[0], kind
    return before


_LIB_NAMES = ("libnvjpeg.so.13", "libnvjpeg.so.12", "libnvjpeg.so.11", "libnvjpeg.so")


def _loaded_nvjpeg():
    """Path of a libnvjpeg this process already has (torchvision's image extension links it)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "libnvjpeg.so" in os.path.basename(path):
                    return path
    except OSError:
        pass
    return None


def _candidates():
    try:  # loading torchvision's image extension brings in the libnvjpeg it was built against
        import torchvision.io.image  # noqa: F401
    except Exception:  # noqa: BLE001
        pass
    loaded = _loaded_nvjpeg()
    if loaded:
        yield loaded
    for entry in sys.path:  # the nvidia-* CUDA wheels
        for sub in ("nvidia/nvjpeg/lib", "nvidia/cu13/lib", "nvidia/cu12/lib"):
            for name in _LIB_NAMES:
                path = Path(entry or ".") / sub / name
                if path.exists():
                    yield str(path)
    yield from _LIB_NAMES  # the loader's search path (LD_LIBRARY_PATH, /usr/local/cuda/lib64 ...)


def load_library():
    """(GIL-releasing handle, GIL-keeping handle) to libnvjpeg; raises RuntimeError if none loads.

    Two handles: the batch decode runs with the GIL released (ctypes.CDLL) so that the training
    loop's Python goes on; the per-image header calls (microseconds) keep it (ctypes.PyDLL), as
    releasing and retaking the GIL 500 times a batch would queue this thread behind the others."""
    errors = []
    for name in _candidates():
        try:
            return ctypes.CDLL(name), ctypes.PyDLL(name)
        except OSError as exc:
            errors.append(f"{name}: {exc}")
    raise RuntimeError("libnvjpeg not found (it ships with CUDA and the nvidia-nvjpeg wheels): "
                       + "; ".join(errors[-3:]))


def _declare(lib):
    p, i, u = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint
    pp, ip = ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int)
    sig = {
        "nvjpegCreateEx": [i, p, p, u, pp],
        "nvjpegJpegStateCreate": [p, pp],
        "nvjpegJpegStreamCreate": [p, pp],
        "nvjpegGetImageInfo": [p, p, ctypes.c_size_t, ip, ip, ip, ip],
        "nvjpegJpegStreamParseHeader": [p, p, ctypes.c_size_t, p],
        "nvjpegDecodeBatchedSupported": [p, p, ip],
        "nvjpegDecodeBatchedInitialize": [p, p, i, i, i],
        "nvjpegDecodeBatched": [p, p, p, p, p, p],
        "nvjpegJpegStateDestroy": [p],
        "nvjpegJpegStreamDestroy": [p],
        "nvjpegDestroy": [p],
    }
    for name, args in sig.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int


@functools.lru_cache(maxsize=4)
def _reserve_jpeg(side, nbytes):
    """A side x side baseline JPEG of at least nbytes: random pixels in enough rows, flat below."""
    from torchvision.io import encode_jpeg
    pixels = torch.full((3, side, side), 128, dtype=torch.uint8)
    noise = torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows = max(8, nbytes // side // 2)
    while True:
        pixels[:, :rows] = noise[:, :rows]
        blob = encode_jpeg(pixels, quality=95).numpy().tobytes()
        if len(blob) >= nbytes or rows == side:
            return blob
        rows = min(side, 2 * rows)


class NvjpegDecoder:
    """list of uint8 1-D CPU tensors -> list of uint8 3 x H x W views on `device` (None where the
    batched hardware decode does not take an image). Raises RuntimeError where libnvjpeg or the
    hardware backend is missing (GPUs without JPEG engines). One per thread: nvJPEG states are not
    thread-safe. Work goes to the current CUDA stream; nothing waits for it on the host.
    max_side, max_bytes: the engines' buffers are sized on the first batch for images up to
    max_side on either side and max_bytes long, larger ones are left to the CPU (MAX_SIDE);
    max_side 0: neither, the buffers grow with the images and each growth waits for the whole GPU
    (bench/probe_sync.py's baseline)."""
    kind = "engine"

    def __init__(self, device="cuda", max_side=MAX_SIDE, max_bytes=MAX_BYTES, turn=None, output="rgb"):
        self.device = torch.device(device)
        if output not in OUTPUTS:
            raise ValueError(f"output {output!r}: give one of {', '.join(OUTPUTS)}")
        self.output = output
        self.max_side, self.max_bytes = max_side, max_bytes
        self._reserved, self._fits_bytes = 0, 0  # images and bytes per image the buffers are sized for
        self._pad_source = None  # pinned PAD_SIDE JPEG, made on the first short batch
        if self.device.type != "cuda":
            raise RuntimeError("the nvJPEG decoder needs a CUDA device")
        # How this decoder takes the process's one turn at the decode call (TURNS; None: the
        # process's, use_turn). Every decoder of a process decoding at the same time must take the
        # same kind: a Python lock and the native mutex do not exclude each other. "free" only for
        # bench/probe_engine.py --turns, which checks whether phase 5's hang with two in the call
        # is gone (on driver 580 it is not, although the buffers are sized up front: phase 19).
        turn = turn or _PROCESS_TURN[0]
        if turn not in TURNS:
            raise ValueError(f"turn {turn!r}: give one of {', '.join(TURNS)}")
        self.turn = turn
        self._native = None
        if turn == "native":
            from tools.imagenet.engine_turn import native_turn
            self._native = native_turn()  # None (a Python lock, said once) where it cannot be built
            self._turn_seconds = (ctypes.c_double * 2)()
        self._lib, self._fast = load_library()
        _declare(self._lib)
        _declare(self._fast)
        self._decode_address = ctypes.cast(self._lib.nvjpegDecodeBatched, ctypes.c_void_p).value  # native turn
        self._handle, self._state, self._stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        with torch.cuda.device(self.device):
            status = self._lib.nvjpegCreateEx(_BACKEND_HARDWARE, None, None, 0, ctypes.byref(self._handle))
            if status == _STATUS_ARCH_MISMATCH:
                raise RuntimeError(f"{torch.cuda.get_device_name(self.device)} has no hardware JPEG decoder")
            self._check(status, "nvjpegCreateEx(hardware)")
            self._check(self._lib.nvjpegJpegStateCreate(self._handle, ctypes.byref(self._state)),
                        "nvjpegJpegStateCreate")
            self._check(self._lib.nvjpegJpegStreamCreate(self._handle, ctypes.byref(self._stream)),
                        "nvjpegJpegStreamCreate")
        self._batch = None
        self._info = (ctypes.c_int(), ctypes.c_int(), (ctypes.c_int * _MAX_COMPONENT)(),
                      (ctypes.c_int * _MAX_COMPONENT)())
        self._supported = ctypes.c_int()
        self.seconds = {"batches": 0, **dict.fromkeys(PARTS, 0.0)}  # host seconds per part (PARTS)
        # inputs of batches the GPU may still read (nvJPEG copies them in stream order), with the
        # event after which they can go
        self._in_flight = collections.deque()

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} failed: nvjpegStatus {status}")

    def _probe(self, ptr, size):
        """(h, w) if the batched hardware decode takes the JPEG at host address ptr, else (0, 0)."""
        n, sub, widths, heights = self._info
        if self._fast.nvjpegGetImageInfo(self._handle, ptr, size, ctypes.byref(n), ctypes.byref(sub),
                                         widths, heights) != 0:
            return 0, 0
        if self._fast.nvjpegJpegStreamParseHeader(self._handle, ptr, size, self._stream) != 0:
            return 0, 0
        if self._fast.nvjpegDecodeBatchedSupported(self._handle, self._stream,
                                                   ctypes.byref(self._supported)) != 0:
            return 0, 0
        return (heights[0], widths[0]) if self._supported.value == 0 else (0, 0)

    def decode_packed(self, data, offsets, frames=None):
        """A packed batch (uint8 1-D CPU tensor, N+1 byte offsets; see gpu_data.pack_jpegs; frames:
        its gpu_data.jpeg_frames, else the headers are checked here, through nvJPEG) ->
        (flat, ok, sizes, starts): flat a uint8 device buffer holding the decoded images as planar
        RGB one after another (None if none decoded), ok a bool array of the images decoded,
        sizes int64 (N, 2) h, w (0 where not), starts the element offset of each image in flat.
        A few operations per batch, whatever its size: the GIL is what the other threads of the
        pipeline and the training loop wait for."""
        while self._in_flight and self._in_flight[0][0].query():
            self._in_flight.popleft()
        data = data if data.is_contiguous() else data.contiguous()
        offsets = np.asarray(offsets, dtype=np.int64)
        n = len(offsets) - 1
        lengths = np.diff(offsets)
        base = data.data_ptr()
        t0 = time.perf_counter()
        if frames is None:
            sizes = np.array([self._probe(base + int(o), int(s)) for o, s in zip(offsets[:-1], lengths)],
                             dtype=np.int64).reshape(n, 2)
        else:  # the loader workers read the headers (gpu_data.jpeg_frames): no per-image calls here
            frames = np.asarray(frames, dtype=np.int64)
            sizes = np.where(frames[:, 2:3] != 0, frames[:, :2], 0)
        ok = sizes[:, 0] > 0
        if self.max_side:
            if self._reserved < n:
                self.reserve(n)
            ok &= (sizes.max(1) <= self.max_side) & (lengths <= self._fits_bytes)
            sizes[~ok] = 0
        planes = sizes[:, 0] * sizes[:, 1]
        starts = np.zeros(n, dtype=np.int64)
        starts[1:] = np.cumsum(3 * planes)[:-1]
        if not ok.any():
            return None, ok, sizes, starts
        # the bitstreams go to the GPU by DMA from one pinned buffer: from pageable memory the
        # driver would stage every image's copy through its own buffer, on this thread. Bytes the
        # DataLoader pinned already (tools.train --pin-raw) are read where they are.
        t1 = time.perf_counter()
        first, last = int(offsets[0]), int(offsets[-1])
        if data.is_pinned():
            staging = data[first:last]
        else:
            staging = torch.empty(last - first, dtype=torch.uint8, pin_memory=True)
            staging.copy_(data[first:last])
        t2 = time.perf_counter()
        flat = torch.empty(int(3 * planes.sum()), dtype=torch.uint8, device=self.device)
        take = np.flatnonzero(ok)
        table = self._table(flat.data_ptr() + starts[take], sizes[take])
        sources = (staging.data_ptr() + offsets[take] - first).astype(np.uint64)
        source_lengths = lengths[take].astype(np.uint64)
        scratch = None
        if self.max_side and len(take) < self._reserved:
            table, sources, source_lengths, scratch = self._padded(table, sources, source_lengths)
        stream = torch.cuda.current_stream(self.device)
        # One batched decode call at a time per process, as torchvision does: two threads' decoders
        # in this call at once beside a running step hung in it (bench/probe_engine.py; a 2-GPU
        # training run hung too, where was not caught: NOTES-gpu.md phase 5). The call only queues
        # the batch on the engines; the decoding itself still overlaps.
        if self._batch != len(table):  # once per decoder (see PAD_SIDE), in the turn as well
            with self._turn_held():
                self._check(self._lib.nvjpegDecodeBatchedInitialize(self._handle, self._state, len(table), 1,
                                                                    OUTPUTS[self.output]),
                            "nvjpegDecodeBatchedInitialize")
            self._batch = len(table)
        t3 = time.perf_counter()
        args = (self._handle, self._state, sources.ctypes.data, source_lengths.ctypes.data, table.ctypes.data,
                stream.cuda_stream)
        if self._native is not None:
            waited, held = self._turn_seconds[0], self._turn_seconds[1]
            status = self._native.engine_turn_call6(self._decode_address, *args, self._turn_seconds)
            t6 = time.perf_counter()
            t4 = t3 + self._turn_seconds[0] - waited
            t5 = t4 + self._turn_seconds[1] - held
        else:
            with self._turn_held():
                t4 = time.perf_counter()
                status = self._lib.nvjpegDecodeBatched(*args[:5], ctypes.c_void_p(args[5]))
                t5 = time.perf_counter()
            t6 = time.perf_counter()
        self._check(status, "nvjpegDecodeBatched")
        for key, seconds in (("probe", t1 - t0), ("copy", t2 - t1), ("setup", t3 - t2), ("lock", t4 - t3),
                             ("decode", t5 - t4), ("after", t6 - t5), ("batches", 1)):
            self.seconds[key] += seconds
        done = torch.cuda.Event()
        done.record(stream)
        self._in_flight.append((done, (staging, scratch)))
        return flat, ok, sizes, starts

    @contextlib.contextmanager
    def _turn_held(self):
        """The process's decode turn, held around a rare call (setting the state up)."""
        if self._native is not None:
            self._native.engine_turn_take()
            try:
                yield
            finally:
                self._native.engine_turn_give()
        else:
            with _DECODE_LOCK if self.turn != "free" else contextlib.nullcontext():
                yield

    def _table(self, addresses, sizes):
        """nvjpegImage_t per image (channel pointers [4], then pitches [4], size_t) for images of
        `sizes` (h, w) whose 3 x h x w bytes start at device `addresses`, in self.output's layout."""
        table = np.zeros((len(sizes), 2 * _MAX_COMPONENT), dtype=np.uint64)
        planes = sizes[:, 0] * sizes[:, 1]
        for c in range(1 if self.output == "rgbi" else 3):
            table[:, c] = addresses + c * planes
            table[:, _MAX_COMPONENT + c] = sizes[:, 1] * (3 if self.output == "rgbi" else 1)
        return table

    def _padded(self, table, sources, lengths):
        """The batch's rows plus as many PAD_SIDE JPEGs (one pinned copy, decoded into a scratch
        buffer) as make it the reserved count (see PAD_SIDE); and that scratch buffer."""
        if self._pad_source is None:
            blob = torch.frombuffer(bytearray(_reserve_jpeg(PAD_SIDE, 0)), dtype=torch.uint8)
            self._pad_source = torch.empty(len(blob), dtype=torch.uint8, pin_memory=True)
            self._pad_source.copy_(blob)
        count, plane = self._reserved - len(table), PAD_SIDE * PAD_SIDE
        scratch = torch.empty(3 * plane * count, dtype=torch.uint8, device=self.device)
        pads = self._table(scratch.data_ptr() + 3 * plane * np.arange(count),
                           np.full((count, 2), PAD_SIDE, dtype=np.int64))
        source = self._pad_source
        return (np.concatenate([table, pads]),
                np.concatenate([sources, np.full(count, source.data_ptr(), dtype=np.uint64)]),
                np.concatenate([lengths, np.full(count, len(source), dtype=np.uint64)]), scratch)

    def reserve(self, count):
        """Sizes the engines' buffers for `count` images of max_side x max_side and max_bytes (see
        MAX_SIDE) by decoding such a batch once, and waits for it: no later batch of up to `count`
        images within those reallocates them (and waits for the whole GPU) in the middle of training."""
        blob = _reserve_jpeg(self.max_side, self.max_bytes)
        self._reserved, self._fits_bytes = count, len(blob)  # at least max_bytes
        data = torch.frombuffer(bytearray(blob * count), dtype=torch.uint8)
        offsets = np.arange(count + 1, dtype=np.int64) * len(blob)
        frames = np.tile(np.array([[self.max_side, self.max_side, 1]], dtype=np.int64), (count, 1))
        self.decode_packed(data, offsets, frames)
        self._in_flight[-1][0].synchronize()

    def __call__(self, tensors):
        tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        offsets = np.zeros(len(tensors) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([t.numel() for t in tensors])
        data = torch.cat(tensors) if tensors else torch.empty(0, dtype=torch.uint8)
        flat, ok, sizes, starts = self.decode_packed(data, offsets)
        return [flat[starts[i]:starts[i] + 3 * h * w].view(3, h, w) if ok[i] else None
                for i, (h, w) in enumerate(sizes.tolist())]

    def __del__(self):
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        try:
            for done, _ in self._in_flight:
                done.synchronize()
            for fn, obj in (("nvjpegJpegStreamDestroy", self._stream), ("nvjpegJpegStateDestroy", self._state),
                            ("nvjpegDestroy", self._handle)):
                if obj:
                    getattr(lib, fn)(obj)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
