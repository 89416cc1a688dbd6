"""serve and the HTTP loader: same tensors and text as the local store, over any web server, and
every failure retried where it makes sense, then one clear error, never a wrong tensor."""

import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from aiohttp import web

from common.errors import StoreError
from distribution.base import FragmentError
from distribution.http import HTTPLoader
from distribution.local import LocalLoader
from engine.model import LlamaModel
from fragmenter.fragment import fragment_file
from tests.conftest import assert_one_line_error, run_cli
from tests.distribution.netutil import aiohttp_server, serving

PROMPT = ["--prompt", "What is the capital of France?", "--max-tokens", "24", "--json"]


@pytest.fixture
def store(factory_models, tmp_path):
    fragment_file(str(factory_models["q8_0-spm-gqa"]), tmp_path / "store", 8192, progress=False)
    return tmp_path / "store"


def test_serve_then_http_loader_gives_the_same_tensors(store, tmp_path):
    with serving(store, "--port", "0") as server:
        loader = HTTPLoader(server.url, cache_dir=tmp_path / "cache")
        local = LocalLoader(store)
        for name in local.manifest.tensor_names():
            np.testing.assert_array_equal(loader.load_tensor(name), local.load_tensor(name))
        assert loader.metadata["general.architecture"] == "llama"


def test_infer_over_http_matches_the_local_store(default_store, tmp_path):
    env_cache = {"GGUF_FRAGMENTS_CACHE": str(tmp_path / "cache")}
    local = json.loads(run_cli("infer", default_store, *PROMPT).stdout)
    with serving(default_store, "--port", "0") as server:
        proc = run_cli("infer", server.url, *PROMPT, env=env_cache)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["text"] == local["text"]


def test_a_web_server_we_did_not_write(default_store, tmp_path):
    """python -m http.server hosting the store directory as plain files."""
    server = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
                              cwd=default_store, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:  # it binds a free port itself, and says which: "Serving HTTP on 127.0.0.1 port N (...) ..."
        assert select.select([server.stdout], [], [], 20)[0], "http.server did not start"
        port = int(server.stdout.readline().split(" port ")[1].split()[0])
        loader = HTTPLoader(f"http://127.0.0.1:{port}/", cache_dir=tmp_path / "cache")
        model = LlamaModel(loader, backend="numpy")
        ref = LlamaModel(LocalLoader(default_store), backend="numpy")
        tokens = np.array([1, 504, 3575, 282, 4649])
        np.testing.assert_array_equal(model.forward(tokens, model.new_cache(8)), ref.forward(tokens, ref.new_cache(8)))
    finally:
        server.terminate()
        server.wait(10)


def test_cache_is_shared_and_only_needed_fragments_are_fetched(store, tmp_path):
    requests = []

    async def fragment(request):
        requests.append(request.match_info["fid"])
        return web.FileResponse(store / "fragments" / request.match_info["fid"])

    async def manifest(request):
        return web.FileResponse(store / "manifest.json")

    app = web.Application()
    app.router.add_get("/manifest.json", manifest)
    app.router.add_get("/fragments/{fid}", fragment)
    with aiohttp_server(app) as url:
        loader = HTTPLoader(url, cache_dir=tmp_path / "cache")
        LlamaModel(loader, layers=(1, 1))  # a node serving block 1 only (the last block: with the head)
        m = loader.manifest
        needed = set(m.fragments_for([t.name for t in m.layer_tensors(1, 1)] + ["output_norm.weight", "output.weight"],
                                     header=True))
        assert set(requests) == needed and len(requests) == len(needed)
        requests.clear()
        again = HTTPLoader(url, cache_dir=tmp_path / "cache")  # another loader, same cache: no fetch
        for name in again.manifest.tensor_names()[:3]:
            again.load_tensor(name)
        assert requests == [fid for fid in requests if fid not in needed]


