"""Loading: one copy of a tied embedding, spans without the edges, nothing kept by the loader."""

from dataclasses import replace

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import UserError
from distribution.gguf_file import GGUFFileLoader
from distribution.local import LocalLoader
from engine import kernels_numba
from engine.model import LlamaModel
from fragmenter.fragment import fragment_file
from models.factory import ModelSpec, write_model

TOKENS = np.array([0, 1, 17, 99, 23, 250, 7, 311, 42, 5, 128, 511, 64, 300, 17])


def stored_rows(loader, tokens):
    """The token_embd rows dequantized by gguf-py from the stored bytes: what embed gave before."""
    rows, qtype = loader.load_quantized("token_embd.weight")
    return quants.dequantize(rows[tokens], qtype).astype(np.float32).reshape(len(tokens), -1)


@pytest.mark.parametrize("weight_type", ["Q8_0", "Q4_0", "Q4_1", "F16", "F32", "BF16"])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_tied_embedding_reads_the_heads_rows_bit_for_bit(tmp_path, weight_type, backend):
    path = write_model(replace(ModelSpec(), weight_type=weight_type, tied_output=True), tmp_path / "m.gguf")
    fragment_file(str(path), tmp_path / "s", 4096, progress=False)
    loader = LocalLoader(tmp_path / "s")
    model = LlamaModel(loader, backend=backend)
    assert not hasattr(model, "embedding_rows"), "a tied embedding is kept once, as the head's weight"
    got = model.embed(TOKENS)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, stored_rows(loader, TOKENS))


def test_untied_embedding_is_its_own_rows(factory_models, tmp_path):
    fragment_file(str(factory_models["q8_0-spm-gqa"]), tmp_path / "s", 4096, progress=False)
    loader = LocalLoader(tmp_path / "s")
    model = LlamaModel(loader, backend="numba")
    np.testing.assert_array_equal(model.embed(TOKENS), stored_rows(loader, TOKENS))


def test_tied_smollm2_embedding_is_unchanged(default_store):
    loader = LocalLoader(default_store)
    model = LlamaModel(loader, backend="numba")
    tokens = np.array([0, 1, 2, 100, 4000, 49151, 12345, 1])
    assert not hasattr(model, "embedding_rows")
    np.testing.assert_array_equal(model.embed(tokens), stored_rows(loader, tokens))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_span_without_edges_loads_no_edge_tensor(tmp_path, backend):
    """edges=False (a swarm node): the span's blocks only, even holding block 0 and the last block;
    its hidden states are those of the span loaded with its edges."""
    path = write_model(replace(ModelSpec(), n_layers=3), tmp_path / "m.gguf")
    m = fragment_file(str(path), tmp_path / "s", 2048, progress=False).manifest
    read, fetched = [], []

    class Recording(LocalLoader):
        def fetch(self, fid):
            fetched.append(fid)
            return super().fetch(fid)

        def tensor_pieces(self, name):
            read.append(name)
            return super().tensor_pieces(name)

        def tensor_bytes(self, name):
            read.append(name)
            return super().tensor_bytes(name)

    bare = LlamaModel(Recording(tmp_path / "s"), backend=backend, layers=(0, 2), edges=False)
    assert read and not [n for n in read if not n.startswith("blk.")]
    assert not bare.has_embedding and not bare.has_head
    assert not hasattr(bare, "output") and not hasattr(bare, "embedding_rows")
    with pytest.raises(RuntimeError, match="embedding"):
        bare.embed(TOKENS)
    edge_only = set(m.fragments_for(["token_embd.weight", "output.weight", "output_norm.weight"])) - set(
        m.fragments_for([t.name for t in m.layer_tensors(0, 2)], header=True))
    assert edge_only and not edge_only & set(fetched)  # (without fragments only the edges use, it would mean nothing)

    full = LlamaModel(LocalLoader(tmp_path / "s"), backend=backend, layers=(0, 2))
    x = full.embed(TOKENS)
    np.testing.assert_array_equal(bare.forward_layers(x, bare.new_cache(32), 0),
                                  full.forward_layers(x, full.new_cache(32), 0))


def test_the_loader_keeps_no_fragment_once_the_model_is_built(default_store):
    loader = LocalLoader(default_store)
    LlamaModel(loader, backend="numba")
    assert loader._cached_bytes == 0 and not loader._cache and not loader._pending


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), cuts=st.lists(st.integers(0, 40 * 34), max_size=6), seed=st.integers(0, 99))
def test_q8_0_split_from_pieces_cut_anywhere_equals_split_of_the_whole(n, cuts, seed):
    """Fragments cut a tensor anywhere, inside a block too: splitting its pieces one by one gives
    what splitting the joined bytes gives, and the values gguf-py dequantizes."""
    rng = np.random.default_rng(seed)
    blocks = quants.quantize(rng.standard_normal((n, 32)).astype(np.float32), GGMLQuantizationType.Q8_0)
    raw = blocks.tobytes()
    edges = sorted({0, len(raw), *(c for c in cuts if c < len(raw))})
    pieces = [memoryview(raw)[a:b] for a, b in zip(edges, edges[1:])]
    qs, d = np.empty((n, 32), np.int8), np.empty((n, 1), np.float32)
    kernels_numba.split_q8_0_pieces(pieces, qs, d)
    whole_qs, whole_d = kernels_numba.split_q8_0(blocks)
    np.testing.assert_array_equal(qs, whole_qs)
    np.testing.assert_array_equal(d, whole_d)
    np.testing.assert_array_equal(qs * d, quants.dequantize(blocks, GGMLQuantizationType.Q8_0))
    with pytest.raises(ValueError):
        kernels_numba.split_q8_0_pieces(pieces + [memoryview(b"x")], qs, d)


