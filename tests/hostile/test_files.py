"""Files that are not what they claim: FIFOs and devices in a store, leftovers of killed runs, a
full disk, and the exit codes the commands give for each kind of trouble."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from common.errors import EXIT_DAMAGED_STORE, EXIT_USAGE, UserError
from distribution.local import LocalLoader
from fragmenter.fragment import fragment_file
from tests.conftest import assert_one_line_error, run_cli
from tests.hostile.damage import copy_store

MODEL = "q8_0-spm-gqa"


@pytest.fixture(scope="module")
def clean_store(factory_models, tmp_path_factory):
    store = tmp_path_factory.mktemp("files") / "store"
    fragment_file(str(factory_models[MODEL]), store, 8192, progress=False)
    return store


@pytest.fixture
def store(clean_store, tmp_path):
    return copy_store(clean_store, tmp_path / "store")


def header_fragment(store) -> str:
    return json.loads((store / "manifest.json").read_text())["fragments"][0]["id"]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge"])
def test_a_fragment_that_is_not_a_regular_file_of_its_size_is_refused_at_once(store, kind):
    fid = header_fragment(store)
    path = store / "fragments" / fid
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    else:  # a sparse 64 GiB file: reading it whole would take the machine's memory
        with open(path, "wb") as f:
            f.truncate(64 << 30)
    for cmd in (["recombine", store, "--verify"], ["infer", store, "--prompt", "x", "--max-tokens", "2"]):
        proc = run_cli(*cmd, timeout=60)
        assert proc.returncode == EXIT_DAMAGED_STORE, proc.stderr
        assert fid[:16] in proc.stderr and "Traceback" not in proc.stderr
        if kind != "huge":
            assert "not a regular file" in proc.stderr


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_manifest_that_is_not_a_regular_file_is_refused_at_once(store, kind):
    path = store / "manifest.json"
    path.unlink()
    os.mkfifo(path) if kind == "fifo" else path.symlink_to("/dev/zero")
    for cmd in (["recombine", store, "--verify"], ["serve", store, "--port", "0"], ["fetch", store, "-o",
                store.parent / "out"]):
        proc = run_cli(*cmd, timeout=60)
        assert_one_line_error(proc, "manifest.json", "not a regular file")
        assert proc.returncode == EXIT_DAMAGED_STORE


def test_recombine_removes_the_temporary_files_of_killed_runs(store, tmp_path):
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    leftover = out.parent / f".model.gguf.partial-{dead_pid()}"
    live = out.parent / f".model.gguf.partial-{os.getpid()}"  # a run still going: left alone
    leftover.write_bytes(b"half a file")
    live.write_bytes(b"in progress")
    proc = run_cli("recombine", store, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert not leftover.exists() and live.exists()


def test_fetch_removes_the_temporary_files_of_killed_runs(clean_store, tmp_path):
    out = tmp_path / "copy"
    (out / "fragments").mkdir(parents=True)
    leftovers = [out / "fragments" / f".tmp-{dead_pid()}-{'c' * 64}", out / f".tmp-{dead_pid()}-manifest.json"]
    for path in leftovers:
        path.write_bytes(b"half")
    proc = run_cli("fetch", clean_store, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert not any(p.exists() for p in leftovers)


def full_disk_open():
    """An ``open`` whose files, opened for writing, fail every write as a full disk does."""
    import builtins

    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if "w" in mode else f

    return fake_open


def test_a_full_disk_names_the_file(factory_models, clean_store, tmp_path, monkeypatch):
    """ENOSPC from write() carries no file name; the error must add it: the user's output, not the
    temporary name it is written under."""
    import fragmenter.fragment as fragment_module
    import recombiner.recombine as recombine_module

    monkeypatch.setattr(fragment_module, "open", full_disk_open(), raising=False)
    monkeypatch.setattr(recombine_module, "open", full_disk_open(), raising=False)
    with pytest.raises(UserError, match=r"rebuilt\.gguf: cannot write \(No space left on device\)"):
        recombine_module.recombine(LocalLoader(clean_store), tmp_path / "rebuilt.gguf", progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match=r"/s: cannot write \(No space left on device\)"):
        fragment_file(str(factory_models[MODEL]), tmp_path / "s", 8192, progress=False)
    assert not (tmp_path / "s").exists()  # a new store that failed is taken back whole, temporary files included


def test_usage_errors_exit_1_not_the_damaged_store_code(store):
    for cmd in (["recombine", store, "--no-such-option"], ["fragment"], ["serve", store, "--port", "99999"],
                ["recombine", store]):
        proc = run_cli(*cmd)
        assert proc.returncode == EXIT_USAGE, (cmd, proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_gguf_file_loader_unmaps_its_file_on_close(factory_models):
    from distribution.gguf_file import GGUFFileLoader

    loader = GGUFFileLoader(factory_models[MODEL])
    name = loader.manifest.tensors[0].name
    assert len(loader.tensor_bytes(name)) == loader.manifest.tensor(name).length
    loader.close()
    assert loader._map.closed


def test_local_loader_never_reads_past_a_fragments_size(store):
    fid = header_fragment(store)
    with open(store / "fragments" / fid, "ab") as f:
        f.write(b"x" * (1 << 20))
    loader = LocalLoader(store)
    from distribution.base import CorruptFragment

    # refused on its size before a byte is read (a file that grows while read stops at size + 1)
    with pytest.raises(CorruptFragment, match=f"{fid[:16]} .*truncated or padded"):
        loader.fetch(fid)


def test_serve_answers_404_for_a_fragment_it_holds_damaged_and_serves_the_rest(store):
    import urllib.error
    import urllib.request

    from tests.distribution.netutil import serving

    frags = json.loads((store / "manifest.json").read_text())["fragments"]
    fifo, grown, good = frags[2]["id"], frags[3]["id"], frags[4]["id"]
    (store / "fragments" / fifo).unlink()
    os.mkfifo(store / "fragments" / fifo)
    with open(store / "fragments" / grown, "ab") as f:
        f.truncate(64 << 30)
    with serving(store, "--port", "0") as server:
        for fid in (fifo, grown):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(f"{server.url}fragments/{fid}", timeout=10)
            assert info.value.code == 404
        with urllib.request.urlopen(f"{server.url}fragments/{good}", timeout=10) as r:
            assert len(r.read()) == frags[4]["size"]
