"""A node against the 1 Dec hostile review: a client that never reads its replies, a client that
pings to keep a half-sent frame or an idle connection alive, and a relay that arrives while its
session's own multi-row step is part-way through."""

import os
import secrets
import socket
import threading
import time

import numpy as np

from swarm import wire
from swarm.client import NodeLink
from tests.swarm.conftest import close_all, hidden, start_node
from tests.swarm.test_node_review import Slow, closed_within, raw_websocket


def ws_frame(payload: bytes, opcode: int = 2, fin: bool = True) -> bytes:
    """A client's (masked) WebSocket frame (RFC 6455 5.2)."""
    n, mask = len(payload), os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    masked = (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
    return head + mask + masked


def test_a_client_that_never_reads_its_replies_is_cut_and_the_node_serves_on(six_loader):
    """Replies were sent without a time limit: once the client's socket and the node's buffer were
    full, the connection's handler waited for ever, holding the budget of the frame it was
    answering (39 such connections kept every other client out: `full`)."""
    node = start_node(six_loader, 0, 2, frame_s=1.0)
    stuck = raw_websocket(node.port)
    try:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        burst = ws_frame(wire.encode(wire.Frame(wire.INFO_REQ))) * 400
        stuck.settimeout(0.5)
        sent, deadline = 0, time.monotonic() + 30
        while time.monotonic() < deadline:  # until the node stops reading: its handler waits on a send
            try:
                stuck.sendall(burst)
            except socket.timeout:
                break
            sent += 400
        else:
            raise AssertionError(f"the node read {sent} INFO requests without its replies being read")
        time.sleep(3.0)  # past frame_s: the reply waiting to be sent is given up, the connection cut
        assert closed_within_draining(stuck, 10) < 10
        link = NodeLink(node.url).connect()
        try:
            assert link.request(wire.Frame(wire.INFO_REQ), 5).type == wire.INFO
            frame = wire.Frame(wire.FORWARD, secrets.token_bytes(16), 0, hidden(4), first_block=0, last_block=2)
            assert link.request(frame, 10).type == wire.RESULT
        finally:
            link.abort()
        deadline = time.monotonic() + 10  # (the cut connection's handler gives its bytes back on the node's loop)
        while node.service.inflight.used and time.monotonic() < deadline:
            time.sleep(0.1)
        assert node.service.inflight.used == 0
    finally:
        stuck.close()
        node.stop()


def closed_within_draining(s: socket.socket, seconds: float) -> float:
    """Seconds until the node ends the connection, reading (and dropping) what it had sent."""
    t0 = time.monotonic()
    s.settimeout(0.5)
    while time.monotonic() - t0 < seconds:
        try:
            if not s.recv(1 << 20):
                return time.monotonic() - t0
        except socket.timeout:
            continue
        except ConnectionResetError:
            return time.monotonic() - t0
    raise AssertionError(f"still open after {seconds} s")


def pinging(s: socket.socket, stop: threading.Event) -> None:
    while not stop.wait(0.3):
        try:
            s.sendall(ws_frame(b"hi", opcode=9))
        except OSError:
            return


def test_pings_keep_neither_a_half_sent_frame_nor_an_idle_connection(six_loader):
    """aiohttp's receive() restarts its timeout after each PING it answers: a client pinging every
    few seconds kept a frame begun and never finished (its share of the in-flight budget, up to a
    whole message at the first fragment) and an idle connection open for ever."""
    node = start_node(six_loader, 0, 2, frame_s=1.0, idle_s=2.0)
    half, idle, stop = raw_websocket(node.port), raw_websocket(node.port), threading.Event()
    try:
        half.sendall(ws_frame(b"\x00" * 4, fin=False))  # the first fragment of a message never finished
        for s in (half, idle):
            threading.Thread(target=pinging, args=(s, stop), daemon=True).start()
        assert closed_within_draining(half, 8) < 8
        assert closed_within_draining(idle, 8) < 8
        other = raw_websocket(node.port)  # the node still answers pings on a live connection
        other.sendall(ws_frame(b"ping?", opcode=9))
        other.settimeout(5)
        assert other.recv(64) == bytes([0x8A, 5]) + b"ping?"
        other.close()
    finally:
        stop.set()
        half.close()
        idle.close()
        node.stop()


def test_a_relay_during_its_sessions_multi_row_step_is_refused_and_the_cache_stays_right(six_loader):
    """A multi-row pass gives the loop back while it computes (between blocks in a node process, for
    the whole pass on a NodeThread's compute thread); a RELAY for the same session arriving then
    (from whoever holds its id: the node before it in the route) rewound the cache to its position
    and was computed after, into the positions the pass had filled: the session's later steps
    were wrong."""
    rows = 300  # (the model's context is 512)
    prompt, step_row = hidden(4 + rows, seed=7), hidden(1, seed=8)

    class Held(Slow):  # once armed, the pass waits (at most 30 s) until the test has had the relay's answer
        def __init__(self, span):
            super().__init__(span, 0.0)
            self.armed, self.release = threading.Event(), threading.Event()

        def forward_layers(self, x, cache, position):
            if self.armed.is_set():
                self.entered.set()
                self.release.wait(30)
            return self.span.forward_layers(x, cache, position)

    def run(node, interfere: bool):
        slow = Held(node.service.model)
        node.service.views[(0, 2)] = slow
        owner, carrier = NodeLink(node.url, dim=96, max_rows=4096).connect(), NodeLink(node.url).connect()
        sid = secrets.token_bytes(16)
        try:
            owner.request(wire.Frame(wire.FORWARD, sid, 0, prompt[:4], first_block=0, last_block=2), 30)
            long_step = wire.Frame(wire.FORWARD, sid, 4, prompt[4:], first_block=0, last_block=2)
            result = []
            if interfere:
                slow.armed.set()
            worker = threading.Thread(target=lambda: result.append(owner.request(long_step, 60)))
            worker.start()
            refused = None
            if interfere:
                assert slow.entered.wait(10)
                relay = wire.Frame(wire.RELAY, sid, 4, step_row, first_block=0, last_block=2,
                                   body=wire.Trailer(1, []))
                try:
                    refused = wire.decode(carrier.exchange(wire.encode(relay), 10))
                finally:
                    slow.release.set()
            worker.join(60)
            after = owner.request(wire.Frame(wire.FORWARD, sid, 4 + rows, step_row, first_block=0, last_block=2), 30)
            return result[0].array, after.array, refused
        finally:
            owner.abort()
            carrier.abort()

    node = start_node(six_loader, 0, 2, max_positions=4096)
    try:
        alone = run(node, interfere=False)
        raced = run(node, interfere=True)
    finally:
        node.stop()
    assert raced[2].type == wire.ERROR and raced[2].body["code"] == "busy"
    assert "part-way through a step" in raced[2].body["message"]
    np.testing.assert_array_equal(raced[0], alone[0])
    np.testing.assert_array_equal(raced[1], alone[1])


def test_black_hole_next_hops_do_not_hold_up_a_new_link_to_an_honest_node(six_loader):
    """A stranger's relays naming over a hundred next hops that accept TCP and never answer the
    handshake held every slot of the links' connection pool (aiohttp's default: 100) for the 5 s
    connect timeout; a victim whose route needed a new link from that node waited for a slot, past
    its client's patience for a relay (2 s)."""
    from swarm.client import Hub, RemoteSpanSession, relay_step
    from tests.swarm.test_relay_review import relay_frame

    holes = []
    for _ in range(110):
        hole = socket.socket()
        hole.bind(("127.0.0.1", 0))
        hole.listen(4)
        holes.append(hole)
    a, b = start_node(six_loader, 0, 2, max_positions=256), start_node(six_loader, 3, 5)
    victim_hub, stranger_hub = Hub(), Hub()
    rng = np.random.default_rng(3)
    x = lambda rows=1: rng.standard_normal((rows, 96)).astype(np.float32)  # noqa: E731
    spans = []
    try:
        spans = [RemoteSpanSession(a.url, 0, 2, 64, 96, hub=victim_hub),
                 RemoteSpanSession(b.url, 3, 5, 64, 96, hub=victim_hub),
                 RemoteSpanSession(a.url, 0, 2, 256, 96, hub=stranger_hub)]
        va, vb, stranger = spans
        vb.forward(va.forward(x(3)))  # (hop by hop: node a has no link to b yet)
        stranger.forward(x(1))
        for i, hole in enumerate(holes):  # each relay's output goes on to a black hole of its own
            url = f"ws://127.0.0.1:{hole.getsockname()[1]}/swarm"
            frame = relay_frame(stranger.sid, 1 + i, x(), [(url, secrets.token_bytes(16), 3, 5)], step=100 + i)
            stranger.link.run(stranger.link.ws.send_bytes(wire.encode(frame)), 5)
        time.sleep(0.5)
        relay_step([va, vb], x(), timeout=2.0)  # node a opens its link to b now
    finally:
        close_all(spans, (victim_hub, stranger_hub), (a, b))
        for hole in holes:
            hole.close()


def test_one_clients_waiting_relays_cannot_take_the_whole_queue():
    """Relays to a next node without an open link wait in its queue while the link connects (up to
    5 s for a black hole). One client naming sixteen black holes filled all 1024 places: every other
    client's relays needing a new link were refused ('1024 relays already wait')."""
    import asyncio

    import pytest

    from swarm import relay

    class Owner:  # a client's connection, as the links see it
        def __init__(self):
            self.sent = []

        async def send_bytes(self, data):
            self.sent.append(data)

    async def scenario():
        links, stranger, victim = relay.RelayLinks(), Owner(), Owner()
        closed = []
        for _ in range(16):  # ports nothing listens on: a connect is refused at once
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                closed.append(s.getsockname()[1])
        holes = [relay.Hop(f"ws://127.0.0.1:{port}/swarm", secrets.token_bytes(16), 3, 5) for port in closed]
        for i in range(relay.OWNER_WAITING):
            links.submit(holes[i % 16], b"x", stranger, bytes(16), i)
        with pytest.raises(relay.RelayError, match="of this client already wait"):
            links.submit(holes[0], b"x", stranger, bytes(16), 99)
        links.submit(holes[1], b"y", victim, bytes(16), 100)  # another client's relay still queues
        counts = (links.waiting, dict(links.waiting_by_owner))
        for _ in range(200):  # the ports refuse: every relay fails, is told to its client, leaves its place
            if not links.waiting:
                break
            await asyncio.sleep(0.05)
        after = (links.waiting, links.waiting_by_owner)
        await links.close()
        return counts, after, (stranger, victim)

    (waiting, by_owner), after, (stranger, victim) = asyncio.run(scenario())
    assert waiting == relay.OWNER_WAITING + 1
    assert by_owner == {id(stranger): relay.OWNER_WAITING, id(victim): 1}
    assert after == (0, {})
    assert len(stranger.sent) == relay.OWNER_WAITING and len(victim.sent) == 1  # each told its relay failed
