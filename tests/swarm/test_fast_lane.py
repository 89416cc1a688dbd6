"""The node's fast lane on its WebSocket (NodeService.relay_now, Gate.fast): relayed decode steps
are computed and passed on from the socket's read callback, with the same tokens (the nodes here
have no lanes, swarm/lane.py, which a client would use instead: tests/swarm/test_lane.py); what it declines takes the usual
path; connections it leaves silent are not closed as idle; relay.write_now, the synchronous send
it uses, writes what aiohttp's send_bytes would (its private writer has not moved); and frames
aiohttp would refuse (reserved bits set, anything after a close) never take the lane."""

import asyncio
import os
import secrets
import socket
import time

import aiohttp
from aiohttp import web

from swarm import relay, wire
from swarm.client import distributed_text_model, timings
from swarm.inflight import Gate
from tests.swarm.conftest import PROMPT, greedy, hidden, serve_ws, start_node
from tests.swarm.test_inflight import Protocol, Reader, Roomy, ws_frame
from tests.swarm.test_node_review import raw_websocket


def count_fast(monkeypatch, nodes) -> list[list[bool]]:
    """Every relay_now verdict of each of ``nodes``, in order. (How many steps the lane takes
    depends on timing: it declines while a node's link to the next one is still connecting, the
    first step or two, longer on a loaded machine; so the tests ask for some, not for all.)"""
    verdicts = []
    for node in nodes:
        real, mine = node.service.relay_now, []

        def wrapped(data, real=real, mine=mine):
            taken = real(data)
            mine.append(taken)
            return taken

        monkeypatch.setattr(node.service, "relay_now", wrapped)
        verdicts.append(mine)
    return verdicts


def test_relayed_steps_take_the_fast_lane_with_the_same_tokens(six_loader, local_greedy, monkeypatch):
    nodes = [start_node(six_loader, a, b, lanes=False) for a, b in [(0, 1), (2, 3), (4, 5)]]
    try:
        verdicts = count_fast(monkeypatch, nodes)  # (set before the first connection: the gate reads it then)
        tm = distributed_text_model(six_loader, [n.url for n in nodes])
        with tm.open_session(64) as s:
            assert greedy(s, PROMPT, 8) == local_greedy(PROMPT, 8)
        assert timings(tm)["relayed_steps"] == 7
        assert [len(v) for v in verdicts] == [7, 7, 7]  # every relayed step came to every node's lane
        assert all(any(v) for v in verdicts), verdicts  # and each took some (see count_fast)
        assert all(n.service.served > 0 for n in nodes)
    finally:
        for n in nodes:
            n.stop()


def test_a_relay_the_lane_declines_is_answered_on_the_usual_path(six_loader, local_greedy, monkeypatch):
    """A node whose next hop does not take the output at once (its link is queued) declines, and
    the step still goes through, bit for bit."""
    nodes = [start_node(six_loader, 0, 2, lanes=False), start_node(six_loader, 3, 5, lanes=False)]
    try:
        verdicts = count_fast(monkeypatch, nodes)
        monkeypatch.setattr(nodes[0].service.relays, "can_send_now", lambda hop, size: False)
        tm = distributed_text_model(six_loader, [n.url for n in nodes])
        with tm.open_session(64) as s:
            assert greedy(s, PROMPT, 6) == local_greedy(PROMPT, 6)
        assert timings(tm)["relayed_steps"] == 5 and timings(tm)["failovers"] == 0
        assert verdicts[0] == [False] * 5 and any(verdicts[1]), verdicts  # node 1 declines, node 2 takes
    finally:
        for n in nodes:
            n.stop()


def test_connections_silent_because_of_the_lane_are_not_closed_as_idle(six_loader, local_greedy, monkeypatch):
    """idle_s of 1 s, steps 0.4 s apart for over 3 s: the first node's connection from the client,
    the second's from the first node, and the client's to the second (which only receives
    answers) all see no message of their own, and all stay open: every step relayed, no failover."""
    nodes = [start_node(six_loader, 0, 2, lanes=False, idle_s=1.0), start_node(six_loader, 3, 5, lanes=False, idle_s=1.0)]
    try:
        verdicts = count_fast(monkeypatch, nodes)
        tm = distributed_text_model(six_loader, [n.url for n in nodes])
        with tm.open_session(64) as s:
            assert greedy(s, PROMPT, 9, lambda i: time.sleep(0.4)) == local_greedy(PROMPT, 9)
        t = timings(tm)
        assert t["relayed_steps"] == 8 and t["failovers"] == 0, t
        assert all(sum(v) >= len(v) / 2 for v in verdicts), verdicts  # the connections were silent
    finally:
        for n in nodes:
            n.stop()


