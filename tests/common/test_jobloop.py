"""common.jobloop: other threads' work and sockets, served on one thread."""

from __future__ import annotations

import os
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


def test_a_hang_up_is_readable_and_a_descriptor_closed_unwatched_can_be_watched_again(loop):
    """epoll itself (not selectors): a peer's hang-up comes as readable, as selectors reported it;
    a socket closed without being unwatched leaves its descriptor to the next socket that gets it."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    seen, called = [], threading.Event()
    loop.submit(loop.watch, ours, selectors.EVENT_READ, lambda events: (seen.append(events), called.set())).result(10)
    theirs.close()
    assert called.wait(10) and seen[0] == selectors.EVENT_READ and ours.recv(10) == b""
    fd = ours.fileno()
    loop.submit(ours.close).result(10)  # (not unwatched first)
    again, other = socket.socketpair()
    if again.fileno() != fd:  # a new socket on the very descriptor (the lowest free one may be another)
        os.dup2(again.fileno(), fd)
        again.close()
        again = socket.socket(fileno=fd)
    try:
        called.clear()
        loop.submit(loop.watch, again, selectors.EVENT_WRITE, lambda events: (seen.append(events), called.set())).result(10)
        assert called.wait(10) and seen[-1] == selectors.EVENT_WRITE
        loop.submit(loop.unwatch, again).result(10)
    finally:
        again.close()
        other.close()


def test_a_socket_unwatched_by_an_earlier_callback_of_the_same_turn_is_not_called(loop):
    pairs = [socket.socketpair() for _ in range(2)]
    for ours, _ in pairs:
        ours.setblocking(False)
    calls = []

    def first(events):  # whichever of the two runs first unwatches the other
        calls.append(1)
        loop.unwatch(pairs[1][0])
        loop.unwatch(pairs[0][0])

    def second(events):
        calls.append(2)
        loop.unwatch(pairs[0][0])
        loop.unwatch(pairs[1][0])

    def arm():
        loop.watch(pairs[0][0], selectors.EVENT_READ, first)
        loop.watch(pairs[1][0], selectors.EVENT_READ, second)
        for _, theirs in pairs:  # both readable before the loop's next poll
            theirs.sendall(b"x")

    loop.submit(arm).result(10)
    time.sleep(0.3)
    assert len(calls) == 1
    for pair in pairs:
        for s in pair:
            s.close()
