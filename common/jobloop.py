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
import select
import selectors
import socket
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future
from typing import Callable

log = logging.getLogger("common.jobloop")
TICK_S = 0.25  # timers are looked at this often, at least
_EPOLL = {selectors.EVENT_READ: select.EPOLLIN, selectors.EVENT_WRITE: select.EPOLLOUT,
          selectors.EVENT_READ | selectors.EVENT_WRITE: select.EPOLLIN | select.EPOLLOUT}


class JobLoop(Executor):
    def __init__(self):
        # epoll itself, not the selectors module over it: a node's compute thread wakes here for
        # every decode step, on a core that has just woken, where selectors' layer of Python cost
        # 66 against 40 us (docs/distributed-performance.md, "2 Dec, morning")
        self._epoll = select.epoll()
        self._watched: dict[int, tuple] = {}  # fd -> (socket, selectors' events, callback)
        self._fds: dict[int, int] = {}        # id(socket) -> fd (a socket closed since reads -1 as its fd)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._register(self._wake_r, selectors.EVENT_READ, None)
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
        fd = self._fds.get(id(sock))
        if fd is None or self._watched.get(fd, (None,))[0] is not sock:
            return self._register(sock, events, callback)
        if self._watched[fd][1] != events:
            self._epoll.modify(fd, _EPOLL[events])
        self._watched[fd] = (sock, events, callback)

    def _register(self, sock, events: int, callback) -> None:
        fd = sock.fileno()
        if fd < 0:
            raise ValueError(f"cannot watch a closed socket ({sock!r})")
        held = self._watched.get(fd)
        if held is not None:
            if held[0].fileno() == fd:
                raise ValueError(f"cannot watch {sock!r}: its descriptor is watched for another socket")
            self._forget(held[0], fd)  # (closed without being unwatched: the descriptor is another's now)
        try:
            self._epoll.register(fd, _EPOLL[events])
        except FileExistsError:
            self._epoll.modify(fd, _EPOLL[events])
        self._watched[fd], self._fds[id(sock)] = (sock, events, callback), fd

    def unwatch(self, sock) -> None:
        fd = self._fds.get(id(sock))
        if fd is not None and self._watched.get(fd, (None,))[0] is sock:
            self._forget(sock, fd)
            try:
                self._epoll.unregister(fd)
            except OSError:  # (closed already: the kernel dropped it)
                pass

    def _forget(self, sock, fd: int) -> None:
        del self._watched[fd]
        self._fds.pop(id(sock), None)

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
                ready = [(self._watched.get(fd), happened) for fd, happened in self._epoll.poll(TICK_S if idle else 0)]
                for watched, happened in ready:
                    if watched is None or self._watched.get(self._fds.get(id(watched[0]))) is not watched:
                        continue  # (unwatched or watched anew by a callback before it: asked again next turn)
                    if watched[2] is None:
                        self._drain_wake()
                        continue
                    # as selectors reports them: an error or a hang-up is both readable and writable
                    events = ((selectors.EVENT_WRITE if happened & ~select.EPOLLIN else 0)
                              | (selectors.EVENT_READ if happened & ~select.EPOLLOUT else 0)) & watched[1]
                    if events:
                        _quietly(watched[2], events)
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
