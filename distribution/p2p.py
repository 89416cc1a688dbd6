"""Peers that find each other through a Kademlia DHT (py-libp2p) and move fragments over HTTP.

Discovery is libp2p's: every peer runs a libp2p host with KadDHT. A peer serving a store
announces a provider record for the manifest and for each fragment it holds (the DHT key is the
SHA-256 as a multihash, ``1220<hex>``), and publishes its HTTP address as a DHT value under
``gguf-fragments-http/<peer id>``. Bytes travel over HTTP from the providing peer (the same
server as `serve`): one py-libp2p stream moved 71 MB/s on loopback, HTTP well over 1 GB/s, and
every fragment is verified by hash whatever carried it.

Address form: ``p2p://<manifest sha256>@<multiaddr of any peer>[,<multiaddr>...]``, for example
``p2p://8508...7407@/ip4/127.0.0.1/tcp/4001/p2p/16Uiu2HAm...``.

libp2p runs on trio; this module keeps it in a background thread with its own trio loop and
calls into it from the caller's thread, so the loaders stay synchronous like the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import secrets
import sys
import threading
from typing import Callable

from common.errors import StoreError, UserError
from distribution.http import HTTPFetcher, HTTPLoader
from distribution.cache import FragmentCache
from fragmenter.manifest import FRAGMENT_ID, Manifest

HTTP_KEY_PREFIX = "gguf-fragments-http/"
LOOKUP_TIMEOUT = 10.0  # seconds for one DHT lookup
DHT_PARALLEL = 8       # DHT operations in flight: py-libp2p fails to open streams beyond a few more


DIAL_FALLBACK_DELAY = 0.02


def _trim_dial_delay() -> None:
    """py-libp2p 0.8.1 dials a peer's addresses "happy eyeballs" style but, after starting the
    last address, waits the whole 250 ms fallback delay even when that dial already succeeded
    (swarm.dial_peer: move_on_after(_HAPPY_EYEBALLS_DELAY) around failed_event.wait()). Every
    connection therefore took 0.25 s on loopback (measured: the dial itself 8 ms). Our peers
    advertise one TCP address each, so the head start for other transports buys nothing."""
    import libp2p.network.swarm as swarm

    swarm._HAPPY_EYEBALLS_DELAY = min(getattr(swarm, "_HAPPY_EYEBALLS_DELAY", 0.25), DIAL_FALLBACK_DELAY)


def _quiet_libp2p() -> None:
    """libp2p leaves its logger without handlers unless LIBP2P_DEBUG is set, so Python's
    last-resort handler prints every warning (one per failed stream) to stderr. Keep them unless
    GGUF_FRAGMENTS_VERBOSE is set; our own messages say what matters."""
    import os

    log = logging.getLogger("libp2p")
    if os.environ.get("GGUF_FRAGMENTS_VERBOSE"):
        log.addHandler(logging.StreamHandler(sys.stderr))
    else:
        log.addHandler(logging.NullHandler())
        log.setLevel(logging.CRITICAL + 1)


def dht_key(sha256_hex: str) -> str:
    """A content id as the DHT wants it: a sha2-256 multihash in hex."""
    return "1220" + sha256_hex


def parse_address(address: str) -> tuple[str, list[str]]:
    """``p2p://<manifest sha256>@<multiaddr>[,<multiaddr>]`` -> (manifest hash, bootstrap multiaddrs)."""
    if not address.startswith("p2p://") or "@" not in address:
        raise UserError(f"{address}: a P2P address looks like p2p://<manifest sha256>@/ip4/HOST/tcp/PORT/p2p/PEER")
    digest, _, rest = address[len("p2p://"):].partition("@")
    if not FRAGMENT_ID.match(digest):
        raise UserError(f"{address}: {digest!r} is not a manifest SHA-256 (64 hex digits)")
    boots = [b for b in rest.split(",") if b]
    if not boots or not all(b.startswith("/") and "/p2p/" in b for b in boots):
        raise UserError(f"{address}: bootstrap peers must be multiaddrs ending in /p2p/<peer id>")
    return digest, boots


