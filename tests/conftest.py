"""Shared fixtures: one mini ImageNet (with the real archives' quirks) built by the project's own
generator and pushed through the stages once per test session, so each test file starts from it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Keep every test on a small, fixed thread budget: CI has 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

MINI = dict(num_classes=6, train_per_class=24, val_per_class=6, seed=0)


def project_env(root=ROOT, **extra):
    """The environment of a subprocess that runs the project at `root`: its folder first on
    PYTHONPATH, then what this process's PYTHONPATH held (the GPU machine's packages live there)."""
    paths = [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}


def run_tool(module, *args, check=True, env=None, **kwargs):
    """Run `python -m tools.<module> args...` as a user would; return the CompletedProcess."""
    cmd = [sys.executable, "-m", f"tools.{module}", *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=project_env(**(env or {})), capture_output=True, text=True,
                          **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def mini_raw(tmp_path_factory):
    """Raw archives of a mini ImageNet with quirks: {'raw_dir', 'labels_csv', 'wnids', ...}."""
    from tools.make_mini import generate
    out = tmp_path_factory.mktemp("raw")
    return generate(out, quirks=True, **MINI)


@pytest.fixture(scope="session")
def mini_extracted(mini_raw, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    run_tool("extract", "--raw-dir", mini_raw["raw_dir"], "--val-labels", mini_raw["labels_csv"],
             "--out", work / "extracted", "--workers", 2)
    return work / "extracted"


@pytest.fixture(scope="session")
def mini_resized(mini_extracted):
    work = mini_extracted.parent
    run_tool("resize", "--src", mini_extracted, "--dst", work / "resized", "--short-side", 72,
             "--quality", 90, "--workers", 2, "--rejected", work / "rejected.tsv",
             "--max-rejected-fraction", 0.05)
    return work / "resized"


@pytest.fixture(scope="session")
def mini_shards(mini_resized):
    work = mini_resized.parent
    run_tool("shard", "--src", mini_resized, "--out", work / "shards", "--train-shard-size", 20,
             "--val-shard-size", 7, "--seed", 0, "--workers", 2)
    return work / "shards"
