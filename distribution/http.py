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
from urllib.parse import urldefrag

import aiohttp

from common.errors import StoreError, UserError
from common.progress import byte_progress
from distribution.base import FragmentError, FragmentLoader, MissingFragment
from distribution.cache import FragmentCache
from fragmenter.manifest import FRAGMENT_ID, Manifest


class FetchFailed(Exception):
    """One attempt failed in a way worth retrying."""


class HTTPFetcher:
    """Downloads content-addressed blobs from base URLs into a FragmentCache, verified."""

    def __init__(self, cache: FragmentCache, concurrency: int = 8, attempts: int = 4, timeout: float = 30.0,
                 backoff: float = 0.25, progress: bool | None = None):
        self.cache = cache
        self.concurrency = concurrency
        self.attempts = attempts
        self.timeout = timeout
        self.backoff = backoff
        self.progress = progress

    def session(self) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout)
        # A 4 MiB read buffer: with aiohttp's 64 KiB default, per-chunk overhead caps us near 0.5x curl.
        return aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=self.concurrency),
                                     auto_decompress=False, read_bufsize=1 << 22)

    async def get_bytes(self, session, url: str, what: str) -> bytes:
        """A small document (the manifest), with retries."""
        last = "no attempt"
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                async with session.get(url) as r:
                    if r.status == 404:
                        raise StoreError(f"{url}: not found (HTTP 404): no {what} there")
                    if r.status != 200:
                        last = f"HTTP {r.status}"
                        continue
                    return await r.read()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                last = _describe_error(e)
        raise StoreError(f"{url}: could not fetch the {what} after {self.attempts} attempts ({last})")

    async def fetch_one(self, session, url: str, fid: str, size: int, bar=None) -> None:
        """Download ``url`` into the cache as fragment ``fid``; raises FetchFailed, MissingFragment."""
        temp = self.cache.temp_path(fid)
        try:
            async with session.get(url) as r:
                if r.status == 404:
                    raise MissingFragment(f"HTTP 404 from {url}")
                if r.status != 200:
                    raise FetchFailed(f"HTTP {r.status}")
                h = hashlib.sha256()
                got = 0
                with open(temp, "wb") as out:
                    async for chunk in r.content.iter_any():
                        got += len(chunk)
                        if got > size:
                            raise FetchFailed(f"body longer than the fragment's {size} bytes")
                        h.update(chunk)
                        out.write(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
            if got != size:
                raise FetchFailed(f"short body ({got} of {size} bytes)")
            if h.hexdigest() != fid:
                raise FetchFailed("bytes do not match the fragment's SHA-256")
            self.cache.commit(fid, temp)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise FetchFailed(_describe_error(e)) from None
        finally:
            temp.unlink(missing_ok=True)

    async def fetch_with_retries(self, session, urls_for, fid: str, size: int, bar, gate, warn=None) -> None:
        """Try each source URL in turn, several rounds with backoff, until the fragment is cached."""
        last = "no source"
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            urls = urls_for(fid, attempt)
            if not urls:
                last = "no peer provides it"
                continue
            for url in urls:
                try:
                    async with gate:
                        await self.fetch_one(session, url, fid, size, bar)
                    return
                except MissingFragment as e:
                    last = str(e)
                except FetchFailed as e:
                    last = f"{url}: {e}"
                    if warn is not None:
                        warn(url, str(e))
        raise FetchFailed(last)


def _describe_error(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    return f"{type(e).__name__}: {e}".rstrip(": ")


class HTTPLoader(FragmentLoader):
    fetch_verifies = True  # the cache hands out only bytes whose SHA-256 it has just checked

    def __init__(self, url: str, cache_dir=None, concurrency: int = 8, attempts: int = 4, timeout: float = 30.0,
                 progress: bool | None = None):
        base, pinned = urldefrag(url)
        if pinned and not FRAGMENT_ID.match(pinned):
            raise UserError(f"{url}: the part after # must be the manifest's SHA-256 (64 hex digits)")
        self.base = base.rstrip("/") + "/"
        self.fetcher = HTTPFetcher(FragmentCache(cache_dir), concurrency, attempts, timeout, progress=progress)
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
        with byte_progress(total, f"fetch {len(ids)} fragments", self.fetcher.progress) as bar:
            async with self.fetcher.session() as session:
                results = await asyncio.gather(
                    *(self.fetcher.fetch_with_retries(session, self.fragment_urls, f, self._sizes[f], bar, gate,
                                                      self.warn) for f in ids),
                    return_exceptions=True)
        for fid, result in zip(ids, results):
            if isinstance(result, BaseException):
                if isinstance(result, FetchFailed):
                    raise FragmentError(f"{self.where}: {self.describe(fid)} could not be fetched after "
                                        f"{self.fetcher.attempts} attempts ({result})")
                raise result

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
