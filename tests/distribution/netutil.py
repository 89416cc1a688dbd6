"""Helpers for network tests: every server is on 127.0.0.1, every wait is bounded."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from contextlib import contextmanager

from aiohttp import web

from tests.conftest import BIN


class Process:
    """A `serve` subprocess; waits (bounded) for its announcement lines on stderr."""

    def __init__(self, *args, wait_for: str, timeout: float = 60):
        self.proc = subprocess.Popen([str(BIN / "serve"), *map(str, args)], stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        deadline = time.monotonic() + timeout
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        while not any(wait_for in line for line in self.lines):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise TimeoutError(f"serve did not announce {wait_for!r}: {self.lines}")
            time.sleep(0.05)

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.strip())

    def line(self, prefix: str) -> str:
        return next(line for line in self.lines if line.startswith(prefix))

    @property
    def url(self) -> str:
        line = next(line for line in self.lines if " on http://" in line or " over http://" in line)
        return "http://" + line.split("http://", 1)[1].split()[0]

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


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
