"""A client link's WebSocket messages straight to its hub, skipping aiohttp's reader and queue.

aiohttp hands a received message to ``ws.receive()`` through its reader, a queue and the task
that waits on it; the client's link then passes it to the hub's inbox (swarm/client.py) for the
step that waits there: two turns of the event loop per answer, each tens of microseconds of cold
Python on a route sharing two cores. A ``Tap`` sits between the connection's socket and that
reader (as swarm/inflight.py's Gate does on the node's side): a read that is exactly one whole,
unfragmented binary frame, arriving at a frame boundary while aiohttp's queue is empty (so no
message before it is still on its way), goes to ``deliver`` at once, from the socket's read
callback. Everything else (partial reads, several frames, control frames, text, a
frame over the size limit) goes to aiohttp's reader as before, and the tap only follows its frame
boundaries, so that it never takes bytes from the middle of a frame.

    socket -> transport -> Tap.feed_data -(one whole binary frame)-> deliver(payload)
                                         '-(anything else)---------> aiohttp WebSocketReader -> ws.receive()

This plugs into aiohttp (pinned in setup.cfg) at the connection protocol's ``_payload_parser``
and the queue's ``_buffer``; tests/swarm/test_tap.py fails if they move.
"""

from __future__ import annotations

from typing import Callable

OP_BINARY = 2


class Tap:
    """``reader``: aiohttp's WebSocketReader; ``queue``: the queue it fills (``ws.receive()`` reads it)."""

    def __init__(self, reader, queue, deliver: Callable[[bytes], None], max_size: int):
        self.reader, self.queue, self.deliver, self.max_size = reader, queue, deliver, max_size
        self._header = bytearray()  # the start of a frame header split between reads
        self._left = 0              # bytes of the current frame's payload still to come
        self._in_message = False    # a fragmented data message has begun and not ended

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if not (self._left or self._header or self._in_message or self.queue._buffer):
            payload = _whole_binary(data, self.max_size)
            if payload is not None:
                self.deliver(payload)
                return False, b""
        self._follow(data)
        return self.reader.feed_data(data)

    def feed_eof(self) -> None:
        self.reader.feed_eof()

    def _follow(self, data: bytes) -> None:
        """Track the frame boundaries in ``data`` (RFC 6455 5.2), as aiohttp's reader will see them."""
        i, n = 0, len(data)
        while i < n:
            if self._left:
                take = min(self._left, n - i)
                self._left -= take
                i += take
                continue
            self._header.append(data[i])  # (a header is 2-14 bytes, and this path the rare one)
            i += 1
            if len(self._header) < 2 or len(self._header) < _header_size(self._header):
                continue
            h = bytes(self._header)
            self._header.clear()
            if h[0] & 0x0F < 8:  # a data frame: a message with fin unset goes on in continuation frames
                self._in_message = not h[0] & 0x80
            self._left = _length(h)


def _header_size(h) -> int:
    """Bytes of a frame header whose first two bytes are ``h[:2]``."""
    return 2 + {126: 2, 127: 8}.get(h[1] & 0x7F, 0) + (4 if h[1] & 0x80 else 0)


def _length(h: bytes) -> int:
    n = h[1] & 0x7F
    if n == 126:
        return int.from_bytes(h[2:4], "big")
    if n == 127:
        return int.from_bytes(h[2:10], "big")
    return n


def _whole_binary(data: bytes, max_size: int) -> bytes | None:
    """The payload if ``data`` is exactly one final, unmasked, uncompressed binary frame of fewer
    than ``max_size`` bytes, else None."""
    if len(data) < 2 or data[0] != 0x80 | OP_BINARY or data[1] & 0x80:  # (RSV bits: compression)
        return None
    n, at = data[1] & 0x7F, 2
    if n == 126:
        n, at = int.from_bytes(data[2:4], "big"), 4
    elif n == 127:
        return None
    if at + n != len(data) or n >= max_size:  # (as aiohttp's reader: max_msg_size itself is too big)
        return None
    return data[at:]
