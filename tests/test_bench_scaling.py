"""bench/bench_scaling.py on the CPU: variant parsing, the GIL table, and a real 1-vs-2-process run."""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._shards import write_shards

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_scaling  # noqa: E402

RAW = """\
process 10:"python -m torch.distributed.run";process 11:"python -m tools.train";thread (11): MainThread;train_epoch (train.py:300);forward (module.py:10) 30
process 10:"python -m torch.distributed.run";process 11:"python -m tools.train";thread (12): gpu-fetch;fetch (gpu_data.py:980);_recv (connection.py:5) 60
process 10:"python -m torch.distributed.run";process 11:"python -m tools.train";thread (12): gpu-fetch;fetch (gpu_data.py:980);loads (reduction.py:9) 10
"""


def test_gil_summary_ranks_threads_by_their_share():
    text = bench_scaling.gil_summary(RAW)
    lines = text.splitlines()
    assert lines[0] == "100 GIL samples"
    assert lines[1].startswith(" 70.0 %") and "thread (12): gpu-fetch" in lines[1]
    assert "process 11 (tools.train) / thread (12): gpu-fetch" in lines[1] and "process 10" not in lines[1]
    assert "fetch (gpu_data.py:980) > _recv (connection.py:5)" in lines[2] and "60.0 %" in lines[2]
    assert any(line.startswith(" 30.0 %") and "MainThread" in line for line in lines)


def test_variants():
    assert bench_scaling.parse_variant("sync-step:--bn-stats-sync step") == (
        "sync-step", ["--bn-stats-sync", "step"], {})
    assert bench_scaling.parse_variant("plain") == ("plain", [], {})
    assert bench_scaling.parse_variant("nch:NCCL_MAX_NCHANNELS=4 A_B= --workers 3") == (
        "nch", ["--workers", "3"], {"NCCL_MAX_NCHANNELS": "4", "A_B": ""})
    with pytest.raises(argparse.ArgumentTypeError):
        bench_scaling.parse_variant("bad name:--x")


def test_one_against_two_processes_on_the_cpu(tmp_path, capsys):
    info = write_shards(tmp_path / "shards", train_counts=[10, 7, 3, 9], val_counts=[5, 4])
    assert bench_scaling.main([
        "--work", str(tmp_path / "w"), "--shards", str(info["dir"]), "--device", "cpu",
        "--gpus", "1,2", "--repeats", "1", "--epochs", "1", "--epoch-images", "48", "--arch", "mobilenet_v3_small",
        "--batch-per-gpu", "2", "--workers-per-gpu", "1", "--cpus-per-gpu", "0",
        "--train-args", "--crop-size 64 --decode cpu", "--variant", "step:BENCH_SCALING_PROBE=1 --bn-stats-sync step", "--independent"]) == 0
    rows = json.loads((tmp_path / "w/bench_scaling.json").read_text())
    assert {(r["variant"], r["gpus"]) for r in rows} == {("base", 1), ("base", 2), ("step", 1), ("step", 2),
                                                         ("independent", 2)}
    for r in rows:
        assert r["median"] > 0 and len(r["runs"]) == 1 and len(r["data_share_ranks"]) == r["gpus"]
        assert r["intervals"] and all(v > 0 for v in r["intervals"][0])
    runs = tmp_path / "w/runs"
    # 48 images per epoch whatever the process count, beyond the 29 train images' one pass
    for name, steps in (("base-g1-r0", 24), ("base-g2-r0", 12)):
        lines = [json.loads(x) for x in (runs / name / "metrics.jsonl").read_text().splitlines()]
        assert {x["iterations"] for x in lines if x["kind"] == "train"} == {steps}, name
    # the independent setting: two separate 1-process trainings whose rates add up
    assert (runs / "independent-g2-r0-0/final.json").is_file() and (runs / "independent-g2-r0-1/final.json").is_file()
    settings = json.loads((runs / "independent-g2-r0-1/settings.json").read_text())
    assert settings["versions"]["world_size"] == 1
    # every rank timed its step alone after its run (tools.train --step-alone), one figure per rank
    assert all(len(x["step_alone_ranks"]) == r["gpus"] and all(v > 0 for v in x["step_alone_ranks"])
               for r in rows for x in r["runs_ranks"])
    printed = capsys.readouterr().out
    assert "BENCH_SCALING_PROBE=1" in printed and "--step-alone 20" in printed
    # each run's own line: every rank's shares, then its step alone
    assert ("== each run: images/s, per rank data wait / host issuing steps / GPU busy in steps / "
            "fetch waiting for workers / decode threads busy") in printed
    two = [line for line in printed.splitlines() if line.startswith("base ") and " alone: " in line
           and line.split()[1] == "2"]
    assert len(two) == 1 and two[0].count("|") == 1 and two[0].count("%") == 10, printed
    assert next(r for r in rows if r["variant"] == "base" and r["gpus"] == 1)["vs_base_1"] == 1.0
    assert "images/s, median of 1 runs" in printed


