"""GPU JPEG decode + batched train/eval augmentation, overlapped with training in a side stream.

Usage:
    from tools.imagenet.gpu_data import GpuAugment, GpuBatchPipeline, pack_jpegs
    aug = GpuAugment(224, mode="crop", mean=mean, std=std, seed=seed * 1000 + rank)   # or "rrc", "center"
    # raw batches as loader workers hand them over, undecoded:
    #   {"data": uint8 1-D, "offsets": int64 N+1, "labels": int64 N, "keys": [N str]}   (see pack_jpegs)
    for x, y in GpuBatchPipeline(raw_batches, aug, device="cuda"):
        loss = criterion(model(x), y)          # x: normalised float NCHW, channels_last, on the GPU

Pieces:
- decode_packed(data, offsets, ...): a packed batch through the engine decoder (tools.imagenet.nvjpeg,
  gpu_decoder("engine"), the default where the GPU has JPEG engines): one buffer in, one buffer of
  planar images out (DecodedBatch), the frame headers read by the loader workers (jpeg_frame).
- decode_jpegs(blobs, device): a list of images through torchvision's batched nvJPEG (one bad image
  fails the whole batch: the batch is then split in halves until the bad ones are isolated), or
  nvImageCodec (gpu_decoder("hardware"); None per image it cannot).
  Both: CPU fallback with PIL by content (CMYK, grayscale, PNG named .jpg ...) and a list of (key,
  reason) for what nothing decodes. On a CPU device everything runs on the CPU (libjpeg-turbo
  through torchvision, then PIL).
- GpuAugment: crop parameters drawn on the CPU with a seeded torch.Generator, vectorised over the
  batch (no per-image Python RNG calls). The crop reads the decoded images where they lie, through
  a table of pointers and strides (planar or interleaved): a Triton kernel on CUDA (crop_triton), a
  dense resampling-matrix version in torch elsewhere (crop_flat_torch, over the images
  concatenated; the same function). Each output
  pixel averages ceil(box side / crop) x ... bilinear samples of its bin (roi_align(aligned=True)
  geometry, per image and axis: a box filter when shrinking, like PIL's antialiasing), positions
  clamped at the image edge; an unscaled crop (the seed's 224 of 256, the center crop) copies
  exact pixels; a box with x1 > x2 is sampled mirrored (the flip). Normalisation is fused; the
  output is channels_last.
- GpuBatchPipeline: a fetch thread pulls raw batches, `threads` decode threads (own CUDA stream
  each) decode and crop batches ahead while the training step runs; batches come out in order;
  the consumer's stream waits on an event, and the tensors are recorded on the consumer's stream
  so the caching allocator keeps them until they are used. Hybrid mode: a batch may carry a
  CPU-decoded, already cropped uint8 part ("pre", "pre_labels"), normalised on the GPU and
  concatenated.

Images no decoder can read are dropped from their batch (it gets smaller) and reported through
`on_failure(key, reason)` (default: a warning; tools.train passes failure_log); never silently.
"""
import contextlib
import faulthandler
import math
import queue
import sys
import threading
import time
import warnings

import numpy as np
import torch

from torchvision.io import ImageReadMode
from torchvision.io import decode_jpeg as _tv_decode_jpeg

from tools.imagenet.loader import decode_rgb
from tools.imagenet.nvjpeg import PARTS as ENGINE_PARTS

# torchvision 0.29 deprecates its image codecs in favour of torchcodec (a warning per call; 0.26
# has none). Silenced per call because test runners reset module-level filters; the worst a race
# of two threads can do to catch_warnings here is leave this one filter installed.
_DEPRECATED = "The image decoding and encoding capabilities of TorchVision"


def decode_jpeg(data, **kwargs):
    """torchvision.io.decode_jpeg without the 0.29 deprecation warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATED, category=DeprecationWarning)
        return _tv_decode_jpeg(data, **kwargs)


# ---------------------------------------------------------------------------------------- packing

def pack_jpegs(blobs):
    """list of bytes -> (uint8 1-D tensor of all bytes, int64 offsets of length N+1).

    Workers return this instead of a list of bytes: the data tensor travels through shared memory,
    whereas a list of bytes is pickled through a pipe (offsets: see loader._raw_batch)."""
    sizes = [len(b) for b in blobs]
    offsets = torch.zeros(len(blobs) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
    data = torch.from_numpy(np.frombuffer(b"".join(blobs), dtype=np.uint8).copy())
    return data, offsets


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_LUMA = {(1, 1), (2, 1), (1, 2), (2, 2)}  # 4:4:4, 4:2:2, 4:4:0, 4:2:0 with 1x1 chroma


def jpeg_frame(blob):
    """(height, width, engine) from a JPEG's frame header, (0, 0, 0) where there is none: engine
    is 1 for what the GPU's JPEG engines decode in a batch (Huffman baseline or extended
    sequential, 8 bits, 3 components YCbCr, chroma 4:4:4, 4:2:2, 4:4:0 or 4:2:0: every JPEG the
    resize stage writes), else 0 (progressive, CMYK, grayscale, ...: decoded another way).
    Pure Python, a few microseconds: the loader workers run it, off the training process's GIL."""
    b = memoryview(blob).cast("B") if not isinstance(blob, (bytes, bytearray)) else blob
    n, i, rgb = len(b), 2, False
    if n < 4 or b[0] != 0xFF or b[1] != 0xD8:
        return 0, 0, 0
    while i + 4 <= n:
        if b[i] != 0xFF:
            return 0, 0, 0
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = (b[i + 2] << 8) | b[i + 3]
        if marker == 0xEE and bytes(b[i + 4:i + 9]) == b"Adobe" and i + 15 < n:
            rgb = b[i + 15] == 0  # Adobe transform 0: the 3 components are R, G, B
        if marker in _SOF:
            if i + 10 > n or i + 10 + 3 * b[i + 9] > n:  # cut inside the frame header
                return 0, 0, 0
            precision, h, w, comps = b[i + 4], (b[i + 5] << 8) | b[i + 6], (b[i + 7] << 8) | b[i + 8], b[i + 9]
            sampling = [(b[i + 11 + 3 * c] >> 4, b[i + 11 + 3 * c] & 15) for c in range(comps)]
            engine = (marker in (0xC0, 0xC1) and precision == 8 and comps == 3 and not rgb
                      and sampling[0] in _LUMA and sampling[1] == sampling[2] == (1, 1) and h > 0 and w > 0)
            return h, w, int(engine)
        if marker == 0xDA:  # a scan before any frame header
            return 0, 0, 0
        i += 2 + length
    return 0, 0, 0


