"""GPU JPEG decode + batched train/eval augmentation, overlapped with training in a side stream.

Usage:
    from tools.imagenet.gpu_data import GpuAugment, GpuBatchPipeline, pack_jpegs
    aug = GpuAugment(224, mode="crop", mean=mean, std=std, seed=seed * 1000 + rank)   # or "rrc", "center"
    # raw batches as loader workers hand them over, undecoded:
    #   {"data": uint8 1-D, "offsets": int64 N+1, "labels": int64 N, "keys": [N str]}   (see pack_jpegs)
    for x, y in GpuBatchPipeline(raw_batches, aug, device="cuda"):
        loss = criterion(model(x), y)          # x: normalised float NCHW, channels_last, on the GPU

Pieces:
- decode_jpegs(blobs, device): batched nvJPEG through torchvision (one bad image fails the whole
  batch: the batch is then split in halves until the bad ones are isolated), CPU fallback with PIL by
  content (CMYK, grayscale, PNG named .jpg ...) and a list of (key, reason) for what nothing decodes.
  On a CPU device everything runs on the CPU (libjpeg-turbo through torchvision, then PIL).
- GpuAugment: crop parameters drawn on the CPU with a seeded torch.Generator, vectorised over the
  batch (no per-image Python RNG calls); the crops themselves are ONE torchvision.ops.roi_align over
  the zero-padded batch. The flip is part of the same call (a box whose x1 > x2 samples mirrored),
  and a 4th "inside the image" channel renormalises the samples that would touch the padding, so
  the result is the same as clamping at the image edge. With sampling_ratio 1 an unscaled crop
  (the seed's 224 crop of a 256 image) copies exact pixels; scaled crops average
  ceil(box side / crop) samples per output pixel in each direction (a box filter, like PIL's
  antialiasing on downscale). Normalisation ((x/255 - mean)/std) writes channels_last output.
- GpuBatchPipeline: a background thread decodes and crops batch i+1 in its own CUDA stream while
  the training step of batch i runs; the consumer's stream waits on an event, and the tensors are
  recorded on the consumer's stream so the caching allocator keeps them until they are used.
  Hybrid mode: a batch may carry a CPU-decoded, already cropped uint8 part ("pre", "pre_labels"),
  normalised on the GPU and concatenated.
- nvimgcodec_decoder(): the nvImageCodec decoder (hardware JPEG engine where the GPU has one),
  used where `nvidia.nvimgcodec` imports; None otherwise.

Images no decoder can read are dropped from their batch (it gets smaller) and reported through
`on_failure(key, reason)` (default: a warning) and `GpuBatchPipeline.failures`; never silently.
"""
import io
import math
import queue
import threading
import time
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.ops import roi_align

from torchvision.io import ImageReadMode
from torchvision.io import decode_jpeg as _tv_decode_jpeg

from tools.resize import to_8bit

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

    Workers return this instead of a list of bytes: two tensors travel through shared memory,
    whereas a list of bytes is pickled through a pipe."""
    sizes = [len(b) for b in blobs]
    offsets = torch.zeros(len(blobs) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
    data = torch.from_numpy(np.frombuffer(b"".join(blobs), dtype=np.uint8).copy())
    return data, offsets


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
    """Any image PIL reads, found by content -> uint8 3 x H x W RGB tensor (CPU).

    CMYK, grayscale, palette, 16-bit and alpha images are converted as the resize stage does."""
    data = blob.numpy().tobytes() if isinstance(blob, torch.Tensor) else bytes(blob)
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = to_8bit(img)
        if rgb.mode != "RGB":
            rgb = rgb.convert("RGB")
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def torchvision_gpu_decoder(device):
    """Batched nvJPEG through torchvision: list of uint8 1-D CPU tensors -> list of 3xHxW on device."""
    def decode(tensors):
        return decode_jpeg(tensors, device=device, mode=ImageReadMode.RGB)
    return decode


def nvimgcodec_decoder(device="cuda", hardware=True):
    """nvImageCodec batched decoder with the same interface, or None where it is not installed.

    hardware=True prefers the GPU's hardware JPEG engine (A100/H100 have one), then CUDA decode.
    Needs libnvjpeg (CUDA toolkit's lib64 on LD_LIBRARY_PATH, or the nvidia-nvjpeg wheel)."""
    try:
        from nvidia import nvimgcodec
    except ImportError:
        return None
    backends = [nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY)]
    if hardware:
        backends.insert(0, nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY))
    dev = torch.device(device)
    dec = nvimgcodec.Decoder(device_id=dev.index or 0, backends=backends)
    params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                     allow_any_depth=False, sample_format=nvimgcodec.SampleFormat.P_RGB)

    def decode(tensors):
        stream = torch.cuda.current_stream(dev)
        streams = [nvimgcodec.CodeStream(t.numpy()) for t in tensors]
        out = dec.decode(streams, params=params, cuda_stream=stream.cuda_stream)
        if any(im is None for im in out):
            raise RuntimeError("nvimgcodec could not decode an image of the batch")
        images = []
        for im in out:  # planar RGB on the device, owned by nvimgcodec: copy in our stream
            t = torch.as_tensor(im, device=dev)
            images.append((t if t.shape[0] == 3 else t.permute(2, 0, 1)).clone())
        return images
    return decode


