"""The `api` command as a user runs it: prints its URL, serves, stops on Ctrl-C; one-line errors."""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import time
import urllib.request

from tests.conftest import BIN, assert_one_line_error, run_cli


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of the process's stdout, waiting at most ``timeout`` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no output in time"
    return proc.stdout.readline()


def test_api_serves_and_stops_on_ctrl_c(factory_models):
    proc = subprocess.Popen([str(BIN / "api"), str(factory_models["q8_0-spm-gqa"]), "--port", "0", "--kernels",
                             "numpy", "--parallel", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = read_line(proc, 60)
        assert line.startswith("api: listening on http://127.0.0.1:"), line
        url = line.split()[3]
        assert read_line(proc, 120).startswith("api: model ready: factory-llama")
        with urllib.request.urlopen(url + "v1/models", timeout=10) as r:
            assert json.load(r)["data"][0]["id"] == "factory-llama"
        body = json.dumps({"prompt": "The quick", "max_tokens": 3, "temperature": 0}).encode()  # (sampled: EOS now and then)
        with urllib.request.urlopen(urllib.request.Request(url + "v1/completions", data=body,
                                                           headers={"Content-Type": "application/json"}), timeout=60) as r:
            assert json.load(r)["usage"]["completion_tokens"] == 3
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        for garbage in (b"GET / HTTP/9.9\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # malformed: 400, one log line
                sock.sendall(garbage)
                assert sock.recv(100)[9:12] == b"400"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "Traceback" not in err, err
        assert "api: " in err and "Bad status line" in err  # the malformed request, as one line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_missing_source_is_one_line(tmp_path):
    proc = run_cli("api", str(tmp_path / "nowhere"), "--port", "0", timeout=60)
    assert_one_line_error(proc, "nowhere", "no such store")
    assert "listening" not in proc.stdout  # refused before the server starts


def test_bad_options_are_one_line(factory_models):
    assert_one_line_error(run_cli("api", str(factory_models["q8_0-spm-gqa"]), "--template", "nope", timeout=60),
                          "nope")
    assert_one_line_error(run_cli("api", "--node", "ws://127.0.0.1:9/swarm", timeout=60), "--distributed")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        proc = run_cli("api", str(factory_models["q8_0-spm-gqa"]), "--port", str(port), timeout=60)
    assert_one_line_error(proc, str(port))
    assert time.monotonic() - started < 60


def test_an_address_it_cannot_listen_on_names_host(factory_models):
    proc = run_cli("api", str(factory_models["q8_0-spm-gqa"]), "--host", "999.1.1.1", "--port", "0", timeout=60)
    assert_one_line_error(proc, "--host 999.1.1.1", "cannot listen")
