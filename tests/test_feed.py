"""tools.imagenet.feed.ProcessFeed: batches made in a spawned process reach the consumer intact, in
order, epoch after epoch; errors and a dead child are reported, never a hang (CPU: shared memory;
the CUDA test: IPC buffers and events, with a consumer slower than the producer)."""
import functools
import os

import pytest
import torch

from tools.imagenet.feed import FeedError, ProcessFeed

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_batches(count, device, epoch):
    """Batches of varying size (the slots must grow), contents fixed by (epoch, index)."""
    g = torch.Generator().manual_seed(epoch)
    out = []
    for i in range(count):
        n = 3 + (i * 5) % 7
        x = torch.rand(n, 3, 8, 8, generator=g).to(memory_format=torch.channels_last)
        out.append((x.to(device), (torch.arange(n) + 100 * i + 10_000 * epoch).to(device)))
    return out


def failing(epoch):
    if epoch == 2:
        raise ValueError("shard 7 is missing")
    return make_batches(2, "cpu", epoch)


def dying(epoch):
    if epoch == 2:
        os._exit(3)
    return make_batches(2, "cpu", epoch)


def numbered(count, epoch):
    """CUDA batches whose every value is the batch index (big enough that a copy takes a while)."""
    return [(torch.full((64, 3, 224, 224), float(i), device="cuda"),
             torch.full((64,), i, device="cuda")) for i in range(count)]


def same(got, want):
    return len(got) == len(want) and all(
        torch.equal(a, c.cpu()) and torch.equal(b, d.cpu()) for (a, b), (c, d) in zip(got, want))


def test_batches_arrive_intact_over_epochs_and_after_a_break():
    feed = ProcessFeed(functools.partial(make_batches, 9, "cpu"), "cpu", slots=3)
    try:
        for epoch in (1, 2):
            batches = feed.epoch(epoch)
            assert len(batches) == 9
            got = [(x.clone(), y.clone()) for x, y in batches]
            assert same(got, make_batches(9, "cpu", epoch))
            assert got[0][0].is_contiguous(memory_format=torch.channels_last)
        for i, _ in enumerate(feed.epoch(3)):  # a consumer that breaks off (e.g. SIGTERM)
            if i == 1:
                break
        got = [(x.clone(), y.clone()) for x, y in feed.epoch(4)]
        assert same(got, make_batches(9, "cpu", 4))
    finally:
        feed.close()
    assert not feed.proc.is_alive()


def test_close_while_an_epoch_is_being_consumed():
    feed = ProcessFeed(functools.partial(make_batches, 20, "cpu"), "cpu", slots=2)
    it = iter(feed.epoch(1))
    next(it)
    feed.close()
    assert not feed.proc.is_alive() and feed.proc.exitcode == 0


def test_an_error_in_the_child_is_raised_with_its_traceback_and_the_feed_goes_on():
    feed = ProcessFeed(failing, "cpu")
    try:
        assert len(list(feed.epoch(1))) == 2
        with pytest.raises(FeedError, match="shard 7 is missing") as info:
            feed.epoch(2)
        assert "Traceback" in str(info.value) and "failing" in str(info.value)
        got = [(x.clone(), y.clone()) for x, y in feed.epoch(3)]
        assert same(got, make_batches(2, "cpu", 3))
    finally:
        feed.close()


def test_a_dead_child_is_an_error_not_a_hang():
    feed = ProcessFeed(dying, "cpu", poll_seconds=0.1)
    try:
        assert len(list(feed.epoch(1))) == 2
        with pytest.raises(RuntimeError, match="code 3"):
            feed.epoch(2)
    finally:
        feed.close()


@cuda
def test_cuda_ipc_batches_are_not_overwritten_while_a_slow_step_reads_them():
    feed = ProcessFeed(functools.partial(numbered, 12), "cuda", slots=2)
    try:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for epoch in (1, 2):
                seen = []
                for i, (x, y) in enumerate(feed.epoch(epoch)):
                    torch.cuda._sleep(20_000_000)  # a step far slower than the producer's copies
                    seen.append(torch.stack([x.min(), x.max(), y.min().float(), y.max().float()]))
                assert torch.stack(seen).cpu().tolist() == [[float(i)] * 4 for i in range(12)]
        got = [(x.clone().cpu(), y.clone().cpu()) for x, y in feed.epoch(3)]
        assert same(got, numbered(12, 3))
    finally:
        feed.close()
