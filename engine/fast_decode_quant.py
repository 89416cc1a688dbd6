"""One token through every block in a single Numba call, for weights held as the file stores them.

engine/fast_decode.py does this for Q8_0 (stacked (layer, rows, cols) arrays). The other stored
types (F16, BF16, Q4_0-Q5_1, Q4_K-Q6_K) cannot be stacked: a Q4_K_M file mixes Q4_K and Q6_K
matrices (attn_v and ffn_down take Q6_K in some layers), and where a row is not a multiple of 256
values (SmolLM2's 576) llama.cpp falls back to Q5_0 and Q8_0, so their rows differ in bytes from layer
to layer. Here every block matrix stays the ``QuantWeight`` it was loaded as, and the step gets
them as one typed list with a kind per matrix:

    mats[m]       (rows, bytes per row) uint8, the stored blocks      (m: every matrix of every block)
    kinds[m]      its type (engine/kernels_quant.KINDS, or Q8_0 below)
    scales[m]     Q8_0 only: (rows, cols / 32) float32 block scales; mats[m] then holds the int8
                  values (the backend's split Q8Weight, viewed as uint8); a (1, 1) stand-in otherwise
    groups[4 l + g] .. groups[4 l + g + 1]    the matrices of block l's product g, whose outputs
                  are laid end to end: g = 0 Q K V (1-3 matrices), 1 attn_output, 2 gate up (1-2), 3 ffn_down

Each product calls that type's own compiled parallel kernel (kernels_quant._MATVECS): a kernel per
type is a third faster than one branching on the type inside its loop, and the branch here runs
once per matrix, not per row. Everything else (norms, RoPE, F16 KV cache, chunked attention, SwiGLU)
is fast_decode's, so the step computes what the Q8_0 one and the batched pass compute.

Before this, such models ran each token through the batched pass: about 210 kernel calls from
Python per token on SmolLM2, and the whole F16 KV cache converted to float32 in every layer (decode
0.34x llama.cpp at 512 positions, 0.17x at 3000 on SmolLM2 Q4_K_M).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from numba.typed import List

from engine import kernels_numba as kn
from engine import kernels_quant as kq
from engine.fast_decode import (_add, _attend_chunk, _combine_chunks, _rms_norm, _rope_and_store, _scratch,
                                _swiglu)

F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K = range(9)  # kernels_quant.KINDS order
Q8_0 = 9  # the backend's split Q8Weight (kernels_numba)
NO_SCALES = np.ones((1, 1), np.float32)
GROUPS = 4  # products per block: QKV, attn_output, gate-up, ffn_down


@njit(cache=True)
def _product(kind, w, d, x, out):
    """out (1, R) = x (1, C) . w.T for stored blocks w of type ``kind``: that type's parallel kernel."""
    if kind == Q8_0:
        kn.q8_0_matvec(w.view(np.int8), d, x[0], out[0])
    elif kind == Q4_K:
        kq._matvecs_q4_k(w, x, out)
    elif kind == Q6_K:
        kq._matvecs_q6_k(w, x, out)
    elif kind == Q4_0:
        kq._matvecs_q4_0(w, x, out)
    elif kind == F16:
        kq._matvecs_f16(w, x, out)
    elif kind == Q5_K:
        kq._matvecs_q5_k(w, x, out)
    elif kind == Q4_1:
        kq._matvecs_q4_1(w, x, out)
    elif kind == Q5_0:
        kq._matvecs_q5_0(w, x, out)
    elif kind == Q5_1:
        kq._matvecs_q5_1(w, x, out)
    else:
        kq._matvecs_bf16(w, x, out)


@njit(cache=True)
def _group(mats, scales, kinds, a, b, x, out):
    """The products of matrices a..b-1 with x (C,), their outputs end to end in out."""
    x2 = x.reshape((1, x.shape[0]))
    o = 0
    for m in range(a, b):
        rows = mats[m].shape[0]
        _product(kinds[m], mats[m], scales[m], x2, out[o:o + rows].reshape((1, rows)))
        o += rows


@njit(parallel=True, fastmath=True, cache=True)
def decode_blocks(x, pos, attn_norm, ffn_norm, mats, scales, kinds, groups, k_cache, v_cache, cos, sin,
                  n_heads, n_kv, head_dim, ffn, eps):
    """x: (dim,) hidden state of the token at ``pos``; updates it in place through all blocks.

    k_cache, v_cache: (L, positions, KV, hd), F16 bits as uint16; they receive this token's K and V.
    """
    L = attn_norm.shape[0]
    dim = x.shape[0]
    q_dim = n_heads * head_dim
    kv_dim = n_kv * head_dim
    group = n_heads // n_kv
    scale = np.float32(1.0 / math.sqrt(head_dim))
    h, qkv, att, tmp, gu, act, n_chunks, part_m, part_l, part_o = _scratch(dim, q_dim, kv_dim, ffn, n_heads,
                                                                           head_dim, pos)
    for layer in range(L):
        g = GROUPS * layer
        # attention
        _rms_norm(x, attn_norm[layer], eps, h)
        _group(mats, scales, kinds, groups[g], groups[g + 1], h, qkv)
        q = _rope_and_store(qkv, q_dim, kv_dim, n_heads, n_kv, head_dim, cos, sin, k_cache, v_cache, layer, pos)
        kc, vc = k_cache[layer], v_cache[layer]
        for item in prange(n_kv * n_chunks):
            _attend_chunk(q, kc, vc, item // n_chunks, item % n_chunks, pos + 1, group, scale,
                          part_m, part_l, part_o)
        _combine_chunks(part_m, part_l, part_o, att)
        _group(mats, scales, kinds, groups[g + 1], groups[g + 2], att, tmp)
        _add(x, tmp)
        # feed-forward
        _rms_norm(x, ffn_norm[layer], eps, h)
        _group(mats, scales, kinds, groups[g + 2], groups[g + 3], h, gu)
        _swiglu(gu, ffn, act)
        _group(mats, scales, kinds, groups[g + 3], groups[g + 4], act, tmp)
        _add(x, tmp)


