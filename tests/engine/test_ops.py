"""Reference kernels against straightforward float64 definitions, over random shapes and values."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from engine import ops

floats = st.floats(-30, 30, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(x=arrays(np.float32, st.tuples(st.integers(1, 6), st.sampled_from([1, 7, 32, 96, 576])), elements=floats),
       eps=st.sampled_from([1e-5, 1e-6]))
def test_rms_norm(x, eps):
    w = np.linspace(0.5, 1.5, x.shape[1]).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + eps) * w
    np.testing.assert_allclose(ops.rms_norm(x, w, eps), expected, rtol=2e-6, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(x=arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 300)), elements=st.floats(-80, 80, width=32)))
def test_softmax(x):
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(-1, keepdims=True))
    np.testing.assert_allclose(ops.softmax(x), e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ops.softmax(x).sum(-1), 1.0, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(g=arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 64)), elements=floats))
def test_swiglu(g):
    u = np.cos(g).astype(np.float32)
    g64 = g.astype(np.float64)
    expected = g64 / (1 + np.exp(-g64)) * u
    np.testing.assert_allclose(ops.swiglu(g, u), expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 8), heads=st.integers(1, 4), half=st.integers(1, 16), extra=st.sampled_from([0, 2, 8]),
       start=st.integers(0, 4000), base=st.sampled_from([10000.0, 100000.0, 500000.0]),
       scale=st.sampled_from([1.0, 0.25]), seed=st.integers(0, 1000))
def test_rope_is_complex_rotation_of_adjacent_pairs(T, heads, half, extra, start, base, scale, seed):
    """Pairs (x[2i], x[2i+1]) rotate by angle pos*scale*base^(-2i/rope_dim); the rest pass through."""
    rope_dim = 2 * half
    x = np.random.default_rng(seed).standard_normal((T, heads, rope_dim + extra)).astype(np.float32)
    pos = np.arange(start, start + T)
    cos, sin = ops.rope_angles(pos, rope_dim, base, scale)
    got = ops.rope(x, cos, sin)
    angles = np.outer(pos * scale, base ** (-np.arange(0, rope_dim, 2) / rope_dim))
    z = (x[..., 0:rope_dim:2] + 1j * x[..., 1:rope_dim:2]).astype(np.complex128) * np.exp(1j * angles)[:, None, :]
    np.testing.assert_allclose(got[..., 0:rope_dim:2], z.real, rtol=1e-3, atol=2e-3 * (1 + start / 1000))
    np.testing.assert_allclose(got[..., 1:rope_dim:2], z.imag, rtol=1e-3, atol=2e-3 * (1 + start / 1000))
    np.testing.assert_array_equal(got[..., rope_dim:], x[..., rope_dim:])


def naive_attention(q, k, v, first_pos):
    """Loops, float64, K/V repeated per head: the definition GQA must equal."""
    T, H, hd = q.shape
    S, KV, _ = k.shape
    G = H // KV
    out = np.zeros((T, H, hd))
    for t in range(T):
        for h in range(H):
            kv = h // G
            s = np.array([q[t, h] @ k[j, kv] / np.sqrt(hd) for j in range(first_pos + t + 1)], dtype=np.float64)
            p = np.exp(s - s.max())
            p /= p.sum()
            out[t, h] = p @ v[: first_pos + t + 1, kv]
    return out


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 5), first=st.integers(0, 6), kv=st.sampled_from([1, 2, 3]), group=st.sampled_from([1, 2, 4]),
       hd=st.sampled_from([2, 8, 16]), seed=st.integers(0, 1000))
def test_attention_gqa_mqa_mha(T, first, kv, group, hd, seed):
    rng = np.random.default_rng(seed)
    H, S = kv * group, first + T
    q = rng.standard_normal((T, H, hd)).astype(np.float32)
    k = rng.standard_normal((S, kv, hd)).astype(np.float32)
    v = rng.standard_normal((S, kv, hd)).astype(np.float32)
    np.testing.assert_allclose(ops.attention(q, k, v, first), naive_attention(q, k, v, first), rtol=1e-4, atol=1e-5)
