"""The forward pass: equal to llama.cpp, KV cache consistent, spans compose, bad models refused."""

from dataclasses import replace

import numpy as np
import pytest
from gguf import GGUFWriter

from common.errors import UserError
from distribution.gguf_file import GGUFFileLoader
from distribution.local import LocalLoader
from engine.model import LlamaModel
from fragmenter.fragment import fragment_file
from models.factory import ModelSpec, write_model
from validation.reference import load_llama, teacher_forced_logits

TOKENS = [1, 17, 99, 23, 250, 7, 311, 42, 5, 128, 64, 300]


@pytest.mark.parametrize("name", ["f32-spm-gqa", "f16-bpe-mqa", "q4_0-spm-mha-tied"])
def test_logits_match_llama_cpp(factory_models, name):
    path = factory_models[name]
    model = LlamaModel(GGUFFileLoader(path), emulate_llama_cpp=True)
    ours = model.forward(np.array(TOKENS), model.new_cache(64), all_logits=True)
    ref = teacher_forced_logits(load_llama(path, n_ctx=64, logits_all=True), TOKENS)
    assert (ours.argmax(1) == ref.argmax(1)).all()
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.9999


def test_incremental_decode_equals_one_batched_pass(factory_models):
    model = LlamaModel(GGUFFileLoader(factory_models["q8_0-spm-gqa"]))
    batched = model.forward(np.array(TOKENS), model.new_cache(32), all_logits=True)
    cache = model.new_cache(32)
    rows = [model.forward(np.array(TOKENS[:4]), cache, all_logits=True)]
    rows += [model.forward(np.array([t]), cache) for t in TOKENS[4:]]
    np.testing.assert_allclose(np.concatenate(rows), batched, rtol=1e-4, atol=1e-4)
    assert cache.length == len(TOKENS)


