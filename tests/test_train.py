"""tools/train.py on the CPU, in one process: outputs, exact resume, NaN stop, schedules."""
import inspect
import json
import math

import pytest
import torch

from tests._shards import write_shards
from tools import train
from tools.imagenet import checkpoint as ckpt
from tools.imagenet.interval_meter import GpuStepTimer, IntervalMeter
from tools.imagenet.schedule import Schedule, regime

ARCH = "mobilenet_v3_small"  # a torchvision model with batch norm, tiny at 6 classes and 64 px


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), train_counts=[10, 7, 3, 9],
                        val_counts=[5, 4, 3])


def run(shards, out, *extra, epochs=2):
    return train.main(["--shards", str(shards["dir"]), "--out", str(out), "--arch", ARCH,
                       "--crop-size", "64", "--batch-size", "8", "--epochs", str(epochs),
                       "--device", "cpu", "--log-every", "2", "--deterministic", *map(str, extra)])


def test_outputs(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(shards, out, "--workers", 0, "--keep-checkpoints", 1) == 0
    assert "final val top-1 error" in capsys.readouterr().out
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["model_002.pt"]
    state = ckpt.load(out / "model_002.pt")
    for key in ("model", "arch", "num_classes", "classes", "mean", "std", "crop_size",
                "resize_size", "epoch", "optimizer", "scheduler", "rng", "settings", "metrics"):
        assert key in state, key
    assert state["epoch"] == 2 and state["arch"] == ARCH and state["num_classes"] == 6
    assert not any(k.startswith("module.") for k in state["model"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(r["val_count"] == shards["val_total"] for r in epochs)
    assert epochs[0]["steps_per_rank"] == [29 // 8]
    assert any(r["kind"] == "train" for r in records)
    for name in ("train.log", "test.log"):
        lines = (out / name).read_text().splitlines()
        assert len(lines) == 3 and lines[0].startswith("epoch\t")
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    settings = json.loads((out / "settings.json").read_text())
    assert settings["versions"]["world_size"] == 1 and settings["settings"]["arch"] == ARCH
    final = json.loads((out / "final.json").read_text())
    assert final["epoch"] == 2 and final["checkpoint"].endswith("model_002.pt")
    # A finished run refuses to be overwritten silently.
    with pytest.raises(SystemExit, match="--resume"):
        run(shards, out, "--workers", 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_identical_weights(shards, tmp_path, workers):
    full, split = tmp_path / "full", tmp_path / "split"
    assert run(shards, full, "--workers", workers, "--aug", "rrc", epochs=2) == 0
    assert run(shards, split, "--workers", workers, "--aug", "rrc", epochs=1) == 0
    assert run(shards, split, "--workers", workers, "--aug", "rrc", "--resume", epochs=2) == 0
    a, b = ckpt.load(full / "model_002.pt"), ckpt.load(split / "model_002.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["metrics"]["val_loss"] == b["metrics"]["val_loss"]
    # The resumed run's logs hold each epoch once.
    epochs = [json.loads(line)["epoch"] for line in (split / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in line]
    assert epochs == [1, 2]


def test_nan_loss_stops_and_keeps_the_last_checkpoint(shards, tmp_path, capsys):
    out = tmp_path / "nan"
    # Epoch 1 at LR 0.01, epoch 2 at 1e30: diverges in epoch 2.
    rc = run(shards, out, "--workers", 0, "--schedule", "step", "--lr", 0.01,
             "--lr-step-epochs", 1, "--lr-gamma", 1e32, "--lr-scaling", "none", "--log-every", 1)
    assert rc == 1
    err = capsys.readouterr().err
    assert "epoch 2, iteration" in err and ("nan" in err or "inf" in err) and "checkpoint" in err
    assert [e for e, _ in ckpt.list_checkpoints(out)] == [1]
    state = ckpt.load(out / "model_001.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "final.json").exists()


def test_sigterm_stops_after_the_step_and_resume_restarts_the_epoch(shards, tmp_path, monkeypatch):
    out = tmp_path / "term"
    original = train.train_epoch

    def preempted(epoch, *args, **kwargs):
        stop = inspect.signature(original).bind(epoch, *args, **kwargs).arguments["stop"]
        if epoch == 2:
            stop.set = True  # what the SIGTERM handler does
        return original(epoch, *args, **kwargs)

    monkeypatch.setattr(train, "train_epoch", preempted)
    assert run(shards, out, "--workers", 0) == train.INTERRUPTED
    assert [e for e, _ in ckpt.list_checkpoints(out)] == [1]
    monkeypatch.setattr(train, "train_epoch", original)
    assert run(shards, out, "--workers", 0, "--resume") == 0
    assert [e for e, _ in ckpt.list_checkpoints(out)] == [1, 2]


def test_stop_flag_catches_sigterm():
    import os
    import signal
    with train.StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.set


def test_regime_table_and_linear_scaling():
    assert regime(1) == (1e-2, 5e-4) and regime(18) == (1e-2, 5e-4)
    assert regime(19) == (5e-3, 5e-4) and regime(29) == (5e-3, 5e-4)
    assert regime(30) == (1e-3, 0.0) and regime(43) == (1e-3, 0.0)
    assert regime(44) == (5e-4, 0.0) and regime(52) == (5e-4, 0.0)
    assert regime(53) == (1e-4, 0.0) and regime(90) == (1e-4, 0.0)
    assert Schedule("regime", global_batch=1024).lr_wd(1) == (8e-2, 5e-4)
    assert Schedule("regime", global_batch=1024, scaling="none").lr_wd(20) == (5e-3, 5e-4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert Schedule("regime", global_batch=256).apply(opt, 30) == pytest.approx(2e-3)
    assert opt.param_groups[0]["weight_decay"] == 0.0


def test_step_and_cosine_schedules_and_state():
    step = Schedule("step", lr=0.1, step_epochs=[2, 4], gamma=0.1, weight_decay=1e-4)
    assert [round(step.lr_wd(e)[0], 6) for e in (1, 2, 3, 4, 5)] == [0.1, 0.1, 0.01, 0.01, 0.001]
    assert step.lr_wd(1)[1] == 1e-4
    cos = Schedule("cosine", lr=0.1, epochs=10, warmup_epochs=1)
    assert cos.lr_wd(1, 0.5)[0] == pytest.approx(0.05, rel=1e-2)
    assert cos.lr_wd(2)[0] == pytest.approx(0.1)
    assert cos.lr_wd(6, 0.5)[0] == pytest.approx(0.05)
    assert cos.lr_wd(10, 1.0)[0] == pytest.approx(0.0, abs=1e-12)
    restored = Schedule()
    restored.load_state_dict(cos.state_dict())
    assert restored.lr_wd(4, 0.3) == cos.lr_wd(4, 0.3)
    assert math.isclose(Schedule("step", lr=0.1, global_batch=64).lr_wd(1)[0], 0.05)


def test_trains_on_the_shard_stage_output(mini_shards, tmp_path):
    out = tmp_path / "mini"
    assert train.main(["--shards", str(mini_shards), "--out", str(out), "--arch", ARCH,
                       "--crop-size", "64", "--resize-size", "72", "--batch-size", "16",
                       "--epochs", "1", "--epoch-size", "3", "--workers", "2", "--device", "cpu",
                       "--log-every", "1"]) == 0
    final = json.loads((out / "final.json").read_text())
    val = json.loads((mini_shards / "val.json").read_text())
    assert final["val_count"] == val["num_samples"] and final["steps_per_rank"] == [3]
    state = ckpt.load(out / "model_001.pt")
    assert state["classes"] == val["classes"] and state["resize_size"] == 72


def test_gpu_step_timer():
    cpu = GpuStepTimer(torch.device("cpu"))
    cpu.start(), cpu.stop()
    assert GpuStepTimer.span_seconds(cpu.take()) == 0.0
    if not torch.cuda.is_available():
        return
    timer = GpuStepTimer(torch.device("cuda"))
    seconds = lambda: GpuStepTimer.span_seconds(timer.take())
    for _ in range(2):
        timer.start()
        torch.cuda._sleep(50_000_000)  # tens of ms of GPU time, none of host time
        timer.stop()
        torch.cuda._sleep(50_000_000)  # between steps: not counted
    one_sleep = seconds() / 2
    timer.start()
    torch.cuda._sleep(50_000_000)
    timer.stop()
    assert seconds() == pytest.approx(one_sleep, rel=0.2) and one_sleep > 0.005
    assert seconds() == 0.0  # taken: the next interval starts empty


def test_profile_steps_writes_a_trace_and_a_per_thread_table(shards, tmp_path):
    out = tmp_path / "run"
    assert run(shards, out, "--workers", 0, "--profile-steps", 2, epochs=1) == 0
    trace = json.loads((out / "profile_rank0.json").read_text())
    assert any(e.get("cat") == "cpu_op" for e in trace["traceEvents"])
    table = (out / "profile_rank0.txt").read_text()
    assert table.startswith("2 steps, rank 0") and "(training loop)" in table
    assert "aten::" in table


def test_gpu_summary_reports_stream_busy_time_and_overlap():
    from tools.imagenet.profiling import gpu_summary
    k = lambda tid, ts, dur, name: {"ph": "X", "cat": "kernel", "pid": 0, "tid": tid, "ts": ts,
                                     "dur": dur, "name": name}
    trace = {"traceEvents": [k(7, 0, 1000, "conv"), k(7, 1000, 1000, "conv"), k(7, 3000, 1000, "gemm"),
                             k(9, 1500, 2000, "crop"), {"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 9}]}
    table = gpu_summary(trace)
    # window 0-4 ms; busy 0-2, 1.5-3.5, 3-4 -> all 4 ms; two at once 1.5-2 and 3-3.5 -> 1 ms
    assert table.startswith("GPU: window 4.00 ms, any stream busy 4.00 ms, two or more streams at once 1.00 ms")
    assert "stream 7 (device 0): busy 3.00 ms, 3 events" in table
    assert "2.00 ms      2x  conv" in table and "stream 9 (device 0): busy 2.00 ms" in table
    assert gpu_summary({"traceEvents": []}) == ""


def test_interval_meter_reads_each_interval_one_boundary_late():
    meter = IntervalMeter(torch.device("cpu"), rank=0, world=1)
    meter.add(torch.tensor(2.0), torch.tensor(3), torch.tensor(4), 4)
    # the first boundary queues the interval and returns nothing: nothing is read yet
    assert meter.close(seen=4, data_wait=0.5, step_host=1.0, elapsed=2.0, iteration=10) == []
    meter.add(torch.tensor(1.0), torch.tensor(1), torch.tensor(2), 2)
    first, = meter.close(seen=2, data_wait=0.0, step_host=0.5, elapsed=1.0, iteration=20)
    assert first["iteration"] == 10 and first["count"] == 4 and first["loss_sum"] == 8.0
    assert (first["top1_correct"], first["top5_correct"]) == (3.0, 4.0)
    assert first["data_share_ranks"] == [0.25] and first["step_host_ranks"] == [0.5]
    assert first["gpu_busy_ranks"] == [0.0] and not first["stopping"]
    # the GPU data path's threads: none given, none logged as busy
    assert first["raw_wait_ranks"] == [0.0] and first["decode_busy_ranks"] == [0.0]
    meter.add(torch.tensor(3.0), torch.tensor(0), torch.tensor(1), 1)
    # the epoch's end reads the pending interval and its own; the sums start again from zero
    second, third = meter.close(seen=1, data_wait=0.0, step_host=0.1, elapsed=0.5, stop=True,
                                final=True, iteration=21)
    assert (second["iteration"], second["loss_sum"], second["count"]) == (20, 2.0, 2)
    assert (third["iteration"], third["loss_sum"], third["count"]) == (21, 3.0, 1)
    assert second["stopping"] and third["stopping"] and meter.flush() == []


def test_interval_meter_logs_the_data_threads_shares_per_rank():
    meter = IntervalMeter(torch.device("cpu"), rank=0, world=1)
    meter.add(torch.tensor(1.0), torch.tensor(1), torch.tensor(1), 1)
    (rec,) = meter.close(seen=1, data_wait=0.5, step_host=0.5, elapsed=2.0, final=True, iteration=1,
                         raw_wait=1.5, decode_busy=0.5)
    assert rec["raw_wait_ranks"] == [0.75] and rec["decode_busy_ranks"] == [0.25]
    assert "raw_wait" not in rec and "decode_busy" not in rec


def test_producer_clock_laps_the_pipeline_threads_seconds():
    class Pipeline:
        threads = 2
        stats = {"batches": 0, "fetch_s": 1.0, "decode_s": 2.0, "augment_s": 1.0}

    pipe = Pipeline()
    clock = train.ProducerClock(pipe)
    pipe.stats.update(fetch_s=1.5, decode_s=4.0, augment_s=2.0)
    # seconds since the clock started; decode threads' busy seconds per thread
    assert clock.lap() == {"raw_wait": 0.5, "decode_busy": 1.5}
    assert clock.lap() == {"raw_wait": 0.0, "decode_busy": 0.0}
    assert train.ProducerClock([1, 2]).lap() == {"raw_wait": 0.0, "decode_busy": 0.0}  # the CPU loader


def _meter_rank(rank, init, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        meter = IntervalMeter(torch.device("cpu"), rank, 2, dist.group.WORLD)
        seen = []
        for boundary in range(1, 4):
            meter.add(torch.tensor(1.0 + rank), torch.tensor(1), torch.tensor(2), 2)
            # rank 1 is asked to stop at the second boundary; rank 0 is not
            recs = meter.close(seen=2, data_wait=0.1 * (rank + 1), step_host=0.5, elapsed=1.0,
                               stop=rank == 1 and boundary == 2, iteration=boundary)
            if any(r["stopping"] for r in recs):
                recs += meter.flush(stop=True)
                seen += recs
                break
            seen += recs
        results[rank] = [(r["iteration"], r["loss_sum"], r["count"], r["stopping"], r["data_share_ranks"])
                         for r in seen]
    finally:
        dist.destroy_process_group()


def test_interval_meter_ranks_agree_on_sums_and_on_stopping(tmp_path):
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.spawn(_meter_rank, args=(f"file://{tmp_path / 'store'}", results), nprocs=2)
    # both ranks: interval 1 read at boundary 2, where rank 1's stop reaches both; interval 2 flushed
    expected = [(1, 2.0 + 4.0, 4.0, True, [0.1, 0.2]), (2, 6.0, 4.0, True, [0.1, 0.2])]
    for rank in (0, 1):
        got = [(i, loss, c, s, [round(v, 6) for v in d]) for i, loss, c, s, d in results[rank]]
        assert got == expected, rank


def test_profile_gpu_only_traces_the_gpu_alone_where_there_is_one():
    from torch.profiler import ProfilerActivity as A
    from tools.imagenet.profiling import profiler_activities
    assert profiler_activities(gpu_only=True, cuda=True) == [A.CUDA]
    assert profiler_activities(gpu_only=False, cuda=True) == [A.CPU, A.CUDA]
    assert profiler_activities(gpu_only=True, cuda=False) == [A.CPU]  # nothing else to trace
    assert train.parse_args(["--shards", "s", "--out", "o", "--profile-gpu-only"]).profile_gpu_only


def test_profiler_waits_for_the_gpu_once_when_its_window_closes(tmp_path, monkeypatch):
    from tools.imagenet.profiling import StepProfiler
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(profiler.calls))
    profiler = StepProfiler(tmp_path, 0, steps=3, skip=2)
    profiler.cuda = True  # as on a GPU: the profiled steps' kernels must have run before the trace
    for _ in range(8):
        profiler.step()
    profiler.close()
    assert syncs == [2 + 1 + 3] and (tmp_path / "profile_rank0.txt").is_file()


def test_fused_and_foreach_sgd_make_the_same_update():
    from tools.imagenet.step import sgd
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
            for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [sgd(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, kernel=kernel)
            for net, kernel in zip(nets, ("fused", "foreach"))]
    assert opts[0].param_groups[0]["fused"] and opts[1].param_groups[0]["foreach"]
    for _ in range(4):
        x = torch.randn(16, 12)
        for net, opt in zip(nets, opts):
            opt.zero_grad(set_to_none=True)
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="SGD kernel"):
        sgd(nets[0].parameters(), lr=0.1, momentum=0.9, kernel="loop")


def test_training_uses_the_chosen_sgd_kernel_also_after_resuming(shards, tmp_path):
    assert train.parse_args(["--shards", "s", "--out", "o"]).sgd_kernel == "fused"
    fused, mixed = tmp_path / "fused", tmp_path / "mixed"
    assert run(shards, fused, "--workers", 0, epochs=2) == 0
    assert run(shards, mixed, "--workers", 0, "--sgd-kernel", "foreach", epochs=1) == 0
    group = ckpt.load(mixed / "model_001.pt")["optimizer"]["param_groups"][0]
    assert group["foreach"] and not group["fused"]
    assert run(shards, mixed, "--workers", 0, "--resume", epochs=2) == 0
    a, b = ckpt.load(fused / "model_002.pt"), ckpt.load(mixed / "model_002.pt")
    group = b["optimizer"]["param_groups"][0]
    assert group["fused"] and not group["foreach"]  # this run's flag, not the checkpoint's
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], msg=k)


def test_gil_switch_interval_and_engine_turn_are_set_for_the_run_and_restored_after(monkeypatch):
    import sys
    from tools.imagenet import nvjpeg
    seen = []
    monkeypatch.setattr(train, "train", lambda *a: seen.append((sys.getswitchinterval(),
                                                                nvjpeg._PROCESS_TURN[0])) or 0)
    before = sys.getswitchinterval()
    assert train.main(["--shards", "s", "--out", "o", "--device", "cpu", "--gil-switch-ms", "0.5",
                       "--engine-turn", "native"]) == 0
    assert seen == [(pytest.approx(0.0005), "native")]
    assert sys.getswitchinterval() == before and nvjpeg._PROCESS_TURN[0] == "lock"
    assert train.main(["--shards", "s", "--out", "o", "--device", "cpu"]) == 0
    assert seen[-1] == (before, "lock")  # the defaults: Python's own interval, a Python lock
    with pytest.raises(SystemExit):
        train.parse_args(["--shards", "s", "--out", "o", "--gil-switch-ms", "-1"])
