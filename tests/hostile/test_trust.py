"""The hostile run's silently-wrong cases: a manifest that lies about its own header, headers no
reader accepts, two writers in one store, an output inside the store being read."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from common.errors import EXIT_DAMAGED_STORE, EXIT_USAGE, StoreError, UserError
from distribution.local import LocalLoader
from fragmenter.fragment import fragment_file
from recombiner.recombine import verify
from tests.conftest import BIN, assert_one_line_error, run_cli
from tests.hostile.damage import copy_store, edit_manifest, set_dim, swap_tensors, tensor

MODEL = "q8_0-spm-gqa"
A, B = "blk.0.attn_q.weight", "blk.1.attn_q.weight"


@pytest.fixture(scope="module")
def clean_store(factory_models, tmp_path_factory):
    store = tmp_path_factory.mktemp("trust") / "store"
    fragment_file(str(factory_models[MODEL]), store, 8192, progress=False)
    return store


@pytest.fixture
def store(clean_store, tmp_path):
    return copy_store(clean_store, tmp_path / "store")


def test_swapped_tensors_are_refused_by_the_loader_and_by_verify(store):
    clean = LocalLoader(store).load_tensor(A)
    edit_manifest(store, lambda d: swap_tensors(d, A, B))
    with pytest.raises(StoreError, match=f"'{A}' has offset"):
        LocalLoader(store).load_tensor(A)
    report = verify(LocalLoader(store), progress=False)
    assert not report.ok and A in report.table
    proc = run_cli("recombine", store, "--verify")
    assert proc.returncode == EXIT_DAMAGED_STORE
    assert "tensor table does not describe them" in proc.stderr and "verified" not in proc.stdout
    assert clean.shape == LocalLoader(store).manifest.tensor(A).shape  # the lie was shape-compatible
    # -o writes the original file (its SHA-256 is checked), and says the store's table is not to be trusted
    proc = run_cli("recombine", store, "-o", store.parent / "rebuilt.gguf")
    assert proc.returncode == 0 and "matches the source" in proc.stdout, proc.stderr
    assert proc.stderr.startswith("warning:") and A in proc.stderr and "other commands refuse" in proc.stderr


def test_infer_on_swapped_tensors_is_one_line_not_garbage(store):
    edit_manifest(store, lambda d: swap_tensors(d, A, B))
    proc = run_cli("infer", store, "--prompt", "hi", "--max-tokens", "4", "--no-chat")
    assert_one_line_error(proc, A, "GGUF header")
    assert proc.returncode == EXIT_DAMAGED_STORE and proc.stdout == ""


def permute_shape(doc):
    t = tensor(doc, "blk.0.ffn_up.weight")
    t["gguf_shape"] = t["gguf_shape"][::-1]
    t["shape"] = t["shape"][::-1]


def change_type(doc):  # F32 -> I32: same size, so only the header can tell
    t = next(t for t in doc["tensors"] if t["ggml_type"] == "F32")
    t["ggml_type"] = "I32"


def duplicate_tensor(doc):
    doc["tensors"].append(dict(doc["tensors"][3]))


def drop_tensor(doc):
    del doc["tensors"][3]


def reorder_tensors(doc):
    doc["tensors"][2], doc["tensors"][3] = doc["tensors"][3], doc["tensors"][2]


def duplicate_fragment(doc):
    """A fragment listed twice, the rest shifted to make room: the list adds up, the table does not."""
    frags = doc["fragments"]
    frags.insert(5, dict(frags[5]))
    for k in range(6, len(frags)):
        frags[k]["offset"] += frags[5]["size"]
    doc["source"]["size"] += frags[5]["size"]


def lie_about_model(doc):
    doc["model"]["block_count"] += 1


@pytest.mark.parametrize("edit, needle", [
    (permute_shape, "gguf_shape"), (change_type, "ggml_type"), (duplicate_tensor, "twice"),
    (drop_tensor, "does not list"), (reorder_tensors, "another order"), (lie_about_model, "model.block_count"),
    (duplicate_fragment, "does not sit where"),
])
def test_every_table_lie_is_one_line_with_exit_2(store, edit, needle):
    edit_manifest(store, edit)
    proc = run_cli("recombine", store, "--verify")
    assert proc.returncode == EXIT_DAMAGED_STORE, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(StoreError, match=needle):
        loader = LocalLoader(store)
        loader.load_tensor(loader.manifest.tensors[0].name)


def test_manifest_nested_200k_levels_is_one_line(store):
    (store / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    for cmd in (["recombine", store, "--verify"], ["infer", store, "--prompt", "x"], ["fetch", store, "-o",
                store.parent / "copy"]):
        proc = run_cli(*cmd)
        assert_one_line_error(proc, "manifest.json", "nested too deeply")
        assert proc.returncode == EXIT_DAMAGED_STORE


def test_a_manifest_of_millions_of_tiny_values_is_refused_before_parsing(store, monkeypatch):
    """256 MiB of `[],` parses into 6.7 GB of lists: counting the values first refuses it unparsed."""
    from fragmenter import manifest

    (store / "manifest.json").write_bytes(b"[" + b"[]," * manifest.MAX_MANIFEST_VALUES + b"[]]")
    assert_one_line_error(run_cli("recombine", store, "--verify"), "manifest.json", "JSON values")
    monkeypatch.setattr(manifest.json, "loads", lambda *a, **k: pytest.fail("parsed"))
    with pytest.raises(StoreError, match="manifest.json.*JSON values"):
        LocalLoader(store)


def test_the_value_bound_leaves_room_for_the_largest_manifests():
    """A 405B-shaped F16 file (126 blocks, 810 GB) cut into 10 MB fragments: 81,000 fragments, the
    manifest the fragmenter writes for it, parsed back; its values are far inside the bound."""
    import hashlib

    from fragmenter import manifest
    from fragmenter.fragment import build_manifest, plan_fragments
    from fragmenter.gguf_header import GGUFHeader, TensorInfo

    d, ff, kv, vocab = 16384, 53248, 1024, 128256
    shapes = [("token_embd.weight", (d, vocab))]
    for b in range(126):
        shapes += [(f"blk.{b}.attn_norm.weight", (d,)), (f"blk.{b}.attn_q.weight", (d, d)),
                   (f"blk.{b}.attn_k.weight", (d, kv)), (f"blk.{b}.attn_v.weight", (d, kv)),
                   (f"blk.{b}.attn_output.weight", (d, d)), (f"blk.{b}.ffn_norm.weight", (d,)),
                   (f"blk.{b}.ffn_gate.weight", (d, ff)), (f"blk.{b}.ffn_up.weight", (d, ff)),
                   (f"blk.{b}.ffn_down.weight", (ff, d))]
    shapes += [("output_norm.weight", (d,)), ("output.weight", (d, vocab))]
    tensors, offset = [], 0
    for name, dims in shapes:
        tensors.append(TensorInfo(name, 1, dims, offset))  # F16
        offset += 2 * int(np.prod(dims))
    header = GGUFHeader(3, {"general.architecture": "llama"}, tensors, 32, 4096)
    size = header.data_offset + offset
    cuts = plan_fragments(header, size, 10_000_000)
    fragments = [manifest.Fragment(hashlib.sha256(str(i).encode()).hexdigest(), e - s, s)
                 for i, (s, e) in enumerate(cuts)]
    text = build_manifest(header, {"name": "big.gguf", "size": size, "sha256": "0" * 64}, 10_000_000,
                          fragments).to_json()
    values = sum(text.count(m) for m in ("[", ",", ":"))
    assert len(fragments) > 80_000 and values * 4 < manifest.MAX_MANIFEST_VALUES, (len(fragments), values)
    assert len(manifest.Manifest.from_json(text).fragments) == len(fragments)


@pytest.mark.parametrize("dim", [0, 1 << 63, (1 << 64) - 1])
def test_fragment_and_infer_refuse_impossible_dimensions_naming_the_tensor(factory_models, tmp_path, dim):
    bad = set_dim(factory_models[MODEL], tmp_path / "bad.gguf", "blk.0.ffn_up.weight", 1, dim)
    proc = run_cli("fragment", bad, "-o", tmp_path / "store")
    assert_one_line_error(proc, "blk.0.ffn_up.weight", "bad.gguf")
    assert proc.returncode == EXIT_USAGE
    assert not (tmp_path / "store" / "manifest.json").exists()
    proc = run_cli("infer", bad, "--prompt", "x", "--max-tokens", "2")
    assert_one_line_error(proc, "blk.0.ffn_up.weight")


def test_a_second_writer_is_refused_while_the_store_is_locked(factory_models, clean_store, tmp_path):
    store = copy_store(clean_store, tmp_path / "store")
    fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running `fragment` or `fetch` holds
        proc = run_cli("fragment", factory_models["f32-spm-gqa"], "-o", store, "--fragment-size", "8KiB")
        assert_one_line_error(proc, str(store), "another run is writing")
        proc = run_cli("fetch", clean_store, "-o", store)
        assert_one_line_error(proc, "another run is writing")
    finally:
        os.close(fd)
    assert verify(LocalLoader(store), progress=False).ok  # untouched


def test_two_fragment_runs_of_different_models_leave_one_intact_store(factory_models, tmp_path):
    store = tmp_path / "store"
    procs = [subprocess.Popen([str(BIN / "fragment"), str(factory_models[m]), "-o", str(store), "--fragment-size",
                               "4KiB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for m in (MODEL, "f32-spm-gqa")]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    ok = [rc for rc, _ in results if rc == 0]
    assert len(ok) == 1, results  # the other is refused: locked, or the store now holds another model
    for rc, err in results:
        if rc:
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert verify(LocalLoader(store), progress=False).ok


@pytest.mark.parametrize("target", ["manifest.json", "fragment", "store", "hardlink"])
def test_recombine_refuses_outputs_inside_the_store(clean_store, tmp_path, target):
    store = copy_store(clean_store, tmp_path / "store")
    fid = json.loads((store / "manifest.json").read_text())["fragments"][1]["id"]
    out = {"manifest.json": store / "manifest.json", "fragment": store / "fragments" / fid,
           "store": store / "rebuilt.gguf", "hardlink": tmp_path / "elsewhere.gguf"}[target]
    if target == "hardlink":
        os.link(store / "fragments" / fid, out)
    proc = run_cli("recombine", store, "-o", out)
    assert_one_line_error(proc, str(store))
    assert proc.returncode == EXIT_USAGE
    assert verify(LocalLoader(store), progress=False).ok


def test_an_honest_store_loads_every_tensor(store):
    loader = LocalLoader(store)
    for name in loader.manifest.tensor_names():
        assert np.isfinite(loader.load_tensor(name)).all()


def test_user_error_types_keep_their_codes():
    assert UserError("x").exit_code == EXIT_USAGE and StoreError("x").exit_code == EXIT_DAMAGED_STORE


def test_swapped_tensors_are_refused_over_http_and_by_serve(store, tmp_path):
    from distribution.http import HTTPLoader
    from tests.hostile.http_server import hostile_server

    edit_manifest(store, lambda d: swap_tensors(d, A, B))
    with hostile_server(store, "tarpit", target="none") as (server, url):  # serves the files as they are
        with pytest.raises(StoreError, match=f"'{A}' has offset"):
            HTTPLoader(url, cache_dir=tmp_path / "cache", timeout=5).load_tensor(A)
    proc = run_cli("serve", store, "--port", "0", timeout=60)
    assert_one_line_error(proc, A, "GGUF header")
    assert proc.returncode == EXIT_DAMAGED_STORE


@pytest.mark.parametrize("name", ["../escaped.gguf", "/tmp/escaped.gguf", "sub/model.gguf", "..", "", "a\\b.gguf",
                                  "x\u0000y.gguf", 7, None])
def test_a_source_name_that_is_not_a_plain_file_name_is_refused(store, tmp_path, name):
    """source.name named the temporary GGUF that `infer --backend llama.cpp` and validation rebuild:
    `../x` or an absolute path in a server's manifest wrote a file of the server's choosing there."""
    import tempfile
    import uuid

    escaping = name == "../escaped.gguf"
    if escaping:  # where the rebuilt GGUF went: beside its temporary directory, under a name of this run's
        name = f"../escaped-{uuid.uuid4().hex}.gguf"
    edit_manifest(store, lambda d: d["source"].__setitem__("name", name))
    with pytest.raises(StoreError, match="source.name .* is not a plain file name"):
        LocalLoader(store)
    if escaping:
        target = Path(tempfile.gettempdir()) / name[3:]
        proc = run_cli("infer", store, "--backend", "llama.cpp", "--prompt", "hi", "--max-tokens", "2", "--no-chat")
        assert_one_line_error(proc, "source.name")
        assert proc.returncode == EXIT_DAMAGED_STORE and not target.exists()


@pytest.mark.parametrize("size", [2**40, 10**30])
def test_a_fragment_claimed_huge_is_one_line_naming_it_before_any_memory_is_taken(store, size):
    """The local loader took a buffer of the claimed size before looking at the file: 10^30 bytes
    was an OverflowError traceback, 2^40 'Cannot allocate memory' naming nothing, exit 1."""
    def huge_last(doc):
        last = doc["fragments"][-1]
        doc["source"]["size"] += size - last["size"]
        last["size"] = size
        doc["fragment_size"] = max(doc["fragment_size"], size)

    last_id = json.loads((store / "manifest.json").read_text())["fragments"][-1]["id"]
    edit_manifest(store, huge_last)
    for command in (("fetch", store, "-o", store.parent / "copy"),
                    ("infer", store, "--prompt", "hi", "--max-tokens", "2", "--no-chat")):
        proc = run_cli(*command)
        assert_one_line_error(proc, last_id[:16], "truncated or padded")
        assert proc.returncode == EXIT_DAMAGED_STORE
