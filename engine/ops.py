"""The reference kernels, in plain NumPy: each one line of math, shapes in the comments.

These are the oracle the fast path is tested against, and they follow llama.cpp's definitions
(RMSNorm with eps inside the root, RoPE on adjacent pairs, SiLU-gated FFN, causal softmax).
"""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    # x: (T, d), weight: (d,) -> (T, d)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


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
    # positions: (T,) -> cos, sin: (T, rope_dim // 2)
    inv_freq = base ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors
    angles = np.outer(positions.astype(np.float64) * scale, inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


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


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, first_pos: int) -> np.ndarray:
    """Causal grouped-query attention without repeating K/V per head.

    q: (T, H, hd) for positions first_pos .. first_pos+T-1
    k, v: (S, KV, hd) for positions 0 .. S-1 (S = first_pos + T), H = KV * G
    -> (T, H, hd); query head h reads KV head h // G, as llama.cpp broadcasts.
    """
    T, H, hd = q.shape
    S, KV, _ = k.shape
    G = H // KV
    qg = q.reshape(T, KV, G, hd)
    scores = np.einsum("tkgd,skd->kgts", qg, k) / np.float32(np.sqrt(hd))   # (KV, G, T, S)
    allowed = np.arange(S)[None, :] <= (first_pos + np.arange(T))[:, None]  # (T, S)
    scores = np.where(allowed, scores, -np.inf)
    probs = softmax(scores, axis=-1)
    out = np.einsum("kgts,skd->tkgd", probs, v)                                # (T, KV, G, hd)
    return out.reshape(T, H, hd)
