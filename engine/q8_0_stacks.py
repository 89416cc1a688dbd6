"""Q8_0 block weights split from the store straight into the decode step's stacked arrays.

engine/fast_decode.py's one-call decode step wants every block's Q8_0 matrices stacked per kind,
(layer, rows, cols). Loading each matrix on its own and stacking afterwards wrote every weight
twice (and for a moment held it twice); here the stacks are allocated first, from the metadata's
shapes, and each tensor's stored blocks are split into its layer's slot as its fragments arrive,
without joining them into one buffer first (kernels_numba.split_q8_0_pieces):

    qkv   (L, (H + 2 KV) hd, dim)   attn_q, attn_k, attn_v rows one after another
    o     (L, dim, H hd)            attn_output
    gu    (L, 2 ffn, dim)           ffn_gate, ffn_up
    down  (L, dim, ffn)             ffn_down

plus one float32 scale per 32 values beside each. A block's weights are views of its slot, the
same ``Q8Weight`` / ``FusedWeight`` the backend would have made on its own, so the batched pass
uses the very same bytes and StackedDecoder adopts the stacks without copying.
"""

from __future__ import annotations

import numpy as np

from engine.backends import FusedWeight, Q8Weight

KINDS = {"qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",), "gu": ("ffn_gate", "ffn_up"),
         "down": ("ffn_down",)}


def applies(loader, backend, layers: range) -> bool:
    """Whether every block matrix of ``layers`` is Q8_0 and the backend keeps Q8_0 split (numba)."""
    return (backend.splits_q8_0 and len(layers) > 0
            and all(loader.tensor_entry(f"blk.{i}.{m}.weight").ggml_type == "Q8_0"
                    for i in layers for names in KINDS.values() for m in names))


def load_q8_0(loader, name: str) -> Q8Weight:
    """One Q8_0 matrix (the head, say) split from its pieces: (rows, cols) int8 and scales."""
    from engine import kernels_numba  # numba only when its backend is used

    rows, cols = loader.tensor_entry(name).shape
    w = Q8Weight(*_Mapping([((rows, cols), np.int8), ((rows, cols // 32), np.float32)], now=True).arrays)
    kernels_numba.split_q8_0_pieces(loader.tensor_pieces(name), w.qs, w.d)
    return w


MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault a range in, writable, in one call (Python 3.11 lacks the name)


class _Mapping:
    """Arrays of the given (shape, dtype) in one anonymous mapping, whose pages the kernel provides
    a range at a time (``populate``) or all at once (``now``) rather than one fault per 4 KB.

    np.empty's memory is faulted in a page at a time as it is first written, and numpy asks for
    transparent huge pages, whose faults compact memory here: 4.4 s to touch 1.2 GB, against
    1.2 s in 4 KB faults and 0.55 s populated. madvise runs without the GIL, so populating a
    block's slots overlaps the read-ahead threads' hashing."""

    def __init__(self, specs: list[tuple[tuple, type]], now: bool = False):
        import mmap

        offsets, end = [], 0
        for shape, dtype in specs:
            offsets.append(end)
            end += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 64) * 64  # 64-byte aligned starts
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (getattr(mmap, "MAP_POPULATE", 0) if now else 0)
        self.region = mmap.mmap(-1, max(end, 1), flags=flags)
        self.page = mmap.PAGESIZE
        self.start = np.frombuffer(self.region, np.uint8).ctypes.data
        self.arrays = [np.ndarray(shape, dtype, buffer=self.region, offset=at)
                       for (shape, dtype), at in zip(specs, offsets)]

    def populate(self, a: np.ndarray) -> None:
        """Have the pages under ``a`` (a contiguous view of one of the arrays) in place."""
        lo = a.ctypes.data - self.start
        hi = min(len(self.region), -(-(lo + a.nbytes) // self.page) * self.page)
        lo -= lo % self.page
        try:
            self.region.madvise(MADV_POPULATE_WRITE, lo, hi - lo)
        except OSError:
            pass  # an older kernel: the pages fault in as they are written


class Q8Stacks:
    """The stacked arrays of ``layers``, filled one block at a time by ``load``."""

    def __init__(self, loader, layers: range):
        self.layers = layers
        self.sizes = {kind: [loader.tensor_entry(f"blk.{layers[0]}.{m}.weight").shape[0] for m in names]
                      for kind, names in KINDS.items()}
        shapes = {}
        for kind, names in KINDS.items():
            cols = loader.tensor_entry(f"blk.{layers[0]}.{names[0]}.weight").shape[1]
            rows = sum(self.sizes[kind])
            shapes["qs", kind] = ((len(layers), rows, cols), np.int8)
            shapes["d", kind] = ((len(layers), rows, cols // 32), np.float32)
        self.mapping = _Mapping(list(shapes.values()))
        arrays = self.mapping.arrays
        self.qs = {kind: arrays[i] for i, (part, kind) in enumerate(shapes) if part == "qs"}
        self.d = {kind: arrays[i] for i, (part, kind) in enumerate(shapes) if part == "d"}

    def load(self, loader, layer: int) -> dict:
        """Block ``layer``'s matrices split into its slots: {"qkv": FusedWeight, "o": Q8Weight,
        "gu": FusedWeight, "down": Q8Weight}, views of the stacks."""
        from engine import kernels_numba

        slot = self.layers.index(layer)
        out = {}
        for kind, names in KINDS.items():
            qs, d = self.qs[kind][slot], self.d[kind][slot]
            self.mapping.populate(qs)
            self.mapping.populate(d)
            r0 = 0
            for m, rows in zip(names, self.sizes[kind]):
                name = f"blk.{layer}.{m}.weight"
                if tuple(loader.tensor_entry(name).shape) != (rows, qs.shape[1]):
                    raise ValueError(f"{name}: shape differs from block {self.layers[0]}'s")  # the model checked
                kernels_numba.split_q8_0_pieces(loader.tensor_pieces(name), qs[r0:r0 + rows], d[r0:r0 + rows])
                r0 += rows
            w = Q8Weight(qs, d)
            out[kind] = FusedWeight([w], self.sizes[kind], stacked=True) if len(names) > 1 else w
        return out
