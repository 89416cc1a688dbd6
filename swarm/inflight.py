"""A node's bytes in flight bounded across connections, before any payload is buffered.

aiohttp's WebSocket reader buffers each message whole before handing it over, so N connections
sending the largest frame at once would make a node hold N times it. The gate sits between a
connection's socket and that reader: it reads each WebSocket frame header (2-14 bytes) itself,
and passes the payload on only once the node-wide budget (swarm/memory.py ``Inflight``) has
taken its size; until then it stops reading the socket, so the bytes wait in the kernel's buffer,
not in the node. A message still waiting after ``wait_s`` is skipped as it arrives, never
buffered, and answered with a ``full`` ERROR (the client routes around it, as for a full cache).

    socket -> transport -> Gate.feed_data -(admitted frames)-> aiohttp WebSocketReader -> ws.receive()
                               |  one Entry per data message, in order: its bytes, or its refusal
                               |-> server loop: answer (or refuse), send, then Gate.done(entry)
                               '-(a whole RELAY, the handler idle)-> Gate.fast: computed and passed
                                  on in this callback (NodeService.relay_now), or left to the above

The bytes of a frame go back to the budget once its reply has been sent, so the budget covers a
frame received, queued, computed and answered. What it does not cover: per connection, the one
socket read (at most 256 KiB) that arrives while the gate pauses reading, and the copies made of
an admitted frame on its way (see README's limits: the measured RSS).

This plugs into aiohttp (pinned in setup.cfg) at WebSocketResponse._post_start and the request
protocol's _payload_parser; tests/swarm/test_inflight.py fails if those move.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp._websocket.helpers import websocket_mask

from swarm import trace
from swarm.memory import Inflight

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE = 0, 1, 2, 8
REFUSED = b"\x82\x00"  # an empty final binary frame: stands in the reader's stream for a refused message
SESSION_END = 24       # a frame's session id is bytes 8..24 of its payload (swarm/wire.py)


@dataclass
class Entry:
    """One data message passed to the reader: the budget bytes it holds, or why it was refused."""
    size: int = 0
    refusal: tuple[str, str] | None = None  # (code, message)
    head: bytearray = field(default_factory=bytearray)  # a refused message's first payload bytes

    @property
    def session(self) -> bytes:
        return bytes(self.head[8:SESSION_END]) if len(self.head) >= SESSION_END else bytes(16)


def header_size(h) -> int:
    """Bytes of the WebSocket frame header that begins with the two bytes ``h[:2]`` (RFC 6455 5.2)."""
    return 2 + {126: 2, 127: 8}.get(h[1] & 0x7F, 0) + (4 if h[1] & 0x80 else 0)


def parse_header(h: bytes) -> tuple[bool, int, int, bytes]:
    """fin, opcode, payload length, mask key (b"" when unmasked) of a whole frame header."""
    n, at = h[1] & 0x7F, 2
    if n >= 126:
        width = 2 if n == 126 else 8
        n, at = int.from_bytes(h[2:2 + width], "big"), 2 + width
    return bool(h[0] & 0x80), h[0] & 0x0F, n, bytes(h[at:at + 4]) if h[1] & 0x80 else b""


class Gate:
    """The budget's door for one connection: aiohttp's reader behind it sees admitted frames only."""

    def __init__(self, protocol, reader, budget: Inflight, max_msg_size: int, wait_s: float):
        self.protocol, self.reader, self.budget = protocol, reader, budget
        self.max_msg, self.wait_s = max_msg_size, wait_s
        self.entries: deque[Entry] = deque()  # data messages passed to the reader and not yet taken
        self.began: float | None = None       # when the unfinished message began arriving (None: none)
        self.held: list[bytes] | None = None  # bytes read while waiting for the budget (not passed on)
        self.closed = False
        self._header = bytearray()
        self._left = 0               # payload bytes of the current frame still to come
        self._passing = True         # the current frame goes to the reader (else it is skipped)
        self._mask, self._offset = b"", 0
        self._frame_ends_message = False
        self._in_message = False     # a data message has begun and its final frame has not ended
        self._refusing: Entry | None = None  # the message being skipped
        self._verdict: str | Entry | None = None  # decided while waiting: "granted" or a refusal
        self._waiting_for = 0
        self._timer: asyncio.TimerHandle | None = None
        # The fast lane: a whole binary message of kind ``fast_kind`` (byte 5 of its payload, a swarm
        # frame's type) arriving while the connection's handler waits idle, with nothing queued
        # before it, goes to ``fast(payload)`` here, in the socket's read callback, instead of
        # through aiohttp's reader, its queue and the handler's task (a turn of the event loop).
        # ``fast`` returns False to leave the message to the usual path.
        self.fast = None
        self.fast_kind = -1
        self.idle = False           # the handler waits for a message (set by the server loop)
        self.fast_seen = 0.0        # when the fast lane last took a message (time.monotonic)
        self._at = 0                # where the payload of the message _whole passed begins

    # -- aiohttp's side: the protocol feeds raw bytes here instead of to its reader --------------------
    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        trace.mark("arrive", -1)
        if self.held is not None:  # waiting: keep this read, stop the next ones
            self.held.append(data)
            self._pause()
            return False, b""
        out = self._whole(data)
        if out is None:
            out = self._process(data)
        elif self.fast is not None and self.idle and len(self.entries) == 1 and self._take_fast(data):
            return False, b""
        return self.reader.feed_data(out) if out else (False, b"")

    def feed_eof(self) -> None:
        self.close()
        self.reader.feed_eof()

    # -- the server loop's side ----------------------------------------------------------------------
    def next(self) -> Entry:
        """The entry of the data message ws.receive() just returned."""
        return self.entries.popleft() if self.entries else Entry()

    def done(self, entry: Entry) -> None:
        """The message has been answered: its bytes go back to the budget."""
        if entry.size:
            self.budget.release(entry.size)
            entry.size = 0

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.budget.cancel(self._granted)
        while self.entries:
            self.done(self.entries.popleft())

    # -- the stream of frames --------------------------------------------------------------------------
    def _whole(self, data: bytes) -> bytes | None:
        """``data`` itself when it is exactly one whole data message that the budget takes at once (a
        decode step's frame, read in one go: the common case, kept short), else None (_process)."""
        n = len(data)
        if self._left or self._header or self._in_message or self._verdict is not None or self.closed or n < 2:
            return None
        first, second = data[0], data[1]
        length, at = second & 0x7F, 2
        if length == 126:
            length, at = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            return None
        at += 4 if second & 0x80 else 0
        if (at + length != n or first & 0xF0 != 0x80 or (first & 0x0F) not in (OP_TEXT, OP_BINARY)
                or length >= self.max_msg or not self.budget.take(length)):  # (0xF0: final, no RSV bits)
            return None
        self.entries.append(Entry(length))
        self._at = at
        return data

    def _take_fast(self, data: bytes) -> bool:
        """The fast lane for the whole message ``data`` that _whole just admitted: True if ``fast``
        took it (its bytes are back in the budget: it has been answered), else False."""
        at, masked = self._at, data[1] & 0x80
        if data[0] & 0x0F != OP_BINARY or len(data) < at + SESSION_END:
            return False
        if (data[at + 5] ^ data[at - 3] if masked else data[at + 5]) != self.fast_kind:  # (mask byte 5 % 4)
            return False
        payload = bytearray(memoryview(data)[at:])
        if masked:
            websocket_mask(bytes(data[at - 4:at]), payload)
        if not self.fast(payload):
            return False
        self.done(self.entries.pop())
        self.fast_seen = time.monotonic()
        return True

    def _process(self, data: bytes) -> bytes:
        """The bytes of ``data`` the reader may have; stops (self.held) where a message must wait."""
        out: list[bytes] = []
        i, n = 0, len(data)
        while True:
            if self._left:
                if i == n:
                    break
                take = min(self._left, n - i)
                if self._passing:
                    out.append(data[i:i + take])
                else:
                    self._peek(data[i:i + take])
                i += take
                self._left -= take
                if not self._left:
                    self._frame_done(out)
                continue
            want = 2 if len(self._header) < 2 else header_size(self._header)
            if len(self._header) < want:
                if i == n:
                    break
                if self.began is None:
                    self.began = time.monotonic()
                take = min(want - len(self._header), n - i)
                self._header += data[i:i + take]
                i += take
                continue
            header = bytes(self._header)
            self._header.clear()
            if not self._start_frame(header, out):
                self.held = [header, data[i:]]
                break
            if not self._left:
                self._frame_done(out)
        return b"".join(out)

    def _start_frame(self, header: bytes, out: list) -> bool:
        """Decide on a frame from its header: pass it, skip it, or (False) wait for the budget."""
        fin, opcode, length, mask = parse_header(header)
        if opcode == OP_CLOSE:  # nothing after a close takes the fast lane (aiohttp ends the connection)
            self.fast = None
        self._left, self._mask, self._offset = length, mask, 0
        self._frame_ends_message = fin and opcode < 8
        self._in_message |= opcode < 8
        self._passing = True
        if opcode in (OP_TEXT, OP_BINARY) and length < self.max_msg:  # a new message (larger: the reader refuses it)
            if self._refusing is not None:  # a protocol error: close the refused message first
                out.append(REFUSED)
                self._refusing = None
            entry = self._admit(length if fin else self.max_msg)  # a fragmented one may grow to the limit
            if entry is None:
                self._left = 0
                return False
            self.entries.append(entry)
            if entry.refusal is not None:
                self._refusing, self._passing = entry, False
        elif opcode == OP_CONTINUATION and self._refusing is not None:
            self._passing = False
        if self._passing:
            out.append(header)
        return True

    def _admit(self, size: int) -> Entry | None:
        verdict, self._verdict = self._verdict, None
        if self.closed:  # the connection is closing: whatever still comes is skipped (its close frame passes)
            return Entry(refusal=("closing", "the connection is closing"))
        if isinstance(verdict, Entry):
            return verdict
        if verdict == "granted" or self.budget.take(size):
            return Entry(size)
        if size > self.budget.limit:
            return Entry(refusal=("too_long", f"a frame of {size / 2**20:.1f} MiB is more than this node's "
                                              f"in-flight budget of {self.budget.limit / 2**20:g} MiB "
                                              f"(--max-inflight-mb): send fewer positions per frame"))
        self._wait(size)
        return None

    def _peek(self, chunk: bytes) -> None:
        """Keep the first bytes of a skipped message (its session id, for the error reply)."""
        entry = self._refusing
        if entry is not None and len(entry.head) < SESSION_END:
            part = chunk[:SESSION_END - len(entry.head)]
            if self._mask:
                part = bytes(b ^ self._mask[(self._offset + k) % 4] for k, b in enumerate(part))
            entry.head += part
        self._offset += len(chunk)

    def _frame_done(self, out: list) -> None:
        if self._frame_ends_message:
            if self._refusing is not None:
                out.append(REFUSED)
                self._refusing = None
            self._in_message = False
        if not self._in_message:  # (a control frame between the fragments of a message: its time runs on)
            self.began = None

    # -- waiting for room in the budget ----------------------------------------------------------------
    def _wait(self, size: int) -> None:
        loop = asyncio.get_running_loop()
        self._waiting_for = size
        self.budget.wait(size, self._granted)
        self._timer = loop.call_later(self.wait_s, self._give_up)
        self.began = None  # time spent waiting is the node's, not the sender's
        self._pause()

    def _granted(self) -> None:
        """Called by the budget, the bytes already taken for this connection."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._verdict = "granted"
        asyncio.get_running_loop().call_soon(self._resume)

    def _give_up(self) -> None:
        self._timer = None
        self.budget.cancel(self._granted)
        used, size = self.budget.used / 2**20, self._waiting_for / 2**20
        self._verdict = Entry(refusal=("full", f"node full: frames in flight hold {used:.1f} of its "
                                               f"{self.budget.limit / 2**20:g} MiB (--max-inflight-mb); a frame "
                                               f"of {size:.1f} MiB waited {self.wait_s:g} s: route elsewhere"))
        self._resume()

    def _resume(self) -> None:
        if self.closed:
            if self._verdict == "granted":
                self.budget.release(self._waiting_for)
            return
        held, self.held = self.held, None
        out = self._process(b"".join(held or []))
        if out:
            eof, _ = self.reader.feed_data(out)
            if eof:
                self.protocol.close()
        if self.held is None:
            self._unpause()

    def _pause(self) -> None:
        if self.protocol.transport is not None:
            self.protocol.transport.pause_reading()

    def _unpause(self) -> None:
        """Read the socket again, unless aiohttp's own flow control holds it."""
        if self.protocol.transport is not None and not (self.protocol._reading_paused or self.protocol._buffer_paused):
            self.protocol.transport.resume_reading()


class GatedWebSocket(web.WebSocketResponse):
    """A WebSocketResponse whose reader sees only what its Gate admits, from the first byte on."""

    def __init__(self, budget: Inflight, wait_s: float, **kwargs):
        super().__init__(**kwargs)
        self.budget, self.wait_s = budget, wait_s
        self.gate: Gate | None = None

    def _post_start(self, request, protocol, writer) -> None:
        proto = request.protocol
        early, proto._message_tail = proto._message_tail, b""  # bytes that came with the upgrade request
        super()._post_start(request, protocol, writer)
        self.gate = Gate(proto, proto._payload_parser, self.budget, self._max_msg_size, self.wait_s)
        proto._payload_parser = self.gate
        if early:
            eof, _ = self.gate.feed_data(early)
            if eof:
                proto.close()
