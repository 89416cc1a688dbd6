"""Review 14 of the relay-at-once, busy-swarm, trace and wire changes (0acdc00..98fafdd): each test
here failed on the code it was written against and says why."""

import asyncio
import os
import secrets
import socket
import time
import warnings

import numpy as np
import pytest

from swarm import relay, wire
from tests.swarm.test_relay_review import DeafWebSocket


def _fill_kernel_buffers(transport) -> int:
    """Write to the link's socket behind asyncio's back until the kernel takes no more: the state a
    next node that stopped reading leaves when the last frame written at once just filled the
    socket (asyncio's own buffer is empty, the kernel's is full). Returns the bytes written."""
    raw = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
    raw.setblocking(False)
    sent = 0
    try:
        for _ in range(4096):  # bounded: loopback socket buffers are a few MB at most
            try:
                sent += raw.send(b"\0" * 65536)
            except BlockingIOError:
                break
    finally:
        raw.close()  # closes the duplicate only
    return sent


async def _delivered(links, transport) -> None:
    """Wait (bounded) until nothing is queued or buffered for the link: the kernel took it all."""
    for _ in range(500):
        if not links.queues and (transport is None or transport.get_write_buffer_size() == 0):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("a relay to a next node that still reads was not sent within 5 s")


def test_a_relay_just_below_the_high_water_mark_is_never_waited_for():
    """RelayLinks.send writes a frame at once when the transport's buffer is empty and the frame is
    below the high-water mark, on the promise that the write "never waits". But the WebSocket
    header and the client's mask add 8 bytes: a frame of 65529..65535 bytes puts more than the
    64 KiB mark in the buffer when the kernel takes nothing, the transport pauses, and when that
    frame also crosses aiohttp's 256 KiB drain check (every fourth such frame), send_frame waits
    for drain with no timeout (the queued path has SEND_TIMEOUT; this one has none). The node's
    incoming connection (every other client's relays to this node come over it) would wait as
    long as the deaf next node likes."""

    async def go():
        deaf = DeafWebSocket()
        links = relay.RelayLinks()
        told = []

        async def tell(owner, session, code, message, step):
            told.append((code, message, step))

        links.tell = tell
        hop = relay.Hop(deaf.url, secrets.token_bytes(16), 0, 0)
        try:
            links.submit(hop, b"\1" * 100, None, bytes(16), 0)  # opens the link (through the sender)
            await _delivered(links, None)
            ws = links.links[deaf.url]
            transport, writer = ws._writer.transport, ws._writer
            size = transport.get_write_buffer_limits()[1] - 4  # below the mark: "written at once"
            for i in range(64):  # relays of that size while the next node still reads (its socket takes
                if writer._output_size + size + 8 > writer._limit:  # them): aiohttp checks for drain
                    break                                        # once per 256 KiB written; the next
                await asyncio.wait_for(links.send(hop, b"\2" * size, None, bytes(16), 1 + i), 3.0)  # crosses it
                await _delivered(links, transport)
            assert _fill_kernel_buffers(transport) > 0  # now it stops reading
            assert transport.get_write_buffer_size() == 0
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(links.send(hop, b"\2" * size, None, bytes(16), 1), 3.0)
            except asyncio.TimeoutError:
                pytest.fail(f"RelayLinks.send of a {size}-byte relay to a next node that stopped reading "
                            f"waited {time.monotonic() - t0:.1f} s (it has no timeout: it would wait forever; "
                            f"transport paused: {ws._writer.protocol._paused}, buffer "
                            f"{transport.get_write_buffer_size()} bytes)")
        finally:
            await asyncio.wait_for(links.close(), 10)
            deaf.close()

    asyncio.run(asyncio.wait_for(go(), 30))


def test_a_float64_array_beyond_float32_is_refused_with_the_clear_error_only():
    """wire.encode (0408c68) enters np.errstate(over="ignore") for float16 only: an array beyond
    float32's range cast for a float32 frame now emits numpy's "RuntimeWarning: overflow
    encountered in cast" (a stray stderr line; an exception instead of the clear ValueError where
    warnings are errors) before the ValueError that the comment says catches it. Before, none."""
    frame = wire.Frame(wire.FORWARD, secrets.token_bytes(16), 0, np.full((1, 4), 1e300), first_block=0,
                       last_block=0, dtype=wire.F32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="NaN or infinity in float32"):
            wire.encode(frame)


TRACED_NODE = """
import sys
from distribution.local import LocalLoader
from swarm.client import NodeError, query_info
from tests.swarm.conftest import start_node

node = start_node(LocalLoader(sys.argv[1]), 0, 5)
try:
    print("first_block", query_info(node.url, timeout=5)[0]["first_block"])
except NodeError as e:
    print("unusable:", e)
finally:
    node.stop()
"""


