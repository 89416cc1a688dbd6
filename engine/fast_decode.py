"""One token through every block in a single Numba call: the fast path's decode step.

Calling a kernel per matrix from Python costs twice over at decode time: the glue between calls
(norms, RoPE, attention in NumPy: about 4.7 ms per token on SmolLM2-135M) and kernels that run half
as fast when threads idle between them (18.8 ms in the model against 9.8 ms back to back). So, as
llama2.c's run.c does, the whole pass for one token is one function here: the blocks' Q8_0
weights are stacked (layer, rows, cols) and every step of every block runs inside one call, as
parallel regions over output rows or (KV head, chunk of cached positions).

The arithmetic is the reference's (engine/ops.py) in float32: RMSNorm as ggml rounds it, RoPE on
adjacent pairs with the same precomputed angles, softmax attention over the KV cache, SwiGLU;
K and V are cached in F16, as llama.cpp caches them.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from engine.attention_numba import f16_bits_to_f32, f32_to_f16_bits, fast_exp
from engine.kernels_numba import _CHUNKS, aligned_scratch
from engine.kernels_numba import q8_0_rows as _rows



@njit(fastmath=False)
def _rms_norm(x, w, eps, out):
    s = 0.0  # float64, as ggml sums
    for i in range(x.shape[0]):
        s += np.float64(x[i] * x[i])
    mean = np.float32(s / x.shape[0])
    scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps))
    for i in range(x.shape[0]):
        out[i] = (x[i] * scale) * w[i]


@njit(fastmath=True)
def _rope(v, n_heads, head_dim, cos, sin):
    half = cos.shape[0]
    for h in range(n_heads):
        base = h * head_dim
        for i in range(half):
            x0 = v[base + 2 * i]
            x1 = v[base + 2 * i + 1]
            v[base + 2 * i] = x0 * cos[i] - x1 * sin[i]
            v[base + 2 * i + 1] = x0 * sin[i] + x1 * cos[i]


@njit(inline="always")
def _scratch(dim, q_dim, kv_dim, ffn, n_heads, head_dim, pos):
    """One step's buffers: h, qkv, att, tmp, gu, act, and the attention's partial softmaxes per head
    and chunk of the pos + 1 cached positions (max score, sum of exp(score - max), those weights
    times V)."""
    n_chunks = (pos + ATT_CHUNK) // ATT_CHUNK
    return (np.empty(dim, np.float32), np.empty(q_dim + 2 * kv_dim, np.float32), np.empty(q_dim, np.float32),
            np.empty(dim, np.float32), np.empty(2 * ffn, np.float32), np.empty(ffn, np.float32), n_chunks,
            np.empty((n_heads, n_chunks), np.float32), np.empty((n_heads, n_chunks), np.float32),
            np.empty((n_heads, n_chunks, head_dim), np.float32))


@njit(inline="always", fastmath=True)
def _rope_and_store(qkv, q_dim, kv_dim, n_heads, n_kv, head_dim, cos, sin, k_cache, v_cache, layer, pos):
    """Rotate this token's Q and K (both in qkv: Q, K, V end to end) and write its K and V to the
    layer's F16 cache (bits as uint16) at ``pos``; returns Q."""
    q = qkv[:q_dim]
    k = qkv[q_dim:q_dim + kv_dim]
    v = qkv[q_dim + kv_dim:]
    _rope(q, n_heads, head_dim, cos, sin)
    _rope(k, n_kv, head_dim, cos, sin)
    for j in range(n_kv):
        for i in range(head_dim):
            k_cache[layer, pos, j, i] = f32_to_f16_bits(k[j * head_dim + i])
            v_cache[layer, pos, j, i] = f32_to_f16_bits(v[j * head_dim + i])
    return q


@njit(inline="always", fastmath=True)
def _swiglu(gu, ffn, act):
    """act = silu(gate) * up, from gu = gate and up end to end."""
    for i in range(ffn):
        g = gu[i]
        act[i] = g / (np.float32(1.0) + fast_exp(-g)) * gu[ffn + i]


@njit(inline="always")
def _add(x, y):
    for i in range(x.shape[0]):
        x[i] += y[i]


ATT_CHUNK = 256  # cached positions per attention work item


