"""Relayed decode steps under hostile input: garbage trailers, hops naming the node itself, a next
hop that accepts TCP and never answers the WebSocket handshake, and private swarms. Each time
the sender hears one error marked as a relay's, and the node goes on serving other sessions
exactly as the local span computes. Then a flaky network and strangers: a relay held in the
network past its client's patience is never taken for a later step's answer and never leaves a
cache wrong; a next hop that is a black hole, or stops reading, holds up only the relays to it."""

import asyncio
import contextlib
import secrets
import socket
import threading
import time

import numpy as np
import pytest

from engine.model import LlamaModel
from engine.session import LocalSpanSession
from swarm import relay, wire
from swarm.client import Hub, NodeLink, RelayFailed, RemoteSpanSession, relay_step
from tests.swarm.conftest import KEY, check_alive, close_all, hidden, start_node


@pytest.fixture(scope="module")
def node(six_loader):
    n = start_node(six_loader, 0, 2, max_sessions=8, max_positions=32)
    yield n
    n.stop()


def relay_frame(session, position, rows, hops=(), elapsed=(), step=5, first=0, last=2):
    """A RELAY: ``hops`` as (url, session hex or bytes, first, last) tuples, or already packed."""
    if not isinstance(hops, bytes):
        hops = relay.pack_hops(tuple(relay.Hop(url, bytes.fromhex(sid) if isinstance(sid, str) else sid, a, b)
                                     for url, sid, a, b in hops))
    return wire.Frame(wire.RELAY, session, position, rows, first_block=first, last_block=last,
                      body=wire.Trailer(step, list(elapsed), hops))


def with_trailer(session, position, rows, trailer: bytes, first=0, last=2) -> bytes:
    """A RELAY's bytes whose trailer is ``trailer``, whatever it holds."""
    frame = relay_frame(session, position, rows, first=first, last=last, elapsed=[0] * (len(rows) - 1))
    data = bytearray(wire.encode(frame))
    data[44:48] = (rows.nbytes + len(trailer)).to_bytes(4, "little")
    return bytes(data[:wire.HEADER.size + rows.nbytes]) + trailer


def next_error(link, timeout=10) -> dict:
    reply = wire.decode(link.run(link.next_message(), timeout).data, link.key)
    assert reply.type == wire.ERROR, reply
    return reply.body


def test_garbage_trailers_get_one_relay_error_each(node, reference):
    owner = RemoteSpanSession(node.url, 0, 2, 32, 96)
    stranger = NodeLink(node.url, dim=96, max_rows=32).connect()
    try:
        owner.forward(hidden(3))
        x, sid = hidden(1, seed=5), secrets.token_bytes(16)
        head = wire.TRAILER_HEAD.pack(5, 0)

        def hop(url=b"ws://127.0.0.1:9/swarm", session=sid, first=3, last=5) -> bytes:
            return wire.HOP_HEAD.pack(session, first, last, len(url)) + url

        for trailer, words in (
                (b"", "trailer is 0 bytes"),
                (head[:-1], "trailer is 9 bytes"),
                (wire.TRAILER_HEAD.pack(5, 1) + bytes(4), "compute times"),  # one row carries no earlier hop
                (wire.TRAILER_HEAD.pack(2**63, 0), "step"),
                (wire.TRAILER_HEAD.pack(2**64 - 1, 0), "step"),
                (head + hop() * (relay.MAX_HOPS + 1), "at most 64 hops"),
                (head + hop() * relay.MAX_HOPS, "runs at most 64 hops; this one 65"),  # with this one's
                (head + hop(b"ws://127.0.0.1:9/swarm" + b"x" * 500), "at most 512"),
                (head + hop(b"ws://127.0.0.1:9/other"), "next[0]"),
                (head + hop(b"file:///etc/passwd"), "next[0]"),
                (head + hop(session=bytes(16)), "next[0]"),
                (head + hop(first=5, last=3), "next[0]"),
                (head + hop(b"ws://127.0.0.1:9/swarm" + b"x" * 600), "next[0]"),
                (head + hop(b"ws://127.0.0.1:9/sw\xffrm"), "next[0]"),
                (head + hop()[:-3], "next[0]"),
                (head + hop() + hop()[:5], "next[1]")):
            reply = wire.decode(stranger.exchange(with_trailer(owner.sid, 3, x, trailer), 10))
            assert reply.type == wire.ERROR and reply.body["relay"] is True, (trailer, reply)
            assert reply.body["code"] == "bad_frame" and words in reply.body["message"], (trailer, reply.body)
        # nothing reached the owner's connection, and its session is where it was
        assert node.service.cache.sessions[owner.sid].position == 3
        local = LocalSpanSession(reference, 32)
        local.forward(hidden(3))
        np.testing.assert_array_equal(owner.forward(hidden(1, seed=6)), local.forward(hidden(1, seed=6)))
    finally:
        stranger.abort()
        owner.close()
    check_alive(node, reference, prompt_rows=4)


