"""common.compute: one thread for a server's kernels; direct calls until one is started."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import threading
from common import compute

here = threading.get_ident()
assert not compute.started()
assert compute.run(threading.get_ident) == here          # no compute thread: called right here

compute.start()
worker = compute.run(threading.get_ident)
assert worker != here and compute.start() is compute.executor()   # one thread, started once
assert all(compute.run(threading.get_ident) == worker for _ in range(5))
assert compute.run(lambda: compute.run(threading.get_ident)) == worker  # nested: no deadlock

def fail():
    raise ValueError("from the compute thread")
try:
    compute.run(fail)
except ValueError as e:
    assert "compute thread" in str(e)
else:
    raise AssertionError("the exception was lost")

# The engine loads and steps on it: a model built from another thread still computes there.
import numpy as np
from distribution.gguf_file import GGUFFileLoader
from engine.model import LlamaModel
from models.factory import ModelSpec, write_model
import tempfile, os
path = write_model(ModelSpec(weight_type="Q8_0"), os.path.join(tempfile.mkdtemp(), "m.gguf"))
seen = set()
import engine.model as em
original = em.LlamaModel._forward_chunk
def spy(self, *a, **k):
    seen.add(threading.get_ident())
    return original(self, *a, **k)
em.LlamaModel._forward_chunk = spy
model = LlamaModel(GGUFFileLoader(path), backend="numba")
with model.open_session(8) as s:
    s.feed([1, 2, 3])
    s.feed([4])
assert seen == {worker}, (seen, worker)
print("ok")
"""


def test_compute_thread_runs_what_it_is_given_and_the_engine_uses_it():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


ADOPT = r"""
import threading
from common import compute

compute.adopt()
assert compute.on_compute_thread() and not compute.started()
assert compute.run(threading.get_ident) == threading.get_ident()  # right here: no hand-over
try:
    compute.start()
except RuntimeError as e:
    assert "adopted" in str(e)
else:
    raise AssertionError("a second compute thread was started behind the adopted one")
print("ok")
"""


def test_an_adopted_thread_computes_directly_and_no_second_one_starts():
    proc = subprocess.run([sys.executable, "-c", ADOPT], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
