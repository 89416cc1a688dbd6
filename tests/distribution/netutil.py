"""Helpers for network tests: every server is on 127.0.0.1, every wait is bounded."""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager

from aiohttp import web

from benchmarks.serve_process import ServeProcess


class Process(ServeProcess):
    """A `serve` subprocess; waits (bounded) for its announcement lines on stderr. The benchmarks'
    helper (they must not import tests/), plus an abrupt kill for failover tests."""

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=10)


@contextmanager
def serving(*args, wait_for: str = "serving", timeout: float = 60):
    p = Process(*args, wait_for=wait_for, timeout=timeout)
    try:
        yield p
    finally:
        p.stop()


@contextmanager
def aiohttp_server(app: web.Application):
    """Run an aiohttp app in a background thread on 127.0.0.1; yields its base URL."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state = {}

    async def start():
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        state["runner"] = runner
        state["port"] = site._server.sockets[0].getsockname()[1]
        started.set()

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield f"http://127.0.0.1:{state['port']}/"
    finally:
        asyncio.run_coroutine_threadsafe(state["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
