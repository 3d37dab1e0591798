"""tools.imagenet.gpu_data on CPU tensors: crop geometry against torchvision's CPU transforms,
exact pixels for the seed's crop, flips, normalisation, the decode fallbacks, the Triton crop kernel
(interpreter) against the torch version, the threaded pipeline, and the GPU data path wired into
the loader, training and evaluation (its code run on the CPU): same eval top-1 as the CPU path."""
import ctypes
import io
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from tests._shards import corrupt_sample, write_shards
from tests.conftest import project_env
from tests.test_evaluate import trained_run
from tools import evaluate as E
from tools import train
from tools.imagenet import gpu_data as gd
from tools.imagenet import loader as L
from tools.imagenet import preprocess

DRAWS = 20_000


def _boxes_stats(boxes):
    """Per-box (crop width, crop height, left, top, log aspect) of float boxes, flips undone."""
    x1 = torch.minimum(boxes[:, 0], boxes[:, 2])
    w = (boxes[:, 2] - boxes[:, 0]).abs()
    h = boxes[:, 3] - boxes[:, 1]
    return {"w": w, "h": h, "x": x1, "y": boxes[:, 1], "logar": torch.log(w / h)}


def _tv_stats(params):
    p = torch.tensor(params, dtype=torch.float64)  # (i, j, h, w) per draw
    return {"w": p[:, 3], "h": p[:, 2], "x": p[:, 1], "y": p[:, 0], "logar": torch.log(p[:, 3] / p[:, 2])}


def _assert_same_distribution(ours, ref, side):
    qs = torch.tensor([0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95], dtype=torch.float64)
    for name in ours:
        a, b = ours[name], ref[name]
        tol = 0.06 if name == "logar" else 0.02 * side
        assert abs(a.mean() - b.mean()) < tol, (name, a.mean(), b.mean())
        assert abs(a.std() - b.std()) < tol, (name, a.std(), b.std())
        diff = (torch.quantile(a, qs) - torch.quantile(b, qs)).abs().max()
        assert diff <= max(tol, 1.0), (name, torch.quantile(a, qs), torch.quantile(b, qs))


@pytest.mark.parametrize("hw", [(256, 341), (341, 256), (256, 256)])
def test_rrc_matches_torchvision_distribution(hw):
    h, w = hw
    torch.manual_seed(1)
    img = Image.new("RGB", (w, h))
    ref = [T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(DRAWS)]
    sizes = torch.tensor([hw] * DRAWS)
    ours = gd.rrc_boxes(sizes, 224, torch.Generator().manual_seed(2))
    _assert_same_distribution(_boxes_stats(ours), _tv_stats(ref), max(hw))
    # every box inside the image, with positive size
    assert (ours[:, :2] >= 0).all() and (ours[:, 2] <= w).all() and (ours[:, 3] <= h).all()
    assert ((ours[:, 2:] - ours[:, :2]) > 0).all()


def test_rrc_fallback_matches_torchvision():
    # a very wide image: most draws do not fit, so torchvision's central fallback shows up often
    h, w = 60, 600
    torch.manual_seed(3)
    img = Image.new("RGB", (w, h))
    n = 4000
    ref = _tv_stats([T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)])
    ours = _boxes_stats(gd.rrc_boxes(torch.tensor([[h, w]] * n), 32, torch.Generator().manual_seed(4)))
    fallback_w = round(h * 4 / 3)
    frac_ref = ((ref["w"] == fallback_w) & (ref["h"] == h)).double().mean()
    frac_ours = ((ours["w"] == fallback_w) & (ours["h"] == h)).double().mean()
    assert frac_ref > 0.2
    assert abs(frac_ref - frac_ours) < 0.04
    _assert_same_distribution(ours, ref, w)


@pytest.mark.parametrize("hw", [(256, 341), (300, 256)])
def test_seed_crop_matches_torchvision_random_crop(hw):
    torch.manual_seed(5)
    img = Image.new("RGB", (hw[1], hw[0]))
    ref = _tv_stats([T.RandomCrop.get_params(img, (224, 224)) for _ in range(DRAWS)])
    ours = _boxes_stats(gd.crop_boxes(torch.tensor([hw] * DRAWS), 224, torch.Generator().manual_seed(6)))
    assert (ours["w"] == 224).all() and (ours["h"] == 224).all()
    _assert_same_distribution(ours, ref, max(hw))
    # every position reachable, including both ends
    assert ours["x"].min() == 0 and ours["x"].max() == hw[1] - 224
    assert ours["y"].min() == 0 and ours["y"].max() == hw[0] - 224


def test_flip_probability_is_half():
    boxes = gd.crop_boxes(torch.tensor([[256, 341]] * DRAWS), 224, torch.Generator().manual_seed(7))
    flipped_boxes, flipped = gd.flip_boxes(boxes, torch.Generator().manual_seed(8))
    assert abs(flipped.double().mean() - 0.5) < 0.015
    assert (flipped_boxes[flipped, 0] > flipped_boxes[flipped, 2]).all()
    assert (flipped_boxes[~flipped] == boxes[~flipped]).all()


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


def test_unscaled_crop_copies_exact_pixels():
    sizes = [(72, 96), (96, 72), (64, 64), (80, 130), (72, 72)]
    images = _images(sizes * 4)
    aug = gd.GpuAugment(64, mode="crop", seed=9)
    boxes = aug.boxes([im.shape[-2:] for im in images])
    out = gd.crop_batch(images, boxes, 64)
    assert out.dtype == torch.uint8 and out.shape == (len(images), 3, 64, 64)
    assert out.is_contiguous(memory_format=torch.channels_last)
    flips = 0
    for im, box, o in zip(images, boxes.tolist(), out):
        x1, y1, x2, _ = box
        left, top = int(min(x1, x2)), int(y1)
        assert left == min(x1, x2) and top == y1  # integer positions
        ref = im[:, top:top + 64, left:left + 64]
        if x1 > x2:
            ref, flips = ref.flip(-1), flips + 1
        assert torch.equal(o, ref)
    assert 0 < flips < len(images)


def test_center_crop_equals_torchvision_and_preprocess():
    images = _images([(256, 341), (341, 256), (256, 256), (72, 101), (90, 64)], seed=1)
    crop = 64
    aug = gd.GpuAugment(crop, mode="center")
    out = aug(images)
    for im, o in zip(images, out):
        assert torch.equal(o, preprocess.center_crop(im, crop))
    # torchvision rounds (H - crop) / 2 half to even; on the sizes of prepared data it agrees
    big = _images([(256, 341), (341, 256), (256, 256)], seed=2)
    out = gd.GpuAugment(224, mode="center")(big)
    for im, o in zip(big, out):
        assert torch.equal(o, T.CenterCrop(224)(im))


def test_rrc_pixels_close_to_torchvision_resized_crop():
    # smooth images: the box filter/bilinear of roi_align and torchvision's antialiased resize agree
    yy, xx = torch.meshgrid(torch.arange(90.0), torch.arange(120.0), indexing="ij")
    img = torch.stack([xx * 2, yy * 2.5, (xx + yy)]).clamp(0, 255).round().to(torch.uint8)
    images = [img] * 16
    aug = gd.GpuAugment(48, mode="rrc", seed=10, flip=False)
    boxes = aug.boxes([im.shape[-2:] for im in images])
    out = gd.crop_batch(images, boxes, 48)
    for box, o in zip(boxes.tolist(), out):
        x1, y1, x2, y2 = map(int, box)
        ref = TF.resized_crop(img, y1, x1, y2 - y1, x2 - x1, [48, 48], antialias=True)
        assert (o.float() - ref.float()).abs().mean() < 2.0


def test_normalise_and_dtype():
    images = _images([(64, 80)] * 3, seed=3)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    aug = gd.GpuAugment(64, mode="center", mean=mean, std=std, dtype=torch.bfloat16)
    out = aug(images)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    ref = preprocess.normalize(torch.stack([preprocess.center_crop(im, 64) for im in images]), mean, std)
    assert torch.allclose(out.float(), ref, atol=0.02)


