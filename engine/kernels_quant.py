"""Numba kernels for weights held exactly as the GGUF file stores them: F16, BF16, Q4_0, Q4_1, Q5_0,
Q5_1, Q4_K, Q5_K and Q6_K.

A weight is its file bytes, (rows, bytes per row) uint8, never expanded: memory stays at the file's
size. Each type's layout is written twice, from llama.cpp's dequantize_row_* (ggml-quants.c), and
both are checked against gguf-py's ``quants.dequantize`` (tests/engine/test_quant_kernels.py):

* ``_dot_*``: one row times one token's activations. Values are formed in SIMD lanes (byte loads,
  nibble masks, int -> float) and added into 32 lane accumulators kept across the whole row and
  summed once at its end, the trick that makes the Q8_0 kernel fast (engine/kernels_numba.py).
  ``matvecs`` runs it for every row and every token (T <= 8: each row is read from memory once).
* ``_unpack_*``: one block to float32; ``dequantize`` fills a buffer for BLAS on prompts.

Measured on one core of this machine (2048 x 2048, ``NUMBA_NUM_THREADS=1``, CPU time), in
Gweights/s: F16 24, BF16 23, Q4_0 15, Q4_1 14, Q4_K 13, Q6_K 10.6, Q5_0 9.4, Q5_1 8.3, Q5_K 8.0
(Q8_0's kernel: 18). Three things mattered, each checked in the machine code (``inspect_asm``):
accumulators on the stack (``_stack_f32``: LLVM keeps them in zmm registers across blocks; in a
heap array they were loaded and stored every block, half the speed), byte lanes kept narrow
(``_u8f``, ``_i8f``, ``_bit4``: Numba's integer rules widen to 64 bits, 8 lanes per instruction
instead of 16), and one compiled kernel per type (one kernel branching on the type ran a third
slower).

Activations stay float32, as for Q8_0: llama.cpp rounds them to Q8_0/Q8_K blocks (or F16), which
would take us away from the F32 reference that ``validate`` holds us to.

Half floats: Numba has no float16 type, so ``_f16`` is an LLVM intrinsic (bitcast to half, fpext),
which LLVM turns into vcvtph2ps on 16 values at a time.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# Block geometry per stored type: (values per block, bytes per block). Same numbers as ggml's.
BLOCKS = {"F16": (32, 64), "BF16": (32, 64), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
          "Q5_1": (32, 24), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
KINDS = {name: i for i, name in enumerate(BLOCKS)}
F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K = range(len(BLOCKS))
_CHUNKS = 64  # work items per parallel region, as in kernels_numba


# -- scalar helpers -------------------------------------------------------------------------------
@intrinsic
def _f16(typingctx, bits):
    """IEEE half (the low 16 bits of an integer) -> float32, as one fpext LLVM can vectorize."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width > 16:
            v = builder.trunc(v, ir.IntType(16))
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _bf16(typingctx, bits):
    """bfloat16 (the low 16 bits of an integer) -> float32: the bits become the float's top half."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        i32 = ir.IntType(32)
        v = builder.trunc(v, ir.IntType(16)) if v.type.width > 16 else v
        v = builder.shl(builder.zext(v, i32) if v.type.width < 32 else v, ir.Constant(i32, 16))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _u8f(typingctx, bits):
    """The low 8 bits of an integer, unsigned, as float32: lets LLVM keep byte lanes narrow
    (zero-extend to 32 bits and convert 16 at a time) instead of widening to 64-bit lanes."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        v = builder.trunc(v, ir.IntType(8)) if v.type.width > 8 else v
        return builder.uitofp(v, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _i8f(typingctx, bits):
    """The low 8 bits of an integer, signed, as float32 (for the offset types: q - 8, q - 16, q - 32)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        v = builder.trunc(v, ir.IntType(8)) if v.type.width > 8 else v
        return builder.sitofp(v, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _bit4(typingctx, bits, i):
    """((bits >> i) & 1) << 4 as uint8, on 32-bit values: the fifth bit of a Q5 value. Written as an
    intrinsic because Numba's integer rules widen the shift to 64 bits, which vectorizes 8 lanes
    at a time instead of 16 (Q5_0 ran at 5.7 instead of 9.7 Gweights/s on one core)."""
    if not (isinstance(bits, types.Integer) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)

        def to32(v):
            if v.type.width > 32:
                return builder.trunc(v, i32)
            return builder.zext(v, i32) if v.type.width < 32 else v

        v = builder.lshr(to32(args[0]), to32(args[1]))
        v = builder.shl(builder.and_(v, ir.Constant(i32, 1)), ir.Constant(i32, 4))
        return builder.trunc(v, ir.IntType(8))

    return types.uint8(bits, i), codegen


@intrinsic
def _stack_f32(typingctx, n):
    """A pointer to ``n`` (a literal) float32 on the stack, for the lane accumulators. LLVM keeps
    stack memory that nothing else can point to in registers across a row's blocks; accumulators
    in a heap array (np.empty) are loaded and stored every block instead, which halved the speed."""
    if not isinstance(n, types.IntegerLiteral):
        return None

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(types.float32), size=n.literal_value)

    return types.CPointer(types.float32)(n), codegen


@njit(inline="always")
def _half(w, r, p):
    """The f16 stored little-endian at w[r, p:p + 2]."""
    return _f16(np.uint16(w[r, p]) | (np.uint16(w[r, p + 1]) << np.uint16(8)))


@njit(inline="always")
def _u32(w, r, p):
    return (np.uint32(w[r, p]) | (np.uint32(w[r, p + 1]) << np.uint32(8)) | (np.uint32(w[r, p + 2]) << np.uint32(16))
            | (np.uint32(w[r, p + 3]) << np.uint32(24)))


@njit(inline="always")
def _k_scale_min(w, r, p, j):
    """Q4_K/Q5_K: the 6-bit scale and min of sub-block j (0-7) from the 12 packed bytes at w[r, p:]."""
    if j < 4:
        return np.float32(w[r, p + j] & 63), np.float32(w[r, p + j + 4] & 63)
    sc = (w[r, p + j + 4] & 15) | ((w[r, p + j - 4] >> 6) << 4)
    mn = (w[r, p + j + 4] >> 4) | ((w[r, p + j] >> 6) << 4)
    return np.float32(sc), np.float32(mn)


# -- layouts: one block of row r -> float32 values at out[r, o:o + block] ----------------------------
# Written from llama.cpp's dequantize_row_* (ggml-quants.c); the tests hold them to gguf-py.
@njit(inline="always", fastmath=True)
def _unpack_f16(w, r, b, out, o):
    for i in range(32):
        out[r, o + i] = _f16(np.uint16(w[r, 64 * b + 2 * i]) | (np.uint16(w[r, 64 * b + 2 * i + 1]) << np.uint16(8)))


@njit(inline="always", fastmath=True)
def _unpack_bf16(w, r, b, out, o):
    for i in range(32):
        out[r, o + i] = _bf16(np.uint16(w[r, 64 * b + 2 * i]) | (np.uint16(w[r, 64 * b + 2 * i + 1]) << np.uint16(8)))


@njit(inline="always", fastmath=True)
def _unpack_q4_0(w, r, b, out, o):
    p = b * 18  # d (f16), 16 bytes: value i in the low nibble of byte i, value 16 + i in its high nibble
    d = _half(w, r, p)
    for i in range(16):
        q = w[r, p + 2 + i]
        out[r, o + i] = d * _i8f((q & 15) - 8)
        out[r, o + 16 + i] = d * _i8f((q >> 4) - 8)


@njit(inline="always", fastmath=True)
def _unpack_q4_1(w, r, b, out, o):
    p = b * 20  # d, m (f16), nibbles as Q4_0; value = d * q + m
    d, m = _half(w, r, p), _half(w, r, p + 2)
    for i in range(16):
        q = w[r, p + 4 + i]
        out[r, o + i] = d * _u8f(q & 15) + m
        out[r, o + 16 + i] = d * _u8f(q >> 4) + m


@njit(inline="always", fastmath=True)
def _unpack_q5_0(w, r, b, out, o):
    p = b * 22  # d (f16), qh: the 32 fifth bits (u32, bit i for value i), nibbles as Q4_0; q - 16
    d = _half(w, r, p)
    qh = _u32(w, r, p + 2)
    for i in range(16):
        q = w[r, p + 6 + i]
        out[r, o + i] = d * _i8f(((q & 15) | _bit4(qh, i)) - 16)
        out[r, o + 16 + i] = d * _i8f(((q >> 4) | _bit4(qh, i + 16)) - 16)


@njit(inline="always", fastmath=True)
def _unpack_q5_1(w, r, b, out, o):
    p = b * 24  # d, m (f16), qh (u32), nibbles; value = d * q + m
    d, m = _half(w, r, p), _half(w, r, p + 2)
    qh = _u32(w, r, p + 4)
    for i in range(16):
        q = w[r, p + 8 + i]
        out[r, o + i] = d * _u8f((q & 15) | _bit4(qh, i)) + m
        out[r, o + 16 + i] = d * _u8f((q >> 4) | _bit4(qh, i + 16)) + m


@njit(inline="always", fastmath=True)
def _unpack_q4_k(w, r, b, out, o):
    # d, dmin (f16), 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, 128 bytes of nibbles:
    # bytes 32c..32c+31 hold sub-block 2c in their low nibbles and 2c + 1 in their high nibbles.
    p = b * 144
    d, dmin = _half(w, r, p), _half(w, r, p + 2)
    for c in range(4):
        s1, m1 = _k_scale_min(w, r, p + 4, 2 * c)
        s2, m2 = _k_scale_min(w, r, p + 4, 2 * c + 1)
        d1, d2, n1, n2 = d * s1, d * s2, dmin * m1, dmin * m2
        for i in range(32):
            q = w[r, p + 16 + 32 * c + i]
            out[r, o + 64 * c + i] = d1 * _u8f(q & 15) - n1
            out[r, o + 64 * c + 32 + i] = d2 * _u8f(q >> 4) - n2


@njit(inline="always", fastmath=True)
def _unpack_q5_k(w, r, b, out, o):
    # As Q4_K, with 32 bytes of fifth bits after the scales: bit j of byte i is sub-block j's.
    p = b * 176
    d, dmin = _half(w, r, p), _half(w, r, p + 2)
    for c in range(4):
        s1, m1 = _k_scale_min(w, r, p + 4, 2 * c)
        s2, m2 = _k_scale_min(w, r, p + 4, 2 * c + 1)
        d1, d2, n1, n2 = d * s1, d * s2, dmin * m1, dmin * m2
        for i in range(32):
            q, h = w[r, p + 48 + 32 * c + i], w[r, p + 16 + i]
            out[r, o + 64 * c + i] = d1 * _u8f((q & 15) | _bit4(h, 2 * c)) - n1
            out[r, o + 64 * c + 32 + i] = d2 * _u8f((q >> 4) | _bit4(h, 2 * c + 1)) - n2


@njit(inline="always", fastmath=True)
def _unpack_q6_k(w, r, b, out, o):
    # 128 bytes of low nibbles, 64 of 2-bit high parts, 16 int8 scales (one per 16 values), d (f16).
    # Two halves of 128 values; in each, byte l of ql/qh gives values l, l + 32, l + 64, l + 96.
    p = b * 210
    d = _half(w, r, p + 208)
    for half in range(2):
        ql, qh, sc, oo = p + 64 * half, p + 128 + 32 * half, p + 192 + 8 * half, o + 128 * half
        for k in range(2):  # l in 16k..16k+15 shares the scales sc[k], sc[k + 2], sc[k + 4], sc[k + 6]
            s1, s2 = d * _i8f(w[r, sc + k]), d * _i8f(w[r, sc + k + 2])
            s3, s4 = d * _i8f(w[r, sc + k + 4]), d * _i8f(w[r, sc + k + 6])
            for i in range(16):
                l = 16 * k + i
                a, c, h = w[r, ql + l], w[r, ql + l + 32], w[r, qh + l]
                out[r, oo + l] = s1 * _i8f(((a & 15) | ((h & 3) << 4)) - 32)
                out[r, oo + l + 32] = s2 * _i8f(((c & 15) | (((h >> 2) & 3) << 4)) - 32)
                out[r, oo + l + 64] = s3 * _i8f(((a >> 4) | (((h >> 4) & 3) << 4)) - 32)
                out[r, oo + l + 96] = s4 * _i8f(((c >> 4) | (((h >> 6) & 3) << 4)) - 32)


# -- the same layouts as dot products: row r of w . xs[t] ---------------------------------------------
# Each adds into 32 lane accumulators (``acc``) across the whole row and sums them once at the end:
# the inner loops are then plain SIMD (byte loads, nibble masks, int -> float, FMA), no horizontal
# sum per block. Values are formed exactly as in the unpack functions above.
@njit(inline="always", fastmath=True)
def _dot_f16(w, r, xs, t, acc):
    for b in range(xs.shape[1] // 32):
        for i in range(32):
            v = _f16(np.uint16(w[r, 64 * b + 2 * i]) | (np.uint16(w[r, 64 * b + 2 * i + 1]) << np.uint16(8)))
            acc[i] += v * xs[t, 32 * b + i]


@njit(inline="always", fastmath=True)
def _dot_bf16(w, r, xs, t, acc):
    for b in range(xs.shape[1] // 32):
        for i in range(32):
            v = _bf16(np.uint16(w[r, 64 * b + 2 * i]) | (np.uint16(w[r, 64 * b + 2 * i + 1]) << np.uint16(8)))
            acc[i] += v * xs[t, 32 * b + i]


@njit(inline="always", fastmath=True)
def _dot_q4_0(w, r, xs, t, acc):
    for b in range(xs.shape[1] // 32):
        p, x0 = b * 18, b * 32
        d = _half(w, r, p)
        for i in range(16):
            q = w[r, p + 2 + i]
            acc[i] += d * (_i8f((q & 15) - 8) * xs[t, x0 + i])
            acc[16 + i] += d * (_i8f((q >> 4) - 8) * xs[t, x0 + 16 + i])


@njit(inline="always", fastmath=True)
def _dot_q4_1(w, r, xs, t, acc):
    for b in range(xs.shape[1] // 32):
        p, x0 = b * 20, b * 32
        d, m = _half(w, r, p), _half(w, r, p + 2)
        for i in range(16):
            q = w[r, p + 4 + i]
            acc[i] += (d * _u8f(q & 15) + m) * xs[t, x0 + i]
            acc[16 + i] += (d * _u8f(q >> 4) + m) * xs[t, x0 + 16 + i]


@njit(inline="always", fastmath=True)
def _dot_q5_0(w, r, xs, t, acc):
    for b in range(xs.shape[1] // 32):
        p, x0 = b * 22, b * 32
        d = _half(w, r, p)
        qh = _u32(w, r, p + 2)
        for i in range(16):
            q = w[r, p + 6 + i]
            acc[i] += d * (_i8f(((q & 15) | _bit4(qh, i)) - 16) * xs[t, x0 + i])
            acc[16 + i] += d * (_i8f(((q >> 4) | _bit4(qh, i + 16)) - 16) * xs[t, x0 + 16 + i])


@njit(inline="always", fastmath=True)
def _dot_q5_1(w, r, xs, t, acc):
    for b in range(xs.shape[1] // 32):
        p, x0 = b * 24, b * 32
        d, m = _half(w, r, p), _half(w, r, p + 2)
        qh = _u32(w, r, p + 4)
        for i in range(16):
            q = w[r, p + 8 + i]
            acc[i] += (d * _u8f((q & 15) | _bit4(qh, i)) + m) * xs[t, x0 + i]
            acc[16 + i] += (d * _u8f((q >> 4) | _bit4(qh, i + 16)) + m) * xs[t, x0 + 16 + i]


@njit(inline="always", fastmath=True)
def _dot_q4_k(w, r, xs, t, acc):
    for b in range(xs.shape[1] // 256):
        p = b * 144
        d, dmin = _half(w, r, p), _half(w, r, p + 2)
        for c in range(4):
            s1, m1 = _k_scale_min(w, r, p + 4, 2 * c)
            s2, m2 = _k_scale_min(w, r, p + 4, 2 * c + 1)
            d1, d2, n1, n2 = d * s1, d * s2, dmin * m1, dmin * m2
            q0, x0 = p + 16 + 32 * c, 256 * b + 64 * c
            for i in range(32):
                q = w[r, q0 + i]
                acc[i] += (d1 * _u8f(q & 15) - n1) * xs[t, x0 + i] + (d2 * _u8f(q >> 4) - n2) * xs[t, x0 + 32 + i]


@njit(inline="always", fastmath=True)
def _dot_q5_k(w, r, xs, t, acc):
    for b in range(xs.shape[1] // 256):
        p = b * 176
        d, dmin = _half(w, r, p), _half(w, r, p + 2)
        for c in range(4):
            s1, m1 = _k_scale_min(w, r, p + 4, 2 * c)
            s2, m2 = _k_scale_min(w, r, p + 4, 2 * c + 1)
            d1, d2, n1, n2 = d * s1, d * s2, dmin * m1, dmin * m2
            q0, x0 = p + 48 + 32 * c, 256 * b + 64 * c
            for i in range(32):
                q, h = w[r, q0 + i], w[r, p + 16 + i]
                acc[i] += ((d1 * _u8f((q & 15) | _bit4(h, 2 * c)) - n1) * xs[t, x0 + i]
                           + (d2 * _u8f((q >> 4) | _bit4(h, 2 * c + 1)) - n2) * xs[t, x0 + 32 + i])


@njit(inline="always", fastmath=True)
def _dot_q6_k(w, r, xs, t, acc):
    for b in range(xs.shape[1] // 256):
        p = b * 210
        d = _half(w, r, p + 208)
        for half in range(2):
            ql, qh, sc, x0 = p + 64 * half, p + 128 + 32 * half, p + 192 + 8 * half, 256 * b + 128 * half
            for k in range(2):
                s1, s2 = d * _i8f(w[r, sc + k]), d * _i8f(w[r, sc + k + 2])
                s3, s4 = d * _i8f(w[r, sc + k + 4]), d * _i8f(w[r, sc + k + 6])
                for i in range(16):
                    l = 16 * k + i
                    a, c, h = w[r, ql + l], w[r, ql + l + 32], w[r, qh + l]
                    acc[l] += (s1 * (_i8f(((a & 15) | ((h & 3) << 4)) - 32) * xs[t, x0 + l])
                               + s2 * (_i8f(((c & 15) | (((h >> 2) & 3) << 4)) - 32) * xs[t, x0 + l + 32])
                               + s3 * (_i8f(((a >> 4) | (((h >> 4) & 3) << 4)) - 32) * xs[t, x0 + l + 64])
                               + s4 * (_i8f(((c >> 4) | (((h >> 6) & 3) << 4)) - 32) * xs[t, x0 + l + 96]))


@njit(inline="always")
def _unpack_row(kind, w, r, out):
    """Row r of w -> out[r, :] float32."""
    if kind == Q4_K:
        for b in range(out.shape[1] // 256):
            _unpack_q4_k(w, r, b, out, 256 * b)
    elif kind == Q6_K:
        for b in range(out.shape[1] // 256):
            _unpack_q6_k(w, r, b, out, 256 * b)
    elif kind == Q5_K:
        for b in range(out.shape[1] // 256):
            _unpack_q5_k(w, r, b, out, 256 * b)
    elif kind == Q5_0:
        for b in range(out.shape[1] // 32):
            _unpack_q5_0(w, r, b, out, 32 * b)
    elif kind == Q4_0:
        for b in range(out.shape[1] // 32):
            _unpack_q4_0(w, r, b, out, 32 * b)
    elif kind == F16:
        for b in range(out.shape[1] // 32):
            _unpack_f16(w, r, b, out, 32 * b)
    elif kind == Q5_1:
        for b in range(out.shape[1] // 32):
            _unpack_q5_1(w, r, b, out, 32 * b)
    elif kind == Q4_1:
        for b in range(out.shape[1] // 32):
            _unpack_q4_1(w, r, b, out, 32 * b)
    else:
        for b in range(out.shape[1] // 32):
            _unpack_bf16(w, r, b, out, 32 * b)


# -- kernels -----------------------------------------------------------------------------------------
# One kernel per type, each its own compiled function: the same loop with a branch on the type
# inside ran a third slower (LLVM optimized the one big function less well: Q4_0 9.6 against
# 15 Gweights/s on one core), and a type's kernel is compiled only when a model uses it.
# For each row, the row is read from memory once and stays in L1 while each token's product is taken.
@njit(inline="always")
def _zero(acc):
    for i in range(32):
        acc[i] = 0.0
    return acc


@njit(parallel=True, fastmath=True, cache=True)
def _matvecs_f16(w, xs, out):
    step = (w.shape[0] + _CHUNKS - 1) // _CHUNKS
    for c in prange(_CHUNKS):
        acc = carray(_stack_f32(32), (32,))
        for r in range(c * step, min(w.shape[0], (c + 1) * step)):
            for t in range(xs.shape[0]):
                _dot_f16(w, r, xs, t, _zero(acc))
                out[t, r] = acc.sum()


@njit(parallel=True, fastmath=True, cache=True)
def _matvecs_bf16(w, xs, out):
    step = (w.shape[0] + _CHUNKS - 1) // _CHUNKS
    for c in prange(_CHUNKS):
        acc = carray(_stack_f32(32), (32,))
        for r in range(c * step, min(w.shape[0], (c + 1) * step)):
            for t in range(xs.shape[0]):
                _dot_bf16(w, r, xs, t, _zero(acc))
                out[t, r] = acc.sum()


@njit(parallel=True, fastmath=True, cache=True)
def _matvecs_q4_0(w, xs, out):
    step = (w.shape[0] + _CHUNKS - 1) // _CHUNKS
    for c in prange(_CHUNKS):
        acc = carray(_stack_f32(32), (32,))
        for r in range(c * step, min(w.shape[0], (c + 1) * step)):
            for t in range(xs.shape[0]):
                _dot_q4_0(w, r, xs, t, _zero(acc))
                out[t, r] = acc.sum()


@njit(parallel=True, fastmath=True, cache=True)
def _matvecs_q4_1(w, xs, out):
    step = (w.shape[0] + _CHUNKS - 1) // _CHUNKS
    for c in prange(_CHUNKS):
        acc = carray(_stack_f32(32), (32,))
        for r in range(c * step, min(w.shape[0], (c + 1) * step)):
            for t in range(xs.shape[0]):
                _dot_q4_1(w, r, xs, t, _zero(acc))
                out[t, r] = acc.sum()


@njit(parallel=True, fastmath=True, cache=True)
def _matvecs_q5_0(w, xs, out):
    step = (w.shape[0] + _CHUNKS - 1) // _CHUNKS
    for c in prange(_CHUNKS):
        acc = carray(_stack_f32(32), (32,))
        for r in range(c * step, min(w.shape[0], (c + 1) * step)):
            for t in range(xs.shape[0]):
                _dot_q5_0(w, r, xs, t, _zero(acc))
                out[t, r] = acc.sum()


@njit(parallel=True, fastmath=True, cache=True)
def _matvecs_q5_1(w, xs, out):
    step = (w.shape[0] + _CHUNKS - 1) // _CHUNKS
    for c in prange(_CHUNKS):
        acc = carray(_stack_f32(32), (32,))
        for r in range(c * step, min(w.shape[0], (c + 1) * step)):
            for t in range(xs.shape[0]):
                _dot_q5_1(w, r, xs, t, _zero(acc))
                out[t, r] = acc.sum()


@njit(parallel=True, fastmath=True, cache=True)
def _matvecs_q4_k(w, xs, out):
    step = (w.shape[0] + _CHUNKS - 1) // _CHUNKS
    for c in prange(_CHUNKS):
        acc = carray(_stack_f32(32), (32,))
        for r in range(c * step, min(w.shape[0], (c + 1) * step)):
            for t in range(xs.shape[0]):
                _dot_q4_k(w, r, xs, t, _zero(acc))
                out[t, r] = acc.sum()


@njit(parallel=True, fastmath=True, cache=True)
def _matvecs_q5_k(w, xs, out):
    step = (w.shape[0] + _CHUNKS - 1) // _CHUNKS
    for c in prange(_CHUNKS):
        acc = carray(_stack_f32(32), (32,))
        for r in range(c * step, min(w.shape[0], (c + 1) * step)):
            for t in range(xs.shape[0]):
                _dot_q5_k(w, r, xs, t, _zero(acc))
                out[t, r] = acc.sum()


@njit(parallel=True, fastmath=True, cache=True)
def _matvecs_q6_k(w, xs, out):
    step = (w.shape[0] + _CHUNKS - 1) // _CHUNKS
    for c in prange(_CHUNKS):
        acc = carray(_stack_f32(32), (32,))
        for r in range(c * step, min(w.shape[0], (c + 1) * step)):
            for t in range(xs.shape[0]):
                _dot_q6_k(w, r, xs, t, _zero(acc))
                out[t, r] = acc.sum()


_MATVECS = (_matvecs_f16, _matvecs_bf16, _matvecs_q4_0, _matvecs_q4_1, _matvecs_q5_0, _matvecs_q5_1,  # KINDS order
            _matvecs_q4_k, _matvecs_q5_k, _matvecs_q6_k)


def matvecs(kind: int, w: np.ndarray, xs: np.ndarray, out: np.ndarray) -> None:
    """w: (R, bytes per row) uint8 blocks of type ``kind``; xs: (T, C) float32 -> out: (T, R)."""
    _MATVECS[kind](w, xs, out)


@njit(parallel=True, fastmath=True, cache=True)
def dequantize(kind, w, out):
    """Rows of blocks (R, bytes per row) -> out (R, C) float32, for BLAS on prompts."""
    for r in prange(out.shape[0]):
        _unpack_row(kind, w, r, out)


def warm_up(kind: int) -> float:
    """Compile (or load from Numba's cache) the kernels of one type; returns the seconds it took."""
    import time

    start = time.perf_counter()
    block, size = list(BLOCKS.values())[kind]
    w = np.zeros((2, size), np.uint8)
    w.flags.writeable = False  # weights are read-only views of the loaded bytes
    matvecs(kind, w, np.ones((1, block), np.float32), np.empty((1, 2), np.float32))
    dequantize(kind, w, np.empty((2, block), np.float32))
    return time.perf_counter() - start
