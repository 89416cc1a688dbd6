"""Recombine refuses damaged stores and verify lists exactly what is damaged."""

import os
import stat

import pytest

from common.errors import StoreError, UserError
from distribution.local import LocalLoader
from fragmenter.fragment import fragment_file
from recombiner.recombine import recombine, verify


@pytest.fixture
def store(factory_models, tmp_path):
    path = factory_models["q8_0-spm-gqa"]
    result = fragment_file(str(path), tmp_path / "store", 4096, progress=False)
    return tmp_path / "store", result.manifest


def frag_path(store_dir, fid):
    return store_dir / "fragments" / fid


def test_verify_clean_store(store):
    report = verify(LocalLoader(store[0]), progress=False)
    assert report.ok and report.whole_file_ok


def test_verify_lists_missing_corrupt_and_truncated_with_tensors(store):
    store_dir, m = store
    block0 = [f.id for f in m.fragments if any(h.startswith("blk.0.") for h in m.holders(f.id))]
    block1 = [f.id for f in m.fragments if any(h.startswith("blk.1.") for h in m.holders(f.id))]
    missing, flipped, truncated = block0[0], block1[0], m.fragments[-1].id
    frag_path(store_dir, missing).unlink()
    data = bytearray(frag_path(store_dir, flipped).read_bytes())
    data[len(data) // 2] ^= 0x01
    frag_path(store_dir, flipped).write_bytes(bytes(data))
    frag_path(store_dir, truncated).write_bytes(frag_path(store_dir, truncated).read_bytes()[:-1])

    report = verify(LocalLoader(store_dir), progress=False)
    assert not report.ok
    assert len(report.missing) == 1 and missing[:16] in report.missing[0]
    assert "blk.0." in report.missing[0]
    corrupt = " ".join(report.corrupt)
    assert len(report.corrupt) == 2 and flipped[:16] in corrupt and truncated[:16] in corrupt
    assert "blk.1." in corrupt and "output" in corrupt
    assert report.whole_file_ok is None


def test_recombine_refuses_and_leaves_no_output(store, tmp_path):
    store_dir, m = store
    victim = m.fragments[2].id
    data = bytearray(frag_path(store_dir, victim).read_bytes())
    data[0] ^= 0xFF
    frag_path(store_dir, victim).write_bytes(bytes(data))
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    with pytest.raises(StoreError, match=victim[:16]):
        recombine(LocalLoader(store_dir), out, progress=False)
    assert list(out.parent.iterdir()) == []


def test_recombine_names_the_first_of_several_damaged_fragments(store, tmp_path):
    """One hash pass finds that something is wrong; the per-fragment pass then says what."""
    store_dir, m = store
    victims = [m.fragments[1].id, m.fragments[-2].id]
    for fid in victims:
        data = bytearray(frag_path(store_dir, fid).read_bytes())
        data[-1] ^= 0x40
        frag_path(store_dir, fid).write_bytes(bytes(data))
    out = tmp_path / "model.gguf"
    with pytest.raises(StoreError, match=rf"{victims[0][:16]}.*corrupt.*and 1 more") as err:
        recombine(LocalLoader(store_dir), out, progress=False)
    assert "recombine --verify" in str(err.value)
    assert not out.exists() and list(tmp_path.glob(".model.gguf*")) == []


def test_recombine_checks_whole_file_hash(store, tmp_path):
    """A manifest whose source hash is wrong (fragments fine) must not yield a file."""
    store_dir, m = store
    manifest = store_dir / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace(m.source["sha256"], "0" * 64))
    out = tmp_path / "model.gguf"
    with pytest.raises(StoreError, match="hashes to"):
        recombine(LocalLoader(store_dir), out, progress=False)
    assert not out.exists()
    assert verify(LocalLoader(store_dir), progress=False).whole_file_ok is False


def test_recombine_never_renames_over_a_special_file(store, tmp_path):
    """The rebuild is renamed over its output path: a FIFO, a link to a device (/dev/null, run as
    root) or a directory there would be replaced, so they are refused, unchanged."""
    store_dir, _ = store
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "fifo")
    (out / "null").symlink_to("/dev/null")
    (out / "dangling").symlink_to("nowhere")
    for name, needle in (("fifo", "is a FIFO"), ("null", "is a character device"), (".", "is a directory"),
                         ("dangling", "does not exist")):
        with pytest.raises(UserError, match=needle):
            recombine(LocalLoader(store_dir), out / name, progress=False)
    assert stat.S_ISFIFO(os.lstat(out / "fifo").st_mode) and os.readlink(out / "null") == "/dev/null"
    assert sorted(p.name for p in out.iterdir()) == ["dangling", "fifo", "null"]


def test_recombine_through_a_symlink_writes_the_file_it_names(store, factory_models, tmp_path):
    store_dir, _ = store
    (tmp_path / "real.gguf").write_bytes(b"old")
    (tmp_path / "link.gguf").symlink_to("real.gguf")
    recombine(LocalLoader(store_dir), tmp_path / "link.gguf", progress=False)
    assert os.path.islink(tmp_path / "link.gguf")
    assert (tmp_path / "real.gguf").read_bytes() == factory_models["q8_0-spm-gqa"].read_bytes()
