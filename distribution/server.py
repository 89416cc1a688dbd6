"""`serve`: a store over HTTP, with aiohttp.

    GET /manifest.json          the manifest (ETag: its SHA-256)
    GET /fragments/<sha256>     a fragment listed in the manifest (ETag: its id; Range supported)

Nothing else is served: no listing, no paths, only hashes the manifest lists. The layout is the
store directory's own, so any static web server (nginx, `python -m http.server`) pointed at a
store serves the same URLs and works with the HTTP loader too.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import stat
from pathlib import Path

from aiohttp import web

from common.aio_server import Limits, OneLineLogs, quiet_logs, start_site  # noqa: F401 - re-exported
from common.errors import UserError
from distribution.addresses import http_url
from distribution.base import MissingFragment
from distribution.local import LocalLoader, present_fragments
from fragmenter.manifest import FRAGMENT_ID, FRAGMENTS_DIR, MANIFEST_NAME

MANIFEST = web.AppKey("manifest", object)  # the served store's Manifest (for the "serving ..." line)
MAX_CONCURRENT = 64  # fragments being sent at once; a request waits up to GATE_WAIT for a slot, then 503
GATE_WAIT = 10.0          # s
SEND_TIMEOUT = 30.0       # s, plus the fragment's size at MIN_SEND_RATE: the most one send may take
MIN_SEND_RATE = 100_000   # bytes/s


log = logging.getLogger("aiohttp.server")  # (quiet_logs gives it one rate-limited line)


class FragmentResponse(web.FileResponse):
    """aiohttp's file response (sendfile, Range, 416 on bad ranges) whose ETag is always the
    fragment's id: aiohttp would otherwise set one made of mtime and size."""

    def __init__(self, path: Path, fid: str, slot: asyncio.Semaphore | None = None, send_s: float | None = None,
                 **kwargs):
        super().__init__(path, **kwargs)
        self._fid, self._slot, self._send_s = fid, slot, send_s

    async def prepare(self, request):
        """Send the file, holding the sending slot until the last byte is written (it was freed as
        soon as the response object existed, so slow readers were never counted), and within
        ``send_s``: a client that stops reading loses its connection and its slot."""
        try:
            async with asyncio.timeout(self._send_s):
                return await super().prepare(request)
        except TimeoutError:
            if request.transport is not None:
                request.transport.abort()
            return None
        finally:
            slot, self._slot = self._slot, None
            if slot is not None:
                slot.release()

    @property
    def etag(self):
        return web.FileResponse.etag.fget(self)

    @etag.setter
    def etag(self, value) -> None:
        web.FileResponse.etag.fset(self, self._fid)


class CheckedFiles:
    """Which fragment files hold the bytes their ids say, each version of a file (inode, size,
    mtime) hashed once, on a worker thread, before it is first served. A fragment damaged on disk
    is not served (404: clients go to another peer), never with its id as ETag and a year's cache
    lifetime: an HTTP cache between would have kept the wrong bytes for that long."""

    def __init__(self):
        self.good: dict[str, tuple] = {}   # fragment id -> the file version whose bytes matched
        self.locks: dict[str, asyncio.Lock] = {}

    async def intact(self, path: Path, fid: str, size: int) -> bool:
        version = _version(path, size)
        if version is None:  # missing, not a regular file, or truncated/padded
            return False
        if self.good.get(fid) == version:
            return True
        async with self.locks.setdefault(fid, asyncio.Lock()):  # (one hashing per fragment at a time)
            if self.good.get(fid) != version:
                if not await asyncio.to_thread(_bytes_match, path, fid):
                    log.warning("not serving fragment %s: its bytes do not match its id", fid[:16])
                    return False
                self.good[fid] = version
        return True