@njit(inline="always", fastmath=True)
def _attend_chunk(q, kc, vc, kvh, c, n_pos, group, scale, part_m, part_l, part_o):
    """One attention work item: the ``group`` query heads of KV head ``kvh`` over chunk ``c`` of
    the positions 0..n_pos-1 (q: (H hd,) float32; kc, vc: (positions, KV, hd), the bits of F16
    values as uint16, since Numba has no float16). Leaves a partial softmax
    per head: its max score, its sum of exponentials and its exponential-weighted sum of V rows."""
    hd = kc.shape[2]
    s0, s1 = c * ATT_CHUNK, min(n_pos, (c + 1) * ATT_CHUNK)
    scores = np.empty((group, s1 - s0), np.float32)
    for s in range(s0, s1):  # each K row read once for the group's heads
        krow = kc[s, kvh]
        for g in range(group):
            h = kvh * group + g
            qh = q[h * hd:(h + 1) * hd]
            acc = np.float32(0.0)
            for i in range(hd):
                acc += qh[i] * f16_bits_to_f32(krow[i])
            scores[g, s - s0] = acc * scale
    for g in range(group):
        h = kvh * group + g
        best = np.float32(-np.inf)
        for s in range(s1 - s0):
            best = max(best, scores[g, s])
        total = np.float32(0.0)
        for s in range(s1 - s0):
            e = fast_exp(scores[g, s] - best)
            scores[g, s] = e
            total += e
        part_m[h, c], part_l[h, c] = best, total
        part_o[h, c, :] = 0.0
    for s in range(s0, s1):  # each V row read once
        vrow = vc[s, kvh]
        for g in range(group):
            o = part_o[kvh * group + g, c]
            p = scores[g, s - s0]
            for i in range(hd):
                o[i] += p * f16_bits_to_f32(vrow[i])


@njit(inline="always", fastmath=True)
def _combine_chunks(part_m, part_l, part_o, att):
    """att[h] = sum_c exp(m_c - M) o_c / sum_c exp(m_c - M) l_c: the chunks' partial softmaxes
    rescaled to the overall max M, which is exactly the softmax over all positions."""
    hd = part_o.shape[2]
    for h in range(part_m.shape[0]):
        best = np.float32(-np.inf)
        for c in range(part_m.shape[1]):
            best = max(best, part_m[h, c])
        total = np.float32(0.0)
        out = att[h * hd:(h + 1) * hd]
        out[:] = 0.0
        for c in range(part_m.shape[1]):
            w = fast_exp(part_m[h, c] - best)
            total += w * part_l[h, c]
            for i in range(hd):
                out[i] += w * part_o[h, c, i]
        inv = np.float32(1.0) / total
        for i in range(hd):
            out[i] *= inv


@njit(parallel=True, fastmath=True, cache=True)
def decode_blocks(x, pos, attn_norm, ffn_norm, qkv_qs, qkv_d, o_qs, o_d, gu_qs, gu_d, down_qs, down_d,
                  k_cache, v_cache, cos, sin, n_heads, n_kv, head_dim, eps):
    """x: (dim,) hidden state of the token at ``pos``; updates it in place through all blocks.

    Weights are stacked per block: qkv_qs (L, (H + 2 KV) hd, dim), o_qs (L, dim, H hd),
    gu_qs (L, 2 ffn, dim), down_qs (L, dim, ffn) and their scales; k_cache, v_cache are
    (L, positions, KV, hd), F16 bits as uint16, and receive this token's K and V at ``pos``.
    """
    L = qkv_qs.shape[0]
    dim = x.shape[0]
    q_dim = n_heads * head_dim
    kv_dim = n_kv * head_dim
    ffn = down_qs.shape[2]
    group = n_heads // n_kv
    scale = np.float32(1.0 / math.sqrt(head_dim))
    h, qkv, att, tmp, gu, act, n_chunks, part_m, part_l, part_o = _scratch(dim, q_dim, kv_dim, ffn, n_heads,
                                                                           head_dim, pos)
    for layer in range(L):
        # attention
        _rms_norm(x, attn_norm[layer], eps, h)
        # The four row-parallel products below are written out rather than calling a parallel
        # matvec, so that each is sure to be a parallel region of this function (how Numba runs a
        # parallel function called from jitted code was not something we wanted to depend on).
        rows = qkv_qs.shape[1]
        step = (rows + _CHUNKS - 1) // _CHUNKS
        for c in prange(_CHUNKS):  # one parallel region over output rows
            acc = aligned_scratch(32)
            _rows(qkv_qs[layer], qkv_d[layer], h, qkv, c * step, min(rows, (c + 1) * step), acc)
        q = _rope_and_store(qkv, q_dim, kv_dim, n_heads, n_kv, head_dim, cos, sin, k_cache, v_cache, layer, pos)
        # Attention, split over (KV head, chunk of positions) so that both threads stay busy at
        # any context length ("flash decoding"); no (heads x positions) array beyond one chunk.
        kc, vc = k_cache[layer], v_cache[layer]
        for item in prange(n_kv * n_chunks):
            _attend_chunk(q, kc, vc, item // n_chunks, item % n_chunks, pos + 1, group, scale,
                          part_m, part_l, part_o)
        _combine_chunks(part_m, part_l, part_o, att)
        rows = o_qs.shape[1]
        step = (rows + _CHUNKS - 1) // _CHUNKS
        for c in prange(_CHUNKS):  # one parallel region over output rows
            acc = aligned_scratch(32)
            _rows(o_qs[layer], o_d[layer], att, tmp, c * step, min(rows, (c + 1) * step), acc)
        _add(x, tmp)
        # feed-forward
        _rms_norm(x, ffn_norm[layer], eps, h)
        rows = gu_qs.shape[1]
        step = (rows + _CHUNKS - 1) // _CHUNKS
        for c in prange(_CHUNKS):  # one parallel region over output rows
            acc = aligned_scratch(32)
            _rows(gu_qs[layer], gu_d[layer], h, gu, c * step, min(rows, (c + 1) * step), acc)
        _swiglu(gu, ffn, act)
        rows = down_qs.shape[1]
        step = (rows + _CHUNKS - 1) // _CHUNKS
        for c in prange(_CHUNKS):  # one parallel region over output rows
            acc = aligned_scratch(32)
            _rows(down_qs[layer], down_d[layer], act, tmp, c * step, min(rows, (c + 1) * step), acc)
        _add(x, tmp)


