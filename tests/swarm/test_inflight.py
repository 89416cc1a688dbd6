"""The node's in-flight budget (swarm/inflight.py): the gate passes a WebSocket byte stream on
unchanged, replaces a refused message by one empty frame, and a node whose budget is taken by one
big frame makes a second one wait (then serves it, or refuses it with `full`) while a third
session's decode steps go on, bit for bit."""

import os
import secrets
import socket
import threading
import time

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.model import LlamaModel
from engine.session import LocalSpanSession
from swarm import wire
from swarm.client import RemoteSpanSession
from swarm.inflight import REFUSED, Gate
from swarm.memory import Inflight
from tests.swarm.conftest import hidden, start_node
from tests.swarm.test_node_review import raw_websocket

DIM = 96


def test_the_budget_hands_freed_bytes_to_waiters_that_fit_oldest_first():
    budget, got = Inflight(100), []

    class Waiter:
        def __init__(self, name):
            self.name = name

        def granted(self):
            got.append(self.name)

    big, gone, small, late = Waiter("big"), Waiter("gone"), Waiter("small"), Waiter("late")
    assert budget.take(60) and not budget.take(50)
    budget.wait(50, big.granted)
    budget.wait(30, gone.granted)
    budget.wait(10, small.granted)
    budget.cancel(gone.granted)  # (another bound method object, equal to the one waiting)
    budget.release(5)            # 45 free: the big one does not fit yet, the small one behind it does
    assert got == ["small"] and budget.used == 65
    budget.wait(40, late.granted)
    budget.release(55)           # 90 free: the big one first, then what still fits
    assert got == ["small", "big", "late"] and budget.used == 100 and not budget.waiting


# -- the gate alone: a byte stream in, what aiohttp's reader would see out -----------------------------
class Reader:
    def __init__(self):
        self.data = bytearray()

    def feed_data(self, data):
        self.data += data
        return False, b""


class Protocol:
    transport = None
    _reading_paused = _buffer_paused = False


class Roomy(Inflight):
    """Room for any one frame up to the limit, however many are held (no waiting in these tests)."""

    def take(self, n):
        return n <= self.limit


