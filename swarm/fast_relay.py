"""A session's relayed decode steps on lanes, its common case checked and framed in a few operations.

Every decode step of a session bound to lanes (swarm/lane.py) arrives as the same kind of frame:
a RELAY for this session, float32, these blocks, the hops it named at its first step, one row
more than the hops run before it. The node reads it on a core that has just woken, where each
library call it makes (a struct, a numpy constructor, a compiled function's dispatch) costs tens
of microseconds the first time after a pause, whatever it does: beyond the blocks, a frame took
0.30-0.33 ms there on the general path (``wire.decode``'s checks, ``wire.encode``'s framing),
against 0.23-0.26 ms for this (docs/distributed-performance.md, "2 Dec, later").

``FastRelay.take`` accepts only frames that ``wire.decode`` and the node's relay checks accept
too, compared field by field with the frame the general path accepted first, and frames its
output byte for byte as ``wire.encode`` does (tests/swarm/test_fast_relay.py holds it to both).
Anything else, a bad frame included, it leaves untouched for the general path, which answers
its errors. In an open swarm, through Q8_0 blocks, the checks, the blocks and the framing are one
compiled call (swarm/relay_kernel.py); a private swarm's MAC and other decoders keep the Python.

    RELAY in:  header | rows (rows, dim) f32 | step, n | n compute times | hops still to run | [MAC]
    out:       header | the same rows, then y (rows + 1, dim) | step, n + 1 | the n times, this one | the hops after
               the next | [MAC]   (at the last hop: a RELAYED to the client, no hops)
"""

from __future__ import annotations

import hmac
import struct
import time

import numpy as np

from swarm import relay, relay_kernel, trace, wire

_AFTER_SESSION = struct.Struct("<IIIHHII")  # the header after magic .. session: position .. body length
_TIME = struct.Struct("<I")
NOT_FINITE = f"activations hold NaN or infinity in float32 (float16 holds at most +-{wire.F16_MAX:g})"


