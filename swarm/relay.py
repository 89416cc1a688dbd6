"""Relayed decode steps: each node hands its output straight to the next node of the route.

A client-routed step crosses the network twice per node (client -> node -> client). A relayed
one crosses it once per node plus once back:

    client --RELAY(rows: x)--> node 1 --RELAY(x, y1)--> node 2 --RELAY(x, y1, y2)--> node 3
    client <--RELAYED(x, y1, y2, y3, compute times)-- node 3   (on the client's own connection)

Each RELAY names the node's session (opened by the client with a FORWARD, as for any step) and
carries, in its binary trailer (wire.Trailer), the hops still to run, packed: session id, first
block, last block, URL.
The rows grow by one per hop, so the client gets every span's input back with the output: the
replay history that failover needs. A node that cannot run or pass on a step tells the client
with an ERROR on the client's own connection to it; the client then runs that step hop by hop,
which finds the failing node and fails over as usual (swarm/route.py). Decode steps only (one
row computed per hop): a prompt's pass is long enough that the extra crossings do not count.

This module holds the pieces on the node's side: the trailer's checks, and the node's own
connections to the next nodes (``RelayLinks``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
from collections import OrderedDict
from dataclasses import dataclass

import aiohttp

from swarm import wire

MAX_HOPS = wire.MAX_HOPS  # hops one relay may name
CONNECT_TIMEOUT = 5.0   # to the next node: a dead one refuses at once, a black hole takes this long
SEND_TIMEOUT = 5.0      # a next node that stops reading loses its link after this long
REMEMBERED = 4096       # next-hop sessions whose errors can still be passed back to their client
MAX_LINKS = 64          # connections to next nodes kept open; the least recently used closes beyond
QUEUE_DEPTH = 64        # relays waiting to be sent to one next node (one per session at most); more are refused
MAX_WAITING = 1024      # relays waiting to be sent, all next nodes together
OWNER_WAITING = 64      # of those, the relays of one client connection (its sessions' steps, one each at most)
WS_OVERHEAD = 14        # a WebSocket frame's header and mask, at most, on top of its payload
# aiohttp writes an unmasked frame (a server's: a node's answer to its client) of more than 16 KiB
# in two pieces, header then payload. The client's read callback may then get the header alone,
# which its tap (swarm/tap.py) leaves to aiohttp's reader, queue and task: a relayed answer of
# TinyLlama's width (8 KiB a row, two rows and more) took that slow path at 2-8 of 15 steps
# (ad hoc, one in-process node, 1 Dec 16:56 UTC). write_now writes such frames in one piece.
ONE_WRITE = 2**14
log = logging.getLogger("aiohttp.server")


@dataclass(frozen=True)
class Hop:
    url: str
    session: bytes
    first: int
    last: int

    @functools.cached_property
    def packed(self) -> bytes:
        """This hop as a RELAY's trailer carries it: session, first and last block, URL (docs/wire.md)."""
        url = self.url.encode()
        return wire.HOP_HEAD.pack(self.session, self.first, self.last, len(url)) + url


@functools.lru_cache(maxsize=1024)
def pack_hops(hops: tuple[Hop, ...]) -> bytes:
    """The hops still to run, as a RELAY's trailer carries them (a route names the same ones each step)."""
    return b"".join(h.packed for h in hops)


