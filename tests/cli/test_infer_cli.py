"""`infer` end to end: streams text from fragments; bad requests fail before any work starts."""

import json
import subprocess
import re

import pytest

from fragmenter.fragment import fragment_file
from tests.conftest import assert_one_line_error, run_cli

QUESTION = "What is the capital of France?"


def test_default_model_answers_from_fragments(default_store):
    proc = run_cli("infer", "--prompt", QUESTION, "--max-tokens", "40")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_json_report(default_store):
    proc = run_cli("infer", default_store, "--prompt", QUESTION, "--max-tokens", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {"prompt_tokens", "tokens", "text", "load_s", "prefill_tok_s", "decode_tok_s"} <= set(report)
    assert report["prompt_tokens"] > 10 and 0 < len(report["tokens"]) <= 12
    assert "Paris" in report["text"] and report["decode_tok_s"] > 0


def test_timings_on_one_machine_are_one_line_on_stderr(default_store):
    """--timings without --distributed: load, prompt and decode figures, no empty route table."""
    proc = run_cli("infer", default_store, "--prompt", QUESTION, "--max-tokens", "8", "--timings")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and "tok/s" not in proc.stdout
    line = re.fullmatch(r"load [\d.]+ s; prompt (\d+) tokens, prefill ([\d.]+) tok/s; (\d+) tokens generated, "
                        r"decode ([\d.]+) tok/s", proc.stderr.strip().splitlines()[-1])
    assert line, proc.stderr
    assert int(line[1]) > 10 and 0 < int(line[3]) <= 8 and float(line[2]) > 0 and float(line[4]) > 0
    assert "hop overhead" not in proc.stderr and "blocks" not in proc.stderr


def test_llama_cpp_backend_gives_the_same_greedy_text(default_store):
    args = ["--prompt", "Name three colors.", "--max-tokens", "24", "--json"]
    ours = json.loads(run_cli("infer", default_store, *args).stdout)
    theirs = json.loads(run_cli("infer", default_store, *args, "--backend", "llama.cpp").stdout)
    assert theirs["text"] and theirs["prompt_tokens"] == ours["prompt_tokens"]
    # Greedy text from the quantized model may part ways late (llama.cpp's Q8_0 activation
    # rounding, see README); the opening must agree.
    assert ours["text"][:12] == theirs["text"][:12]


def test_llama_cpp_backend_keeps_ctx_and_says_why_it_stopped(factory_models):
    """llama.cpp rounds its context up (--ctx 40 generated 100 tokens) and the JSON had no
    stop_reason; stop strings now follow the engine's rule (the earliest in the text wins)."""
    path = factory_models["q8_0-spm-gqa"]
    base = [path, "--prompt", "The quick brown fox", "--no-chat", "--json", "--backend", "llama.cpp"]
    full = json.loads(run_cli("infer", *base, "--ctx", "24", "--max-tokens", "100").stdout)
    assert full["stop_reason"] == "context" and full["prompt_tokens"] + len(full["tokens"]) <= 24
    short = json.loads(run_cli("infer", *base, "--max-tokens", "3").stdout)
    assert short["stop_reason"] == "length"
    long = json.loads(run_cli("infer", *base, "--max-tokens", "12").stdout)
    stop = long["text"][4:6]
    assert len(stop) == 2, long
    cut = json.loads(run_cli("infer", *base, "--max-tokens", "12", "--stop", "\u2603", "--stop", stop).stdout)
    assert cut["stop_reason"] == "stop" and cut["text"] == long["text"][:long["text"].index(stop)]


def test_both_backends_stop_where_the_context_ends(factory_models):
    """The engine drew one token past the window (65 positions of 64: the last token drawn is never
    fed) where llama.cpp, its bridge and the API stop with prompt + tokens = context."""
    base = [factory_models["q8_0-spm-gqa"], "--prompt", "The quick brown fox", "--no-chat", "--json",
            "--ctx", "24", "--max-tokens", "100"]
    out = json.loads(run_cli("infer", *base).stdout)
    assert out["stop_reason"] == "context" and out["prompt_tokens"] + len(out["tokens"]) == 24, out
    # (the bridge's "tokens" are its text tokenized again, so only their bound can be checked)
    theirs = json.loads(run_cli("infer", *base, "--backend", "llama.cpp").stdout)
    assert theirs["stop_reason"] == "context" and theirs["prompt_tokens"] + len(theirs["tokens"]) <= 24


def test_the_bridge_refuses_a_repeat_penalty_it_would_apply_otherwise(factory_models):
    """llama-cpp-python counts only generated tokens in the penalty's window; llama.cpp's server and
    CLI, and the engine, count the prompt too: other text for the same request."""
    proc = run_cli("infer", factory_models["q8_0-spm-gqa"], "--prompt", "x", "--backend", "llama.cpp",
                   "--repeat-penalty", "1.3")
    assert_one_line_error(proc, "--repeat-penalty", "llama-cpp-python")


def test_the_bridge_draws_a_new_seed_each_run_without_one(factory_models):
    """Given no seed, llama-cpp-python derived the same one every run from its load-time seed."""
    base = [factory_models["q8_0-spm-gqa"], "--prompt", "The quick brown fox", "--no-chat", "--json",
            "--backend", "llama.cpp", "--temperature", "1.5", "--top-k", "0", "--top-p", "1", "--min-p", "0",
            "--max-tokens", "16"]
    texts = {json.loads(run_cli("infer", *base).stdout)["text"] for _ in range(3)}
    assert len(texts) > 1, texts
    seeded = {json.loads(run_cli("infer", *base, "--seed", "7").stdout)["text"] for _ in range(2)}
    assert len(seeded) == 1


def test_a_reader_that_stops_early_ends_infer_quietly(factory_models):
    """`infer ... | head -c 20`: "error: Broken pipe" and exit 1 before; now quiet, exit 141 as
    `yes | head` (128 + SIGPIPE). The pipe's reading end is closed before infer writes anything."""
    import os

    from tests.conftest import BIN

    read, write = os.pipe()
    proc = subprocess.Popen([str(BIN / "infer"), str(factory_models["q8_0-spm-gqa"]), "--prompt", "hello",
                             "--no-chat", "--max-tokens", "8"], stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    os.close(read)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 141 and err == "", (proc.returncode, err)


def test_sampling_with_seed_is_reproducible(factory_models):
    path = factory_models["q8_0-spm-gqa"]
    args = [path, "--prompt", "hello", "--no-chat", "--temperature", "1.0", "--seed", "5", "--max-tokens", "16",
            "--json"]
    a, b = json.loads(run_cli("infer", *args).stdout), json.loads(run_cli("infer", *args).stdout)
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) > 0


def test_stop_string_is_not_printed(default_store):
    proc = run_cli("infer", default_store, "--prompt", QUESTION, "--stop", "Paris", "--json")
    report = json.loads(proc.stdout)
    assert report["stop_reason"] == "stop" and "Paris" not in report["text"]


def test_help():
    proc = run_cli("infer", "--help")
    assert proc.returncode == 0 and "--temperature" in proc.stdout and "default model" in proc.stdout


def test_prompt_longer_than_context(factory_models):
    long = "word " * 3000
    assert_one_line_error(run_cli("infer", factory_models["q8_0-spm-gqa"], "--prompt", long, "--no-chat"),
                          "context window holds 512")


@pytest.mark.parametrize("args, needle", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--template", "klingon"], "unknown template 'klingon'"),
    (["--no-chat", "--template", "chatml"], "--no-chat"),
])
def test_nonsense_options(factory_models, args, needle):
    assert_one_line_error(run_cli("infer", factory_models["q8_0-spm-gqa"], "--prompt", "hi", *args), needle)


