"""The seam where the kernel implementation is chosen, once, at load time.

A backend turns a stored weight into whatever it computes with (``prepare``) and multiplies
activations by it (``matmul``). The NumPy backend is the reference: it dequantizes every weight to
float32 and lets BLAS do the products. The Numba backend (issue 4) keeps weights quantized.

``emulate_llama_cpp`` makes the reference round activations the way llama.cpp's CPU kernels do
before a product (to Q8_0 blocks for Q8_0/Q4_0/Q4_1 weights, to F16 or BF16 for those weights),
so that validation can tell rounding differences from real ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.errors import UserError

# Activation formats llama.cpp's CPU backend uses for each weight type (ggml "vec_dot_type").
_ACTIVATION_FORMAT = {"Q8_0": "q8_0", "Q4_0": "q8_0", "Q4_1": "q8_0", "Q5_0": "q8_0", "Q5_1": "q8_0",
                      "F16": "f16", "BF16": "bf16", "F32": None}


def round_to_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest even
    return rounded.astype(np.uint32).view(np.float32)


def round_to_q8_0(x: np.ndarray) -> np.ndarray:
    """Quantize to Q8_0 blocks of 32 along the last axis and back (llama.cpp's quantize_row_q8_0)."""
    shape = x.shape
    blocks = x.reshape(-1, 32).astype(np.float32)
    amax = np.max(np.abs(blocks), axis=1, keepdims=True)
    d = amax / np.float32(127.0)
    inv = np.divide(np.float32(127.0), amax, out=np.zeros_like(amax), where=amax != 0)  # as llama.cpp: 127/amax
    q = np.round(blocks * inv)  # round half to even, like _mm256_round_ps(_MM_ROUND_NEAREST)
    return (q * round_to_f16(d)).reshape(shape).astype(np.float32)


_ROUNDERS = {"q8_0": round_to_q8_0, "f16": round_to_f16, "bf16": round_to_bf16}


@dataclass
class DenseWeight:
    values: np.ndarray  # (out, in) float32
    ggml_type: str


class NumpyBackend:
    name = "numpy"

    def __init__(self, emulate_llama_cpp: bool = False):
        self.emulate = emulate_llama_cpp

    def prepare(self, loader, name: str) -> DenseWeight:
        return DenseWeight(loader.load_tensor(name), loader.tensor_entry(name).ggml_type)

    def matmul(self, x: np.ndarray, w: DenseWeight) -> np.ndarray:
        # x: (T, in), w.values: (out, in) -> (T, out)
        if self.emulate:
            fmt = _ACTIVATION_FORMAT.get(w.ggml_type)
            if fmt is not None:
                x = _ROUNDERS[fmt](x)
        return x @ w.values.T


BACKENDS = {"numpy": NumpyBackend}


def make_backend(name: str, **options):
    try:
        return BACKENDS[name](**options)
    except KeyError:
        raise UserError(f"unknown kernel backend {name!r} (available: {', '.join(sorted(BACKENDS))})") from None
