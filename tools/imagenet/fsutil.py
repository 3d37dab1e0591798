"""Atomic outputs: write to a temporary name beside the target, then rename.

An interrupted stage therefore never leaves a file or folder that looks complete, and the next
write of the same target removes what a killed one left (`.NAME.tmp-PID` of a dead PID).
Also the stage tools' shared process helpers: `default_workers` and `exit_on_sigterm`.
"""
import contextlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(path):
    """Remove `.NAME.tmp-PID` siblings of `path` whose process is gone (a SIGKILLed or crashed run:
    its `finally` never ran, and the leftover can be a whole dataset copy). PIDs are this machine's:
    don't run two writers of one target on different hosts sharing the folder (Snakemake's lock
    already prevents that)."""
    path = Path(path)
    prefix = f".{path.name}.tmp-"
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return
    for entry in entries:
        pid = entry.name[len(prefix):] if entry.name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            remove(entry.path)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success rename it to `path` (file or folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        remove(tmp)


def remove(path):
    """Remove a file or folder if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_bytes_atomic(path, data: bytes):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(path, text: str):
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def default_workers():
    """CPU cores this process may run on: the affinity mask (what Slurm, taskset or a cgroup cpuset
    grant), not os.cpu_count(), which counts the whole machine."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def exit_on_sigterm():
    """Make SIGTERM (Slurm's scancel and time limit, Snakemake, `kill`) raise SystemExit(143) in this
    process, so that `finally` blocks run and atomic_path removes its temporary output.

    Processes forked afterwards (pool workers) get the default disposition back: a Python-level
    handler runs only between bytecodes, so a worker blocked on the pool's queue lock would never
    act on it and Pool.terminate() would wait for it forever."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    global _reset_in_children
    if not _reset_in_children:
        os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
        _reset_in_children = True


_reset_in_children = False
