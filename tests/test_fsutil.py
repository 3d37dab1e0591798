"""Process helpers of the stage tools."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD_DISPOSITION = """
import multiprocessing, signal
from tools.imagenet.fsutil import exit_on_sigterm
exit_on_sigterm()
assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
with multiprocessing.get_context("fork").Pool(1) as pool:
    print(pool.apply(signal.getsignal, (signal.SIGTERM,)) == signal.SIG_DFL)
"""


def test_pool_workers_get_the_default_sigterm_back():
    """A Python-level handler in a pool worker blocked on the queue lock would never run, and
    Pool.terminate() would wait for that worker forever: forked workers must die on SIGTERM."""
    out = subprocess.run([sys.executable, "-c", CHILD_DISPOSITION], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60).stdout
    assert out.strip() == "True"
