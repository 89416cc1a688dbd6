"""Weights held as the file stores them (F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), and
their products with activations.

A ``QuantWeight`` is the tensor's bytes, (rows, bytes per row) uint8, exactly as
``loader.load_quantized`` returns them: no copy, no expansion, so a model takes about its file's
size in memory instead of four bytes per weight (a 4.5-bit Q4_K weight expanded to float32 is 7x
larger). Products (engine/kernels_quant.py):

    T <= 8 tokens   x (T, in) . W.T -> (T, out) with the Numba kernel reading each row once
    more tokens     W dequantized, 64 MB of rows at a time, into a reused float32 buffer; BLAS

Types without a kernel (Q2_K, Q3_K, the IQ types, ...) are expanded to float32 as before, and
``note_expanded`` says so once per type on stderr.
"""

from __future__ import annotations

import mmap
import sys
from dataclasses import dataclass

import numpy as np

from engine import kernels_quant as kq

TYPES = frozenset(kq.BLOCKS)
SMALL_BATCH = 8          # up to this many tokens: the matvec kernel
SCRATCH_FLOATS = 16 * 1024 * 1024  # prompt path: at most 64 MB of dequantized rows at a time
_FLOAT_TYPES = {"F32", "F64"}  # already float: nothing to say when they are held as float32


@dataclass
class QuantWeight:
    blocks: np.ndarray  # (out, bytes per row) uint8, the stored blocks
    ggml_type: str
    cols: int           # values per row (the matrix's input dimension)

    def __post_init__(self):
        # Always read-only (as loaded from the store): one compiled specialization of each kernel.
        self.blocks.flags.writeable = False

    @property
    def rows(self) -> int:
        return self.blocks.shape[0]

    @property
    def kind(self) -> int:
        return kq.KINDS[self.ggml_type]


def prepare(loader, name: str) -> QuantWeight | None:
    """The tensor as a QuantWeight when a kernel handles its type and shape, else None."""
    entry = loader.tensor_entry(name)
    if entry.ggml_type not in TYPES or len(entry.shape) != 2:
        return None
    block, _ = kq.BLOCKS[entry.ggml_type]
    if entry.shape[1] % block:
        return None
    blocks, _ = loader.load_quantized(name)
    return QuantWeight(blocks, entry.ggml_type, int(entry.shape[1]))


def stack(parts: list) -> QuantWeight | None:
    """Matrices sharing an input (Q, K, V; gate, up) as one, rows one after another, when they are
    all QuantWeights of one type: one kernel launch instead of several. None otherwise, and None
    for weights viewing a memory-mapped file (a plain .gguf): copying them would keep both the
    copy and the file's pages it read resident, twice the memory."""
    if not parts or not all(isinstance(p, QuantWeight) for p in parts):
        return None
    first = parts[0]
    if any(p.ggml_type != first.ggml_type or p.cols != first.cols or _mapped(p.blocks) for p in parts):
        return None
    return QuantWeight(np.concatenate([p.blocks for p in parts]), first.ggml_type, first.cols)


def _mapped(a: np.ndarray) -> bool:
    """Whether the array's memory belongs to an mmap (through the memoryview numpy was given)."""
    while isinstance(a, np.ndarray):
        a = a.base
    return isinstance(a, memoryview) and isinstance(a.obj, mmap.mmap)


_noted: set[str] = set()


def note_expanded(type_name: str) -> None:
    """Say once per type that its weights are held as float32 (no kernel for that type)."""
    if type_name in TYPES or type_name in _FLOAT_TYPES or type_name in _noted:
        return
    _noted.add(type_name)
    print(f"note: no quantized kernel for {type_name} weights; they are expanded to float32 "
          f"(4 bytes per weight)", file=sys.stderr)


class QuantMatmul:
    """Products with QuantWeights; owns the reused float32 buffer of the prompt path."""

    def __init__(self):
        self.compile_s = 0.0
        self._warm: set[str] = set()
        self._scratch = np.empty(0, np.float32)

    def prepare(self, loader, name: str) -> QuantWeight | None:
        """``prepare``, and the first weight of each type compiles (or loads) that type's kernels."""
        w = prepare(loader, name)
        if w is not None and w.ggml_type not in self._warm:
            self._warm.add(w.ggml_type)
            self.compile_s += kq.warm_up(w.kind)
        return w

    def matmul(self, x: np.ndarray, w: QuantWeight) -> np.ndarray:
        # x: (T, in) -> (T, out)
        x = np.ascontiguousarray(x, dtype=np.float32)
        T, R, C = x.shape[0], w.rows, w.cols
        out = np.empty((T, R), np.float32)
        if T <= SMALL_BATCH:
            kq.matvecs(w.kind, w.blocks, x, out)
            return out
        chunk = max(1, min(R, SCRATCH_FLOATS // C))
        if self._scratch.size < chunk * C:
            self._scratch = np.empty(chunk * C, np.float32)
        for r0 in range(0, R, chunk):
            r1 = min(R, r0 + chunk)
            dense = self._scratch[:(r1 - r0) * C].reshape(r1 - r0, C)
            kq.dequantize(w.kind, w.blocks[r0:r1], dense)
            np.matmul(x, dense.T, out=out[:, r0:r1])
        return out