def test_q8_0_blocks_load_straight_into_the_decoders_stacks(tmp_path, monkeypatch):
    """All-Q8_0 blocks are split into (layer, rows, cols) stacks as they load: each matrix equals
    the split of its stored bytes, and the decode step uses those stacks without a copy."""
    from engine import q8_0_stacks

    made, original = [], q8_0_stacks.Q8Stacks
    monkeypatch.setattr(q8_0_stacks, "Q8Stacks", lambda *a: made.append(original(*a)) or made[-1])
    path = write_model(replace(ModelSpec(), n_layers=3), tmp_path / "m.gguf")
    fragment_file(str(path), tmp_path / "s", 1000, progress=False)  # cuts tensors inside blocks
    loader = LocalLoader(tmp_path / "s")
    model = LlamaModel(loader, backend="numba")
    dec = model.decoder
    assert all(made[0].qs[k] is s[0] and made[0].d[k] is s[1]
               for k, s in (("qkv", dec.qkv), ("o", dec.o), ("gu", dec.gu), ("down", dec.down)))
    for i, b in enumerate(model.blocks):
        for w, names, (qs3, d3) in ((b.qkv.parts[0], ["attn_q", "attn_k", "attn_v"], dec.qkv),
                                    (b.attn_output, ["attn_output"], dec.o),
                                    (b.gate_up.parts[0], ["ffn_gate", "ffn_up"], dec.gu),
                                    (b.ffn_down, ["ffn_down"], dec.down)):
            stored = np.concatenate([loader.load_quantized(f"blk.{i}.{n}.weight")[0] for n in names])
            qs, d = kernels_numba.split_q8_0(stored)
            np.testing.assert_array_equal(w.qs, qs)
            np.testing.assert_array_equal(w.d, d)
            assert w.qs.base is qs3 and w.d.base is d3 and np.shares_memory(w.qs, qs3[i])
    head_qs, head_d = kernels_numba.split_q8_0(loader.load_quantized("output.weight")[0])
    np.testing.assert_array_equal(model.output.qs, head_qs)
    np.testing.assert_array_equal(model.output.d, head_d)


def test_a_failed_load_leaves_no_read_ahead_behind(tmp_path):
    """A corrupt fragment met mid-load is named, and the fragments read ahead are let go."""
    from distribution.base import CorruptFragment

    path = write_model(replace(ModelSpec(), n_layers=3), tmp_path / "m.gguf")
    m = fragment_file(str(path), tmp_path / "s", 2048, progress=False).manifest
    fid = m.tensor("blk.1.ffn_gate.weight").pieces[0].fragment
    target = tmp_path / "s" / "fragments" / fid
    raw = bytearray(target.read_bytes())
    raw[100] ^= 1
    target.write_bytes(bytes(raw))
    loader = LocalLoader(tmp_path / "s")
    with pytest.raises(CorruptFragment, match=fid[:16]):
        LlamaModel(loader, backend="numba")
    assert loader._pool is None and not loader._pending and not loader._cache


def test_every_loader_is_a_weight_source(factory_models, default_store):
    """The engine's declared protocol (engine/weights_source.py) holds for the loaders it is given."""
    from distribution.gguf_file import GGUFFileLoader
    from distribution.local import LocalLoader
    from engine.weights_source import WeightSource

    for loader in (GGUFFileLoader(factory_models["q8_0-spm-gqa"]), LocalLoader(default_store)):
        assert isinstance(loader, WeightSource), type(loader).__name__


@pytest.mark.parametrize("key, value, needle", [
    ("llama.block_count", "two", "llama.block_count must be a whole number >= 1, not 'two'"),
    ("llama.block_count", float("nan"), "llama.block_count must be a whole number >= 1, not nan"),
    ("llama.block_count", True, "llama.block_count must be a whole number"),
    ("llama.attention.head_count", 0, "llama.attention.head_count must be a whole number >= 1, not 0"),
    ("llama.attention.head_count_kv", 0, "llama.attention.head_count_kv must be a whole number >= 1, not 0"),
    ("llama.embedding_length", -64, "llama.embedding_length must be a whole number >= 1"),
    ("llama.context_length", 2.5, "llama.context_length must be a whole number"),
    ("llama.rope.freq_base", float("inf"), "llama.rope.freq_base must be a positive number"),
    ("llama.attention.layer_norm_rms_epsilon", "tiny", "llama.attention.layer_norm_rms_epsilon must be a positive number"),
])
def test_metadata_of_the_wrong_kind_is_one_line_naming_the_key(factory_models, key, value, needle):
    """A count that is a string, NaN or zero ended in a ValueError or ZeroDivisionError traceback."""
    from engine.config import LlamaConfig

    md = dict(GGUFFileLoader(factory_models["q8_0-spm-gqa"]).metadata, **{key: value})
    with pytest.raises(UserError, match="m.gguf: metadata " + needle.replace("(", r"\(").replace(")", r"\)")):
        LlamaConfig.from_metadata(md, "m.gguf")


def test_blocks_beyond_the_metadatas_count_are_refused(factory_models):
    """block_count 1 in a file of two blocks ran one block, and gave wrong text with exit 0."""
    loader = GGUFFileLoader(factory_models["q8_0-spm-gqa"])
    n = loader.metadata["llama.block_count"]
    loader.metadata["llama.block_count"] = n - 1
    with pytest.raises(UserError, match=f"holds tensors of block {n - 1}, but its metadata llama.block_count "
                                        f"is {n - 1}"):
        LlamaModel(loader)
