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


@dataclass
class Q8Weight:
    qs: np.ndarray      # (out, in) int8
    d: np.ndarray       # (out, in // 32) float32 block scales
    ggml_type: str = "Q8_0"

    @property
    def rows(self) -> int:
        return self.qs.shape[0]


@dataclass
class FusedWeight:
    """Several matrices applied to the same input (Q, K, V; gate, up), output split by ``sizes``."""
    parts: list
    sizes: list[int]
    stacked: bool = False  # parts[0] holds all of them stacked row-wise


class NumpyBackend:
    name = "numpy"
    kv_dtype = np.float32  # the KV cache's element type
    splits_q8_0 = False  # Q8_0 held as Q8Weight (int8 values, float32 scales): engine/q8_0_stacks.py

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

    def prepare_fused(self, loader, names: list[str]) -> FusedWeight:
        parts = [self.prepare(loader, n) for n in names]
        return FusedWeight(parts, [loader.tensor_entry(n).shape[0] for n in names])

    def matmul_fused(self, x: np.ndarray, fw: FusedWeight) -> list[np.ndarray]:
        if fw.stacked:
            y = self.matmul(x, fw.parts[0])
            return np.split(y, np.cumsum(fw.sizes)[:-1], axis=1)
        return [self.matmul(x, p) for p in fw.parts]

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, first_pos: int) -> np.ndarray:
        """ops.attention; emulating llama.cpp, the probabilities are rounded to F16 before P.V."""
        from engine import ops

        return ops.attention(q, k, v, first_pos, round_to_f16 if self.emulate else None)

    def make_decoder(self, blocks: list, config):
        """A one-call single-token step through ``blocks`` (``step(x, pos, cache, cos, sin)``), or
        None when this backend has none for these weights: the model then runs the batched pass."""
        return None


class NumbaBackend(NumpyBackend):
    """Weights stay quantized in memory (Q8_0 here; F16, BF16, Q4_0-Q5_1 and Q4_K-Q6_K as stored, in
    engine/quant_weights.py); one token at a time uses the Numba kernels, prompts use BLAS on weights
    dequantized into a reused buffer. Other types are held as float32."""

    name = "numba"
    # K and V cached in F16, as llama.cpp caches them: half the bytes that decode attention reads
    # at long contexts (at 3000 positions SmolLM2's cache is as large as its weights).
    kv_dtype = np.float16
    splits_q8_0 = True
    SMALL_BATCH = 8  # up to this many tokens: the matvec kernel reading each row once for all
    SCRATCH_FLOATS = 16 * 1024 * 1024  # prompt path: dequantize at most 64 MB of a matrix at a time

    def __init__(self, emulate_llama_cpp: bool = False):
        if emulate_llama_cpp:
            raise UserError("llama.cpp activation rounding is only available with the numpy kernels")
        super().__init__(False)
        from engine import kernels_numba, quant_weights

        self.k = kernels_numba
        self.qw = quant_weights
        self.quant = quant_weights.QuantMatmul()  # the other stored types (engine/quant_weights.py)
        self._compile_s = kernels_numba.warm_up()
        self._scratch = np.empty(0, np.float32)

    @property
    def compile_s(self) -> float:
        return self._compile_s + self.quant.compile_s  # the other types compile as their weights load

    def prepare(self, loader, name: str):
        entry = loader.tensor_entry(name)
        if entry.ggml_type == "Q8_0":  # split straight from the fragments' pieces, never joined
            from engine.q8_0_stacks import load_q8_0

            return load_q8_0(loader, name)
        held = self.quant.prepare(loader, name)
        if held is not None:
            return held
        self.qw.note_expanded(entry.ggml_type)
        return DenseWeight(loader.load_tensor(name), entry.ggml_type)

    def prepare_fused(self, loader, names: list[str]) -> FusedWeight:
        if all(loader.tensor_entry(n).ggml_type == "Q8_0" for n in names):
            return self._prepare_fused_q8_0(loader, names)
        fw = super().prepare_fused(loader, names)
        stacked = self.qw.stack(fw.parts)
        return FusedWeight([stacked], fw.sizes, stacked=True) if stacked is not None else fw

    def _prepare_fused_q8_0(self, loader, names: list[str]) -> FusedWeight:
        """Q8_0 matrices split straight into the rows of one stacked weight (no concatenation)."""
        blocks = [loader.load_quantized(n)[0] for n in names]
        sizes = [b.shape[0] for b in blocks]
        cols = blocks[0].shape[1] // 34 * 32
        qs, d = np.empty((sum(sizes), cols), np.int8), np.empty((sum(sizes), cols // 32), np.float32)
        for b, r0 in zip(blocks, np.cumsum([0] + sizes[:-1])):
            self.k.split_q8_0(b, qs[r0:r0 + len(b)], d[r0:r0 + len(b)])
        return FusedWeight([Q8Weight(qs, d)], sizes, stacked=True)

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, first_pos: int) -> np.ndarray:
        from engine import attention_numba

        return attention_numba.attention(q, k.astype(np.float32), v.astype(np.float32), first_pos)

    def make_decoder(self, blocks: list, config):
        """Q8_0 blocks: stacked (fast_decode); blocks of the other stored types, in any mix:
        fast_decode_quant; anything else (float32-expanded types) takes the batched pass."""
        from engine.fast_decode import StackedDecoder
        from engine.fast_decode_quant import QuantDecoder

        if blocks and StackedDecoder.supports(blocks):
            return StackedDecoder(blocks, config)
        if blocks and QuantDecoder.supports(blocks):
            return QuantDecoder(blocks, config)
        return None

    def matmul(self, x: np.ndarray, w) -> np.ndarray:
        if isinstance(w, self.qw.QuantWeight):
            return self.quant.matmul(x, w)
        if not isinstance(w, Q8Weight):
            return x @ w.values.T
        x = np.ascontiguousarray(x, dtype=np.float32)
        T, R = x.shape[0], w.rows
        if T == 1:
            out = np.empty((1, R), np.float32)
            self.k.q8_0_matvec(w.qs, w.d, x[0], out[0])
            return out
        if T <= self.SMALL_BATCH:
            out = np.empty((T, R), np.float32)
            self.k.q8_0_matvecs(w.qs, w.d, x, out)
            return out
        # Prompt: BLAS on the weight dequantized into a bounded, reused buffer, in row chunks.
        C = w.qs.shape[1]
        chunk = max(1, min(R, self.SCRATCH_FLOATS // C))
        if self._scratch.size < chunk * C:
            self._scratch = np.empty(chunk * C, np.float32)
        out = np.empty((T, R), np.float32)
        for r0 in range(0, R, chunk):
            r1 = min(R, r0 + chunk)
            dense = self._scratch[:(r1 - r0) * C].reshape(r1 - r0, C)
            self.k.q8_0_dequantize(w.qs[r0:r1], w.d[r0:r1], dense)
            np.matmul(x, dense.T, out=out[:, r0:r1])
        return out


BACKENDS = {"numpy": NumpyBackend, "numba": NumbaBackend}


def make_backend(name: str, **options):
    try:
        return BACKENDS[name](**options)
    except KeyError:
        raise UserError(f"unknown kernel backend {name!r} (available: {', '.join(sorted(BACKENDS))})") from None