def test_a_hop_naming_the_node_itself_ends_with_one_error(node, reference):
    """The same session twice in a row: the second hop would be at a position already held, so it
    is refused and the error comes back (through the node's link to itself) to the client."""
    owner = RemoteSpanSession(node.url, 0, 2, 32, 96)
    try:
        owner.forward(hidden(3))
        me = (node.url, owner.sid, 0, 2)
        data = wire.encode(relay_frame(owner.sid, 3, hidden(1, seed=4), [me] * 5))
        owner.link.run(owner.link.ws.send_bytes(data), 5)
        body = next_error(owner.link)
        assert body["code"] == "position" and body["relay"] is True and node.url in body["message"], body
        with pytest.raises(Exception):  # and nothing else follows: no loop between the node and itself
            owner.link.run(owner.link.next_message(), 1.5)
    finally:
        owner.close()
    assert node.url in node.service.relays.links and len(node.service.relays.links) <= relay.MAX_LINKS
    check_alive(node, reference, prompt_rows=4)


def test_a_next_hop_that_never_answers_the_handshake(node, reference):
    """TCP accepted, no WebSocket answer: the client hears 'relay' after the connect timeout, and
    meanwhile other connections' sessions are served at once."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)  # the kernel completes the TCP handshake; no one ever reads
    url = f"ws://127.0.0.1:{hole.getsockname()[1]}/swarm"
    owner = RemoteSpanSession(node.url, 0, 2, 32, 96)
    try:
        owner.forward(hidden(3))
        hop = [url, secrets.token_bytes(16).hex(), 3, 5]
        t0 = time.monotonic()
        owner.link.run(owner.link.ws.send_bytes(wire.encode(
            relay_frame(owner.sid, 3, hidden(1, seed=4), [hop]))), 5)
        other = RemoteSpanSession(node.url, 0, 2, 32, 96)  # another client, meanwhile
        local = LocalSpanSession(reference, 32)
        try:
            for seed in range(3):
                t1 = time.monotonic()
                np.testing.assert_array_equal(other.forward(hidden(2, seed)), local.forward(hidden(2, seed)))
                assert time.monotonic() - t1 < relay.CONNECT_TIMEOUT / 2
        finally:
            other.close()
        body = next_error(owner.link, relay.CONNECT_TIMEOUT + 10)
        waited = time.monotonic() - t0
        assert body["code"] == "relay" and "cannot connect" in body["message"] and body["relay"] is True, body
        assert relay.CONNECT_TIMEOUT - 0.5 <= waited <= relay.CONNECT_TIMEOUT + 10
        assert url not in node.service.relays.links
    finally:
        owner.close()
        hole.close()
    check_alive(node, reference, prompt_rows=4)


def test_private_swarm_relays_need_the_key_and_errors_come_back_signed(six_loader):
    a, b = start_node(six_loader, 0, 2, key=KEY), start_node(six_loader, 3, 5, key=KEY)
    hub = Hub()
    try:
        sa = RemoteSpanSession(a.url, 0, 2, 32, 96, key=KEY, hub=hub)
        sb = RemoteSpanSession(b.url, 3, 5, 32, 96, key=KEY, hub=hub)
        try:
            sb.forward(sa.forward(hidden(3)))
            rows = relay_step([sa, sb], hidden(1, seed=7), timeout=20)
            assert rows.shape == (3, 96) and sa.position == sb.position == 4
            # without the key (or with another one): refused, and the session is untouched
            for key in (None, b"another-key-of-enough-length-000"):
                stranger = NodeLink(a.url, key=key, dim=96, max_rows=32).connect()
                try:
                    frame = relay_frame(sa.sid, 4, hidden(1))
                    raw = stranger.exchange(wire.encode(frame, key), 10)
                    with pytest.raises(wire.WireError):
                        wire.decode(raw, key) if key else wire.decode(raw, KEY[::-1])
                    assert wire.decode(raw).body["code"] == "auth"  # readable unsigned, but says auth
                finally:
                    stranger.abort()
            assert a.service.cache.sessions[sa.sid].position == 4
            # the next node's error (a session it does not have) reaches the client signed with the key
            hop = (b.url, secrets.token_bytes(16), 3, 5)
            data = wire.encode(relay_frame(sa.sid, 4, hidden(1, seed=8), [hop]), KEY)
            sa.link.run(sa.link.ws.send_bytes(data), 5)
            body = next_error(sa.link)  # decoded with the key: a forged or unsigned one would raise
            assert body["code"] == "unknown_session" and b.url in body["message"] and body["relay"] is True
        finally:
            sa.close()
            sb.close()
    finally:
        hub.close()
        a.stop()
        b.stop()


def test_ctrl_c_mid_relay_then_hop_by_hop_gives_local_values(six_loader, reference):
    """Ctrl-C while a relayed step waits: the step then run hop by hop (as SwarmRoute does) skips
    the late relay's answer and computes what the local spans do; closing frees both nodes."""
    import os
    import signal
    import threading

    a, b = start_node(six_loader, 0, 2), start_node(six_loader, 3, 5)
    slow = b.service._compute
    b.service._compute = lambda *args: (time.sleep(1.5 if args[1].shape[0] == 1 else 0), slow(*args))[1]
    mirror_a, mirror_b = LocalSpanSession(reference, 32), LocalSpanSession(LlamaModel(six_loader, backend="numba",
                                                                                        layers=(3, 5)), 32)
    hub = Hub()
    try:
        sa = RemoteSpanSession(a.url, 0, 2, 32, 96, hub=hub)
        sb = RemoteSpanSession(b.url, 3, 5, 32, 96, hub=hub)
        sb.forward(sa.forward(hidden(3)))
        mirror_b.forward(mirror_a.forward(hidden(3)))
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            relay_step([sa, sb], hidden(1, seed=11), timeout=20)
        timer.join()
        assert sa.position == sb.position == 3  # nothing counted
        x = hidden(1, seed=12)  # the step hop by hop, with another input than the interrupted relay's
        np.testing.assert_array_equal(sb.forward(sa.forward(x)), mirror_b.forward(mirror_a.forward(x)))
        x = hidden(1, seed=13)  # and a relayed one after it
        rows = relay_step([sa, sb], x, timeout=20)
        np.testing.assert_array_equal(rows[0], x[0])
        np.testing.assert_array_equal(rows[2:], mirror_b.forward(mirror_a.forward(x)))
        sa.close()
        sb.close()
        deadline = time.monotonic() + 10
        while (a.service.cache.sessions or b.service.cache.sessions) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not a.service.cache.sessions and not b.service.cache.sessions
    finally:
        hub.close()
        a.stop()
        b.stop()


