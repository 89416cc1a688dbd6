"""`serve` and `fetch` refuse bad input with one clear line, before doing anything."""

from fragmenter.fragment import fragment_file
from tests.conftest import assert_one_line_error, run_cli


def test_serve_needs_a_store(tmp_path):
    assert_one_line_error(run_cli("serve", tmp_path, "--port", "0"), "manifest.json")


def test_serve_option_misuse(factory_models, tmp_path):
    fragment_file(str(factory_models["q8_0-spm-gqa"]), tmp_path / "s", 8192, progress=False)
    assert_one_line_error(run_cli("serve", tmp_path / "s", "--bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/x"), "--p2p")
    assert_one_line_error(run_cli("serve", tmp_path / "s", "--p2p", "--layers", "five"), "--layers")
    assert_one_line_error(run_cli("serve", tmp_path / "s", "--p2p", "--layers", "3-1"), "--layers")


def test_fetch_copies_blocks_and_refuses_another_models_store(factory_models, tmp_path):
    fragment_file(str(factory_models["q8_0-spm-gqa"]), tmp_path / "a", 8192, progress=False)
    fragment_file(str(factory_models["f16-spm-gqa"]), tmp_path / "b", 8192, progress=False)
    proc = run_cli("fetch", tmp_path / "a", "-o", tmp_path / "copy", "--layers", "1-1")
    assert proc.returncode == 0 and "fetched" in proc.stdout, proc.stderr
    assert (tmp_path / "copy" / "manifest.json").read_bytes() == (tmp_path / "a" / "manifest.json").read_bytes()
    assert_one_line_error(run_cli("fetch", tmp_path / "b", "-o", tmp_path / "copy"), "another model")
