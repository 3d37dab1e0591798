"""bench/probe_engine.py's threads on the CPU: the decoder and CUDA calls stubbed, what each thread
decodes with and what a load beside it counts."""
import contextlib
import sys
import threading
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import probe_engine  # noqa: E402


class _Stub:
    """Stands in for a CUDA stream or event: nothing to wait for."""

    def record(self, *_):
        pass

    def synchronize(self):
        pass


def test_each_decode_thread_uses_its_decoders_in_turn_and_a_load_counts_calls(monkeypatch):
    made, used, lock = [], [], threading.Lock()

    class Decoder:
        def __init__(self, device, turn="lock", output="rgb"):
            self.turn, self.output = turn, output
            self.seconds = dict.fromkeys(("batches", *probe_engine.gd.ENGINE_PARTS), 0.0)
            made.append(self)

    def decode_packed(data, offsets, keys, device, decoder):
        with lock:
            used.append((threading.current_thread().name, made.index(decoder)))
        decoder.seconds["batches"] += 1
        return torch.zeros(1), []

    monkeypatch.setattr(probe_engine, "NvjpegDecoder", Decoder)
    monkeypatch.setattr(probe_engine.gd, "decode_packed", decode_packed)
    monkeypatch.setattr(torch.cuda, "Stream", _Stub)
    monkeypatch.setattr(torch.cuda, "Event", _Stub)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stub())
    monkeypatch.setattr(probe_engine.faulthandler, "dump_traceback_later", lambda *a, **k: None)
    batches = [(torch.zeros(10, dtype=torch.uint8), np.array([0, 5, 10]))]
    calls = []
    decode_rate, load_rate, parts = probe_engine.run(batches, 2, 0.2, step=lambda: calls.append(1),
                                                     turn="free", per_call=1, states=2, output="yuv")
    assert len(made) == 4 and all(d.turn == "free" and d.output == "yuv" for d in made)
    by_thread = {}
    for name, k in used:
        by_thread.setdefault(name, []).append(k)
    # two threads, each with two decoders of its own, alternating batch by batch
    assert len(by_thread) == 2 and {tuple(sorted(set(ks))) for ks in by_thread.values()} == {(0, 1), (2, 3)}
    assert all(ks[i] != ks[i + 1] for ks in by_thread.values() for i in range(len(ks) - 1))
    assert decode_rate > 0 and set(parts) == set(probe_engine.gd.ENGINE_PARTS)
    # the load's rate is its calls per second (per_call=1), not 256 images per call
    assert 0 < load_rate <= len(calls) / 0.2 + 1


def test_the_gil_load_is_pure_python():
    assert probe_engine.gil_load()() == sum(i * i for i in range(20000))
    assert set(probe_engine.LOADS) == {"gil", "gpu"}


def _main_with_rows_recorded(monkeypatch, argv, record, packed=None):
    """Runs probe_engine.main() with every row's run() replaced by record(kwargs) and no GPU;
    packed: a list to add the size of each packed batch to."""
    packed = [] if packed is None else packed
    def fake_run(batches, n_threads, seconds, **kwargs):
        record(dict(kwargs, batches=len(batches)))
        return 1.0, 1.0, {}

    monkeypatch.setattr(probe_engine, "run", fake_run)
    monkeypatch.setattr(probe_engine.bl, "make_jpegs", lambda n: [b"x"] * n)
    monkeypatch.setattr(probe_engine.gd, "pack_jpegs", lambda blobs: packed.append(len(blobs)) or
                        (torch.zeros(1), torch.zeros(len(blobs) + 1)))
    monkeypatch.setattr(probe_engine.gd, "GpuAugment", lambda *a, **k: "crop")
    monkeypatch.setattr(probe_engine, "train_step", lambda kind: lambda x, y: None)
    monkeypatch.setattr(probe_engine, "LOADS", {"gil": lambda: (lambda: None)})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stub")
    monkeypatch.setattr(torch, "randn", lambda *a, **k: torch.zeros(1, 3, 1, 1))
    monkeypatch.setattr(torch, "randint", lambda *a, **k: torch.zeros(1))
    monkeypatch.setattr(sys, "argv", ["probe_engine.py", "--images", "1024", *argv])
    before = sys.getswitchinterval()
    try:
        assert probe_engine.main() == 0
    finally:
        sys.setswitchinterval(before)


def test_each_switch_interval_gets_its_own_rows_and_the_interval_is_set_for_them(monkeypatch):
    seen = []
    _main_with_rows_recorded(monkeypatch, ["--threads", "2", "--loads", "gil", "--switch-ms", "5,0.5"],
                             lambda kwargs: seen.append(sys.getswitchinterval()))
    # step and load alone once, then each interval's 7 rows (decode x1-3, +crop, step x2, step+crop, load x2)
    per_interval = seen[2:]
    assert len(per_interval) == 14
    assert per_interval[:7] == [0.005] * 7 and all(abs(v - 0.0005) < 1e-9 for v in per_interval[7:])


def test_each_output_format_gets_its_decode_rows_and_only_rgb_is_cropped(monkeypatch):
    seen = []
    _main_with_rows_recorded(monkeypatch, ["--threads", "2", "--outputs", "rgb,yuv"],
                             lambda kwargs: seen.append((kwargs.get("output"), kwargs.get("crop"))))
    # the step alone, then rgb's 6 rows (decode x1-3, +crop, step x2, step+crop), yuv's 4 (no crop)
    assert seen[1:] == [("rgb", None)] * 3 + [("rgb", "crop")] + [("rgb", None), ("rgb", "crop")] + [("yuv", None)] * 4


def test_each_call_size_gets_its_rows_with_batches_of_that_many_images(monkeypatch):
    packed, seen = [], []
    _main_with_rows_recorded(monkeypatch, ["--threads", "2", "--call-images", "256,512"],
                             lambda kwargs: seen.append(kwargs["batches"]), packed)
    assert packed == [256] * 4 + [512] * 2
    # the step alone on the first size's batches, then 6 rows on 4 batches of 256, 6 on 2 of 512
    assert seen == [4] + [4] * 6 + [2] * 6
