"""A real K-quant model (Gemma 3 270M Q4_K_M, from PyPI) survives the store byte for byte.

The engine never computes Gemma; the store must keep every byte of any GGUF anyway, and the loader
must dequantize K-quant tensors exactly as gguf-py does. llama.cpp must load the rebuilt file.
"""

import hashlib

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGMLQuantizationType

from distribution.local import LocalLoader
from fragmenter.fragment import fragment_file
from fragmenter.gguf_header import read_file_header
from recombiner.recombine import recombine, verify


@pytest.fixture(scope="module")
def kquant_gguf():
    from models.kquant import KQUANT_GGUF, KQUANT_SHA256

    if not KQUANT_GGUF.exists():
        pytest.fail(f"{KQUANT_GGUF} is missing: run scripts/setup.sh --tests first (README command 2 does)")
    assert hashlib.sha256(KQUANT_GGUF.read_bytes()).hexdigest() == KQUANT_SHA256
    return KQUANT_GGUF


@pytest.fixture(scope="module")
def kquant_store(kquant_gguf, tmp_path_factory):
    store = tmp_path_factory.mktemp("gemma") / "store"
    return fragment_file(str(kquant_gguf), store, progress=False)


def test_store_rebuilds_the_file_byte_for_byte(kquant_gguf, kquant_store, tmp_path):
    from models.kquant import KQUANT_SHA256

    m = kquant_store.manifest
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"} <= {t.ggml_type for t in m.tensors}
    assert m.model["architecture"] == "gemma3" and m.model["vocab_size"] == 262144
    assert verify(LocalLoader(kquant_store.store), progress=False).ok
    out = tmp_path / "rebuilt.gguf"
    result = recombine(LocalLoader(kquant_store.store), out, progress=False)
    assert result.sha256 == KQUANT_SHA256 == hashlib.sha256(out.read_bytes()).hexdigest()


def test_k_quant_tensors_dequantize_as_gguf_py_does(kquant_gguf, kquant_store):
    """gguf-py's dequantize on the original file's bytes is the reference (GGUFReader itself
    would take 10 s to index Gemma's 262k-token vocabulary, so the bytes are read directly)."""
    header, _ = read_file_header(str(kquant_gguf), decode_strings=False)
    raw = np.memmap(kquant_gguf, dtype=np.uint8, mode="r")
    loader = LocalLoader(kquant_store.store)
    smallest = {}
    for t in header.tensors:
        if t.type_name != "F32" and (t.type_name not in smallest or t.n_elements < smallest[t.type_name].n_elements):
            smallest[t.type_name] = t
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= set(smallest)
    for kind, t in smallest.items():
        start = header.data_offset + t.offset
        rows = raw[start:start + t.n_bytes].reshape(t.n_elements // t.dims[0], -1)
        expected = quants.dequantize(rows, GGMLQuantizationType(t.ggml_type))
        ours = loader.load_tensor(t.name)
        assert ours.shape == tuple(reversed(t.dims)) == expected.shape, t.name
        np.testing.assert_array_equal(ours, expected, err_msg=f"{t.name} ({kind})")


def test_llama_cpp_runs_the_rebuilt_file(kquant_store, tmp_path):
    import llama_cpp

    out = tmp_path / "rebuilt.gguf"
    recombine(LocalLoader(kquant_store.store), out, progress=False)
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=2, verbose=False, logits_all=True)
    tokens = llm.tokenize(b"The capital of France is")
    llm.eval(tokens)
    logits = np.asarray(llm.scores[len(tokens) - 1])
    assert logits.shape == (262144,) and np.isfinite(logits).all() and logits.std() > 0
    llm.close()
