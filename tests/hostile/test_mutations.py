"""Hypothesis mutates manifests and GGUF headers; every command that reads them must either fail
with one line and a documented exit code, or give exactly the undamaged run's output.

Commands run in-process through click (the same code path as the console scripts, minus process
start-up), on a small factory model, so each example costs a fraction of a second.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cli.infer import infer
from cli.store_commands import fetch, fragment, recombine
from common.errors import EXIT_DAMAGED_STORE, EXIT_UNREACHABLE, EXIT_USAGE, UserError
from distribution.gguf_file import GGUFFileLoader
from distribution.local import LocalLoader
from fragmenter.fragment import fragment_file
from tests.hostile.damage import tensor_info_positions

MODEL = "q8_0-spm-gqa"
CODES = {EXIT_USAGE, EXIT_DAMAGED_STORE, EXIT_UNREACHABLE}
INFER = ["--prompt", "The", "--no-chat", "--max-tokens", "8", "--json", "--kernels", "numpy"]
SETTINGS = dict(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


def run(command, *args):
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{command.name} {args}: uncaught {result.exception!r}") from result.exception
    return result


def assert_clean_failure(result, what: str) -> None:
    """One line on stderr, a documented exit code, no traceback."""
    assert result.exit_code in CODES, (what, result.exit_code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, (what, result.stderr)
    assert len(lines) == 1, (what, result.stderr)


def tensors_of(loader) -> dict[str, np.ndarray]:
    return {name: loader.load_tensor(name) for name in loader.manifest.tensor_names()}


class Baseline:
    """The undamaged runs' outputs, computed once."""

    def __init__(self, gguf: Path, store: Path):
        self.gguf, self.store = gguf, store
        self.manifest = json.loads((store / "manifest.json").read_text())
        self.tensors = tensors_of(LocalLoader(store))
        self.tokens = json.loads(run(infer, store, *INFER).stdout)["tokens"]
        self.bytes = gguf.read_bytes()


@pytest.fixture(scope="module")
def baseline(factory_models, tmp_path_factory) -> Baseline:
    work = tmp_path_factory.mktemp("mutations")
    gguf = work / "model.gguf"
    shutil.copyfile(factory_models[MODEL], gguf)
    fragment_file(str(gguf), work / "store", 8192, progress=False)
    return Baseline(gguf, work / "store")


