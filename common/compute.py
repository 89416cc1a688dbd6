"""One thread for the parallel kernels of a server process.

libgomp (Numba's OpenMP threading layer) keeps a pool of worker threads for every thread that
starts a parallel region. As soon as two threads have done so (a server's loading thread and its
compute thread, or two API slots), the process manages more OpenMP threads than there are cores,
and libgomp then throttles its spin-wait to about 100 iterations: every parallel region wakes its
workers through the kernel. A decode step is hundreds of regions; on SmolLM2 it went from 5 ms to
21 ms (2 cores, measured with one Numba call made on a second thread, then steps on the first).

So a process whose engine work may come from several threads (a node, the API server) starts the
compute thread once, and everything that runs kernels, loading included, goes through ``run``
(or the ``executor``, for asyncio's ``run_in_executor``). Commands that compute on their main
thread only (``infer``, ``chat``, ``validate``) never start it: ``run`` then calls directly, at no
cost. The compute thread also serializes the work, so two sessions never share the cores at once.

A node ``adopt`` s its main thread with a JobLoop (common/jobloop.py): that thread loads the model,
then computes every step and reads the node's lanes (swarm/lane.py) itself, so a decode step needs
no hand-over between threads (each is a wake-up through the kernel, 0.1-0.2 ms on a busy 2-core
machine, paid at every hop of every token); the event loop runs on another thread and hands its
work over (swarm/node.py).
"""

from __future__ import annotations

import threading
from concurrent.futures import Executor
from typing import Callable, TypeVar

from common.jobloop import JobLoop

T = TypeVar("T")

_lock = threading.Lock()
_executor: JobLoop | None = None
_thread_ident: int | None = None


def start() -> JobLoop:
    """Start the process's compute thread (once; later calls return the same executor): a JobLoop
    (common/jobloop.py), which also serves the sockets registered with it (a node's lanes)."""
    global _executor, _thread_ident
    with _lock:
        if _executor is None and _thread_ident is not None:
            raise RuntimeError("this process computes on its adopted thread: there is no compute thread to start")
        if _executor is None:
            jobs = JobLoop()
            threading.Thread(target=jobs.run, name="compute", daemon=True).start()
            _thread_ident = jobs.submit(threading.get_ident).result()  # the thread runs and its ident is known
            _executor = jobs
        return _executor


def adopt(jobs: JobLoop | None = None) -> None:
    """Make the calling thread the compute thread: ``run`` there calls directly. With ``jobs``, other
    threads' ``run`` calls (and ``executor()``) queue their work on it, for this thread to serve by
    calling ``jobs.run()`` (a node: swarm/node.py)."""
    global _thread_ident, _executor
    with _lock:
        if _executor is not None:
            raise RuntimeError("a compute thread is started already")
        _thread_ident = threading.get_ident()
        _executor = jobs


def executor() -> Executor:
    """The compute thread's executor (starting it), for ``loop.run_in_executor``."""
    return _executor if _executor is not None else start()


def jobs() -> JobLoop | None:
    """The compute thread's loop, if it has one (a started thread, or an adopted one given one)."""
    return _executor


def started() -> bool:
    """Whether other threads' work goes to a compute thread (one started, or adopted with a loop)."""
    return _executor is not None


def on_compute_thread() -> bool:
    return _thread_ident is not None and threading.get_ident() == _thread_ident


def run(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on the compute thread if one is started, else right here."""
    if _executor is None or on_compute_thread():
        return fn(*args, **kwargs)
    return _executor.submit(fn, *args, **kwargs).result()
