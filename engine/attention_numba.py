"""Numba attention for the fast path: a vectorizable exp and the prompt's causal softmax.

The reference (engine/ops.py) builds the whole masked score matrix and runs softmax through NumPy
in several single-threaded passes: at a 3000-token prompt that was most of the prompt time. Here
the two products stay in BLAS (scores = Q K^T per KV head, out = P V), and the part between them
is one parallel pass per score row that never leaves the cache: scale, causal mask, max, exp, sum,
normalize, all in place. The prompt goes through in chunks (engine/model.py), so the scores of one
chunk are (heads, chunk, positions): bounded by the chunk, never (positions x positions).

``fast_exp`` exists because np.exp inside Numba is a scalar libm call per value (LLVM has no vector
exp here); a polynomial with the exponent put in place by integer arithmetic vectorizes.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)  # ln 2 in two parts (Cody-Waite): n * _LN2_HI is exact
_LN2_LO = np.float32(1.4286068203094172e-06)


@intrinsic
def _int_bits_as_float(typingctx, bits):
    """The float32 whose bit pattern is the int32 ``bits`` (a reinterpretation, not a conversion)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def f16_bits_to_f32(typingctx, bits):
    """The IEEE half with bits ``bits`` (uint16) as float32, exactly (vcvtph2ps when vectorized)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def f32_to_f16_bits(typingctx, x):
    """float32 -> the bits (uint16) of the nearest IEEE half, ties to even (as numpy and ggml round)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@njit(inline="always", fastmath=True)
def fast_exp(x):
    """exp(x) for float32 x, relative error below 1e-6; x above 88 is taken as 88 (exp(88) is
    near float32's largest value) and results below 2^-126 flush to 0.

    exp(x) = 2^n e^r with n = round(x log2 e) and r = x - n ln 2 (|r| <= ln(2) / 2, ln 2 in two
    parts so that no rounding of x log2 e leaks into r): e^r from its degree-6 Taylor polynomial,
    2^n by writing n + 127 into the exponent bits.
    """
    x = min(x, np.float32(88.0))
    n = np.floor(max(x * _LOG2E, np.float32(-127.0)) + np.float32(0.5))
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = np.float32(1.0 / 720)
    p = p * r + np.float32(1.0 / 120)
    p = p * r + np.float32(1.0 / 24)
    p = p * r + np.float32(1.0 / 6)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    scale = _int_bits_as_float(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))
    return p * scale if n > np.float32(-127.0) else np.float32(0.0)


@njit(parallel=True, fastmath=True, cache=True)
def causal_softmax_(scores, first_pos, scale):
    """In place: scores (heads, T, S) of queries at positions first_pos.. over keys 0..S-1 ->
    softmax(scale * scores) over the keys each query may see (s <= first_pos + t), 0 elsewhere."""
    H, T, S = scores.shape
    for r in prange(H * T):
        row = scores[r // T, r % T]
        n = min(S, first_pos + r % T + 1)
        best = np.float32(-np.inf)
        for s in range(n):
            best = max(best, row[s])
        total = np.float32(0.0)
        for s in range(n):
            e = fast_exp((row[s] - best) * scale)
            row[s] = e
            total += e
        inv = np.float32(1.0) / total
        for s in range(n):
            row[s] *= inv
        for s in range(n, S):
            row[s] = 0.0


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, first_pos: int) -> np.ndarray:
    """ops.attention's contract, q: (T, H, hd), k, v: (S, KV, hd) -> (T, H, hd), with the softmax
    done by causal_softmax_ between the two BLAS products."""
    T, H, hd = q.shape
    S, KV, _ = k.shape
    G = H // KV
    qg = q.reshape(T, KV, G, hd).transpose(1, 2, 0, 3).reshape(KV, G * T, hd)            # (KV, G*T, hd)
    scores = qg @ k.transpose(1, 2, 0)                                                   # (KV, G*T, S)
    causal_softmax_(scores.reshape(KV * G, T, S), first_pos, np.float32(1.0 / np.sqrt(hd)))
    out = scores @ v.transpose(1, 0, 2)                                                  # (KV, G*T, hd)
    return out.reshape(KV, G, T, hd).transpose(2, 0, 1, 3).reshape(T, H, hd)


def warm_up() -> None:
    causal_softmax_(np.zeros((1, 2, 2), np.float32), 0, np.float32(1.0))