def jpeg_frames(blobs):
    """int32 (N, 3) of jpeg_frame for each blob."""
    return np.array([jpeg_frame(b) for b in blobs], dtype=np.int32).reshape(-1, 3)


def unpack_jpegs(data, offsets):
    """Inverse of pack_jpegs: a list of uint8 1-D views, one per image (no copy)."""
    sizes = (offsets[1:] - offsets[:-1]).tolist()
    return list(torch.split(data[int(offsets[0]):int(offsets[-1])], sizes))


def _as_tensor(blob):
    if isinstance(blob, torch.Tensor):
        return blob.contiguous()
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------- decode

def pil_decode(blob):
    """Any image PIL reads, found by content -> uint8 3 x H x W RGB tensor (CPU): the CPU loader's
    decode (tools.imagenet.loader.decode_rgb), so both paths give the same pixels."""
    data = blob.numpy().tobytes() if isinstance(blob, torch.Tensor) else bytes(blob)
    rgb = decode_rgb(data)
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def torchvision_gpu_decoder(device):
    """Batched nvJPEG through torchvision: list of uint8 1-D CPU tensors -> list of 3xHxW on device.
    Runs on the SMs (and its host stage), one call at a time per process (a global lock)."""
    def decode(tensors):
        return decode_jpeg(tensors, device=device, mode=ImageReadMode.RGB)
    decode.kind = "nvjpeg"
    return decode


class DeviceImage:
    """A decoded image in memory that its decoder owns (nvImageCodec), seen as 3 x H x W uint8
    through __cuda_array_interface__: what the crop kernel reads (shape, stride(), data_ptr()),
    without building a torch tensor per image. The memory lives as long as this object; the
    decoder frees it in stream order, after the work queued on the decode stream."""
    __slots__ = ("owner", "device", "shape", "_stride", "_ptr")

    def __init__(self, owner, device):
        cai = owner.__cuda_array_interface__
        h, w, c = cai["shape"]
        if c != 3 or cai["typestr"] != "|u1":
            raise ValueError(f"expected 8-bit RGB, got shape {cai['shape']} {cai['typestr']}")
        rs, ps, cs = cai.get("strides") or (w * c, c, 1)
        self.owner, self.device = owner, device
        self.shape, self._stride, self._ptr = (c, h, w), (cs, rs, ps), cai["data"][0]

    def stride(self):
        return self._stride

    def data_ptr(self):
        return self._ptr


def as_torch(image):
    """A decoded image as a 3 x H x W torch tensor (a view where the decoder owns the memory)."""
    if isinstance(image, DeviceImage):
        return torch.as_tensor(image.owner, device=image.device).permute(2, 0, 1)
    return image


def import_nvimgcodec():
    """nvImageCodec's module, or None where it is not installed or cannot load."""
    try:
        from nvidia import nvimgcodec
        return nvimgcodec
    except Exception:  # noqa: BLE001 - ImportError, or a missing shared library behind it
        return None


def hardware_jpeg_decoder(device):
    """nvImageCodec on the GPU's hardware JPEG engines (A100, H100, H200: NVJPG), off the SMs the
    training step uses: list of uint8 1-D CPU tensors -> list of DeviceImage (None where the
    engine cannot decode one, e.g. progressive or CMYK: decode_jpegs falls back for those).
    Raises RuntimeError where nvImageCodec is missing or the GPU has no such engine. Needs
    libnvjpeg from CUDA (e.g. /usr/local/cuda/lib64 on LD_LIBRARY_PATH)."""
    nvimgcodec = import_nvimgcodec()
    if nvimgcodec is None:
        raise RuntimeError("nvImageCodec is not installed (pip install nvidia-nvimgcodec-cu13)")
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        decoder = nvimgcodec.Decoder(device_id=index,
                                     backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)])
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"no hardware JPEG decoder on {device}: {exc}") from exc
    params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                     allow_any_depth=False)

    def decode(tensors):
        stream = torch.cuda.current_stream(device).cuda_stream
        out = decoder.decode([t.numpy() for t in tensors], params=params, cuda_stream=stream)
        images = []
        for im in out:
            try:
                images.append(None if im is None else DeviceImage(im, device))
            except ValueError:
                images.append(None)
        return images
    decode.kind = "hardware"
    return decode


GPU_DECODERS = ("auto", "engine", "nvjpeg", "hardware")


def gpu_decoder(kind, device):
    """A batch decoder by name. Each decode thread makes its own.
    - "engine": tools.imagenet.nvjpeg, libnvjpeg's batched decode on the GPU's JPEG engines (A100,
      H100, H200), packed batches in and out (raises where the GPU has no engine);
    - "nvjpeg": torchvision's decode_jpeg(list, device="cuda") (the engines too where there are,
      else nvJPEG on the SMs; one call at a time per process, a list of tensors in and out);
    - "hardware": nvImageCodec on the engines (needs nvidia-nvimgcodec);
    - "auto": engine where the GPU has JPEG engines, else nvjpeg.
    engine is what "auto" picks because it fed AlexNet fastest on an H200 (bench/NOTES-gpu.md):
    the pipeline is limited by the Python work its threads share one GIL for, and the engine
    decoder's is a few operations per batch, not per image. On a CPU device: torchvision's."""
    if kind not in GPU_DECODERS:
        raise ValueError(f"unknown GPU decoder {kind!r}: choose one of {', '.join(GPU_DECODERS)}")
    if torch.device(device).type != "cuda":
        return torchvision_gpu_decoder(device)
    if kind == "hardware":
        return hardware_jpeg_decoder(device)
    if kind in ("engine", "auto"):
        from tools.imagenet.nvjpeg import NvjpegDecoder
        try:
            return NvjpegDecoder(device)
        except RuntimeError:
            if kind == "engine":
                raise
    return torchvision_gpu_decoder(device)


class DecoderPool:
    """Decoders kept across pipelines, by kind and device: each epoch's decode threads take one and
    give it back when they end, so a run makes its nvJPEG states (and sizes the engines' buffers,
    tools.imagenet.nvjpeg.NvjpegDecoder.reserve) once, not every epoch, and frees none mid-run
    (freeing GPU memory waits for all of the GPU's work). A decoder serves one thread at a time.

        decoders = DecoderPool()             # once per run
        for epoch ...: GpuBatchPipeline(loader, aug, "cuda", decoder="engine", pool=decoders)

    make(kind, device): how a missing decoder is made (gpu_decoder)."""

    def __init__(self, make=None):
        self.make = make or gpu_decoder
        self._idle, self._lock = {}, threading.Lock()

    def take(self, kind, device):
        key = (kind, str(device))
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop()
        return self.make(kind, device)

    def give(self, kind, device, decoder):
        """Back to the pool; the caller has waited for the work it queued with it."""
        with self._lock:
            self._idle.setdefault((kind, str(device)), []).append(decoder)

    def __len__(self):
        with self._lock:
            return sum(map(len, self._idle.values()))