def _held(w) -> tuple[np.ndarray, np.ndarray, int]:
    """(values as read-only uint8 rows, Q8_0 scales or a stand-in, kind) of a held weight."""
    from engine.quant_weights import QuantWeight

    if isinstance(w, QuantWeight):
        return w.blocks, NO_SCALES, w.kind
    values = w.qs.view(np.uint8)  # a Q8Weight: int8 values and float32 scales, as split at load
    values.flags.writeable = False  # one array type in the list (the stored types' are read-only)
    return values, w.d, Q8_0


def values_per_row(values: np.ndarray, kind: int) -> int:
    """The input dimension of a held matrix (its rows' values), from its bytes per row."""
    if kind == Q8_0:
        return values.shape[1]
    block, size = list(kq.BLOCKS.values())[kind]
    return values.shape[1] // size * block


def _block_products(block) -> list[list]:
    """A block's weights per product (QKV, attn_output, gate-up, ffn_down), as lists of parts."""
    parts = lambda w: list(w.parts) if hasattr(w, "parts") else [w]  # noqa: E731 (a FusedWeight or one weight)
    return [parts(block.qkv), [block.attn_output], parts(block.gate_up), [block.ffn_down]]


class QuantDecoder:
    """Single-token steps through blocks whose matrices are ``QuantWeight`` s, of any mix of types.

    Nothing is copied: the typed list holds the same arrays the batched pass multiplies by.
    """

    kv_dtype = np.float16

    def __init__(self, blocks, config):
        mats, scales, kinds, groups = List(), List(), [], [0]
        for block in blocks:
            for product in _block_products(block):
                for w in product:
                    values, d, kind = _held(w)
                    mats.append(values)
                    scales.append(d)
                    kinds.append(kind)
                groups.append(len(kinds))
        self.blocks = blocks
        self.mats, self.scales = mats, scales
        self.kinds = np.array(kinds, np.int64)
        self.groups = np.array(groups, np.int64)
        self.attn_norm = np.stack([b.attn_norm for b in blocks]).astype(np.float32)
        self.ffn_norm = np.stack([b.ffn_norm for b in blocks]).astype(np.float32)
        self.config = config
        self.compile_s = warm_up()

    @staticmethod
    def supports(blocks) -> bool:
        from engine.backends import Q8Weight
        from engine.quant_weights import QuantWeight

        return bool(blocks) and all(isinstance(w, (QuantWeight, Q8Weight)) for b in blocks
                                    for product in _block_products(b) for w in product)

    def span(self, i: int, j: int) -> "QuantDecoder":
        """The decoder of blocks i..j-1 only (a node serving a sub-span), sharing the weights."""
        view = object.__new__(QuantDecoder)
        view.blocks, view.config, view.compile_s = self.blocks[i:j], self.config, 0.0
        a, b = self.groups[GROUPS * i], self.groups[GROUPS * j]
        view.mats = List([self.mats[m] for m in range(a, b)])
        view.scales = List([self.scales[m] for m in range(a, b)])
        view.kinds = self.kinds[a:b]
        view.groups = self.groups[GROUPS * i:GROUPS * j + 1] - a
        view.attn_norm, view.ffn_norm = self.attn_norm[i:j], self.ffn_norm[i:j]
        return view

    def step(self, x: np.ndarray, pos: int, cache, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x: (1, dim) -> (1, dim) after all blocks; writes K/V at ``pos``."""
        cfg = self.config
        h = np.array(x[0], dtype=np.float32)
        decode_blocks(h, pos, self.attn_norm, self.ffn_norm, self.mats, self.scales, self.kinds, self.groups,
                      cache.k.view(np.uint16), cache.v.view(np.uint16), cos, sin, cfg.n_heads, cfg.n_kv_heads,
                      cfg.head_dim, cfg.ffn_dim, np.float32(cfg.rms_eps))
        return h[None, :]


def warm_up() -> float:
    """Compile (or load from Numba's cache) the step: its argument types are the same for every
    model (a typed list of read-only uint8 matrices, ...), so one tiny call serves them all, and
    every type's kernel is compiled into it."""
    import time

    start = time.perf_counter()
    f32 = np.float32
    w = lambda rows: np.zeros((rows, 18), np.uint8)  # noqa: E731  (Q4_0 rows of 32 values)
    mats = List()
    for rows in (96, 32, 64, 32):  # QKV, output, gate-up, down of one 32-wide block
        m = w(rows)
        m.flags.writeable = False
        mats.append(m)
    scales = List([NO_SCALES] * 4)
    cache = np.zeros((1, 1, 1, 32), np.uint16)
    decode_blocks(np.ones(32, f32), 0, np.ones((1, 32), f32), np.ones((1, 32), f32), mats, scales,
                  np.full(4, Q4_0, np.int64), np.arange(5, dtype=np.int64), cache, cache.copy(),
                  np.ones(16, f32), np.zeros(16, f32), 1, 1, 32, 32, f32(1e-5))
    return time.perf_counter() - start
