"""`node`: serve a span of blocks to the swarm (and its fragments to peers), announced in the DHT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading

from swarm.discovery import block_regions, node_record, ws_url
from swarm.server import NodeService, make_app

REPUBLISH_S = 30.0  # the peer record carries the free capacity: refreshed this often


def serve_node(service: NodeService, host: str, port: int, listen: str, bootstrap: list[str], public=None,
               store=None, say=print, pin: bool = True, lanes: bool = True, lane_port: int = 0) -> None:
    """Run the node until SIGINT/SIGTERM. With ``store`` (a store directory) the fragments of the
    span are served over HTTP on the same port, as `serve --p2p --layers` does.

    The calling thread is the compute thread (common.compute.adopt, with a JobLoop): it computes
    every step and reads the lanes (swarm/lane.py, on ``lane_port`` unless ``lanes`` is off); the
    WebSocket, the fragments and the DHT run on an asyncio loop in a second thread, which hands
    its computing over. With ``pin``, the compute thread keeps one CPU and the process's other
    threads the rest (common/affinity.py), from when the node is ready, and again at every
    republish for threads started since."""
    from common import compute
    from common.affinity import pin_compute_thread
    from common.aio_server import quiet_logs
    from distribution.addresses import http_url, multiaddr_host
    from distribution.dht import P2PNode
    from distribution.server import start

    jobs = compute.jobs()
    if jobs is None or not compute.on_compute_thread():
        raise RuntimeError("serve_node runs on the compute thread, adopted with a JobLoop (cli/node.py)")
    # malformed requests, failed accepts, lanes refused or cut, a compute-loop callback's bug: one
    # rate-limited line each
    quiet_logs(prefix="node", also=("swarm.lane", "common.jobloop"))
    log_sessions()
    model = service.model
    first, last = model.first_layer, model.last_layer
    toward = [h for h in map(multiaddr_host, bootstrap) if h]
    app, held = _fragment_app(store, first, last)
    p2p, ready, failure = None, False, []
    stopping = threading.Event()   # a signal came
    control: dict = {}             # the loop and its stop event, once they exist
    # Until the node is ready a signal interrupts the main thread as in any command (KeyboardInterrupt,
    # Terminated: "interrupted", "terminated"); from then on it stops the loop, which says "stopped".

    async def main():
        nonlocal p2p
        loop = asyncio.get_running_loop()
        control["loop"], control["stop"] = loop, asyncio.Event()
        if stopping.is_set():
            control["stop"].set()
        runner, bound = await start(make_app(service, app), host, port, node_limits(service))  # bind first
        try:
            p2p = P2PNode(listen, bootstrap, announce=public).start()
            await announce_and_wait(loop, runner, bound)
        finally:
            await runner.cleanup()

    async def announce_and_wait(loop, runner, bound):
        nonlocal ready
        stop = control["stop"]
        if stop.is_set():  # (a signal while starting: nothing announced, nothing said)
            return
        url = ws_url(host, bound, public, toward)
        record = {"swarm": node_record(service, url)}
        if held:
            record["http"] = http_url(host, bound, public, toward)
        await loop.run_in_executor(None, p2p.put_peer_record, record)
        await loop.run_in_executor(None, _provide, p2p, service.manifest_sha, store, held, first, last)
        if stop.is_set():
            return
        lane = f", lanes on port {service.lane_server.port}" if service.lane_server else ""
        say(f"node: blocks {first}-{last} on {url} ({service.ms_per_token:.2f} ms/token, "
            f"{service.limits.max_sessions} sessions, {service.limits.max_cache_bytes / 2**20:.0f} MiB of cache"
            + (f", {len(held)} fragments served" if held else "") + lane + ")")
        if pin:  # after the DHT's and the executor's threads started: they go elsewhere
            await loop.run_in_executor(None, compute.run, pin_compute_thread)
        for addr in p2p.reachable_addrs():
            say(f"p2p://{service.manifest_sha}@{addr}")
        if store is None:  # a .gguf file: no manifest or fragments for a client to load its edges from
            say(f"note: a .gguf file is not a fragment store, so a client cannot start from the address above "
                f"(it finds no manifest); reach this node with `chat` or `api --distributed --node {url}`, "
                f"or `fragment` the file and start the node from the store to join a swarm")
        await loop.run_in_executor(None, compute.run, take_signals)  # (the main thread's to set)
        ready = True  # (from here a signal stops it cleanly, with "stopped"; before, it interrupts)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), REPUBLISH_S)
            except asyncio.TimeoutError:
                await loop.run_in_executor(None, compute.run, service.remeasure_if_idle)
                record["swarm"] = node_record(service, url)
                await loop.run_in_executor(None, p2p.put_peer_record, record)
                if pin:
                    await loop.run_in_executor(None, compute.run, pin_compute_thread)

    def serve_loop():
        try:
            asyncio.run(main())
        except BaseException as e:  # (raised again on the compute thread, the caller's)
            failure.append(e)
        finally:
            jobs.stop()

    def on_signal(signum, frame):
        stopping.set()
        loop = control.get("loop")
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(control["stop"].set)
            except RuntimeError:  # (closed meanwhile: it is stopping anyway)
                pass

    previous: dict = {}

    def take_signals():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)

    thread = threading.Thread(target=serve_loop, name="node-loop", daemon=True)  # (a DHT call that hangs
    # past the join below must not hold the process at exit)
    try:
        if lanes:
            service.open_lanes(host, lane_port)
        thread.start()
        jobs.run()  # every step of every session, until the loop's thread ends
    finally:
        if thread.is_alive():  # (the compute loop failed: end the other side too)
            on_signal(None, None)
            thread.join(30)
        if service.lane_server is not None:
            service.lane_server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if p2p is not None:
            p2p.stop()
        if ready:  # (a node stopped while starting says only why: the error, or "interrupted")
            say("stopped")
    if failure:
        raise failure[0]


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
