"""Train and val loaders over the WebDataset shards (`W/shards/{train,val}-NNNNNN.tar` + manifests).

Usage:
    from tools.imagenet.loader import read_manifest, train_loader, val_loader, normalize
    for x, y in train_loader("W/shards", global_batch_size=256, epoch=1, seed=0, rank=0,
                             world_size=1, workers=8, crop_size=224):
        x = normalize(x.cuda(non_blocking=True), mean, std)

Distribution (see DESIGN.md, "WebDataset under DDP"): the shard list is shuffled per epoch with
`random.Random(seed * 1000003 + epoch)` BEFORE it is split, so all ranks agree and the assignment
changes every epoch. The split is over "streams" (rank x worker): with at least as many shards as
streams each stream gets whole shards; with fewer, several streams share a shard and take every
k-th sample of it. Train streams are endless (they cycle their shards) and every rank stops after
the same number of batches, so DDP never waits on a rank that ran dry. Val streams are read once,
in manifest order, so every val image is seen exactly once across all ranks and workers.
Batches are uint8 NCHW tensors laid out channels-last in memory (a permuted NHWC array).

decode="gpu": the workers only read the shards and hand over each batch undecoded, as
{"data": uint8 1-D tensor (all JPEG bytes), "offsets": int64 N+1 and "labels": int64 N numpy arrays,
"keys": [N str]} (only the big tensor goes through shared memory: each shared tensor costs the main
process a socket connection to receive its file descriptor)
(plus, for train with cpu_fraction > 0, "pre"/"pre_labels": that share of the batch decoded and
cropped by the worker, uint8; a sample the worker cannot decode stays raw, so the GPU path retries
it and reports it): tools.imagenet.gpu_data.GpuBatchPipeline decodes and crops them on the GPU.
decode="auto" is "gpu" where CUDA works, else "cpu".
"""
import io
import json
import math
import random
import signal
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tools.imagenet import preprocess
from tools.imagenet.image import to_8bit
from tools.imagenet.tar_reader import shard_samples

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def read_manifest(shards_dir, split):
    """The manifest `<shards_dir>/<split>.json`, with every listed shard checked to exist."""
    path = Path(shards_dir) / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {split} manifest; run `python -m tools.shard` first "
                                f"or pass the right --shards folder")
    try:
        manifest = json.loads(path.read_text())
        shards = manifest["shards"]
        manifest["num_samples"], manifest["classes"]
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not a shard manifest ({exc}); rerun the shard stage") from exc
    missing = [s["name"] for s in shards if not (path.parent / s["name"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} listed shard(s) missing, e.g. "
                                f"{path.parent / missing[0]}; rerun the shard stage")
    return manifest


def split_streams(shards, num_streams):
    """Assign shards [(name, count)] to `num_streams` streams: a list per stream of pieces
    (name, count, stride, offset) meaning "samples i of shard `name` with i % stride == offset"."""
    n = len(shards)
    if n >= num_streams:
        return [[(name, count, 1, 0) for name, count in shards[i::num_streams]]
                for i in range(num_streams)]
    streams = []
    for i in range(num_streams):
        name, count = shards[i % n]
        sharers = len(range(i % n, num_streams, n))
        streams.append([(name, count, sharers, i // n)])
    return streams


def piece_samples(pieces):
    """How many samples a stream's pieces hold."""
    return sum(len(range(offset, count, stride)) for _, count, stride, offset in pieces)


def epoch_shard_order(shards, seed, epoch):
    """The epoch's shard order, identical on every rank."""
    order = list(shards)
    random.Random(seed * 1000003 + epoch).shuffle(order)
    return order


def _read(shards_dir, pieces):
    for name, _, stride, offset in pieces:
        path = Path(shards_dir) / name
        for sample in shard_samples(path, stride, offset):
            if "jpg" not in sample or "cls" not in sample:
                raise ValueError(f"{path}: sample {sample.get('__key__')!r} lacks a .jpg or "
                                 f".cls member; rerun the shard stage")
            yield path, sample


def _shuffled(samples, size, rng):
    buf = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        j = rng.randrange(len(buf))
        yield buf[j]
        buf[j] = s
    rng.shuffle(buf)
    yield from buf


def decode_rgb(data):
    """Bytes of any image PIL reads, found by content -> 8-bit RGB PIL image, converted as the resize
    stage converts (tools.imagenet.image.to_8bit: CMYK, ICC, alpha on white, 16-bit, palette).
    The one CPU decode: the CPU loader's and the GPU path's fallback (gpu_data.pil_decode), so
    both give the same pixels. Raises (OSError, ValueError, ...) when nothing can decode it."""
    img = Image.open(io.BytesIO(data))
    img.load()
    rgb = to_8bit(img)
    return rgb if rgb.mode == "RGB" else rgb.convert("RGB")


def _open_rgb(path, sample, min_side):
    try:
        img = decode_rgb(sample["jpg"])
    except Exception as exc:
        raise ValueError(f"{path}: cannot decode {sample['__key__']}.jpg ({exc}); "
                         f"rerun the resize and shard stages") from exc
    # enlarges only images smaller than the crop (never the normal case), as predict does
    return preprocess.fit_crop(img, min_side)


def random_crop(img, size, rng):
    """The seed's train crop: a size x size window at a random place, flipped half the time."""
    w, h = img.size
    x, y = rng.randint(0, w - size), rng.randint(0, h - size)
    img = img.crop((x, y, x + size, y + size))
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def random_resized_crop(img, size, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop (same parameter search) + flip, with our own RNG."""
    w, h = img.size
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            break
    else:
        if w / h < ratio[0]:
            cw, ch = w, round(w / ratio[0])
        elif w / h > ratio[1]:
            cw, ch = round(h * ratio[1]), h
        else:
            cw, ch = w, h
        x, y = (w - cw) // 2, (h - ch) // 2
    img = img.resize((size, size), Image.BILINEAR, box=(x, y, x + cw, y + ch))
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def center_crop(img, size):
    y, x = preprocess.center_offsets(img.size[1], img.size[0], size)
    return img.crop((x, y, x + size, y + size))


def _ten_crops(img, size):
    # The geometry lives in preprocess, shared with tools.predict.
    return preprocess.ten_crop(preprocess.to_tensor(img), size)


def _batch_ten(crops, labels):
    return torch.stack(crops), torch.tensor(labels, dtype=torch.int64)


def _batch(images, labels):
    # NHWC array viewed as NCHW: channels-last memory, no copy.
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images]))
    return x.permute(0, 3, 1, 2), torch.tensor(labels, dtype=torch.int64)


def resolve_decode(decode, ten_crop=False):
    """"cpu" or "gpu" for a decode setting; auto: gpu where CUDA works (never for ten crops)."""
    if decode not in ("cpu", "gpu", "auto"):
        raise ValueError(f"unknown decode {decode!r}: choose cpu, gpu or auto")
    if decode == "auto":
        return "gpu" if torch.cuda.is_available() and not ten_crop else "cpu"
    if decode == "gpu" and ten_crop:
        raise ValueError("ten-crop evaluation decodes on the CPU: use decode cpu")
    return decode


def _raw_batch(samples, pre=None, pre_labels=None):
    """Undecoded batch for the GPU path (see the module docstring)."""
    from tools.imagenet.gpu_data import jpeg_frames, pack_jpegs
    blobs = [s["jpg"] for s in samples]
    data, offsets = pack_jpegs(blobs)
    out = {"data": data, "offsets": offsets.numpy(), "frames": jpeg_frames(blobs),
           "labels": np.array([int(s["cls"]) for s in samples], dtype=np.int64),
           "keys": [s["__key__"] for s in samples]}
    if pre is not None:
        out["pre"], out["pre_labels"] = pre, pre_labels.numpy()
    return out


def _worker():
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class TrainStream(IterableDataset):
    """Endless local batches of one rank; each DataLoader worker reads its own stream."""

    def __init__(self, shards_dir, shards, local_batch, epoch, seed, rank, world_size, workers,
                 crop_size, aug, shuffle_buffer, decode="cpu", cpu_fraction=0.0):
        super().__init__()
        self.__dict__.update(shards_dir=shards_dir, shards=shards, local_batch=local_batch,
                             epoch=epoch, seed=seed, rank=rank, world_size=world_size,
                             workers=max(workers, 1), crop_size=crop_size, aug=aug,
                             shuffle_buffer=shuffle_buffer, decode=decode,
                             cpu_fraction=cpu_fraction)

    def pieces(self, worker):
        order = epoch_shard_order(self.shards, self.seed, self.epoch)
        return split_streams(order, self.world_size * self.workers)[self.rank * self.workers + worker]

    def __iter__(self):
        worker, _ = _worker()
        pieces = self.pieces(worker)
        if piece_samples(pieces) == 0:
            raise ValueError(f"{self.shards_dir}: rank {self.rank} worker {worker} has no train "
                             f"samples; use fewer workers or ranks than train samples")
        rng = random.Random(f"train/{self.seed}/{self.epoch}/{self.rank}/{worker}")
        crop = random_resized_crop if self.aug == "rrc" else random_crop

        def endless():
            order = list(pieces)
            while True:
                yield from _read(self.shards_dir, order)
                rng.shuffle(order)

        if self.decode == "gpu":
            yield from self._raw(_shuffled(endless(), self.shuffle_buffer, rng), rng, crop)
            return
        images, labels = [], []
        for path, sample in _shuffled(endless(), self.shuffle_buffer, rng):
            images.append(crop(_open_rgb(path, sample, self.crop_size), self.crop_size, rng))
            labels.append(int(sample["cls"]))
            if len(images) == self.local_batch:
                yield _batch(images, labels)
                images, labels = [], []


    def _raw(self, samples, rng, crop):
        """GPU decode: undecoded batches; the first cpu_fraction of each decoded and cropped here."""
        n_cpu = min(self.local_batch, round(self.local_batch * self.cpu_fraction))
        batch = []
        for path, sample in samples:
            batch.append((path, sample))
            if len(batch) < self.local_batch:
                continue
            pre = pre_labels = None
            images, labels, undecoded = [], [], []
            for p, s in batch[:n_cpu]:
                try:
                    img = _open_rgb(p, s, self.crop_size)
                except ValueError:
                    # left to the GPU path: it retries the sample and reports it if that fails too
                    undecoded.append(s)
                    continue
                images.append(crop(img, self.crop_size, rng))
                labels.append(int(s["cls"]))
            if images:
                pre, pre_labels = _batch(images, labels)
            yield _raw_batch(undecoded + [s for _, s in batch[n_cpu:]], pre, pre_labels)
            batch = []


class ValStream(IterableDataset):
    """Center crops of the val shards, each image once across all ranks and workers."""

    def __init__(self, shards_dir, shards, batch_size, rank, world_size, workers, crop_size,
                 ten_crop=False, decode="cpu"):
        super().__init__()
        self.__dict__.update(shards_dir=shards_dir, shards=shards, batch_size=batch_size,
                             rank=rank, world_size=world_size, workers=max(workers, 1),
                             crop_size=crop_size, ten_crop=ten_crop, decode=decode)

    def pieces(self, worker):
        return split_streams(self.shards, self.world_size * self.workers)[self.rank * self.workers + worker]

    def __iter__(self):
        worker, _ = _worker()
        if self.decode == "gpu":
            samples = []
            for _, sample in _read(self.shards_dir, self.pieces(worker)):
                samples.append(sample)
                if len(samples) == self.batch_size:
                    yield _raw_batch(samples)
                    samples = []
            if samples:
                yield _raw_batch(samples)
            return
        images, labels = [], []
        crop, batch = (_ten_crops, _batch_ten) if self.ten_crop else (center_crop, _batch)
        for path, sample in _read(self.shards_dir, self.pieces(worker)):
            images.append(crop(_open_rgb(path, sample, self.crop_size), self.crop_size))
            labels.append(int(sample["cls"]))
            if len(images) == self.batch_size:
                yield batch(images, labels)
                images, labels = [], []
        if images:
            yield batch(images, labels)


def _as_is(batch):
    return batch


def _worker_init(_):
    # A preempted job's SIGTERM reaches the workers too: let the main process stop them after its
    # current step instead of dying mid-batch.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Loader:
    """Iterates `num_batches` batches of a fresh DataLoader (None: until the dataset ends)."""

    def __init__(self, dataset, workers, num_batches=None, num_samples=None, pin_memory=None):
        self.dataset, self.workers = dataset, workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.num_batches, self.num_samples = num_batches, num_samples

    def __len__(self):
        if self.num_batches is None:
            raise TypeError("this loader's length is not fixed")
        return self.num_batches

    def __iter__(self):
        # collate_fn: batches are built by the streams; the default would turn a raw batch's small
        # numpy arrays into tensors, each then shared through its own file descriptor
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                            pin_memory=self.pin_memory, collate_fn=_as_is,
                            prefetch_factor=4 if self.workers else None,
                            worker_init_fn=_worker_init if self.workers else None,
                            # its own generator: iter() would otherwise draw the workers' base seed
                            # from the caller's global RNG, so the model's dropout would depend on
                            # which process or thread starts the loader (the streams seed their own)
                            generator=torch.Generator().manual_seed(0))
        # The workers fork here, in the caller's thread, not at the first next(): that may come
        # from GpuBatchPipeline's fetch thread, and a fork beside running threads can inherit a
        # lock one of them holds.
        return self._take(iter(loader))

    def _take(self, it):
        try:
            if self.num_batches is None:
                yield from it
            else:
                for _ in range(self.num_batches):
                    yield next(it)
        finally:
            del it  # stops the workers of the endless train stream


def _shard_list(manifest):
    return [(s["name"], s["num_samples"]) for s in manifest["shards"]]


def batches_per_epoch(num_samples, global_batch_size, epoch_size=None):
    """epoch_size batches where given (the train stream is endless: more than one pass repeats
    images within the epoch, as the Torch7 example's -epochSize did), else one pass."""
    n = num_samples // global_batch_size
    if n == 0:
        raise ValueError(f"global batch {global_batch_size} is larger than the {num_samples} "
                         f"train samples; lower --batch-size")
    return epoch_size or n


def train_loader(shards_dir, global_batch_size, epoch, seed, rank, world_size, workers, crop_size,
                 aug="crop", shuffle_buffer=1000, epoch_size=None, decode="cpu", cpu_fraction=0.0,
                 pin_raw=False):
    """This rank's (uint8 NCHW, int64) batches of global_batch_size / world_size for one epoch;
    the same count on every rank. decode="gpu": raw batches instead (module docstring), of which
    the workers decode and crop `cpu_fraction` on the CPU (hybrid); pin_raw: see _pinning."""
    decode = resolve_decode(decode)
    if not 0.0 <= cpu_fraction <= 1.0:
        raise ValueError(f"cpu_fraction {cpu_fraction} is not between 0 and 1")
    if global_batch_size % world_size:
        raise ValueError(f"global batch {global_batch_size} does not divide over {world_size} ranks")
    if aug not in ("crop", "rrc"):
        raise ValueError(f"unknown aug {aug!r}: choose crop or rrc")
    manifest = read_manifest(shards_dir, "train")
    n = batches_per_epoch(manifest["num_samples"], global_batch_size, epoch_size)
    ds = TrainStream(str(shards_dir), _shard_list(manifest), global_batch_size // world_size,
                     epoch, seed, rank, world_size, workers, crop_size, aug, shuffle_buffer,
                     decode, cpu_fraction)
    return Loader(ds, workers, num_batches=n, pin_memory=_pinning(decode, pin_raw))


def _pinning(decode, pin_raw):
    """The Loader's pin_memory (None: where there is CUDA). Decoded batches are pinned for their
    copy to the GPU. Raw batches (decode="gpu") only with pin_raw: by default the engine decoder
    copies each batch's bytes into pinned memory in its decode thread (tools.imagenet.nvjpeg),
    with pin_raw the DataLoader's pin thread does and the decoder reads them in place (other
    decoders read the bytes on the host, where pinning only costs a copy); GpuBatchPipeline pins
    the small pre-decoded part of a hybrid batch itself."""
    return None if decode == "cpu" or pin_raw else False


def val_loader(shards_dir, batch_size, rank, world_size, workers, crop_size, ten_crop=False,
               decode="cpu", pin_raw=False):
    """This rank's share of the val set as (uint8 NCHW center crops, int64) batches; the shares of
    all ranks cover every val image exactly once (they may differ in size). With ten_crop the
    images are uint8 N x 10 x C x H x W (see tools.imagenet.preprocess.ten_crop). decode="gpu":
    raw batches for GpuBatchPipeline with a "center" GpuAugment (pin_raw: see _pinning)."""
    decode = resolve_decode(decode, ten_crop)
    manifest = read_manifest(shards_dir, "val")
    ds = ValStream(str(shards_dir), _shard_list(manifest), batch_size, rank, world_size, workers,
                   crop_size, ten_crop, decode)
    count = sum(piece_samples(ds.pieces(w)) for w in range(ds.workers))
    return Loader(ds, workers, num_samples=count, pin_memory=_pinning(decode, pin_raw))


# One formula for every path (train, evaluate, predict): it lives in preprocess.
normalize = preprocess.normalize
