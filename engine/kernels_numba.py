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
from numba import njit, prange

from engine import attention_numba

_CHUNKS = 64  # work items per parallel region: enough to balance 2-16 threads, few allocations


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
        acc = np.empty(32, np.float32)
        q8_0_rows(qs, d, x, out, c * step, min(R, (c + 1) * step), acc)


@njit(parallel=True, fastmath=True, cache=True)
def q8_0_matvecs(qs, d, xs, out):
    """A few tokens at once: xs (T, C) -> out (T, R); each weight row is read once for all T."""
    R, C = qs.shape
    T = xs.shape[0]
    NB = C // 32
    step = (R + _CHUNKS - 1) // _CHUNKS
    for c in prange(_CHUNKS):
        acc = np.empty((T, 32), np.float32)
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


@njit(parallel=True, cache=True)
def split_q8_0_into(blocks, f16_table, qs, d):
    """Stored Q8_0 rows (R, NB * 34) uint8 (f16 scale + 32 int8 per block) -> qs (R, NB * 32) int8
    and d (R, NB) float32, written in place (so fused weights are split straight into their rows)."""
    R = blocks.shape[0]
    NB = blocks.shape[1] // 34
    for r in prange(R):
        row = blocks[r]
        values = row.view(np.int8)
        for b in range(NB):
            d[r, b] = f16_table[np.int64(row[b * 34]) | (np.int64(row[b * 34 + 1]) << 8)]
            qs[r, b * 32:(b + 1) * 32] = values[b * 34 + 2:(b + 1) * 34]


def split_q8_0(blocks: np.ndarray, qs: np.ndarray | None = None,
               d: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stored Q8_0 rows (R, NB * 34 bytes) -> (qs (R, C) int8, d (R, NB) f32), into qs and d if given."""
    rows, nb = blocks.shape[0], blocks.shape[1] // 34
    qs = np.empty((rows, nb * 32), np.int8) if qs is None else qs
    d = np.empty((rows, nb), np.float32) if d is None else d
    split_q8_0_into(np.ascontiguousarray(blocks), _F16_TO_F32, qs, d)
    return qs, d


def warm_up() -> float:
    """Compile (or load from cache) every kernel on tiny inputs; returns the seconds it took."""
    import time

    start = time.perf_counter()
    qs = np.zeros((2, 32), np.int8)
    d = np.ones((2, 1), np.float32)
    q8_0_matvec(qs, d, np.ones(32, np.float32), np.empty(2, np.float32))
    q8_0_matvecs(qs, d, np.ones((2, 32), np.float32), np.empty((2, 2), np.float32))
    q8_0_dequantize(qs, d, np.empty((2, 32), np.float32))
    split_q8_0(np.zeros((2, 34), np.uint8))
    attention_numba.warm_up()
    return time.perf_counter() - start