def test_fused_normalize_agrees_with_preprocess():
    """The GPU path's fused multiply-add (crop kernel, hybrid part) is preprocess.normalize's formula."""
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    x = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = preprocess.normalize(x, mean, std)
    hybrid = gd.normalize(x.contiguous(memory_format=torch.channels_last), mean, std)
    assert torch.allclose(hybrid, ref, atol=1e-5, rtol=0)
    fused = gd.crop_batch(list(x), gd.center_boxes(torch.tensor([[24, 24]] * 4), 24), 24, mean, std)
    assert torch.allclose(fused, ref, atol=1e-5, rtol=0)


def test_same_seed_same_crops():
    sizes = torch.tensor([[256, 341]] * 50)
    a = gd.GpuAugment(224, mode="rrc", seed=11).boxes(sizes)
    b = gd.GpuAugment(224, mode="rrc", seed=11).boxes(sizes)
    c = gd.GpuAugment(224, mode="rrc", seed=12).boxes(sizes)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------ decode fallbacks

def _encode(kind, w=40, h=30, color=(200, 40, 90)):
    img = Image.new("RGB", (w, h), color)
    buf = io.BytesIO()
    if kind == "jpeg":
        img.save(buf, "JPEG", quality=95)
    elif kind == "cmyk":
        img.convert("CMYK").save(buf, "JPEG", quality=95)
    elif kind == "gray":
        img.convert("L").save(buf, "JPEG", quality=95)
    elif kind == "png":
        img.save(buf, "PNG")
    else:
        return b"<html>This photo is no longer available.</html>"
    return buf.getvalue()


KINDS = ["jpeg", "cmyk", "png", "garbage", "gray"]


def _check_decoded(images, failures):
    assert [im is None for im in images] == [False, False, False, True, False]
    assert len(failures) == 1 and failures[0][0] == "k3" and "cannot decode" in failures[0][1]
    for im, kind in zip(images, KINDS):
        if im is None:
            continue
        assert im.shape == (3, 30, 40) and im.dtype == torch.uint8
        mean = im.float().mean((1, 2))
        if kind == "gray":
            assert (mean.max() - mean.min()) < 3
        else:
            assert (mean - torch.tensor([200.0, 40.0, 90.0])).abs().max() < 8, (kind, mean)


def test_decode_fallbacks_cpu():
    blobs = [_encode(k) for k in KINDS]
    _check_decoded(*gd.decode_jpegs(blobs, "cpu", keys=[f"k{i}" for i in range(5)]))


def test_cpu_loader_and_gpu_fallback_decode_alike():
    """Alpha on white, 16-bit scaled, CMYK: one decode for the CPU loader and the GPU fallback."""
    rgba = Image.new("RGBA", (40, 30), (200, 40, 90, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 30))  # left half transparent: white, not black
    deep = Image.fromarray((np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16))
    blobs = [_encode("cmyk")]
    for img in (rgba, deep):
        buf = io.BytesIO()
        img.save(buf, "PNG")
        blobs.append(buf.getvalue())
    for i, blob in enumerate(blobs):
        via_loader = L.center_crop(L._open_rgb("x.tar", {"__key__": "k", "jpg": blob}, 16), 16)
        via_gpu_path = gd.pil_decode(blob)
        top, left = preprocess.center_offsets(30, 40, 16)
        assert torch.equal(preprocess.to_tensor(via_loader), via_gpu_path[:, top:top + 16, left:left + 16]), i
    assert gd.pil_decode(blobs[1])[:, 0, 0].tolist() == [255, 255, 255]


def test_decode_batched_decoder_failure_isolates_bad_images():
    """The GPU code path with a fake batched decoder that, like nvJPEG, fails the whole batch."""
    calls = []

    def fake_batched(tensors):
        calls.append(len(tensors))
        for t in tensors:
            data = t.numpy().tobytes()
            if data[:2] != b"\xff\xd8" or Image.open(io.BytesIO(data)).mode == "CMYK":
                raise RuntimeError("nvjpeg: batch failed")
        return [gd.decode_jpeg(t, mode=gd.ImageReadMode.RGB) for t in tensors]

    blobs = [_encode(k) for k in KINDS]
    _check_decoded(*gd.decode_jpegs(blobs, "cpu", keys=[f"k{i}" for i in range(5)], decoder=fake_batched))
    assert calls[0] == 5 and sum(c == 1 for c in calls) >= 3  # bisected down to the bad ones
    # a clean batch is one call
    calls.clear()
    images, failures = gd.decode_jpegs([_encode("jpeg")] * 8, "cpu", decoder=fake_batched)
    assert calls == [8] and not failures and all(im is not None for im in images)


def test_decoder_none_entries_fall_back_per_image():
    """A decoder that reports per image (nvImageCodec: None where the hardware engine cannot,
    e.g. CMYK) gets those images from the CPU fallback; only what nothing reads is a failure."""
    def per_image(tensors):
        out = []
        for t in tensors:
            data = t.numpy().tobytes()
            ok = data[:2] == b"\xff\xd8" and Image.open(io.BytesIO(data)).mode == "RGB"
            out.append(gd.decode_jpeg(t, mode=gd.ImageReadMode.RGB) if ok else None)
        return out
    blobs = [_encode(k) for k in KINDS]
    _check_decoded(*gd.decode_jpegs(blobs, "cpu", keys=[f"k{i}" for i in range(5)], decoder=per_image))


def test_work_stream_is_a_side_stream_on_cuda():
    from tools.imagenet.distributed import work_stream
    with work_stream(torch.device("cpu")):
        pass
    if torch.cuda.is_available():
        with work_stream(torch.device("cuda", 0)):
            assert torch.cuda.current_stream() != torch.cuda.default_stream()


def test_gpu_decoder_choice():
    with pytest.raises(ValueError, match="unknown GPU decoder"):
        gd.gpu_decoder("dali", "cpu")
    assert gd.gpu_decoder("nvjpeg", "cpu").kind == "nvjpeg"
    assert gd.gpu_decoder("auto", "cpu").kind == gd.gpu_decoder("engine", "cpu").kind == "nvjpeg"
    if torch.cuda.is_available():  # the engines where the GPU has them, else torchvision's nvJPEG
        assert gd.gpu_decoder("auto", "cuda").kind in ("engine", "nvjpeg")
    if gd.import_nvimgcodec() is None and torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="nvImageCodec is not installed"):
            gd.gpu_decoder("hardware", "cuda")
    # a CPU pipeline never builds a GPU decoder, whatever the name
    pipe = gd.GpuBatchPipeline([], gd.GpuAugment(8), device="cpu", decoder="hardware")
    assert pipe.thread_decoder() is None


@pytest.mark.skipif(not torch.cuda.is_available() or gd.import_nvimgcodec() is None,
                    reason="needs a CUDA GPU and nvImageCodec")
def test_hardware_decoder_matches_nvjpeg_and_falls_back():
    keys = [f"k{i}" for i in range(5)]
    blobs = [_encode(k) for k in KINDS]
    images, failures = gd.decode_jpegs(blobs, "cuda", keys, decoder=gd.gpu_decoder("hardware", "cuda"))
    _check_decoded([None if im is None else gd.as_torch(im).cpu() for im in images], failures)
    ref, _ = gd.decode_jpegs(blobs, "cuda", keys)
    aug = gd.GpuAugment(24, mode="center")
    kept = [i for i, im in enumerate(images) if im is not None]
    a = aug([images[i] for i in kept]).float()
    b = aug([ref[i] for i in kept]).float()
    assert (a - b).abs().mean() < 2.0  # two JPEG decoders: a level or two apart at most


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_decoder_matches_nvjpeg_and_falls_back():
    """tools.imagenet.nvjpeg on the GPU's JPEG engines: torchvision's nvJPEG pixels, CMYK / PNG /
    garbage left to the fallback (or reported), from a list and from a packed batch."""
    try:
        engine = gd.gpu_decoder("engine", "cuda")
    except RuntimeError as exc:
        pytest.skip(f"no hardware JPEG decoder: {exc}")
    keys = [f"k{i}" for i in range(5)]
    blobs = [_encode(k) for k in KINDS]
    images, failures = gd.decode_jpegs(blobs, "cuda", keys, decoder=engine)
    _check_decoded([None if im is None else im.cpu() for im in images], failures)
    photos = [_encode("jpeg", w=64 + 8 * i, h=48 + 4 * i, color=(20 * i, 120, 200 - 10 * i)) for i in range(6)]
    ref, _ = gd.decode_jpegs(photos, "cuda")
    got, _ = gd.decode_jpegs(photos, "cuda", decoder=engine)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    data, offsets = gd.pack_jpegs(photos + blobs)
    batch, failures = gd.decode_packed(data, offsets.numpy(), [f"p{i}" for i in range(11)], "cuda", engine)
    assert batch.index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10] and [k for k, _ in failures] == ["p9"]
    assert all(torch.equal(a, b) for a, b in zip(ref, batch.images()[:6]))