def _cpu_decode(blob):
    """libjpeg-turbo through torchvision, then PIL by content; raises if neither can."""
    try:
        return decode_jpeg(blob, mode=ImageReadMode.RGB)
    except Exception:  # not a JPEG, CMYK on an old torchvision, truncated ...: try PIL
        return pil_decode(blob)


def _fallback(blob, key, device, failures):
    """The CPU decode of one image the GPU decoder did not take, on `device`; None, with (key,
    reason) appended to failures, when nothing decodes it."""
    try:
        return _cpu_decode(blob).to(device, non_blocking=True)
    except Exception as exc:
        failures.append((key, f"cannot decode: {type(exc).__name__}: {exc}"))
        return None


def decode_jpegs(blobs, device, keys=None, decoder=None):
    """Decode a batch. Returns (images, failures): images is aligned with blobs (uint8 3xHxW on
    `device`, None where nothing could decode it), failures a list of (key, reason).

    On CUDA the batch goes to `decoder` (default: torchvision's batched nvJPEG) in one call. That call
    fails as a whole on one bad image, so on failure the batch is halved until the culprits stand
    alone; those, and the images a decoder returns None for, are decoded on the CPU with PIL by
    content and copied over."""
    device = torch.device(device)
    keys = list(keys) if keys is not None else [str(i) for i in range(len(blobs))]
    tensors = [_as_tensor(b) for b in blobs]
    images, failures = [None] * len(tensors), []

    def fallback(i):
        images[i] = _fallback(tensors[i], keys[i], device, failures)

    if device.type != "cuda" and decoder is None:
        for i in range(len(tensors)):
            fallback(i)
        return images, failures
    decoder = decoder or torchvision_gpu_decoder(device)

    def run(idx):
        try:
            out = decoder([tensors[i] for i in idx])
        except Exception:
            if len(idx) == 1:
                fallback(idx[0])
            else:
                half = len(idx) // 2
                run(idx[:half])
                run(idx[half:])
            return
        for i, im in zip(idx, out):
            if im is None:  # a decoder that reports per image (nvImageCodec)
                fallback(i)
            else:
                images[i] = im

    if tensors:
        run(list(range(len(tensors))))
    return images, failures


class DecodedBatch:
    """A batch decoded into one device buffer (a decoder's decode_packed) plus the images decoded
    on the CPU instead: per kept image a row of `rows` (int64: data pointer, h, w, and the element
    strides of a row, a pixel and a channel), which is all the crop kernel reads; `index` the
    positions of the kept images in the raw batch. Holds the memory until it is dropped."""

    def __init__(self, rows, index, device, flat=None, starts=None, extra=None):
        self.rows, self.index, self.device = rows, index, device
        self.flat, self.starts, self.extra = flat, starts, extra or {}

    def __len__(self):
        return len(self.rows)

    def sizes(self):
        return torch.from_numpy(self.rows[:, 1:3].copy())

    def images(self):
        """The images as 3 x H x W tensors (views of the buffer), for the crop's torch version."""
        out = []
        for i, (h, w) in zip(self.index.tolist(), self.rows[:, 1:3].tolist()):
            if i in self.extra:
                out.append(self.extra[i])
            else:
                start = int(self.starts[i])
                out.append(self.flat[start:start + 3 * h * w].view(3, h, w))
        return out


def _row(image):
    cs, rs, ps = image.stride()
    return (image.data_ptr(), image.shape[-2], image.shape[-1], rs, ps, cs)


def decode_packed(data, offsets, keys, device, decoder, frames=None):
    """A packed batch (see pack_jpegs) through a decoder's decode_packed (tools.imagenet.nvjpeg),
    the images it does not take through the CPU fallback (PIL by content). frames: the workers'
    jpeg_frames of the batch (saves the decoder its header checks), None: the decoder checks.
    Returns (DecodedBatch, failures): failures lists (key, reason) of what nothing decodes."""
    device = torch.device(device)
    offsets = np.asarray(offsets, dtype=np.int64)
    try:
        flat, ok, sizes, starts = decoder.decode_packed(data, offsets, frames)
    except Exception:  # noqa: BLE001 - e.g. a corrupt scan behind a good header: all to the CPU
        if frames is None:
            n = len(offsets) - 1
            flat, ok, sizes, starts = None, np.zeros(n, dtype=bool), np.zeros((n, 2), np.int64), None
        else:  # the decoder's own header checks, then
            return decode_packed(data, offsets, keys, device, decoder)
    n = len(ok)
    rows = np.zeros((n, 6), dtype=np.int64)
    if flat is not None:
        h, w = sizes[ok, 0], sizes[ok, 1]
        rows[ok] = np.stack([flat.data_ptr() + starts[ok], h, w, w, np.ones_like(w), h * w], 1)
    kept, extra, failures = ok.copy(), {}, []
    for i in np.flatnonzero(~ok).tolist():
        image = _fallback(data[int(offsets[i]):int(offsets[i + 1])], keys[i], device, failures)
        if image is None:
            continue
        extra[i] = image
        rows[i] = _row(image)
        kept[i] = True
    return DecodedBatch(rows[kept], np.flatnonzero(kept), device, flat, starts, extra), failures


# ---------------------------------------------------------------------------------------- geometry
# Boxes are float64 (N, 4) = x1, y1, x2, y2 in source pixel edges (pixel j covers [j, j+1)).

def _virtual_sizes(sizes, crop):
    """Sizes after the CPU loader's enlargement of images whose short side is under the crop
    (short side -> crop, aspect kept, rounded); unchanged for all others."""
    h, w = sizes[:, 0].double(), sizes[:, 1].double()
    s = (crop / torch.minimum(h, w)).clamp(min=1.0)
    small = s > 1
    vh = torch.where(small, torch.round(h * s).clamp(min=crop), h)
    vw = torch.where(small, torch.round(w * s).clamp(min=crop), w)
    return vh, vw


def _to_source(boxes, sizes, vh, vw):
    fy = sizes[:, 0].double() / vh
    fx = sizes[:, 1].double() / vw
    return boxes * torch.stack([fx, fy, fx, fy], 1)


def _randint(gen, low, high):
    """Per-element uniform integers in [low, high] (inclusive; high >= low), vectorised."""
    u = torch.rand(low.shape, generator=gen, dtype=torch.float64)
    return torch.minimum(low + torch.floor(u * (high - low + 1)), high)


