"""The HTTP loader against servers that stall, drip, lie and babble: every case ends in bounded
time with one error naming the server, and nothing unverified reaches the cache."""

from __future__ import annotations

import os

import numpy as np
import pytest

from common.errors import EXIT_DAMAGED_STORE, EXIT_UNREACHABLE, StoreError
from distribution.base import FragmentError
from distribution.cache import FragmentCache
from distribution.http import FragmentUnreachable, HTTPLoader, Unreachable
from distribution.local import LocalLoader
from fragmenter.fragment import fragment_file
from tests.conftest import assert_one_line_error, run_cli
from tests.hostile.http_server import Stopwatch, hostile_server

TIMEOUT = 2.0  # the tests' TIMEOUT; the default (30 s) is checked once, on the command line
SLACK = 3.0    # scheduling on a busy 2-core machine
NAME = "blk.0.attn_q.weight"


@pytest.fixture(scope="module")
def store(factory_models, tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "store"
    fragment_file(str(factory_models["q8_0-spm-gqa"]), path, 8192, progress=False)
    return path


def loader(url, tmp_path, **kw):
    return HTTPLoader(url, cache_dir=tmp_path / "cache", timeout=TIMEOUT, **kw)


def bound(size: int, attempts: int = 4) -> float:
    """What the loader promises for ``size`` bytes (see HTTPFetcher.deadline), plus slack."""
    return TIMEOUT + size / (64 * 1024) + 0.25 * (2 ** (attempts - 1) - 1) + SLACK


def assert_nothing_unverified_cached(tmp_path, store):
    cache = tmp_path / "cache"
    for name in os.listdir(cache):
        assert not name.startswith(".partial-"), name
        assert name in LocalLoader(store).manifest.unique_fragments()


@pytest.mark.parametrize("mode", ["tarpit", "drip"])
def test_a_manifest_that_never_comes_is_given_up_in_bounded_time(store, tmp_path, mode):
    with hostile_server(store, mode, target="manifest") as (server, url), Stopwatch() as clock:
        with pytest.raises(Unreachable) as info:
            loader(url, tmp_path)
    assert clock.seconds < bound(0), clock.seconds
    assert url.split("//")[1].rstrip("/") in str(info.value)  # names the peer
    assert info.value.exit_code == EXIT_UNREACHABLE


@pytest.mark.parametrize("mode, error, needle", [
    ("tarpit", FragmentUnreachable, "no answer in time|gave up"),
    ("drip", FragmentUnreachable, "too slow"),
    ("wrong", FragmentError, "SHA-256"),
    ("short", FragmentUnreachable, "short body"),
    ("long", FragmentError, "longer than"),
    ("html", FragmentError, "short body"),
])
def test_hostile_fragment_servers_end_in_one_bounded_error(store, tmp_path, mode, error, needle):
    size = LocalLoader(store).manifest.unique_fragments()
    with hostile_server(store, mode) as (server, url):
        remote = loader(url, tmp_path)
        with Stopwatch() as clock, pytest.raises(error, match=needle) as info:
            remote.load_tensor(NAME)
        sent = server.bytes_sent
    message = str(info.value)
    assert "127.0.0.1:" in message and url in message
    assert clock.seconds < bound(max(size.values())), clock.seconds
    if mode == "long":  # read no further than the fragment: a few chunks at most per attempt
        assert sent < 64 * (1 << 20)
    if error is FragmentUnreachable:
        assert info.value.exit_code == EXIT_UNREACHABLE
    else:
        assert info.value.exit_code == EXIT_DAMAGED_STORE
    assert_nothing_unverified_cached(tmp_path, store)


def test_html_instead_of_a_manifest_is_one_line(store, tmp_path):
    with hostile_server(store, "html", target="manifest") as (server, url):
        with pytest.raises(StoreError, match="not a valid manifest"):
            loader(url, tmp_path)
        proc = run_cli("fetch", url, "-o", tmp_path / "out", env={"GGUF_FRAGMENTS_CACHE": str(tmp_path / "c")})
    assert_one_line_error(proc, "manifest.json", "not a valid manifest")
    assert proc.returncode == EXIT_DAMAGED_STORE


def test_honest_fragments_after_a_hostile_manifest_server_recovers(store, tmp_path):
    """The same loader code, with the server behaving: the bounds do not hurt a normal transfer."""
    with hostile_server(store, "tarpit", target="none") as (server, url):
        np.testing.assert_array_equal(loader(url, tmp_path).load_tensor(NAME), LocalLoader(store).load_tensor(NAME))


def test_cli_gives_up_on_a_tarpit_within_the_default_bound(store, tmp_path):
    """No configuration at all: the default TIMEOUT (30 s) plus the pauses between attempts."""
    with hostile_server(store, "tarpit", target="manifest") as (server, url), Stopwatch() as clock:
        proc = run_cli("fetch", url, "-o", tmp_path / "out", timeout=120,
                       env={"GGUF_FRAGMENTS_CACHE": str(tmp_path / "c"), "GGUF_FRAGMENTS_TIMEOUT": ""})
    assert_one_line_error(proc, url.split("//")[1].rstrip("/"), "gave up")
    assert proc.returncode == EXIT_UNREACHABLE
    assert 25 < clock.seconds < 45, clock.seconds


def test_timeout_is_configurable_from_the_environment(store, tmp_path):
    with hostile_server(store, "tarpit") as (server, url), Stopwatch() as clock:
        proc = run_cli("fetch", url, "-o", tmp_path / "out",
                       env={"GGUF_FRAGMENTS_CACHE": str(tmp_path / "c"), "GGUF_FRAGMENTS_TIMEOUT": "2"})
    assert_one_line_error(proc, "127.0.0.1:", "could not be fetched")
    assert proc.returncode == EXIT_UNREACHABLE
    assert clock.seconds < 30, clock.seconds
    proc = run_cli("fetch", url, "-o", tmp_path / "out", env={"GGUF_FRAGMENTS_TIMEOUT": "soon"})
    assert_one_line_error(proc, "GGUF_FRAGMENTS_TIMEOUT")


def test_an_unreachable_server_exits_3_naming_it(tmp_path):
    import socket

    with socket.socket() as sock:  # bound, never listening: refused, and no other process takes the port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        proc = run_cli("fetch", f"http://127.0.0.1:{port}/", "-o", tmp_path / "out",
                       env={"GGUF_FRAGMENTS_CACHE": str(tmp_path / "c")})
    assert_one_line_error(proc, f"127.0.0.1:{port}")
    assert proc.returncode == EXIT_UNREACHABLE