def _version(path: Path, size: int) -> tuple | None:
    """A regular file of the fragment's size, as (inode, size, mtime), else None: serving a FIFO
    would hang a worker, a device or a grown file would stream without end."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) and st.st_size == size else None


def _bytes_match(path: Path, fid: str) -> bool:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest() == fid
    except OSError:
        return False


def make_app(store: str | Path, only: set[str] | None = None, max_concurrent: int = MAX_CONCURRENT) -> web.Application:
    """The aiohttp application serving ``store`` (or only the fragment ids in ``only``)."""
    store = Path(store)
    local = LocalLoader(store)  # validates the manifest; refuses a broken store up front
    try:
        local.header()  # ... and one whose tensor table its own header contradicts
    except MissingFragment:
        pass  # a store without its header serves what it has; every client checks anyway
    finally:
        local.close()
    manifest, manifest_bytes = local.manifest, local.manifest_bytes
    manifest_etag = f'"{hashlib.sha256(manifest_bytes).hexdigest()}"'
    sizes = manifest.unique_fragments()
    allowed = set(sizes) if only is None else set(only) & set(sizes)
    gate = asyncio.Semaphore(max_concurrent)
    checked = CheckedFiles()

    async def get_manifest(request: web.Request) -> web.StreamResponse:
        if request.headers.get("If-None-Match") == manifest_etag:
            return web.Response(status=304, headers={"ETag": manifest_etag})
        return web.Response(body=manifest_bytes, content_type="application/json", headers={"ETag": manifest_etag})

    async def get_fragment(request: web.Request) -> web.StreamResponse:
        fid = request.match_info["fid"]
        if not FRAGMENT_ID.match(fid) or fid not in allowed:
            raise web.HTTPNotFound(text="no such fragment\n")
        path = store / FRAGMENTS_DIR / fid
        if not await checked.intact(path, fid, sizes[fid]):
            raise web.HTTPNotFound(text="fragment not held here\n")
        try:
            async with asyncio.timeout(GATE_WAIT):
                await gate.acquire()
        except TimeoutError:
            raise web.HTTPServiceUnavailable(text=f"busy: {max_concurrent} fragments being sent\n",
                                             headers={"Retry-After": "1"}) from None
        return FragmentResponse(path, fid, slot=gate, send_s=SEND_TIMEOUT + sizes[fid] / MIN_SEND_RATE,
                                headers={"Cache-Control": "public, max-age=31536000, immutable"})

    app = web.Application(client_max_size=1024)
    app.router.add_get(f"/{MANIFEST_NAME}", get_manifest)
    app.router.add_get("/fragments/{fid}", get_fragment)
    app[MANIFEST] = manifest
    return app


async def start(app: web.Application, host: str, port: int, limits: Limits = Limits()) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner and the bound port (port 0 picks a free one). ``limits``:
    idle/silent connections, stalled bodies and the connection count are bounded (common/aio_server.py)."""
    try:
        return await start_site(app, host, port, limits, access_log=None, handle_signals=False)
    except OSError as e:  # unresolvable host, address in use, no permission for the port
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


def held_fragments(store: Path, manifest, layers: list[tuple[int, int]] | None = None) -> set[str]:
    """The fragments of ``store`` on disk at their manifest size (``present_fragments``), limited to
    ``layers`` (and the header) if given. Their bytes are checked before each is first served
    (``CheckedFiles``)."""
    from distribution.spans import span_tensors

    held = present_fragments(store, manifest)
    if layers is not None:
        held &= set(manifest.fragments_for(span_tensors(manifest, layers), header=True))
    return held


def serve_forever(store: str | Path, host: str, port: int, announce=print) -> None:
    """Serve until SIGINT/SIGTERM, then close connections and return."""

    quiet_logs()

    async def main():
        app = make_app(store)
        runner, bound = await start(app, host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        m = app[MANIFEST]
        held, total = len(held_fragments(Path(store), m)), len(m.unique_fragments())
        lacking = f"; {total - held} missing or the wrong size" if held < total else ""
        announce(f"serving {store} ({held} of {total} fragments of {m.source['name']}{lacking}) "
                 f"on {http_url(host, bound)}")
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
        announce("stopped")

    asyncio.run(main())