@pytest.fixture
def stub_engine(monkeypatch, tmp_path_factory):
    """NvjpegDecoder without a GPU: libnvjpeg and the CUDA calls stubbed. Returns (make, calls,
    batches): make(on_decode=None, turn="lock") a decoder; calls the nvJPEG functions called
    (after nvjpegDecodeBatchedInitialize, the batch size it set up for; "wait" for a host wait);
    batches per nvjpegDecodeBatched its rows' (bitstream lengths, output widths); on_decode()
    runs inside each nvjpegDecodeBatched."""
    import collections
    from tools.imagenet import nvjpeg
    calls, batches = [], []

    class Lib:  # every nvJPEG function succeeds and is recorded
        def __init__(self, decoder, on_decode):
            self.decoder, self.on_decode = decoder, on_decode

        def __getattr__(self, name):
            def call(*args):
                calls.append(name)
                if name == "nvjpegDecodeBatchedInitialize":
                    calls.append(args[2])  # the batch size the state is set up for
                if name == "nvjpegDecodeBatched":
                    rows = self.decoder._batch
                    lengths = (ctypes.c_uint64 * rows).from_address(args[3])
                    table = (ctypes.c_uint64 * (rows * 8)).from_address(args[4])
                    batches.append((list(lengths), list(table)[4::8]))
                    if self.on_decode is not None:
                        self.on_decode()
                return 0
            return call

    class Event:
        def record(self, stream=None):
            pass

        def synchronize(self):
            calls.append("wait")

        def query(self):
            return True

    empty = torch.empty
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, device=None, **k: empty(*a, **k))

    def make(on_decode=None, turn="lock", output="rgb"):
        decoder = object.__new__(nvjpeg.NvjpegDecoder)
        decoder.output = output
        decoder.device, decoder.max_side, decoder.max_bytes = torch.device("cpu"), 768, 256 * 1024
        decoder._reserved, decoder._fits_bytes, decoder._batch, decoder._pad_source = 0, 0, None, None
        decoder._lib = decoder._fast = Lib(decoder, on_decode)
        decoder._handle = decoder._state = decoder._stream = None
        decoder.seconds, decoder._in_flight = collections.Counter(), collections.deque()
        decoder.turn, decoder._native = turn, None
        if turn == "native":  # the compiled turn calls the stub back through a C function pointer
            from tools.imagenet import engine_turn
            try:
                decoder._native = engine_turn.load(engine_turn.build(tmp_path_factory.getbasetemp() / "turn"))
            except RuntimeError as exc:  # no C compiler on this machine
                pytest.skip(str(exc))
            decoder._turn_seconds = (ctypes.c_double * 2)()
            decoder._callback = ctypes.CFUNCTYPE(ctypes.c_int, *[ctypes.c_void_p] * 6)(
                lambda *args: decoder._lib.nvjpegDecodeBatched(*args))
            decoder._decode_address = ctypes.cast(decoder._callback, ctypes.c_void_p).value
        return decoder
    return make, calls, batches


def test_engine_decoder_reads_pinned_bytes_in_place_and_copies_the_others(stub_engine, monkeypatch):
    """A batch already in pinned memory (the DataLoader's pin thread, tools.train --pin-raw) goes to
    the engines from where it is, kept alive until the GPU is done with it; other batches are
    copied into a pinned buffer first."""
    make, _, _ = stub_engine
    decoder = make()
    frames = np.array([[256, 300, 1], [300, 256, 1]])
    for pinned in (False, True):
        monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a, pinned=pinned: pinned)
        data = torch.zeros(2000, dtype=torch.uint8)
        decoder.decode_packed(data, np.array([0, 800, 1600]), frames)
        staging = decoder._in_flight[-1][1][0]
        assert (staging.data_ptr() == data.data_ptr()) == pinned and staging.numel() == 1600


def test_engine_decoder_lays_each_output_format_out_in_the_images_own_space(stub_engine):
    """Planar RGB and YUV: three planes of h x w, pitch w (YUV's subsampled chroma fits in them);
    interleaved RGB: one plane, pitch 3w. Pads get the same layout; the state is set up for it."""
    from tools.imagenet import nvjpeg
    make, calls, _ = stub_engine
    sizes = np.array([[2, 3], [4, 5]])
    addresses = np.array([1000, 2000])
    for output in ("rgb", "yuv"):
        table = make(output=output)._table(addresses, sizes)
        assert table[:, :4].tolist() == [[1000, 1006, 1012, 0], [2000, 2020, 2040, 0]]
        assert table[:, 4:].tolist() == [[3, 3, 3, 0], [5, 5, 5, 0]]
    table = make(output="rgbi")._table(addresses, sizes)
    assert table.tolist() == [[1000, 0, 0, 0, 9, 0, 0, 0], [2000, 0, 0, 0, 15, 0, 0, 0]]
    decoder = make(output="yuv")
    formats = []
    init = decoder._lib.nvjpegDecodeBatchedInitialize
    decoder._lib = types.SimpleNamespace(nvjpegDecodeBatchedInitialize=lambda *a: formats.append(a[4]) or init(*a),
                                         nvjpegDecodeBatched=decoder._lib.nvjpegDecodeBatched)
    decoder.decode_packed(torch.zeros(1600, dtype=torch.uint8), np.array([0, 800, 1600]),
                          np.array([[256, 300, 1], [300, 256, 1]]))
    assert formats == [nvjpeg.OUTPUTS["yuv"]] and nvjpeg.OUTPUTS["rgb"] == 3
    with pytest.raises(ValueError, match="output 'nv12'"):
        nvjpeg.NvjpegDecoder("cpu", output="nv12")


def test_engine_decoder_sets_up_once_pads_short_batches_and_leaves_the_rest_to_the_cpu(stub_engine):
    """The reservation logic without a GPU: libnvjpeg and the CUDA calls stubbed, the calls counted."""
    from tools.imagenet import nvjpeg
    make, calls, batches = stub_engine
    decoder = make()
    frames = np.array([[256, 300, 1], [256, 769, 1], [300, 256, 1], [256, 256, 0]])
    _, ok, sizes, _ = decoder.decode_packed(torch.zeros(3000, dtype=torch.uint8), np.array([0, 800, 1600, 2400, 3000]),
                                            frames)
    # first the reserving batch (4 JPEGs of 768 x 768, >= 256 kB), waited for; then the batch itself,
    # its 2 engine images padded to the 4 the state was set up for: never set up again mid-run
    assert calls == ["nvjpegDecodeBatchedInitialize", 4, "nvjpegDecodeBatched", "wait", "nvjpegDecodeBatched"]
    assert ok.tolist() == [True, False, True, False] and sizes[1].tolist() == [0, 0]
    pad = len(nvjpeg._reserve_jpeg(nvjpeg.PAD_SIDE, 0))
    assert batches[1] == ([800, 800, pad, pad], [300, 256, nvjpeg.PAD_SIDE, nvjpeg.PAD_SIDE])
    assert decoder._reserved == 4 and decoder._fits_bytes >= 256 * 1024
    # host time per part: the call's set-up (GIL-bound Python) and the wait for the process's decode
    # lock apart from the call itself
    assert decoder.seconds["batches"] == 2
    assert set(decoder.seconds) == {"batches", "probe", "copy", "setup", "lock", "decode", "after"}
    calls.clear()
    big = decoder._fits_bytes + 1  # a bitstream longer than the buffers were sized for: the CPU's
    _, ok, _, _ = decoder.decode_packed(torch.zeros(2000 + big, dtype=torch.uint8),
                                        np.array([0, 1000, 1000 + big, 2000 + big]), frames[[0, 0, 2]])
    assert ok.tolist() == [True, False, True] and calls == ["nvjpegDecodeBatched"]
    assert batches[-1][0] == [1000, 1000, pad, pad]  # 3 images, 2 on the engines, 2 pads
    calls.clear()
    decoder.decode_packed(torch.zeros(5000, dtype=torch.uint8), np.arange(6) * 1000, frames[[0, 0, 0, 2, 2]])
    assert calls[:4] == ["nvjpegDecodeBatchedInitialize", 5, "nvjpegDecodeBatched", "wait"]  # 5 > 4: again
    assert decoder._reserved == 5 and batches[-1][0] == [1000] * 5
    decoder.max_side = 0  # no reservation: the state follows each batch's size, nothing padded
    calls.clear()
    decoder.decode_packed(torch.zeros(2000, dtype=torch.uint8), np.arange(3) * 1000, frames[[0, 0]])
    assert calls == ["nvjpegDecodeBatchedInitialize", 2, "nvjpegDecodeBatched"] and batches[-1][0] == [1000] * 2