def parse_hops(raw: bytes) -> tuple[Hop, ...]:
    """A RELAY's packed hops, checked: WebSocket URLs of nodes (ws:// or wss://, path /swarm, at
    most MAX_URL bytes), 128-bit session ids, block ranges, at most MAX_HOPS. Raises
    WireError("bad_frame") naming the hop. (Every decode step of a session names the same hops:
    a node keeps their parse with the session, server.NodeService._relay_checks.)"""
    hops, at = [], 0
    while at < len(raw):
        i = len(hops)
        if i == MAX_HOPS:
            raise wire.WireError("bad_frame", f"a RELAY names at most {MAX_HOPS} hops")
        if len(raw) - at < wire.HOP_HEAD.size:
            raise wire.WireError("bad_frame", f"next[{i}]: truncated hop")
        session, first, last, n = wire.HOP_HEAD.unpack_from(raw, at)
        at += wire.HOP_HEAD.size
        if n > wire.MAX_URL:
            raise wire.WireError("bad_frame", f"next[{i}]: a URL of {n} bytes, at most {wire.MAX_URL}")
        if n > len(raw) - at:
            raise wire.WireError("bad_frame", f"next[{i}]: truncated hop")
        try:
            url = raw[at:at + n].decode()
        except UnicodeDecodeError:
            raise wire.WireError("bad_frame", f"next[{i}]: the URL is not UTF-8") from None
        at += n
        if not wire.is_node_url(url):
            raise wire.WireError("bad_frame", f"next[{i}]: {url[:80]!r} is not a node's ws://host:port{wire.WS_PATH}")
        if session == bytes(16):
            raise wire.WireError("bad_frame", f"next[{i}]: a session id is 128 random bits")
        if first > last:
            raise wire.WireError("bad_frame", f"next[{i}]: blocks {first}-{last}")
        hops.append(Hop(url, session, first, last))
    return tuple(hops)


def step_or_none(frame) -> int | None:
    """The step of a decoded RELAY (for its error reply), or None."""
    return frame.body.step if frame is not None and frame.type == wire.RELAY else None


class RelayError(Exception):
    """The next node could not be reached or written to."""


