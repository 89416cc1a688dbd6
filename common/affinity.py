"""Keep a process's compute thread and its kernel pool's workers on different CPUs.

A decode step is hundreds of parallel regions, each a barrier between the compute thread and
Numba's OpenMP workers. When the scheduler puts the compute thread and a worker on the same CPU,
and it does so after a pause (it keeps a cache-hot thread where it ran), every barrier waits for a
time slice. Measured with `benchmarks/pipeline.py --trace` (SmolLM2, three nodes and a client on
one 2-core machine, six runs each way, 69 relayed tokens a run): unpinned, a node's slowest
10-block step took up to 36.8 ms against medians of 1.2-1.5 ms, and its mean was up to 2.05 ms
above its median; pinned, the slowest took 1.4-5.6 ms and means stayed within 0.12 ms of medians.

Linux only (``os.sched_setaffinity`` on each thread id of ``/proc/self/task``); elsewhere, and
with fewer than two CPUs allowed, nothing is changed. The allowed set is respected: under
``taskset -c 4-7`` the compute thread keeps the one of 4-7 it is running on (the scheduler has
spread the processes already), the other threads get the other three.

A thread inherits its creator's affinity, so threads started by the compute thread after a call
run on its CPU: call ``pin_compute_thread`` again once they exist (a node does at every republish).
"""

from __future__ import annotations

import os
import threading

_allowed: list[int] | None = None  # the process's CPUs before the first pinning narrowed this thread's


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on, ascending ([] where the OS cannot say): as they were before
    ``pin_compute_thread`` narrowed the calling thread's set."""
    if _allowed is not None:
        return _allowed
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return []


def current_cpu() -> int | None:
    """The CPU the calling thread last ran on (field 39 of /proc/thread-self/stat), or None."""
    try:
        with open("/proc/thread-self/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[36])  # fields after "pid (comm)" start at 3
    except (OSError, ValueError, IndexError):
        return None


def plan(cpus: list[int], compute_cpu: int | None) -> tuple[int, set[int]] | None:
    """(the compute thread's CPU, the others' CPUs) for the allowed ``cpus``, or None with fewer than
    two. The compute thread keeps ``compute_cpu`` when it is allowed (the scheduler spread the
    processes already), else takes the first."""
    if len(cpus) < 2:
        return None
    main = compute_cpu if compute_cpu in cpus else cpus[0]
    return main, set(cpus) - {main}


def pin_compute_thread() -> tuple[int, set[int]] | None:
    """Pin the calling thread to one CPU and every other thread of this process to the rest.

    Returns (compute CPU, other CPUs), or None when nothing was done: also when the calling thread
    may not be pinned (a container's cpuset narrower than the mask reports). Threads that exit
    meanwhile are skipped; a thread that may not be moved is left where it is.
    """
    global _allowed
    if not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"):
        return None
    _allowed = allowed_cpus()
    layout = plan(_allowed, current_cpu())
    if layout is None:
        return None
    main, others = layout
    me = threading.get_native_id()
    try:
        tids = [int(name) for name in os.listdir("/proc/self/task")]  # (before anything is moved)
        os.sched_setaffinity(me, {main})
    except (OSError, ValueError):
        return None
    for tid in tids:
        if tid != me:
            try:
                os.sched_setaffinity(tid, others)
            except OSError:  # gone, or not ours to move
                pass
    return layout
