"""Kernels on weights kept as stored (F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) against
gguf-py's dequantize followed by a float64 product; weights stay at their stored size."""

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from distribution.gguf_file import GGUFFileLoader
from engine import kernels_quant as kq
from engine import quant_weights as qw
from engine.backends import DenseWeight, NumbaBackend, Q8Weight
from engine.model import LlamaModel

TYPES = sorted(kq.BLOCKS)
# Where K-quant blocks keep their f16 super-block scales (byte offsets): random bytes elsewhere are
# valid 4/6-bit values and 6-bit or int8 sub-scales, but a random f16 may be inf or NaN.
_F16_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def stored_blocks(rng, type_name: str, rows: int, cols: int) -> np.ndarray:
    """(rows, bytes per row) uint8 as a GGUF file holds them: gguf-py's quantizer where it has one,
    else random bytes with finite, modest f16 scales."""
    qtype = GGMLQuantizationType[type_name]
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    if type_name == "F16":
        raw = values.astype(np.float16).view(np.uint8)
    elif type_name not in _F16_SCALES:
        raw = np.ascontiguousarray(quants.quantize(values, qtype)).view(np.uint8).reshape(rows, -1)
    else:
        block, size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        for p in _F16_SCALES[type_name]:
            scales = rng.uniform(-0.02, 0.02, (rows, cols // block)).astype(np.float16)
            raw[:, :, p:p + 2] = scales.view(np.uint8).reshape(rows, cols // block, 2)
        raw = raw.reshape(rows, -1)
    raw.flags.writeable = False  # as loaded weights are: the kernels' one compiled specialization
    return raw


def reference(blocks: np.ndarray, type_name: str, rows: int) -> np.ndarray:
    return quants.dequantize(blocks, GGMLQuantizationType[type_name]).reshape(rows, -1).astype(np.float64)


def assert_products_close(got: np.ndarray, dense: np.ndarray, x: np.ndarray) -> None:
    """got (T, R) against x @ dense.T in float64, within float32 rounding of each dot product:
    the error allowed for entry (t, r) is relative to sum_i |x[t, i] * w[r, i]|."""
    expected = x.astype(np.float64) @ dense.T
    bound = np.abs(x.astype(np.float64)) @ np.abs(dense).T
    assert np.all(np.abs(got - expected) <= 1e-5 * bound + 1e-30), np.max(np.abs(got - expected) / (bound + 1e-30))


# Rows are odd (never a multiple of the thread count, so the last chunk is short); columns are any
# number of blocks, so K-quant rows are multiples of 256 and the others multiples of 32.
@settings(max_examples=60, deadline=None)
@given(type_name=st.sampled_from(TYPES), half_rows=st.integers(0, 40), nb=st.integers(1, 6),
       tokens=st.integers(1, qw.SMALL_BATCH), seed=st.integers(0, 2**32 - 1))
def test_kernels_equal_dequantized_float64_products(type_name, half_rows, nb, tokens, seed):
    rng = np.random.default_rng(seed)
    rows, cols = 2 * half_rows + 1, nb * kq.BLOCKS[type_name][0]
    blocks = stored_blocks(rng, type_name, rows, cols)
    dense = reference(blocks, type_name, rows)
    kind = kq.KINDS[type_name]

    out = np.empty((rows, cols), np.float32)
    kq.dequantize(kind, blocks, out)
    np.testing.assert_allclose(out, dense, rtol=1e-6, atol=1e-6 * np.abs(dense).max())

    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    got = np.empty((tokens, rows), np.float32)
    kq.matvecs(kind, blocks, x, got)
    assert_products_close(got, dense, x)


@pytest.mark.parametrize("type_name", TYPES)
def test_matmul_all_paths(type_name, monkeypatch):
    """QuantMatmul: one token, a few, and a prompt through BLAS in several row chunks."""
    monkeypatch.setattr(qw, "SCRATCH_FLOATS", 512 * 7)  # a 61-row matrix goes in 9 chunks of 7 rows
    rng = np.random.default_rng(7)
    rows, cols = 61, 2 * kq.BLOCKS[type_name][0]
    blocks = stored_blocks(rng, type_name, rows, cols)
    w = qw.QuantWeight(blocks, type_name, cols)
    dense = reference(blocks, type_name, rows)
    mm = qw.QuantMatmul()
    for tokens in (1, 5, 23):
        x = rng.standard_normal((tokens, cols)).astype(np.float32)
        assert_products_close(mm.matmul(x, w), dense, x)


def test_stack_only_one_type():
    rng = np.random.default_rng(1)
    a = qw.QuantWeight(stored_blocks(rng, "Q4_0", 3, 64), "Q4_0", 64)
    b = qw.QuantWeight(stored_blocks(rng, "Q4_0", 5, 64), "Q4_0", 64)
    c = qw.QuantWeight(stored_blocks(rng, "Q5_0", 5, 64), "Q5_0", 64)
    s = qw.stack([a, b])
    assert s.rows == 8 and s.ggml_type == "Q4_0" and not s.blocks.flags.writeable
    np.testing.assert_array_equal(s.blocks, np.concatenate([a.blocks, b.blocks]))
    assert qw.stack([a, c]) is None and qw.stack([a, DenseWeight(np.zeros((2, 64), np.float32), "F32")]) is None


class _OneTypeLoader:
    """Just enough loader for NumbaBackend.prepare: every tensor is (8, 256) of one type."""

    def __init__(self, type_name):
        from types import SimpleNamespace

        self.entry = SimpleNamespace(ggml_type=type_name, shape=(8, 256))

    def tensor_entry(self, name):
        return self.entry

    def load_tensor(self, name):
        return np.zeros((8, 256), np.float32)


def test_types_without_kernel_are_expanded_and_said_once(capsys, monkeypatch):
    monkeypatch.setattr(qw, "_noted", set())
    backend = NumbaBackend()
    for name in ("a", "b"):
        assert isinstance(backend.prepare(_OneTypeLoader("Q3_K"), name), DenseWeight)
    err = capsys.readouterr().err
    assert err.count("Q3_K") == 1 and "float32" in err


def held_weights(model) -> list:
    ws = []
    for b in model.blocks:
        for w in (b.qkv, b.attn_output, b.gate_up, b.ffn_down):
            ws += getattr(w, "parts", [w])
    return ws + [model.output]


def held_bytes(w) -> int:
    if isinstance(w, qw.QuantWeight):
        return w.blocks.nbytes
    if isinstance(w, Q8Weight):
        return w.qs.nbytes + w.d.nbytes
    return w.values.nbytes


@pytest.mark.parametrize("name", ["f16-spm-gqa", "bf16-spm-gqa", "q4_0-spm-mha-tied", "q4_1-spm-gqa"])
def test_factory_weights_stay_as_stored(factory_models, name):
    loader = GGUFFileLoader(factory_models[name])
    model = LlamaModel(loader, backend="numba")
    weights = held_weights(model)
    assert all(isinstance(w, qw.QuantWeight) for w in weights), {type(w).__name__ for w in weights}
    names = set(loader.manifest.tensor_names())
    head = "output.weight" if "output.weight" in names else "token_embd.weight"
    stored = sum(t.length for t in loader.manifest.tensors
                 if t.name == head or (t.layer is not None and len(t.shape) == 2))
    assert sum(held_bytes(w) for w in weights) == stored  # the file's bytes, nothing expanded
    # Views of the mapped file are used in place: stacking Q, K, V would copy them.
    assert not any(fw.stacked for b in model.blocks for fw in (b.qkv, b.gate_up))