class RelayLinks:
    """The node's own WebSockets to the next nodes of relayed steps, one per URL, opened on first use.

    ``submit`` queues a frame for the next node and returns at once: a sender task per next node
    connects (within CONNECT_TIMEOUT) and sends (within SEND_TIMEOUT), so a next node that is slow,
    a black hole or stops reading holds up only the relays to it, never the connection the frame
    came in on (which carries other clients' relays too). A relay that cannot be delivered is told
    to its client. A next node answers a relay it cannot take (its session expired, say) with an
    ERROR on the link; the reader passes it on to the client whose step it was.
    """

    def __init__(self, key: bytes | None = None):
        self.key = key
        self.http: aiohttp.ClientSession | None = None
        self.links: OrderedDict[str, aiohttp.ClientWebSocketResponse] = OrderedDict()  # least recent first
        self.tasks: set[asyncio.Task] = set()   # readers and senders
        self.queues: dict[str, asyncio.Queue] = {}  # next node -> relays waiting to be sent to it
        self.waiting = 0
        # id(client connection) -> its relays waiting (OWNER_WAITING); the queued relays hold the
        # connection, so its id is not reused while it counts
        self.waiting_by_owner: dict[int, int] = {}
        self.back: OrderedDict[bytes, tuple] = OrderedDict()  # next session -> (owner ws, own session, step)
        self.late: set = set()  # clients whose connection did not take an answer at once: one is on its way

    async def send(self, hop: Hop, data: bytes, owner, own_session: bytes, step: int) -> None:
        """Send ``data`` to ``hop`` now when nothing is queued for it and its socket takes the whole
        frame at once; queue it (``submit``) otherwise. Sending now saves a task and a turn of the
        loop per relay (about 0.15 ms per node and token on a loaded 2-core machine, measured), and
        it never waits (``_writes_at_once``)."""
        if not self.can_send_now(hop, len(data)):
            return self.submit(hop, data, owner, own_session, step)
        ws = self.links[hop.url]
        self.links.move_to_end(hop.url)
        self._remember(hop.session, owner, own_session, step)
        try:
            await ws.send_bytes(data)
        except (aiohttp.ClientError, OSError, ConnectionError, RuntimeError) as e:
            await self._drop(hop.url, ws)
            raise RelayError(f"{hop.url}: connection lost ({type(e).__name__})") from None

    def can_send_now(self, hop: Hop, size: int) -> bool:
        """Whether a relay of ``size`` bytes to ``hop`` would be written at once (send_now)."""
        ws = self.links.get(hop.url)
        return ws is not None and not ws.closed and hop.url not in self.queues and _writes_at_once(ws, size)

    def send_now(self, hop: Hop, data: bytes, owner, own_session: bytes, step: int) -> bool:
        """``send`` for a caller that cannot await (the node's fast lane): written here and now,
        or False and nothing done."""
        ws = self.links.get(hop.url)
        if ws is None or hop.url in self.queues:
            return False
        try:
            if not write_now(ws, data):  # (it checks the rest: open, and the write cannot wait)
                return False
        except (aiohttp.ClientError, OSError, ConnectionError, RuntimeError):
            return False  # (the usual path finds the link dead, drops it and tells the client)
        self._remember(hop.session, owner, own_session, step)  # (an error back cannot come before this)
        self.links.move_to_end(hop.url)
        return True

    def can_answer_now(self, owner, size: int) -> bool:
        """Whether an answer of ``size`` bytes to a client would be written at once (answer_now)."""
        return owner not in self.late and _writes_at_once(owner, size)

    def answer_now(self, owner, data: bytes) -> bool:
        """``answer`` for a caller that cannot await: written here and now, or False and nothing done."""
        if owner in self.late:
            return False
        try:
            return write_now(owner, data)  # (it checks the rest)
        except (aiohttp.ClientError, OSError, ConnectionError, RuntimeError):
            return False

    def submit(self, hop: Hop, data: bytes, owner, own_session: bytes, step: int) -> None:
        """Queue ``data`` for ``hop``; raises RelayError when too many relays wait already."""
        if self.waiting >= MAX_WAITING:
            raise RelayError(f"{hop.url}: {self.waiting} relays already wait to be sent from this node")
        if self.waiting_by_owner.get(id(owner), 0) >= OWNER_WAITING:  # (one client naming black holes cannot
            # take the whole of MAX_WAITING from the others: each relay holds its slot up to CONNECT_TIMEOUT)
            raise RelayError(f"{hop.url}: {OWNER_WAITING} relays of this client already wait to be sent")
        queue = self.queues.get(hop.url)
        if queue is None:
            queue = self.queues[hop.url] = asyncio.Queue(QUEUE_DEPTH)
            self.spawn(self._sender(hop.url, queue))
        try:
            queue.put_nowait((hop, data, owner, own_session, step))
        except asyncio.QueueFull:
            raise RelayError(f"{hop.url}: {QUEUE_DEPTH} relays already wait to be sent there") from None
        self.waiting += 1
        self.waiting_by_owner[id(owner)] = self.waiting_by_owner.get(id(owner), 0) + 1

    def _taken(self, owner) -> None:
        """One of ``owner``'s waiting relays left its queue (sent, failed or dropped)."""
        self.waiting -= 1
        left = self.waiting_by_owner.pop(id(owner), 0) - 1
        if left > 0:
            self.waiting_by_owner[id(owner)] = left

    def spawn(self, coro) -> None:
        """Run ``coro`` as a task of these links (cancelled by close)."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _sender(self, url: str, queue: asyncio.Queue) -> None:
        try:
            while not queue.empty():  # (ends when idle: no await between this check and the removal)
                hop, data, owner, own_session, step = queue.get_nowait()
                self._taken(owner)
                try:
                    await self._deliver(hop, data, owner, own_session, step)
                except RelayError as e:
                    await self.tell(owner, own_session, "relay", str(e), step)
        finally:
            if self.queues.get(url) is queue:
                del self.queues[url]
                while not queue.empty():  # (cancelled: the node is stopping)
                    self._taken(queue.get_nowait()[2])

    async def _deliver(self, hop: Hop, data: bytes, owner, own_session: bytes, step: int) -> None:
        ws = await self._link(hop.url)
        self._remember(hop.session, owner, own_session, step)
        try:
            await asyncio.wait_for(ws.send_bytes(data), SEND_TIMEOUT)
        except asyncio.TimeoutError:
            await self._drop(hop.url, ws)
            raise RelayError(f"{hop.url}: not reading (a frame waited {SEND_TIMEOUT:g} s to be sent)") from None
        except (aiohttp.ClientError, OSError, ConnectionError, RuntimeError) as e:
            await self._drop(hop.url, ws)
            raise RelayError(f"{hop.url}: connection lost ({type(e).__name__})") from None

    def _remember(self, next_session: bytes, owner, own_session: bytes, step: int) -> None:
        """Whom to tell when the next node answers ``next_session``'s relay with an error."""
        self.back[next_session] = (owner, own_session, step)
        self.back.move_to_end(next_session)
        while len(self.back) > REMEMBERED:
            self.back.popitem(last=False)

    async def _link(self, url: str) -> aiohttp.ClientWebSocketResponse:
        """The open link to ``url``, connecting if need be (only its sender task calls this)."""
        ws = self.links.get(url)
        if ws is not None and not ws.closed:
            self.links.move_to_end(url)
            return ws
        if self.http is None:
            # No pool limit (aiohttp's default is 100 connections): a stranger's relays naming a hundred
            # black holes held every slot for CONNECT_TIMEOUT, and a new link to an honest node waited
            # for one. Connections are bounded here instead: one connect per next node with relays
            # waiting (MAX_WAITING in all), MAX_LINKS kept open.
            self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT),
                                              connector=aiohttp.TCPConnector(limit=0))
        try:
            ws = await asyncio.wait_for(self.http.ws_connect(url, max_msg_size=wire.HEADER.size + wire.MAX_JSON
                                                             + wire.MAC_LEN, compress=0), CONNECT_TIMEOUT)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise RelayError(f"{url}: cannot connect ({type(e).__name__})") from None
        self.links[url] = ws
        while len(self.links) > MAX_LINKS:  # a client naming many nodes cannot pile up connections
            old_url, oldest = next(iter(self.links.items()))
            await self._drop(old_url, oldest)
        self.spawn(self._read(url, ws))
        return ws

    async def _drop(self, url: str, ws) -> None:
        """Forget and close a link; a close that cannot be sent (the peer stopped reading) aborts it."""
        if self.links.get(url) is ws:
            del self.links[url]
        try:
            await asyncio.wait_for(ws.close(), 1.0)
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError, RuntimeError):
            pass

    async def _read(self, url: str, ws) -> None:
        """Errors the next node sends back: to the client whose step it was."""
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                continue
            try:
                frame = wire.decode(msg.data, self.key)
            except wire.WireError:
                continue
            if frame.type != wire.ERROR or frame.session not in self.back:
                continue
            owner, own_session, step = self.back[frame.session]
            body = frame.body or {}
            named = body.get("step")  # the step the next node refused: a late relay's is not the one
            if isinstance(named, int) and not isinstance(named, bool):  # remembered for this session now
                step = named
            await self.tell(owner, own_session, str(body.get("code", "relay")),
                            f"{url}: {body.get('message', 'error')}", step)
        if self.links.get(url) is ws:
            del self.links[url]

    async def tell(self, owner, session: bytes, code: str, message: str, step: int | None) -> None:
        """A relayed step's failure, to its client on its own connection to this node."""
        await self.answer(owner, wire.encode(wire.error_frame(session, code, message, relayed=True, step=step),
                                             self.key))

    async def answer(self, owner, data: bytes) -> None:
        """A relayed step's answer (or error) to its client, on the client's own connection, from the
        handler of whichever connection the relay came in on (a node before's, which carries other
        clients' relays): that handler must never wait for this client. Written at once when the
        client's connection takes it; otherwise sent in the background within SEND_TIMEOUT, after
        which the connection of a client that stopped reading is cut (its sessions close). While
        one answer waits so, later ones to the same client are dropped: it will give those steps
        up and run them hop by hop, which answers on its own connection."""
        transport = _transport(owner)
        if transport is None:  # (no flow control to look at: a test's stand-in)
            await send_quietly(owner, data)
        elif owner in self.late:
            log.debug("a relayed answer to a client that is not reading was dropped")
        elif _writes_at_once(owner, len(data)):
            await send_quietly(owner, data)  # cannot wait: see _writes_at_once
        else:
            self.late.add(owner)
            self.spawn(self._answer_late(owner, transport, data))

    async def _answer_late(self, owner, transport, data: bytes) -> None:
        try:
            await asyncio.wait_for(owner.send_bytes(data), SEND_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("cutting a client's connection: an answer waited %gs to be sent", SEND_TIMEOUT)
            transport.abort()
        except (ConnectionError, RuntimeError, OSError, aiohttp.ClientError) as e:
            log.debug("a relayed answer was not delivered: %s", e)
        finally:
            self.late.discard(owner)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        # (a sender cancelled before its first step never runs its own accounting)
        self.queues.clear()
        self.waiting, self.waiting_by_owner = 0, {}
        for url, ws in list(self.links.items()):
            await self._drop(url, ws)
        if self.http is not None:
            await self.http.close()


def _transport(ws):
    """The asyncio transport under an aiohttp WebSocket (a private attribute), or None."""
    return getattr(getattr(ws, "_writer", None), "transport", None)


def _writes_at_once(ws, size: int) -> bool:
    """Whether a ``size``-byte message sent on ``ws`` now goes to its transport without waiting.
    aiohttp's send waits only while the transport is paused, which happens when its buffer holds
    more than the high-water mark; so: the buffer is empty and the whole frame, header and mask
    included, fits under the mark. (Without the transport, the answer is no: relays take the queue.)"""
    transport = _transport(ws)
    if transport is None or transport.is_closing():
        return False
    return (transport.get_write_buffer_size() == 0
            and size + WS_OVERHEAD <= transport.get_write_buffer_limits()[1])


def write_now(ws, data: bytes) -> bool:
    """One binary message on ``ws`` written to its transport here, without a coroutine: aiohttp's
    own frame writer (header, the mask of a client's frame), which ``send_bytes`` calls too once
    it has nothing to wait for. Only where ``_writes_at_once`` holds, as then send_bytes would not
    wait either. (A private method of aiohttp, pinned in setup.cfg: tests/swarm/test_fast_lane.py
    fails if it moves.)"""
    writer = getattr(ws, "_writer", None)
    if writer is None or ws.closed or writer._closing or not _writes_at_once(ws, len(data)):
        return False
    if writer.use_mask or len(data) <= ONE_WRITE:
        writer._write_websocket_frame(data, aiohttp.WSMsgType.BINARY, 0)
    else:  # (aiohttp writes a server's frame over 16 KiB as header, then payload: see ONE_WRITE)
        n = len(data)
        header = (struct.pack("!BBH", 0x82, 126, n) if n < 65536 else struct.pack("!BBQ", 0x82, 127, n))
        writer.transport.write(header + data)
        writer._output_size += len(header) + n
    return True


async def within(ws, sending, seconds: float) -> bool:
    """Await ``sending`` (a send on ``ws``, a client's connection) for at most ``seconds``: a client
    that stops reading its replies would otherwise hold the handler, and with it the in-flight
    budget of the frame being answered, forever. Past that, the connection is cut (its sessions
    close with it). False when the reply was not sent."""
    try:
        await asyncio.wait_for(sending, seconds)
        return True
    except asyncio.TimeoutError:
        log.warning("cutting a client's connection: a reply waited %gs to be sent", seconds)
        transport = _transport(ws)
        if transport is not None:
            transport.abort()
        return False
    except (ConnectionError, RuntimeError, OSError, aiohttp.ClientError) as e:
        log.debug("a reply was not delivered: %s", e)
        return False


async def send_quietly(ws, data: bytes) -> bool:
    """Send on a client's connection that may have closed meanwhile (its sessions go with it)."""
    try:
        await ws.send_bytes(data)
        return True
    except (ConnectionError, RuntimeError, OSError, aiohttp.ClientError) as e:
        log.debug("a relayed reply was not delivered: %s", e)
        return False