def ws_frame(payload: bytes, opcode: int = 2, fin: bool = True, mask: bytes | None = None) -> bytes:
    n = len(payload)
    length = bytes([n]) if n < 126 else (bytes([126]) + n.to_bytes(2, "big") if n < 65536
                                         else bytes([127]) + n.to_bytes(8, "big"))
    head = bytes([(0x80 if fin else 0) | opcode, (0x80 if mask else 0) | length[0]]) + length[1:]
    if not mask:
        return head + payload
    masked = (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
    return head + mask + masked


message = st.tuples(st.binary(min_size=0, max_size=400),       # payload
                    st.integers(1, 3),                          # fragments
                    st.booleans(),                              # masked
                    st.booleans())                              # a ping between its fragments


@settings(max_examples=150, deadline=None)
@given(messages=st.lists(message, min_size=1, max_size=6), limit=st.integers(0, 1200),
       cuts=st.lists(st.integers(1, 200), max_size=40), frame_by_frame=st.booleans())
def test_the_gate_passes_admitted_messages_whole_and_replaces_refused_ones(messages, limit, cuts, frame_by_frame):
    """Reads of any size, or one WebSocket frame per read (a whole one-frame message takes the
    gate's short path, ``Gate._whole``): the reader sees the same stream either way."""
    max_msg = 1000  # a fragmented message is counted at the largest size a message may have
    stream, expected, refused, reads = b"", b"", [], []
    for payload, parts, masked, ping in messages:
        size = len(payload) if parts == 1 else max_msg
        bounds = np.linspace(0, len(payload), parts + 1).astype(int)
        frames, pings = b"", b""
        for k in range(parts):
            mask = os.urandom(4) if masked else None
            reads.append(ws_frame(payload[bounds[k]:bounds[k + 1]], 2 if k == 0 else 0, k == parts - 1, mask))
            frames += reads[-1]
            if ping and k < parts - 1:
                reads.append(ws_frame(b"hi", 9, True, mask))
                frames += reads[-1]
                pings += reads[-1]
        stream += frames
        expected += frames if size <= limit else pings + REFUSED  # a refused message: its pings, one empty frame
        refused.append(size > limit)
    reader = Reader()
    gate = Gate(Protocol(), reader, Roomy(limit), max_msg, wait_s=1.0)
    assert b"".join(reads) == stream
    if frame_by_frame:
        for read in reads:
            gate.feed_data(read)
    else:
        at = 0
        for cut in cuts + [len(stream)]:  # the stream in reads of any size
            gate.feed_data(stream[at:at + cut])
            at += cut
    assert bytes(reader.data) == expected
    entries = list(gate.entries)
    assert [e.refusal is not None for e in entries] == refused
    for e, (payload, parts, _, _) in zip(entries, messages):
        if e.refusal is not None and len(payload) >= 24:  # the session id, unmasked
            assert e.session == payload[8:24]
        if e.refusal is None:
            assert e.size == (len(payload) if parts == 1 else max_msg)
    assert gate.began is None  # every message arrived whole


# -- a node with a tiny budget -----------------------------------------------------------------------
def forward(rows, session, seed=0):
    return wire.encode(wire.Frame(wire.FORWARD, session, 0, hidden(rows, seed), first_block=0, last_block=2))


def send(sock, data: bytes) -> None:
    sock.sendall(ws_frame(data, mask=os.urandom(4)))


def receive(sock, timeout: float) -> wire.Frame:
    """The node's next frame on a raw WebSocket (unmasked, binary)."""
    sock.settimeout(timeout)

    def exactly(n):
        out = b""
        while len(out) < n:
            part = sock.recv(n - len(out))
            assert part, "the node closed the connection"
            out += part
        return out

    head = exactly(2)
    n = head[1] & 0x7F
    if n >= 126:
        n = int.from_bytes(exactly(2 if n == 126 else 8), "big")
    return wire.decode(exactly(n))


def until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def local_span(six_loader):
    return LocalSpanSession(LlamaModel(six_loader, backend="numba", layers=(0, 2)), 512)


BIG = 256  # rows: 98 KB frames; the budget holds one of them and some small ones, and a node's
BUDGET = 120_000  # largest frame (300 rows: 115 KB)


def test_a_second_big_frame_waits_then_is_refused_and_a_third_session_steps_on(six_loader):
    node = start_node(six_loader, 0, 2, max_positions=300, max_inflight_bytes=BUDGET, inflight_wait_s=1.5)
    try:
        a, b = raw_websocket(node.port), raw_websocket(node.port)
        sa, sb = secrets.token_bytes(16), secrets.token_bytes(16)
        frame_a = ws_frame(forward(BIG, sa, 1), mask=os.urandom(4))
        a.sendall(frame_a[:-100])  # all but its last bytes: it holds its share of the budget meanwhile
        size = len(forward(BIG, sa))
        until(lambda: node.service.inflight.used == size)
        t0, got = time.monotonic(), {}
        send(b, forward(BIG, sb, 2))  # does not fit beside it: waits, unread
        catch = threading.Thread(target=lambda: got.update(frame=receive(b, 15), at=time.monotonic()))
        catch.start()
        # a third session's prefill and decode steps fit beside the waiting one, and are exact
        remote, local = RemoteSpanSession(node.url, 0, 2, 64, DIM), local_span(six_loader)
        for rows, seed in [(8, 3), (1, 4), (1, 5), (1, 6)]:
            np.testing.assert_array_equal(remote.forward(hidden(rows, seed)), local.forward(hidden(rows, seed)))
        catch.join(20)
        refusal, waited = got["frame"], got["at"] - t0
        assert refusal.type == wire.ERROR and refusal.body["code"] == "full", refusal.body
        assert refusal.session == sb and "--max-inflight-mb" in refusal.body["message"]
        assert 1.4 < waited < 6, waited
        assert not node.service.inflight.waiting and node.service.inflight.used == size
        for rows, seed in [(1, 7), (1, 8)]:  # still exact after the refusal
            np.testing.assert_array_equal(remote.forward(hidden(rows, seed)), local.forward(hidden(rows, seed)))
        a.sendall(frame_a[-100:])  # the first frame completes and is served
        expected = local_span(six_loader).forward(hidden(BIG, 1))
        result = receive(a, 30)
        assert result.type == wire.RESULT and result.session == sa
        np.testing.assert_array_equal(result.array, expected)
        send(b, forward(BIG, sb, 2))  # the refused sender, on the same connection, is served now
        result = receive(b, 30)
        assert result.type == wire.RESULT and result.session == sb
        np.testing.assert_array_equal(result.array, local_span(six_loader).forward(hidden(BIG, 2)))
        remote.close()
        until(lambda: node.service.inflight.used == 0)  # every byte given back once answered
        a.close()
        b.close()
    finally:
        node.stop()


def test_a_waiting_frame_is_served_once_the_budget_frees(six_loader):
    node = start_node(six_loader, 0, 2, max_positions=300, max_inflight_bytes=BUDGET, inflight_wait_s=20)
    try:
        a, b = raw_websocket(node.port), raw_websocket(node.port)
        sa, sb = secrets.token_bytes(16), secrets.token_bytes(16)
        frame_a = ws_frame(forward(BIG, sa, 1), mask=os.urandom(4))
        a.sendall(frame_a[:-100])
        until(lambda: node.service.inflight.used > 0)
        send(b, forward(BIG, sb, 2))
        until(lambda: node.service.inflight.waiting)  # b waits for room
        time.sleep(0.5)
        b.settimeout(0.1)
        try:
            b.recv(1)
            raise AssertionError("b was answered while a held the budget")
        except socket.timeout:
            pass
        a.sendall(frame_a[-100:])
        results = {}

        def collect(sock, name):
            results[name] = receive(sock, 30)

        threads = [threading.Thread(target=collect, args=(s, n)) for s, n in [(a, "a"), (b, "b")]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        assert results["a"].type == results["b"].type == wire.RESULT, results
        np.testing.assert_array_equal(results["b"].array, local_span(six_loader).forward(hidden(BIG, 2)))
        until(lambda: node.service.inflight.used == 0)
        for s in (a, b):
            s.close()
    finally:
        node.stop()


def test_a_budget_below_the_largest_frame_is_refused_at_start(six_loader):
    import pytest

    from common.errors import UserError

    with pytest.raises(UserError, match=r"--max-inflight-mb .* less than one frame of --max-positions 512 rows"):
        start_node(six_loader, 0, 2, max_positions=512, max_inflight_bytes=BUDGET)


def test_senders_that_leave_mid_frame_or_while_waiting_give_their_bytes_back(six_loader):
    node = start_node(six_loader, 0, 2, max_positions=300, max_inflight_bytes=BUDGET, inflight_wait_s=20)
    try:
        a, b, c = raw_websocket(node.port), raw_websocket(node.port), raw_websocket(node.port)
        sa, sb, sc = (secrets.token_bytes(16) for _ in range(3))
        a.sendall(ws_frame(forward(BIG, sa, 1), mask=os.urandom(4))[:-100])  # admitted, never finished
        until(lambda: node.service.inflight.used > 0)
        b.sendall(ws_frame(forward(BIG, sb, 2), mask=os.urandom(4))[:5000])  # waits for a's bytes
        until(lambda: len(node.service.inflight.waiting) == 1)
        send(c, forward(BIG, sc, 3))                                         # waits behind b
        until(lambda: len(node.service.inflight.waiting) == 2)
        b.close()  # gone while waiting (the node sees it when it reads b's socket again: once granted)
        a.close()  # gone mid-frame: its bytes go to b, whose end is then seen, and so to c
        result = receive(c, 30)
        assert result.type == wire.RESULT and result.session == sc
        np.testing.assert_array_equal(result.array, local_span(six_loader).forward(hidden(BIG, 3)))
        until(lambda: node.service.inflight.used == 0 and not node.service.inflight.waiting)
        c.close()
    finally:
        node.stop()
