"""The local loader: verified bytes, gguf-py-equal dequantization, one orientation, only needed fragments."""

import json

import numpy as np
import pytest
from gguf import GGUFReader, quants

from common.errors import StoreError
from distribution.base import CorruptFragment, MissingFragment
from distribution.local import LocalLoader
from fragmenter.fragment import fragment_file
from fragmenter.manifest import Manifest


class CountingLoader(LocalLoader):
    def __init__(self, store):
        super().__init__(store)
        self.fetched = []

    def fetch(self, fragment_id):
        self.fetched.append(fragment_id)
        return super().fetch(fragment_id)


def test_dequantization_equals_gguf_py_for_every_type(factory_models, tmp_path):
    for name, path in factory_models.items():
        fragment_file(str(path), tmp_path / name, 4096, progress=False)
        loader = LocalLoader(tmp_path / name)
        for t in GGUFReader(path).tensors:
            expected = quants.dequantize(t.data, t.tensor_type)
            got = loader.load_tensor(t.name)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, expected.reshape(got.shape), err_msg=f"{name} {t.name}")


def test_orientation_is_rows_of_output_units(factory_models, tmp_path):
    """(out, in): row j holds the weights of output unit j, i.e. ne1 rows of ne0 values."""
    path = factory_models["f32-spm-gqa"]
    fragment_file(str(path), tmp_path / "s", 4096, progress=False)
    loader = LocalLoader(tmp_path / "s")
    entry = loader.tensor_entry("blk.0.ffn_down.weight")
    w = loader.load_tensor("blk.0.ffn_down.weight")
    assert w.shape == (entry.gguf_shape[1], entry.gguf_shape[0])  # (dim, ffn): out = dim, in = ffn
    raw = np.frombuffer(loader.tensor_bytes("blk.0.ffn_down.weight"), dtype=np.float32)
    np.testing.assert_array_equal(w[1], raw[entry.gguf_shape[0]:2 * entry.gguf_shape[0]])


def test_loading_one_layer_reads_only_its_fragments(factory_models, tmp_path):
    path = factory_models["f32-spm-gqa"]
    m = fragment_file(str(path), tmp_path / "s", 8192, progress=False).manifest
    loader = CountingLoader(tmp_path / "s")
    tensors = loader.load_layer(1)
    assert set(tensors) == {t.name for t in m.layer_tensors(1, 1)}
    # The header's fragments too: the manifest's table is checked against the header before use.
    expected = set(m.fragments_for(tensors, header=True))
    assert set(loader.fetched) == expected
    for fid in set(loader.fetched) - set(m.fragments_for([], header=True)):
        assert all(h.startswith("blk.1.") for h in m.holders(fid))


def test_metadata_from_header_fragments(default_store):
    loader = LocalLoader(default_store)
    md = loader.metadata
    assert md["general.architecture"] == "llama"
    assert len(md["tokenizer.ggml.tokens"]) == loader.manifest.model["vocab_size"]


@pytest.fixture
def store(factory_models, tmp_path):
    fragment_file(str(factory_models["q8_0-spm-gqa"]), tmp_path / "s", 4096, progress=False)
    return tmp_path / "s"


def test_missing_and_corrupt_fragments_name_the_tensor(store):
    m = Manifest.load(store)
    entry = m.tensor("blk.0.attn_q.weight")
    fid = entry.pieces[0].fragment
    path = store / "fragments" / fid
    data = path.read_bytes()
    path.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    with pytest.raises(CorruptFragment, match="blk.0.attn_q.weight"):
        LocalLoader(store).load_tensor("blk.0.attn_q.weight")
    path.unlink()
    with pytest.raises(MissingFragment, match=fid[:16]):
        LocalLoader(store).load_tensor("blk.0.attn_q.weight")


def edit_manifest(store, change):
    path = store / "manifest.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format_version=99), "unknown manifest format version 99"),
    (lambda d: d["fragments"][1].update(size=d["fragments"][1]["size"] + 1), "fragment"),
    (lambda d: d["tensors"][3].update(length=d["tensors"][3]["length"] - 32), "length"),
    (lambda d: d["fragments"][0].update(id="../x"), "not a SHA-256"),
    (lambda d: d["tensors"][0]["pieces"][0].update(fragment="../../etc/passwd"), "not in the fragment list"),
    (lambda d: d["source"].update(size=1), "source file has 1"),
    (lambda d: d["tensors"][2].update(ggml_type="Q9_9"), "unknown GGML type"),
    (lambda d: d.pop("fragments"), "the field 'fragments' is missing"),
    # an edited size is named with the entry after it (it was named alone, as if that one were wrong)
    (lambda d: d["fragments"][1].update(size=5), r"size 5\) ends at .*one of the two entries is wrong"),
])
def test_hand_edited_manifest_is_rejected(store, change, message):
    edit_manifest(store, change)
    with pytest.raises(StoreError, match=message):
        LocalLoader(store)


@pytest.mark.parametrize("text, message", [("[]", "not an array"), ('"x"', "not a string"), ("3", "not a number"),
                                           ('{"format": "gguf-fragment-store", "format_version": 1, "source": 7}',
                                            "wrong kind of value")])
def test_manifest_of_the_wrong_shape_is_named_plainly(store, text, message):
    """No Python internals in the message ("'list' object has no attribute 'get'" it said)."""
    (store / "manifest.json").write_text(text)
    with pytest.raises(StoreError, match=message) as e:
        LocalLoader(store)
    assert "object" not in str(e.value).replace("a JSON object", "") and "Error" not in str(e.value)


def test_manifest_that_is_not_json(store):
    (store / "manifest.json").write_text("{ nope")
    with pytest.raises(StoreError, match="bad JSON"):
        LocalLoader(store)


def test_a_first_fetch_that_loses_the_lock_leaves_the_winners_directory(factory_models, tmp_path, monkeypatch):
    """Two first fetches into one -o: the one that lost the store lock removed the directory the
    other was writing (both had seen it absent)."""
    import fcntl
    import os

    import distribution.store_copy as store_copy
    from common.errors import UserError
    from distribution.local import LocalLoader
    from fragmenter.fragment import fragment_file

    fragment_file(str(factory_models["q8_0-spm-gqa"]), tmp_path / "a", 8192, progress=False)
    out, held = tmp_path / "copy", []
    original = store_copy.prepare_store

    def prepare_then_lose_the_race(path):  # the winner takes the lock between the check and ours
        result = original(path)
        fd = os.open(path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(fd)
        return result

    monkeypatch.setattr(store_copy, "prepare_store", prepare_then_lose_the_race)
    try:
        with pytest.raises(UserError):
            store_copy.fetch_store(LocalLoader(tmp_path / "a"), out)
        assert (out / "fragments").is_dir()  # the winner's, left alone
    finally:
        for fd in held:
            os.close(fd)


def test_a_failed_fetch_into_a_directory_the_user_made_leaves_it_as_it_was(store, tmp_path):
    """A fetch that failed half-way left a directory the user had made with a fragments/ directory
    and the fragments copied so far (one made by the run itself was removed whole)."""
    from distribution import store_copy

    doc = json.loads((store / "manifest.json").read_text())
    victim = doc["fragments"][-1]["id"]  # the last, so that others are copied before it fails
    data = bytearray((store / "fragments" / victim).read_bytes())
    data[0] ^= 1
    (store / "fragments" / victim).write_bytes(bytes(data))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CorruptFragment, match=victim[:16]):
        store_copy.fetch_store(LocalLoader(store), out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
