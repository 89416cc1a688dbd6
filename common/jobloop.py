"""The compute thread's loop: work handed over by other threads, and sockets, on one thread.

A node computes every step on one thread (common/compute.py). Its decode steps arrive on lanes
(swarm/lane.py): plain TCP sockets that this loop reads the moment the kernel wakes it, computes
on and writes from, with no event loop's machinery in between. Between socket events it runs the
work other threads submit (an ``Executor``: the asyncio thread's prompts, INFO's measurements).

    other threads --submit(fn)--> jobs --.
    sockets ----------------------------->  select() -> socket callbacks, then the queued jobs
    timers (every n s) ------------------'

Everything registered here runs on the loop's thread; ``submit`` and ``stop`` are the only calls
made from elsewhere.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future
from typing import Callable

log = logging.getLogger("common.jobloop")
TICK_S = 0.25  # timers are looked at this often, at least


class JobLoop(Executor):
    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._jobs: deque = deque()
        self._lock = threading.Lock()
        self._stopping = False
        self._timers: list[list] = []  # [period, next due, fn]
        self.thread_ident: int | None = None

    # -- from any thread ------------------------------------------------------------------------------
    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        with self._lock:
            if self._stopping:
                raise RuntimeError("the compute loop has stopped")
            self._jobs.append((future, fn, args, kwargs))
        self._wake()
        return future

    def stop(self) -> None:
        """End ``run`` after the callback or job running now (the queued jobs are cancelled)."""
        with self._lock:
            self._stopping = True
        self._wake()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.stop()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):  # full: a wake-up is pending already (or closed: stopping)
            pass

    # -- on the loop's thread -------------------------------------------------------------------------
    def watch(self, sock, events: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(events)`` when ``sock`` is ready (selectors.EVENT_READ / EVENT_WRITE)."""
        try:
            self.selector.modify(sock, events, callback)
        except KeyError:
            self.selector.register(sock, events, callback)

    def unwatch(self, sock) -> None:
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):  # (not watched, or closed already)
            pass

    def every(self, seconds: float, fn: Callable[[], None]) -> list:
        """Call ``fn()`` about every ``seconds`` (checked at least every TICK_S), between events;
        returns the timer, for ``cancel``."""
        timer = [seconds, time.monotonic() + seconds, fn]
        self._timers.append(timer)
        return timer

    def after(self, seconds: float, fn: Callable[[], None]) -> list:
        """Call ``fn()`` once, about ``seconds`` from now; returns the timer, for ``cancel``."""
        timer = [None, time.monotonic() + seconds, fn]
        self._timers.append(timer)
        return timer

    def cancel(self, timer: list) -> None:
        if timer in self._timers:
            self._timers.remove(timer)

    def run(self) -> None:
        """Serve sockets, timers and jobs on this thread until ``stop``."""
        self.thread_ident = threading.get_ident()
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        break
                    idle = not self._jobs
                for key, events in self.selector.select(TICK_S if idle else 0):
                    if key.data is None:
                        self._drain_wake()
                    else:
                        _quietly(key.data, events)
                self._run_timers()
                self._run_jobs()
        finally:
            with self._lock:
                self._stopping = True
                left, self._jobs = list(self._jobs), deque()
            for future, *_ in left:
                future.cancel()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _run_timers(self) -> None:
        now = time.monotonic()
        for timer in list(self._timers):  # (a timer's function may add or cancel timers)
            if now >= timer[1]:
                if timer[0] is None:
                    self.cancel(timer)
                else:
                    timer[1] = now + timer[0]
                _quietly(timer[2])

    def _run_jobs(self) -> None:
        """The jobs queued so far (those they queue wait for the next turn: sockets go first)."""
        with self._lock:
            n = len(self._jobs)
        for _ in range(n):
            with self._lock:
                if self._stopping or not self._jobs:
                    return
                future, fn, args, kwargs = self._jobs.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:  # (to the submitter; KeyboardInterrupt too, then re-raised here)
                future.set_exception(e)
                if not isinstance(e, Exception):
                    raise
            else:
                future.set_result(result)


def _quietly(fn, *args) -> None:
    """A callback's bug is logged, and the loop (every session's compute) goes on."""
    try:
        fn(*args)
    except Exception:
        log.exception("a callback of the compute loop failed")