@pytest.mark.parametrize("turn", ["lock", "native", "free"])
def test_engine_decoders_take_turns_at_the_decode_call_unless_told_not_to(stub_engine, turn):
    """The process's decoders enter nvjpegDecodeBatched one at a time (phase 5's hang with two in
    it at once), by a Python lock or a native mutex; turn="free" (bench/probe_engine.py --turns free)
    lets two in together."""
    import itertools
    import threading
    together = threading.Barrier(2, timeout=1.0)
    make, _, _ = stub_engine
    met, entered = [], itertools.count()

    def meet():
        if next(entered) < 2:  # the two decoders' first calls (their reserving batches) meet
            try:
                together.wait()
                met.append(True)
            except threading.BrokenBarrierError:
                met.append(False)
    decoders = [make(meet, turn) for _ in range(2)]
    frames = np.array([[256, 256, 1]] * 2)

    def work(decoder):
        decoder.decode_packed(torch.zeros(2000, dtype=torch.uint8), np.arange(3) * 1000, frames)
    threads = [threading.Thread(target=work, args=(d,)) for d in decoders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert met == ([True, True] if turn == "free" else [False, False])


def test_engine_decoder_times_the_turn_held_apart_from_what_follows_it(stub_engine, monkeypatch):
    """"decode" is the call with the process's decode turn held (x batches/s: how busy the turn is);
    "after" what comes once the turn is given up (another thread may hold the GIL then)."""
    import time
    from tools.imagenet import nvjpeg
    make, _, _ = stub_engine

    class SlowToLeave:  # a lock whose release takes 50 ms: that time is not the turn's
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            time.sleep(0.05)

    monkeypatch.setattr(nvjpeg, "_DECODE_LOCK", SlowToLeave())
    decoder = make(on_decode=lambda: time.sleep(0.02))
    frames = np.array([[256, 256, 1]] * 2)
    decoder.decode_packed(torch.zeros(2000, dtype=torch.uint8), np.arange(3) * 1000, frames)
    decoder.seconds = dict.fromkeys(decoder.seconds, 0.0)
    decoder.decode_packed(torch.zeros(2000, dtype=torch.uint8), np.arange(3) * 1000, frames)
    assert 0.02 <= decoder.seconds["decode"] < 0.05 and decoder.seconds["after"] >= 0.05


def _engine_or_skip():
    try:
        return gd.gpu_decoder("engine", "cuda")
    except RuntimeError as exc:
        pytest.skip(f"no hardware JPEG decoder: {exc}")


def _decode_beside_a_sleeping_stream(engine, packed):
    """(decode_packed's result, whether another stream's ~1 s kernel was still running when the
    call returned): False where the call waited for the whole GPU."""
    side, decode = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(2_000_000_000)  # about a second
        slept = torch.cuda.Event()
        slept.record()
    with torch.cuda.stream(decode):
        result = engine.decode_packed(packed[0], packed[1].numpy())
    still_sleeping = not slept.query()
    torch.cuda.synchronize()
    return result, still_sleeping


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_decoder_never_waits_for_other_gpu_work_when_images_grow():
    """Larger images than any before made nvJPEG reallocate inside the decode call, and cuMemFree
    waited for all of the GPU's work (a rank's all-reduce included: a 2-GPU run hung there). The
    decoder sizes its buffers for max_side up front, so a batch of larger images (within
    max_side) returns while another stream's kernel still runs."""
    engine = _engine_or_skip()
    small = gd.pack_jpegs([_encode("jpeg", w=256 + 8 * i, h=256) for i in range(8)])
    noisy = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "JPEG", quality=95)  # ~100 kB: more bytes than any before
    large = gd.pack_jpegs([_encode("jpeg", w=engine.max_side - 8 * i, h=engine.max_side - 60) for i in range(7)]
                          + [buf.getvalue()])
    engine.decode_packed(small[0], small[1].numpy())
    torch.cuda.synchronize()
    (flat, ok, sizes, _), still_sleeping = _decode_beside_a_sleeping_stream(engine, large)
    assert still_sleeping and ok.all() and sizes[0].tolist() == [engine.max_side - 60, engine.max_side]
    assert len(buf.getvalue()) > 50_000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_decoder_short_then_full_batch_never_waits_for_other_gpu_work():
    """A decoder kept across pipelines (DecoderPool) gets validation's short last batch, then a
    full training batch: padded to the reserved count, neither sets nvJPEG's state up again, so
    the full batch returns while another stream's kernel still runs, and the short batch's images
    are those of the CPU decode."""
    engine = _engine_or_skip()
    photos = [_encode("jpeg", w=256 + 8 * i, h=256, color=(25 * i, 90, 180)) for i in range(8)]
    full = gd.pack_jpegs(photos)
    short = gd.pack_jpegs(photos[:3])
    engine.decode_packed(full[0], full[1].numpy())
    flat, ok, sizes, starts = engine.decode_packed(short[0], short[1].numpy())
    torch.cuda.synchronize()
    assert ok.all()
    for i, (h, w) in enumerate(sizes.tolist()):
        want = gd._cpu_decode(torch.frombuffer(bytearray(photos[i]), dtype=torch.uint8))
        got = flat[starts[i]:starts[i] + 3 * h * w].view(3, h, w).cpu()
        assert (got.int() - want.int()).abs().float().mean() < 2  # the engines' IDCT, not libjpeg's
    (_, ok, _, _), still_sleeping = _decode_beside_a_sleeping_stream(engine, full)
    assert still_sleeping and ok.all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_decoders_taking_the_native_turn_decode_as_the_locked_ones_do():
    """Two threads' decoders with turn="native" (the compiled mutex calling nvjpegDecodeBatched)
    give the images the Python lock's decoders give, batch after batch; the turn is timed."""
    import threading
    from tools.imagenet.nvjpeg import NvjpegDecoder
    _engine_or_skip()
    photos = [_encode("jpeg", w=200 + 8 * i, h=180, color=(20 * i, 90, 180)) for i in range(6)]
    data, offsets = gd.pack_jpegs(photos)
    results = {}

    def decode(turn, k):
        decoder = NvjpegDecoder("cuda", turn=turn)
        assert decoder._native is not None or turn == "lock"
        with torch.cuda.stream(torch.cuda.Stream()):
            for _ in range(5):
                flat, ok, sizes, starts = decoder.decode_packed(data, offsets.numpy())
            torch.cuda.current_stream().synchronize()
        results[turn, k] = (flat.cpu(), ok.tolist(), decoder.seconds)
    threads = [threading.Thread(target=decode, args=(turn, k)) for turn in ("lock", "native") for k in range(2)]
    for t in threads[:2]:
        t.start()
    for t in threads[:2]:
        t.join()
    for t in threads[2:]:
        t.start()
    for t in threads[2:]:
        t.join()
    want = results["lock", 0]
    for key, (flat, ok, seconds) in results.items():
        assert torch.equal(flat, want[0]) and ok == [True] * 6, key
        assert seconds["batches"] == 6 and seconds["decode"] > 0, key  # 5 and the reserving batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_decoder_leaves_images_over_max_side_to_the_cpu():
    """Images wider or taller than the engines' buffers go to the CPU fallback, not dropped."""
    engine = _engine_or_skip()
    wide = _encode("jpeg", w=engine.max_side + 8, h=64, color=(10, 200, 30))
    photos = [_encode("jpeg", w=64 + 8 * i, h=48) for i in range(3)] + [wide]
    data, offsets = gd.pack_jpegs(photos)
    _, ok, sizes, _ = engine.decode_packed(data, offsets.numpy())
    assert ok.tolist() == [True, True, True, False] and sizes[3].tolist() == [0, 0]
    batch, failures = gd.decode_packed(data, offsets.numpy(), ["a", "b", "c", "wide"], "cuda", engine)
    assert batch.index.tolist() == [0, 1, 2, 3] and not failures
    assert torch.equal(batch.images()[3].cpu(), gd._cpu_decode(torch.frombuffer(bytearray(wide), dtype=torch.uint8)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_decoders_of_two_threads_never_decode_at_once():
    """Two threads' engine decoders take turns in nvjpegDecodeBatched (decoding at once beside a
    step hung there): the pipeline's decode threads share the engines through one lock."""
    import threading
    import time
    try:
        decoders = [gd.gpu_decoder("engine", "cuda") for _ in range(2)]
    except RuntimeError as exc:
        pytest.skip(f"no hardware JPEG decoder: {exc}")
    inside, peak, calls = [0], [0], [0]
    count = threading.Lock()

    class Probe:  # the library, its batched decode call slowed down and counted
        def __init__(self, lib):
            self.lib = lib

        def __getattr__(self, name):
            fn = getattr(self.lib, name)
            if name != "nvjpegDecodeBatched":
                return fn

            def decode(*args):
                with count:
                    inside[0] += 1
                    peak[0], calls[0] = max(peak[0], inside[0]), calls[0] + 1
                time.sleep(0.005)
                try:
                    return fn(*args)
                finally:
                    with count:
                        inside[0] -= 1
            return decode

    for d in decoders:
        d._lib = Probe(d._lib)
    photos = [_encode("jpeg", w=64 + 8 * i, h=48 + 4 * i) for i in range(8)]
    data, offsets = gd.pack_jpegs(photos)

    def work(decoder):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for _ in range(20):
                decoder.decode_packed(data, offsets.numpy())
        stream.synchronize()

    threads = [threading.Thread(target=work, args=(d,)) for d in decoders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls[0] == 42 and peak[0] == 1  # 20 batches each, and each decoder's reserving batch


def test_pipeline_drops_and_reports_bad_images_keeping_labels_aligned():
    colors = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (0, 0, 0), (128, 128, 128)]
    blobs = [_encode(k, w=80, h=72, color=c) for k, c in zip(KINDS, colors)]
    data, offsets = gd.pack_jpegs(blobs)
    assert [bytes(t.numpy()) for t in gd.unpack_jpegs(data, offsets)] == blobs
    raw = {"data": data, "offsets": offsets, "labels": torch.arange(5), "keys": [f"k{i}" for i in range(5)]}
    seen = []
    pipe = gd.GpuBatchPipeline([raw], gd.GpuAugment(64, mode="center"), device="cpu",
                               on_failure=lambda k, r: seen.append(k))
    (x, y), = list(pipe)
    assert y.tolist() == [0, 1, 2, 4] and x.shape == (4, 3, 64, 64)
    assert seen == ["k3"]
    assert pipe.stats["batches"] == 1 and pipe.stats["decode_s"] > 0
    dominant = x.float().mean((2, 3)).argmax(1).tolist()
    assert dominant[:3] == [0, 1, 2]  # red, green, blue images kept with their labels


class PackedPil:
    """A decoder with decode_packed, like tools.imagenet.nvjpeg.NvjpegDecoder, on the CPU: takes
    baseline RGB JPEGs (into one planar buffer), leaves the others (None) to the fallback."""
    calls = 0

    def decode_packed(self, data, offsets, frames=None):
        PackedPil.calls += 1
        images = []
        for i in range(len(offsets) - 1):
            blob = data[int(offsets[i]):int(offsets[i + 1])].numpy().tobytes()
            ok = blob[:2] == b"\xff\xd8" and Image.open(io.BytesIO(blob)).mode == "RGB"
            images.append(gd.pil_decode(blob) if ok else None)
        ok = np.array([im is not None for im in images])
        sizes = np.array([im.shape[1:] if im is not None else (0, 0) for im in images], dtype=np.int64)
        planes = 3 * sizes[:, 0] * sizes[:, 1]
        starts = np.concatenate([[0], np.cumsum(planes)[:-1]]).astype(np.int64)
        flat = torch.cat([im.reshape(-1) for im in images if im is not None]) if ok.any() else None
        return flat, ok, sizes, starts


def test_packed_decode_matches_the_list_path_and_reports_the_same():
    """A decoder with decode_packed (the engine decoder's interface: one buffer in, one out) gives
    the per-image path's crops, labels and failure reports; the images it leaves go to the CPU."""
    colors = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (0, 0, 0), (128, 128, 128)]
    blobs = [_encode(k, w=80 + 8 * i, h=72, color=c) for i, (k, c) in enumerate(zip(KINDS, colors))]
    data, offsets = gd.pack_jpegs(blobs)
    raws = [{"data": data, "offsets": offsets.numpy(), "labels": np.arange(5) + 10 * b,
             "keys": [f"k{i}" for i in range(5)]} for b in range(3)]
    outs, seen = {}, {}
    for name, decoder in (("list", None), ("packed", PackedPil())):
        seen[name] = []
        aug = gd.GpuAugment(64, mode="rrc", seed=7, mean=[0.5] * 3, std=[0.25] * 3)
        pipe = gd.GpuBatchPipeline(raws, aug, device="cpu", decoder=decoder, threads=2,
                                   on_failure=lambda k, r, name=name: seen[name].append(k))
        outs[name] = list(pipe)
    assert PackedPil.calls == 3
    assert seen["list"] == seen["packed"] == ["k3"] * 3
    for (xa, ya), (xb, yb) in zip(outs["list"], outs["packed"]):
        assert torch.equal(ya, yb) and ya.tolist()[1:] == [1 + ya[0].item(), 2 + ya[0].item(), 4 + ya[0].item()]
        assert torch.equal(xa, xb)
    # the DecodedBatch itself: rows point into the buffer, fallback images kept apart
    batch, failures = gd.decode_packed(data, offsets.numpy(), [f"k{i}" for i in range(5)], "cpu", PackedPil())
    assert batch.index.tolist() == [0, 1, 2, 4] and [k for k, _ in failures] == ["k3"]
    assert sorted(batch.extra) == [1, 2, 4]  # CMYK, PNG, grayscale: not the packed decoder's
    assert batch.rows[0, 0] == batch.flat.data_ptr() and batch.rows[:, 1:3].tolist() == [[72, 80], [72, 88], [72, 96], [72, 112]]
    for image, row in zip(batch.images(), batch.rows):
        assert image.data_ptr() == row[0] and tuple(image.shape[1:]) == tuple(row[1:3])


def test_pipeline_adds_up_the_parts_a_decoder_times():
    """A thread's own decoder that times its parts (tools.imagenet.nvjpeg: probe, copy, setup,
    lock, decode) has them added to the pipeline's stats per batch, whichever thread decoded it."""
    class TimedPil(PackedPil):
        kind = "timed"

        def __init__(self):
            self.seconds = {"batches": 0, "probe": 0.0, "copy": 0.0, "setup": 0.0, "lock": 0.0, "decode": 0.0,
                            "after": 0.0}

        def decode_packed(self, data, offsets, frames=None):
            for part, seconds in (("copy", 0.001), ("setup", 0.0005), ("lock", 0.002), ("decode", 0.003),
                                  ("after", 0.00025), ("batches", 1)):
                self.seconds[part] += seconds
            return super().decode_packed(data, offsets, frames)

    data, offsets = gd.pack_jpegs([_encode("jpeg", w=40 + 8 * i) for i in range(3)])
    raws = [{"data": data, "offsets": offsets.numpy(), "labels": np.arange(3), "keys": list("abc")}] * 4
    made = []
    pool = gd.DecoderPool(make=lambda kind, device: made.append(TimedPil()) or made[-1])
    pipe = gd.GpuBatchPipeline(raws, gd.GpuAugment(16, mode="center"), device="cpu", decoder="timed",
                               threads=2, pool=pool)
    assert len(list(pipe)) == 4 and 1 <= len(made) <= 2
    assert pipe.stats["engine_copy_s"] == pytest.approx(0.004) and pipe.stats["engine_probe_s"] == 0
    assert pipe.stats["engine_setup_s"] == pytest.approx(0.002)
    assert pipe.stats["engine_lock_s"] == pytest.approx(0.008)
    assert pipe.stats["engine_decode_s"] == pytest.approx(0.012)
    assert pipe.stats["engine_after_s"] == pytest.approx(0.001)


def test_jpeg_frame_reads_sizes_and_what_the_engines_take():
    img = Image.new("RGB", (40, 30), (200, 40, 90))

    def jpeg(**kw):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90, **kw)
        return buf.getvalue()
    assert gd.jpeg_frame(jpeg()) == (30, 40, 1)  # 4:2:0 baseline: what the resize stage writes
    assert gd.jpeg_frame(jpeg(subsampling=0)) == (30, 40, 1)  # 4:4:4
    assert gd.jpeg_frame(jpeg(subsampling=1)) == (30, 40, 1)  # 4:2:2
    assert gd.jpeg_frame(jpeg(progressive=True)) == (30, 40, 0)
    assert gd.jpeg_frame(_encode("gray")) == (30, 40, 0)
    assert gd.jpeg_frame(_encode("cmyk")) == (30, 40, 0)
    assert gd.jpeg_frame(_encode("png")) == (0, 0, 0)
    assert gd.jpeg_frame(_encode("garbage")) == (0, 0, 0)
    assert gd.jpeg_frame(jpeg()[:20]) == (0, 0, 0)  # cut before the frame header
    whole = jpeg()
    sof = whole.index(b"\xff\xc0")
    # cut anywhere (the loader workers run this on whatever a shard holds): never an exception
    assert {gd.jpeg_frame(whole[:k]) for k in range(len(whole))} <= {(0, 0, 0), (30, 40, 1)}
    assert gd.jpeg_frame(whole[:sof + 12]) == (0, 0, 0) and gd.jpeg_frame(whole[:sof + 19]) == (30, 40, 1)
    frames = gd.jpeg_frames([jpeg(), torch.frombuffer(bytearray(jpeg()), dtype=torch.uint8).numpy()])
    assert frames.tolist() == [[30, 40, 1], [30, 40, 1]] and frames.dtype == np.int32