def test_unsupported_architecture(tmp_path):
    from tests.engine.test_model import write_gguf

    path = write_gguf(tmp_path / "m.gguf", arch="gpt2")
    assert_one_line_error(run_cli("infer", path, "--prompt", "hi"), "architecture 'gpt2' is not supported")


def test_store_that_fails_verification(factory_models, tmp_path):
    m = fragment_file(str(factory_models["q8_0-spm-gqa"]), tmp_path / "s", 4096, progress=False).manifest
    fid = m.tensor("blk.1.ffn_up.weight").pieces[0].fragment
    path = tmp_path / "s" / "fragments" / fid
    data = bytearray(path.read_bytes())
    data[3] ^= 0x40
    path.write_bytes(bytes(data))
    proc = run_cli("infer", tmp_path / "s", "--prompt", "hi")
    assert_one_line_error(proc, fid[:16], "corrupt")
    assert proc.stdout.strip() == ""


def test_missing_source(tmp_path):
    assert_one_line_error(run_cli("infer", tmp_path / "nope", "--prompt", "hi"), "no such store")


def test_a_fifo_as_source_is_named_not_waited_on(tmp_path):
    import os

    os.mkfifo(tmp_path / "model.gguf")
    proc = run_cli("infer", tmp_path / "model.gguf", "--prompt", "hi", timeout=60)
    assert_one_line_error(proc, "model.gguf", "not a regular file")


@pytest.mark.parametrize("command, args, needle", [
    ("infer", ["--no-such-option"], "--no-such-option"),
    ("infer", ["--prompt", "hi", "--top-k", "many"], "--top-k"),
    ("fragment", [], "MODEL"),
    ("recombine", ["--bogus"], "--bogus"),
])
def test_usage_errors_are_one_line_with_exit_1(command, args, needle):
    proc = run_cli(command, *args)
    assert proc.returncode == 1
    assert_one_line_error(proc, needle, f"{command} --help")


# -- issue 10: prompts and options that used to end in a traceback ----------------------------------
def run_bytes(*args, stdin: bytes | None = None, env: dict | None = None, timeout: float = 300):
    """run_cli with raw bytes as arguments (invalid UTF-8 included) and optional standard input."""
    import os
    import subprocess

    from tests.conftest import BIN

    return subprocess.run([str(BIN / "infer"), *args], input=stdin, capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def text_of(proc):
    import subprocess

    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"),
                                       proc.stderr.decode("utf-8", "replace"))


