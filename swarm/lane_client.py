"""The client's lanes (swarm/lane.py): a blocking socket to each node of its route, bound to its sessions.

A relayed decode step then goes out on the first node's lane and its answer comes back on the
last one's; the client waits in ``select`` on its lanes, with no event loop. Lanes are set up at
the first relayed step of a route (``bind``: connect, BIND every session naming the next node's
lane, wait for every BOUND), and again when the route changes (a failover). A route whose nodes
offer no lanes (an older node, one started with --no-lanes, a wss:// address: lanes are not
encrypted) relays over the WebSockets as before.
"""

from __future__ import annotations

import select
import socket
import time

from swarm import wire
from swarm.lane import LEN, READ_SIZE, format_address, max_frame

CONNECT_TIMEOUT = 5.0
BIND_TIMEOUT = 10.0
SEND_TIMEOUT = 10.0  # a node that stops reading its lane fails the step after this long


class LaneLost(Exception):
    """A lane could not be used (connect, send, read, or a node's refusal to bind)."""


class ClientLane:
    def __init__(self, host: str, port: int, dim: int):
        try:
            self.sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        except OSError as e:
            raise LaneLost(f"lane {format_address(host, port)}: cannot connect ({e.strerror or type(e).__name__})") \
                from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(SEND_TIMEOUT)  # (reads come only after select says there is something)
        self.name, self.max_size = format_address(host, port), max_frame(dim)
        self.buf = bytearray()
        self.closed = False

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(LEN.pack(len(data)) + data)
        except OSError as e:
            self.close()
            raise LaneLost(f"lane {self.name}: cannot send ({e.strerror or type(e).__name__})") from None

    def read(self) -> list[bytes]:
        """The whole frames that have arrived (call when select says the socket is readable)."""
        try:
            data = self.sock.recv(READ_SIZE)
        except OSError as e:
            self.close()
            raise LaneLost(f"lane {self.name}: connection lost ({e.strerror or type(e).__name__})") from None
        if not data:
            self.close()
            raise LaneLost(f"lane {self.name}: closed by the node")
        if not self.buf and len(data) >= 4 and LEN.unpack_from(data)[0] == len(data) - 4:
            return [data[4:]]  # one whole frame: the usual read
        self.buf += data
        frames = []
        while len(self.buf) >= 4:
            n = LEN.unpack_from(self.buf)[0]
            if n > self.max_size:
                self.close()
                raise LaneLost(f"lane {self.name}: a frame of {n} bytes, at most {self.max_size}")
            if len(self.buf) < 4 + n:
                break
            frames.append(bytes(self.buf[4:4 + n]))
            del self.buf[:4 + n]
        return frames

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


def _kind(raw) -> int:
    """A frame's type byte (swarm/wire.py's header), looked at before it is decoded: a frame this
    wait does not take is skipped without being checked against its limits."""
    return raw[5] if len(raw) > 5 else 0


def _not_a_steps(error: wire.Frame) -> bool:
    """An ERROR on a lane that answers no one-row FORWARD: a relayed step's, or a BIND's."""
    body = error.body or {}
    return bool(body.get("relay") or body.get("bind"))


def usable(spans) -> bool:
    """Whether every span's node offers a lane, over an unencrypted address (ws://, as lanes are)."""
    return all(s.lane_port is not None and not s.lane_refused and s.url.startswith("ws://") for s in spans)


def address(span) -> str:
    """The span's node's lane, IP:PORT (the host of its WebSocket's URL, its name resolved here once);
    raises LaneLost when the name does not resolve."""
    if span.lane_address is None:
        from yarl import URL

        host = URL(span.url).host
        try:
            ip = socket.getaddrinfo(host, span.lane_port, type=socket.SOCK_STREAM)[0][4][0]
        except (OSError, IndexError, UnicodeError) as e:
            raise LaneLost(f"{span.url}: cannot resolve {host} ({getattr(e, 'strerror', None) or e})") from None
        span.lane_address = format_address(ip, span.lane_port)
    return span.lane_address