def test_packed_decode_uses_the_workers_frames_and_recovers_from_a_wrong_one():
    """With the workers' frames the decoder skips its header checks; a batch it then fails is
    decoded again with its own checks, and what it still cannot goes to the CPU."""
    blobs = [_encode("jpeg", w=40 + 8 * i) for i in range(3)]
    data, offsets = gd.pack_jpegs(blobs)
    seen = []

    class Strict(PackedPil):
        def decode_packed(self, data, offsets, frames=None):
            seen.append(None if frames is None else frames.tolist())
            if frames is not None and frames[1, 2]:
                raise RuntimeError("nvjpeg: the batch failed")
            return super().decode_packed(data, offsets, frames)
    good = gd.jpeg_frames(blobs)
    batch, failures = gd.decode_packed(data, offsets.numpy(), ["a", "b", "c"], "cpu", Strict(),
                                       np.where(np.arange(3)[:, None] == 1, 0, good))
    assert not failures and len(batch) == 3 and seen[-1][1] == [0, 0, 0]
    seen.clear()
    batch, failures = gd.decode_packed(data, offsets.numpy(), ["a", "b", "c"], "cpu", Strict(), good)
    assert seen == [good.tolist(), None] and not failures and len(batch) == 3


def test_pipeline_hybrid_part_is_normalised_and_appended():
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    blobs = [_encode("jpeg", w=80, h=72)] * 3
    pre = torch.full((2, 3, 64, 64), 191, dtype=torch.uint8)
    raw = {"jpegs": blobs, "labels": [7, 7, 7], "pre": pre, "pre_labels": [3, 4]}
    (x, y), = list(gd.GpuBatchPipeline([raw], gd.GpuAugment(64, mean=mean, std=std), device="cpu"))
    assert y.tolist() == [7, 7, 7, 3, 4] and x.shape == (5, 3, 64, 64)
    assert torch.allclose(x[3:], torch.full_like(x[3:], (191 / 255 - 0.5) / 0.25))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("threads", [2, 0])
