"""--pin: `infer`, `chat` and `api` keep the thread that runs the kernels on one CPU once loaded.

Pinning changes a whole process, so each case runs the real command in a fresh interpreter and
then reads where every thread of that process may run. What it buys is measured, not tested:
benchmarks/contention.py.
"""

import json
import os
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
linux = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"),
                           reason="thread affinity is set through Linux's sched_setaffinity and /proc/self/task")
two_cpus = pytest.mark.skipif(len(getattr(os, "sched_getaffinity", lambda _: [])(0)) < 2,
                              reason="pinning needs two CPUs allowed to this process (with one it does nothing)")
pytestmark = [linux, two_cpus]

# After the command: {"compute": the CPUs of the thread that ran the kernels, "others": every other
# thread's CPUs, "cpus": the CPUs the process had}.
AFTER = """
    import os, threading
    tids = [int(t) for t in os.listdir("/proc/self/task")]
    others = sorted({tuple(sorted(os.sched_getaffinity(t))) for t in tids if t != compute_tid})
    print(json.dumps({"compute": sorted(os.sched_getaffinity(compute_tid)), "others": others, "cpus": cpus}))
"""

COMMAND = """
    import json, os, sys, threading
    cpus = sorted(os.sched_getaffinity(0))
    from cli.MODULE import COMMAND
    try:
        COMMAND.main(args=sys.argv[1:], standalone_mode=False)
    except SystemExit:
        pass
    compute_tid = threading.get_native_id()  # infer and chat compute on their main thread
""" + AFTER


def command(module: str, name: str) -> str:
    return COMMAND.replace("MODULE", module).replace("COMMAND.main", f"{name}.main").replace(
        "import COMMAND", f"import {name}")


THREAD_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def clean_env(**extra) -> dict:
    """This environment without thread counts (a CI job may export them), plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if k not in THREAD_VARS}, **extra}


def affinities(code: str, *args, stdin: str = "", env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env or clean_env())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_pinned(r: dict) -> None:
    assert len(r["compute"]) == 1 and r["compute"][0] in r["cpus"], r
    rest = sorted(set(r["cpus"]) - set(r["compute"]))
    assert r["others"] == [rest], r  # every other thread, the kernels' workers among them, on the rest


def assert_untouched(r: dict) -> None:
    assert r["compute"] == r["cpus"] and r["others"] in ([r["cpus"]], []), r  # (one thread: no others)


INFER = ["--prompt", "The", "--no-chat", "--max-tokens", "4", "--json"]


def test_infer_pins_the_thread_that_computes(factory_models):
    r = affinities(command("infer", "infer"), factory_models["q8_0-spm-gqa"], *INFER)
    assert_pinned(r)


@pytest.mark.parametrize("args", [["--no-pin"], ["--kernels", "numpy"], ["--threads", "1"]],
                         ids=["no-pin", "numpy-kernels", "one-thread"])
def test_infer_leaves_threads_alone(factory_models, args):
    """--no-pin; the numpy kernels (their BLAS threads were not measured pinned); one thread (nothing
    to keep apart, and a pinned thread could not leave a CPU something else takes)."""
    r = affinities(command("infer", "infer"), factory_models["q8_0-spm-gqa"], *INFER, *args)
    assert_untouched(r)


def test_chat_pins_the_thread_that_computes(factory_models):
    r = affinities(command("chat", "chat"), factory_models["q8_0-spm-gqa"], "--max-tokens", "3",
                   stdin="Hello\n")
    assert_pinned(r)


def test_chat_no_pin(factory_models):
    r = affinities(command("chat", "chat"), factory_models["q8_0-spm-gqa"], "--max-tokens", "3",
                   "--no-pin", stdin="Hello\n")
    assert_untouched(r)


def test_more_threads_than_cpus_are_left_alone(factory_models):
    """NUMBA_NUM_THREADS from the environment is not capped as --threads is: pinned, its extra workers
    would crowd the CPUs left to them (slower than unpinned, measured in review)."""
    cpus = len(os.sched_getaffinity(0))
    r = affinities(command("infer", "infer"), factory_models["q8_0-spm-gqa"], *INFER,
                   env=clean_env(NUMBA_NUM_THREADS=str(cpus + 2)))
    assert_untouched(r)


def test_a_thread_list_that_cannot_be_read_changes_nothing():
    """Pinning is an optimization: where /proc/self/task cannot be listed, nothing moves and nothing fails."""
    code = """
    import json, os, threading
    from common import affinity
    cpus = sorted(os.sched_getaffinity(0))
    real = os.listdir
    def refused(path):
        if str(path).startswith("/proc/self/task"):
            raise PermissionError(13, "Permission denied", path)
        return real(path)
    os.listdir = refused
    layout = affinity.pin_compute_thread()
    os.listdir = real
    assert layout is None
    compute_tid = threading.get_native_id()
    """ + AFTER
    assert_untouched(affinities(code))


def test_api_command_pins_its_compute_thread(factory_models):
    """`api` as a user runs it: once the model is ready, one thread (the compute thread) holds one CPU
    and every other thread the rest; with --no-pin every thread keeps every CPU."""
    seen = {}
    for pin in ("--pin", "--no-pin"):
        proc = subprocess.Popen([str(Path(sys.executable).parent / "api"), str(factory_models["q8_0-spm-gqa"]),
                                 "--port", "0", pin], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env=clean_env())
        try:
            deadline = time.monotonic() + 120
            line = ""
            while not line.startswith("api: model ready") and time.monotonic() < deadline:
                ready, _, _ = select.select([proc.stdout], [], [], max(deadline - time.monotonic(), 0))
                line = proc.stdout.readline() if ready else ""
                assert ready and line, "api gave no 'model ready' line in time"
            tasks = Path(f"/proc/{proc.pid}/task")
            seen[pin] = sorted(tuple(sorted(os.sched_getaffinity(int(t.name)))) for t in tasks.iterdir())
        finally:
            proc.kill()
            proc.wait(10)
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    assert set(seen["--no-pin"]) == {cpus}, seen
    pinned = seen["--pin"]

    def is_compute_cpu(a: tuple) -> bool:  # one thread alone on it, every other thread on the rest
        rest = tuple(sorted(set(cpus) - set(a)))
        return len(a) == 1 and pinned.count(a) == 1 and all(b == rest for b in pinned if b != a)

    assert any(is_compute_cpu(a) for a in set(pinned)), seen


API_LOAD = """
    import json, os, sys, threading
    cpus = sorted(os.sched_getaffinity(0))
    from cli.api import model_loader
    from common import compute
    compute.start()  # as `api` does before loading
    model = model_loader(sys.argv[1], "numba", None, lambda message: None, None, pin=sys.argv[2] == "pin")(
        lambda *a: None)
    assert model.tokenizer is not None
    compute_tid = compute.run(threading.get_native_id)
""" + AFTER


@pytest.mark.parametrize("pin", [True, False], ids=["pin", "no-pin"])
def test_api_pins_its_compute_thread_not_the_loading_one(factory_models, pin):
    """The API loads on a thread of its own; the kernels run on the compute thread, which is pinned."""
    r = affinities(API_LOAD, factory_models["q8_0-spm-gqa"], "pin" if pin else "no")
    (assert_pinned if pin else assert_untouched)(r)
