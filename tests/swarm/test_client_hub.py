"""Hub.wait (swarm/client.py): a relayed step's wait for its answer, taken in the delivery callback."""

import asyncio
import time

import pytest

from swarm.client import Hub


class Boom(Exception):
    pass


def taking(wanted):
    """A watch that takes the message ``wanted``, raises on "boom", and records what it saw."""
    seen = []

    def watch(link, msg):
        seen.append(msg)
        if msg == "boom":
            raise Boom(link)
        return msg if msg == wanted else None

    return watch, seen


@pytest.fixture
def hub():
    h = Hub()
    yield h
    h.close()


def test_queued_messages_are_seen_first_and_those_not_taken_are_dropped(hub):
    for msg in ("old", "answer", "later"):
        hub.offer("link", msg)  # no wait runs: into the inbox
    watch, seen = taking("answer")
    assert hub.wait(watch, 5) == "answer"
    assert seen == ["old", "answer"]
    assert hub.inbox.qsize() == 1 and hub.inbox.get_nowait() == ("link", "later")  # left for the next reader


def test_a_message_delivered_during_the_wait_ends_it_at_once(hub):
    watch, seen = taking("answer")
    for delay, msg in ((0.01, "stale"), (0.05, "answer"), (0.1, "after")):
        hub.loop.call_later(delay, hub.offer, "link", msg)
    t0 = time.monotonic()
    assert hub.wait(watch, 5) == "answer"
    assert time.monotonic() - t0 < 2
    assert seen == ["stale", "answer"] and hub.watch is None
    time.sleep(0.1)
    hub.run(asyncio.sleep(0.01), 5)  # the loop runs again: the late message goes to the inbox, not the watch
    assert hub.inbox.get_nowait() == ("link", "after") and seen == ["stale", "answer"]


def test_what_the_watch_raises_is_raised_by_wait(hub):
    watch, _ = taking("answer")
    hub.loop.call_later(0.01, hub.offer, "a link", "boom")
    with pytest.raises(Boom):
        hub.wait(watch, 5)
    hub.offer("link", "boom")  # also for a message already queued
    with pytest.raises(Boom):
        hub.wait(watch, 5)


def test_no_answer_is_a_timeout_within_its_bound(hub):
    watch, _ = taking("answer")
    t0 = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        hub.wait(watch, 0.2)
    assert 0.15 < time.monotonic() - t0 < 3
    hub.loop.call_later(0.01, hub.offer, "link", "answer")  # the hub works on afterwards
    assert hub.wait(watch, 5) == "answer"


def test_a_wait_times_out_whatever_alarm_the_last_one_left(hub):
    """One alarm serves every wait (Hub._ring): a later wait with a shorter timeout, and one that
    finds the alarm cancelled (as Ctrl-C at the wrong moment could leave it), still time out."""
    watch, _ = taking("answer")
    for before, left in ((30, "as it was"), (0.3, "cancelled")):
        hub.loop.call_later(0.01, hub.offer, "link", "answer")
        assert hub.wait(watch, before) == "answer"  # leaves an alarm ``before`` s out
        if left == "cancelled":
            hub._alarm.cancel()
            hub.loop.call_later(3, hub.offer, "link", "answer")  # (bounds the wait if no alarm rings)
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            hub.wait(watch, 0.5)
        assert 0.45 < time.monotonic() - t0 < 2.5, left


def test_the_send_runs_first_and_its_failure_ends_the_wait(hub):
    watch, _ = taking("answer")
    order = []

    async def send_ok():
        order.append("sent")
        hub.loop.call_soon(hub.offer, "link", "answer")

    assert hub.wait(watch, 5, send_ok) == "answer" and order == ["sent"]

    async def send_fails():
        raise ConnectionResetError("gone")

    with pytest.raises(ConnectionResetError):
        hub.wait(watch, 5, send_fails)


def test_no_send_is_made_when_the_answer_was_queued(hub):
    watch, _ = taking("answer")
    hub.offer("link", "answer")  # (it cannot be, for a fresh step: still)
    made = []
    assert hub.wait(watch, 5, lambda: made.append(1)) == "answer" and not made


def test_ctrl_c_during_the_wait_leaves_nothing_pending(hub, recwarn):
    """KeyboardInterrupt while the loop runs, the send not yet started: no coroutine left never
    awaited, no task pending, and the hub serves the session's close afterwards."""
    watch, _ = taking("answer")

    def interrupt():
        raise KeyboardInterrupt

    async def send():
        await asyncio.sleep(0)

    for delay in (None, 0.01):  # before the send's first step, and while the loop waits
        if delay is None:
            hub.loop.call_soon(interrupt)
        else:
            hub.loop.call_later(delay, interrupt)
        with pytest.raises(KeyboardInterrupt):
            hub.wait(watch, 5, send)
        assert hub.watch is None and not hub.loop.is_running()
        assert not [t for t in asyncio.all_tasks(hub.loop) if not t.done()]
    hub.loop.call_later(0.01, hub.offer, "link", "answer")
    assert hub.wait(watch, 5) == "answer"
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


def test_wait_from_inside_a_running_loop_runs_on_a_helper_thread(hub):
    watch, _ = taking("answer")

    async def caller():  # as the API server's handlers do
        hub.loop.call_later(0.02, hub.offer, "link", "answer")
        return hub.wait(watch, 5)

    assert asyncio.run(caller()) == "answer"
