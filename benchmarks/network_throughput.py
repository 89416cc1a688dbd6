"""Fetch the default model's store over loopback three ways, in one run, and print MB/s and ratios.

    .venv/bin/python benchmarks/network_throughput.py [STORE] [--repeat N]

  curl        every fragment from `serve`, 8 transfers in parallel (curl --parallel), to files
  http        the HTTP loader from the same `serve`, into an empty cache (8 parallel fetches)
  p2p         the P2P loader from three peers (one full, two holding half the blocks each),
              discovery included: manifest lookup, provider lookups, fetches, into an empty cache

Also counts the provider lookups of one P2P fetch (one per region, not per fragment) and measures
DHT operations per second (provide and find_providers) for docs/p2p-scale.md.
Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distribution.http import HTTPLoader  # noqa: E402
from distribution.local import LocalLoader  # noqa: E402
from distribution.dht import P2PNode  # noqa: E402
from distribution.p2p_loader import P2PLoader  # noqa: E402
from models.default import DEFAULT_STORE  # noqa: E402
from benchmarks.serve_process import serving  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def count_lookups(node: P2PNode, into: list) -> None:
    """Record every DHT key ``node`` looks providers up for."""
    find_keys = node.find_keys

    def counted(keys, thorough=False):
        into.extend(keys)
        return find_keys(keys, thorough)

    node.find_keys = counted


def dht_rates(n: int = 200) -> tuple[float, float]:
    """provide and find_providers per second between two nodes on loopback."""
    import hashlib

    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    with P2PNode() as a, P2PNode(bootstrap=a.reachable_addrs()) as b:
        provide_s = timed(lambda: b.provide(keys))
        find_s = timed(lambda: a.find_providers(keys))
    return n / provide_s, n / find_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", nargs="?", default=str(DEFAULT_STORE))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    store = Path(args.store)
    m = LocalLoader(store).manifest
    ids = list(m.unique_fragments())
    total = sum(m.unique_fragments().values()) + (store / "manifest.json").stat().st_size
    best = {"curl": float("inf"), "http": float("inf"), "p2p": float("inf")}

    with serving(store, "--port", "0") as server, \
            serving(store, "--p2p", "--port", "0", wait_for="p2p://") as full:
        boot = full.line("p2p://").split("@", 1)[1]
        with serving(store, "--p2p", "--port", "0", "--bootstrap", boot, "--layers", f"0-{m.model['block_count'] // 2}",
                     wait_for="p2p://"), \
                serving(store, "--p2p", "--port", "0", "--bootstrap", boot,
                        "--layers", f"{m.model['block_count'] // 2 + 1}-{m.model['block_count'] - 1}",
                        wait_for="p2p://"):
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory() as tmp:
                    urls = [server.url + "manifest.json"] + [f"{server.url}fragments/{f}" for f in ids]
                    cmd = ["curl", "-s", "--no-progress-meter", "--fail", "--parallel", "--parallel-max", "8"]
                    for i, url in enumerate(urls):
                        cmd += ["-o", f"{tmp}/{i}", url]
                    best["curl"] = min(best["curl"], timed(lambda: subprocess.run(cmd, check=True)))
                with tempfile.TemporaryDirectory() as tmp:
                    best["http"] = min(best["http"], timed(lambda: HTTPLoader(server.url, cache_dir=tmp).prefetch(ids)))
                with tempfile.TemporaryDirectory() as tmp:
                    def p2p_fetch():
                        loader = P2PLoader(full.line("p2p://"), cache_dir=tmp)
                        count_lookups(loader.node, looked_up)
                        try:
                            loader.prefetch(ids)
                        finally:
                            loader.close()
                    looked_up = []
                    best["p2p"] = min(best["p2p"], timed(p2p_fetch))

    mb = total / 1e6
    print(f"store: {store} ({mb:.1f} MB, {len(ids)} fragments), loopback, best of {args.repeat}")
    for name, seconds in best.items():
        print(f"{name:5s} {mb / seconds:8.0f} MB/s   {best['curl'] / seconds:5.2f}x curl   ({seconds:.2f} s)")
    print(f"provider lookups for the whole store: {len(looked_up)} DHT keys (one per region: header, blocks, "
          f"globals) for {len(ids)} fragments")
    provide, find = dht_rates()
    print(f"DHT on loopback: {provide:.0f} provides/s, {find:.0f} provider lookups/s (two nodes, 200 keys)")


if __name__ == "__main__":
    main()
