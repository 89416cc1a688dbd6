"""A bound session's relays on lanes, the common case (swarm/fast_relay.py): taken once the general
path has accepted one, framed byte for byte as the general path frames it, and never taking a
frame the general path would refuse, however the frame is changed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import compute
from engine.model import LlamaModel
from swarm import manifest_sha, relay, wire
from swarm.memory import Limits
from swarm.server import NodeService
from tests.swarm.conftest import KEY, hidden

SID = bytes(range(1, 17))
NEXT = relay.Hop("ws://127.0.0.1:9/swarm", bytes(range(21, 37)), 3, 5)
AFTER = relay.Hop("ws://127.0.0.1:10/swarm", bytes(range(41, 57)), 6, 7)


class FakeLane:
    """A lane that keeps what is sent on it."""

    def __init__(self):
        self.sent: list[bytes] = []
        self.closed = False
        self.strikes = 0

    def send(self, data, framed: bool = False) -> bool:
        data = bytes(data)
        if framed:  # (with its lane's length prefix: checked, and taken off)
            assert int.from_bytes(data[:4], "little") == len(data) - 4
            data = data[4:]
        self.sent.append(data)
        return True

    def remember(self, *args) -> None:  # (as a Link: whom to tell of the next node's errors)
        pass


class FakeLaneServer:
    def __init__(self):
        self.links = {("127.0.0.1", 9): FakeLane()}


class Node:
    """A NodeService for blocks 0-2 of the six-block model, one session open at 8 positions, bound to
    a fake client lane; ``hops``: the hops its relays name after it (none: it is the last)."""

    def __init__(self, loader, hops: tuple = (), key: bytes | None = None, positions: int = 16):
        model = compute.run(LlamaModel, loader, backend="numba", layers=(0, 2))
        self.service = NodeService(model, manifest_sha(loader), Limits(), key)
        self.service.lane_server = FakeLaneServer()
        self.key, self.hops = key, hops
        self.session = self.service.cache.open(SID, object(), 0, 2, positions)
        self.client, self.incoming = FakeLane(), FakeLane()
        self.session.lane = self.client
        self.session.lane_next = ("127.0.0.1", 9) if hops else None
        compute.run(self.service._compute, self.session, hidden(8), 0, 0)  # 8 positions held

    def relay(self, rows: int = 2, step: int = 5, seed: int = 1, position: int = 8) -> bytes:
        return wire.encode(wire.Frame(wire.RELAY, SID, position, hidden(rows, seed), first_block=0, last_block=2,
                                      body=wire.Trailer(step, list(range(100, 100 + rows - 1)),
                                                        relay.pack_hops(self.hops))), self.key)

    def sent(self) -> list[bytes]:
        """What left since the last call: to the client, or on the next node's link."""
        out = self.client.sent + self.service.lane_server.links[("127.0.0.1", 9)].sent
        self.client.sent.clear()
        self.service.lane_server.links[("127.0.0.1", 9)].sent.clear()
        return out

    def feed(self, data: bytes, fast: bool = True, position: int = 8) -> list[bytes]:
        """``data`` through lane_frame at ``position``, with or without the common case; what it sent."""
        plan = self.session.fast_relay
        if not fast:
            self.session.fast_relay = None
        self.session.cache.length = position
        try:
            compute.run(self.service.lane_frame, self.incoming, memoryview(data))
        finally:
            if plan is not None:  # (else the plan the general path made stays)
                self.session.fast_relay = plan
        return self.sent()


@pytest.fixture
def steady_clock(monkeypatch):
    """A clock that moves about 1 ms per reading (2**-10 s: exact in binary, so every difference of
    two readings is the same), so that both paths time a step alike and their bytes compare."""
    now = [0.0]

    def tick() -> float:
        now[0] += 2.0 ** -10
        return now[0]

    monkeypatch.setattr(time, "perf_counter", tick)


