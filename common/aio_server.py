"""Limits every aiohttp server facing a network needs, and one-line logs.

aiohttp's defaults suit a server behind a proxy, not one facing clients directly: an idle or
silent connection is kept for an hour (keepalive 3630 s), a request body may trickle in forever,
and there is no cap on connections, so a few thousand idle sockets exhaust the file descriptors
and a healthy client cannot connect. ``start_site`` starts an ``AppRunner`` + ``TCPSite`` with:

    keepalive      seconds a connection may sit without a complete request: idle between requests,
                   silent after connecting, or dripping its headers (aiohttp's keep-alive timer runs
                   from the connection's start and from each response's end)
    body_timeout   seconds a request's body may take to arrive; past it the connection is closed
    max_connections  open connections; a connection beyond is answered 503 and closed at once

An application may also give ``error_reply(status, message)``: the response for a request aiohttp
answers itself because it cannot parse it (a malformed request line, headers over the limit, a
body in an encoding it cannot decode), which is otherwise aiohttp's plain text; an API answers
those in its own error shape too. And ``quiet_logs`` turns aiohttp's and asyncio's tracebacks
(malformed requests, failed accepts) into one line each, the same line at most once per
``every`` seconds with a count of the rest.

    runner, port = await start_site(app, "127.0.0.1", 0, Limits(keepalive=5))
    ...
    await runner.cleanup()
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import sys
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from common.errors import UserError

BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@dataclass(frozen=True)
class Limits:
    keepalive: float = 15.0      # s without a complete request (idle, silent or dripping headers)
    body_timeout: float = 30.0   # s for one request's body to arrive
    max_connections: int = 1000  # open connections; capped below half the process's file limit
    sweep_every: float = 1.0     # s between checks of the body deadlines


def connection_cap(wanted: int) -> int:
    """``wanted``, but at most half the soft file-descriptor limit: the rest stay free for the
    model's files, outgoing connections and the accept that refuses the next client."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, min(wanted, soft // 2)) if soft > 0 else wanted


class _Handler(RequestHandler):
    """aiohttp's handler of one connection, answering what it cannot parse with ``error_reply``."""

    _refused = False

    def connection_made(self, transport) -> None:
        """Beyond the cap: 503 and closed before aiohttp starts the connection's task (refused in
        the manager's connection_made, that task started anyway and logged an AssertionError)."""
        manager = self._manager
        if isinstance(manager, _LimitedServer) and manager.full():
            self._refused = True
            manager.refuse(transport)
            return
        super().connection_made(transport)

    def connection_lost(self, exc) -> None:
        if not self._refused:
            super().connection_lost(exc)

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        reply = getattr(self._manager, "error_reply", None)
        if reply is None or request.writer.output_size > 0:  # (aiohttp's own, or its "sent already")
            return super().handle_error(request, status, exc, message)
        self.log_exception("Error handling request from %s", request.remote, exc_info=exc)  # (as aiohttp's)
        first = (message or "").strip().splitlines()[:1]
        response = reply(status, first[0][:200] if first else HTTPStatus(status).phrase)
        response.force_close()  # (as aiohttp's: the stream may be anywhere in the request)
        return response


class _LimitedServer(Server):
    """aiohttp's connection manager, refusing connections beyond the cap."""

    def __init__(self, *args, max_connections: int,
                 error_reply: Callable[[int, str], web.StreamResponse] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.error_reply = error_reply
        self.refused = 0

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)

    def full(self) -> bool:
        return len(self._connections) >= self.max_connections

    def refuse(self, transport) -> None:
        self.refused += 1
        transport.write(BUSY)
        transport.close()
        _log.warning("connection refused: %d connections open (the cap)", len(self._connections))


