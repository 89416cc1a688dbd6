"""The KV cache: one preallocated block per session, laid out (layer, position, KV head, head dim).

Its element type is the backend's: float32 for the reference, float16 for the fast path (as
llama.cpp keeps K and V), which halves what attention reads per token at long contexts.

Like llama2.c's run.c: the prompt is written in one batched pass, then one position per step.
Positions are contiguous from 0, so "truncate" just moves the length back (used to rewind).
"""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, n_layers: int, max_positions: int, n_kv_heads: int, head_dim: int,
                 dtype=np.float32):
        shape = (n_layers, max_positions, n_kv_heads, head_dim)
        self.k = np.zeros(shape, dtype=dtype)
        self.v = np.zeros(shape, dtype=dtype)
        self.length = 0  # positions filled

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def store(self, layer: int, first_pos: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write k, v (T, KV, hd) at first_pos; return views of positions 0 .. first_pos+T-1."""
        end = first_pos + k.shape[0]
        self.k[layer, first_pos:end] = k
        self.v[layer, first_pos:end] = v
        return self.k[layer, :end], self.v[layer, :end]

    def reset(self) -> None:
        self.length = 0

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length
