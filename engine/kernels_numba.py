"""Numba kernels for the fast path: products computed on Q8_0 blocks held in memory as stored.

Q8_0 weights are kept as int8 values (rows, in) plus one float32 scale per 32-value block
(rows, in / 32): about the file's size (36 bytes per block instead of 34), not four times it.

Decode (one token): out[r] = sum_b d[r, b] * sum_i q[r, b, i] * x[b, i]. The obvious loop ends each
32-value block with a horizontal sum and runs at 3-5 GB/s here; keeping 32 lane accumulators
across all blocks of a row and summing them once lets LLVM emit straight SIMD (int8 -> float
conversion and FMA, 16 lanes per AVX-512 instruction): 18-25 GB/s on matrices that stay in cache,
10-11 GB/s streaming from memory, about 95% of a plain parallel read in Numba
(benchmarks/kernel_bandwidth.py). Activations stay float32: llama.cpp's Q8_0 rounding of
activations would make us differ from the F32 reference by far more than the rounding of a
different summation order.

Prompts (many tokens): the weight is dequantized into a reused float32 buffer and BLAS does the
product, which beats a hand-written kernel once there are more than a few tokens.

Each kernel is one parallel region over output rows (``prange`` over a fixed number of chunks,
so each thread allocates its 32-float accumulator once); fused weights (Q, K, V stacked, gate and
up stacked) mean one launch per group instead of one per matrix.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine import attention_numba

_CHUNKS = 64  # work items per parallel region: enough to balance 2-16 threads, few allocations


@njit(inline="always")
def aligned_scratch(n):
    """``n`` float32 of scratch starting on a 64-byte boundary (a cache line).

    The lane accumulators of ``q8_0_rows`` are loaded and stored at every block of a row. np.empty
    gives 16-byte alignment, and where the 128 bytes then straddled a 4 KB page (about 2 of 128
    placements), every one of those loads waited for the store before it: the row products ran
    3.4-3.6x slower (`benchmarks/scratch_alignment.py`, 1 Dec: 0.270-0.286 against 0.079 ms,
    1536 x 576, one thread). The allocator hands a thread the same chunk again and again, so one
    process in a few dozen decoded 3x slower for its whole life (a `node` in 1 of about 7
    three-node sets). The skip is at most 15 floats, as the buffer is at least 4-byte aligned."""
    buf = np.empty(n + 16, np.float32)
    skip = ((64 - buf.ctypes.data % 64) % 64) // 4
    return buf[skip:skip + n]


@njit(inline="always", fastmath=True)
def q8_0_rows(qs, d, x, out, r0, r1, acc):
    """out[r] = sum_b d[r, b] * (q[r, b, :] . x[b, :]) for rows r0..r1-1, with 32 lane
    accumulators kept across the row's blocks (``acc``: a 32-float scratch of the caller's)."""
    nb = qs.shape[1] // 32
    for r in range(r0, r1):
        for i in range(32):
            acc[i] = 0.0
        for b in range(nb):
            db = d[r, b]
            base = b * 32
            for i in range(32):
                acc[i] += db * (np.float32(qs[r, base + i]) * x[base + i])
        out[r] = acc.sum()


@njit(parallel=True, fastmath=True, cache=True)
def q8_0_matvec(qs, d, x, out):
    """qs: (R, C) int8, d: (R, C // 32) float32, x: (C,) float32 -> out: (R,) float32."""
    R = qs.shape[0]
    step = (R + _CHUNKS - 1) // _CHUNKS
    for c in prange(_CHUNKS):
        acc = aligned_scratch(32)
        q8_0_rows(qs, d, x, out, c * step, min(R, (c + 1) * step), acc)


@njit(parallel=True, fastmath=True, cache=True)
def q8_0_matvecs(qs, d, xs, out):
    """A few tokens at once: xs (T, C) -> out (T, R); each weight row is read once for all T."""
    R, C = qs.shape
    T = xs.shape[0]
    NB = C // 32
    step = (R + _CHUNKS - 1) // _CHUNKS
    for c in prange(_CHUNKS):
        acc = aligned_scratch(T * 32).reshape(T, 32)
        for r in range(c * step, min(R, (c + 1) * step)):
            acc[:, :] = 0.0
            for b in range(NB):
                db = d[r, b]
                base = b * 32
                for t in range(T):
                    for i in range(32):
                        acc[t, i] += db * (np.float32(qs[r, base + i]) * xs[t, base + i])
            for t in range(T):
                out[t, r] = acc[t].sum()


@njit(parallel=True, cache=True)
def q8_0_dequantize(qs, d, out):
    """(R, C) int8 and (R, C // 32) scales -> out (R, C) float32."""
    R, C = qs.shape
    NB = C // 32
    for r in prange(R):
        for b in range(NB):
            db = d[r, b]
            base = b * 32
            for i in range(32):
                out[r, base + i] = db * np.float32(qs[r, base + i])


# Every IEEE half as float32, indexed by its 16 bits: an exact conversion by table lookup.
_F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@intrinsic
def _copy32(typingctx, dst, src):
    """Copy 32 bytes from address ``src`` to address ``dst`` (integers): one unaligned move. Numba
    cannot tell the int8 output from the uint8 input apart (they may alias), so a loop of 32
    byte copies stays byte by byte; a fixed-size memcpy is two 16-byte (or one 32-byte) moves."""
    def codegen(context, builder, signature, args):
        to_ptr = lambda a: builder.inttoptr(a, ir.IntType(8).as_pointer())  # noqa: E731
        cgutils.raw_memcpy(builder, to_ptr(args[0]), to_ptr(args[1]), ir.Constant(ir.IntType(64), 32), 1)
        return context.get_dummy_value()

    return types.void(dst, src), codegen


@njit(nogil=True, cache=True)
def split_q8_0_blocks(src, f16_table, qs, d):
    """Stored Q8_0 blocks, flat: src (n * 34,) uint8 (f16 scale + 32 int8 each) -> qs (n * 32,) int8
    and d (n,) float32, written in place (all C-contiguous). Flat, so that a fragment's piece of a
    tensor and a row range of a stacked weight are both just a range of blocks. 3x faster than a
    loop copying the 32 values, 7x faster than slice assignment.

    One thread, without the GIL: while a model loads, the loader's read-ahead threads hash the
    next fragments on the other core, and a parallel region here stalled at its barrier whenever
    one of its threads waited for a core (0.5 GB/s instead of 3)."""
    n = d.shape[0]
    if src.shape[0] != n * 34 or qs.shape[0] != n * 32:
        raise ValueError("split_q8_0_blocks: sizes disagree")
    src_at, qs_at = src.ctypes.data, qs.ctypes.data
    for b in range(n):
        d[b] = f16_table[np.int64(src[b * 34]) | (np.int64(src[b * 34 + 1]) << 8)]
        _copy32(qs_at + b * 32, src_at + b * 34 + 2)


def split_q8_0(blocks: np.ndarray, qs: np.ndarray | None = None,
               d: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stored Q8_0 rows (R, NB * 34 bytes) -> (qs (R, C) int8, d (R, NB) f32), into qs and d if given
    (C-contiguous: fused weights are split straight into their rows)."""
    rows, nb = blocks.shape[0], blocks.shape[1] // 34
    qs = np.empty((rows, nb * 32), np.int8) if qs is None else qs
    d = np.empty((rows, nb), np.float32) if d is None else d
    split_q8_0_blocks(np.ascontiguousarray(blocks).reshape(-1), _F16_TO_F32, _flat(qs), _flat(d))
    return qs, d


def split_q8_0_pieces(pieces, qs: np.ndarray, d: np.ndarray) -> None:
    """A stored Q8_0 tensor given as consecutive pieces of bytes (one per fragment it spans, cut
    anywhere, even inside a block) -> qs, d (C-contiguous, n * 32 values and n scales) in place,
    without first joining the pieces: a block cut by a boundary is the only thing copied."""
    qs, d = _flat(qs), _flat(d)
    n, b, carry = d.shape[0], 0, b""
    for piece in pieces:
        buf = np.frombuffer(piece, np.uint8)
        if carry:  # complete the cut block with this piece's first bytes
            take = min(34 - len(carry), len(buf))
            carry += bytes(buf[:take])
            buf = buf[take:]
            if len(carry) < 34:
                continue
            split_q8_0_blocks(np.frombuffer(carry, np.uint8), _F16_TO_F32, qs[b * 32:(b + 1) * 32], d[b:b + 1])
            b, carry = b + 1, b""
        whole = min(len(buf) // 34, n - b)
        if whole:
            split_q8_0_blocks(buf[:whole * 34], _F16_TO_F32, qs[b * 32:(b + whole) * 32], d[b:b + whole])
        b += whole
        carry = bytes(buf[whole * 34:])
    if b != n or carry:
        raise ValueError(f"Q8_0 pieces hold {b * 34 + len(carry)} bytes, expected {n * 34}")


def _flat(a: np.ndarray) -> np.ndarray:
    """A C-contiguous array as 1-D, as a view (writes reach ``a``)."""
    if not a.flags.c_contiguous:
        raise ValueError("split_q8_0 writes into C-contiguous arrays only")
    return a.reshape(-1)


def warm_up() -> float:
    """Compile (or load from cache) every kernel on tiny inputs; returns the seconds it took."""
    import time

    start = time.perf_counter()
    qs = np.zeros((2, 32), np.int8)
    d = np.ones((2, 1), np.float32)
    q8_0_matvec(qs, d, np.ones(32, np.float32), np.empty(2, np.float32))
    q8_0_matvecs(qs, d, np.ones((2, 32), np.float32), np.empty((2, 2), np.float32))
    q8_0_dequantize(qs, d, np.empty((2, 32), np.float32))
    # Stored bytes always come read-only (verified fragments, mapped files): one specialization.
    split_q8_0_pieces([bytes(40), bytes(28)], np.empty((2, 32), np.int8), d)
    attention_numba.warm_up()
    return time.perf_counter() - start
