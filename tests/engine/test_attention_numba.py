"""The fast path's attention: vectorizable exp, prompt attention and split-K decode attention
against the reference (engine/ops.py)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit, prange

from engine import attention_numba as an
from engine import fast_decode as fd
from engine import ops


@njit(fastmath=True)
def _exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = an.fast_exp(x[i])


def test_fast_exp_is_exp_to_float32_precision():
    x = np.concatenate([np.linspace(-87, 88, 400_001, dtype=np.float32), np.float32([0, -0.0, 1e-30, -1e-30])])
    out = np.empty_like(x)
    _exp_all(x, out)
    ref = np.exp(x.astype(np.float64))
    assert (np.abs(out - ref) / ref).max() < 1e-6


def test_fast_exp_saturates_instead_of_wrapping():
    x = np.float32([-1e30, -200, -104, 89, 200, 1e30])
    out = np.empty_like(x)
    _exp_all(x, out)
    assert (out[:3] >= 0).all() and (out[:3] < 1e-37).all()  # flushed to (nearly) zero, never negative
    assert np.isfinite(out[3:]).all() and (out[3:] > 1e38).all()  # held at exp(88), no overflow garbage


def _qkv(rng, T, S, KV, G, hd):
    q = rng.standard_normal((T, KV * G, hd)).astype(np.float32)
    k = rng.standard_normal((S, KV, hd)).astype(np.float32) * 2
    v = rng.standard_normal((S, KV, hd)).astype(np.float32)
    return q, k, v


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 40), first=st.integers(0, 70), KV=st.integers(1, 3), G=st.integers(1, 4),
       hd=st.sampled_from([8, 16, 64]), seed=st.integers(0, 999))
def test_prompt_attention_equals_reference(T, first, KV, G, hd, seed):
    q, k, v = _qkv(np.random.default_rng(seed), T, first + T, KV, G, hd)
    np.testing.assert_allclose(an.attention(q, k, v, first), ops.attention(q, k, v, first), rtol=1e-4, atol=1e-5)


@njit(parallel=True)
def _decode_attention(q, kc, vc, n_pos, group, scale):
    n_heads, hd = q.shape[0] // kc.shape[2], kc.shape[2]
    n_chunks = (n_pos + fd.ATT_CHUNK - 1) // fd.ATT_CHUNK
    part_m = np.empty((n_heads, n_chunks), np.float32)
    part_l = np.empty((n_heads, n_chunks), np.float32)
    part_o = np.empty((n_heads, n_chunks, hd), np.float32)
    for item in prange(kc.shape[1] * n_chunks):
        fd._attend_chunk(q, kc, vc, item // n_chunks, item % n_chunks, n_pos, group, scale, part_m, part_l, part_o)
    att = np.empty(n_heads * hd, np.float32)
    fd._combine_chunks(part_m, part_l, part_o, att)
    return att


@settings(max_examples=25, deadline=None)
@given(n_pos=st.integers(1, 3 * fd.ATT_CHUNK + 5), KV=st.integers(1, 3), G=st.integers(1, 3),
       seed=st.integers(0, 999))
def test_split_k_decode_attention_equals_reference(n_pos, KV, G, seed):
    """One new token over n_pos cached positions (F16), across chunk boundaries, against ops.attention."""
    hd = 32
    q, k, v = _qkv(np.random.default_rng(seed), 1, n_pos, KV, G, hd)
    k16, v16 = k.astype(np.float16), v.astype(np.float16)  # the fast path caches K and V in F16
    got = _decode_attention(q.reshape(-1), k16.view(np.uint16), v16.view(np.uint16), n_pos, G, np.float32(1 / np.sqrt(hd)))
    want = ops.attention(q, k16.astype(np.float32), v16.astype(np.float32), n_pos - 1).reshape(-1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