@pytest.mark.parametrize("hops", [(), (NEXT,), (NEXT, AFTER)], ids=["last hop", "middle", "first of three"])
@pytest.mark.parametrize("key", [None, KEY], ids=["open", "private"])
def test_the_common_case_frames_what_the_general_path_frames(six_loader, steady_clock, hops, key):
    node = Node(six_loader, hops, key)
    assert node.session.fast_relay is None
    general = node.feed(node.relay(), fast=False)  # the general path accepts one, and plans the rest
    assert node.session.fast_relay is not None and len(general) == 1
    assert node.session.fast_relay.compiled == (key is None)  # (open: swarm/relay_kernel.py; private: Python)
    taken = []
    node.session.fast_relay.take = _spy(node.session.fast_relay.take, taken)
    fast = node.feed(node.relay())
    assert taken == [True], "the common case did not take a frame like the first"
    assert timeless(fast) == timeless(general)
    if key is None:  # timed by the compiled call's own clock: the blocks' time, the same in header and trailer
        assert 0 < _times(fast[0])[-1] < 10**7 and _times(fast[0])[0] == (0 if hops else _times(fast[0])[-1])
    else:
        assert fast == general
    out = wire.decode(fast[0], key, 96)
    assert out.type == (wire.RELAY if hops else wire.RELAYED) and out.array.shape == (3, 96)
    np.testing.assert_array_equal(out.array[:2], hidden(2, 1))
    if hops:
        assert out.session == NEXT.session and out.body.hops == relay.pack_hops(hops[1:])
    assert node.service.lane_steps == 2 and node.session.position == 9


def _times(data: bytes) -> tuple[int, int]:
    """A relay's compute times: the header's (the last hop's, in a RELAYED), then the trailer's last."""
    rows, cols = int.from_bytes(data[28:32], "little"), int.from_bytes(data[32:36], "little")
    at = wire.HEADER.size + rows * cols * 4 + wire.TRAILER_HEAD.size
    n = int.from_bytes(data[at - 2:at], "little")
    return int.from_bytes(data[40:44], "little"), int.from_bytes(data[at + 4 * (n - 1):at + 4 * n], "little")


def timeless(frames: list[bytes]) -> list[bytes]:
    """Open swarms' frames with this hop's compute time zeroed (in the header and the trailer), every
    other byte kept: the compiled path reads a clock the tests cannot set (a MAC'd frame: unchanged)."""
    out = []
    for data in frames:
        if wire.carries_mac(data) or data[5] not in (wire.RELAY, wire.RELAYED):
            out.append(data)
            continue
        rows, cols = int.from_bytes(data[28:32], "little"), int.from_bytes(data[32:36], "little")
        at = wire.HEADER.size + rows * cols * 4 + wire.TRAILER_HEAD.size
        n = int.from_bytes(data[at - 2:at], "little")
        data = bytearray(data)
        data[40:44] = bytes(4)
        data[at + 4 * (n - 1):at + 4 * n] = bytes(4)
        out.append(bytes(data))
    return out


def _spy(take, results: list):
    def spied(*args):
        results.append(take(*args))
        return results[-1]
    return spied


def test_a_relay_unlike_the_first_takes_the_general_path(six_loader):
    node = Node(six_loader, (NEXT,))
    node.feed(node.relay())
    plan = node.session.fast_relay
    other = lambda hops, dtype=wire.F32: wire.encode(wire.Frame(  # noqa: E731
        wire.RELAY, SID, 8, hidden(2, 1), first_block=0, last_block=2, dtype=dtype,
        body=wire.Trailer(5, [100], relay.pack_hops(hops))))
    for changed in (other((NEXT,), wire.F16),  # float16: the general path's
                    other((AFTER,)),           # other hops (the general path parses them, and plans again)
                    node.relay(position=7)):   # a step at another position (the general path refuses it)
        node.session.cache.truncate(8)
        assert not plan.take(node.service, node.session, node.incoming, memoryview(changed))
        assert node.session.position == 8 and not node.sent()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_common_case_takes_nothing_the_general_path_refuses(six_loader, steady_clock, data):
    key = data.draw(st.sampled_from([None, KEY]))
    hops = data.draw(st.sampled_from([(), (NEXT,)]))
    node = _node(six_loader, hops, key)
    frame = bytearray(node.relay(rows=2, seed=data.draw(st.integers(0, 3))))
    for _ in range(data.draw(st.integers(1, 3))):  # a few bytes changed, cut or added
        how = data.draw(st.sampled_from(["byte", "cut", "add"]))
        if how == "byte" and frame:
            at = data.draw(st.integers(0, len(frame) - 1))
            frame[at] = data.draw(st.integers(0, 255))
        elif how == "cut" and frame:
            del frame[data.draw(st.integers(0, len(frame) - 1)):]
        elif how == "add":
            frame += bytes(data.draw(st.integers(1, 8)))
    if key is not None and len(frame) > wire.MAC_LEN and data.draw(st.booleans()):
        frame[-wire.MAC_LEN:] = wire.mac(key, bytes(frame[:-wire.MAC_LEN]))  # signed again: past the MAC check
    frame = bytes(frame)
    node.session.cache.truncate(8)
    if node.session.fast_relay.take(node.service, node.session, node.incoming, memoryview(frame)):
        fast = node.sent()
        assert node.session.position == 9
        general = node.feed(frame, fast=False)
        assert timeless(fast) == timeless(general) and wire.decode(general[0], key, 96).type != wire.ERROR
    else:
        assert node.session.position == 8 and not node.sent() and node.incoming.strikes == 0


