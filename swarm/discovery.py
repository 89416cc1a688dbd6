"""How nodes find each other's spans in the DHT.

A node provides the region keys ``blk.A`` .. ``blk.B`` of its manifest (the same per-block keys
fragment peers use, distribution/dht.py ``block_key``) and publishes its peer record with a
``"swarm"`` entry: its activation address, span, free capacity and measured ms per token. A
client looks up the providers of every block, reads their records, and keeps the nodes serving
its manifest; the route planner then asks each node directly (INFO) for its current state.
"""

from __future__ import annotations

from swarm.wire import is_node_url


def ws_url(host: str, port: int, public=None, toward: list[str] = ()) -> str:
    """The activation address others reach a node bound to host:port at (never a wildcard)."""
    from distribution.addresses import http_url
    from swarm.wire import WS_PATH

    return "ws://" + http_url(host, port, public, toward)[len("http://"):].rstrip("/") + WS_PATH


def node_record(service, url: str) -> dict:
    info = service.info()
    return {"manifest": info["manifest"], "ws": url, "first_block": info["first_block"],
            "last_block": info["last_block"], "free_sessions": info["free_sessions"],
            "free_cache_mb": info["free_cache_mb"], "ms_per_token": info["ms_per_token"],
            "private": info["private"]}


def block_regions(first: int, last: int) -> list[str]:
    return [f"blk.{i}" for i in range(first, last + 1)]


def dht_finder(p2p, manifest_sha: str, n_layers: int):
    """A callable returning the WebSocket URLs of the nodes announcing blocks of this manifest."""
    records: dict[str, dict | None] = {}

    def find() -> list[str]:
        found = p2p.find_region_providers(manifest_sha, block_regions(0, n_layers - 1))
        urls = []
        for peer in dict.fromkeys(p for peers in found.values() for p in peers):
            record = p2p.get_peer_record(peer)  # fresh each time: the capacity changes
            swarm = (record or {}).get("swarm")
            if isinstance(swarm, dict) and swarm.get("manifest") == manifest_sha and is_node_url(swarm.get("ws")):
                records[peer] = swarm
                urls.append(swarm["ws"])
        return urls

    return find