class _LimitedRunner(web.AppRunner):
    def __init__(self, app: web.Application, limits: Limits, error_reply=None, **kwargs):
        super().__init__(app, keepalive_timeout=limits.keepalive, **kwargs)
        self.limits, self.error_reply = limits, error_reply
        self.cap = connection_cap(limits.max_connections)
        self._sweeper: asyncio.Task | None = None

    async def _make_server(self) -> Server:
        plain = await super()._make_server()  # the app's handler and options, frozen app
        server = _LimitedServer(plain.request_handler, request_factory=plain.request_factory,
                                handler_cancellation=plain.handler_cancellation, loop=plain._loop,
                                max_connections=self.cap, error_reply=self.error_reply, **plain._kwargs)
        self._sweeper = asyncio.ensure_future(_sweep(server, self.limits))
        return server

    async def cleanup(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await super().cleanup()


async def _sweep(server: _LimitedServer, limits: Limits) -> None:
    """Close connections whose request body is still arriving ``body_timeout`` s after its
    headers: a body that stalls would otherwise hold its buffer and its handler forever."""
    first_seen: dict[int, float] = {}  # id(request) -> when its body was first seen unfinished
    while True:
        await asyncio.sleep(limits.sweep_every)
        now, pending = time.monotonic(), {}
        for handler in list(server._connections):
            request = handler._current_request  # aiohttp: the request its handler is running
            if request is None or request.content.is_eof():
                continue
            key = id(request)
            pending[key] = since = first_seen.get(key, now)
            if now - since > limits.body_timeout:
                _log.warning("closing a connection: its request body took over %gs", limits.body_timeout)
                handler.force_close()
                transport = server._connections.get(handler)
                if transport is not None:
                    transport.close()
        first_seen = pending


async def start_site(app: web.Application, host: str, port: int, limits: Limits = Limits(),
                     error_reply: Callable[[int, str], web.StreamResponse] | None = None,
                     **runner_options) -> tuple[web.AppRunner, int]:
    """Listen on host:port (0: any free port) with ``limits``; returns the runner and the port.
    ``error_reply``: see above. ``runner_options`` go to ``web.AppRunner`` (access_log,
    handler_cancellation, ...). An address that cannot be listened on raises OSError; the runner
    is cleaned up first."""
    runner = _LimitedRunner(app, limits, error_reply, **runner_options)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = site._server.sockets[0].getsockname()[1]  # aiohttp keeps the listening socket here
    return runner, bound


def check_port(host: str, port: int, option: str = "--port") -> None:
    """Fail early, before a model loads or a DHT is joined, when ``option``'s port is taken (one
    line, naming it)."""
    if port == 0:
        return
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"--host {host} {option} {port}: cannot listen there ({e.strerror or e})") from None


# -- logs -----------------------------------------------------------------------------------------
_log = logging.getLogger("aiohttp.server")


class OneLineLogs(logging.Filter):
    """aiohttp logs a malformed request (a bad request line, a reset connection) with its traceback,
    asyncio a failed accept (out of file descriptors) likewise; a server facing the internet meets
    those all day, so each becomes one line naming the problem, and the same line is let through at
    most once per ``every`` seconds (the next one says how many were dropped)."""

    def __init__(self, every: float = 10.0):
        super().__init__()
        self.every = every
        self.last: dict[str, tuple[float, int]] = {}  # line's start -> (when let through, dropped since)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
            record.args, record.exc_info, record.exc_text, record.stack_info = (), None, None, None
        if record.args:
            record.msg, record.args = record.getMessage(), ()
        record.msg = " ".join(str(record.msg).split())  # aiohttp's messages carry newlines and a caret line
        return self._let_through(record)

    def _let_through(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.msg[:60]}"
        now = time.monotonic()
        when, dropped = self.last.get(key, (None, 0))
        if when is not None and now - when < self.every:
            self.last[key] = (when, dropped + 1)
            return False
        if len(self.last) > 1000:  # many distinct lines: forget the old ones rather than grow
            self.last.clear()
        self.last[key] = (now, 0)
        if dropped:
            record.msg = f"{record.msg} (and {dropped} more like it in {now - when:.0f}s)"
        return True


def quiet_logs(stream=None, prefix: str = "serve", every: float = 10.0, also: tuple[str, ...] = ()) -> None:
    """Route aiohttp's and asyncio's log records (and those of the loggers ``also`` names) to one
    rate-limited line each on stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix}: %(levelname)s %(message)s"))
    handler.addFilter(OneLineLogs(every))
    for name in ("aiohttp", "asyncio", *also):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