def crop_boxes(sizes, crop, gen):
    """The seed's train crop: a crop x crop window at a uniform random position."""
    vh, vw = _virtual_sizes(sizes, crop)
    zero = torch.zeros_like(vh)
    y = _randint(gen, zero, vh - crop)
    x = _randint(gen, zero, vw - crop)
    return _to_source(torch.stack([x, y, x + crop, y + crop], 1), sizes, vh, vw)


def center_boxes(sizes, crop):
    """Eval center crop: offsets (H - crop) // 2, (W - crop) // 2 like tools.imagenet.preprocess."""
    vh, vw = _virtual_sizes(sizes, crop)
    y = torch.div(vh - crop, 2, rounding_mode="floor")
    x = torch.div(vw - crop, 2, rounding_mode="floor")
    return _to_source(torch.stack([x, y, x + crop, y + crop], 1), sizes, vh, vw)


def rrc_boxes(sizes, crop, gen, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """torchvision RandomResizedCrop.get_params for every image at once: up to `attempts` draws
    of (area fraction, log aspect), the first that fits wins; else the central crop with the
    aspect clamped to `ratio` (torchvision's fallback)."""
    vh, vw = _virtual_sizes(sizes, crop)
    n = len(vh)
    area = (vh * vw)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, generator=gen,
                                                                  dtype=torch.float64))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * torch.rand(n, attempts, generator=gen, dtype=torch.float64))
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    ok = (cw > 0) & (cw <= vw[:, None]) & (ch > 0) & (ch <= vh[:, None])
    first = ok.to(torch.int8).argmax(1)
    found = ok.any(1)
    cw = cw.gather(1, first[:, None])[:, 0]
    ch = ch.gather(1, first[:, None])[:, 0]
    # fallback: whole image, aspect clamped into ratio, centered
    in_ratio = vw / vh
    fw = torch.where(in_ratio > ratio[1], torch.round(vh * ratio[1]), vw)
    fh = torch.where(in_ratio < ratio[0], torch.round(vw / ratio[0]), vh)
    cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
    zero = torch.zeros_like(vh)
    y = torch.where(found, _randint(gen, zero, vh - ch), torch.div(vh - ch, 2, rounding_mode="floor"))
    x = torch.where(found, _randint(gen, zero, vw - cw), torch.div(vw - cw, 2, rounding_mode="floor"))
    return _to_source(torch.stack([x, y, x + cw, y + ch], 1), sizes, vh, vw)


def flip_boxes(boxes, gen, p=0.5):
    """Mirror a random subset (probability p each): x1 and x2 swapped, which roi_align samples
    right to left. Returns (boxes, flipped bool mask)."""
    flipped = torch.rand(len(boxes), generator=gen, dtype=torch.float64) < p
    out = boxes.clone()
    out[flipped, 0], out[flipped, 2] = boxes[flipped, 2], boxes[flipped, 0]
    return out, flipped


# ---------------------------------------------------------------------------------------- crop
# The crop reads every decoded image where it lies (the kernel gets a table of pointers and strides;
# the torch version one concatenated buffer): no padded batch, no per-image copy loop, and the
# decoder's own layout (planar nvJPEG, interleaved nvImageCodec). Each output pixel averages sy x sx bilinear
# samples spread over its bin of the box (sy = ceil(box height / crop), per image and axis, as
# roi_align(aligned=True, sampling_ratio=0) does), sample positions clamped to the image (edge
# replication). An unscaled box (the seed's crop, the center crop) samples pixel centres exactly,
# so it copies pixels; a box with x1 > x2 is sampled right to left (the flip).

try:  # the GPU kernel; the torch version below computes the same function anywhere
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None


def flatten_images(images):
    """list of uint8 3 x h_i x w_i (one device) -> (flat uint8 buffer, int64 offsets (N,),
    int32 (N, 2) sizes h, w), offsets and sizes on the CPU."""
    sizes = torch.tensor([tuple(im.shape[-2:]) for im in images], dtype=torch.int32)
    counts = sizes[:, 0].long() * sizes[:, 1].long() * 3
    offsets = torch.zeros(len(images), dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)[:-1]
    flat = torch.cat([im.reshape(-1) for im in images])
    return flat, offsets, sizes


def sample_params(boxes, crop):
    """(N, 4) x1, y1, x2, y2 -> float32 (N, 4) start x, start y, signed bin width, bin height
    (source pixels per output pixel) and int32 (N, 2) samples per bin sy, sx."""
    boxes = boxes.double()
    bw = (boxes[:, 2] - boxes[:, 0]) / crop
    bh = (boxes[:, 3] - boxes[:, 1]) / crop
    prm = torch.stack([boxes[:, 0], boxes[:, 1], bw, bh], 1).float()
    grid = torch.stack([bh.abs(), bw.abs()], 1).sub(1e-9).ceil().clamp(min=1).int()
    return prm, grid


def _axis_taps(start, step, samples, size, crop):
    """Bilinear taps along one axis for all images: (index, weight) each (N, crop, 2 * S), weights
    already divided by the image's sample count (zero for the unused samples of S = max)."""
    s_max = int(samples.max())
    n = start.shape[0]
    out_i = torch.arange(crop, dtype=torch.float32, device=start.device).view(1, crop, 1)
    a = torch.arange(s_max, dtype=torch.float32, device=start.device).view(1, 1, s_max)
    s = samples.float().view(n, 1, 1)
    pos = (start.view(n, 1, 1) - 0.5) + step.view(n, 1, 1) * out_i + (a + 0.5) * step.view(n, 1, 1) / s
    last = (size - 1).float().view(n, 1, 1)
    pos = torch.minimum(pos.clamp(min=0.0), last)
    low = pos.floor()
    frac = pos - low
    low = low.long()
    high = torch.minimum(low + 1, (size - 1).long().view(n, 1, 1))
    valid = (a < s).float() / s
    idx = torch.cat([low, high], 2)
    w = torch.cat([(1 - frac) * valid, frac * valid], 2)
    return idx, w