def bind(spans, key: bytes | None, timeout: float = BIND_TIMEOUT) -> None:
    """Make every span's lane connected and bound, naming the next span's lane (as the route is now);
    raises LaneLost, after which the span at fault (whose node could not be reached, or refused)
    relays over its WebSocket, and so does its route until a failover replaces it. (Called at every
    relayed step: when nothing changed it only compares.)"""
    at_fault = []
    try:
        nexts = []
        for span in spans[1:]:
            at_fault = [span]
            nexts.append(address(span))
        nexts.append(None)
        todo = [(s, nxt) for s, nxt in zip(spans, nexts) if s.lane is None or s.lane.closed or s.lane_bound != nxt]
        if not todo:
            return
        for span, nxt in todo:
            at_fault = [span]
            if span.lane is None or span.lane.closed:
                host, port = address(span).rsplit(":", 1)
                span.lane, span.lane_bound = ClientLane(host.strip("[]"), int(port), span.dim), None
            span.lane.send(wire.encode(wire.Frame(wire.BIND, span.sid, body={"next": nxt}), key))
        waiting = {span.lane.sock: (span, nxt) for span, nxt in todo}
        deadline = time.monotonic() + timeout
        while waiting:
            at_fault = [span for span, _ in waiting.values()]
            left = deadline - time.monotonic()
            ready = select.select(list(waiting), [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                raise LaneLost(f"no BOUND within {timeout:g} s from " + ", ".join(s.url for s in at_fault))
            for sock in ready:
                span, nxt = waiting[sock]
                at_fault = [span]
                for raw in span.lane.read():
                    if _kind(raw) not in (wire.ERROR, wire.BOUND):
                        continue  # (the node's greeting, an earlier step's answer come late)
                    try:
                        reply = wire.decode(raw, key)
                    except wire.WireError as e:
                        raise LaneLost(f"{span.url}: unusable lane reply: {e}") from None
                    if reply.session != span.sid or (reply.type == wire.ERROR and not (reply.body or {}).get("bind")):
                        continue  # (a step's error, come late: not the BIND's)
                    if reply.type == wire.ERROR:
                        raise LaneLost(f"{span.url}: {(reply.body or {}).get('message', 'error')}")
                    if reply.type == wire.BOUND:
                        span.lane_bound, span.lane_ready = nxt, True
                        waiting.pop(sock, None)
    except LaneLost:
        for span in at_fault:
            span.lane_refused = True  # (its node's lane is not tried again for this span)
            close(span)
        for span in spans:
            span.lane_bound = None  # (the others bind again once the route is whole)
        raise


def close(span) -> None:
    if span.lane is not None:
        span.lane.close()
    span.lane, span.lane_bound, span.lane_ready = None, None, False


def forward(span, data: bytes, position: int, timeout: float, key: bytes | None) -> wire.Frame | None:
    """A one-row FORWARD (``data``, framed) on the span's lane, binding it first if need be: its
    RESULT, or an ERROR (returned: the caller raises it as the WebSocket's would be); None when the
    lane cannot be used (then the caller sends it over the WebSocket). A timeout closes the lane
    and returns an ERROR frame of code ``timeout``."""
    if span.lane_port is None or span.lane_refused or not span.url.startswith("ws://"):
        return None
    try:
        if not span.lane_ready or span.lane is None or span.lane.closed:
            bind([span], key)  # (alone, naming no next lane: a relayed step binds it again with one)
        span.lane.send(data)
    except LaneLost:
        close(span)
        return None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([span.lane.sock], [], [], left)[0]:
            close(span)
            return wire.error_frame(span.sid, "timeout", f"no reply within {timeout:.0f} s")
        try:
            frames = span.lane.read()
        except LaneLost:
            close(span)
            return None
        for raw in frames:
            if _kind(raw) not in (wire.ERROR, wire.RESULT):
                continue  # (the node's greeting, a relayed step's answer come late, a BOUND)
            try:
                reply = wire.decode(raw, key, span.dim, 1)
            except wire.WireError as e:
                return wire.error_frame(span.sid, "bad_reply", f"unusable reply: {e}")
            if reply.session != span.sid or (reply.type == wire.ERROR and _not_a_steps(reply)):
                continue  # (a relayed step's error, or a BIND's refusal, come late)
            if reply.type == wire.ERROR or (reply.type == wire.RESULT and reply.position == position):
                return reply


def wait(spans, key: bytes | None, step: int, position: int, timeout: float, failed) -> wire.Frame:
    """The RELAYED answer to ``step`` on the last span's lane; ``failed(message)`` makes the exception
    raised for an error naming the step, a lost lane, or no answer within ``timeout``."""
    last, dim = spans[-1], spans[0].dim
    lanes = {s.lane.sock: s for s in spans}
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        ready = select.select(list(lanes), [], [], left)[0] if left > 0 else []
        if not ready:
            raise failed(f"no answer within {timeout:.1f} s")
        for sock in ready:
            span = lanes[sock]
            try:
                frames = span.lane.read()
            except LaneLost as e:
                close(span)
                raise failed(str(e)) from None
            for raw in frames:
                if _kind(raw) not in (wire.ERROR, wire.RELAYED):
                    continue  # (the node's greeting, a BOUND or RESULT come late)
                try:
                    reply = wire.decode(raw, key, dim, wire.MAX_HOPS + 1)
                except wire.WireError as e:
                    raise failed(f"{span.url}: unusable reply: {e}") from None
                if reply.type == wire.ERROR and not (reply.body or {}).get("bind") and \
                        (reply.body or {}).get("step", step) == step:
                    raise failed(f"{span.url}: {(reply.body or {}).get('message', 'error')}")
                if (reply.type == wire.RELAYED and span is last and reply.session == last.sid
                        and reply.position == position and reply.body.step == step):
                    return reply
                # anything else is left over from an earlier step: skipped