def _cpu_decode(blob):
    """libjpeg-turbo through torchvision, then PIL by content; raises if neither can."""
    try:
        return decode_jpeg(blob, mode=ImageReadMode.RGB)
    except Exception:  # not a JPEG, CMYK on an old torchvision, truncated ...: try PIL
        return pil_decode(blob)


def decode_jpegs(blobs, device, keys=None, decoder=None):
    """Decode a batch. Returns (images, failures): images is aligned with blobs (uint8 3xHxW on
    `device`, None where nothing could decode it), failures a list of (key, reason).

    On CUDA the batch goes to `decoder` (default: torchvision's batched nvJPEG) in one call. That call
    fails as a whole on one bad image, so on failure the batch is halved until the culprits stand
    alone; those are decoded on the CPU with PIL by content and copied over."""
    device = torch.device(device)
    keys = list(keys) if keys is not None else [str(i) for i in range(len(blobs))]
    tensors = [_as_tensor(b) for b in blobs]
    images, failures = [None] * len(tensors), []

    def fallback(i):
        try:
            images[i] = _cpu_decode(tensors[i]).to(device, non_blocking=True)
        except Exception as exc:
            failures.append((keys[i], f"cannot decode: {type(exc).__name__}: {exc}"))

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
            images[i] = im

    if tensors:
        run(list(range(len(tensors))))
    return images, failures


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

def pad_batch(images, dtype=torch.float32):
    """list of 3 x h_i x w_i uint8 -> (N, 4, Hmax, Wmax) float: RGB zero-padded plus a 4th channel
    that is 1 inside each image and 0 in its padding."""
    n = len(images)
    device = images[0].device
    hs = torch.tensor([im.shape[-2] for im in images])
    ws = torch.tensor([im.shape[-1] for im in images])
    hm, wm = int(hs.max()), int(ws.max())
    out = torch.zeros((n, 4, hm, wm), dtype=dtype, device=device)
    for i, im in enumerate(images):  # one copy kernel each: the decoder hands over separate tensors
        out[i, :3, :im.shape[-2], :im.shape[-1]].copy_(im, non_blocking=True)
    rows = torch.arange(hm, device=device)[None, :, None] < hs.to(device)[:, None, None]
    cols = torch.arange(wm, device=device)[None, None, :] < ws.to(device)[:, None, None]
    out[:, 3] = rows & cols
    return out


def crop_batch(images, boxes, crop, mean=None, std=None, dtype=torch.float32, channels_last=True):
    """Crop/resize/flip every image to crop x crop through one roi_align, then normalise.

    boxes: float (N, 4) x1, y1, x2, y2 (x1 > x2 = mirrored). mean/std (0..1 per channel) given:
    returns (x/255 - mean)/std in `dtype`; else rounded uint8."""
    if not images:
        raise ValueError("crop_batch: empty batch")
    padded = pad_batch(images)
    device = padded.device
    widths = (boxes[:, 2] - boxes[:, 0]).abs()
    heights = boxes[:, 3] - boxes[:, 1]
    # one sample per output pixel when no box is larger than the crop (exact copies for unscaled
    # crops), more when shrinking so that every source pixel contributes (box filter)
    sampling = max(1, math.ceil(float(torch.maximum(widths, heights).max()) / crop - 1e-9))
    rois = torch.cat([torch.arange(len(images), dtype=torch.float64)[:, None], boxes.double()], 1)
    out = roi_align(padded, rois.to(device=device, dtype=padded.dtype, non_blocking=True), (crop, crop),
                    spatial_scale=1.0, sampling_ratio=sampling, aligned=True)
    rgb = out[:, :3] / out[:, 3:]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if mean is None:
        return rgb.round_().clamp_(0, 255).to(torch.uint8, memory_format=fmt)
    return normalize(rgb, mean, std, dtype, channels_last)