# -- manifests --------------------------------------------------------------------------------------
def paths(doc, prefix=()):
    """Every place in a JSON document, as a tuple of keys and indices."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths(v, prefix + (i,))


def get(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def put(doc, path, value):
    if not path:
        return value
    get(doc, path[:-1])[path[-1]] = value
    return doc


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.sampled_from([0, 1, -1, 2 ** 63, "F32", "Q8_0", "I32", "0" * 64]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)


class Mutated:
    """A damaged manifest (a document, text, or a nesting recipe) that prints as its description."""

    def __init__(self, content, what: str):
        self.content, self.what = content, what

    def __repr__(self) -> str:
        return self.what


@st.composite
def manifest_mutation(draw, doc):
    return Mutated(*draw(_manifest_mutation(doc)))


@st.composite
def _manifest_mutation(draw, doc):
    """A damaged copy of ``doc`` (a manifest) and a description of the damage."""
    doc = copy.deepcopy(doc)
    where = list(paths(doc))
    kind = draw(st.sampled_from(["replace", "delete", "swap", "swap-same-size", "shuffle", "duplicate", "nest",
                                 "truncate"]))
    if kind == "replace":
        path = draw(st.sampled_from(where))
        return put(doc, path, draw(json_values)), f"{kind} {path}"
    if kind == "delete":
        path = draw(st.sampled_from([p for p in where if p and isinstance(get(doc, p[:-1]), (dict, list))]))
        del get(doc, path[:-1])[path[-1]]
        return doc, f"{kind} {path}"
    if kind in ("swap", "swap-same-size"):
        tensors = doc["tensors"]
        i = draw(st.integers(0, len(tensors) - 1))
        same = [j for j, t in enumerate(tensors) if j != i and (kind == "swap" or t["length"] == tensors[i]["length"])]
        j = draw(st.sampled_from(same))
        fields = draw(st.sets(st.sampled_from(["name", "ggml_type", "gguf_shape", "shape", "offset", "length",
                                                "pieces"]), min_size=1))
        for f in fields:
            tensors[i][f], tensors[j][f] = tensors[j][f], tensors[i][f]
        return doc, f"{kind} {tensors[i]['name']} {tensors[j]['name']} {sorted(fields)}"
    lists = [p for p in where if isinstance(get(doc, p), list) and len(get(doc, p)) > 1]
    if kind == "shuffle":
        path = draw(st.sampled_from(lists))
        items = get(doc, path)
        order = draw(st.permutations(range(len(items))))
        put(doc, path, [items[k] for k in order])
        return doc, f"{kind} {path} {order}"
    if kind == "duplicate":
        path = draw(st.sampled_from(lists))
        items = get(doc, path)
        k = draw(st.integers(0, len(items) - 1))
        items.insert(draw(st.integers(0, len(items))), copy.deepcopy(items[k]))
        return doc, f"{kind} {path}[{k}]"
    if kind == "nest":
        path = draw(st.sampled_from(where))
        depth = draw(st.sampled_from([1, 3, 1000, 200_000]))
        text = json.dumps(get(doc, path)) if depth < 1000 else "0"
        return ("NEST", path, depth, text), f"{kind} {path} x{depth}"
    text = json.dumps(doc)
    return text[: draw(st.integers(0, len(text) - 1))], f"{kind}"


def write_manifest(store: Path, mutated) -> None:
    if isinstance(mutated, str):  # truncated text
        (store / "manifest.json").write_text(mutated)
    elif isinstance(mutated, tuple) and mutated[0] == "NEST":
        _, path, depth, inner = mutated
        doc = json.loads((store / "manifest.json").read_text())
        marker = "\u0000NEST\u0000"
        text = json.dumps(put(doc, path, marker))
        (store / "manifest.json").write_text(text.replace(json.dumps(marker), "[" * depth + inner + "]" * depth))
    else:
        (store / "manifest.json").write_text(json.dumps(mutated))


def damaged_store(baseline: Baseline, tmp_path: Path, mutated) -> Path:
    store = tmp_path / "store"
    if store.exists():
        shutil.rmtree(store)
    store.mkdir()
    (store / "fragments").symlink_to(baseline.store / "fragments")  # read-only use; fragments untouched
    (store / "manifest.json").write_text(json.dumps(baseline.manifest))
    write_manifest(store, mutated)
    return store


def check_store_commands(baseline: Baseline, store: Path, tmp_path: Path, what: str, record=lambda _: None) -> None:
    """The invariant, for every command that reads a store. ``record`` hears which branch was taken."""
    # The loader itself: a UserError, or every tensor exactly as the undamaged store gives it.
    try:
        got = tensors_of(LocalLoader(store))
    except UserError as e:
        record(f"loader refused it ({type(e).__name__})")
        assert "\n" not in str(e), what
    else:
        record("loader gave the undamaged tensors")
        assert got.keys() == baseline.tensors.keys(), what
        for name, value in got.items():
            np.testing.assert_array_equal(value, baseline.tensors[name], err_msg=f"{what}: tensor {name}")

    result = run(recombine, store, "--verify")
    if result.exit_code == 0:
        assert "verified" in result.stdout, what
    else:  # a report, possibly of several fragments, never a traceback
        assert result.exit_code in CODES and "Traceback" not in result.stderr, (what, result.stderr)

    out = tmp_path / "rebuilt.gguf"
    out.unlink(missing_ok=True)
    result = run(recombine, store, "-o", out)
    if result.exit_code == 0:
        assert out.read_bytes() == baseline.bytes, what
    else:
        assert_clean_failure(result, what)
        assert not out.exists(), what

    result = run(infer, store, *INFER)
    if result.exit_code == 0:
        assert json.loads(result.stdout)["tokens"] == baseline.tokens, what
    else:
        assert_clean_failure(result, what)

    copy_dir = tmp_path / "copy"
    shutil.rmtree(copy_dir, ignore_errors=True)
    result = run(fetch, store, "-o", copy_dir)
    if result.exit_code == 0:  # what was copied reads back as the same model
        np.testing.assert_array_equal(LocalLoader(copy_dir).load_tensor(next(iter(baseline.tensors))),
                                      next(iter(baseline.tensors.values())), err_msg=what)
    else:
        assert_clean_failure(result, what)


@settings(**SETTINGS)
@given(data=st.data())
def test_mutated_manifests_fail_cleanly_or_change_nothing(baseline, tmp_path, data):
    mutated = data.draw(manifest_mutation(baseline.manifest), label="mutation")
    store = damaged_store(baseline, tmp_path, mutated.content)
    check_store_commands(baseline, store, tmp_path, mutated.what, record=event)


def test_the_suite_sees_the_swapped_tensor_case(baseline, tmp_path):
    """The hostile run's case, fixed: it must be refused (and with the check removed, the suite
    above fails on it: see the report of the change that added the check)."""
    doc = copy.deepcopy(baseline.manifest)
    a, b = (next(t for t in doc["tensors"] if t["name"] == n) for n in ("blk.0.attn_q.weight", "blk.1.attn_q.weight"))
    for f in ("offset", "pieces"):
        a[f], b[f] = b[f], a[f]
    store = damaged_store(baseline, tmp_path, doc)
    check_store_commands(baseline, store, tmp_path, "swap attn_q 0/1")
    assert run(infer, store, *INFER).exit_code == EXIT_DAMAGED_STORE


# -- GGUF headers -----------------------------------------------------------------------------------
def header_fields(data: bytes) -> list[tuple[str, int, str]]:
    """(what, byte position, struct format) of the header's structural fields."""
    fields = [("tensor_count", 8, "<Q"), ("kv_count", 16, "<Q")]
    for name, at in tensor_info_positions(data).items():
        fields.append((f"{name} name length", at["n_dims"] - len(name) - 8, "<Q"))
        fields.append((f"{name} n_dims", at["n_dims"], "<I"))
        n_dims = struct.unpack_from("<I", data, at["n_dims"])[0]
        fields += [(f"{name} dim {k}", at["dims"] + 8 * k, "<Q") for k in range(n_dims)]
        fields.append((f"{name} type", at["type"], "<I"))
        fields.append((f"{name} offset", at["offset"], "<Q"))
    return fields