_NODES: dict = {}


def _node(loader, hops, key) -> Node:
    """One node per kind for the property test's examples (each planned by one general-path relay)."""
    if (hops, key) not in _NODES:
        node = Node(loader, hops, key)
        node.feed(node.relay(), fast=False)
        _NODES[(hops, key)] = node
    node = _NODES[(hops, key)]
    node.sent()
    return node


def test_a_taken_step_that_fails_tells_the_client_as_the_general_path_does(six_loader):
    """The next node's lane gone: the client hears the same error from either path (and runs the
    step hop by hop, which rewinds), and the session counts as used (its lanes are not swept as idle)."""
    node = Node(six_loader, (NEXT,))
    node.feed(node.relay())
    node.service.lane_server.links.clear()
    node.service.lane_server.link = lambda address: None  # (connecting again, for the steps after: not here)
    errors, positions = [], []
    for fast in (True, False):
        node.session.last_used = 0.0
        node.session.cache.truncate(8)
        plan = node.session.fast_relay
        if not fast:
            node.session.fast_relay = None
        compute.run(node.service.lane_frame, node.incoming, memoryview(node.relay()))
        node.session.fast_relay = plan
        errors.append(node.client.sent[:])
        node.client.sent.clear()
        positions.append(node.session.position)
        assert node.session.last_used > 0
    assert errors[0] == errors[1] and len(errors[0]) == 1 and positions[0] == positions[1]
    error = wire.decode(errors[0][0])
    assert error.type == wire.ERROR and error.body["code"] == "relay" and "not connected" in error.body["message"]


@pytest.mark.parametrize("norm, block, value, message", [
    ("ffn_norm", 2, 3e38, "NaN or infinity"),          # the last block's products overflow: a NaN output
    ("attn_norm", 1, np.nan, "ZeroDivisionError"),     # a block's attention divides by zero: raised in it
], ids=["output not finite", "raised in the blocks"])
def test_a_compiled_step_that_fails_in_its_blocks_tells_the_client_as_the_general_path_does(
        six_loader, norm, block, value, message):
    """Blocks that fail (a norm's weights made huge or NaN here): the same error frame to the
    client from either path, the same position after, nothing passed on."""
    node = Node(six_loader)
    node.feed(node.relay())
    assert node.session.fast_relay.compiled
    weights = getattr(node.service.view(0, 2).decoder, norm)
    kept = weights.copy()
    weights[block] = value
    try:
        answers, positions = [], []
        for fast in (True, False):
            answers.append(node.feed(node.relay(), fast=fast))
            positions.append(node.session.position)
    finally:
        weights[:] = kept
    assert answers[0] == answers[1] and len(answers[0]) == 1 and positions[0] == positions[1]
    error = wire.decode(answers[0][0])
    assert error.type == wire.ERROR and message in error.body["message"] and error.body["step"] == 5


def test_a_compiled_step_past_the_angles_table_grows_it(six_loader):
    """Positions past the RoPE table's first size (256 rows): the compiled step grows it, as the
    blocks' own call does, and frames what the general path frames."""
    node = Node(six_loader, positions=512)
    node.feed(node.relay())
    plan = node.session.fast_relay
    assert plan.compiled
    for position in (255, 256, 300, 511):
        general = node.feed(node.relay(position=position), fast=False, position=position)
        node.session.fast_relay = plan
        fast = node.feed(node.relay(position=position), position=position)
        assert len(plan.cos) > position and timeless(fast) == timeless(general)
        assert wire.decode(fast[0]).type == wire.RELAYED


def test_a_cache_grown_drops_the_plan_that_held_the_old_one(six_loader):
    """Growing a session's cache replaces it: the plan (whose compiled path holds the old K and V)
    goes with it, and the next relay, on the general path, plans anew on the new cache."""
    node = Node(six_loader)
    node.feed(node.relay())
    old = node.session.cache
    node.service.cache.reserve(node.session, old.capacity + 1)
    assert node.session.cache is not old and node.session.fast_relay is None
    node.feed(node.relay())
    plan = node.session.fast_relay
    assert plan is not None and plan.compiled
    answer = node.feed(node.relay())
    assert plan.kv is node.session.cache.k and wire.decode(answer[0]).type == wire.RELAYED
