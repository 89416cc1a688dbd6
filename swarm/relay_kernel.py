"""A relay's common case as one compiled call: the frame's checks, the blocks, the output's framing.

``FastRelay`` (swarm/fast_relay.py) checks a session's relays in a handful of Python operations,
then calls the blocks, then frames the output; on a core that has just woken each of those
library calls costs tens of microseconds whatever it does. For an open swarm's float32 relays
through Q8_0 blocks (engine/fast_decode.py's StackedDecoder: the default model's), this kernel
does all of it in one call. SmolLM2's blocks 20-29 as a route's last hop, whole frames through
``lane_frame`` in one process: 0.13 ms less a frame after a 6 ms pause, 0.09 ms less back to back
(docs/distributed-performance.md, "2 Dec, morning").

It accepts exactly the frames ``FastRelay.take``'s Python checks accept (the same comparisons, on
the bytes), and writes exactly the bytes it writes, the length prefix of a lane first
(tests/swarm/test_fast_relay.py runs both paths on the same frames). Its compute time is read
from the same clock, inside the call.

    relay_step(frame, plan, hops, rest, out, state, *decoder.arrays(cache), cos, sin, *decoder.shape())
        -> the bytes written to ``out`` (> 0);
           NOT_TAKEN (nothing read beyond the frame, nothing written);
           NOT_FINITE (computed, K and V written at the position, the output holds NaN or infinity);
           or the blocks' exception (a division by zero), raised once the frame is taken (state[STEP] set)
"""

from __future__ import annotations

import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.fast_decode import decode_blocks
from swarm import wire

NOT_TAKEN = -1
NOT_FINITE = -2
HEADER = wire.HEADER.size         # (48; a global int is a constant to Numba)
TRAILER = wire.TRAILER_HEAD.size  # the step (8 bytes), how many compute times follow (2)

# ``plan``: int64, one session's expected frame and its output's header fields
PREFIX = 0      # 24 values: the bytes every relay of the session starts with (magic .. session)
DIM = 24        # the rows' width
FIRST, LAST = 25, 26  # the blocks the frame must name
MAX_ROWS = 27   # rows a frame may carry (the hops left of the relay's limit)
POSITION = 28   # the session's position now (the frame's must be it)
CAPACITY = 29   # its cache's positions
OUT_TYPE, OUT_FLAGS, OUT_FIRST, OUT_LAST = 30, 31, 32, 33
OUT_TIMED = 34  # 1: the header carries the compute time (a RELAYED, to the client)
OUT_SESSION = 35  # 16 values: the output's session id
PLAN_SIZE = 51
# ``state``: int64, written by a taken call
STEP, MICROSECONDS = 0, 1


@intrinsic
def _monotonic_ns(typingctx):
    """CLOCK_MONOTONIC in nanoseconds, libc's clock_gettime (the clock of time.perf_counter on
    Linux, the only system nodes run on); 0 if the call fails."""
    def codegen(context, builder, sig, args):
        i64, i32 = ir.IntType(64), ir.IntType(32)
        timespec = ir.LiteralStructType([i64, i64])
        clock_gettime = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [i32, timespec.as_pointer()]),
                                                       "clock_gettime")
        ts = cgutils.alloca_once_value(builder, ir.Constant(timespec, [ir.Constant(i64, 0), ir.Constant(i64, 0)]))
        builder.call(clock_gettime, [ir.Constant(i32, time.CLOCK_MONOTONIC), ts])  # (on failure ts stays 0)
        seconds = builder.load(builder.gep(ts, [ir.Constant(i32, 0), ir.Constant(i32, 0)]))
        nanoseconds = builder.load(builder.gep(ts, [ir.Constant(i32, 0), ir.Constant(i32, 1)]))
        return builder.add(builder.mul(seconds, ir.Constant(i64, 1_000_000_000)), nanoseconds)
    return types.int64(), codegen


@njit(inline="always")
def _u16(b, at):
    return np.int64(b[at]) | (np.int64(b[at + 1]) << 8)


@njit(inline="always")
def _u32(b, at):
    return _u16(b, at) | (_u16(b, at + 2) << 16)