def test_write_now_sends_what_send_bytes_would_and_only_when_it_need_not_wait():
    async def main():
        got = []

        async def handler(request):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                got.append(bytes(msg.data))
                if len(got) == 2:
                    break
            await ws.close()
            return ws

        runner, port = await serve_ws(handler)
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"http://127.0.0.1:{port}/swarm")
            assert relay.write_now(ws, b"\x01" * 1000)  # (a client's frame: masked)
            transport = ws._writer.transport
            transport.pause_reading()  # (unrelated to writing: still writes at once)
            limit = transport.get_write_buffer_limits()[1]
            too_big = not relay.write_now(ws, b"\x02" * (limit + 1))  # would not go to the socket at once
            assert relay.write_now(ws, b"\x03" * 10)
            for _ in range(100):
                if len(got) == 2:
                    break
                await asyncio.sleep(0.05)
            await ws.close()
            assert not relay.write_now(ws, b"late")  # closed
        await runner.cleanup()
        return got, too_big

    got, too_big = asyncio.run(main())
    assert got == [b"\x01" * 1000, b"\x03" * 10] and too_big


def test_write_now_writes_a_servers_large_frame_in_one_piece():
    """A node's answer of more than 16 KiB goes to its transport in one write (aiohttp's writer
    makes two, header then payload, and the client's tap then may see the header alone), and the
    client reads it as the one binary message it is."""
    async def main():
        writes, sizes = [], (10, 2**14, 2**14 + 1, 70_000)

        async def handler(request):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            transport = ws._writer.transport
            transport.set_write_buffer_limits(high=2**20)  # (so that 70,000 bytes go at once too)
            write = transport.write
            transport.write = lambda data: (writes.append(len(data)), write(data))
            for n in sizes:
                assert relay.write_now(ws, bytes([n % 251]) * n)
            await ws.receive()  # (the client's close)
            return ws

        runner, port = await serve_ws(handler)
        got = []
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"http://127.0.0.1:{port}/swarm", max_msg_size=2**20)
            for _ in sizes:
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.BINARY
                got.append(bytes(msg.data))
            await ws.close()
        await runner.cleanup()
        return writes, got, sizes

    writes, got, sizes = asyncio.run(main())
    assert got == [bytes([n % 251]) * n for n in sizes]
    # one write per frame, header (2, 4 or 10 bytes) and payload together (then the close's reply)
    assert writes[:len(sizes)] == [12, 16388, 16389, 70010], writes


# -- what the lane must not take ----------------------------------------------------------------------
def test_a_frame_with_reserved_bits_is_refused_by_aiohttp_not_computed(six_loader):
    """No extension is negotiated, so a frame with RSV bits set is a protocol error: the lane must
    leave it to aiohttp, which closes the connection (1002), as for any other frame."""
    def read_frame(s):
        s.settimeout(10)
        head = s.recv(2, socket.MSG_WAITALL)
        n = head[1] & 0x7F
        if n >= 126:
            n = int.from_bytes(s.recv(2 if n == 126 else 8, socket.MSG_WAITALL), "big")
        return head[0], s.recv(n, socket.MSG_WAITALL) if n else b""

    node = start_node(six_loader, 0, 2)
    try:
        for first_byte in (0xC2, 0xF2):  # final, binary, with RSV1 (or all three)
            s = raw_websocket(node.port)
            sid = secrets.token_bytes(16)
            s.sendall(ws_frame(wire.encode(wire.Frame(wire.FORWARD, sid, 0, hidden(3), first_block=0, last_block=2)),
                               mask=os.urandom(4)))
            op, data = read_frame(s)
            assert op == 0x82 and wire.decode(data).type == wire.RESULT
            time.sleep(0.2)  # the handler waits idle again
            relay_frame = bytearray(ws_frame(wire.encode(wire.Frame(
                wire.RELAY, sid, 3, hidden(1, seed=4), first_block=0, last_block=2,
                body=wire.Trailer(1, []))), mask=os.urandom(4)))
            relay_frame[0] = first_byte
            served = node.service.served
            s.sendall(bytes(relay_frame))
            op, data = read_frame(s)
            assert op == 0x88 and int.from_bytes(data[:2], "big") == 1002, (hex(op), data)
            assert node.service.served == served  # not computed
            s.close()
    finally:
        node.stop()


def test_nothing_after_a_close_frame_takes_the_lane():
    taken = []
    gate = Gate(Protocol(), Reader(), Roomy(10_000), 10_000, wait_s=1.0)
    gate.fast, gate.fast_kind, gate.idle = (lambda payload: taken.append(bytes(payload)) or True), wire.RELAY, True
    relay_payload = bytes(5) + bytes([wire.RELAY]) + bytes(30)
    gate.feed_data(ws_frame(relay_payload, mask=b"\x01\x02\x03\x04"))
    assert taken == [relay_payload] and not gate.entries  # (the lane took it: its entry is done)
    gate.feed_data(ws_frame(b"\x03\xe8", opcode=8, mask=b"\x05\x06\x07\x08"))  # close
    gate.next()  # (the handler takes the close)
    gate.feed_data(ws_frame(relay_payload, mask=b"\x01\x02\x03\x04"))
    assert taken == [relay_payload]  # the one after the close went to aiohttp's reader
