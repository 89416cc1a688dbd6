"""common.jobloop: other threads' work and sockets, served on one thread."""

from __future__ import annotations

import selectors
import socket
import threading
import time

import pytest

from common.jobloop import JobLoop


@pytest.fixture
def loop(job_loop):
    return job_loop


def test_jobs_run_in_order_on_the_loops_thread_and_errors_reach_the_caller(loop):
    seen = []
    futures = [loop.submit(lambda i=i: seen.append((i, threading.get_ident())) or i) for i in range(20)]
    assert [f.result(10) for f in futures] == list(range(20))
    assert [i for i, _ in seen] == list(range(20))
    assert {t for _, t in seen} == {loop.thread_ident} != {threading.get_ident()}

    def fail():
        raise ValueError("from the loop")

    with pytest.raises(ValueError, match="from the loop"):
        loop.submit(fail).result(10)
    assert loop.submit(lambda: "still serving").result(10) == "still serving"


def test_a_watched_socket_calls_back_on_the_loops_thread_and_a_failing_callback_is_survived(loop):
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    got, calls = [], threading.Event()

    def readable(events):
        assert threading.get_ident() == loop.thread_ident and events & selectors.EVENT_READ
        data = ours.recv(100)
        got.append(data)
        calls.set()
        if data == b"boom":
            raise RuntimeError("a callback's bug")

    loop.submit(loop.watch, ours, selectors.EVENT_READ, readable).result(10)
    theirs.sendall(b"boom")
    assert calls.wait(10)
    calls.clear()
    theirs.sendall(b"after")
    assert calls.wait(10) and got == [b"boom", b"after"]  # the loop went on after the callback raised
    loop.submit(loop.unwatch, ours).result(10)
    theirs.sendall(b"unwatched")
    time.sleep(0.3)
    assert got == [b"boom", b"after"]
    ours.close()
    theirs.close()


def test_timers_run_between_events(loop):
    ticks = []
    loop.submit(loop.every, 0.05, lambda: ticks.append(time.monotonic())).result(10)
    deadline = time.monotonic() + 10
    while len(ticks) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(ticks) >= 3  # (every TICK_S at least: 0.25 s apart at most on an idle loop)


def test_stop_ends_run_and_cancels_what_is_queued():
    jobs = JobLoop()
    started, release = threading.Event(), threading.Event()
    thread = threading.Thread(target=jobs.run, daemon=True)
    thread.start()
    jobs.submit(lambda: (started.set(), release.wait(10)))
    queued = jobs.submit(lambda: "never")
    assert started.wait(10)
    jobs.stop()
    release.set()
    thread.join(10)
    assert not thread.is_alive() and queued.cancelled()
    with pytest.raises(RuntimeError, match="stopped"):
        jobs.submit(lambda: None)


def test_keyboard_interrupt_in_a_job_ends_run_on_its_thread():
    jobs = JobLoop()

    def interrupt():
        raise KeyboardInterrupt

    future = jobs.submit(interrupt)
    with pytest.raises(KeyboardInterrupt):
        jobs.run()  # (here: Ctrl-C in a node's compute thread ends the node, swarm/node.py)
    assert isinstance(future.exception(1), KeyboardInterrupt)
