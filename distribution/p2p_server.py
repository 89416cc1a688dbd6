"""`serve --p2p`: an HTTP server for the fragments held, plus a DHT node announcing them."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from common.errors import UserError
from distribution.addresses import Announce, http_url, multiaddr_host
from distribution.dht import P2PNode
from distribution.server import held_fragments
from distribution.spans import complete_regions
from fragmenter.manifest import FRAGMENTS_DIR, MANIFEST_NAME, Manifest


def announce_fragments(node: P2PNode, manifest: Manifest, manifest_sha: str, held: set[str]) -> None:
    """Provider records: the manifest, one per complete region, one per fragment of the others."""
    regions, loose = complete_regions(manifest, held)
    node.provide([manifest_sha] + loose)
    node.provide_regions(manifest_sha, regions)


def serve_p2p(store, host: str, port: int, listen: str, bootstrap: list[str], layers: list[tuple[int, int]] | None,
              announce=print, seed: bytes | None = None, public: Announce | None = None) -> None:
    """Serve STORE's fragments over HTTP on host:port and announce them in the DHT until SIGINT/SIGTERM.

    ``public`` (--announce) is the host (and HTTP port) others reach us at; without it a wildcard
    ``host`` is announced as this machine's interface addresses. ``announce`` hears the lines
    the user sees, ending with the peer's address(es) ``p2p://<manifest sha256>@<multiaddr>``."""
    from common.aio_server import check_port
    from distribution.server import make_app, quiet_logs, start

    quiet_logs()  # a malformed request is one log line, as with plain `serve`
    store = Path(store)
    manifest = Manifest.load(store)
    manifest_sha = hashlib.sha256((store / MANIFEST_NAME).read_bytes()).hexdigest()
    held = held_fragments(store, manifest, layers)
    if not held:
        raise UserError(f"{store}: holds none of the fragments to serve")

    check_port(host, port)  # before the DHT is joined
    node, ready = P2PNode(listen, bootstrap, seed=seed, announce=public).start(), False

    async def main():
        import signal

        nonlocal ready

        app = make_app(store, only=held)
        runner, bound = await start(app, host, port)
        loop = asyncio.get_running_loop()
        url = http_url(host, bound, public, toward=[h for h in map(multiaddr_host, bootstrap) if h])
        await loop.run_in_executor(None, node.put_peer_record, {"http": url})
        await loop.run_in_executor(None, announce_fragments, node, manifest, manifest_sha, held)
        announce(f"serving {len(held)} of {len(manifest.unique_fragments())} fragments over {url} and the DHT")
        for addr in node.reachable_addrs():
            announce(f"p2p://{manifest_sha}@{addr}")
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        ready = True  # (from here a signal stops it cleanly, with "stopped")
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        node.stop()
        if ready:  # (one stopped while starting says only why)
            announce("stopped")
