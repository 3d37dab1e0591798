"""The process's one turn at nvJPEG's batched decode call, held in native code (engine_turn.c).

    from tools.imagenet.engine_turn import native_turn
    turn = native_turn()          # the compiled helper, or None where no C compiler is found
    seconds = (ctypes.c_double * 2)()
    status = turn.engine_turn_call6(fn, a0, a1, a2, a3, a4, a5, seconds)   # fn(a0..a5), in turn

The engine decoders of a process take turns at nvjpegDecodeBatched (two at once hang beside a
training step: bench/NOTES-gpu.md phases 5 and 19), and one training GPU's data path is about as
fast as those turns follow each other (phase 20: the turn is held 82-98 % of the time on one GPU).
A Python lock around the ctypes call keeps the turn while its thread waits for the GIL on the way
back from the call, and the next thread waits for the GIL too before it makes its call. Taken and
given up inside one ctypes call (which runs without the GIL), the turn passes at once.

The helper is compiled on first use with the C compiler ($CC, else cc) into a cache folder
($XDG_CACHE_HOME or ~/.cache, then imagenet-multigpu), named by a hash of its source, and written
under a temporary name and renamed, so ranks starting at once do not trip over each other.
"""
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from tools.imagenet.fsutil import atomic_path

SOURCE = Path(__file__).with_name("engine_turn.c")


def cache_dir(environ=os.environ):
    """Where the compiled helper is kept: $XDG_CACHE_HOME (else ~/.cache)/imagenet-multigpu."""
    base = environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imagenet-multigpu"


def build(folder=None, compiler=None):
    """Path of the compiled helper in `folder` (cache_dir()), compiled now unless already there.
    Raises RuntimeError naming the compiler's complaint where it cannot be built."""
    source = SOURCE.read_bytes()
    folder = Path(folder) if folder is not None else cache_dir()
    library = folder / f"engine_turn-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if library.exists():
        return library
    compiler = compiler or os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler ({compiler}) to build {SOURCE.name}: install one or set CC")
    with atomic_path(library) as tmp:
        done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE), "-lpthread"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} could not build {SOURCE.name}: {done.stderr.strip()[-500:]}")
    return library


def load(path):
    """The helper at `path` through ctypes, its functions declared."""
    lib = ctypes.CDLL(str(path))  # CDLL: each call runs without the GIL
    p = ctypes.c_void_p
    lib.engine_turn_call6.argtypes = [p] * 7 + [ctypes.POINTER(ctypes.c_double)]
    lib.engine_turn_call6.restype = ctypes.c_int
    lib.engine_turn_take.argtypes = lib.engine_turn_give.argtypes = []
    lib.engine_turn_take.restype = lib.engine_turn_give.restype = None
    return lib


@functools.lru_cache(maxsize=1)
def native_turn():
    """The process's helper (one mutex per process: every decoder must use this same one), or None
    with the reason printed once where it cannot be built."""
    try:
        return load(build())
    except (OSError, RuntimeError) as exc:
        print(f"engine decoder: native decode turn unavailable, using a Python lock ({exc})", flush=True)
        return None