def normalize(x, mean, std, dtype=torch.float32, channels_last=True):
    """uint8 or float 0..255 NCHW -> (x/255 - mean)/std in dtype, one fused multiply-add."""
    scale = (1.0 / (255.0 * torch.as_tensor(std, dtype=torch.float32))).view(1, -1, 1, 1)
    shift = (-torch.as_tensor(mean, dtype=torch.float32) / torch.as_tensor(std, dtype=torch.float32))
    scale, shift = scale.to(x.device), shift.view(1, -1, 1, 1).to(x.device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)
    return torch.addcmul(shift, x, scale, out=out)


class GpuAugment:
    """Batched crop + flip + normalise with reproducible parameters.

    mode: "crop" (the seed's: crop x crop at a random place, then flip p=0.5), "rrc"
    (RandomResizedCrop(scale, ratio) + flip) or "center" (eval: center crop, no flip).
    Parameters come from a CPU torch.Generator seeded with `seed`: give each rank/epoch its own."""

    def __init__(self, crop_size, mode="crop", mean=None, std=None, dtype=torch.float32, seed=0,
                 flip=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), channels_last=True):
        if mode not in ("crop", "rrc", "center"):
            raise ValueError(f"unknown mode {mode!r}: choose crop, rrc or center")
        self.crop_size, self.mode = crop_size, mode
        self.mean, self.std, self.dtype = mean, std, dtype
        self.flip = flip and mode != "center"
        self.scale, self.ratio, self.channels_last = scale, ratio, channels_last
        self.gen = torch.Generator().manual_seed(seed)

    def boxes(self, sizes):
        """(N, 2) int (h, w) -> (N, 4) float64 boxes, mirrored ones with x1 > x2."""
        sizes = torch.as_tensor(sizes, dtype=torch.int64).view(-1, 2)
        if self.mode == "crop":
            boxes = crop_boxes(sizes, self.crop_size, self.gen)
        elif self.mode == "rrc":
            boxes = rrc_boxes(sizes, self.crop_size, self.gen, self.scale, self.ratio)
        else:
            boxes = center_boxes(sizes, self.crop_size)
        if self.flip:
            boxes, _ = flip_boxes(boxes, self.gen)
        return boxes

    def __call__(self, images):
        boxes = self.boxes([im.shape[-2:] for im in images])
        return crop_batch(images, boxes, self.crop_size, self.mean, self.std, self.dtype,
                          self.channels_last)

    def normalize(self, x):
        """An already cropped uint8 NCHW part (hybrid mode) -> the same output format."""
        if self.mean is None:
            return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        return normalize(x, self.mean, self.std, self.dtype, self.channels_last)


# ---------------------------------------------------------------------------------------- pipeline

def _fields(raw):
    """A raw batch: a dict from pack_jpegs' workers, or a (list of bytes, labels[, keys]) tuple."""
    if isinstance(raw, dict):
        blobs = unpack_jpegs(raw["data"], raw["offsets"]) if "data" in raw else list(raw.get("jpegs", []))
        labels = torch.as_tensor(raw["labels"], dtype=torch.int64)
        keys = raw.get("keys") or [str(i) for i in range(len(blobs))]
        return blobs, labels, keys, raw.get("pre"), raw.get("pre_labels")
    blobs, labels = raw[0], torch.as_tensor(raw[1], dtype=torch.int64)
    keys = raw[2] if len(raw) > 2 else [str(i) for i in range(len(blobs))]
    return list(blobs), labels, keys, None, None


