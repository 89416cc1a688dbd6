"""The Numba fast path: kernels equal the reference math, weights stay quantized, validation holds."""

import json

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from distribution.gguf_file import GGUFFileLoader
from distribution.local import LocalLoader
from engine import kernels_numba as k
from engine.backends import NumbaBackend, Q8Weight
from engine.model import LlamaModel
from tests.conftest import run_cli

Q8 = GGMLQuantizationType.Q8_0


def q8_weight(rng, rows, cols):
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    blocks = quants.quantize(values, Q8)
    return blocks, quants.dequantize(blocks, Q8).reshape(rows, cols)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 200), nb=st.integers(1, 12), tokens=st.integers(1, 8), seed=st.integers(0, 999))
def test_q8_0_kernels_equal_dequantized_products(rows, nb, tokens, seed):
    rng = np.random.default_rng(seed)
    blocks, dense = q8_weight(rng, rows, nb * 32)
    qs, d = k.split_q8_0(blocks)
    x = rng.standard_normal((tokens, nb * 32)).astype(np.float32)
    expected = x.astype(np.float64) @ dense.T.astype(np.float64)
    out = np.empty(rows, np.float32)
    k.q8_0_matvec(qs, d, x[0], out)
    np.testing.assert_allclose(out, expected[0], rtol=1e-4, atol=1e-4)
    outs = np.empty((tokens, rows), np.float32)
    k.q8_0_matvecs(qs, d, x, outs)
    np.testing.assert_allclose(outs, expected, rtol=1e-4, atol=1e-4)
    deq = np.empty((rows, nb * 32), np.float32)
    k.q8_0_dequantize(qs, d, deq)
    np.testing.assert_array_equal(deq, dense)


def test_weights_stay_quantized(default_store):
    model = LlamaModel(LocalLoader(default_store), backend="numba")
    held = 0
    for b in model.blocks:
        for w in (b.qkv.parts[0], b.attn_output, b.gate_up.parts[0], b.ffn_down):
            assert isinstance(w, Q8Weight) and w.qs.dtype == np.int8
            held += w.qs.nbytes + w.d.nbytes
    stored = sum(t.length for t in model.loader.manifest.tensors if t.layer is not None and t.ggml_type == "Q8_0")
    assert held <= stored * 36 / 34 + 1  # int8 values + float32 scale per block: file size + 6%
    assert model.decoder is not None  # every block is Q8_0: the one-call decode step is used


@pytest.mark.parametrize("name", ["q8_0-spm-gqa", "q8_0-bpe-mha-tied", "f16-bpe-mqa", "q4_1-spm-gqa", "bf16-spm-gqa",
                                  "q4_0-spm-mha-tied"])
def test_fast_path_equals_reference(factory_models, name):
    """Same logits as the reference given the same (F16) KV cache, on every path: prompt, few, one
    (the one-call decode step: stacked Q8_0, or the stored types' in fast_decode_quant)."""
    loader = GGUFFileLoader(factory_models[name])
    ref, fast = LlamaModel(loader, backend="numpy"), LlamaModel(loader, backend="numba")
    assert fast.decoder is not None
    tokens = [1, 17, 99, 23, 250, 7, 311, 42, 5, 128, 64, 300, 3, 77]

    def run(model):
        cache = model.new_cache(32, dtype=np.float16)  # the fast path's cache type, for both
        rows = [model.forward(np.array(tokens[:10]), cache, all_logits=True)]  # prompt path (BLAS)
        rows += [model.forward(np.array(tokens[i:i + 3]), cache, all_logits=True) for i in (10,)]  # few tokens
        rows += [model.forward(np.array([t]), cache) for t in tokens[13:]]  # decode path
        return np.concatenate(rows)

    assert fast.new_cache(4).k.dtype == np.float16 and ref.new_cache(4).k.dtype == np.float32
    a, b = run(ref), run(fast)
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3)
    assert (a.argmax(1) == b.argmax(1)).all()


def test_fast_path_passes_validation_on_the_default_model(default_store, default_gguf):
    proc = run_cli("validate", default_store, "--gguf", default_gguf, "--kernels", "numba", "--json", timeout=900)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["pass"] and report["greedy_match"], report.get("greedy")


def test_speed_report_fields(factory_models):
    """The --speed report is complete (speed itself is measured by benchmarks, not asserted here)."""
    path = factory_models["q8_0-spm-gqa"]
    proc = run_cli("validate", path, "--gguf", path, "--speed", "--tokens", "4", "--prompt-tokens", "64",
                   "--rounds", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    for side in ("engine", "llama_cpp"):
        assert r[side]["prefill_tok_s"] > 0 and r[side]["decode_tok_s"] > 0
    assert r["decode_ratio"] == pytest.approx(r["engine"]["decode_tok_s"] / r["llama_cpp"]["decode_tok_s"], abs=2e-3)
    assert r["kernels"] == "numba" and r["prompt_tokens"] == 64 and r["compile_s"] >= 0


def test_emulation_needs_the_reference_kernels():
    from common.errors import UserError

    with pytest.raises(UserError, match="numpy"):
        NumbaBackend(emulate_llama_cpp=True)


def test_a_float32_cache_still_decodes_right(factory_models):
    """A cache of another type than the decode step's (a caller's own float32 cache) takes the
    batched pass instead of being misread."""
    loader = GGUFFileLoader(factory_models["q8_0-spm-gqa"])
    ref, fast = LlamaModel(loader, backend="numpy"), LlamaModel(loader, backend="numba")
    tokens = [1, 17, 99, 23, 250, 7]

    def run(model):
        cache = model.new_cache(16, dtype=np.float32)
        model.forward(np.array(tokens[:4]), cache)
        return np.concatenate([model.forward(np.array([t]), cache) for t in tokens[4:]])

    np.testing.assert_allclose(run(fast), run(ref), rtol=1e-3, atol=1e-3)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 600))
def test_kernel_scratch_starts_on_a_cache_line(n):
    """The lane accumulators of the Q8_0 kernels come from aligned_scratch: 16-byte aligned
    (np.empty's), they straddled a 4 KB page now and then and a process decoded 3-4x slower for
    its whole life (benchmarks/scratch_alignment.py measures the two placements)."""
    a = k.aligned_scratch(n)
    assert a.shape == (n,) and a.dtype == np.float32 and a.ctypes.data % 64 == 0


def test_q8_0_kernels_take_their_accumulators_from_aligned_scratch():
    """A kernel that went back to np.empty for them would be 3-4x slow in an unlucky process
    (no test can time that here): every Q8_0 kernel holding lane accumulators uses aligned_scratch."""
    import inspect
    import re

    from engine import fast_decode

    for fn in (k.q8_0_matvec, k.q8_0_matvecs, fast_decode.decode_blocks):
        source = inspect.getsource(fn.py_func)
        accs = re.findall(r"acc = (.*)", source)
        assert accs and all(a.startswith("aligned_scratch(") for a in accs), (fn.__name__, accs)
