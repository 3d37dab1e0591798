"""The shard loaders: equal batch counts per rank, per-epoch shard assignment, val exactly once."""
import random
from collections import Counter

import pytest
import torch
from PIL import Image

from tests._shards import corrupt_sample, write_shards
from tools.imagenet import loader as L

TRAIN = [10, 7, 3, 9, 5, 6, 4]  # 44 samples in 7 uneven shards
VAL = [5, 4, 3, 6, 2, 1, 4]     # 25


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), train_counts=TRAIN, val_counts=VAL)


@pytest.mark.parametrize("num_shards,num_streams", [(7, 4), (7, 8), (3, 8), (1, 5), (8, 8), (13, 6)])
def test_split_streams_covers_every_sample_once(num_shards, num_streams):
    rng = random.Random(num_shards)
    shards = [(f"s{i}", rng.randrange(1, 12)) for i in range(num_shards)]
    seen = Counter()
    for pieces in L.split_streams(shards, num_streams):
        for name, count, stride, offset in pieces:
            seen.update((name, i) for i in range(count) if i % stride == offset)
    assert seen == Counter((name, i) for name, count in shards for i in range(count))


@pytest.mark.parametrize("world,workers", [(2, 4), (3, 0), (2, 2)])
def test_every_rank_gets_the_same_number_of_batches(shards, world, workers):
    # 7 shards over 2 ranks x 4 workers: fewer shards than streams, uneven shard sizes.
    counts = []
    for rank in range(world):
        loader = L.train_loader(shards["dir"], 6 * world, epoch=1, seed=0, rank=rank,
                                world_size=world, workers=workers, crop_size=32)
        batches = list(loader)
        counts.append(len(batches))
        assert all(x.shape == (6, 3, 32, 32) and x.dtype == torch.uint8 for x, _ in batches)
        assert all(y.dtype == torch.int64 and y.shape == (6,) for _, y in batches)
    assert counts == [44 // (6 * world)] * world
    assert len(loader) == counts[0]


def test_epoch_size_sets_batches_per_epoch_below_and_beyond_one_pass(shards):
    loader = L.train_loader(shards["dir"], 4, epoch=1, seed=0, rank=0, world_size=1, workers=0,
                            crop_size=32, epoch_size=3)
    assert len(list(loader)) == 3
    one_pass = L.batches_per_epoch(44, 4)
    assert one_pass == 11

    def labels(epoch_size):
        loader = L.train_loader(shards["dir"], 4, epoch=1, seed=0, rank=0, world_size=1, workers=0,
                                crop_size=32, epoch_size=epoch_size, shuffle_buffer=1)
        return torch.cat([y for _, y in loader])

    # beyond one pass the stream goes round again (unshuffled here, so passes do not mix): two
    # passes show every train image twice
    once, twice = labels(one_pass), labels(2 * one_pass)
    assert len(twice) == 88 and torch.equal(torch.bincount(twice), 2 * torch.bincount(once))


def test_shard_assignment_changes_between_epochs(shards):
    shard_list = L._shard_list(L.read_manifest(shards["dir"], "train"))

    def assignment(epoch):
        ds = L.TrainStream(str(shards["dir"]), shard_list, 4, epoch, 0, 0, 2, 1, 32, "crop", 10)
        return [name for name, *_ in ds.pieces(0)]

    first = assignment(1)
    assert first == assignment(1)  # depends only on seed and epoch
    assert any(assignment(e) != first for e in range(2, 5))
    # Both ranks agree on the order, so together they hold every shard.
    ds1 = L.TrainStream(str(shards["dir"]), shard_list, 4, 1, 0, 1, 2, 1, 32, "crop", 10)
    assert sorted(first + [n for n, *_ in ds1.pieces(0)]) == sorted(n for n, _ in shard_list)


def test_train_batches_are_reproducible(shards):
    def first_batch(epoch):
        x, y = next(iter(L.train_loader(shards["dir"], 4, epoch, 0, 0, 1, 0, 32)))
        return x, y
    a, b = first_batch(1), first_batch(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], first_batch(2)[0])


@pytest.mark.parametrize("world,workers,val_counts", [(2, 2, VAL), (2, 4, [9, 8, 8])])
def test_val_sees_every_image_exactly_once(tmp_path, world, workers, val_counts):
    info = write_shards(tmp_path, train_counts=[4], val_counts=val_counts)
    shard_list = L._shard_list(L.read_manifest(tmp_path, "val"))
    keys, total = [], 0
    for rank in range(world):
        loader = L.val_loader(tmp_path, 3, rank, world, workers, crop_size=32)
        n = sum(len(y) for _, y in loader)  # the real DataLoader path with workers
        assert n == loader.num_samples
        total += n
        for w in range(max(workers, 1)):
            ds = L.ValStream(str(tmp_path), shard_list, 3, rank, world, workers, 32)
            keys += [s["__key__"] for _, s in L._read(tmp_path, ds.pieces(w))]
    assert total == info["val_total"]
    assert sorted(keys) == sorted(info["val_keys"])


