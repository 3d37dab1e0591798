"""bench/gpu_sampler.py: nvidia-smi's samples summarised per GPU (idle samples left out, limit
reasons named), the field fallback for older drivers, and nothing at all without nvidia-smi."""
import os
import stat
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from gpu_sampler import GpuSampler, describe, summarize  # noqa: E402

CSV = """\
0, 345, 70.1, 35, 0x0000000000000001
0, 1980, 612.5, 61, 0x0000000000000000
0, 1755, 690.0, 71, 0x0000000000000004
0, 1980, 640.0, 66, 0x0000000000000000
1, 345, 68.0, 33, 0x0000000000000001
garbage line
"""


def test_summary_per_gpu_without_idle_samples():
    summary = summarize(CSV)
    assert list(summary) == [0]  # GPU 1 only idled
    s = summary[0]
    assert s["samples"] == 3 and s["sm_clock_mhz"] == 1980 and s["sm_clock_min_mhz"] == 1755
    assert s["power_w"] == 640.0 and s["temperature_max_c"] == 71 and s["limits"] == ["SW power cap"]
    assert describe(summary) == "GPU0 1980 MHz (min 1755 MHz) 640 W 71 C limits: SW power cap"


def test_values_the_driver_does_not_report():
    summary = summarize("0, 1980, [N/A], 50\n0, 1900, [N/A], 52\n")
    assert summary[0]["power_w"] is None and summary[0]["limits"] == []
    assert describe(summary) == "GPU0 1940 MHz (min 1900 MHz) ? W 52 C"
    assert describe({}) == ""


FAKE_SMI = """#!/bin/sh
case "$1" in
  *clocks_event_reasons*) echo "Field is not a valid field to query." >&2; exit 2 ;;
esac
case "$3" in
  --loop-ms=*) while true; do echo "0, 1980, 600.0, 60, 0x0000000000000000"; sleep 0.05; done ;;
  *) echo "0, 1980, 600.0, 60, 0x0000000000000000" ;;
esac
"""


def test_sampler_falls_back_to_the_older_field_name(tmp_path, monkeypatch):
    smi = tmp_path / "bin/nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(FAKE_SMI)
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    with GpuSampler(tmp_path / "run/gpu.csv", interval_ms=50) as sampler:
        time.sleep(0.5)
    assert sampler.summary[0]["samples"] >= 2 and sampler.summary[0]["sm_clock_mhz"] == 1980
    assert (tmp_path / "run/gpu.csv").is_file()


def test_sampler_does_nothing_without_nvidia_smi_or_when_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with GpuSampler(tmp_path / "a.csv") as sampler:
        pass
    assert sampler.summary == {} and not (tmp_path / "a.csv").exists()
    with GpuSampler(tmp_path / "b.csv", enabled=False) as sampler:
        pass
    assert sampler.summary == {}