def warm_up() -> float:
    """Compile (or load from Numba's cache) decode_blocks with the argument types models use."""
    import time

    start = time.perf_counter()
    i8, f32 = np.int8, np.float32
    q = lambda r, c: (np.zeros((1, r, c), i8), np.ones((1, r, c // 32), f32))  # noqa: E731
    decode_blocks(np.ones(32, f32), 0, np.ones((1, 32), f32), np.ones((1, 32), f32), *q(96, 32), *q(32, 32),
                  *q(64, 32), *q(32, 32), np.zeros((1, 2, 1, 32), np.uint16), np.zeros((1, 2, 1, 32), np.uint16),
                  np.ones(16, f32), np.zeros(16, f32), 1, 1, 32, f32(1e-5))
    return time.perf_counter() - start


def _slots_of(arrays: list) -> np.ndarray | None:
    """The (L, ...) array whose slots 0..L-1 the arrays are, in order, if they are; else None."""
    base = arrays[0].base
    if not (isinstance(base, np.ndarray) and base.ndim == arrays[0].ndim + 1 and base.shape[0] == len(arrays)):
        return None
    start = base.__array_interface__["data"][0]
    for i, a in enumerate(arrays):
        if a.base is not base or a.shape != base.shape[1:] or a.strides != base.strides[1:] \
                or a.__array_interface__["data"][0] != start + i * base.strides[0]:
            return None
    return base


class StackedDecoder:
    """Stacks a model's Q8_0 block weights and runs single-token steps through decode_blocks.

    The per-block weights are replaced by views into the stacks, so memory is not doubled and
    the prompt path (which works per matrix) keeps using the same bytes.
    """

    kv_dtype = np.float16  # the caches it steps with (another cache type takes the batched pass)

    def __init__(self, blocks, config):
        from engine.backends import Q8Weight

        def stack(get):
            parts = [get(b) for b in blocks]
            qs, d = _slots_of([p.qs for p in parts]), _slots_of([p.d for p in parts])
            if qs is not None and d is not None:  # loaded straight into a stack (engine/q8_0_stacks.py)
                return qs, d
            qs = np.stack([p.qs for p in parts])
            d = np.stack([p.d for p in parts])
            for i, p in enumerate(parts):  # free the originals: point them at the stack
                p.qs, p.d = qs[i], d[i]
            return qs, d

        assert all(isinstance(w, Q8Weight) for b in blocks for w in
                   (b.qkv.parts[0], b.attn_output, b.gate_up.parts[0], b.ffn_down))
        self.qkv = stack(lambda b: b.qkv.parts[0])
        self.o = stack(lambda b: b.attn_output)
        self.gu = stack(lambda b: b.gate_up.parts[0])
        self.down = stack(lambda b: b.ffn_down)
        self.attn_norm = np.stack([b.attn_norm for b in blocks]).astype(np.float32)
        self.ffn_norm = np.stack([b.ffn_norm for b in blocks]).astype(np.float32)
        self.config = config
        self.dims = config.n_heads, config.n_kv_heads, config.head_dim, np.float32(config.rms_eps)  # (see shape)
        self.compile_s = warm_up()

    @staticmethod
    def supports(blocks) -> bool:
        from engine.backends import FusedWeight, Q8Weight

        return all(isinstance(b.qkv, FusedWeight) and b.qkv.stacked and b.gate_up.stacked
                   and isinstance(b.attn_output, Q8Weight) and isinstance(b.ffn_down, Q8Weight) for b in blocks)

    def step(self, x: np.ndarray, pos: int, cache, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x: (1, dim) -> (1, dim) after all blocks; writes K/V at ``pos``."""
        h = np.array(x[0], dtype=np.float32)
        decode_blocks(h, pos, *self.arrays(cache), cos, sin, *self.shape())
        return h[None, :]

    def arrays(self, cache) -> tuple:
        """decode_blocks' arguments between ``pos`` and ``cos``: the norms, the stacked weights and
        scales, and ``cache``'s K and V as F16 bits (for a compiled caller of decode_blocks: a
        node's relay step, swarm/relay_kernel.py)."""
        return (self.attn_norm, self.ffn_norm, *self.qkv, *self.o, *self.gu, *self.down,
                cache.k.view(np.uint16), cache.v.view(np.uint16))

    def shape(self) -> tuple:
        """decode_blocks' last arguments: heads, KV heads, head size, the norms' epsilon."""
        return self.dims
