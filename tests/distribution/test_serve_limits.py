"""`serve` under slow, idle and too many connections: each is closed or refused in bounded time and a
normal client still gets its fragments. Loopback only; every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import urllib.request

import pytest

from common.aio_server import Limits
from distribution.server import make_app, start
from fragmenter.fragment import fragment_file


@pytest.fixture(scope="module")
def store(factory_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-limits") / "store"
    fragment_file(str(factory_models["q8_0-spm-gqa"]), out, 8192, progress=False)
    return out


@contextlib.contextmanager
def serving(store, limits: Limits):
    """distribution.server's app and start() on a thread of its own; yields the port."""
    loop = asyncio.new_event_loop()
    ready, state = threading.Event(), {}

    def run():
        asyncio.set_event_loop(loop)
        state["runner"], state["port"] = loop.run_until_complete(start(make_app(store), "127.0.0.1", 0, limits))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(20)
    try:
        yield state["port"]
    finally:
        asyncio.run_coroutine_threadsafe(state["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def manifest_ok(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/manifest.json", timeout=5) as r:
        return r.status == 200 and len(r.read()) > 0


def closed_within(sock: socket.socket, seconds: float, drip: bytes = b"") -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (dripping ``drip`` every 0.2 s)."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if drip:
                sock.sendall(drip)
            if not sock.recv(65536):
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


def test_idle_silent_and_dripping_connections_are_closed(store):
    with serving(store, Limits(keepalive=1.0, body_timeout=1.0, sweep_every=0.2)) as port:
        silent = socket.create_connection(("127.0.0.1", port), timeout=5)
        dripping = socket.create_connection(("127.0.0.1", port), timeout=5)
        dripping.sendall(b"GET /manifest.json HTTP/1.1\r\nHost: x\r\n")
        idle = socket.create_connection(("127.0.0.1", port), timeout=5)
        idle.sendall(b"GET /manifest.json HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive after its answer
        try:
            assert closed_within(silent, 5)
            assert closed_within(dripping, 5, drip=b"X-a: b\r\n")
            assert closed_within(idle, 5)
            assert manifest_ok(port)
        finally:
            for s in (silent, dripping, idle):
                s.close()


def test_connections_beyond_the_cap_get_503_and_the_server_recovers(store):
    with serving(store, Limits(keepalive=30, max_connections=3)) as port:
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            extra.sendall(b"GET /manifest.json HTTP/1.1\r\nHost: x\r\n\r\n")
            assert extra.recv(100).startswith(b"HTTP/1.1 503")
        for s in held:
            s.close()
        deadline = time.monotonic() + 5
        while True:
            try:
                assert manifest_ok(port)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)


def test_a_sending_slot_is_held_until_the_fragment_is_sent(store, monkeypatch):
    """The slot was freed as soon as the response object existed, so readers that never read
    were not counted and could take every connection; now a send holds it, within a bound."""
    import json
    import urllib.error

    from aiohttp import web

    import distribution.server as server

    original = web.FileResponse.prepare

    entered, release = threading.Event(), threading.Event()

    async def slow_prepare(self, request):  # a send that lasts until the test lets it go (a slow reader)
        entered.set()
        for _ in range(1000):  # (10 s at most)
            if release.is_set():
                break
            await asyncio.sleep(0.01)
        return await original(self, request)

    monkeypatch.setattr(web.FileResponse, "prepare", slow_prepare)
    monkeypatch.setattr(server, "MAX_CONCURRENT", 1)
    monkeypatch.setattr(server, "GATE_WAIT", 0.3)
    monkeypatch.setattr(server.make_app, "__defaults__", (None, 1))
    fid = json.loads((store / "manifest.json").read_text())["fragments"][0]["id"]
    with serving(store, Limits()) as port:
        url = f"http://127.0.0.1:{port}/fragments/{fid}"
        first = threading.Thread(target=lambda: urllib.request.urlopen(url, timeout=10).read())
        first.start()
        assert entered.wait(10)
        with pytest.raises(urllib.error.HTTPError) as e:  # the one slot is taken while the first is sent
            urllib.request.urlopen(url, timeout=10)
        assert e.value.code == 503 and e.value.headers["Retry-After"] == "1"
        release.set()
        first.join(10)
        with urllib.request.urlopen(url, timeout=10) as r:  # and free again once it is sent
            assert r.status == 200


def test_a_fragment_damaged_on_disk_is_not_served_as_its_id(store, tmp_path):
    """serve sent the bytes of a fragment file without looking at them, under its id as ETag and
    'immutable' for a year: clients refused them, but an HTTP cache between would have kept them."""
    import json
    import shutil
    import urllib.error

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    fragments = [f["id"] for f in json.loads((copy / "manifest.json").read_text())["fragments"]]
    bad, good = fragments[-1], fragments[-2]
    path = copy / "fragments" / bad
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # same size, one bit
    path.write_bytes(bytes(data))
    with serving(copy, Limits()) as port:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/fragments/{bad}", timeout=10)
        assert e.value.code == 404
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/fragments/{good}", timeout=10) as r:
            assert r.read() == (copy / "fragments" / good).read_bytes() and r.headers["ETag"] == f'"{good}"'
        path.write_bytes(bytes(data[:len(data) // 2]) + bytes([data[len(data) // 2] ^ 0x40]) + bytes(data[len(data) // 2 + 1:]))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/fragments/{bad}", timeout=10) as r:  # repaired: served
            assert r.status == 200