def test_cuda_pipeline_matches_cpu(threads):
    """On a GPU: nvJPEG + roi_align in the side stream give the CPU path's crops (same seed)."""
    blobs = [_encode(k, w=96 + 8 * i, h=80, color=(30 * i, 200 - 20 * i, 90))
             for i, k in enumerate(["jpeg", "gray", "jpeg", "cmyk", "png", "garbage", "jpeg"])]
    raw = [{"jpegs": blobs, "labels": list(range(7)), "keys": [f"k{i}" for i in range(7)]}] * 3
    outs = {}
    for device in ("cpu", "cuda"):
        aug = gd.GpuAugment(64, mode="crop", seed=13)
        seen = []
        pipe = gd.GpuBatchPipeline(raw, aug, device=device, threads=threads,
                                   on_failure=lambda k, r: seen.append(k))
        outs[device] = [(x.cpu(), y.cpu()) for x, y in pipe]
        assert seen == ["k5"] * 3
    for (xc, yc), (xg, yg) in zip(outs["cpu"], outs["cuda"]):
        assert torch.equal(yc, yg) and yc.tolist() == [0, 1, 2, 3, 4, 6]
        # nvJPEG and libjpeg-turbo may differ by a level or two in their IDCT/upsampling
        assert (xc.float() - xg.float()).abs().mean() < 2.0


# ------------------------------------------------------------------------------ crop kernel, threads

TRITON_CHECK = """
import numpy as np
import torch
from tools.imagenet import gpu_data as gd
g = torch.Generator().manual_seed(0)
dev = "cuda" if torch.cuda.is_available() else "cpu"
images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g).to(dev)
          for h, w in [(72, 96), (96, 72), (64, 64), (80, 130), (40, 50)]]
for mode in ("crop", "rrc", "center"):
    boxes = gd.GpuAugment(48, mode=mode, seed=3).boxes([im.shape[-2:] for im in images])
    for mean, std in ((None, None), ([0.4, 0.5, 0.6], [0.2, 0.25, 0.3])):
        a = gd.crop_batch(images, boxes, 48, mean, std, backend="torch")
        b = gd.crop_batch(images, boxes, 48, mean, std, backend="triton")
        assert a.dtype == b.dtype and a.shape == b.shape == (5, 3, 48, 48), (a.shape, b.shape)
        assert b.is_contiguous(memory_format=torch.channels_last)
        d = (a.float() - b.float()).abs()
        if mean is None:  # unscaled boxes: the same pixels; the enlarged image may round apart
            assert d[:4].max() == 0 if mode != "rrc" else d.max() <= 1, (mode, d.max())
        else:
            assert d.max() < 1e-4, (mode, d.max())
# interleaved H x W x 3 images (nvImageCodec's layout) are read in place, with the same result
boxes = gd.GpuAugment(48, mode="rrc", seed=5).boxes([im.shape[-2:] for im in images])
planar = gd.crop_batch(images, boxes, 48, backend="triton")
hwc = [im.permute(1, 2, 0).contiguous() for im in images]
assert torch.equal(planar, gd.crop_batch([t.permute(2, 0, 1) for t in hwc], boxes, 48, backend="triton"))
if dev == "cpu":  # DeviceImage over a decoder-owned buffer (here host memory the interpreter reads)
    class Owner:
        def __init__(self, t):
            self.t = t
            self.__cuda_array_interface__ = {"shape": tuple(t.shape), "typestr": "|u1", "version": 3,
                                              "data": (t.data_ptr(), False), "strides": None}
    owned = [gd.DeviceImage(Owner(t), torch.device("cpu")) for t in hwc]
    assert [o.shape for o in owned] == [tuple(im.shape) for im in images]
    assert torch.equal(planar, gd.crop_batch(owned, boxes, 48, backend="triton"))
# a DecodedBatch (one buffer, a row of pointer and strides per image, one image apart) is read in place
flat = torch.cat([im.reshape(-1) for im in images[:4]])
starts = np.concatenate([[0], np.cumsum([im.numel() for im in images[:3]])]).astype(np.int64)
rows = np.array([[flat.data_ptr() + s, h, w, w, 1, h * w] for s, (h, w) in zip(starts, [im.shape[1:] for im in images[:4]])]
                + [gd._row(images[4])], dtype=np.int64)
batch = gd.DecodedBatch(rows, np.arange(5), images[0].device, flat, starts, {4: images[4]})
assert torch.equal(planar, gd.crop_batch(batch, boxes, 48, backend="triton"))
assert torch.equal(gd.crop_batch(images, boxes, 48, backend="torch"), gd.crop_batch(batch, boxes, 48, backend="torch"))
print("ok")
"""