def test_a_trace_path_that_cannot_be_written_does_not_silently_break_a_node(six_store, tmp_path):
    """With GGUF_FRAGMENTS_TRACE naming a path that cannot be written (a directory that does not
    exist), trace.mark raises inside Gate.feed_data, i.e. in aiohttp's data_received: the node
    drops every connection, INFO included, and says nothing. Either the process refuses to start
    with one line naming GGUF_FRAGMENTS_TRACE, or it serves (tracing off or elsewhere)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "GGUF_FRAGMENTS_TRACE": str(tmp_path / "no-such-dir" / "trace")}
    proc = subprocess.run([sys.executable, "-c", TRACED_NODE, str(six_store)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=Path(__file__).resolve().parents[2])
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "GGUF_FRAGMENTS_TRACE" in lines[0], proc.stderr
    else:
        assert proc.stdout.split() == ["first_block", "0"], (proc.stdout, proc.stderr)


WIDE = 288  # a model width at which a relay of at most 64 hops (rows and hops to come) can reach 64 KiB


@pytest.fixture(scope="module")
def wide_loader(tmp_path_factory):
    from dataclasses import replace

    from distribution.local import LocalLoader
    from fragmenter.fragment import fragment_file
    from models.factory import ModelSpec, write_model

    tmp = tmp_path_factory.mktemp("wide")
    path = write_model(replace(ModelSpec(), dim=WIDE, n_heads=8, ffn_dim=320, name="wide"), tmp / "wide.gguf")
    fragment_file(str(path), tmp / "store", 16384, progress=False)
    return LocalLoader(tmp / "store")


def _onward(rows_in: int, step: int, pad_urls: list[str]) -> int:
    """The bytes of the RELAY a node builds from a ``rows_in``-row relay (server.NodeService.relay:
    one row more, its own compute time appended, the hops after the next one passed on)."""
    hops = relay.pack_hops(tuple(relay.Hop(u, b"\xab" * 16, 0, 1) for u in pad_urls))
    body = wire.Trailer(step, [1] * (rows_in - 1) + [777], hops)
    frame = wire.Frame(wire.RELAY, bytes(range(16)), 1, np.zeros((rows_in + 1, WIDE), np.float32), first_block=0,
                       last_block=1, body=body)
    return len(wire.encode(frame))


def _padded_url(length: int) -> str:
    """A node address of exactly ``length`` characters, padded in its host name (labels of 'p')."""
    host, rest = [], length - len("ws://:9/swarm")
    while rest > 0:
        label = min(rest, 60) if rest != 61 else 59  # (never an empty last label)
        host.append("p" * label)
        rest -= label + 1
    url = "ws://" + ".".join(host) + ":9/swarm"
    assert len(url) == length and wire.is_node_url(url), url
    return url


def test_a_deaf_next_node_does_not_hold_up_the_connection_a_relay_came_in_on(wide_loader, monkeypatch):
    """End to end: node b relays a stranger's steps to a next node that stops reading. Once b's
    socket to it is full (here: filled behind asyncio's back, the state a frame that fills it
    exactly leaves), one onward relay of 65532 bytes makes b's handler for the incoming
    connection wait in RelayLinks.send with no timeout: a FORWARD of another session on that
    same connection (every client's relays from the node before come over one connection) gets
    no answer. (The size: 56 rows at width 288 and a trailer; at SmolLM2's width 576, a relay of
    28 rows, 27 hops on, is about as large.)"""
    from swarm import server
    from swarm.client import NodeLink
    from tests.swarm.conftest import start_node

    monkeypatch.setattr(server, "_us", lambda seconds: 777)  # the node's compute time: a fixed width
    b = start_node(wide_loader, 0, 1, max_positions=256)
    deaf = DeafWebSocket()
    link = NodeLink(b.url, dim=WIDE, max_rows=256).connect()
    rng = np.random.default_rng(14)
    relays, mine, other = b.service.relays, secrets.token_bytes(16), secrets.token_bytes(16)
    rows_in, target = 55, 65532
    pad = [_padded_url(420), _padded_url(30)]  # later hops: passed on by b, never contacted (the deaf one drops them)
    pad[1] = _padded_url(30 + target - _onward(rows_in, 1, pad))
    assert _onward(rows_in, 1, pad) == target and len(pad[1]) <= 512
    try:
        for sid in (mine, other):
            link.request(wire.Frame(wire.FORWARD, sid, 0, rng.standard_normal((1, WIDE)).astype(np.float32),
                                    first_block=0, last_block=1), 30)
        deaf_session = secrets.token_bytes(16)
        hops = relay.pack_hops((relay.Hop(deaf.url, deaf_session, 0, 1),)
                               + tuple(relay.Hop(u, secrets.token_bytes(16), 0, 1) for u in pad))

        def relay_once(step):
            frame = wire.Frame(wire.RELAY, mine, step, rng.standard_normal((rows_in, WIDE)).astype(np.float32),
                               first_block=0, last_block=1,
                               body=wire.Trailer(step, [1] * (rows_in - 1), hops))
            link.run(link.ws.send_bytes(wire.encode(frame)), 5)

        def sent_all(step, timeout=10.0):
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                ws = relays.links.get(deaf.url)
                if (relays.back.get(deaf_session, (0, 0, None))[2] == step and not relays.queues  # b sent it
                        and ws is not None and ws._writer.transport.get_write_buffer_size() == 0):
                    time.sleep(0.05)  # (b's loop is between remembering the relay and writing it, at worst)
                    return ws
                time.sleep(0.02)
            try:
                said = wire.decode(link.run(link.next_message(), 1).data).body
            except Exception as e:  # noqa: BLE001
                said = repr(e)
            raise AssertionError(f"b did not pass the relays on while the next node still read: {said}")

        step = 1
        relay_once(step)  # opens b's link to the next node
        ws = sent_all(step)
        while ws._writer._output_size + target + 8 <= ws._writer._limit:  # up to aiohttp's drain check
            step += 1
            relay_once(step)
            ws = sent_all(step)
        assert _fill_kernel_buffers(ws._writer.transport) > 0  # the next node has stopped reading
        step += 1
        relay_once(step)  # b writes it "at once", and waits
        time.sleep(0.5)
        t0 = time.monotonic()
        try:
            reply = link.request(wire.Frame(wire.FORWARD, other, 1, rng.standard_normal((1, WIDE)).astype(np.float32),
                                            first_block=0, last_block=1), 5)
        except Exception as e:  # noqa: BLE001 - what the test reports
            pytest.fail(f"another session's FORWARD on the connection the relay came in on got no answer in "
                        f"{time.monotonic() - t0:.1f} s ({type(e).__name__}: {e}): b's handler waits in "
                        f"RelayLinks.send (transport paused: {ws._writer.protocol._paused})")
        assert reply.type == wire.RESULT
    finally:
        link.abort()
        deaf.close()
        b.stop()


def test_a_client_that_stops_reading_does_not_hold_up_another_nodes_link(six_loader):
    """(Not from today's diff; the same claim from the other side.) The last hop of a relay answers
    on its client's own connection (relay.send_quietly, no timeout). A stranger opens a session
    on node b, stops reading its connection, then has relays for that session sent to b over
    another connection (here a link standing for node a's, which carries every client's relays
    from a to b): once the stranger's socket is full, b's handler for that other connection waits
    for the stranger forever, and a FORWARD of another session on it gets no answer."""
    from swarm.client import NodeLink
    from tests.swarm.conftest import start_node

    b = start_node(six_loader, 3, 5, max_positions=4096)
    stranger = NodeLink(b.url, dim=96, max_rows=4096).connect()
    carrier = NodeLink(b.url, dim=96, max_rows=4096).connect()  # node a's link to b
    rng = np.random.default_rng(15)
    mine, other = secrets.token_bytes(16), secrets.token_bytes(16)
    try:
        stranger.request(wire.Frame(wire.FORWARD, mine, 0, rng.standard_normal((1, 96)).astype(np.float32),
                                    first_block=3, last_block=5), 30)
        carrier.request(wire.Frame(wire.FORWARD, other, 0, rng.standard_normal((1, 96)).astype(np.float32),
                                   first_block=3, last_block=5), 30)
        stranger.loop.call_soon_threadsafe(stranger.reader.cancel)  # the stranger stops reading
        rows = 64  # each answer: 65 rows, ~25 KB
        for i in range(600):  # ~15 MB of answers at most
            frame = wire.Frame(wire.RELAY, mine, 1 + i, rng.standard_normal((rows, 96)).astype(np.float32),
                               first_block=3, last_block=5,
                               body=wire.Trailer(i, [1] * (rows - 1)))
            try:
                carrier.run(carrier.ws.send_bytes(wire.encode(frame)), 5)
            except asyncio.TimeoutError:  # b stopped reading the carrier: enough sent
                break
        time.sleep(3)
        t0 = time.monotonic()
        try:
            reply = carrier.request(wire.Frame(wire.FORWARD, other, 1, rng.standard_normal((1, 96)).astype(np.float32),
                                               first_block=3, last_block=5), 10)
        except Exception as e:  # noqa: BLE001 - what the test reports
            pytest.fail(f"after {i} relays answered to a client that stopped reading, another session's FORWARD "
                        f"on the carrying connection got no answer in {time.monotonic() - t0:.1f} s "
                        f"({type(e).__name__}: {e})")
        assert reply.type == wire.RESULT
    finally:
        stranger.abort()
        carrier.abort()
        b.stop()