@pytest.mark.parametrize("option, needle", [("--prompt", "--prompt is not valid UTF-8 (byte 0xff"),
                                            ("--system", "--system is not valid UTF-8 (byte 0xff")])
def test_invalid_utf8_is_one_clear_line(factory_models, option, needle):
    args = [str(factory_models["q8_0-spm-gqa"]).encode(), b"--prompt", b"hi", option.encode(), b"\xff\xfehi\x80"]
    assert_one_line_error(text_of(run_bytes(*args)), needle)


def test_invalid_utf8_in_a_prompt_file_or_stdin(factory_models, tmp_path):
    model = str(factory_models["q8_0-spm-gqa"])
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"ok \xc3\x28")
    assert_one_line_error(run_cli("infer", model, "--prompt-file", bad), str(bad), "not valid UTF-8")
    assert_one_line_error(text_of(run_bytes(model, "--prompt", "-", stdin=b"\x80")), "standard input",
                          "not valid UTF-8")


def test_prompt_from_stdin_and_from_a_file_equal_the_option(factory_models, tmp_path):
    model = str(factory_models["q8_0-spm-gqa"])
    args = ["--no-chat", "--max-tokens", "6", "--json"]
    direct = json.loads(run_cli("infer", model, "--prompt", "The quick brown", *args).stdout)
    piped = json.loads(text_of(run_bytes(model, "--prompt", "-", *args, stdin=b"The quick brown")).stdout)
    (tmp_path / "p.txt").write_text("The quick brown", encoding="utf-8")
    filed = json.loads(run_cli("infer", model, "--prompt-file", tmp_path / "p.txt", *args).stdout)
    assert direct["tokens"] == piped["tokens"] == filed["tokens"] and direct["prompt_tokens"] > 2


@pytest.mark.parametrize("args, needle", [
    ([], "exactly one of --prompt"),
    (["--prompt", "hi", "--prompt-file", "x.txt"], "exactly one of --prompt"),
    (["--prompt-file", "/nonexistent/p.txt"], "/nonexistent/p.txt"),
    (["--prompt-file", "/dev/zero"], "/dev/zero: more than 64 MiB, too long for a prompt"),
    (["--prompt", "", "--no-chat"], "the prompt is empty"),
    (["--prompt", "hi", "--seed", "-2"], "--seed must be >= 0, or -1"),
])
def test_prompt_and_seed_mistakes(factory_models, args, needle):
    assert_one_line_error(run_cli("infer", factory_models["q8_0-spm-gqa"], *args), needle)


def test_seed_minus_one_is_random_and_threads_are_capped(factory_models):
    proc = run_cli("infer", factory_models["q8_0-spm-gqa"], "--prompt", "hello", "--no-chat", "--temperature", "1",
                   "--seed", "-1", "--threads", "100000", "--max-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "--threads 100000 is more than the" in proc.stderr
    assert len(json.loads(proc.stdout)["tokens"]) > 0


def test_help_names_every_kind_of_source():
    proc = run_cli("infer", "--help")
    for kind in ("store directory", ".gguf file", "http://", "p2p://", "--prompt-file"):
        assert kind in proc.stdout, kind


# -- issue 12: nothing a person waits on is silent ---------------------------------------------------
def test_loading_is_reported_on_a_terminal_and_silent_otherwise(factory_models):
    import pexpect

    from tests.conftest import BIN

    model = str(factory_models["q8_0-spm-gqa"])
    child = pexpect.spawn(str(BIN / "infer"), [model, "--prompt", "hi", "--no-chat", "--max-tokens", "4"],
                          encoding="utf-8", timeout=300)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "s] loading " in child.before and "s] ready (numba kernels" in child.before
    piped = run_cli("infer", model, "--prompt", "hi", "--no-chat", "--max-tokens", "4")
    assert piped.returncode == 0 and piped.stderr == ""


def test_cold_kernel_cache_is_detected(tmp_path):
    """With an empty Numba cache, infer announces "compiling kernels (first run only...)"."""
    import subprocess
    import sys

    from tests.conftest import REPO

    check = "from cli.common import kernels_need_compiling as k; print(k())"
    cold = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**__import__("os").environ, "NUMBA_CACHE_DIR": str(tmp_path)})
    assert cold.stdout.strip() == "True", cold.stderr


def test_worker_threads_wait_briefly_unless_the_environment_says_otherwise():
    """Idle Numba and OpenBLAS threads wait only briefly (cli.common.THREAD_ENV explains the
    measurements); a value the user set is kept."""
    import os

    from cli.common import THREAD_ENV, set_threads

    saved = {var: os.environ.pop(var, None) for var in THREAD_ENV}
    try:
        set_threads(None)
        assert {var: os.environ[var] for var in THREAD_ENV} == THREAD_ENV
        os.environ["GOMP_SPINCOUNT"] = "123"
        set_threads(None)
        assert os.environ["GOMP_SPINCOUNT"] == "123"
    finally:
        for var, value in saved.items():
            os.environ.pop(var, None)
            if value is not None:
                os.environ[var] = value