def crop_flat_torch(flat, offsets, sizes, prm, grid, crop, scale, shift, out_dtype):
    """Reference/CPU version of the crop kernel: a dense per-image resampling matrix for each
    axis (taps scattered into it), applied as out = Wy @ image @ Wx^T over a batch padded by
    one gather. Returns N x 3 x crop x crop (channels_last) in out_dtype; uint8 is rounded."""
    device = flat.device
    n = len(offsets)
    h, w = sizes[:, 0].long().to(device), sizes[:, 1].long().to(device)
    hm, wm = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    prm, grid = prm.to(device), grid.to(device)
    iy, wy = _axis_taps(prm[:, 1], prm[:, 3], grid[:, 0], h, crop)
    ix, wx = _axis_taps(prm[:, 0], prm[:, 2], grid[:, 1], w, crop)
    my = torch.zeros(n, crop, hm, device=device).scatter_add_(2, iy, wy)
    mx = torch.zeros(n, crop, wm, device=device).scatter_add_(2, ix, wx)
    # padded batch by one gather; the padding repeats the edge and has zero weight anyway
    rows = torch.minimum(torch.arange(hm, device=device).view(1, 1, hm, 1), (h - 1).view(n, 1, 1, 1))
    cols = torch.minimum(torch.arange(wm, device=device).view(1, 1, 1, wm), (w - 1).view(n, 1, 1, 1))
    chan = torch.arange(3, device=device).view(1, 3, 1, 1)
    index = offsets.to(device).view(n, 1, 1, 1) + (chan * h.view(n, 1, 1, 1) + rows) * w.view(n, 1, 1, 1) + cols
    padded = flat[index].float()
    out = my[:, None] @ padded @ mx[:, None].transpose(-1, -2)
    return _finish(out, scale, shift, out_dtype)


def _finish(x, scale, shift, out_dtype):
    if out_dtype == torch.uint8:
        x = (x + 0.5).floor_().clamp_(0, 255)
    else:
        x = x * scale.to(x.device).view(1, 3, 1, 1) + shift.to(x.device).view(1, 3, 1, 1)
    return x.to(out_dtype, memory_format=torch.channels_last)


if triton is not None:
    @triton.jit
    def _crop_kernel(table, prm, scale, shift, out, crop, BLOCK: tl.constexpr, ROUND: tl.constexpr):
        # table row n (int64): data pointer, h, w, samples sy, sx, strides row, pixel, channel
        n = tl.program_id(0)
        p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = p < crop * crop
        oi = (p // crop).to(tl.float32)
        oj = (p % crop).to(tl.float32)
        row = table + 8 * n
        src = tl.load(row).to(tl.pointer_type(tl.uint8))
        h = tl.load(row + 1).to(tl.int32)
        w = tl.load(row + 2).to(tl.int32)
        sy = tl.load(row + 3).to(tl.int32)
        sx = tl.load(row + 4).to(tl.int32)
        rs = tl.load(row + 5)
        ps = tl.load(row + 6)
        cs = tl.load(row + 7)
        x0 = tl.load(prm + 4 * n)
        y0 = tl.load(prm + 4 * n + 1)
        bw = tl.load(prm + 4 * n + 2)
        bh = tl.load(prm + 4 * n + 3)
        acc0 = tl.zeros([BLOCK], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK], dtype=tl.float32)
        hl = (h - 1).to(tl.float32)
        wl = (w - 1).to(tl.float32)
        for a in range(0, sy):
            yy = (y0 - 0.5) + bh * oi + (a + 0.5) * bh / sy.to(tl.float32)
            yy = tl.minimum(tl.maximum(yy, 0.0), hl)
            ylf = tl.floor(yy)
            ly = yy - ylf
            yl = ylf.to(tl.int32)
            yh = tl.minimum(yl + 1, h - 1)
            for b in range(0, sx):
                xx = (x0 - 0.5) + bw * oj + (b + 0.5) * bw / sx.to(tl.float32)
                xx = tl.minimum(tl.maximum(xx, 0.0), wl)
                xlf = tl.floor(xx)
                lx = xx - xlf
                xl = xlf.to(tl.int32)
                xh = tl.minimum(xl + 1, w - 1)
                w00 = (1 - ly) * (1 - lx)
                w01 = (1 - ly) * lx
                w10 = ly * (1 - lx)
                w11 = ly * lx
                p00 = src + yl * rs + xl * ps
                p01 = src + yl * rs + xh * ps
                p10 = src + yh * rs + xl * ps
                p11 = src + yh * rs + xh * ps
                acc0 += (w00 * tl.load(p00, mask=inside, other=0).to(tl.float32)
                         + w01 * tl.load(p01, mask=inside, other=0).to(tl.float32)
                         + w10 * tl.load(p10, mask=inside, other=0).to(tl.float32)
                         + w11 * tl.load(p11, mask=inside, other=0).to(tl.float32))
                acc1 += (w00 * tl.load(p00 + cs, mask=inside, other=0).to(tl.float32)
                         + w01 * tl.load(p01 + cs, mask=inside, other=0).to(tl.float32)
                         + w10 * tl.load(p10 + cs, mask=inside, other=0).to(tl.float32)
                         + w11 * tl.load(p11 + cs, mask=inside, other=0).to(tl.float32))
                acc2 += (w00 * tl.load(p00 + 2 * cs, mask=inside, other=0).to(tl.float32)
                         + w01 * tl.load(p01 + 2 * cs, mask=inside, other=0).to(tl.float32)
                         + w10 * tl.load(p10 + 2 * cs, mask=inside, other=0).to(tl.float32)
                         + w11 * tl.load(p11 + 2 * cs, mask=inside, other=0).to(tl.float32))
        inv = 1.0 / (sy * sx).to(tl.float32)
        dst = out + (n.to(tl.int64) * crop * crop + p) * 3
        if ROUND:
            tl.store(dst, tl.minimum(tl.maximum(tl.floor(acc0 * inv + 0.5), 0.0), 255.0).to(tl.uint8), mask=inside)
            tl.store(dst + 1, tl.minimum(tl.maximum(tl.floor(acc1 * inv + 0.5), 0.0), 255.0).to(tl.uint8), mask=inside)
            tl.store(dst + 2, tl.minimum(tl.maximum(tl.floor(acc2 * inv + 0.5), 0.0), 255.0).to(tl.uint8), mask=inside)
        else:
            ty = out.dtype.element_ty
            tl.store(dst, (acc0 * inv * tl.load(scale) + tl.load(shift)).to(ty), mask=inside)
            tl.store(dst + 1, (acc1 * inv * tl.load(scale + 1) + tl.load(shift + 1)).to(ty), mask=inside)
            tl.store(dst + 2, (acc2 * inv * tl.load(scale + 2) + tl.load(shift + 2)).to(ty), mask=inside)