@st.composite
def header_mutation(draw, data: bytes):
    """(description, position, struct format, new value) of one damaged header field."""
    what, at, fmt = draw(st.sampled_from(header_fields(data)))
    bits = struct.calcsize(fmt) * 8
    old = struct.unpack_from(fmt, data, at)[0]
    value = draw(st.sampled_from([0, 1, 2, old + 1, max(old - 1, 0), old * 2, 1 << (bits - 1), (1 << bits) - 1,
                                  32, 4096]) | st.integers(0, (1 << bits) - 1))
    return f"{what}: {old} -> {value}", at, fmt, value % (1 << bits)


def run_infer(source):
    """infer's result, or the type of the exception it could not handle (see the test below)."""
    try:
        return run(infer, source, *INFER)
    except AssertionError as e:
        return type(e.__cause__).__name__


# A mutated header can point a quantized tensor's scales at bytes that read as an infinite float16;
# dequantizing then multiplies inf by a zero quant (numpy's "invalid value" warning). The file and
# the store must still give the same values, NaN included, which is what the test checks.
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@settings(**{**SETTINGS, "max_examples": 40})
@given(data=st.data())
def test_mutated_gguf_headers_fail_cleanly_or_agree_everywhere(baseline, tmp_path, data):
    """`fragment` refuses a damaged header with one line, or writes a store that every reader accepts
    and that gives exactly what the file itself gives: the same tensors, the same tokens.

    `infer` is held to the full rule too: a header whose tensor shapes disagree with the model's
    hyperparameters is refused by the engine, naming the tensor, before any weight is used.
    """
    what, at, fmt, value = data.draw(header_mutation(baseline.bytes), label="mutation")
    mutated = bytearray(baseline.bytes)
    struct.pack_into(fmt, mutated, at, value)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(bytes(mutated))
    store = tmp_path / "m"
    shutil.rmtree(store, ignore_errors=True)

    result = run(fragment, gguf, "-o", store, "--fragment-size", "8KiB")
    if result.exit_code:
        assert_clean_failure(result, what)
        assert not (store / "manifest.json").exists(), what
        event("fragment refused the header")
        direct = run(infer, gguf, *INFER)  # the file's readers refuse it too (the same parser), or run it
        if direct.exit_code:
            assert_clean_failure(direct, what)
        return
    # A store was written, so every reader must accept it and agree with the file it came from.
    assert run(recombine, store, "--verify").exit_code == 0, what
    out = tmp_path / "back.gguf"
    out.unlink(missing_ok=True)
    assert run(recombine, store, "-o", out).exit_code == 0 and out.read_bytes() == bytes(mutated), what
    try:
        file_tensors = tensors_of(GGUFFileLoader(gguf))
    except UserError as e:
        with pytest.raises(UserError):
            tensors_of(LocalLoader(store))
        return
    store_tensors = tensors_of(LocalLoader(store))
    assert store_tensors.keys() == file_tensors.keys(), what
    for name, value in file_tensors.items():
        np.testing.assert_array_equal(store_tensors[name], value, err_msg=f"{what}: {name}")
    direct, from_store = run_infer(gguf), run_infer(store)
    assert not isinstance(direct, str) and not isinstance(from_store, str), (what, direct, from_store)
    event(f"store written; infer exit {direct.exit_code}")
    assert from_store.exit_code == direct.exit_code, (what, from_store.stderr, direct.stderr)
    if direct.exit_code == 0:
        assert json.loads(from_store.stdout)["tokens"] == json.loads(direct.stdout)["tokens"], what
    else:
        assert_clean_failure(direct, what)
        assert_clean_failure(from_store, what)
