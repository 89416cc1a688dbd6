"""The reference kernels, in plain NumPy: each one line of math, shapes in the comments.

These are the oracle the fast path is tested against, and they follow llama.cpp's definitions
(RMSNorm with eps inside the root, RoPE on adjacent pairs, SiLU-gated FFN, causal softmax).
"""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x: (T, d), weight: (d,) -> (T, d), rounded step by step as ggml does.

    ggml sums the float32 squares in double, takes the mean as float32, multiplies by
    1/sqrtf(mean + eps) and then by the weight. Matching it to the last bit matters because
    llama.cpp quantizes this output to Q8_0 next, and a last-bit difference can flip a rounding.
    """
    x = np.asarray(x, dtype=np.float32)
    mean = ((x * x).astype(np.float64).sum(axis=-1, keepdims=True) / x.shape[-1]).astype(np.float32)
    scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps))
    return (x * scale) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    # gate, up: (T, ffn) -> (T, ffn)
    return silu(gate) * up


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def rope_angles(positions: np.ndarray, rope_dim: int, base: float, scale: float = 1.0,
                freq_factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of the rotation angles: (T,) positions -> (T, rope_dim // 2) each.

    Computed the way ggml's rope cache does, in float32: theta_0 = position, then
    theta_i = theta_(i-1) * base^(-2/rope_dim), divided by the frequency factor and multiplied by
    the linear scale. Bit-exact angles matter: llama.cpp rounds Q and K to F16 right after RoPE,
    so a last-bit difference here can flip a rounding there.
    """
    theta_scale = np.float32(base) ** np.float32(-2.0 / rope_dim)
    theta = np.empty((len(positions), rope_dim // 2), dtype=np.float32)
    theta[:, 0] = positions.astype(np.float32)
    for i in range(1, rope_dim // 2):
        theta[:, i] = theta[:, i - 1] * theta_scale
    if freq_factors is not None:
        theta = theta / freq_factors.astype(np.float32)
    theta = theta * np.float32(scale)
    # cos/sin of the float32 angle, correctly rounded (as glibc's cosf/sinf are)
    return np.cos(theta.astype(np.float64)).astype(np.float32), np.sin(theta.astype(np.float64)).astype(np.float32)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the first rope_dim values of each head.

    This is llama.cpp's "normal" RoPE mode, the one GGUF LLaMA weights are converted for
    (convert_hf_to_gguf permutes Q and K so that adjacent pairs are the rotated ones).
    x: (T, heads, head_dim), cos/sin: (T, rope_dim // 2) -> (T, heads, head_dim)
    """
    rope_dim = 2 * cos.shape[-1]
    out = x.copy()
    x0, x1 = x[..., 0:rope_dim:2], x[..., 1:rope_dim:2]
    c, s = cos[:, None, :], sin[:, None, :]
    out[..., 0:rope_dim:2] = x0 * c - x1 * s
    out[..., 1:rope_dim:2] = x0 * s + x1 * c
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, first_pos: int, round_probs=None) -> np.ndarray:
    """Causal grouped-query attention without repeating K/V per head.

    q: (T, H, hd) for positions first_pos .. first_pos+T-1
    k, v: (S, KV, hd) for positions 0 .. S-1 (S = first_pos + T), H = KV * G
    -> (T, H, hd); query head h reads KV head h // G, as llama.cpp broadcasts.
    round_probs, if given, rounds the softmax output (llama.cpp converts it to F16 before P.V).
    """
    T, H, hd = q.shape
    S, KV, _ = k.shape
    G = H // KV
    # One matrix product per KV head: its G query heads' T rows stacked, as BLAS likes it.
    qg = q.reshape(T, KV, G, hd).transpose(1, 2, 0, 3).reshape(KV, G * T, hd)           # (KV, G*T, hd)
    scores = (qg @ k.transpose(1, 2, 0)) * np.float32(1.0 / np.sqrt(hd))                # (KV, G*T, S)
    scores = scores.reshape(KV, G, T, S)
    allowed = np.arange(S)[None, :] <= (first_pos + np.arange(T))[:, None]              # (T, S)
    scores = np.where(allowed, scores, -np.inf)
    probs = softmax(scores, axis=-1)
    if round_probs is not None:
        probs = round_probs(probs)
    out = probs.reshape(KV, G * T, S) @ v.transpose(1, 0, 2)                            # (KV, G*T, hd)
    return out.reshape(KV, G, T, hd).transpose(2, 0, 1, 3).reshape(T, H, hd)