def test_val_batches_are_center_crops(shards):
    x, y = next(iter(L.val_loader(shards["dir"], 5, 0, 1, 0, crop_size=48)))
    assert x.shape == (5, 3, 48, 48) and x.dtype == torch.uint8 and y.shape == (5,)


def test_crops_and_flips():
    img = Image.new("RGB", (90, 72))
    img.putpixel((0, 0), (255, 0, 0))
    rng = random.Random(0)
    crops = [L.random_crop(img, 64, rng) for _ in range(40)]
    assert all(c.size == (64, 64) for c in crops)
    assert all(L.random_resized_crop(img, 64, rng).size == (64, 64) for _ in range(40))
    assert L.center_crop(img, 64).size == (64, 64)
    # A crop at the top-left corner keeps the red pixel, flipped or not: both must occur.
    wide = Image.new("RGB", (64, 64))
    wide.putpixel((0, 0), (255, 0, 0))
    corners = {L.random_crop(wide, 64, rng).getpixel((63, 0)) for _ in range(40)}
    assert corners == {(0, 0, 0), (255, 0, 0)}


def test_small_images_are_enlarged_to_the_crop(shards):
    import io
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, format="JPEG")
    img = L._open_rgb("x.tar", {"__key__": "k", "jpg": buf.getvalue()}, 64)
    assert min(img.size) == 64


def test_normalize_channels_last_input():
    x = torch.full((2, 32, 32, 3), 255, dtype=torch.uint8).permute(0, 3, 1, 2)
    out = L.normalize(x, [0.5, 0.5, 0.5], [0.25, 0.5, 1.0])
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32)
    assert torch.allclose(out[:, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]).expand(2, 3))


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.json"):
        L.read_manifest(tmp_path, "train")


def test_hybrid_batch_hands_an_undecodable_sample_to_the_gpu_path(tmp_path):
    from tools.imagenet import gpu_data as gd
    info = write_shards(tmp_path, train_counts=[8], val_counts=[2])
    bad = corrupt_sample(info["dir"] / "train-000000.tar", 3)
    loader = L.train_loader(info["dir"], 8, epoch=1, seed=0, rank=0, world_size=1, workers=0,
                            crop_size=32, decode="gpu", cpu_fraction=1.0)
    raw = next(iter(loader))  # the worker's decode failed: the sample travels undecoded
    assert raw["keys"] == [bad] and raw["pre"].shape == (7, 3, 32, 32)
    seen = []
    pipe = gd.GpuBatchPipeline([raw], gd.GpuAugment(32, mode="crop"), device="cpu", threads=0,
                               on_failure=lambda key, reason: seen.append(key))
    (x, y), = list(pipe)
    assert seen == [bad] and x.shape == (7, 3, 32, 32) and torch.equal(y, torch.as_tensor(raw["pre_labels"]))


def test_workers_start_on_iter_not_on_first_batch(shards):
    """GpuBatchPipeline calls iter() in the caller's thread and next() in its fetch thread: the
    workers must fork at iter(), before that thread exists."""
    import multiprocessing
    loader = L.train_loader(shards["dir"], 4, epoch=1, seed=0, rank=0, world_size=1, workers=1,
                            crop_size=32, decode="gpu")
    before = set(multiprocessing.active_children())
    it = iter(loader)
    assert set(multiprocessing.active_children()) - before
    assert len(list(it)) == len(loader)


def test_gpu_decode_pins_raw_bytes_only_when_asked(shards, monkeypatch):
    """By default the engine decoder copies each batch's bytes into pinned memory in its own thread;
    pin_raw=True has the DataLoader's pin thread do it instead (the decoder then uses them as they
    are), and only where there is CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine's defaults
    kw = dict(epoch=1, seed=0, rank=0, world_size=1, workers=0, crop_size=32)
    assert L.train_loader(shards["dir"], 4, **kw).pin_memory is True
    for fraction in (0.0, 0.5):
        assert L.train_loader(shards["dir"], 4, decode="gpu", cpu_fraction=fraction, **kw).pin_memory is False
        assert L.train_loader(shards["dir"], 4, decode="gpu", cpu_fraction=fraction, pin_raw=True,
                              **kw).pin_memory is True
    assert L.val_loader(shards["dir"], 4, 0, 1, 0, 32, decode="gpu").pin_memory is False
    assert L.val_loader(shards["dir"], 4, 0, 1, 0, 32, decode="gpu", pin_raw=True).pin_memory is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert L.train_loader(shards["dir"], 4, decode="gpu", pin_raw=True, **kw).pin_memory is False


def test_starting_a_loader_leaves_the_global_rng_alone(shards):
    """The model's dropout draws from the global RNG: whether the loader is started in the training
    thread or elsewhere must not change it (DataLoader would draw its workers' base seed there)."""
    loader = L.train_loader(shards["dir"], 4, epoch=1, seed=0, rank=0, world_size=1, workers=1,
                            crop_size=32)
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    it = iter(loader)
    after = torch.rand(4)
    assert len(list(it)) == len(loader)  # the workers end before any assertion can fail
    assert torch.equal(after, expected)
