"""SmolLM2 quantized by llama.cpp's own quantizer (Q4_K_M, Q4_0, F16): weights stay at the file's size
and the Numba kernels pass `validate` against llama.cpp on the F32 twin."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from distribution.gguf_file import GGUFFileLoader
from engine import quant_weights as qw
from engine.backends import Q8Weight
from engine.fast_decode_quant import QuantDecoder
from engine.model import LlamaModel
from tests.conftest import run_cli


@pytest.fixture(scope="session")
def requantized():
    """kind -> models/smollm2-135m-instruct-<kind>.gguf, made on first use (seconds) and kept."""
    from models.default import SOURCE_GGUF
    from models.requant import smollm2

    if not SOURCE_GGUF.exists():
        pytest.fail(f"{SOURCE_GGUF} is missing: run scripts/setup.sh first (README command 2 does)")
    return smollm2


def test_q4_k_m_weights_stay_quantized(requantized):
    path = requantized("Q4_K_M")
    loader = GGUFFileLoader(path)
    model = LlamaModel(loader, backend="numba")
    held = stored = 0
    types = set()
    for b in model.blocks:
        for fused in (b.qkv, b.attn_output, b.gate_up, b.ffn_down):
            for w in getattr(fused, "parts", [fused]):
                assert isinstance(w, (qw.QuantWeight, Q8Weight)), type(w).__name__
                types.add(w.ggml_type)
                held += w.blocks.nbytes if isinstance(w, qw.QuantWeight) else w.qs.nbytes + w.d.nbytes
    assert {"Q4_K", "Q6_K", "Q5_0"} <= types  # SmolLM2's 576 columns make llama.cpp fall back to Q5_0/Q8_0
    stored = sum(t.length for t in loader.manifest.tensors if t.layer is not None and len(t.shape) == 2)
    assert stored < held <= stored * 1.01  # as stored (Q8_0 fallbacks: + 2 bytes per 34), not 7x as float32


@pytest.mark.parametrize("kind", ["Q4_K_M", "Q4_0", "F16"])
def test_validate_passes_with_the_quantized_kernels(requantized, kind):
    path = requantized(kind)
    proc = run_cli("validate", path, "--gguf", path, "--kernels", "numba", "--reference", "twin",
                   "--positions", "64", "--greedy-tokens", "8", "--prompt", "What is the capital of France?",
                   "--json", timeout=900)
    report = json.loads(proc.stdout)
    assert report["reference"] == "f32-twin" and report["activations"] == "float"
    assert proc.returncode == 0 and report["pass"], {k: report.get(k) for k in ("mean_kl", "min_cosine", "greedy")}
    assert report["mean_kl"] <= 1e-4 and report["greedy_match"]


def test_q4_k_m_decode_step_equals_the_batched_pass(requantized):
    """Q4_K_M mixes Q5_0, Q8_0, Q4_K and Q6_K blocks: the one-call step (fast_decode_quant) computes
    what the batched pass computes, token by token, and a sub-span's step (a node serving blocks
    a..b of its span) is exactly the full step's blocks a..b."""
    model = LlamaModel(GGUFFileLoader(requantized("Q4_K_M")), backend="numba")
    assert isinstance(model.decoder, QuantDecoder)
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= {w.ggml_type for b in model.blocks for fused in (b.qkv, b.ffn_down)
                                                for w in getattr(fused, "parts", [fused])}
    tokens = [1, 504, 3437, 314, 260, 3575, 282, 4649, 47, 198, 1204, 30, 55]

    def run(decoder):
        model.decoder = decoder
        cache = model.new_cache(32)
        rows = [model.forward(np.array(tokens[:8]), cache)[None]]
        rows += [model.forward(np.array([t]), cache)[None] for t in tokens[8:]]
        return np.concatenate(rows)

    step = model.decoder
    fast, batched = run(step), run(None)
    # Attention sums in another order (chunks of 256 positions, F16 K/V read in the kernel), over
    # 30 blocks: logits of magnitude ~10 differ by a few 1e-3 (0.0031 seen), never in their order.
    np.testing.assert_allclose(fast, batched, rtol=1e-3, atol=1e-2)
    assert (fast.argmax(1) == batched.argmax(1)).all()

    cache = model.new_cache(4)
    x = np.random.default_rng(0).standard_normal((1, model.config.dim)).astype(np.float32)
    angles = np.ones(model.config.rope_dim // 2, np.float32), np.zeros(model.config.rope_dim // 2, np.float32)
    whole = step.step(x, 0, cache, *angles)
    halves = model.new_cache(4)
    first = SimpleNamespace(k=halves.k[:12], v=halves.v[:12])
    second = SimpleNamespace(k=halves.k[12:], v=halves.v[12:])
    y = step.span(12, 30).step(step.span(0, 12).step(x, 0, first, *angles), 0, second, *angles)
    np.testing.assert_array_equal(y, whole)
    np.testing.assert_array_equal(halves.k, cache.k)
