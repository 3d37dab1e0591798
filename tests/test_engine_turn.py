"""tools/imagenet/engine_turn: the native decode turn, built with this machine's C compiler and
driven with libc's usleep standing in for nvJPEG's decode call."""
import ctypes
import ctypes.util
import os
import shutil
import sys
import threading
import time

import pytest

from tools.imagenet import engine_turn

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None,
                                reason="needs a C compiler (cc or $CC) to build the native turn")


@pytest.fixture(scope="module")
def turn(tmp_path_factory):
    return engine_turn.load(engine_turn.build(tmp_path_factory.mktemp("cache")))


def _usleep():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return ctypes.cast(libc.usleep, ctypes.c_void_p).value


def test_build_compiles_once_per_source_and_names_a_missing_compiler(tmp_path):
    first = engine_turn.build(tmp_path)
    built = first.stat().st_mtime_ns
    assert engine_turn.build(tmp_path) == first and first.stat().st_mtime_ns == built
    assert first.name.startswith("engine_turn-") and [p.name for p in tmp_path.iterdir()] == [first.name]
    with pytest.raises(RuntimeError, match="no C compiler .no-such-cc."):
        engine_turn.build(tmp_path / "other", compiler="no-such-cc")
    assert engine_turn.cache_dir({"XDG_CACHE_HOME": "/x"}).as_posix() == "/x/imagenet-multigpu"


def test_the_turn_is_held_by_one_thread_at_a_time_and_timed(turn):
    seconds = [(ctypes.c_double * 2)() for _ in range(3)]
    # the threads ask for the turn together (a thread started last can start 10 ms late on a busy
    # 2-core machine, and then waits that much less)
    together = threading.Barrier(len(seconds))

    def call(s):
        together.wait()
        turn.engine_turn_call6(_usleep(), 30_000, None, None, None, None, None, s)

    threads = [threading.Thread(target=call, args=(s,)) for s in seconds]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    held = [s[1] for s in seconds]
    assert all(h >= 0.03 for h in held) and wall >= 0.09  # one after another, never together
    assert max(s[0] for s in seconds) >= 0.045  # the last one in waited for (most of) the two before it


def test_the_turn_passes_to_the_next_thread_while_another_holds_the_gil(turn):
    """The point of the native turn: a thread back from the call does not keep the turn while it
    waits for the GIL. Here the main thread runs Python the whole time, with a switch interval of
    half a second: a Python lock would keep the second thread waiting that long."""
    seconds = [(ctypes.c_double * 2)() for _ in range(2)]
    first = threading.Thread(target=turn.engine_turn_call6, args=(_usleep(), 100_000, None, None, None, None, None,
                                                                  seconds[0]))
    second = threading.Thread(target=turn.engine_turn_call6, args=(_usleep(), 100_000, None, None, None, None, None,
                                                                   seconds[1]))
    before = sys.getswitchinterval()
    try:
        first.start()
        time.sleep(0.02)  # the first has the turn
        second.start()
        time.sleep(0.02)  # the second waits for it, in native code
        sys.setswitchinterval(0.5)
        end = time.perf_counter() + 0.6
        while time.perf_counter() < end:  # the GIL stays here but for the switch interval
            pass
    finally:
        sys.setswitchinterval(before)
    first.join()
    second.join()
    # the second got the turn as soon as the first's call ended (~80 ms after it arrived), not once
    # the first thread had the GIL back
    assert seconds[0][1] >= 0.1 and 0.05 <= seconds[1][0] < 0.2