def test_triton_crop_kernel_matches_torch_version():
    pytest.importorskip("triton")
    # the real kernel on a GPU; Triton's interpreter (numpy) on the CPU
    env = project_env()
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_threaded_pipeline_keeps_order_and_crops():
    g = torch.Generator().manual_seed(4)
    raws = []
    for b in range(7):
        blobs = []
        for i in range(5):
            arr = torch.randint(0, 256, (60 + 4 * i + b, 70 + 3 * b, 3), dtype=torch.uint8, generator=g)
            buf = io.BytesIO()
            Image.fromarray(arr.numpy()).save(buf, "JPEG", quality=90)
            blobs.append(buf.getvalue())
        data, offsets = gd.pack_jpegs(blobs)
        raws.append({"data": data, "offsets": offsets, "labels": torch.arange(5) + 10 * b})
    outs = {}
    for threads in (0, 3):
        aug = gd.GpuAugment(48, mode="rrc", seed=5)
        outs[threads] = list(gd.GpuBatchPipeline(raws, aug, device="cpu", threads=threads))
    assert len(outs[0]) == len(outs[3]) == 7
    for (x0, y0), (x3, y3) in zip(outs[0], outs[3]):
        assert torch.equal(y0, y3) and torch.equal(x0, x3)
    assert [y[0].item() for _, y in outs[3]] == [10 * b for b in range(7)]
    assert not torch.equal(outs[0][0][0][0], outs[0][1][0][0])


def test_threaded_pipeline_no_deadlock_when_a_thread_is_slow_to_take_its_slot(monkeypatch):
    """The decode thread holding batch 0 stalls right after taking it from the queue; the other
    threads must not take every slot with later batches (the consumer waits for batch 0)."""
    import queue
    import threading
    import time

    class StallOnFirstBatch(queue.Queue):
        def get(self, *args, **kwargs):
            item = super().get(*args, **kwargs)
            if isinstance(item, tuple) and item[0] == 0 and isinstance(item[1], dict):
                time.sleep(0.5)
            return item

    monkeypatch.setattr(gd.queue, "Queue", StallOnFirstBatch)
    raws = [{"jpegs": [_encode("jpeg", w=20, h=20)], "labels": [i]} for i in range(12)]
    pipe = gd.GpuBatchPipeline(raws, gd.GpuAugment(16, mode="center"), device="cpu", threads=3, prefetch=1)
    labels = []
    consumer = threading.Thread(target=lambda: labels.extend(int(y) for _, y in pipe), daemon=True)
    consumer.start()
    consumer.join(timeout=30)
    assert not consumer.is_alive(), "pipeline deadlocked"
    assert labels == list(range(12))


def test_threaded_pipeline_raises_when_a_decoder_hangs(capfd):
    """A decoder stuck in a library call: the consumer raises after stall_timeout, with the
    threads' stacks on stderr, instead of waiting forever."""
    release = __import__("threading").Event()

    class Stuck:
        def decode_packed(self, data, offsets, frames=None):
            release.wait(30)
            raise RuntimeError("released")
    data, offsets = gd.pack_jpegs([_encode("jpeg")] * 2)
    raw = {"data": data, "offsets": offsets.numpy(), "labels": np.arange(2)}
    pipe = gd.GpuBatchPipeline([raw] * 3, gd.GpuAugment(16, mode="center"), device="cpu", threads=2,
                               decoder=Stuck(), stall_timeout=1.0)
    try:
        with pytest.raises(RuntimeError, match="no batch from the data pipeline's threads for 1 s"):
            list(pipe)
    finally:
        release.set()
    assert "decode_packed" in capfd.readouterr().err


def test_threaded_pipeline_raises_a_producer_error():
    def broken():
        yield {"jpegs": [_encode("jpeg")], "labels": [0]}
        raise OSError("shard unreadable")
    pipe = gd.GpuBatchPipeline(broken(), gd.GpuAugment(16, mode="center"), device="cpu", threads=2)
    with pytest.raises(OSError, match="shard unreadable"):
        list(pipe)


# ------------------------------------------------------------------------------ integration

def test_loader_gpu_decode_hands_over_raw_batches(tmp_path):
    info = write_shards(tmp_path / "shards", train_counts=[10, 7, 3], val_counts=[5, 4])
    kw = dict(global_batch_size=8, epoch=1, seed=0, rank=0, world_size=1, workers=0, crop_size=64)
    raw = list(L.train_loader(info["dir"], decode="gpu", **kw))
    assert len(raw) == len(L.train_loader(info["dir"], **kw)) == 2
    for r in raw:
        assert set(r) == {"data", "offsets", "frames", "labels", "keys"} and r["data"].dtype == torch.uint8
        assert len(r["keys"]) == len(r["labels"]) == len(r["offsets"]) - 1 == len(r["frames"]) == 8
        for blob, frame in zip(gd.unpack_jpegs(r["data"], r["offsets"]), r["frames"]):
            assert tuple(frame[:2]) == tuple(gd.pil_decode(blob).shape[1:])
    hybrid = next(iter(L.train_loader(info["dir"], decode="gpu", cpu_fraction=0.25, **kw)))
    assert hybrid["pre"].shape == (2, 3, 64, 64) and len(hybrid["keys"]) == 6
    val = list(L.val_loader(info["dir"], 4, 0, 1, 2, 64, decode="gpu"))
    assert sorted(k for r in val for k in r["keys"]) == sorted(info["val_keys"])
    with pytest.raises(ValueError, match="ten-crop"):
        L.val_loader(info["dir"], 4, 0, 1, 0, 64, ten_crop=True, decode="gpu")


def test_eval_top1_same_with_cpu_and_gpu_decode(tmp_path_factory, mini_resized, tmp_path):
    """A trained mini model scores the same on the val shards through either data path."""
    shards, run = trained_run(tmp_path_factory, mini_resized)
    docs = {}
    for decode in ("cpu", "gpu"):
        out = tmp_path / f"eval_{decode}.json"
        assert E.main(["--run", str(run), "--shards", str(shards), "--device", "cpu", "--workers", "1",
                       "--batch-size", "8", "--decode", decode, "--output", str(out)]) == 0
        docs[decode] = json.loads(out.read_text())
    cpu, gpu = docs["cpu"], docs["gpu"]
    assert gpu["settings"]["decode"] == "gpu" and cpu["settings"]["decode"] == "cpu"
    assert gpu["count"] == cpu["count"] > 0
    assert gpu["correct1"] == cpu["correct1"] and gpu["correct5"] == cpu["correct5"]
    assert gpu["top1_error"] == cpu["top1_error"]
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-3)


