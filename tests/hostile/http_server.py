"""A hostile HTTP server on 127.0.0.1 for the loader tests: it serves a real store's manifest, then
misbehaves in one chosen way. Every behaviour is bounded in time and stops when the test ends.

Modes (``target`` says whether the manifest, the fragments or both misbehave):
    tarpit   accept the connection and never answer
    drip     answer 200 with the right Content-Length, then one byte every DRIP seconds
    wrong    answer 200 with the right length and wrong bytes
    long     answer 200 without Content-Length and stream bytes without end
    short    answer 200 with the right Content-Length and send half, then close
    html     answer 200 with an HTML page, as a captive portal or a misconfigured proxy does
"""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from contextlib import contextmanager
from pathlib import Path

DRIP = 0.2
LIFETIME = 120.0  # no connection is kept longer than this, whatever the client does

HTML = b"<!doctype html><html><body><h1>Welcome to the hotel wifi</h1></body></html>\n"


class HostileServer:
    def __init__(self, store: Path, mode: str, target: str = "fragments"):
        self.store, self.mode, self.target = Path(store), mode, target
        self.requests: list[str] = []
        self.bytes_sent = 0
        self._closing = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(self._serve(reader, writer), LIFETIME)
        except (asyncio.TimeoutError, asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader, writer) -> None:
        while True:
            head = self.head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            self.requests.append(path)
            if path == "/manifest.json":
                body = (self.store / "manifest.json").read_bytes()
                hostile = self.target in ("manifest", "both")
            else:
                file = self.store / "fragments" / path.rsplit("/", 1)[-1]
                body = file.read_bytes() if file.is_file() else b""
                hostile = self.target in ("fragments", "both")
            if not hostile:
                await self._send(writer, body, len(body))
                continue
            await getattr(self, f"_{self.mode}")(writer, body)
            return

    async def _send(self, writer, body: bytes, length: int | None, content_type: bytes = b"application/octet-stream"):
        head = b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\n"
        if length is not None:
            head += b"Content-Length: %d\r\n" % length
        writer.write(head + b"\r\n" + body)
        self.bytes_sent += len(body)
        await writer.drain()

    async def _tarpit(self, writer, body):
        await asyncio.sleep(LIFETIME)

    async def _drip(self, writer, body):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(len(body)):
            writer.write(body[i:i + 1])
            self.bytes_sent += 1
            await writer.drain()
            await asyncio.sleep(DRIP)

    async def _wrong(self, writer, body):
        await self._send(writer, bytes(b ^ 0x55 for b in body), len(body))

    async def _short(self, writer, body):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[: len(body) // 2])
        await writer.drain()

    async def _long(self, writer, body):
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        chunk = bytes(1 << 16)
        while True:
            writer.write(chunk)
            self.bytes_sent += len(chunk)
            await writer.drain()

    async def _gzip_if_asked(self, writer, body):
        """As a web server with compression on (nginx's gzip on): compressed when the request accepts it."""
        accepts = [ln for ln in self.head.lower().split(b"\r\n") if ln.startswith(b"accept-encoding:")]
        if accepts and b"gzip" in accepts[0]:
            packed = gzip.compress(body)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(packed)
                         + packed)
            self.gzipped = getattr(self, "gzipped", 0) + 1
            await writer.drain()
        else:
            await self._send(writer, body, len(body))

    async def _html(self, writer, body):
        await self._send(writer, HTML, len(HTML), b"text/html")


@contextmanager
def hostile_server(store: Path, mode: str, target: str = "fragments"):
    """Run a HostileServer on 127.0.0.1 in a background thread; yields (server, base URL)."""
    server = HostileServer(store, mode, target)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state = {}

    async def start():
        state["server"] = await asyncio.start_server(server._handle, "127.0.0.1", 0)
        state["port"] = state["server"].sockets[0].getsockname()[1]
        ready.set()

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield server, f"http://127.0.0.1:{state['port']}/"
    finally:
        async def stop():
            state["server"].close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            # awaited: each handler closes its connection here, not when the garbage collector finds
            # it after the loop has stopped ('Event loop is closed', a warning in a later test)
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


class Stopwatch:
    def __enter__(self):
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc):
        self.seconds = time.monotonic() - self.started