class Faulty:
    """A web server that misbehaves in scripted ways, per fragment."""

    def __init__(self, store):
        self.store = store
        self.plan = {}  # fid -> list of behaviours, consumed in order; then "ok"
        self.hits = {}

    def app(self):
        app = web.Application()
        app.router.add_get("/manifest.json", self.manifest)
        app.router.add_get("/fragments/{fid}", self.fragment)
        return app

    async def manifest(self, request):
        return web.FileResponse(self.store / "manifest.json")

    async def fragment(self, request):
        fid = request.match_info["fid"]
        self.hits[fid] = self.hits.get(fid, 0) + 1
        steps = self.plan.get(fid, [])
        what = steps.pop(0) if steps else "ok"
        data = (self.store / "fragments" / fid).read_bytes()
        if what == "500":
            return web.Response(status=500)
        if what == "404":
            return web.Response(status=404)
        if what == "slow":
            await asyncio.sleep(5)
        if what == "short":
            response = web.StreamResponse(headers={"Content-Length": str(len(data))})
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            return response  # the connection closes early
        if what == "trickle":  # the body in ten pieces over two seconds
            response = web.StreamResponse(headers={"Content-Length": str(len(data))})
            await response.prepare(request)
            for i in range(10):
                await response.write(data[i * len(data) // 10:(i + 1) * len(data) // 10])
                await asyncio.sleep(0.2)
            return response
        if what == "wrong":
            data = bytes([data[0] ^ 1]) + data[1:]
        return web.Response(body=data)


@pytest.mark.parametrize("faults", [["500", "500"], ["slow"], ["short"], ["wrong"], ["500", "short", "wrong"]])
def test_transient_faults_are_retried(store, tmp_path, faults):
    faulty = Faulty(store)
    m = LocalLoader(store).manifest
    victim = m.tensor("blk.0.attn_q.weight").pieces[0].fragment
    faulty.plan[victim] = list(faults)
    with aiohttp_server(faulty.app()) as url:
        loader = HTTPLoader(url, cache_dir=tmp_path / "cache", timeout=1.0, attempts=4)
        np.testing.assert_array_equal(loader.load_tensor("blk.0.attn_q.weight"),
                                      LocalLoader(store).load_tensor("blk.0.attn_q.weight"))
        assert faulty.hits[victim] == len(faults) + 1


@pytest.mark.parametrize("fault, message", [("404", "404"), ("wrong", "SHA-256"), ("500", "HTTP 500")])
def test_persistent_faults_end_in_one_clear_error(store, tmp_path, fault, message):
    faulty = Faulty(store)
    victim = LocalLoader(store).manifest.tensor("blk.1.ffn_up.weight").pieces[0].fragment
    faulty.plan[victim] = [fault] * 10
    with aiohttp_server(faulty.app()) as url:
        loader = HTTPLoader(url, cache_dir=tmp_path / "cache", timeout=1.0, attempts=3)
        started = time.monotonic()
        with pytest.raises(FragmentError, match=message) as info:
            loader.load_tensor("blk.1.ffn_up.weight")
        assert "blk.1.ffn_up.weight" in str(info.value) and victim[:16] in str(info.value)
        assert time.monotonic() - started < 20
        assert not (tmp_path / "cache" / victim).exists()


def test_pinned_manifest_hash(store, tmp_path):
    with serving(store, "--port", "0") as server:
        with pytest.raises(StoreError, match="not the"):
            HTTPLoader(server.url + "#" + "ab" * 32, cache_dir=tmp_path / "cache")
        import hashlib

        good = hashlib.sha256((store / "manifest.json").read_bytes()).hexdigest()
        assert HTTPLoader(server.url + "#" + good, cache_dir=tmp_path / "cache").manifest_sha256 == good
        assert_one_line_error(run_cli("infer", server.url + "#" + "ab" * 32, "--prompt", "hi"), "manifest")


def test_unreachable_server_is_one_line(tmp_path):
    proc = run_cli("infer", "http://127.0.0.1:9/", "--prompt", "hi", timeout=120)
    assert_one_line_error(proc, "127.0.0.1:9", "manifest")


def raw_request(url: str, data: bytes) -> bytes:
    host, port = url.split("//")[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(data)
        try:
            return s.recv(200)
        except socket.timeout:
            return b""


def test_serve_rejects_bad_requests_and_keeps_serving(store):
    fid = LocalLoader(store).manifest.fragments[0].id
    with serving(store, "--port", "0") as server:
        import urllib.error
        import urllib.request

        def status(path, headers=None):
            try:
                return urllib.request.urlopen(urllib.request.Request(server.url + path, headers=headers or {}),
                                              timeout=5).status
            except urllib.error.HTTPError as e:
                return e.code

        for path in ["fragments/../manifest.json", "fragments/%2e%2e%2fmanifest.json", "../../etc/passwd",
                     "fragments/", "fragments/" + "0" * 64, "", "store/manifest.json", "fragments/" + fid + "x"]:
            assert 400 <= status(path) < 500, path
        assert status("fragments/" + fid, {"Range": "bytes=999999999999-9999999999999"}) == 416
        assert 400 <= status("fragments/" + fid, {"Range": "bytes=" + ",".join(f"{i}-{i}" for i in range(5000))}) < 500
        assert status("fragments/" + fid, {"Range": "bytes=0-9"}) == 206
        for garbage in (b"GARBAGE\r\n\r\n", b"GET /" + b"a" * 100000 + b" HTTP/1.1\r\n\r\n",
                        b"\x00\xff\x16\x03\x01 binary junk\r\n\r\n"):
            first_line = raw_request(server.url, garbage).split(b"\r\n")[0]
            assert first_line.startswith(b"HTTP/1.") and first_line.split()[1].startswith(b"4"), first_line
        assert status("manifest.json") == 200 and status("fragments/" + fid) == 200
        with urllib.request.urlopen(server.url + "fragments/" + fid, timeout=5) as r:
            assert r.headers["ETag"].strip('"') == fid


def test_many_fragments_failing_make_one_line_and_the_run_ends_at_the_first(store, tmp_path):
    """Every fragment of the store is gone from the server: `fetch` says so for one in one line
    (the others' failures were left unretrieved and printed a traceback each), and does not wait
    for every fragment's retries first."""
    faulty = Faulty(store)
    m = LocalLoader(store).manifest
    for fid in set(m.unique_fragments()) - set(m.fragments_for([], header=True)):  # (the header is read first)
        faulty.plan[fid] = ["404"] * 10
    with aiohttp_server(faulty.app()) as url:
        proc = run_cli("fetch", url, "-o", tmp_path / "out", env={"GGUF_FRAGMENTS_CACHE": str(tmp_path / "cache")},
                       timeout=120)
    assert_one_line_error(proc, "could not be fetched", "404")
    assert max(faulty.hits.values()) <= 4  # no fragment retried past its own attempts


def test_ctrl_c_during_a_fetch_is_one_line(store, tmp_path):
    """SIGINT while fragments are downloading: exit 130, 'interrupted', no traceback from the
    downloads still under way, and no fragment half written in the output."""
    import signal

    from tests.conftest import BIN

    faulty = Faulty(store)
    m = LocalLoader(store).manifest
    for fid in set(m.unique_fragments()) - set(m.fragments_for([], header=True)):
        faulty.plan[fid] = ["trickle"] * 10
    with aiohttp_server(faulty.app()) as url:
        proc = subprocess.Popen([str(BIN / "fetch"), url, "-o", str(tmp_path / "out")], stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "GGUF_FRAGMENTS_CACHE": str(tmp_path / "cache")})
        deadline = time.monotonic() + 60
        while not faulty.hits and time.monotonic() < deadline:  # the downloads have begun
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "exception" not in err.lower(), err
    assert [line for line in err.splitlines() if line.strip()] == ["interrupted"], err
    assert not list((tmp_path / "out").rglob("*.partial*")) and not list((tmp_path / "out").rglob(".tmp-*"))


def test_serve_says_what_it_holds_and_where_others_reach_it(store, tmp_path):
    """A store missing one fragment and holding another cut short: serve counts what it can serve
    (it said '35 fragments' of any store); behind a wildcard host it prints a reachable URL, not
    http://0.0.0.0:PORT/."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    frags = sorted((copy / "fragments").iterdir())
    frags[0].unlink()
    frags[1].write_bytes(frags[1].read_bytes()[:10])
    total = len(LocalLoader(store).manifest.unique_fragments())
    with serving(copy, "--host", "0.0.0.0", "--port", "0") as server:
        line = server.line("serving")
        assert f"({total - 2} of {total} fragments" in line and "2 missing or the wrong size" in line, line
        assert "0.0.0.0" not in server.url
        with urllib.request.urlopen(server.url + "manifest.json", timeout=10) as r:
            assert r.status == 200


def test_a_retried_download_is_counted_once_on_the_progress_bar(store, tmp_path):
    """A fragment cut short and fetched again: the bar takes the failed attempt's bytes back (it
    passed 100%, counting them twice), and its MB are 10^6 bytes like every summary."""
    from common.progress import byte_progress, watch_progress

    faulty = Faulty(store)
    m = LocalLoader(store).manifest
    victim = m.tensor("blk.0.attn_q.weight").pieces[0].fragment
    faulty.plan[victim] = ["short"]
    seen = []
    stop = watch_progress(lambda desc, done, total: seen.append((done, total)))
    try:
        with aiohttp_server(faulty.app()) as url:
            loader = HTTPLoader(url, cache_dir=tmp_path / "cache", timeout=1.0, attempts=3)
            loader.prefetch(m.unique_fragments())
    finally:
        stop()
    assert faulty.hits[victim] == 2
    total = seen[-1][1]
    assert all(done <= total for done, _ in seen) and seen[-1][0] == total
    assert any(later < earlier for (earlier, _), (later, _) in zip(seen, seen[1:]))  # taken back once
    with byte_progress(1, "x", enabled=True) as bar:  # (on the captured stderr)
        assert bar.unit_divisor == 1000


def test_a_source_lookup_that_hangs_does_not_outlast_the_deadline(tmp_path):
    """A P2P loader's urls_for walks the DHT; run on the event loop, a stalled peer blocked every
    deadline and a fetch printed nothing for 800 s. It now runs on a thread, within the bound."""
    import threading

    from distribution.cache import FragmentCache
    from distribution.http import FetchFailed, HTTPFetcher

    fetcher = HTTPFetcher(FragmentCache(tmp_path / "cache"), attempts=2, timeout=1.0, backoff=0.05)
    release = threading.Event()

    def stalled(fid, attempt):
        release.wait(30)
        return []

    async def go():
        async with fetcher.session() as session:
            await fetcher.fetch_with_retries(session, stalled, "ab" * 32, 1000, None, asyncio.Semaphore(1))

    t0 = time.monotonic()
    try:
        with pytest.raises(FetchFailed, match="gave up after"):
            asyncio.run(go())
    finally:
        release.set()
    assert time.monotonic() - t0 < fetcher.deadline(1000) + 2


def test_plain_http_looks_up_sources_without_a_thread_per_fragment(store, tmp_path, monkeypatch):
    """Only a P2P loader's lookups can block (a DHT walk); a plain store's URL is a string join, and a
    thread for each of its fragments cost more than the lookup."""
    import threading

    from distribution import http
    from distribution.p2p_loader import P2PLoader

    started = []

    class Recorded(threading.Thread):
        def start(self):
            started.append(self.name)
            super().start()

    monkeypatch.setattr(http.threading, "Thread", Recorded)
    with serving(store, "--port", "0") as server:
        loader = HTTPLoader(server.url, cache_dir=tmp_path / "cache")
        ids = [f.id for f in loader.manifest.fragments]
        loader.prefetch(ids)
        assert all(loader.fetcher.cache.has(f, loader._sizes[f]) for f in ids) and len(ids) > 3
    assert "lookup" not in started
    assert P2PLoader.lookups_block and not HTTPLoader.lookups_block


def test_a_directory_planted_in_the_cache_is_dropped_like_any_damaged_entry(tmp_path):
    from distribution.cache import FragmentCache

    cache = FragmentCache(tmp_path / "cache")
    data = b"fragment bytes"
    fid = __import__("hashlib").sha256(data).hexdigest()
    (cache.path(fid) / "inside").mkdir(parents=True)
    assert cache.get(fid, len(data)) is None and not cache.path(fid).exists()