def test_train_with_gpu_decode_reports_bad_samples(tmp_path):
    """--decode gpu: undecodable train and val images are reported, never silently dropped."""
    info = write_shards(tmp_path / "shards", train_counts=[10, 7], val_counts=[5, 4])
    bad_val = corrupt_sample(info["dir"] / "val-000001.tar", 0, b"not a jpeg at all")
    bad_train = corrupt_sample(info["dir"] / "train-000000.tar", 0, b"not a jpeg at all")
    out = tmp_path / "run"
    assert train.main(["--shards", str(info["dir"]), "--out", str(out), "--arch", "mobilenet_v3_small",
                       "--crop-size", "64", "--batch-size", "8", "--epochs", "2", "--device", "cpu",
                       "--workers", "1", "--decode", "gpu", "--cpu-fraction", "0.25",
                       "--log-every", "1"]) == 0
    rows = (out / "bad_samples.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:2] == ["key", "reason"]
    reported = [r.split("\t")[0] for r in rows[1:]]
    # the tiny train stream repeats its samples (endless shuffle buffer): the bad one comes up a
    # few times, each time reported; the val image once per epoch
    assert set(reported) == {bad_train, bad_val} and reported.count(bad_val) == 2
    assert all("cannot decode" in r for r in rows[1:])
    final = json.loads((out / "final.json").read_text())
    assert final["val_count"] == info["val_total"] - 1 and final["steps_per_rank"] == [2]
    # every log line tells how the GPU data path's threads spent the interval (shares, per rank)
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if r["kind"] == "train"]
    assert logged and all(0 <= r["raw_wait_ranks"][0] <= 1 and 0 <= r["decode_busy_ranks"][0] <= 1
                          for r in logged)
    assert any(r["decode_busy_ranks"][0] > 0 for r in logged)
    # and each epoch's record its stages' host ms per batch, per rank
    stages = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]["data_path_ms_per_batch"]
    assert set(stages) == set(train.DATA_PATH_STAGES) and all(len(v) == 1 and v[0] >= 0 for v in stages.values())
    assert stages["decode"][0] > 0 and stages["crop"][0] > 0


def test_threaded_pipeline_runs_ahead_only_prefetch_batches():
    import time
    raws = [{"jpegs": [_encode("jpeg", w=40, h=40)], "labels": [i]} for i in range(30)]
    pipe = gd.GpuBatchPipeline(raws, gd.GpuAugment(16, mode="center"), device="cpu", threads=2, prefetch=3)
    it = iter(pipe)
    next(it)
    time.sleep(1.0)  # a slow step (e.g. one being compiled): the threads must wait, not fill memory
    assert pipe.stats["batches"] <= 1 + 3 + 2
    assert [int(y) for _, y in it] == list(range(1, 30))


def test_pipelines_sharing_a_pool_make_each_decoder_once_and_lend_it_to_one_thread_at_a_time():
    """tools.train's epochs: every epoch's (and validation's) decode threads take their decoders
    from the run's DecoderPool and give them back, instead of making (and on a GPU, reserving and
    freeing) new ones each epoch."""
    import threading
    import time
    made, in_use, lock = [], set(), threading.Lock()

    class Decoder:  # torchvision's decode, with the threads that use it at once recorded
        kind = "fake"

        def __init__(self):
            self.decode, self.uses = gd.torchvision_gpu_decoder("cpu"), 0

        def __call__(self, tensors):
            with lock:
                assert self not in in_use, "one decoder used by two threads at once"
                in_use.add(self)
            time.sleep(0.002)
            try:
                self.uses += 1
                return self.decode(tensors)
            finally:
                with lock:
                    in_use.discard(self)

    pool = gd.DecoderPool(make=lambda kind, device: made.append(Decoder()) or made[-1])
    raws = [{"jpegs": [_encode("jpeg", w=40 + i, h=30)], "labels": [i]} for i in range(9)]
    reference = list(gd.GpuBatchPipeline(raws, gd.GpuAugment(16, mode="center"), device="cpu", threads=2))
    for epoch in range(3):
        for threads in (2, 0):  # the epoch's train pipeline, then its validation's
            pipe = gd.GpuBatchPipeline(raws, gd.GpuAugment(16, mode="center"), device="cpu", threads=threads,
                                       decoder="fake", pool=pool)
            out = list(pipe)
            assert [int(y) for _, y in out] == list(range(9))
            assert all(torch.equal(x, r) for (x, _), (r, _) in zip(out, reference))
            assert len(pool) == len(made)  # every decoder back once the iteration has ended
    assert len(made) <= 2 and sum(d.uses for d in made) == 6 * 9
    # a consumer that stops early gives the decoders back too
    for threads in (2, 0):
        it = iter(gd.GpuBatchPipeline(raws, gd.GpuAugment(16, mode="center"), device="cpu", threads=threads,
                                      decoder="fake", pool=pool))
        next(it)
        it.close()
        assert len(pool) == len(made) <= 2

    class FailingOnce(gd.GpuAugment):
        failed = False

        def __call__(self, images, index=None):
            if index == 3 and not self.failed:
                self.failed = True
                raise RuntimeError("augment failed")
            return super().__call__(images, index)

    # after an error the decoder in use is dropped (its state unknown), the others go back; the
    # same pipeline iterated again takes a decoder from the pool, not the dropped one
    for threads in (0, 2):
        idle, count = len(pool), len(made)
        pipe = gd.GpuBatchPipeline(raws, FailingOnce(16, mode="center"), device="cpu", threads=threads,
                                   decoder="fake", pool=pool)
        with pytest.raises(RuntimeError, match="augment failed"):
            list(pipe)
        assert len(pool) == idle + (len(made) - count) - 1
        idle, count = len(pool), len(made)
        assert len(list(pipe)) == 9 and len(pool) == idle + (len(made) - count)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_decoders_reserve_once_per_run_with_a_pool(monkeypatch):
    from tools.imagenet import nvjpeg
    _engine_or_skip()
    reserved = []
    original = nvjpeg.NvjpegDecoder.reserve
    monkeypatch.setattr(nvjpeg.NvjpegDecoder, "reserve", lambda self, n: reserved.append(n) or original(self, n))
    blobs = [_encode("jpeg", w=256 + 8 * i, h=256) for i in range(16)]
    raws = []
    for b in range(6):
        data, offsets = gd.pack_jpegs(blobs)
        raws.append({"data": data, "offsets": offsets, "labels": torch.arange(16) + b})
    pool = gd.DecoderPool()
    for epoch in range(3):
        pipe = gd.GpuBatchPipeline(raws, gd.GpuAugment(224, mode="crop", seed=epoch), device="cuda",
                                   threads=2, decoder="engine", pool=pool)
        assert len([x for x, _ in pipe]) == 6
    assert 1 <= len(reserved) <= 2 and len(pool) == len(reserved)  # not 2 per epoch


def test_train_keeps_validation_decoders_apart_from_the_epochs():
    """A decoder sized for training's batches never gets validation's (of another size, or short):
    each would set nvJPEG's state up again mid-run, or pad every batch of the smaller size."""
    first = types.SimpleNamespace(kind="engine")
    train_pool, val_pool = train.decoder_pools(first, "cuda:0")
    assert train_pool is not val_pool and len(val_pool) == 0
    assert train_pool.take("engine", "cuda:0") is first


def test_train_hands_its_data_path_flags_to_the_pipeline_and_loaders(tmp_path, monkeypatch):
    info = write_shards(tmp_path / "shards", train_counts=[10, 7], val_counts=[5, 4])
    made, pins = [], []

    class Recording(gd.GpuBatchPipeline):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.prefetch)

    def recording(make):
        def loader(*args, **kwargs):
            pins.append(kwargs["pin_raw"])
            return make(*args, **kwargs)
        return loader

    monkeypatch.setattr(gd, "GpuBatchPipeline", Recording)
    monkeypatch.setattr(train, "train_loader", recording(train.train_loader))
    monkeypatch.setattr(train, "val_loader", recording(train.val_loader))
    assert train.main(["--shards", str(info["dir"]), "--out", str(tmp_path / "run"), "--arch",
                       "mobilenet_v3_small", "--crop-size", "64", "--batch-size", "8", "--epochs", "1",
                       "--device", "cpu", "--workers", "0", "--decode", "gpu", "--gpu-prefetch", "5",
                       "--pin-raw"]) == 0
    assert made == [3, 5]  # validation (made first) keeps its default; the train pipeline takes the flag
    assert pins == [True, True]  # validation's loader and the epoch's
    with pytest.raises(SystemExit):
        train.parse_args(["--shards", "s", "--out", "o", "--gpu-prefetch", "0"])


def test_gpu_prefetch_defaults_to_the_measured_depth():
    """8 decoded batches ready: 2-GPU runs kept their ranks fed where 3 stalled them
    (bench/NOTES-gpu.md phase 17); the tool called directly and the workflow agree."""
    assert train.parse_args(["--shards", "s", "--out", "o"]).gpu_prefetch == 8
    config = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())
    assert config["train"]["gpu_prefetch"] == 8
