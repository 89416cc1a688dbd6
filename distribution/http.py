"""The HTTP backend: a store served by `serve` or by any static web server hosting a store directory.

    <base>/manifest.json        the manifest
    <base>/fragments/<sha256>   each fragment

Fetches run in parallel (aiohttp), each streamed to a temporary file in the local cache while it
is hashed; a fragment is kept only if its size and SHA-256 are right. Errors, timeouts, 5xx
answers, short bodies and wrong bytes are retried with exponential backoff; 404 is final. Only the
fragments asked for are fetched: a node that needs blocks 10-19 fetches those.

An address may pin the manifest: ``http://host:port/#<sha256 of manifest.json>``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from urllib.parse import urldefrag, urlsplit

import aiohttp

from common.errors import EXIT_UNREACHABLE, NetworkError, StoreError, UserError, naming
from common.progress import byte_progress
from distribution.base import FragmentError, FragmentLoader, MissingFragment
from distribution.cache import FragmentCache
from fragmenter.manifest import FRAGMENT_ID, MAX_MANIFEST_BYTES, Manifest

#: Seconds a server may keep us waiting (README, "Exit codes and time bounds"): every document and
#: every fragment, all attempts and the pauses between them together, within TIMEOUT plus the time
#: its bytes take at MIN_RATE; one attempt is abandoned after TIMEOUT / attempts without a byte.
DEFAULT_TIMEOUT = 30.0
#: Bytes per second below which a transfer is a drip, not a slow link (checked once an attempt has
#: run TIMEOUT / attempts).
MIN_RATE = 64 * 1024
TIMEOUT_ENV = "GGUF_FRAGMENTS_TIMEOUT"


def default_timeout() -> float:
    """DEFAULT_TIMEOUT, or $GGUF_FRAGMENTS_TIMEOUT (seconds) where set."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise UserError(f"${TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


class Unreachable(StoreError, NetworkError):
    """The server could not be reached or gave up (timed out, refused, too slow)."""

    exit_code = EXIT_UNREACHABLE  # not StoreError's: nothing is known to be wrong with the store


class FragmentUnreachable(FragmentError, NetworkError):
    """No source delivered the fragment in time."""

    exit_code = EXIT_UNREACHABLE


class FetchFailed(Exception):
    """One attempt failed in a way worth retrying. ``network``: the server, not its bytes, failed."""

    def __init__(self, message: str, network: bool = False):
        super().__init__(message)
        self.network = network


def peer_of(url: str) -> str:
    """host:port of a URL, to name the peer in messages."""
    parts = urlsplit(url)
    return parts.netloc or url


class HTTPFetcher:
    """Downloads content-addressed blobs from base URLs into a FragmentCache, verified, in bounded time."""

    def __init__(self, cache: FragmentCache, concurrency: int = 8, attempts: int = 4, timeout: float | None = None,
                 backoff: float = 0.25, progress: bool | None = None, min_rate: float = MIN_RATE):
        self.cache = cache
        self.concurrency = concurrency
        self.attempts = attempts
        self.timeout = default_timeout() if timeout is None else timeout
        self.backoff = backoff
        self.progress = progress
        self.min_rate = min_rate
        # A tarpit (accepts, never answers) costs `attempts` silent waits: TIMEOUT in all.
        self.stall = self.timeout / attempts
        self.grace = self.timeout / attempts
        self._lookup_lock = threading.Lock()  # source lookups (urls_for) go one at a time

    def deadline(self, size: int) -> float:
        """Seconds for every attempt at ``size`` bytes together: TIMEOUT, plus the bytes at MIN_RATE,
        plus the pauses between attempts."""
        pauses = sum(self.backoff * 2 ** (k - 1) for k in range(1, self.attempts))
        return self.timeout + size / self.min_rate + pauses

    def session(self) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.stall, sock_read=self.stall)
        # A 4 MiB read buffer: with aiohttp's 64 KiB default, per-chunk overhead caps us near 0.5x curl.
        # Bytes as stored: no decompression (a gzip bomb stays its size on the wire), so none is asked
        # for either (aiohttp asks for gzip and deflate by default, and a web server with compression
        # on then sent them).
        return aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=self.concurrency),
                                     auto_decompress=False, read_bufsize=1 << 22,
                                     headers={"Accept-Encoding": "identity"})

    async def _body(self, r: aiohttp.ClientResponse, limit: int, sink) -> int:
        """Stream the body to ``sink``; FetchFailed if it runs past ``limit`` or drips below MIN_RATE."""
        if r.content_length is not None and r.content_length > limit:
            raise FetchFailed(f"server announces {r.content_length} bytes, expected at most {limit}")
        loop = asyncio.get_running_loop()
        started, got = loop.time(), 0
        async for chunk in r.content.iter_any():
            got += len(chunk)
            if got > limit:
                raise FetchFailed(f"body longer than the expected {limit} bytes")
            sink(chunk)
            elapsed = loop.time() - started
            if elapsed > self.grace and got < self.min_rate * elapsed:
                raise FetchFailed(f"too slow ({got / elapsed:.0f} bytes/s, below {self.min_rate:.0f})", network=True)
        return got

    async def _bounded(self, what: str, seconds: float, coro):
        """``coro`` within ``seconds``, else FetchFailed naming the bound."""
        try:
            return await asyncio.wait_for(coro, seconds)
        except asyncio.TimeoutError:
            raise FetchFailed(f"gave up after {seconds:.0f} s ({what})", network=True) from None

    async def get_bytes(self, session, url: str, what: str) -> bytes:
        """A small document (the manifest), with retries, all within deadline(0)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.deadline(0)
        last, network, tried = "no attempt", True, 0
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            left = end - loop.time()
            if left <= 0:
                break
            tried += 1
            try:
                return await self._bounded(f"time bound {self.deadline(0):.0f} s", left,
                                           self._get_once(session, url, what))
            except FetchFailed as e:
                last, network = _after(str(e), last), e.network
        cls = Unreachable if network else StoreError
        raise cls(f"{url}: could not fetch the {what} from {peer_of(url)} after {tried} attempts ({last})")

    async def _get_once(self, session, url: str, what: str) -> bytes:
        body = bytearray()
        try:
            async with session.get(url) as r:
                if r.status == 404:
                    raise StoreError(f"{url}: not found (HTTP 404): no {what} there")
                if r.status != 200:
                    raise FetchFailed(f"HTTP {r.status}", network=r.status >= 500)
                await self._body(r, MAX_MANIFEST_BYTES, body.extend)
                return bytes(body)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise FetchFailed(_describe_error(e), network=True) from None

    async def fetch_one(self, session, url: str, fid: str, size: int, bar=None) -> None:
        """Download ``url`` into the cache as fragment ``fid``; raises FetchFailed, MissingFragment."""
        temp = self.cache.temp_path(fid)
        shown = 0  # bytes of this attempt on the progress bar
        via = ""   # the peer a redirect led to: the one to name when its bytes are wrong
        try:
            async with session.get(url) as r:
                if peer_of(str(r.url)) != peer_of(url):
                    via = f" (redirected to {peer_of(str(r.url))})"
                if r.status == 404:
                    raise MissingFragment(f"HTTP 404 from {url}{via}")
                if r.status != 200:
                    raise FetchFailed(f"HTTP {r.status}{via}", network=r.status >= 500)
                h = hashlib.sha256()
                with naming(self.cache.dir, "write to the fragment cache"):
                    out = open(temp, "wb")

                def sink(chunk):
                    nonlocal shown
                    h.update(chunk)
                    with naming(self.cache.dir, "write to the fragment cache"):  # a full disk is ours, not the server's
                        out.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                        shown += len(chunk)

                with out:
                    got = await self._body(r, size, sink)
            if got != size:
                raise FetchFailed(f"short body ({got} of {size} bytes){via}")
            if h.hexdigest() != fid:
                raise FetchFailed(f"bytes do not match the fragment's SHA-256{via}")
            self.cache.commit(fid, temp)
            shown = 0
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise FetchFailed(_describe_error(e), network=True) from None
        finally:
            temp.unlink(missing_ok=True)
            if shown:  # a failed attempt's bytes come off the bar: a retry counts them again
                bar.update(-shown)

    async def fetch_with_retries(self, session, urls_for, fid: str, size: int, bar, gate, warn=None,
                                 lookups_block: bool = True) -> None:
        """Try each source URL in turn, several rounds with backoff, until the fragment is cached,
        all within deadline(size); FetchFailed(network=...) naming the last source if not.
        ``lookups_block``: urls_for may take long (a DHT walk), so it runs on a thread."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.deadline(size)
        last, network = "no source", True
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            if lookups_block:
                urls = await self._sources(urls_for, fid, attempt, end - loop.time())
            else:  # (a string join: a thread per fragment would cost more than the lookup)
                urls = urls_for(fid, attempt)
            if urls is None:
                raise FetchFailed(f"{last}; gave up after {self.deadline(size):.0f} s (looking for sources)", network)
            if not urls:
                last = "no peer provides it"
                continue
            for url in urls:
                left = end - loop.time()
                if left <= 0:
                    raise FetchFailed(f"{last}; gave up after {self.deadline(size):.0f} s", network)
                try:
                    async with gate:
                        await self._bounded(f"time bound {self.deadline(size):.0f} s", left,
                                            self.fetch_one(session, url, fid, size, bar))
                    return
                except MissingFragment as e:
                    last, network = str(e), False
                except FetchFailed as e:
                    last, network = _after(f"{peer_of(url)}: {e}", last), e.network
                    if warn is not None:
                        warn(url, str(e))
        raise FetchFailed(last, network)


    async def _sources(self, urls_for, fid: str, attempt: int, left: float):
        """urls_for(fid, attempt) on a thread, within ``left`` seconds (None past them): a P2P
        loader's lookups walk the DHT for seconds per key, and run on the loop they blocked every
        deadline, so a stalled peer held a fetch for many minutes. One lookup at a time, as before;
        a daemon thread, so one still walking does not hold up the exit after the fetch gives up."""
        if left <= 0:
            return None
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def settle(setter, value):
            if not done.done():
                setter(value)

        def work():
            with self._lookup_lock:
                try:
                    result, setter = urls_for(fid, attempt), done.set_result
                except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
                    result, setter = e, done.set_exception
            try:
                loop.call_soon_threadsafe(settle, setter, result)
            except RuntimeError:  # the loop is gone: nobody waits any more
                pass

        threading.Thread(target=work, name="lookup", daemon=True).start()
        try:
            return await asyncio.wait_for(done, left)
        except asyncio.TimeoutError:
            return None