def test_summary_is_written_after_each_run_even_before_the_baseline(tmp_path):
    path = tmp_path / "bench_scaling.json"
    run = {"rate": 100.0, "data_share_ranks": [0.1, 0.3], "step_host_ranks": [0.5, 0.5],
           "gpu_busy_ranks": [0.9, 0.8], "raw_wait_ranks": [0.0, 0.6], "decode_busy_ranks": [0.4, 0.2],
           "step_alone_ranks": [1000.0, 700.0], "images_per_s_intervals": [90, 110]}
    results = {("base", 2): [run]}
    bench_scaling.summarize(results, 1, path)  # the 1-GPU baseline has not run yet
    (row,) = json.loads(path.read_text())
    assert row["runs"] == [100] and math.isnan(row["vs_base_1"])
    results[("base", 1)] = [{**run, "rate": 50.0, "data_share_ranks": [0.2], "step_host_ranks": [0.4],
                             "gpu_busy_ranks": [0.7], "raw_wait_ranks": [0.1], "decode_busy_ranks": [0.5],
                             "step_alone_ranks": [1000.0]}]
    rows = {(r["variant"], r["gpus"]): r for r in bench_scaling.summarize(results, 1, path)}
    assert rows[("base", 2)]["vs_base_1"] == 2.0 and rows[("base", 2)]["data_share_ranks"] == [0.1, 0.3]
    assert rows[("base", 2)]["runs_ranks"] == [{"data_share_ranks": [0.1, 0.3], "step_host_ranks": [0.5, 0.5],
                                                "gpu_busy_ranks": [0.9, 0.8], "raw_wait_ranks": [0.0, 0.6],
                                                "decode_busy_ranks": [0.4, 0.2], "step_alone_ranks": [1000.0, 700.0],
                                                "data_path_ms_ranks": [], "gpu": {}}]
    assert len(json.loads(path.read_text())) == 2


def test_data_path_text_names_each_ranks_stages():
    rank = {"fetch": 5.06, "decode": 21.3, "decode_copy": 1.2, "decode_setup": 0.74, "decode_lock": 8.0,
            "decode_call": 9.14, "decode_after": 0.21, "crop": 2.9}
    assert bench_scaling.data_path_text([rank, {**rank, "decode": 27.0}]) == (
        "fetch 5.1 decode 21.3 (copy 1.2 setup 0.7 lock 8.0 call 9.1 after 0.2) crop 2.9 | "
        "fetch 5.1 decode 27.0 (copy 1.2 setup 0.7 lock 8.0 call 9.1 after 0.2) crop 2.9")
    # at 100 batches/s per rank a 9.14 ms call holds the process's decode turn 91 % of the time
    assert bench_scaling.data_path_text([rank], batches_per_s=100.0) == (
        "fetch 5.1 decode 21.3 (copy 1.2 setup 0.7 lock 8.0 call 9.1 after 0.2, turn held 91%) crop 2.9")
    # records from before the "after" part read as 0
    old = {k: v for k, v in rank.items() if k != "decode_after"}
    assert "call 9.1 after 0.0)" in bench_scaling.data_path_text([old])
    assert bench_scaling.data_path_text([]) == ""


def test_odd_repeats_run_the_settings_in_reverse_order():
    settings = ["base-1", "base-2", "pf8-1", "pf8-2"]
    assert bench_scaling.run_order(settings, 0) == settings
    assert bench_scaling.run_order(settings, 1) == settings[::-1]
    assert bench_scaling.run_order(settings, 2) == settings
    # over two repeats every setting's mean position is the same: a linear drift hits all alike
    positions = {x: bench_scaling.run_order(settings, 0).index(x) + bench_scaling.run_order(settings, 1).index(x)
                 for x in settings}
    assert len(set(positions.values())) == 1


def test_a_hung_run_is_counted_killed_with_its_children_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    child_pid = tmp_path / "child.pid"
    hang = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(child_pid)!r}, 'w').write(str(c.pid)); time.sleep(120)")
    monkeypatch.setattr(bench_scaling, "train_command", lambda *a, **k: [sys.executable, "-c", hang])
    monkeypatch.setattr(bench_scaling.shutil, "which", lambda name: None)  # no py-spy here
    args = argparse.Namespace(work=tmp_path, timeout=3.0, device="cpu", cpus_per_gpu=0)
    run = bench_scaling.run_once(args, tmp_path / "shards", "base-g2-r0", 2, [])
    assert run["hung"] and Path(run["stacks"]) == tmp_path / "runs/base-g2-r0.stacks.txt"
    assert "py-spy is not on PATH" in Path(run["stacks"]).read_text()
    assert "base-g2-r0: HUNG" in capsys.readouterr().out  # with the stacks' digest, for logs alone
    pid = int(child_pid.read_text())
    for _ in range(50):  # the rank-like child died with its launcher's process group
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"child {pid} of the hung run is still alive")


