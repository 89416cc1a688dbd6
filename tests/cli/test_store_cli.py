"""`fragment` and `recombine` from the command line: summaries on success, one clear line on bad input."""

import json
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def model(factory_models):
    return factory_models["q8_0-spm-gqa"]


@pytest.fixture
def store(model, tmp_path):
    proc = run_cli("fragment", model, "-o", tmp_path / "store", "--fragment-size", "8KiB")
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "store"


def test_fragment_then_recombine(model, store, tmp_path):
    out = tmp_path / "back.gguf"
    proc = run_cli("recombine", store, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "matches the source" in proc.stdout
    assert out.read_bytes() == model.read_bytes()
    proc = run_cli("recombine", store, "--verify")
    assert proc.returncode == 0 and "verified" in proc.stdout


def test_fragment_summary_and_default_output(model, tmp_path):
    local = tmp_path / "m.gguf"
    local.write_bytes(model.read_bytes())
    proc = run_cli("fragment", local)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "fragments" in line and "MB/s" in line and str(tmp_path / "m") in line
    assert (tmp_path / "m" / "manifest.json").exists()
    for name in ("noext", "model.bin"):  # no .gguf: the default store would be the file itself, or 'model'
        other = tmp_path / name
        other.write_bytes(model.read_bytes())
        assert_one_line_error(run_cli("fragment", other), name, "pass -o DIRECTORY")
    assert not (tmp_path / "model").exists()


def test_help_explains_itself():
    for cmd in ("fragment", "recombine"):
        proc = run_cli(cmd, "--help")
        assert proc.returncode == 0 and "Usage" in proc.stdout and len(proc.stdout) > 300


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, I am text")
    assert_one_line_error(run_cli("fragment", bad, "-o", tmp_path / "s"), str(bad), "not a GGUF file")
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_truncated_gguf(model, tmp_path):
    data = model.read_bytes()
    for cut in (50, 5000, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        assert_one_line_error(run_cli("fragment", bad, "-o", tmp_path / f"s{cut}"), str(bad), "truncated")
        assert not (tmp_path / f"s{cut}" / "manifest.json").exists()


def test_unsupported_version(model, tmp_path):
    data = bytearray(model.read_bytes())
    data[4:8] = struct.pack("<I", 1)
    bad = tmp_path / "v1.gguf"
    bad.write_bytes(bytes(data))
    assert_one_line_error(run_cli("fragment", bad, "-o", tmp_path / "s"), "unsupported GGUF version 1")


def test_missing_model_file(tmp_path):
    assert_one_line_error(run_cli("fragment", tmp_path / "nope.gguf"), "nope.gguf", "no such file")


def test_output_dir_of_another_model(factory_models, store):
    assert_one_line_error(run_cli("fragment", factory_models["f16-spm-gqa"], "-o", store),
                          str(store), "another model")


def test_tiny_fragment_size(model, tmp_path):
    assert_one_line_error(run_cli("fragment", model, "-o", tmp_path / "s", "--fragment-size", "100"), "1KiB")


def damage(store, how):
    manifest = json.loads((store / "manifest.json").read_text())
    fid = manifest["tensors"][5]["pieces"][0]["fragment"]
    path = store / "fragments" / fid
    if how == "missing":
        path.unlink()
    elif how == "flipped":
        data = bytearray(path.read_bytes())
        data[7] ^= 0x10
        path.write_bytes(bytes(data))
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:-3])
    return fid, manifest["tensors"][5]["name"]


@pytest.mark.parametrize("how", ["missing", "flipped", "truncated"])
def test_damaged_fragment(store, tmp_path, how):
    fid, tensor = damage(store, how)
    out = tmp_path / "out.gguf"
    line = assert_one_line_error(run_cli("recombine", store, "-o", out), fid[:16], tensor)
    assert ("missing" if how == "missing" else "corrupt" if how == "flipped" else "truncated") in line
    assert not out.exists() and not list(tmp_path.glob(".out.gguf*"))
    proc = run_cli("recombine", store, "--verify")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert fid[:16] in proc.stderr and tensor in proc.stderr


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d.update(format_version=2), "unknown manifest format version 2"),
    (lambda d: d["fragments"][0].update(size=d["fragments"][0]["size"] + 5), "fragment"),
    (lambda d: d["fragments"][1].update(id="../x"), "'../x'"),
])
def test_hand_edited_manifest(store, tmp_path, edit, needle):
    path = store / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert_one_line_error(run_cli("recombine", store, "-o", tmp_path / "out.gguf"), "manifest.json", needle)
    assert_one_line_error(run_cli("recombine", store, "--verify"), "manifest.json")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written anywhere


def test_recombine_not_a_store(tmp_path):
    assert_one_line_error(run_cli("recombine", tmp_path, "--verify"), "manifest.json")
    assert_one_line_error(run_cli("recombine", tmp_path / "nope", "--verify"), "no such store")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_cleans_up_like_ctrl_c(tmp_path, sig, code, word):
    """`kill` ran no cleanup: a killed recombine left its .partial file (hundreds of MB), a first
    fetch its directory. Every command's wrapper makes SIGTERM unwind the main thread as Ctrl-C
    does, so the same ``finally`` blocks run; a command mid-write is stood in for by one here."""
    proc = _cleaning_up(tmp_path, cleanup_s=0)
    try:
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out == "cleaning\n"
    assert proc.returncode == code and err.strip() == word, (proc.returncode, err)
    assert list(tmp_path.iterdir()) == []


def _cleaning_up(tmp_path, cleanup_s: float) -> subprocess.Popen:
    """A command whose cleanup takes ``cleanup_s``; it prints "cleaning" when the cleanup starts."""
    script = textwrap.dedent(f"""
        import sys, time
        from cli.common import user_errors

        @user_errors
        def work():
            tmp = {str(tmp_path / '.out.partial')!r}
            open(tmp, "w").close()
            try:
                print("writing", flush=True)
                time.sleep(30)
            finally:
                print("cleaning", flush=True)
                time.sleep({cleanup_s})
                import os
                os.unlink(tmp)

        work()
        """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=str(ROOT))
    assert proc.stdout.readline() == "writing\n"
    return proc


def test_a_repeated_sigterm_lets_the_cleanup_finish(tmp_path):
    """`timeout` sends SIGTERM to its child and then to the child's process group: a command got two,
    and the second killed it mid-cleanup, leaving its partial output. A repeat within a second is
    the same request; the cleanup finishes."""
    proc = _cleaning_up(tmp_path, cleanup_s=0.5)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline() == "cleaning\n"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and err.strip() == "terminated", (proc.returncode, err)
    assert list(tmp_path.iterdir()) == []


def test_a_later_sigterm_still_kills_a_stuck_cleanup(tmp_path):
    """Whoever sends SIGTERM again after a while wants the process gone: it dies at once."""
    from cli.common import SIGTERM_REPEAT_S

    proc = _cleaning_up(tmp_path, cleanup_s=30)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline() == "cleaning\n"
        time.sleep(SIGTERM_REPEAT_S + 0.3)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGTERM
