"""common/affinity.py: the compute thread on one CPU, the process's other threads on the rest."""

import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, strategies as st

from common import affinity
from common.affinity import current_cpu, pin_compute_thread, plan

linux = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"),
                           reason="thread affinity is set through Linux's sched_setaffinity and /proc/self/task")
two_cpus = pytest.mark.skipif(len(getattr(os, "sched_getaffinity", lambda _: [])(0)) < 2,
                              reason="pinning needs two CPUs allowed to this process (with one it does nothing, "
                                     "as test_one_cpu_changes_nothing checks)")


@given(st.sets(st.integers(0, 255), max_size=16), st.one_of(st.none(), st.integers(0, 255)))
def test_plan_splits_the_allowed_cpus(cpus, compute_cpu):
    cpus = sorted(cpus)
    layout = plan(cpus, compute_cpu)
    if len(cpus) < 2:
        assert layout is None
        return
    main, others = layout
    assert main == (compute_cpu if compute_cpu in cpus else cpus[0])
    assert others == set(cpus) - {main} and others


@linux
def test_current_cpu_is_one_we_may_run_on():
    assert current_cpu() in os.sched_getaffinity(0)


def run_child(code: str, cpus=None) -> dict:
    """``code`` in a fresh interpreter (pinning changes the whole process): its last line, evaluated."""
    pre = f"import os; os.sched_setaffinity(0, {set(cpus)!r})\n" if cpus else ""
    out = subprocess.run([sys.executable, "-c", pre + textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip().splitlines()[-1])


CHILD = """
    import os, threading
    from common.affinity import pin_compute_thread
    thread_cpus = os.sched_getaffinity
    go = threading.Event()
    tids = []
    def idle():
        tids.append(threading.get_native_id())
        go.wait(30)
    def started():
        t = threading.Thread(target=idle)
        t.start()
        while len(tids) < n[0] + 1: pass
        n[0] += 1
        return tids[-1]
    n = [0]
    before = started()
    everything = sorted(os.sched_getaffinity(0))
    first = pin_compute_thread()
    me = threading.get_native_id()
    after = started()  # inherits the compute thread's CPU...
    inherited = sorted(thread_cpus(after))
    again = pin_compute_thread()  # ...until the next pinning moves it
    go.set()
    print(dict(everything=everything, first=first, again=again, me=sorted(thread_cpus(me)),
               before=sorted(thread_cpus(before)), inherited=inherited, after=sorted(thread_cpus(after))))
"""


@linux
@two_cpus
def test_pinning_puts_the_caller_alone_and_every_other_thread_elsewhere():
    r = run_child(CHILD)
    main, others = r["first"]
    assert main in r["everything"] and others == set(r["everything"]) - {main}
    assert r["me"] == [main]
    assert r["before"] == sorted(others)
    assert r["inherited"] == [main]  # why a node pins again at every republish
    assert r["again"] == r["first"]  # the same layout: the allowed set is remembered, not re-read
    assert r["after"] == sorted(others)


@linux
def test_one_cpu_changes_nothing():
    cpu = sorted(os.sched_getaffinity(0))[0]
    r = run_child(CHILD.replace("again = pin_compute_thread()", "again = None"), cpus=[cpu])
    assert r["first"] is None and r["me"] == r["before"] == [cpu]


@linux
def test_a_compute_thread_that_may_not_be_pinned_is_left_alone(monkeypatch):
    """A container's cpuset can be narrower than the mask the kernel reports: the node goes on unpinned."""
    def refuse(tid, cpus):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(affinity, "_allowed", [0, 1])
    monkeypatch.setattr(affinity.os, "sched_setaffinity", refuse)
    assert pin_compute_thread() is None
