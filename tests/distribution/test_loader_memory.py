"""The loader while a model loads: fragments read and verified ahead on threads, read buffers
reused only once nothing views them, nothing kept once the model is built."""

from dataclasses import replace

import numpy as np
import pytest

from distribution.base import CorruptFragment, MissingFragment
from distribution.local import LocalLoader
from fragmenter.fragment import fragment_file
from fragmenter.manifest import Manifest
from models.factory import ModelSpec, write_model


@pytest.fixture
def store(tmp_path):
    path = write_model(replace(ModelSpec(), n_layers=4), tmp_path / "m.gguf")
    fragment_file(str(path), tmp_path / "s", 3000, progress=False)  # many fragments; tensors span several
    return tmp_path / "s", path.read_bytes()


def file_bytes(data, entry):
    return data[entry.offset:entry.offset + entry.length]


def test_pieces_and_bytes_are_the_files_bytes_with_read_ahead(store):
    directory, data = store
    loader = LocalLoader(directory)
    names = loader.manifest.tensor_names()
    loader.prefetch(loader.manifest.fragments_for(names))
    for name in names:
        entry = loader.tensor_entry(name)
        assert loader.tensor_bytes(name) == file_bytes(data, entry)
        assert b"".join(bytes(p) for p in loader.tensor_pieces(name)) == file_bytes(data, entry)
    assert len(entry.pieces) > 1 or any(len(loader.tensor_entry(n).pieces) > 1 for n in names)


def test_read_buffers_are_never_reused_under_a_view(store):
    """Views kept while many later fragments are read (with their buffers recycled) still hold
    their own bytes, and buffers nobody views are reused (the pool stays small)."""
    directory, data = store
    loader = LocalLoader(directory)
    loader.cache_bytes = 0  # nothing cached: every buffer is free for reuse as soon as nobody views it
    loader.read_ahead_bytes = 4 * 3000  # a few fragments ahead, not the whole store
    names = loader.manifest.tensor_names()
    loader.prefetch(loader.manifest.fragments_for(names))
    kept = {n: (loader.tensor_pieces(n), np.frombuffer(loader.tensor_bytes(n), np.uint8)) for n in names[::5]}
    for name in names:
        loader.tensor_pieces(name)
        loader.load_tensor(name)
    for name, (pieces, array) in kept.items():
        expected = file_bytes(data, loader.tensor_entry(name))
        assert b"".join(bytes(p) for p in pieces) == expected
        assert array.tobytes() == expected
    assert len(loader._buffers) < len(loader.manifest.unique_fragments()) // 2


def test_a_corrupt_or_short_fragment_read_ahead_is_named_when_used(store):
    directory, _ = store
    m = Manifest.load(directory)
    bad = m.tensor("blk.2.ffn_up.weight").pieces[0].fragment
    short = m.tensor("blk.3.attn_k.weight").pieces[-1].fragment
    path = directory / "fragments" / bad
    raw = path.read_bytes()
    path.write_bytes(raw[:7] + bytes([raw[7] ^ 0x40]) + raw[8:])
    (directory / "fragments" / short).write_bytes((directory / "fragments" / short).read_bytes()[:-1])
    loader = LocalLoader(directory)
    loader.read_ahead_bytes = 1 << 30  # everything read (and checked) ahead, on the threads
    loader.prefetch(m.fragments_for(m.tensor_names()))
    loader.load_tensor("blk.0.attn_q.weight")  # intact fragments still load
    with pytest.raises(CorruptFragment, match=f"{bad[:16]}.*SHA-256 mismatch"):
        loader.load_tensor("blk.2.ffn_up.weight")
    with pytest.raises(CorruptFragment, match=f"{short[:16]}.*truncated"):
        loader.tensor_pieces("blk.3.attn_k.weight")
    (directory / "fragments" / short).unlink()
    with pytest.raises(MissingFragment, match=short[:16]):
        LocalLoader(directory).load_tensor("blk.3.attn_k.weight")


def test_release_keeps_nothing_and_loading_goes_on(store):
    directory, data = store
    loader = LocalLoader(directory)
    names = loader.manifest.tensor_names()
    loader.prefetch(loader.manifest.fragments_for(names))
    kept = loader.tensor_bytes(names[3])
    loader.load_tensor(names[1])
    loader.release()
    assert not loader._cache and loader._cached_bytes == 0 and not loader._pending and not loader._queue
    assert loader._pool is None and not loader._buffers
    assert kept == file_bytes(data, loader.tensor_entry(names[3]))  # a view outlives the pool
    assert loader.tensor_bytes(names[-1]) == file_bytes(data, loader.tensor_entry(names[-1]))