class P2PNode:
    """A libp2p host with a Kademlia DHT, running in its own thread."""

    def __init__(self, listen: str = "/ip4/127.0.0.1/tcp/0", bootstrap: list[str] | None = None,
                 seed: bytes | None = None, server: bool = True):
        self.listen = listen
        # A peer that serves answers DHT queries; a client only asks, so that when it leaves it
        # does not linger in the others' routing tables and slow their lookups.
        self.server = server
        self.bootstrap = list(bootstrap or [])
        self.seed = seed or secrets.token_bytes(32)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="p2p-node", daemon=True)
        self._token = None
        self._stop = None
        self.peer_id = ""
        self.addrs: list[str] = []

    # -- life cycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "P2PNode":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise StoreError(f"p2p: the libp2p host did not start within {timeout:.0f} s")
        if self._error is not None:
            raise StoreError(f"p2p: cannot start the libp2p host on {self.listen} ({self._error})")
        return self

    def stop(self) -> None:
        if self._token is not None and self._thread.is_alive():
            import trio

            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except (RuntimeError, trio.RunFinishedError):
                pass
        self._thread.join(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _main(self) -> None:
        import trio

        try:
            trio.run(self._run)
        except BaseException as e:  # reported to start(); the thread must not die silently
            self._error = e
            self._ready.set()

    async def _run(self) -> None:
        import trio
        from libp2p import new_host
        from libp2p.crypto.secp256k1 import create_new_key_pair
        from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
        from libp2p.tools.anyio_service import background_trio_service
        from multiaddr import Multiaddr

        _quiet_libp2p()  # after the imports: importing libp2p resets its logger
        _trim_dial_delay()
        self._limit = trio.CapacityLimiter(DHT_PARALLEL)
        self._known = []  # peers we connected to: asked first, over their open connections
        host = new_host(key_pair=create_new_key_pair(self.seed))
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with host.run(listen_addrs=[Multiaddr(self.listen)]):
            self.host = host
            self.dht = KadDHT(host, DHTMode.SERVER if self.server else DHTMode.CLIENT)
            async with background_trio_service(self.dht):
                self.peer_id = host.get_id().pretty()
                self.addrs = [a if "/p2p/" in a else f"{a}/p2p/{self.peer_id}" for a in map(str, host.get_addrs())]
                for addr in self.bootstrap:
                    await self._connect(addr)
                self._ready.set()
                await self._stop.wait()

    async def _connect(self, addr: str) -> None:
        from libp2p.peer.peerinfo import info_from_p2p_addr
        from multiaddr import Multiaddr

        info = info_from_p2p_addr(Multiaddr(addr))
        await self.host.connect(info)
        await self.dht.routing_table.add_peer(info.peer_id)
        self._known.append(info.peer_id)

    # -- calls from other threads -------------------------------------------------------------------
    def call(self, fn: Callable, *args, timeout: float = 60.0):
        """Run ``await fn(*args)`` in the node's trio loop, from any other thread."""
        import trio

        async def bounded():
            with trio.fail_after(timeout):
                return await fn(*args)

        try:
            return trio.from_thread.run(bounded, trio_token=self._token)
        except trio.TooSlowError:
            raise StoreError(f"p2p: a DHT operation took longer than {timeout:.0f} s") from None

    def provide(self, hashes: list[str]) -> None:
        async def one(h):
            async with self._limit:
                await self.dht.provide(dht_key(h))

        async def run():
            import trio

            async with trio.open_nursery() as nursery:
                for h in hashes:
                    nursery.start_soon(one, h)

        self.call(run, timeout=60 + len(hashes))  # a provide takes ~25 ms on loopback

    def announce_http(self, url: str) -> None:
        self.call(self.dht.put_value, HTTP_KEY_PREFIX + self.peer_id, url.encode())

    def find_providers(self, hashes: list[str], thorough: bool = False) -> dict[str, list[str]]:
        """hash -> provider peer ids, looked up concurrently; ``thorough`` skips the known-peers
        shortcut and walks the DHT (used when the providers we knew have all failed)."""
        found: dict[str, list[str]] = {}

        from libp2p.kad_dht.kad_dht import _encode_key

        async def ask_known(key: bytes) -> list[str]:
            # One GET_PROVIDERS round trip to each peer we are connected to, answers merged.
            # py-libp2p's find_providers always starts with an iterative FIND_NODE across the
            # network, which waits on departed peers (1.4 s per lookup measured on loopback).
            # (_get_providers_from_peer_with_closers is private API of the pinned libp2p 0.8.1.)
            peers: list[str] = []
            for peer in self._known:
                try:
                    infos, _ = await self.dht.provider_store._get_providers_from_peer_with_closers(peer, key)
                except Exception:  # a peer that died or answers badly: ask the next
                    continue
                peers += [i.peer_id.pretty() for i in infos if i.peer_id.pretty() not in peers]
            return peers

        async def one(h):
            import trio

            async with self._limit:
                with trio.move_on_after(LOOKUP_TIMEOUT):
                    found[h] = [] if thorough else await ask_known(_encode_key(dht_key(h)))
                    if not found[h]:
                        infos = await self.dht.find_providers(dht_key(h), 20)
                        found[h] = [i.peer_id.pretty() for i in infos]

        async def run():
            import trio

            async with trio.open_nursery() as nursery:
                for h in hashes:
                    found[h] = []
                    nursery.start_soon(one, h)

        self.call(run, timeout=LOOKUP_TIMEOUT * (1 + len(hashes) // DHT_PARALLEL) + 30)
        return found

    def http_url(self, peer_id: str) -> str | None:
        key = HTTP_KEY_PREFIX + peer_id

        async def get():
            import trio

            with trio.move_on_after(LOOKUP_TIMEOUT):
                for peer in self._known:  # as for providers: the peers we know first, then the network
                    try:  # private API of the pinned libp2p 0.8.1
                        value = await self.dht.value_store._get_from_peer(peer, key.encode())
                    except Exception:
                        continue
                    if value:
                        return value
                return await self.dht.get_value(key)
            return None

        value = self.call(get, timeout=LOOKUP_TIMEOUT + 5)
        return value.decode() if value else None


class P2PLoader(HTTPLoader):
    """Fetches a store's fragments from whichever peers provide them, verified, with failover."""

    def __init__(self, address: str, cache_dir=None, concurrency: int = 8, attempts: int = 4, timeout: float = 10.0,
                 progress: bool | None = None, listen: str = "/ip4/127.0.0.1/tcp/0", warn=None):
        digest, boots = parse_address(address)
        self.address = address
        self.node = P2PNode(listen, boots, server=False).start()
        self._urls: dict[str, str | None] = {}   # peer id -> HTTP base URL
        self._providers: dict[str, list[str]] = {}
        self._warn_sink = warn or (lambda line: print(line, file=sys.stderr))
        self.fetcher = HTTPFetcher(FragmentCache(cache_dir), concurrency, attempts, timeout, progress=progress)
        self.base = address
        try:
            raw = self._fetch_manifest(digest)
        except BaseException:
            self.node.stop()
            raise
        self._adopt_manifest(raw, f"{address} (manifest)", address)

    def _fetch_manifest(self, digest: str) -> bytes:
        peers = self.node.find_providers([digest])[digest]
        if not peers:
            raise StoreError(f"{self.address}: no peer provides the manifest {digest[:16]}...")
        last = "no reachable provider"
        for peer in peers:
            base = self._peer_url(peer)
            if base is None:
                continue
            try:
                raw = asyncio.run(self._get_manifest(base + "manifest.json"))
            except StoreError as e:
                last = str(e)
                continue
            if hashlib.sha256(raw).hexdigest() == digest:
                return raw
            last = f"peer {peer[:12]} sent a manifest that does not hash to {digest[:16]}..."
            self._warn_sink(f"warning: {last}")
        raise StoreError(f"{self.address}: could not get the manifest ({last})")

    def _peer_url(self, peer: str) -> str | None:
        if peer not in self._urls:
            url = self.node.http_url(peer)
            self._urls[peer] = url.rstrip("/") + "/" if url else None
        return self._urls[peer]

    def fragment_urls(self, fid: str, attempt: int = 0) -> list[str]:
        peers = self._providers.get(fid) or []
        if attempt > 0 or not peers:  # the providers we knew failed: walk the DHT for others
            fresh = self.node.find_providers([fid], thorough=True)[fid]
            peers = peers + [p for p in fresh if p not in peers]
            self._providers[fid] = peers
        urls = [self._peer_url(p) for p in peers]
        urls = [f"{u}fragments/{fid}" for u in urls if u]
        random.shuffle(urls)  # spread the load over the providers
        return urls

    def prefetch(self, fragment_ids) -> None:
        cache = self.fetcher.cache
        missing = [f for f in dict.fromkeys(fragment_ids) if not cache.has(f, self._sizes[f])]
        if not missing:
            return
        self._providers.update(self.node.find_providers(missing))
        for peers in self._providers.values():
            for p in peers:
                self._peer_url(p)
        super().prefetch(missing)
        for fid in missing:  # the next lookup (a retry) asks the DHT afresh
            self._providers.pop(fid, None)

    def warn(self, url: str, problem: str) -> None:
        peer = next((p for p, u in self._urls.items() if u and url.startswith(u)), "?")
        self._warn_sink(f"warning: peer {peer} ({url.split('/fragments/')[0]}): {problem}; trying another provider")

    def close(self) -> None:
        super().close()
        self.node.stop()


def span_tensors(manifest: Manifest, spans: list[tuple[int, int]]) -> list[str]:
    """Tensors a node serving these block spans holds: the blocks, plus the embedding with block 0
    and the output norm and head (or the tied embedding) with the last block."""
    n_layers = 1 + max((t.layer for t in manifest.tensors if t.layer is not None), default=-1)
    names = set()
    for first, last in spans:
        names.update(t.name for t in manifest.layer_tensors(first, last))
        if first == 0:
            names.add("token_embd.weight")
        if last >= n_layers - 1:
            names.update({"output_norm.weight", "output.weight", "token_embd.weight"})
    known = set(manifest.tensor_names())
    return sorted(names & known)


def parse_spans(text: str) -> list[tuple[int, int]]:
    """'0-9,20-29' -> [(0, 9), (20, 29)]."""
    spans = []
    for part in text.split(","):
        try:
            first, last = (int(x) for x in part.split("-"))
        except ValueError:
            raise UserError(f"--layers {text!r}: expected spans like 0-14 or 0-9,20-29") from None
        if first > last or first < 0:
            raise UserError(f"--layers {text!r}: span {part} is empty or negative")
        spans.append((first, last))
    return spans


def serve_p2p(store, host: str, port: int, listen: str, bootstrap: list[str], layers: list[tuple[int, int]] | None,
              announce=print, seed: bytes | None = None) -> None:
    """`serve --p2p`: HTTP server for the held fragments plus a DHT node announcing them."""
    from pathlib import Path

    from distribution.server import make_app, start
    from fragmenter.manifest import FRAGMENTS_DIR, MANIFEST_NAME

    store = Path(store)
    manifest = Manifest.load(store)
    manifest_sha = hashlib.sha256((store / MANIFEST_NAME).read_bytes()).hexdigest()
    held = {f for f in manifest.unique_fragments() if (store / FRAGMENTS_DIR / f).is_file()}
    if layers is not None:
        held &= set(manifest.fragments_for(span_tensors(manifest, layers), header=True))
    if not held:
        raise UserError(f"{store}: holds none of the fragments to serve")

    node = P2PNode(listen, bootstrap).start()

    async def main():
        import signal

        app = make_app(store, only=held)
        runner, bound = await start(app, host, port)
        loop = asyncio.get_running_loop()
        url = f"http://{host}:{bound}/"
        await loop.run_in_executor(None, node.announce_http, url)
        await loop.run_in_executor(None, node.provide, [manifest_sha] + sorted(held))
        announce(f"serving {len(held)} of {len(manifest.unique_fragments())} fragments over {url} and the DHT")
        for addr in node.addrs:
            announce(f"p2p://{manifest_sha}@{addr}")
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        node.stop()
        announce("stopped")