class GpuBatchPipeline:
    """Raw batches in, ready (x, y) on `device` out, prepared ahead in a side CUDA stream.

    threaded=True: a background thread pulls raw batches, decodes and crops them (its CPU work,
    e.g. nvJPEG's Huffman stage, overlaps the training loop's Python too); up to `prefetch` ready
    batches wait in a queue. threaded=False: batch i+1 is queued on the side stream before batch i
    is handed out. On a CPU device it runs inline with no streams (for tests)."""

    def __init__(self, batches, augment, device="cuda", prefetch=2, threaded=True, decoder=None,
                 on_failure=None):
        self.batches, self.augment = batches, augment
        self.device = torch.device(device)
        self.prefetch, self.threaded, self.decoder = max(1, prefetch), threaded, decoder
        self.on_failure = on_failure or (lambda key, reason: warnings.warn(f"dropped {key}: {reason}"))
        self.failures = []
        # host seconds spent per stage by whoever prepares batches (enqueue time, not GPU time):
        # tells which part of the producer limits the rate
        self.stats = {"batches": 0, "fetch_s": 0.0, "decode_s": 0.0, "augment_s": 0.0}

    def __len__(self):
        return len(self.batches)

    def process(self, raw):
        """One raw batch -> (x, y) on the device, in the current stream."""
        blobs, labels, keys, pre, pre_labels = _fields(raw)
        parts_x, parts_y = [], []
        t0 = time.perf_counter()
        if blobs:
            images, failures = decode_jpegs(blobs, self.device, keys, self.decoder)
            for key, reason in failures:
                self.failures.append((key, reason))
                self.on_failure(key, reason)
            keep = [i for i, im in enumerate(images) if im is not None]
            t1 = time.perf_counter()
            self.stats["decode_s"] += t1 - t0
            t0 = t1
            if keep:
                parts_x.append(self.augment([images[i] for i in keep]))
                parts_y.append(labels[keep])
        if pre is not None and len(pre):
            parts_x.append(self.augment.normalize(pre.to(self.device, non_blocking=True)))
            parts_y.append(torch.as_tensor(pre_labels, dtype=torch.int64))
        if not parts_x:
            raise ValueError("a batch with no decodable image: see the failures reported above")
        x = parts_x[0] if len(parts_x) == 1 else torch.cat(parts_x)
        y = torch.cat(parts_y).to(self.device, non_blocking=True)
        self.stats["augment_s"] += time.perf_counter() - t0
        self.stats["batches"] += 1
        return x, y

    def _fetch(self, it):
        t0 = time.perf_counter()
        raw = next(it, None)
        self.stats["fetch_s"] += time.perf_counter() - t0
        return raw

    def __iter__(self):
        if self.device.type != "cuda":
            it = iter(self.batches)
            while (raw := self._fetch(it)) is not None:
                yield self.process(raw)
            return
        stream = torch.cuda.Stream(self.device)
        if self.threaded:
            yield from self._threaded(stream)
        else:
            yield from self._inline(stream)

    def _submit(self, stream, raw):
        with torch.cuda.stream(stream):
            x, y = self.process(raw)
            event = torch.cuda.Event()
            event.record(stream)
        return x, y, event

    def _hand_over(self, x, y, event):
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        # made on the side stream, used on this one: keep the memory until this stream is done
        x.record_stream(current)
        y.record_stream(current)
        return x, y

    def _inline(self, stream):
        it = iter(self.batches)
        # range first: zip stops on it without pulling (and losing) one more raw batch
        pending = [self._submit(stream, raw) for _, raw in zip(range(self.prefetch), it)]
        while pending:
            x, y, event = pending.pop(0)
            nxt = self._fetch(it)
            if nxt is not None:
                pending.append(self._submit(stream, nxt))
            yield self._hand_over(x, y, event)

    def _threaded(self, stream):
        ready = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()
        # created here, in the caller's thread: a DataLoader forks its workers on iter()
        it = iter(self.batches)

        def produce():
            try:
                with torch.cuda.device(self.device):
                    while (raw := self._fetch(it)) is not None:
                        if stop.is_set():
                            return
                        ready.put(self._submit(stream, raw))
                ready.put(done)
            except BaseException as exc:  # handed to the consumer, raised there
                ready.put(exc)

        thread = threading.Thread(target=produce, name="gpu-decode", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield self._hand_over(*item)
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get(timeout=0.1)
                except queue.Empty:
                    pass
            thread.join()