class SlowProxy:
    """TCP proxy on 127.0.0.1 forwarding to ``port`` with ``delay`` seconds of latency (order kept)."""

    def __init__(self, port: int):
        self.delay, self.port_to = 0.0, port
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def pipe(r, w):
            try:
                while data := await r.read(65536):
                    await asyncio.sleep(self.delay)
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        async def handle(r, w):
            r2, w2 = await asyncio.open_connection("127.0.0.1", self.port_to)
            asyncio.ensure_future(pipe(r, w2))
            asyncio.ensure_future(pipe(r2, w))

        async def begin():
            self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()

        def run():
            self.loop.run_until_complete(begin())
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def stop(self):
        async def end():
            self.server.close()
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()
        asyncio.run_coroutine_threadsafe(end(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_a_late_relay_is_not_taken_as_a_later_steps_answer(six_loader):
    """A relay held in the network past its client's patience, then a rewind and a new relay at the
    same position: the late relay's answer is never taken for the new step's (its step number
    differs), and whatever the late relay did to a node's cache, the steps that follow (relayed,
    or hop by hop after a refused relay, as SwarmRoute does) compute exactly what local spans do."""
    from engine.model import LlamaModel
    from engine.session import LocalSpanSession

    a, b = start_node(six_loader, 0, 2), start_node(six_loader, 3, 5)
    proxy = SlowProxy(b.port)  # the network between node a and node b
    hub = Hub()
    la = LocalSpanSession(LlamaModel(six_loader, backend="numba", layers=(0, 2)), 32)
    lb = LocalSpanSession(LlamaModel(six_loader, backend="numba", layers=(3, 5)), 32)
    rng = np.random.default_rng(0)
    x = lambda: rng.standard_normal((1, 96)).astype(np.float32)  # noqa: E731

    def step(h):  # relayed if it can be, else hop by hop: SwarmRoute.forward
        try:
            rows = relay_step([sa, sb], h, timeout=10)
            assert np.array_equal(rows[0], h[0]), "relay_step returned another step's rows"
            return rows[-1:]
        except RelayFailed:
            return sb.forward(sa.forward(h))

    try:
        sa = RemoteSpanSession(a.url, 0, 2, 32, 96, hub=hub)
        sb = RemoteSpanSession(b.url, 3, 5, 32, 96, hub=hub)
        sb.url = f"ws://127.0.0.1:{proxy.port}/swarm"  # node a reaches node b through the slow network
        prompt = rng.standard_normal((5, 96)).astype(np.float32)
        np.testing.assert_array_equal(sb.forward(sa.forward(prompt)), lb.forward(la.forward(prompt)))
        h = x()
        np.testing.assert_array_equal(step(h), lb.forward(la.forward(h)))  # position 6 now
        proxy.delay = 1.5
        x_old = x()
        with pytest.raises(RelayFailed):
            relay_step([sa, sb], x_old, timeout=0.5)  # stuck between a and b
        sb.forward(sa.forward(x_old))  # what SwarmRoute does then: the step hop by hop (both at 7)
        for s in (sa, sb, la, lb):  # a rewind (a chat turn that edits history), then FORWARDs
            s.rewind(5)
        h = x()
        np.testing.assert_array_equal(sb.forward(sa.forward(h)), lb.forward(la.forward(h)))  # both at 6
        for _ in range(3):  # position 6 again (the late relay arrives meanwhile), then 7 and 8
            h = x()
            np.testing.assert_array_equal(step(h), lb.forward(la.forward(h)))
        proxy.delay = 0.0
        h = x()
        np.testing.assert_array_equal(step(h), lb.forward(la.forward(h)))
    finally:
        sa.close()
        sb.close()
        hub.close()
        proxy.stop()
        a.stop()
        b.stop()


@contextlib.contextmanager
def victim_and_stranger(loader, capacity: int, seed: int):
    """Nodes a (blocks 0-2) and b (3-5), and two clients of an open swarm, each with a session of
    ``capacity`` positions on both, three positions in; the victim has relayed one step. Yields
    a, b, the victim's spans, the stranger's spans, and x(rows=1): hidden states drawn from ``seed``."""
    a, b = start_node(loader, 0, 2), start_node(loader, 3, 5)
    victim_hub, stranger_hub = Hub(), Hub()
    rng = np.random.default_rng(seed)
    x = lambda rows=1: rng.standard_normal((rows, 96)).astype(np.float32)  # noqa: E731
    spans = []
    try:
        for hub in (victim_hub, stranger_hub):
            spans += [RemoteSpanSession(a.url, 0, 2, capacity, 96, hub=hub),
                      RemoteSpanSession(b.url, 3, 5, capacity, 96, hub=hub)]
        va, vb, ta, tb = spans
        vb.forward(va.forward(x(3)))
        tb.forward(ta.forward(x(3)))
        relay_step([va, vb], x(), timeout=10)  # the victim relays fine: node a's link to b is open
        yield a, b, (va, vb), (ta, tb), x
    finally:
        close_all(spans, (victim_hub, stranger_hub), (a, b))


def test_a_strangers_black_hole_hop_does_not_stall_others_relays(six_loader):
    """Open swarm: a stranger with its own sessions on nodes a and b relays a -> b -> (a TCP port that
    never answers the handshake). Node b handles the frames of its one connection from node a in
    order; it must not wait CONNECT_TIMEOUT (5 s) on the black hole there (relay.RelayLinks queues
    the onward send), or every other client's relay from a to b would wait behind it."""
    import secrets
    import socket

    from swarm import wire

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    try:
        with victim_and_stranger(six_loader, 32, seed=1) as (a, b, (va, vb), (ta, tb), x):
            hole_url = f"ws://127.0.0.1:{hole.getsockname()[1]}/swarm"
            hops = [(b.url, tb.sid, 3, 5), (hole_url, secrets.token_bytes(16), 0, 0)]
            frame = relay_frame(ta.sid, 3, x(), hops, step=7)
            ta.link.run(ta.link.ws.send_bytes(wire.encode(frame)), 5)
            time.sleep(0.3)
            t0 = time.monotonic()
            try:
                relay_step([va, vb], x(), timeout=2.0)  # RELAY_MIN_S: what SwarmRoute allows a fast relay
            except RelayFailed as e:
                pytest.fail(f"the victim's relay waited behind the stranger's black hole: {e} "
                            f"after {time.monotonic() - t0:.1f} s")
    finally:
        hole.close()


class DeafWebSocket:
    """Answers the WebSocket handshake on 127.0.0.1, then never reads another byte."""

    def __init__(self):
        import base64
        import hashlib
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.conns, self.url = [], f"ws://127.0.0.1:{self.sock.getsockname()[1]}/swarm"

        def serve():
            while True:
                try:
                    c, _ = self.sock.accept()
                except OSError:
                    return
                c.settimeout(5)
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    head += c.recv(4096)
                key = [ln.split(b":", 1)[1].strip() for ln in head.split(b"\r\n")
                       if ln.lower().startswith(b"sec-websocket-key:")][0]
                accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
                c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
                self.conns.append(c)  # kept open, never read

        threading.Thread(target=serve, daemon=True).start()

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def test_a_next_hop_that_stops_reading_does_not_stall_a_node_link_forever(six_loader):
    """Open swarm: a stranger relays a -> b -> (a WebSocket that stops reading). Once the socket
    buffers are full, node b's sends to it would wait forever: they must hold up neither b's
    connection from a (every other client's relays from a to b come over it) nor anything else for
    long (a send waits at most relay.SEND_TIMEOUT). The victim's relays go on working."""
    import secrets

    from swarm import wire

    deaf = DeafWebSocket()
    try:
        with victim_and_stranger(six_loader, 4096, seed=2) as (a, b, (va, vb), (ta, tb), x):
            hops = [(b.url, tb.sid, 3, 5), (deaf.url, secrets.token_bytes(16), 0, 0)]
            for i in range(600):  # ~26 KB per frame to the deaf hop (65 rows + 1): ~15 MB at most
                frame = relay_frame(ta.sid, 3 + i, x(64), hops, elapsed=[1] * 63, step=i)
                try:
                    ta.link.run(ta.link.ws.send_bytes(wire.encode(frame)), 5)
                except asyncio.TimeoutError:  # the stranger's own connection to a backs up: enough sent
                    break
            print(f"stranger sent {i} relays")
            time.sleep(10)
            held = b.service.cache.sessions[tb.sid].position
            time.sleep(3)
            print(f"stranger's session on b: {held} positions at 10 s, "
                  f"{b.service.cache.sessions[tb.sid].position} at 13 s, positions")
            failures = 0
            for _ in range(3):
                try:
                    relay_step([va, vb], x(), timeout=2.0)
                    break
                except RelayFailed:
                    failures += 1
                    vb.forward(va.forward(x()))  # hop by hop, as SwarmRoute does
            assert failures == 0, f"{failures} victim relays in a row failed, the last ones 10 s after the stranger stopped"
    finally:
        deaf.close()


def test_a_late_relays_error_does_not_fail_the_next_relay(six_loader):
    """A relay given up on and then refused late by node b ("a relayed step appends") sends a relay
    ERROR to the client; it names its step, so the client's next relayed step does not take it for
    its own failure."""
    a, b = start_node(six_loader, 0, 2), start_node(six_loader, 3, 5)
    proxy = SlowProxy(b.port)
    hub = Hub()
    rng = np.random.default_rng(3)
    x = lambda: rng.standard_normal((1, 96)).astype(np.float32)  # noqa: E731
    spans = []
    try:
        sa = RemoteSpanSession(a.url, 0, 2, 32, 96, hub=hub)
        sb = RemoteSpanSession(b.url, 3, 5, 32, 96, hub=hub)
        spans = [sa, sb]
        sb.url = f"ws://127.0.0.1:{proxy.port}/swarm"
        sb.forward(sa.forward(rng.standard_normal((5, 96)).astype(np.float32)))
        relay_step([sa, sb], x(), timeout=10)
        proxy.delay = 1.5
        x_old = x()
        with pytest.raises(RelayFailed):
            relay_step([sa, sb], x_old, timeout=0.5)
        sb.forward(sa.forward(x_old))  # hop by hop, as SwarmRoute does
        time.sleep(2.5)  # the late relay reaches b, which refuses it: every node is healthy again
        proxy.delay = 0.0
        relay_step([sa, sb], x(), timeout=10)  # succeeds: the late relay's error names another step
    finally:
        for s in spans:
            s.close()
        hub.close()
        proxy.stop()
        a.stop()
        b.stop()