def _after(problem: str, before: str) -> str:
    """The last problem, and for a deadline the one that used up the time before it."""
    if "gave up after" in problem and before not in ("no attempt", "no source"):
        return f"{problem}; before that: {before}"
    return problem


def _describe_error(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "no answer in time"
    if isinstance(e, aiohttp.ClientPayloadError):
        return "the connection closed before the whole body came (short body)"
    return f"{type(e).__name__}: {e}".rstrip(": ")


class HTTPLoader(FragmentLoader):
    fetch_verifies = True  # the cache hands out only bytes whose SHA-256 it has just checked
    lookups_block = False  # fragment_urls only joins strings (P2PLoader's walks the DHT)

    def __init__(self, url: str, cache_dir=None, concurrency: int = 8, attempts: int = 4,
                 timeout: float | None = None, progress: bool | None = None, min_rate: float = MIN_RATE):
        base, pinned = urldefrag(url)
        if pinned and not FRAGMENT_ID.match(pinned):
            raise UserError(f"{url}: the part after # must be the manifest's SHA-256 (64 hex digits)")
        self.base = base.rstrip("/") + "/"
        self.fetcher = HTTPFetcher(FragmentCache(cache_dir), concurrency, attempts, timeout, progress=progress,
                                   min_rate=min_rate)
        manifest_url = self.base + "manifest.json"
        raw = asyncio.run(self._get_manifest(manifest_url))
        digest = hashlib.sha256(raw).hexdigest()
        if pinned and digest != pinned:
            raise StoreError(f"{manifest_url}: manifest hashes to {digest[:16]}..., not the {pinned[:16]}... asked for")
        self._adopt_manifest(raw, manifest_url, self.base)

    def _adopt_manifest(self, raw: bytes, label: str, where: str) -> None:
        """Finish construction from the manifest's bytes once a subclass has obtained them
        (P2PLoader gets them from a peer rather than from ``base``)."""
        FragmentLoader.__init__(self, Manifest.from_json(raw, label), where)
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        self.manifest_bytes = raw

    async def _get_manifest(self, url: str) -> bytes:
        async with self.fetcher.session() as s:
            return await self.fetcher.get_bytes(s, url, "manifest")

    def fragment_urls(self, fid: str, attempt: int = 0) -> list[str]:
        return [f"{self.base}fragments/{fid}"]

    def prefetch(self, fragment_ids) -> None:
        cache = self.fetcher.cache
        missing = [f for f in dict.fromkeys(fragment_ids) if not cache.has(f, self._sizes[f])]
        if missing:
            asyncio.run(self._download(missing))

    async def _download(self, ids: list[str]) -> None:
        total = sum(self._sizes[f] for f in ids)
        gate = asyncio.Semaphore(self.fetcher.concurrency)
        # The run's bound: every byte at MIN_RATE on one connection, after TIMEOUT, and one TIMEOUT
        # more so that a fragment's own deadline, whose message says why, comes first.
        bound = self.fetcher.deadline(total) + self.fetcher.timeout
        with byte_progress(total, f"fetch {len(ids)} fragments", self.fetcher.progress) as bar:
            async with self.fetcher.session() as session:
                jobs = [asyncio.ensure_future(self.fetcher.fetch_with_retries(
                    session, self.fragment_urls, f, self._sizes[f], bar, gate, self.warn, self.lookups_block))
                    for f in ids]
                try:  # the first fragment that cannot be had ends the run: the store is unusable without it
                    await asyncio.wait(jobs, timeout=bound, return_when=asyncio.FIRST_EXCEPTION)
                finally:  # also on Ctrl-C: no download outlives its session, and every failure is retrieved
                    for job in jobs:
                        job.cancel()
                    await asyncio.gather(*jobs, return_exceptions=True)
        for fid, job in zip(ids, jobs):
            result = None if job.cancelled() else job.exception()
            if isinstance(result, FetchFailed):
                cls = FragmentUnreachable if result.network else FragmentError
                raise cls(f"{self.where}: {self.describe(fid)} could not be fetched ({result})")
            if result is not None:
                raise result
        for fid, job in zip(ids, jobs):
            if job.cancelled():
                raise FragmentUnreachable(f"{self.where}: {self.describe(fid)} not fetched within the run's "
                                          f"bound of {bound:.0f} s")

    def warn(self, url: str, problem: str) -> None:
        """Called for each failed attempt at a source (P2P names the peer)."""

    def fetch(self, fragment_id: str) -> bytes:
        size = self._sizes[fragment_id]
        data = self.fetcher.cache.get(fragment_id, size)
        if data is None:
            self.prefetch([fragment_id])
            data = self.fetcher.cache.get(fragment_id, size)
        if data is None:
            raise MissingFragment(f"{self.where}: {self.describe(fragment_id)} is missing after fetching")
        return data