def test_downloads_of_killed_runs_are_removed_from_the_cache(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = tmp_path / "cache"
    cache.mkdir()
    leftover = cache / f".partial-{dead.pid}-{'a' * 64}"
    live = cache / f".partial-{os.getpid()}-{'b' * 64}"
    leftover.write_bytes(b"half")
    live.write_bytes(b"in progress")
    FragmentCache(cache)
    assert not leftover.exists() and live.exists()


def test_a_server_that_compresses_when_asked_is_never_asked(store, tmp_path):
    """The loader reads fragments as stored (aiohttp's decompression off, so a gzip bomb is only its
    bytes) but sent aiohttp's default Accept-Encoding: gzip, deflate; a web server with compression on
    then sent gzip, and the manifest was 'not a valid manifest', every fragment a short body."""
    with hostile_server(store, "gzip_if_asked", target="both") as (server, url):
        got = loader(url, tmp_path).load_tensor(NAME)
        assert getattr(server, "gzipped", 0) == 0
    np.testing.assert_array_equal(got, LocalLoader(store).load_tensor(NAME))


def test_wrong_bytes_after_a_redirect_name_the_peer_that_sent_them(store, tmp_path):
    """A store that redirects its fragments to another host: when that host's bytes are wrong, the
    error named the first server only, not the one that sent them."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Wrong(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "8192")
            self.end_headers()
            self.wfile.write(bytes(8192))

        def log_message(self, *args):
            pass

    other = ThreadingHTTPServer(("127.0.0.2", 0), Wrong)
    other_peer = f"127.0.0.2:{other.server_port}"

    class Redirecting(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/manifest.json":
                body = (store / "manifest.json").read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_response(302)
                self.send_header("Location", f"http://{other_peer}{self.path}")
                self.send_header("Content-Length", "0")
                self.end_headers()

        def log_message(self, *args):
            pass

    first = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    for server in (first, other):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(FragmentError, match=f"redirected to {other_peer}"):
            loader(f"http://127.0.0.1:{first.server_port}/", tmp_path, attempts=1).load_tensor(NAME)
    finally:
        for server in (first, other):
            server.shutdown()
            server.server_close()
