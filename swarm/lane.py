"""Lanes: relayed decode steps over plain TCP, read, computed and written on the compute thread.

A relayed step over the nodes' WebSockets (swarm/relay.py) goes, at every node, through asyncio's
loop, aiohttp's protocol and the node's gate before its frame is computed, and back through them
after. On a route of three nodes sharing two cores that cost about 0.08 of the local decode speed
(docs/distributed-performance.md, "Lanes"). A lane is a TCP connection to a node's lane port that
the node's compute thread (common/jobloop.py) reads the moment the kernel wakes it:

    client --RELAY--> node 1 lane --RELAY--> node 2 lane --RELAY--> node 3 lane
    client <--RELAYED (or an ERROR naming the step) -- node 3, on the client's own lane to it

Frames are the wire's (swarm/wire.py: the same checks, the same HMAC in a private swarm), each
preceded by its length (4 bytes, little-endian). A lane takes three kinds:

- ``BIND`` (from the client, on its own lane to the node, for one of its sessions opened over the
  WebSocket): answers and errors of that session's relayed steps go back on this lane; its body
  ``{"next": "HOST:PORT"}`` names the lane of the node after this one in the route (none: the
  last). The node connects to it, then answers ``BOUND`` (or an ERROR). The first lane to bind a
  session keeps it; the same lane may bind it again (a new next node, after a failover).
- ``RELAY``, as on the WebSocket: computed, then passed to the session's next lane or answered.
- ``FORWARD`` of one row, for a session bound to this very lane (a decode step the client runs
  hop by hop: after a rewind, or a relay that failed): computed and answered with its ``RESULT``.

Anything a node cannot do on a lane (a session not bound, a cache to grow, a next node gone) is an
ERROR to the session's client naming the step; the client then runs that step hop by hop, where
failures are pinned and failed over as ever (over the WebSocket when a lane fails too). Lanes
carry no prompt and open no session: those stay on the WebSocket, with its budgets.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import struct
import time
from collections import OrderedDict

from swarm import trace, wire

LEN = struct.Struct("<I")
CONNECT_TIMEOUT = 5.0     # to a next node's lane
MAX_LANES = 256           # connections into one node's lane port at once (or 4 per session slot, if more)
MAX_LINKS = 64            # lanes to next nodes kept open; the least recently used closes beyond
FRAMES_PER_TURN = 32      # frames of one lane handled before the loop's other work
REMEMBERED = 4096         # next nodes' sessions whose errors a link can still pass back to their client
MAX_STRIKES = 32          # errors answered on a lane in a row (no frame doing anything between): closed
PENDING_SLACK = 1 << 16   # a lane's unwritten bytes may reach two of its largest frames and this: beyond,
                          # its peer is not reading (a client reads each answer as it comes)
READ_SIZE = 1 << 16       # bytes asked of one recv: a decode step's frame at once, and below glibc's
                          # mmap threshold (128 KiB): recv allocates its whole size first, and 256 KiB
                          # cost 19 against 2 us warm, 115 against 52 us on a just-woken core (ad hoc, 2 Dec)
log = logging.getLogger("swarm.lane")


def max_frame(dim: int) -> int:
    """The largest frame a lane takes: a relay of MAX_HOPS + 1 float32 rows, its hops and MAC."""
    return (wire.HEADER.size + (wire.MAX_HOPS + 1) * dim * 4 + wire.TRAILER_HEAD.size + 4 * wire.MAX_HOPS
            + wire.MAX_HOPS_BYTES + wire.MAC_LEN)


def parse_address(text) -> tuple[str, int]:
    """A lane's "IP:PORT" (an IPv6 address in brackets), checked; ValueError otherwise. An address,
    not a name: a node never waits on a name lookup on the thread that computes (the client
    resolves the name in its node's URL)."""
    import ipaddress

    if not isinstance(text, str) or not 3 <= len(text) <= 64 or not text.isprintable():
        raise ValueError("a lane address is IP:PORT")
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text[:64]!r} is not a lane's IP:PORT") from None
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or (ip.version == 6) != bracketed:
        raise ValueError(f"{text[:64]!r} is not a lane's IP:PORT")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Budget:
    """The bytes lanes hold in their buffers (a frame half received, output a peer has not read
    yet), all of a node's lanes together, on the compute thread only; a lane that would go past
    it is closed. Its own, of --max-inflight-mb's size: the WebSocket's budget (swarm/memory.py
    Inflight) belongs to the event loop's thread."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used = max(self.used - n, 0)


class Lane:
    """One TCP connection on the compute loop, either way: length-prefixed frames in (each to
    ``on_frame(lane, frame)``) and out (``send``), never blocking. A frame over ``max_size``, a
    peer that leaves two such frames unread, or buffers past the ``budget`` end the connection.
    At most FRAMES_PER_TURN frames are handled per read; the rest wait for the loop's next turn,
    after the work queued meanwhile (one peer's burst cannot hold the compute thread)."""

    def __init__(self, jobs, sock: socket.socket, on_frame, on_close, max_size: int, peer: str = "",
                 budget: Budget | None = None):
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.jobs, self.sock, self.on_frame, self.on_close = jobs, sock, on_frame, on_close
        self.max_size, self.peer, self.budget = max_size, peer, budget or Budget(1 << 62)
        self.inbuf = bytearray()
        self.out = bytearray()
        self.held = 0                      # bytes of inbuf and out taken from the budget
        self.closed = False
        self.strikes = 0                   # errors answered since the last frame that did something
        self.last_seen = time.monotonic()  # the last frame in (or, for a link, out)
        self.began: float | None = None    # when the unfinished frame in began arriving
        self._more = False                 # whole frames left in inbuf for the next turn
        jobs.watch(sock, selectors.EVENT_READ, self._ready)

    def _ready(self, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self._flush()
        if events & selectors.EVENT_READ and not self.closed:
            self._read()

    def _read(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self.close()
        if not data:
            return self.close()
        trace.mark("arrive", -1)
        if not self.inbuf and len(data) >= 4 and LEN.unpack_from(data)[0] == len(data) - 4 <= self.max_size:
            self.last_seen = time.monotonic()  # one whole frame, the usual read: no copy into the buffer
            self.began = None
            self.on_frame(self, memoryview(data)[4:])
            return
        self.inbuf += data
        self._frames()

    def _frames(self) -> None:
        """Hand on the whole frames in inbuf, FRAMES_PER_TURN at most; keep the rest (and account)."""
        self._more = False
        handled = 0
        while len(self.inbuf) >= 4 and not self.closed:
            n = LEN.unpack_from(self.inbuf)[0]
            if n > self.max_size:
                log.warning("closing a lane%s: a frame of %d bytes, at most %d", self._from(), n, self.max_size)
                return self.close()
            if len(self.inbuf) < 4 + n:
                break
            if handled == FRAMES_PER_TURN:
                self._more = True
                self.jobs.submit(self._frames)  # (after the jobs queued so far, and the sockets ready then)
                break
            frame = bytes(self.inbuf[4:4 + n])
            del self.inbuf[:4 + n]
            self.last_seen = time.monotonic()
            handled += 1
            self.on_frame(self, memoryview(frame))
        if not self.closed:
            self.began = (self.began or time.monotonic()) if self.inbuf and not self._more else None
            self._account()

    def send(self, data, framed: bool = False) -> bool:
        """Queue ``data`` as one frame (``framed``: it begins with its length prefix already, as a
        compiled relay's output does, and is sent as it is, not copied); False when the lane is
        closed (or closes for a peer not reading). Nothing of ``data`` is kept once this returns."""
        if self.closed:
            return False
        message = data if framed else LEN.pack(len(data)) + data
        if self.out:
            self.out += message
        else:
            try:
                n = self.sock.send(message)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self.close()
                return False
            if n == len(message):
                self.last_seen = time.monotonic()
                return True
            self.out += memoryview(message)[n:]
            self.jobs.watch(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self._ready)
        if len(self.out) > 2 * self.max_size + PENDING_SLACK:
            log.warning("closing a lane%s: %d bytes it did not read", self._from(), len(self.out))
            self.close()
            return False
        return self._account()

    def _account(self) -> bool:
        """Take (or give back) what inbuf and out hold now from the budget; closes the lane if it cannot."""
        now = len(self.inbuf) + len(self.out)
        if now > self.held and not self.budget.take(now - self.held):
            log.warning("closing a lane%s: lanes' buffers hold %d bytes, the most this node keeps "
                        "(--max-inflight-mb)", self._from(), self.budget.used)
            self.close()
            return False
        if now < self.held:
            self.budget.release(self.held - now)
        self.held = now
        return True

    def _flush(self) -> None:
        try:
            n = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self.close()
        del self.out[:n]
        if not self.out:
            self.jobs.watch(self.sock, selectors.EVENT_READ, self._ready)
        self._account()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.jobs.unwatch(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass
        self.inbuf, self.out = bytearray(), bytearray()
        self.budget.release(self.held)
        self.held = 0
        self.on_close(self)

    def _from(self) -> str:
        return f" from {self.peer}" if self.peer else ""


class Link:
    """A node's lane to a next node. It connects without blocking, then waits for the next node's
    greeting (its lane server's first frame: INFO naming the same manifest, signed with the swarm
    key if there is one) before it is ready and anything is written to it: a BIND naming some
    other TCP service gets that service nothing but a connection. ``when_ready`` callbacks learn
    whether it became ready (True) or why not (a message). Errors the next node sends back about
    a relayed step (a session it no longer holds) go to that step's client (``remember``)."""

    def __init__(self, jobs, address: tuple[str, int], max_size: int, on_close, service, budget: Budget):
        self.jobs, self.address, self.max_size, self.on_close = jobs, address, max_size, on_close
        self.service, self.budget = service, budget
        self.sock: socket.socket | None = None
        self.lane: Lane | None = None
        self.ready = False
        self.failed: str | None = None
        self.waiting: list = []
        self.back: OrderedDict[bytes, tuple] = OrderedDict()  # next session -> (client lane, own session, step)
        self.started = time.monotonic()
        host, port = address
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.setblocking(False)
            code = self.sock.connect_ex((host, port))
        except (OSError, UnicodeError) as e:
            self._fail(f"cannot connect ({getattr(e, 'strerror', None) or type(e).__name__})")
            return
        if code in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            jobs.watch(self.sock, selectors.EVENT_WRITE, self._connected)
        else:
            self._fail(f"cannot connect ({errno.errorcode.get(code, code)})")

    @property
    def name(self) -> str:
        return format_address(*self.address)

    def when_ready(self, callback) -> None:
        if self.ready:
            callback(True)
        elif self.failed is not None:
            callback(self.failed)
        else:
            self.waiting.append(callback)

    def _connected(self, events: int) -> None:
        self.jobs.unwatch(self.sock)
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            return self._fail(f"cannot connect ({errno.errorcode.get(code, code)})")
        self.lane = Lane(self.jobs, self.sock, self._frame, self._lost, self.max_size, self.name, self.budget)

    def _frame(self, lane, data) -> None:
        try:
            frame = wire.decode(data, self.service.key)
        except wire.WireError as e:
            if not self.ready:
                return self._fail(f"not a node's lane ({e})")
            return
        if not self.ready:
            body = frame.body if isinstance(frame.body, dict) else {}
            if frame.type != wire.INFO or body.get("manifest") != self.service.manifest_sha:
                return self._fail("not a lane of a node serving this model")
            self.ready = True
            return self._tell(True)
        if frame.type == wire.ERROR and frame.session in self.back:
            client, own, step = self.back.pop(frame.session)
            body = frame.body or {}
            named = body.get("step")
            if isinstance(named, int) and not isinstance(named, bool):
                step = named
            client.send(wire.encode(wire.error_frame(own, str(body.get("code", "relay")),
                                                     f"{self.name}: {body.get('message', 'error')}", True, step),
                                    self.service.key))

    def remember(self, next_session: bytes, client, own_session: bytes, step: int) -> None:
        """Whom to tell when the next node answers ``next_session``'s relay with an error."""
        self.back[next_session] = (client, own_session, step)
        self.back.move_to_end(next_session)
        while len(self.back) > REMEMBERED:
            self.back.popitem(last=False)

    def check_timeout(self, now: float) -> None:
        if not self.ready and self.failed is None and now - self.started > CONNECT_TIMEOUT:
            self._fail(f"no greeting within {CONNECT_TIMEOUT:g} s")

    def _fail(self, why: str) -> None:
        if self.failed is not None:
            return
        self.failed = why
        self.ready = False
        if self.lane is not None:
            self.lane.on_close = lambda lane: None  # (this is the close that matters)
            self.lane.close()
        elif self.sock is not None:
            self.jobs.unwatch(self.sock)
            try:
                self.sock.close()
            except OSError:
                pass
        self._tell(why)
        self.on_close(self)

    def _tell(self, outcome) -> None:
        waiting, self.waiting = self.waiting, []
        for callback in waiting:
            callback(outcome)

    def _lost(self, lane) -> None:
        self._fail("connection lost")

    def send(self, data, framed: bool = False) -> bool:
        return self.ready and self.lane is not None and self.lane.send(data, framed)

    def close(self) -> None:
        self._fail("closed")


class LaneServer:
    """A node's lane port, on the compute loop ``jobs``: accepts lanes (greeting each with the node's
    INFO: manifest and lane), keeps the links to next nodes, and hands every frame to
    ``service.lane_frame``. Build it on the loop's thread (``start``)."""

    def __init__(self, service, jobs, host: str = "127.0.0.1", port: int = 0):
        self.service, self.jobs = service, jobs
        self.max_size = max_frame(service.dim)
        self.max_lanes = max(MAX_LANES, 4 * service.limits.max_sessions)  # (a client's, nodes' before)
        self.budget = Budget(service.limits.max_inflight_bytes)
        self.listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.greeting = wire.encode(wire.Frame(wire.INFO, bytes(16), body={"manifest": service.manifest_sha,
                                                                           "lane": self.port}), service.key)
        self.lanes: set[Lane] = set()
        self.links: OrderedDict[tuple[str, int], Link] = OrderedDict()  # least recently used first
        jobs.watch(self.listener, selectors.EVENT_READ, self._accept)
        self.sweeper = jobs.every(1.0, self.sweep)
        self.resting = None  # the timer that watches the listener again after accept ran out of descriptors

    @classmethod
    def start(cls, service, jobs, host: str = "127.0.0.1", port: int = 0) -> "LaneServer":
        """Listen on ``host``:``port`` (0: any free port) from the loop's own thread."""
        return jobs.submit(cls, service, jobs, host, port).result(30)

    def _accept(self, events: int) -> None:
        try:
            sock, addr = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # (out of file descriptors: the listener stays readable; rest a second)
            log.warning("lanes: cannot accept (%s); not accepting for a second", e.strerror or e)
            self.jobs.unwatch(self.listener)
            self.resting = self.jobs.after(1.0, self._watch_again)
            return
        if len(self.lanes) >= self.max_lanes:
            log.warning("refusing a lane from %s: %d lanes open, the most this node keeps", addr[0], self.max_lanes)
            sock.close()
            return
        lane = Lane(self.jobs, sock, self.service.lane_frame, self._closed, self.max_size,
                    format_address(addr[0], addr[1]), self.budget)
        self.lanes.add(lane)
        lane.send(self.greeting)

    def _watch_again(self) -> None:
        self.resting = None
        self.jobs.watch(self.listener, selectors.EVENT_READ, self._accept)

    def _closed(self, lane: Lane) -> None:
        self.lanes.discard(lane)
        self.service.unbind(lane)

    def link(self, address: tuple[str, int]) -> Link:
        """The link to ``address`` (ready, or on its way), connecting a new one if need be. A link
        that failed is not kept (its callers learn why through ``when_ready``)."""
        link = self.links.pop(address, None)
        if link is None or link.failed is not None:
            link = Link(self.jobs, address, self.max_size, self._link_closed, self.service, self.budget)
            if link.failed is not None:
                return link
        self.links[address] = link  # (most recently used last)
        while len(self.links) > MAX_LINKS:
            _, oldest = self.links.popitem(last=False)
            oldest.close()
        return link

    def _link_closed(self, link: Link) -> None:
        if self.links.get(link.address) is link:
            del self.links[link.address]

    def sweep(self) -> None:
        """Every second: lanes that began a frame and did not finish it within frame_s, or that
        have been silent for idle_s with no session of theirs in use, close; links silent for
        idle_s close; links not ready within CONNECT_TIMEOUT fail."""
        now, limits = time.monotonic(), self.service.limits
        bound = self.service.lanes_in_use(now)
        for lane in list(self.lanes):
            if lane.began is not None and now - lane.began > limits.frame_s:
                log.warning("closing a lane from %s: a frame took over %gs to arrive", lane.peer, limits.frame_s)
                lane.close()
            elif now - lane.last_seen > limits.idle_s and lane not in bound:
                lane.close()
        for link in list(self.links.values()):
            link.check_timeout(now)
            if link.lane is not None and now - link.lane.last_seen > limits.idle_s:
                link.close()

    def close(self) -> None:
        self.jobs.cancel(self.sweeper)
        if self.resting is not None:
            self.jobs.cancel(self.resting)
        self.jobs.unwatch(self.listener)
        self.listener.close()
        for lane in list(self.lanes):
            lane.close()
        for link in list(self.links.values()):
            link.close()
