"""swarm/tap.py: a read that is one whole binary frame goes straight to the client's hub; anything
else goes to aiohttp's own reader; whatever the reads' sizes, no message is lost, cut or put out of
order, and a real link's relayed answers take the short way."""

import asyncio
import os

import aiohttp
import numpy as np
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm import client as swarm_client
from swarm.tap import Tap
from tests.swarm.conftest import PROMPT, greedy, serve_ws, start_node
from tests.swarm.test_inflight import ws_frame

TEXT, BINARY, PING = 1, 2, 9


class Protocol:  # what aiohttp's queue asks of the connection (flow control)
    _reading_paused = False

    def pause_reading(self):
        self._reading_paused = True

    def resume_reading(self):
        self._reading_paused = False


message = st.tuples(st.sampled_from([BINARY, BINARY, TEXT, PING]),
                    st.binary(min_size=0, max_size=300),   # payload
                    st.integers(1, 3))                     # fragments (data messages)


@settings(max_examples=150, deadline=None)
@given(messages=st.lists(message, min_size=1, max_size=8), cuts=st.lists(st.integers(1, 120), max_size=30),
       frame_by_frame=st.booleans(), drains=st.lists(st.booleans(), min_size=40, max_size=40),
       big=st.booleans())
def test_every_message_arrives_once_whole_and_in_order(messages, cuts, frame_by_frame, drains, big):
    """The stream in reads of any size, or one frame per read (a one-frame binary message then
    takes the short way unless aiohttp's queue still holds an earlier message); the consumer
    (the link's reader task) drains the queue between some reads and not others."""
    loop = asyncio.new_event_loop()
    try:
        queue = WebSocketDataQueue(Protocol(), 2**20, loop=loop)
        inbox, direct = [], []
        max_size = 200 if big else 2**20  # (a larger message goes to aiohttp, which refuses it)
        tap = Tap(WebSocketReader(queue, 2**20, compress=False, decode_text=True), queue, lambda p: (inbox.append((BINARY, bytes(p))), direct.append(1)),
                  max_size)
        reads, sent = [], []
        for opcode, payload, parts in messages:
            if opcode == PING:
                reads.append(ws_frame(payload[:125], PING))
                sent.append((PING, payload[:125]))
                continue
            if opcode == TEXT:
                payload = payload.hex().encode()  # (valid UTF-8)
            bounds = np.linspace(0, len(payload), parts + 1).astype(int)
            for k in range(parts):
                reads.append(ws_frame(payload[bounds[k]:bounds[k + 1]], opcode if k == 0 else 0, k == parts - 1))
            sent.append((opcode, payload))
        stream = b"".join(reads)
        if not frame_by_frame:
            reads, at = [], 0
            for cut in cuts + [len(stream)]:
                reads.append(stream[at:at + cut])
                at += cut

        def drain():
            while queue._buffer:
                msg = loop.run_until_complete(queue.read())
                inbox.append((int(msg.type), msg.data.encode() if isinstance(msg.data, str) else bytes(msg.data)))

        for i, read in enumerate(reads):
            if read:
                eof, _ = tap.feed_data(read)
                assert not eof
            if drains[i % len(drains)]:
                drain()
        drain()
        assert inbox == sent
        if frame_by_frame and all(d for d in drains) and not big:  # every one-frame binary message went direct
            assert len(direct) == sum(1 for op, p, parts in messages if op == BINARY and parts == 1)
    finally:
        loop.close()


def test_a_read_holding_a_frame_and_the_start_of_the_next_is_left_to_aiohttp():
    """A whole frame followed by part of another, then the rest: the tap must not take the rest
    (it is the middle of a frame) even though it looks like a frame header."""
    loop = asyncio.new_event_loop()
    try:
        queue = WebSocketDataQueue(Protocol(), 2**20, loop=loop)
        direct = []
        tap = Tap(WebSocketReader(queue, 2**20, compress=False, decode_text=True), queue, direct.append, 2**20)
        inner = ws_frame(b"x" * 10)  # a payload that is itself a valid frame
        second = ws_frame(inner)
        first = ws_frame(b"a" * 5)
        tap.feed_data(first + second[:2])
        while queue._buffer:
            loop.run_until_complete(queue.read())
        tap.feed_data(second[2:])  # (exactly ``inner``)
        assert direct == []
        assert bytes(loop.run_until_complete(queue.read()).data) == inner
    finally:
        loop.close()


def test_a_links_relayed_answers_take_the_short_way(six_loader, local_greedy, monkeypatch):
    """Over real nodes relaying on their WebSockets (no lanes: swarm/lane.py answers on the client's
    lanes instead): the tap sits on every link (aiohttp's private attributes it uses have not
    moved), and relayed answers reach the hub through it, the tokens those of a local run."""
    delivered = []
    real = swarm_client.NodeLink._deliver
    monkeypatch.setattr(swarm_client.NodeLink, "_deliver", lambda self, p: (delivered.append(len(p)), real(self, p)))
    nodes = [start_node(six_loader, 0, 2, lanes=False), start_node(six_loader, 3, 5, lanes=False)]
    try:
        tm = swarm_client.distributed_text_model(six_loader, [n.url for n in nodes])
        with tm.open_session(64) as s:
            assert greedy(s, PROMPT, 5) == local_greedy(PROMPT, 5)
            for span in s.route[0].segments:
                for remote in span.spans:
                    assert isinstance(remote.link.ws._conn.protocol._payload_parser, Tap)
        assert swarm_client.timings(tm)["relayed_steps"] == 4
        assert delivered  # (each reply that came in one read, at a frame boundary: most, not all, on a loaded machine)
    finally:
        for n in nodes:
            n.stop()


def test_a_link_still_reads_what_the_tap_leaves_to_aiohttp():
    """A message over the tap's size limit, text, and the connection's close still reach the
    link's reader task through aiohttp (ws.receive)."""
    from aiohttp import web

    async def main():
        async def handler(request):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.send_bytes(b"small")
            await ws.send_bytes(os.urandom(300))
            await ws.send_str("text")
            await ws.close()
            return ws

        runner, port = await serve_ws(handler)
        got, direct = [], []
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"http://127.0.0.1:{port}/swarm")
            swarm_client.tap(ws, lambda p: (direct.append(bytes(p)), got.append(("direct", bytes(p)))), 100)
            while True:
                msg = await asyncio.wait_for(ws.receive(), 10)
                got.append((msg.type.name, msg.data))
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                    break
        await runner.cleanup()
        return got, direct

    got, direct = asyncio.run(main())
    kinds = [k for k, _ in got]
    assert kinds[-1] in ("CLOSE", "CLOSED") and "TEXT" in kinds and "BINARY" in kinds  # the 300 bytes: aiohttp's
    assert all(len(p) <= 100 for p in direct)
    assert [len(d) for k, d in got if k in ("direct", "BINARY")] == [5, 300]  # ("small" by either way)


def test_a_frame_of_the_size_limit_goes_to_aiohttp_which_refuses_it():
    """aiohttp refuses a message of max_msg_size bytes or more; the tap must not deliver one."""
    loop = asyncio.new_event_loop()
    try:
        for size, direct_expected in ((99, True), (100, False)):
            queue = WebSocketDataQueue(Protocol(), 2**20, loop=loop)
            direct = []
            tap = Tap(WebSocketReader(queue, 100, compress=False, decode_text=True), queue, direct.append, 100)
            eof, _ = tap.feed_data(ws_frame(b"x" * size))
            assert bool(direct) == direct_expected
            assert eof == (not direct_expected)  # (aiohttp's reader: message too big, the connection ends)
    finally:
        loop.close()