def image_table(images, grid):
    """int64 (N, 8) per image: data pointer, h, w, samples per bin sy, sx, and the element
    strides of a row, a pixel and a channel. Any 3 x H x W uint8 layout works in place: torch's
    planar decodes, nvImageCodec's interleaved ones (DeviceImage), strided views, and a
    DecodedBatch's rows."""
    if isinstance(images, DecodedBatch):
        rows = images.rows
    else:
        rows = np.array([_row(im) for im in images], dtype=np.int64).reshape(-1, 6)
    return torch.from_numpy(np.concatenate([rows[:, :3], grid.numpy().astype(np.int64), rows[:, 3:]], 1))


def crop_triton(images, prm, grid, crop, scale, shift, out_dtype, block=256):
    """The same function as crop_flat_torch in one Triton kernel that reads every image where it
    lies (CUDA, or TRITON_INTERPRET=1 on the CPU). The small tables go to the device through
    pinned memory without a host sync."""
    device = images.device if isinstance(images, DecodedBatch) else images[0].device
    n = len(images)

    def dev(t):
        if device.type == "cuda":
            return t.pin_memory().to(device, non_blocking=True)
        return t.contiguous()
    out = torch.empty((n, crop, crop, 3), dtype=out_dtype, device=device)
    args = (dev(image_table(images, grid)), dev(prm.float()), dev(scale.float()), dev(shift.float()),
            out, crop)
    launch = _crop_kernel[(n, triton.cdiv(crop * crop, block))]
    key = (out_dtype, device)
    if key in _COMPILED:
        launch(*args, BLOCK=block, ROUND=out_dtype == torch.uint8)
    else:  # the first call compiles: one thread at a time
        with _COMPILE_LOCK:
            launch(*args, BLOCK=block, ROUND=out_dtype == torch.uint8)
            _COMPILED.add(key)
    return out.permute(0, 3, 1, 2)


_COMPILE_LOCK = threading.Lock()
_COMPILED = set()


def _norm_consts(mean, std):
    """(scale, shift) float32 CPU tensors with (x/255 - mean)/std = x * scale + shift.

    preprocess.normalize's formula (the CPU paths'), as one multiply-add so that it fuses into the
    crop kernel and, for the hybrid part, into one addcmul to the output dtype and layout."""
    if mean is None:
        return torch.ones(3), torch.zeros(3)
    m, s = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(std, dtype=torch.float64)
    return (1.0 / (255.0 * s)).float(), (-m / s).float()


def crop_batch(images, boxes, crop, mean=None, std=None, dtype=torch.float32, channels_last=True,
               backend="auto"):
    """Crop/resize/flip every image to crop x crop and normalise, reading the images in place.

    images: a list of 3 x H x W uint8 images or a DecodedBatch. boxes: float (N, 4) x1, y1, x2, y2
    (x1 > x2 = mirrored). mean/std (0..1 per channel) given:
    returns (x/255 - mean)/std in `dtype`; else rounded uint8. backend: "triton" (one kernel),
    "torch" (dense resampling matrices, any device) or "auto" (triton on CUDA where importable)."""
    if not len(images):
        raise ValueError("crop_batch: empty batch")
    prm, grid = sample_params(boxes, crop)
    scale, shift = _norm_consts(mean, std)
    out_dtype = torch.uint8 if mean is None else dtype
    packed = isinstance(images, DecodedBatch)
    cuda = (images.device if packed else images[0].device).type == "cuda"
    if backend == "triton" or (backend == "auto" and triton is not None and cuda):
        out = crop_triton(images, prm, grid, crop, scale, shift, out_dtype)
    else:
        images = images.images() if packed else images
        flat, offsets, sizes = flatten_images([as_torch(im) for im in images])
        out = crop_flat_torch(flat, offsets, sizes, prm, grid, crop, scale, shift, out_dtype)
    return out if channels_last else out.contiguous()


def normalize(x, mean, std, dtype=torch.float32, channels_last=True):
    """uint8 or float 0..255 NCHW -> (x/255 - mean)/std in dtype, one fused multiply-add."""
    scale, shift = _norm_consts(mean, std)
    scale = scale.view(1, -1, 1, 1).to(x.device, non_blocking=True)
    shift = shift.view(1, -1, 1, 1).to(x.device, non_blocking=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)
    return torch.addcmul(shift, x, scale, out=out)


class GpuAugment:
    """Batched crop + flip + normalise with reproducible parameters.

    mode: "crop" (the seed's: crop x crop at a random place, then flip p=0.5), "rrc"
    (RandomResizedCrop(scale, ratio) + flip) or "center" (eval: center crop, no flip).
    Parameters come from a CPU torch.Generator seeded with `seed` (give each rank/epoch its own);
    called with a batch index, from a generator seeded by (seed, index), so that several decode
    threads give the same crops whichever of them takes the batch."""

    def __init__(self, crop_size, mode="crop", mean=None, std=None, dtype=torch.float32, seed=0,
                 flip=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), channels_last=True,
                 backend="auto"):
        if mode not in ("crop", "rrc", "center"):
            raise ValueError(f"unknown mode {mode!r}: choose crop, rrc or center")
        self.crop_size, self.mode = crop_size, mode
        self.mean, self.std, self.dtype = mean, std, dtype
        self.flip = flip and mode != "center"
        self.scale, self.ratio, self.channels_last = scale, ratio, channels_last
        self.seed, self.backend = seed, backend
        self.gen = torch.Generator().manual_seed(seed)

    def boxes(self, sizes, index=None):
        """(N, 2) int (h, w) -> (N, 4) float64 boxes, mirrored ones with x1 > x2."""
        sizes = torch.as_tensor(sizes, dtype=torch.int64).view(-1, 2)
        gen = self.gen if index is None else torch.Generator().manual_seed(
            (self.seed * 1_000_003 + index) % (2 ** 63))
        if self.mode == "crop":
            boxes = crop_boxes(sizes, self.crop_size, gen)
        elif self.mode == "rrc":
            boxes = rrc_boxes(sizes, self.crop_size, gen, self.scale, self.ratio)
        else:
            boxes = center_boxes(sizes, self.crop_size)
        if self.flip:
            boxes, _ = flip_boxes(boxes, gen)
        return boxes

    def __call__(self, images, index=None):
        """images: a list of 3 x H x W uint8 images or a DecodedBatch."""
        sizes = images.sizes() if isinstance(images, DecodedBatch) else [tuple(im.shape[-2:]) for im in images]
        boxes = self.boxes(sizes, index)
        return crop_batch(images, boxes, self.crop_size, self.mean, self.std, self.dtype,
                          self.channels_last, self.backend)

    def normalize(self, x):
        """An already cropped uint8 NCHW part (hybrid mode) -> the same output format."""
        if self.mean is None:
            return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        return normalize(x, self.mean, self.std, self.dtype, self.channels_last)


# ---------------------------------------------------------------------------------------- pipeline