def test_the_gil_sampler_waits_for_epoch_2_while_the_run_logs_and_gives_up_when_it_stalls(tmp_path, monkeypatch):
    """--gil: py-spy starts once the run logs epoch 2. A run whose first epoch takes longer than
    --timeout but keeps logging is waited for (the timeout is for silence, as for a hung run)."""
    out, log, raw = tmp_path / "run", tmp_path / "run.log", tmp_path / "gil.txt"
    out.mkdir()
    slow = ("import json, time, sys\n"
            "for i in range(8):\n    print(i, flush=True); time.sleep(0.3)\n"
            f"open({str(out / 'metrics.jsonl')!r}, 'w').write(json.dumps({{'epoch': 2}}) + '\\n')\n"
            "time.sleep(30)")
    spied = []
    monkeypatch.setattr(bench_scaling.shutil, "which", lambda name: f"/bin/{name}")
    monkeypatch.setattr(bench_scaling.subprocess, "run", lambda cmd, **kw: spied.append(cmd))
    with open(log, "w") as f:  # 2.4 s before epoch 2, a line every 0.3 s: longer than the stall allowed
        proc = subprocess.Popen([sys.executable, "-c", slow], stdout=f)
    try:
        bench_scaling.sample_gil(proc, out, log, raw, seconds=5, stall=1.5)
        assert len(spied) == 1 and spied[0][:3] == ["/bin/py-spy", "record", "--pid"]
    finally:
        proc.kill()
        proc.wait()
    (out / "metrics.jsonl").unlink()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"],
                                stdout=f)
    t0 = time.monotonic()
    try:
        with pytest.raises(SystemExit, match="stalled before epoch 2"):
            bench_scaling.sample_gil(proc, out, log, raw, seconds=5, stall=1.5)
        assert time.monotonic() - t0 < 10 and len(spied) == 1
    finally:
        proc.kill()
        proc.wait()


def test_a_slow_run_that_still_logs_is_not_hung_a_silent_one_is(tmp_path):
    log = tmp_path / "run.log"
    slow = "import time\nfor i in range(8):\n    print(i, flush=True); time.sleep(0.4)"
    with open(log, "w") as f:  # 3.2 s in all, a line every 0.4 s: longer than the stall allowed
        proc = subprocess.Popen([sys.executable, "-c", slow], stdout=f)
    assert bench_scaling.wait_progressing(proc, log, stall=1.5) == 0
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"],
                                stdout=f)
    t0 = time.monotonic()
    assert bench_scaling.wait_progressing(proc, log, stall=1.5) is None and time.monotonic() - t0 < 10
    proc.kill()
    proc.wait()


def test_hung_runs_are_left_out_of_the_figures_and_listed(tmp_path):
    path = tmp_path / "bench_scaling.json"
    done = {"rate": 100.0, "data_share_ranks": [0.1], "step_host_ranks": [0.5], "gpu_busy_ranks": [0.9],
            "raw_wait_ranks": [0.0], "decode_busy_ranks": [0.3], "step_alone_ranks": [],
            "images_per_s_intervals": [100]}
    hung = {"hung": True, "stacks": "runs/x.stacks.txt", "gpu": {}}
    rows = {(r["variant"], r["gpus"]): r for r in bench_scaling.summarize(
        {("base", 1): [done, hung, {**done, "rate": 300.0}], ("g", 1): [hung]}, 1, path)}
    base = rows[("base", 1)]
    assert base["runs"] == [100, 300] and base["median"] == 200.0 and base["hung"] == ["runs/x.stacks.txt"]
    assert len(base["runs_ranks"]) == 2 and base["vs_base_1"] == 1.0
    assert rows[("g", 1)]["runs"] == [] and math.isnan(rows[("g", 1)]["median"])


def test_stacks_digest_keeps_each_threads_innermost_frames():
    dump = """Process 11: python -m tools.train --shards s
Python v3.12.3 (/usr/bin/python3)

Thread 11 (idle): "MainThread"
    pthread_cond_wait (libc.so.6)
    wait (threading.py:359)
    get (queue.py:180)
    __next__ (gpu_data.py:700)
    train_epoch (train.py:300)
Thread 12 (active): "decode-0"
    cuMemFree_v2 (libcuda.so.1)

    nvjpegDecodeBatched (libnvjpeg.so.13)
    decode_packed (nvjpeg.py:260)
"""
    digest = bench_scaling.stacks_digest(dump, frames=2)
    assert digest.splitlines() == [
        "Process 11: python -m tools.train --shards s",
        'Thread 11 (idle): "MainThread"', "    pthread_cond_wait (libc.so.6)", "    wait (threading.py:359)",
        'Thread 12 (active): "decode-0"', "    cuMemFree_v2 (libcuda.so.1)", "    nvjpegDecodeBatched (libnvjpeg.so.13)"]