class FastRelay:
    """The expected shape of one session's relays, from a frame the general path accepted (its
    ``hops``, parsed, and their packed bytes ``hops_raw``) on ``service`` (the NodeService). It
    holds neither the session nor the service: the session holds it."""

    def __init__(self, service, session, hops: tuple, hops_raw: bytes):
        key = service.key
        self.key = key
        self.dim, self.hops_raw, self.max_rows = service.dim, bytes(hops_raw), relay.MAX_HOPS - len(hops)
        flags = wire.FLAG_MAC if key is not None else 0
        # magic, version, type, dtype, flags, session: 24 bytes every relay of this session repeats
        self.prefix = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.RELAY, wire.F32, flags, session.sid,
                                       0, 0, 0, 0, 0, 0, 0)[:24]
        self.blocks = (session.first_block, session.last_block)
        self.view = service.view(session.first_block, session.last_block)
        self.mac_len = wire.MAC_LEN if key is not None else 0
        if hops:  # the output: a RELAY to the next hop, naming the hops after it
            nxt = hops[0]
            self.next = nxt
            self.out_head = (wire.RELAY, flags, nxt.session, nxt.first, nxt.last)
            self.rest = self.hops_raw[len(nxt.packed):]
        else:     # the last hop: a RELAYED answer to the client
            self.next = None
            self.out_head = (wire.RELAYED, flags, session.sid) + self.blocks
            self.rest = b""
        decoder = self.view.decoder
        # one compiled call does it all (swarm/relay_kernel.py): an open swarm's relays through Q8_0 blocks
        self.compiled = key is None and hasattr(decoder, "arrays") and session.cache.k.dtype == decoder.kv_dtype
        if self.compiled:
            if not relay_kernel.relay_step.signatures:  # (a node warms it when it opens its lanes)
                relay_kernel.warm_up()
            self.plan = plan = np.zeros(relay_kernel.PLAN_SIZE, np.int64)
            plan[relay_kernel.PREFIX:relay_kernel.PREFIX + 24] = np.frombuffer(self.prefix, np.uint8)
            plan[relay_kernel.DIM], plan[relay_kernel.MAX_ROWS] = self.dim, self.max_rows
            plan[relay_kernel.FIRST], plan[relay_kernel.LAST] = self.blocks
            kind, out_flags, out_sid, out_first, out_last = self.out_head
            plan[relay_kernel.OUT_TYPE], plan[relay_kernel.OUT_FLAGS] = kind, out_flags
            plan[relay_kernel.OUT_FIRST], plan[relay_kernel.OUT_LAST] = out_first, out_last
            plan[relay_kernel.OUT_TIMED] = self.next is None
            plan[relay_kernel.OUT_SESSION:relay_kernel.OUT_SESSION + 16] = np.frombuffer(out_sid, np.uint8)
            self.hops_array = np.frombuffer(self.hops_raw, np.uint8).copy()
            self.rest_array = np.frombuffer(self.rest, np.uint8).copy()
            self.state = np.zeros(2, np.int64)
            # the output at the most rows a frame may carry, with a lane's length prefix
            self.out_size = (4 + wire.HEADER.size + (self.max_rows + 1) * self.dim * 4 + wire.TRAILER_HEAD.size
                             + 4 * self.max_rows + len(self.rest))
            self.shape = decoder.shape()
            self.kv, self.arrays = None, ()  # the cache whose K and V ``arrays`` holds
            self.cos = self.sin = np.zeros((0, 0), np.float32)

    def take(self, service, session, lane, buf: memoryview) -> bool:
        """Run the relay in ``buf`` (a frame's bytes from ``lane``, length prefix stripped) if it is
        ``session``'s common case, and pass its output on (``service``: the NodeService): True.
        False, having changed nothing, for any other frame."""
        if self.compiled:
            return self._take_compiled(service, session, lane, buf)
        dim = self.dim
        if len(buf) < wire.HEADER.size or buf[:24] != self.prefix:
            return False
        position, rows, cols, first, last, _, body_len = _AFTER_SESSION.unpack_from(buf, 24)
        size = rows * dim * 4
        at = wire.HEADER.size + size + wire.TRAILER_HEAD.size  # the compute times' first byte
        n = rows - 1
        if (cols != dim or (first, last) != self.blocks or not 0 < rows <= self.max_rows
                or len(buf) != wire.HEADER.size + body_len + self.mac_len
                or body_len != size + wire.TRAILER_HEAD.size + 4 * n + len(self.hops_raw)
                or position != session.position or position >= session.cache.capacity or session.busy
                or session.lane is None or session.lane.closed):
            return False
        step, times = wire.TRAILER_HEAD.unpack_from(buf, at - wire.TRAILER_HEAD.size)
        if times != n or step >= 2**63 or buf[at + 4 * n:wire.HEADER.size + body_len] != self.hops_raw:
            return False
        if self.key is not None and not hmac.compare_digest(bytes(buf[-wire.MAC_LEN:]),
                                                            wire.mac(self.key, buf[:-wire.MAC_LEN])):
            return False
        received = np.frombuffer(buf, np.float32, rows * dim, wire.HEADER.size).reshape(rows, dim)
        if not wire.all_finite(received):
            return False
        # Taken: from here on, errors go to the session's client, as on the general path.
        lane.strikes = 0
        session.last_used = time.monotonic()  # (a step that fails touches it too, as on the general path)
        trace.mark("read", step)
        client = session.lane
        try:
            trace.mark("compute", step)
            t0 = time.perf_counter()
            try:
                y = self.view.forward_token(received[-1:], session.cache, position)
            except BaseException:
                session.cache.length = position  # nothing of this frame is kept
                raise
            seconds = time.perf_counter() - t0
            trace.mark("computed", step)
            if y.dtype != np.float32 or y.shape != (1, dim) or not wire.all_finite(y):
                raise ValueError(NOT_FINITE)
            us = min(int(seconds * 1e6), 2**32 - 1)
            kind, flags, sid, out_first, out_last = self.out_head
            header = wire.HEADER.pack(wire.MAGIC, wire.VERSION, kind, wire.F32, flags, sid, position, rows + 1, dim,
                                      out_first, out_last, 0 if self.next is not None else us,
                                      body_len + 4 * dim + 4 - len(self.hops_raw) + len(self.rest))
            data = b"".join((header, buf[wire.HEADER.size:wire.HEADER.size + size], np.ascontiguousarray(y),
                             wire.TRAILER_HEAD.pack(step, rows), buf[at:at + 4 * n], _TIME.pack(us), self.rest))
            if self.key is not None:
                data += wire.mac(self.key, data)
            trace.mark("framed", step)
            service.lane_pass_on(session, client, step, self.next, data)
        except Exception as e:
            service.lane_failed(session, client, step, e)
            return True
        service.count_step(session, 1, seconds)
        service.lane_steps += 1
        return True

    def _take_compiled(self, service, session, lane, buf: memoryview) -> bool:
        """``take`` as one compiled call (swarm/relay_kernel.py): the same frames, the same bytes."""
        cache = session.cache
        if session.busy or session.lane is None or session.lane.closed:
            return False
        if cache.k is not self.kv:  # (a session's cache is replaced when it grows)
            if cache.k.dtype != self.view.decoder.kv_dtype:
                return False
            self.arrays, self.kv = self.view.decoder.arrays(cache), cache.k
        position = cache.length
        if position >= len(self.cos):
            self.cos, self.sin = self.view.rope_table(min(max(position + 1, 2 * len(self.cos)), cache.capacity))
        plan = self.plan
        plan[relay_kernel.POSITION], plan[relay_kernel.CAPACITY] = position, cache.capacity
        out = service.relay_out
        if len(out) < self.out_size:
            out = service.relay_out = np.empty(self.out_size, np.uint8)
        began = time.perf_counter_ns() if trace.PREFIX else None
        self.state[relay_kernel.STEP] = -1
        try:
            n = relay_kernel.relay_step(np.frombuffer(buf, np.uint8), plan, self.hops_array, self.rest_array, out,
                                        self.state, *self.arrays, self.cos, self.sin, *self.shape)
        except Exception as e:  # raised in the blocks, the frame taken: nothing of it is kept, as on the general path
            if self.state[relay_kernel.STEP] < 0:
                raise
            cache.length = position
            lane.strikes = 0
            session.last_used = time.monotonic()
            service.lane_failed(session, session.lane, int(self.state[relay_kernel.STEP]), e)
            return True
        if n == relay_kernel.NOT_TAKEN:
            return False
        # Taken: computed, its K and V stored at the position, as forward_token leaves them.
        cache.length = position + 1
        lane.strikes = 0
        session.last_used = time.monotonic()
        step, us = int(self.state[relay_kernel.STEP]), int(self.state[relay_kernel.MICROSECONDS])
        if began is not None:  # (the frame's checks and its framing are inside the call: "blocks" in a trace)
            trace.mark("read", step, began)
            trace.mark("compute", step, began)
            trace.mark("computed", step)
        client = session.lane
        try:
            if n == relay_kernel.NOT_FINITE:
                raise ValueError(NOT_FINITE)
            trace.mark("framed", step)
            service.lane_pass_on(session, client, step, self.next, memoryview(out)[:n], framed=True)
        except Exception as e:
            service.lane_failed(session, client, step, e)
            return True
        service.count_step(session, 1, us / 1e6)
        service.lane_steps += 1
        return True