def _fields(raw, unpack=True):
    """A raw batch: a dict from pack_jpegs' workers, or a (list of bytes, labels[, keys]) tuple.
    unpack=False: a packed dict's blobs come back as None (its decoder reads the buffer)."""
    if isinstance(raw, dict):
        if "data" in raw:
            blobs = unpack_jpegs(raw["data"], raw["offsets"]) if unpack else None
        else:
            blobs = list(raw.get("jpegs", []))
        labels = torch.as_tensor(raw["labels"], dtype=torch.int64)
        keys = raw.get("keys") or [str(i) for i in range(len(labels))]
        return blobs, labels, keys, raw.get("pre"), raw.get("pre_labels")
    blobs, labels = raw[0], torch.as_tensor(raw[1], dtype=torch.int64)
    keys = raw[2] if len(raw) > 2 else [str(i) for i in range(len(blobs))]
    return list(blobs), labels, keys, None, None


def _to_device(t, device):
    """CPU tensor -> device without blocking the host (through pinned memory on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


_DONE = object()


class GpuBatchPipeline:
    """Raw batches in, ready (x, y) on `device` out, prepared ahead in side CUDA streams.

    threads >= 1: a fetch thread pulls raw batches (DataLoader) into a queue; `threads` decode
    threads, each with its own CUDA stream, decode and crop them (their host work, e.g. nvJPEG's
    Huffman stage, overlaps the training loop's Python); batches come out in their original
    order, with crops drawn per batch index (the same whichever thread made them). threads=0:
    batch i+1 is queued on one side stream before batch i is handed out, all in the caller's
    thread. On a CPU device the same runs without streams (threads=0: all in the caller's thread).

    decoder: a name for gpu_decoder ("nvjpeg", "hardware", "engine"; each thread makes its own,
    as the hardware engines take several decoders at once) or one decoder shared by all threads
    (a callable on a list of images, or an object with decode_packed).
    pool: a DecoderPool the threads take their decoders from and give them back to when the
    iteration ends (tools.train: one for its epochs, one for validation); None: each thread makes
    its own and drops it.
    priority: of the decode streams (-1: high, 0: normal). stall_timeout: seconds without a batch
    from the threads after which the consumer raises, with every thread's stack on stderr (a
    decoder stuck in a library call must not hang a training run silently)."""

    def __init__(self, batches, augment, device="cuda", prefetch=3, threads=1, decoder="auto",
                 on_failure=None, priority=0, stall_timeout=600.0, pool=None):
        self.batches, self.augment, self.pool = batches, augment, pool
        self.device = torch.device(device)
        self.prefetch, self.threads, self.decoder = max(1, prefetch), max(0, threads), decoder
        self.priority, self.stall_timeout = priority, stall_timeout
        self._local = threading.local()
        self.decoder_kind = None
        self.on_failure = on_failure or (lambda key, reason: warnings.warn(f"dropped {key}: {reason}"))
        self._lock = threading.Lock()
        # host seconds spent per stage by whoever prepares batches (enqueue time, not GPU time):
        # tells which part of the producer limits the rate; engine_*: the parts of decode_s in a
        # thread's own decoder that times them (tools.imagenet.nvjpeg.PARTS)
        self.stats = {"batches": 0, "fetch_s": 0.0, "decode_s": 0.0, "augment_s": 0.0,
                      **{f"engine_{part}_s": 0.0 for part in ENGINE_PARTS}}

    def __len__(self):
        return len(self.batches)

    @property
    def num_samples(self):
        return getattr(self.batches, "num_samples", None)

    def _add(self, **seconds):
        with self._lock:
            for k, v in seconds.items():
                self.stats[k] += v

    def _report(self, failures):
        with self._lock:
            for key, reason in failures:
                self.on_failure(key, reason)

    def thread_decoder(self):
        """This thread's decoder (taken from the pool or made on first use; None: decode_jpegs'
        default)."""
        if not isinstance(self.decoder, str):  # None, or one decoder object shared by all threads
            return self.decoder
        if self.device.type != "cuda" and self.pool is None:
            return None
        if getattr(self._local, "decoder", None) is None:
            self._local.decoder = (self.pool.take(self.decoder, self.device) if self.pool is not None
                                   else gpu_decoder(self.decoder, self.device))
            self.decoder_kind = self._local.decoder.kind
        return self._local.decoder

    @contextlib.contextmanager
    def _lending(self, stream):
        """Around a thread's decoding: its decoder goes back to the pool when the block ends or its
        consumer stops early, once `stream` (where it queued work) is done; after an error it is
        dropped, its state unknown."""
        try:
            yield
        except GeneratorExit:
            self._give_back(stream)
            raise
        except BaseException:
            self._local.decoder = None
            raise
        self._give_back(stream)

    def _give_back(self, stream):
        decoder = getattr(self._local, "decoder", None)
        if self.pool is None or decoder is None:
            return
        if stream is not None:
            stream.synchronize()
        self._local.decoder = None
        self.pool.give(self.decoder, self.device, decoder)

    def process(self, raw, index=None):
        """One raw batch -> (x, y) on the device, in the current stream."""
        parts_x, parts_y = [], []
        t0 = t1 = time.perf_counter()
        decoder = self.thread_decoder()
        # one buffer in, one out: a few operations per batch instead of a few per image
        packed = hasattr(decoder, "decode_packed") and isinstance(raw, dict) and "data" in raw
        blobs, labels, keys, pre, pre_labels = _fields(raw, unpack=not packed)
        keep, engine = [], {}
        if packed:
            # a decoder shared by the threads adds up their calls at once: no per-batch parts then
            timed = getattr(decoder, "seconds", None) if isinstance(self.decoder, str) else None
            before = dict(timed) if isinstance(timed, dict) else None
            images, failures = decode_packed(raw["data"], raw["offsets"], keys, self.device, decoder,
                                             raw.get("frames"))
            keep = images.index.tolist()
            if before is not None:
                engine = {f"engine_{part}_s": timed.get(part, 0.0) - before.get(part, 0.0)
                          for part in ENGINE_PARTS}
        elif blobs:
            images, failures = decode_jpegs(blobs, self.device, keys, decoder)
            keep = [i for i, im in enumerate(images) if im is not None]
            images = [images[i] for i in keep]
        if packed or blobs:
            self._report(failures)
            t1 = time.perf_counter()
            if keep:
                parts_x.append(self.augment(images, index))
                parts_y.append(labels[keep] if len(keep) < len(labels) else labels)
        if pre is not None and len(pre):
            parts_x.append(self.augment.normalize(_to_device(pre, self.device)))
            parts_y.append(torch.as_tensor(pre_labels, dtype=torch.int64))
        if not parts_x:
            raise ValueError("a batch with no decodable image: see the failures reported above")
        x = parts_x[0] if len(parts_x) == 1 else torch.cat(parts_x)
        y = _to_device(torch.cat(parts_y), self.device)
        self._add(decode_s=t1 - t0, augment_s=time.perf_counter() - t1, batches=1, **engine)
        return x, y

    def _fetch(self, it):
        t0 = time.perf_counter()
        raw = next(it, _DONE)
        self._add(fetch_s=time.perf_counter() - t0)
        return raw

    def __iter__(self):
        cuda = self.device.type == "cuda"
        if self.threads:
            yield from self._threaded()
        elif cuda:
            yield from self._inline(self._stream())
        else:
            it = iter(self.batches)
            index = 0
            with self._lending(None):
                while (raw := self._fetch(it)) is not _DONE:
                    yield self.process(raw, index)
                    index += 1

    def _stream(self):
        if self.device.type != "cuda":
            return None
        return torch.cuda.Stream(self.device, priority=self.priority)

    def _submit(self, stream, raw, index):
        if stream is None:  # CPU device: nothing to overlap with
            return (*self.process(raw, index), None)
        with torch.cuda.stream(stream):
            x, y = self.process(raw, index)
            event = torch.cuda.Event()
            event.record(stream)
        return x, y, event

    def _hand_over(self, x, y, event):
        if event is None:
            return x, y
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        # made on a side stream, used on this one: keep the memory until this stream is done
        x.record_stream(current)
        y.record_stream(current)
        return x, y

    def _inline(self, stream):
        it = iter(self.batches)
        with self._lending(stream):
            # range first: zip stops on it without pulling (and losing) one more raw batch
            pending = [self._submit(stream, raw, i) for i, raw in zip(range(self.prefetch), it)]
            index = len(pending)
            while pending:
                x, y, event = pending.pop(0)
                nxt = self._fetch(it)
                if nxt is not _DONE:
                    pending.append(self._submit(stream, nxt, index))
                    index += 1
                yield self._hand_over(x, y, event)

    def _threaded(self):
        todo = queue.Queue(maxsize=self.prefetch + self.threads)
        ready = queue.Queue()
        # batches decoded (or being decoded) but not yet handed over: without this bound the
        # threads run ahead of a slow consumer (e.g. a step being compiled) and fill the GPU
        slots = threading.Semaphore(self.prefetch + self.threads)
        stop = threading.Event()
        # iter() here, in the caller's thread, before any of ours runs: a DataLoader (and
        # tools.imagenet.loader.Loader) forks its worker processes on iter()
        it = iter(self.batches)

        def put(q, item):  # gives up when the consumer has gone
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def fetch():
            try:
                index = 0
                while not stop.is_set() and (raw := self._fetch(it)) is not _DONE:
                    if not put(todo, (index, raw)):
                        return
                    index += 1
            except BaseException as exc:  # handed to the consumer, raised there
                ready.put((-1, exc))
            for _ in range(self.threads):
                put(todo, None)

        def decode():
            stream = self._stream()
            try:
                with torch.cuda.device(self.device) if stream is not None else contextlib.nullcontext(), \
                        self._lending(stream):
                    while not stop.is_set():
                        # the slot first, then the batch: slots then belong to the batches right
                        # after the consumer's, never to later ones while an earlier one waits
                        if not slots.acquire(timeout=0.1):
                            continue
                        item = _DONE
                        while item is _DONE and not stop.is_set():
                            try:
                                item = todo.get(timeout=0.1)
                            except queue.Empty:
                                pass
                        if item is None or item is _DONE:
                            slots.release()
                            break
                        ready.put((item[0], self._submit(stream, item[1], item[0])))
            except BaseException as exc:
                ready.put((-1, exc))
            ready.put((-1, _DONE))

        workers = [threading.Thread(target=fetch, name="gpu-fetch", daemon=True)]
        workers += [threading.Thread(target=decode, name=f"gpu-decode-{k}", daemon=True)
                    for k in range(self.threads)]
        for t in workers:
            t.start()
        pending, index, finished, stalled = {}, 0, 0, False
        try:
            while True:
                if index in pending:
                    batch = self._hand_over(*pending.pop(index))
                    slots.release()
                    index += 1
                    yield batch
                    continue
                if finished == self.threads:
                    return
                try:
                    i, item = ready.get(timeout=self.stall_timeout)
                except queue.Empty:
                    try:
                        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                    except (AttributeError, ValueError, OSError):  # a stderr without a file descriptor
                        pass
                    stalled = True
                    raise RuntimeError(f"no batch from the data pipeline's threads for {self.stall_timeout:.0f} s "
                                       f"(their stacks are on stderr above)") from None
                if item is _DONE:
                    finished += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    pending[i] = item
        finally:
            stop.set()
            # unblock threads waiting on a queue; a stalled one may never return (daemon threads)
            deadline = time.monotonic() + (5.0 if stalled else float("inf"))
            while any(t.is_alive() for t in workers) and time.monotonic() < deadline:
                for q in (todo, ready):
                    try:
                        q.get_nowait()
                    except queue.Empty:
                        pass
                for t in workers:
                    t.join(timeout=0.05)
            close = getattr(it, "close", None)
            if close is not None:
                close()


# ---------------------------------------------------------------------------------------- helpers

def val_pipeline(loader, device, crop_size, mean, std, on_failure=None, threads=1, decoder="auto",
                 pool=None):
    """Center crops of a decode="gpu" val loader as normalised float32 NCHW on `device`: the same
    input the CPU path gives the model (tools.imagenet.evaluation.evaluate takes either)."""
    aug = GpuAugment(crop_size, mode="center", mean=mean, std=std, dtype=torch.float32,
                     channels_last=False)
    return GpuBatchPipeline(loader, aug, device, threads=threads, on_failure=on_failure, decoder=decoder,
                            pool=pool)


def failure_log(path, **context):
    """on_failure callback: every image no decoder can read goes to stderr and is appended to the
    TSV `path` (key, reason, then the context values, e.g. epoch and rank), header on creation."""
    from pathlib import Path
    path = Path(path)

    def report(key, reason):
        print(f"bad sample {key}: {reason} (dropped from its batch; listed in {path})",
              file=sys.stderr, flush=True)
        new = not path.exists()
        with open(path, "a") as f:
            if new:
                f.write("\t".join(["key", "reason", *context]) + "\n")
            f.write("\t".join([key, reason.replace("\t", " ").replace("\n", " "),
                                *map(str, context.values())]) + "\n")
    return report
