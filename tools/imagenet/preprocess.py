"""Test-time image geometry shared by evaluation (prepared shards) and prediction (any image file).

Usage:
    from tools.imagenet import preprocess as pp
    from tools.imagenet.image import load_resized
    img = load_resized("photo.png", short_side=256)         # RGB PIL image, as the resize stage makes it
    x = pp.to_tensor(pp.fit_crop(img, 224))                 # uint8 C x H x W
    crop = pp.center_crop(x, 224)                           # uint8 C x 224 x 224
    crops = pp.ten_crop(x, 224)                             # uint8 10 x C x 224 x 224
    inputs = pp.normalize(crop[None], mean, std)            # float32, ready for the model

Geometry (the one place it is defined):
- center crop: offsets (H - crop) // 2, (W - crop) // 2 (as tools.imagenet.loader's val center crop);
- ten crops: top-left, top-right, bottom-left, bottom-right, center, then the same five flipped
  horizontally (torchvision's TenCrop order).
"""
import io

import numpy as np
import torch
from PIL import Image

from tools.imagenet.image import load_resized

# What `predict` picks up from a folder; explicit file arguments are decoded whatever their name.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm", ".pnm"})


def center_offsets(height, width, crop):
    """(top, left) of the centered crop x crop window."""
    if height < crop or width < crop:
        raise ValueError(f"image {width}x{height} is smaller than the {crop}-px crop")
    return (height - crop) // 2, (width - crop) // 2


def ten_crop_offsets(height, width, crop):
    """(top, left) of the four corner crops and the center crop, in TenCrop order."""
    center = center_offsets(height, width, crop)
    return [(0, 0), (0, width - crop), (height - crop, 0), (height - crop, width - crop), center]


def center_crop(x, crop):
    """Center crop of a ... x H x W tensor (any leading dims)."""
    top, left = center_offsets(x.shape[-2], x.shape[-1], crop)
    return x[..., top:top + crop, left:left + crop]


def ten_crop(x, crop):
    """C x H x W (or ... x H x W) -> 10 x C x crop x crop: four corners + center, then their mirrors."""
    five = torch.stack([x[..., t:t + crop, l:l + crop] for t, l in ten_crop_offsets(x.shape[-2], x.shape[-1], crop)])
    return torch.cat([five, five.flip(-1)])


def normalize(x, mean, std):
    """uint8 ... x C x H x W (0..255) -> float32 (x / 255 - mean) / std, per channel (mean/std on 0..1)."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return (x.float().div_(255.0) - mean).div_(std)


def to_tensor(img):
    """RGB PIL image -> uint8 3 x H x W tensor."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def fit_crop(img, crop):
    """Enlarge an image whose short side is below `crop` so that the crop fits (short side = crop,
    aspect kept). The resize stage never enlarges, so such small images keep their size in the
    prepared data and the val loader enlarges them at load time: same formula and (bilinear) filter
    as tools.imagenet.loader, so predict and evaluate see the same pixels."""
    w, h = img.size
    if min(w, h) >= crop:
        return img
    s = crop / min(w, h)
    return img.resize((max(crop, round(w * s)), max(crop, round(h * s))), Image.BILINEAR)


def reencode(img, quality):
    """The resize stage's JPEG encode of `img` at `quality`, decoded again (its artefacts included)."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=False, progressive=False)
    buf.seek(0)
    with Image.open(buf) as decoded:
        return decoded.convert("RGB")


def load_for_model(path, resize_size, crop_size, ten=False, jpeg_quality=None):
    """An image file -> uint8 3 x crop x crop (center crop), or 10 x 3 x crop x crop with ten=True.
    jpeg_quality replays the resize stage's encode, so that an original file gives exactly the pixels
    evaluation reads from the shards. Decoding: tools.imagenet.image.load_resized, the resize stage's own."""
    img = load_resized(path, resize_size)
    if jpeg_quality is not None:
        img = reencode(img, jpeg_quality)
    x = to_tensor(fit_crop(img, crop_size))
    return ten_crop(x, crop_size) if ten else center_crop(x, crop_size)
