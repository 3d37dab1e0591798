"""Decoding any image file into the 8-bit RGB picture the resize stage writes (before its JPEG encode).

Usage:
    from tools.imagenet.image import load_resized, to_8bit
    img = load_resized("photo.png", short_side=256)   # RGB PIL image, short side 256 (never enlarged)
    rgb_or_l = to_8bit(Image.open(path))              # any PIL mode -> L or RGB, ICC converted to sRGB

The one definition of the pixels: tools.resize (the stage) is `load_resized` + a JPEG encode,
tools.predict reads original photos with it, and the GPU data path converts odd modes with
`to_8bit`. Nothing here changes process-wide state (torch's thread count is the stage's business).
"""
import hashlib
import io

import numpy as np
from PIL import Image, ImageCms

# Same mapping as PIL.ImageOps.exif_transpose; applied after the resize, where it is cheaper.
ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112
# Antialiased bicubic (a = -0.5), the filter of Pillow's and torchvision's default resize. Two
# implementations give the same pixels within +-1: torch's uint8 kernel (AVX2, about 0.7 ms on a
# 500x375 ImageNet JPEG) and Pillow's (about 3 ms, then the largest cost of the whole stage, which
# keeps Pillow below 5x ImageMagick's speed). torch is the default; Pillow is there for machines
# without torch. reducing_gap: Pillow first reduce()s by an integer factor while the image is still
# >= 3x the target (after the JPEG draft this only matters for big PNGs and other non-JPEG images).
_RESAMPLE = Image.Resampling.BICUBIC
_REDUCING_GAP = 3.0
RESAMPLERS = ("torch", "pillow")

_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_icc_cache = {}  # per process: sha1(profile)+mode -> transform, or None where no transform is needed


def target_size(width, height, short_side):
    """(w, h) with the short side at `short_side`, aspect kept; the input size if already small."""
    short = min(width, height)
    if short <= short_side:
        return width, height
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def _icc_transform(icc, mode):
    """A cached ImageCms transform from the embedded profile to sRGB, or None (sRGB already, or unusable)."""
    key = (hashlib.sha1(icc).digest(), mode)
    if key not in _icc_cache:
        transform = None
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            description = ImageCms.getProfileDescription(profile) or ""
            # Most ImageNet profiles are sRGB already: skip the (costly) identity transform.
            if "srgb" not in description.lower():
                transform = ImageCms.buildTransform(profile, _SRGB, mode, "RGB")
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            transform = None  # a broken profile: fall back to a plain conversion
        if len(_icc_cache) > 64:
            _icc_cache.clear()
        _icc_cache[key] = transform
    return _icc_cache[key]


def _scale_to_8bit(img):
    """16/32-bit integer and float grayscale to L, scaling the value range (not clipping it)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr = arr.astype(np.uint32)
        out = (arr * 255 + 32767) // 65535
    elif img.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64))
        out = np.rint(np.clip(arr * 255.0 if arr.max(initial=0) <= 1.0 else arr, 0, 255))
    else:  # "I": 32-bit signed; PNG 16-bit data lands here in some Pillow versions
        arr = np.clip(arr.astype(np.int64), 0, None)
        hi = int(arr.max(initial=0))
        if hi <= 255:
            out = arr
        elif hi <= 65535:
            out = (arr * 255 + 32767) // 65535
        else:
            out = (arr * 255 + hi // 2) // hi
    return Image.fromarray(out.astype(np.uint8), "L")


def _on_white(img):
    """Composite an image with alpha onto a white background; returns RGB."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_8bit(img):
    """Any PIL mode to L or RGB (8 bits); the ICC profile, if any, converted to sRGB."""
    mode = img.mode
    icc = img.info.get("icc_profile")
    if icc and mode in ("RGB", "CMYK"):
        transform = _icc_transform(icc, mode)
        if transform is not None:
            try:
                return ImageCms.applyTransform(img, transform)
            except (ImageCms.PyCMSError, ValueError, OSError):
                pass
    if mode in ("RGB", "L"):
        # a tRNS chunk (PNG) marks one colour as transparent: show it as white like any alpha
        return _on_white(img) if "transparency" in img.info else img
    if mode == "P":
        if "transparency" in img.info:
            return _on_white(img)
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _on_white(img)
    if mode.startswith("I") or mode == "F":
        return _scale_to_8bit(img)
    if mode == "1":
        return img.convert("L")
    # CMYK (PIL reads JPEG CMYK with Adobe's inverted convention), YCbCr, LAB, HSV
    return img.convert("RGB")


def _resize_torch(img, size):
    # Imported here: the Pillow path and to_8bit must work without torch. The thread count is left
    # alone (the resize stage pins 1 per pool worker; predict's threads share torch's own pool).
    import torch
    arr = np.array(img)  # writable copy: torch refuses read-only buffers
    x = torch.from_numpy(arr)
    # HWC memory seen as NCHW is channels_last, the layout torch's fast uint8 kernel wants.
    x = x[None, None] if arr.ndim == 2 else x.permute(2, 0, 1)[None]
    y = torch.nn.functional.interpolate(x, (size[1], size[0]), mode="bicubic", antialias=True)
    y = y[0, 0] if arr.ndim == 2 else y[0].permute(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(y.numpy()), img.mode)


def resample(img, size, resampler="torch"):
    """Antialiased bicubic resize of an L or RGB image to size (w, h)."""
    if resampler == "torch":
        return _resize_torch(img, size)
    if resampler != "pillow":
        raise ValueError(f"resampler must be one of {RESAMPLERS}, not {resampler!r}")
    return img.resize(size, _RESAMPLE, reducing_gap=_REDUCING_GAP)


def orientation(img):
    """The EXIF orientation tag (1..8) of an opened image; 1 when absent or unreadable."""
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # broken EXIF must not cost the image
        return 1


def load_resized(src, short_side, resampler="torch"):
    """Decode an image file (path, file object or bytes; any format PIL knows, found by content)
    into an RGB PIL image: 8-bit (to_8bit), short side `short_side` (never enlarged), EXIF
    orientation applied, no metadata. Raises (OSError, ValueError, ...) when it cannot be decoded,
    truncated files included."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(src)
    with Image.open(src) as img:
        turn = orientation(img)
        tw, th = target_size(img.width, img.height, short_side)
        if img.format == "JPEG" and (tw, th) != img.size:
            # DCT-domain downscale by 1/2, 1/4 or 1/8 while staying >= the target: big JPEGs decode
            # several times faster, and the bicubic pass below does the final, accurate step.
            img.draft("RGB", (tw, th))
        img.load()
        out = to_8bit(img)
        if out.size != (tw, th):
            out = resample(out, (tw, th), resampler)
        if out.mode != "RGB":
            out = out.convert("RGB")
        if turn in ORIENTATION:
            out = out.transpose(ORIENTATION[turn])
        if out is img:  # an RGB image already at its size: detach it from the file being closed
            out = out.copy()
        out.info = {}  # no EXIF, ICC or comments in the output
        return out