@njit(inline="always")
def _put16(b, at, v):
    b[at] = v & 0xFF
    b[at + 1] = (v >> 8) & 0xFF


@njit(inline="always")
def _put32(b, at, v):
    _put16(b, at, v & 0xFFFF)
    _put16(b, at + 2, (v >> 16) & 0xFFFF)


@njit(inline="always")
def _fits(plan, position, attn_norm, ffn_norm, qkv_qs, qkv_d, o_qs, o_d, gu_qs, gu_d, down_qs, down_d, k_cache, v_cache,
          cos, sin):
    """The arrays agree with the plan and with each other (the caller keeps them so; checked here
    too, so that what this call may touch is known from its own arguments)."""
    L, dim = attn_norm.shape[0], plan[DIM]
    return (attn_norm.shape[1] == dim and ffn_norm.shape[0] == L and ffn_norm.shape[1] == dim
            and qkv_qs.shape[0] == L and qkv_d.shape[0] == L and o_qs.shape[0] == L and o_d.shape[0] == L
            and gu_qs.shape[0] == L and gu_d.shape[0] == L and down_qs.shape[0] == L and down_d.shape[0] == L
            and qkv_qs.shape[2] == dim and o_qs.shape[1] == dim and gu_qs.shape[2] == dim and down_qs.shape[1] == dim
            and k_cache.shape == v_cache.shape and k_cache.shape[0] == L and position < k_cache.shape[1]
            and position < cos.shape[0] and cos.shape == sin.shape)


@njit(inline="always")
def _accepted(frame, plan, hops):
    """The frame's rows if it is the session's common case (FastRelay.take's checks), else 0."""
    n = frame.shape[0]
    if n < HEADER:
        return 0
    for i in range(24):
        if frame[i] != plan[PREFIX + i]:
            return 0
    dim = plan[DIM]
    position, rows, cols = _u32(frame, 24), _u32(frame, 28), _u32(frame, 32)
    first, last, body = _u16(frame, 36), _u16(frame, 38), _u32(frame, 44)
    if cols != dim or first != plan[FIRST] or last != plan[LAST] or not 0 < rows <= plan[MAX_ROWS]:
        return 0
    size, times = rows * dim * 4, rows - 1
    if n != HEADER + body or body != size + TRAILER + 4 * times + hops.shape[0]:
        return 0
    if position != plan[POSITION] or position >= plan[CAPACITY]:
        return 0
    at = HEADER + size + TRAILER  # the compute times' first byte
    if _u16(frame, at - 2) != times or frame[at - 3] >= 128:  # (the step below 2**63)
        return 0
    for i in range(hops.shape[0]):
        if frame[at + 4 * times + i] != hops[i]:
            return 0
    x = frame[HEADER:HEADER + size].view(np.float32)
    for i in range(x.shape[0]):
        if not np.isfinite(x[i]):
            return 0
    return rows


# "parallel", with every automatic parallel loop off: it has none of its own (its copies run
# inline), but compiled plainly, cached, and called from a second process, it segfaulted here
# once when loaded from Numba's cache (2 Dec; numba/numba#8578 reports the same for a cached
# function calling a parallel one, here decode_blocks; a review could not reproduce it again)
_SERIAL_BUT_PARALLEL = dict(comprehension=False, reduction=False, inplace_binop=False, setitem=False, numpy=False,
                            stencil=False, fusion=False, prange=False)


