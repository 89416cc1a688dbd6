"""`node`: serve a span of blocks to the swarm (and its fragments to peers), announced in the DHT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from swarm.discovery import block_regions, node_record, ws_url
from swarm.server import NodeService, make_app

REPUBLISH_S = 30.0  # the peer record carries the free capacity: refreshed this often


def serve_node(service: NodeService, host: str, port: int, listen: str, bootstrap: list[str], public=None,
               store=None, say=print, pin: bool = True) -> None:
    """Run the node until SIGINT/SIGTERM. With ``store`` (a store directory) the fragments of the
    span are served over HTTP on the same port, as `serve --p2p --layers` does. With ``pin``, the
    calling thread (which computes, common.compute.adopt) keeps one CPU and the process's other
    threads the rest (common/affinity.py), from when the node is ready, and again at every
    republish for threads started since."""
    from common.affinity import pin_compute_thread
    from common.aio_server import quiet_logs
    from distribution.addresses import http_url, multiaddr_host
    from distribution.dht import P2PNode
    from distribution.server import start

    quiet_logs(prefix="node")  # malformed requests and failed accepts: one rate-limited line each
    log_sessions()
    model = service.model
    first, last = model.first_layer, model.last_layer
    toward = [h for h in map(multiaddr_host, bootstrap) if h]
    app, held = _fragment_app(store, first, last)
    p2p, ready = None, False

    async def main():
        nonlocal p2p
        loop = asyncio.get_running_loop()
        runner, bound = await start(make_app(service, app), host, port, node_limits(service))  # bind first
        try:
            p2p = P2PNode(listen, bootstrap, announce=public).start()
            await announce_and_wait(loop, runner, bound)
        finally:
            await runner.cleanup()

    async def announce_and_wait(loop, runner, bound):
        nonlocal ready
        url = ws_url(host, bound, public, toward)
        record = {"swarm": node_record(service, url)}
        if held:
            record["http"] = http_url(host, bound, public, toward)
        await loop.run_in_executor(None, p2p.put_peer_record, record)
        await loop.run_in_executor(None, _provide, p2p, service.manifest_sha, store, held, first, last)
        say(f"node: blocks {first}-{last} on {url} ({service.ms_per_token:.2f} ms/token, "
            f"{service.limits.max_sessions} sessions, {service.limits.max_cache_bytes / 2**20:.0f} MiB of cache"
            + (f", {len(held)} fragments served" if held else "") + ")")
        if pin:
            pin_compute_thread()  # after the DHT's and the executor's threads started: they go elsewhere
        for addr in p2p.reachable_addrs():
            say(f"p2p://{service.manifest_sha}@{addr}")
        if store is None:  # a .gguf file: no manifest or fragments for a client to load its edges from
            say(f"note: a .gguf file is not a fragment store, so a client cannot start from the address above "
                f"(it finds no manifest); reach this node with `chat` or `api --distributed --node {url}`, "
                f"or `fragment` the file and start the node from the store to join a swarm")
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        ready = True  # (from here a signal stops it cleanly, with "stopped")
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), REPUBLISH_S)
            except asyncio.TimeoutError:
                service.remeasure_if_idle()  # (on the compute thread: a node process's main thread)
                record["swarm"] = node_record(service, url)
                await loop.run_in_executor(None, p2p.put_peer_record, record)
                if pin:
                    pin_compute_thread()

    try:
        asyncio.run(main())
    finally:
        if p2p is not None:
            p2p.stop()
        if ready:  # (a node stopped while starting says only why: the error, or "interrupted")
            say("stopped")


def log_sessions(stream=None) -> None:
    """A line on stderr per session opened and closed (swarm/memory.py), with the time: who uses
    the node, and for how long, without a line per token."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("node: %(asctime)s %(message)s", "%H:%M:%S"))
    sessions = logging.getLogger("swarm.sessions")
    sessions.handlers[:] = [handler]
    sessions.setLevel(logging.INFO)
    sessions.propagate = False


def node_limits(service: NodeService):
    """The HTTP server's limits for a node: aiohttp's defaults (keep-alive, body and connection cap
    from common/aio_server.py), the connections capped at a few per session slot. The bytes of
    frames being received are bounded separately, node-wide (--max-inflight-mb, swarm/inflight.py)."""
    from common.aio_server import Limits

    return Limits(max_connections=max(64, 8 * service.limits.max_sessions))


def _fragment_app(store, first: int, last: int):
    """The fragment server for the span's fragments held in ``store`` (or none)."""
    if store is None:
        return None, set()
    from pathlib import Path

    from distribution.server import held_fragments
    from distribution.server import make_app as fragment_app
    from fragmenter.manifest import Manifest

    store = Path(store)
    held = held_fragments(store, Manifest.load(store), [(first, last)])
    return (fragment_app(store, only=held), held) if held else (None, set())


def store_of(loader, source: str, scratch) -> str | None:
    """A store directory holding what ``loader`` has: SOURCE itself when it is one; for http:// and
    p2p:// sources, a view in ``scratch`` of the fragment cache (manifest.json and links to the
    cached fragments), so that a node fetched from peers serves its span to others in turn."""
    import os
    from pathlib import Path

    if os.path.isdir(source):
        return source
    cache = getattr(getattr(loader, "fetcher", None), "cache", None)
    raw = getattr(loader, "manifest_bytes", None)
    if cache is None or raw is None:
        return None  # a .gguf file: nothing to share as fragments
    from fragmenter.manifest import FRAGMENTS_DIR, MANIFEST_NAME

    view = Path(scratch)
    (view / FRAGMENTS_DIR).mkdir(parents=True, exist_ok=True)
    (view / MANIFEST_NAME).write_bytes(raw)
    for fid, size in loader.manifest.unique_fragments().items():
        if cache.has(fid, size):
            (view / FRAGMENTS_DIR / fid).symlink_to(cache.path(fid))
    return str(view)


def _provide(p2p, manifest_sha: str, store, held: set, first: int, last: int) -> None:
    if held:
        from distribution.p2p_server import announce_fragments
        from fragmenter.manifest import Manifest

        announce_fragments(p2p, Manifest.load(store), manifest_sha, held)
    p2p.provide_regions(manifest_sha, block_regions(first, last))