def test_cache_truncate_and_reset(factory_models):
    model = LlamaModel(GGUFFileLoader(factory_models["f16-spm-gqa"]))
    cache = model.new_cache(32)
    first = model.forward(np.array(TOKENS), cache)
    cache.truncate(6)
    again = model.forward(np.array(TOKENS[6:]), cache)
    np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-5)
    cache.reset()
    np.testing.assert_allclose(model.forward(np.array(TOKENS), cache), first, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        cache.truncate(99)


def test_cache_layout_and_memory(factory_models):
    model = LlamaModel(GGUFFileLoader(factory_models["q8_0-spm-gqa"]))
    cfg = model.config
    cache = model.new_cache(100)
    assert cache.k.shape == (cfg.n_layers, 100, cfg.n_kv_heads, cfg.head_dim)
    assert cache.nbytes == 2 * cfg.n_layers * 100 * cfg.n_kv_heads * cfg.head_dim * 4


def test_spans_compose_to_the_whole_model(factory_models, tmp_path):
    spec = replace(ModelSpec(), n_layers=4)
    path = write_model(spec, tmp_path / "four.gguf")
    fragment_file(str(path), tmp_path / "store", 4096, progress=False)
    whole = LlamaModel(LocalLoader(tmp_path / "store"))
    expected = whole.forward(np.array(TOKENS), whole.new_cache(32), all_logits=True)

    front = LlamaModel(LocalLoader(tmp_path / "store"), layers=(0, 1))
    back = LlamaModel(LocalLoader(tmp_path / "store"), layers=(2, 3))
    assert front.has_embedding and not front.has_head and back.has_head and not back.has_embedding
    h = front.forward_layers(front.embed(np.array(TOKENS)), front.new_cache(32), 0)
    logits = back.head(back.forward_layers(h, back.new_cache(32), 0))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_span_loads_only_its_own_fragments(tmp_path):
    path = write_model(replace(ModelSpec(), n_layers=4), tmp_path / "four.gguf")
    m = fragment_file(str(path), tmp_path / "store", 4096, progress=False).manifest
    fetched = []

    class Counting(LocalLoader):
        def fetch(self, fid):
            fetched.append(fid)
            return super().fetch(fid)

    LlamaModel(Counting(tmp_path / "store"), layers=(1, 2))
    allowed = set(m.fragments_for([t.name for t in m.layer_tensors(1, 2)], header=True))
    assert fetched and set(fetched) <= allowed


def test_store_and_file_give_the_same_logits(factory_models, tmp_path):
    path = factory_models["q4_1-spm-gqa"]
    fragment_file(str(path), tmp_path / "s", 2048, progress=False)
    a = LlamaModel(LocalLoader(tmp_path / "s"))
    b = LlamaModel(GGUFFileLoader(path))
    np.testing.assert_array_equal(a.forward(np.array(TOKENS), a.new_cache(16)),
                                  b.forward(np.array(TOKENS), b.new_cache(16)))


def write_gguf(path, arch="llama", weight_qtype=None, halve_rows_of=None):
    """A minimal model; arch or one weight's type can be made unsupported, or one weight (named by
    ``halve_rows_of``) given half its rows, a shape the metadata does not allow."""
    from gguf.constants import GGMLQuantizationType

    spec = ModelSpec(n_layers=1)
    write_model(spec, path)
    if arch == "llama" and weight_qtype is None and halve_rows_of is None:
        return path
    from gguf import GGUFReader

    r = GGUFReader(path)
    w = GGUFWriter(str(path) + ".x", arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        new_key = key.replace("llama.", f"{arch}.") if key.startswith("llama.") else key
        vtype = field.types[0]
        w.add_key_value(new_key, field.contents(), vtype, field.types[1] if len(field.types) > 1 else None)
    for t in r.tensors:
        if weight_qtype is not None and t.name == "blk.0.attn_q.weight":
            qt = GGMLQuantizationType[weight_qtype]
            from gguf.constants import GGML_QUANT_SIZES

            block, size = GGML_QUANT_SIZES[qt]
            rows, cols = int(t.shape[1]), int(t.shape[0])
            w.add_tensor(t.name, np.zeros((rows, cols // block * size), np.uint8), raw_dtype=qt)
        elif t.name == halve_rows_of:
            rows = t.data.shape[0]
            w.add_tensor(t.name, t.data[: rows // 2], raw_dtype=t.tensor_type)
        else:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path) + ".x"


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", arch="gpt2")
    with pytest.raises(UserError, match="architecture 'gpt2' is not supported"):
        LlamaModel(GGUFFileLoader(path))


def test_unsupported_tensor_type(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", weight_qtype="Q8_1")
    with pytest.raises(UserError, match="blk.0.attn_q.weight.*Q8_1"):
        LlamaModel(GGUFFileLoader(path))


@pytest.mark.parametrize("name", ["blk.0.attn_v.weight", "blk.0.ffn_down.weight", "token_embd.weight"])
def test_a_shape_the_metadata_does_not_allow_is_named(tmp_path, name):
    """A header whose tensor shape disagrees with the hyperparameters is refused before any weight
    is used (it ended in a reshape traceback, or would be read wrongly)."""
    path = write_gguf(tmp_path / "m.gguf", halve_rows_of=name)
    with pytest.raises(UserError, match=f"{name}.*shape .*metadata implies"):
        LlamaModel(GGUFFileLoader(path))


def test_every_hyperparameter_comes_from_metadata(tmp_path):
    spec = replace(ModelSpec(), dim=128, n_heads=4, n_kv_heads=1, ffn_dim=224, n_layers=3, rope_base=50000.0,
                   rms_eps=1e-6, context_length=256)
    model = LlamaModel(GGUFFileLoader(write_model(spec, tmp_path / "m.gguf")))
    c = model.config
    assert (c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.n_layers) == (128, 4, 1, 32, 224, 3)
    assert (c.rope_base, c.context_length, c.rope_dim) == (50000.0, 256, 32)
    assert abs(c.rms_eps - 1e-6) < 1e-12


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_long_prompts_go_through_in_chunks(factory_models, monkeypatch, backend):
    """A prompt longer than PROMPT_CHUNK gives the logits of one pass (attention across chunks)."""
    import engine.model as model_module

    model = LlamaModel(GGUFFileLoader(factory_models["q8_0-spm-gqa"]), backend=backend)
    whole = model.forward(np.array(TOKENS), model.new_cache(32), all_logits=True)
    monkeypatch.setattr(model_module, "PROMPT_CHUNK", 5)
    chunked = model.forward(np.array(TOKENS), model.new_cache(32), all_logits=True)
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-4)