@njit(cache=True, parallel=_SERIAL_BUT_PARALLEL)
def relay_step(frame, plan, hops, rest, out, state, attn_norm, ffn_norm, qkv_qs, qkv_d, o_qs, o_d, gu_qs, gu_d,
               down_qs, down_d, k_cache, v_cache, cos, sin, n_heads, n_kv, head_dim, eps):
    """frame: uint8 (a RELAY without its length prefix); out: uint8, room for the output and its prefix."""
    rows = _accepted(frame, plan, hops)
    dim = plan[DIM]
    size, times, position = rows * dim * 4, rows - 1, plan[POSITION]
    body = _u32(frame, 44) if rows else 0
    out_body = body + 4 * dim + 4 - hops.shape[0] + rest.shape[0]
    if rows == 0 or 4 + HEADER + out_body > out.shape[0] or not _fits(plan, position, attn_norm, ffn_norm, qkv_qs, qkv_d, o_qs, o_d,
                                                                  gu_qs, gu_d, down_qs, down_d, k_cache, v_cache, cos, sin):
        return NOT_TAKEN
    at = HEADER + size + TRAILER
    step = _u32(frame, at - 10) | (_u32(frame, at - 6) << 32)
    state[STEP] = step  # (before the blocks: a step that raises in them is taken, and its client told)
    h = frame[HEADER + size - 4 * dim:HEADER + size].view(np.float32).copy()  # the last row: this hop's input
    t0 = _monotonic_ns()
    decode_blocks(h, position, attn_norm, ffn_norm, qkv_qs, qkv_d, o_qs, o_d, gu_qs, gu_d, down_qs, down_d,
                  k_cache, v_cache, cos[position], sin[position], n_heads, n_kv, head_dim, eps)
    us = min(max(_monotonic_ns() - t0, 0) // 1000, 2**32 - 1)
    state[MICROSECONDS] = us
    for i in range(dim):
        if not np.isfinite(h[i]):
            return NOT_FINITE
    # the length prefix, then the header: magic, version, type, dtype, flags, session, position,
    # rows, columns, blocks, compute time, body length
    _put32(out, 0, HEADER + out_body)
    o = 4
    out[o:o + 5] = frame[0:5]
    out[o + 5], out[o + 6], out[o + 7] = plan[OUT_TYPE], frame[6], plan[OUT_FLAGS]
    for i in range(16):
        out[o + 8 + i] = plan[OUT_SESSION + i]
    _put32(out, o + 24, position)
    _put32(out, o + 28, rows + 1)
    _put32(out, o + 32, dim)
    _put16(out, o + 36, plan[OUT_FIRST])
    _put16(out, o + 38, plan[OUT_LAST])
    _put32(out, o + 40, us if plan[OUT_TIMED] else 0)
    _put32(out, o + 44, out_body)
    o += HEADER
    # the body: the rows received, this hop's output, the step and the times (this one added), the hops after the next
    out[o:o + size] = frame[HEADER:HEADER + size]
    o += size
    out[o:o + 4 * dim] = h.view(np.uint8)
    o += 4 * dim
    out[o:o + 8] = frame[at - 10:at - 2]
    _put16(out, o + 8, rows)
    o += TRAILER
    out[o:o + 4 * times] = frame[at:at + 4 * times]
    o += 4 * times
    _put32(out, o, us)
    o += 4
    out[o:o + rest.shape[0]] = rest
    return o + rest.shape[0]


def warm_up(kernel=None) -> float:
    """Compile ``relay_step`` (or load it from Numba's cache; or ``kernel``, a copy of it) with the
    argument types a node passes, before any session's step waits for it; returns the seconds taken."""
    import time
    import warnings

    from numba.core.errors import NumbaPerformanceWarning

    start = time.perf_counter()
    with warnings.catch_warnings():  # ("parallel" finds no loop to run in parallel: as meant, see above)
        warnings.simplefilter("ignore", NumbaPerformanceWarning)
        _call(kernel or relay_step)
    return time.perf_counter() - start


def _call(kernel) -> None:
    """``kernel`` on a frame it does not take, with arrays of the types a node's are."""
    i8, u8, u16, f32 = np.int8, np.uint8, np.uint16, np.float32
    q = lambda r, c: (np.zeros((1, r, c), i8), np.ones((1, r, c // 32), f32))  # noqa: E731
    kernel(np.frombuffer(bytes(HEADER), u8), np.zeros(PLAN_SIZE, np.int64), np.zeros(0, u8), np.zeros(0, u8),
           np.zeros(64, u8), np.zeros(2, np.int64), np.ones((1, 32), f32), np.ones((1, 32), f32), *q(96, 32),
           *q(32, 32), *q(64, 32), *q(32, 32), np.zeros((1, 2, 1, 32), u16), np.zeros((1, 2, 1, 32), u16),
           np.ones((2, 16), f32), np.zeros((2, 16), f32), 1, 1, 32, f32(1e-5))
