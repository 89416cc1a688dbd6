"""Relayed decode steps under hostile input: garbage trailers, hops naming the node itself, a next
hop that accepts TCP and never answers the WebSocket handshake, and private swarms. Each time
the sender hears one error marked as a relay's, and the node goes on serving other sessions
exactly as the local span computes."""

import secrets
import socket
import time

import numpy as np
import pytest

from engine.model import LlamaModel
from engine.session import LocalSpanSession
from swarm import relay, wire
from swarm.client import Hub, NodeLink, RemoteSpanSession, relay_step
from tests.swarm.conftest import start_node

KEY = b"a-private-swarm-key-0123456789"


@pytest.fixture(scope="module")
def node(six_loader):
    n = start_node(six_loader, 0, 2, max_sessions=8, max_positions=32)
    yield n
    n.stop()


@pytest.fixture(scope="module")
def reference(six_loader):
    return LlamaModel(six_loader, backend="numba", layers=(0, 2))


def hidden(rows, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, 96)).astype(np.float32)


def relay_frame(session, position, rows, body, first=0, last=2):
    return wire.Frame(wire.RELAY, session, position, rows, first_block=first, last_block=last, body=body)


def next_error(link, timeout=10) -> dict:
    reply = wire.decode(link.run(link.next_message(), timeout).data, link.key)
    assert reply.type == wire.ERROR, reply
    return reply.body


def check_alive(node, reference, key=None):
    remote = RemoteSpanSession(node.url, 0, 2, 32, 96, key=key)
    local = LocalSpanSession(reference, 32)
    try:
        for chunk in (hidden(4, seed=1), hidden(1, seed=2), hidden(1, seed=3)):
            np.testing.assert_array_equal(remote.forward(chunk), local.forward(chunk))
    finally:
        remote.close()


def test_garbage_trailers_get_one_relay_error_each(node, reference):
    owner = RemoteSpanSession(node.url, 0, 2, 32, 96)
    stranger = NodeLink(node.url, dim=96, max_rows=32).connect()
    try:
        owner.forward(hidden(3))
        x, sid = hidden(1, seed=5), secrets.token_bytes(16).hex()
        good = ["ws://127.0.0.1:9/swarm", sid, 3, 5]
        for body, words in (
                ({}, "'next'"),
                ({"next": "ws://127.0.0.1:9/swarm"}, "'next'"),
                ({"next": [good] * (relay.MAX_HOPS + 1)}, "'next'"),
                ({"next": [[good[0], sid, True, 5]]}, "next[0]"),
                ({"next": [[good[0], sid, 3]]}, "next[0]"),
                ({"next": [["ws://127.0.0.1:9/other", sid, 3, 5]]}, "next[0]"),
                ({"next": [["file:///etc/passwd", sid, 3, 5]]}, "next[0]"),
                ({"next": [[good[0], "zz" * 16, 3, 5]]}, "next[0]"),
                ({"next": [[good[0], "00" * 16, 3, 5]]}, "next[0]"),
                ({"next": [[good[0], sid[:8], 3, 5]]}, "next[0]"),
                ({"next": [[good[0], sid, 5, 3]]}, "next[0]"),
                ({"next": [[good[0], sid, 0, 2**16]]}, "next[0]"),
                ({"next": [["ws://127.0.0.1:9/swarm" + "x" * 600, sid, 3, 5]]}, "next[0]"),
                ({"next": [], "elapsed_us": [-1]}, "elapsed_us"),
                ({"next": [], "elapsed_us": "7"}, "elapsed_us"),
                ({"next": [], "elapsed_us": [1]}, "compute times")):  # one row carries no earlier hop
            reply = wire.decode(stranger.exchange(wire.encode(relay_frame(owner.sid, 3, x, body)), 10))
            assert reply.type == wire.ERROR and reply.body["relay"] is True, (body, reply)
            assert reply.body["code"] == "bad_frame" and words in reply.body["message"], (body, reply.body)
        # nothing reached the owner's connection, and its session is where it was
        assert node.service.cache.sessions[owner.sid].position == 3
        local = LocalSpanSession(reference, 32)
        local.forward(hidden(3))
        np.testing.assert_array_equal(owner.forward(hidden(1, seed=6)), local.forward(hidden(1, seed=6)))
    finally:
        stranger.abort()
        owner.close()
    check_alive(node, reference)


def test_a_hop_naming_the_node_itself_ends_with_one_error(node, reference):
    """The same session twice in a row: the second hop would be at a position already held, so it
    is refused and the error comes back (through the node's link to itself) to the client."""
    owner = RemoteSpanSession(node.url, 0, 2, 32, 96)
    try:
        owner.forward(hidden(3))
        me = [node.url, owner.sid.hex(), 0, 2]
        data = wire.encode(relay_frame(owner.sid, 3, hidden(1, seed=4), {"next": [me] * 5, "elapsed_us": []}))
        owner.link.run(owner.link.ws.send_bytes(data), 5)
        body = next_error(owner.link)
        assert body["code"] == "position" and body["relay"] is True and node.url in body["message"], body
        with pytest.raises(Exception):  # and nothing else follows: no loop between the node and itself
            owner.link.run(owner.link.next_message(), 1.5)
    finally:
        owner.close()
    assert node.url in node.service.relays.links and len(node.service.relays.links) <= relay.MAX_LINKS
    check_alive(node, reference)


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
            relay_frame(owner.sid, 3, hidden(1, seed=4), {"next": [hop], "elapsed_us": []}))), 5)
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
    check_alive(node, reference)


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
                    frame = relay_frame(sa.sid, 4, hidden(1), {"next": [], "elapsed_us": []})
                    raw = stranger.exchange(wire.encode(frame, key), 10)
                    with pytest.raises(wire.WireError):
                        wire.decode(raw, key) if key else wire.decode(raw, KEY[::-1])
                    assert wire.decode(raw).body["code"] == "auth"  # readable unsigned, but says auth
                finally:
                    stranger.abort()
            assert a.service.cache.sessions[sa.sid].position == 4
            # the next node's error (a session it does not have) reaches the client signed with the key
            hop = [b.url, secrets.token_bytes(16).hex(), 3, 5]
            data = wire.encode(relay_frame(sa.sid, 4, hidden(1, seed=8), {"next": [hop], "elapsed_us": []}), KEY)
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
