"""The P2P loader: a store's fragments from whichever peers hold them, found through the DHT.

Address: ``p2p://<manifest sha256>@<multiaddr of any peer>[,<multiaddr>...]``, for example
``p2p://8508...7407@/ip4/127.0.0.1/tcp/4001/p2p/16Uiu2HAm...``.

The loader joins the DHT (as a client) through the peers named, finds who provides the manifest,
and from then on works like the HTTP loader (which it is, pointed at a peer's HTTP server): the
manifest is pinned to the hash in the address, every fragment is verified, and a fragment whose
source fails is asked from another provider. Providers are looked up per region ("blk.N",
"header", "globals": one lookup per block, see distribution/spans.py), and per fragment only for
fragments no region holder covers (a peer announcing an incomplete block).
"""

from __future__ import annotations

import random
import sys

from tqdm import tqdm

from common.errors import NetworkError, StoreError, UserError
from distribution.addresses import parse_address, peer_fragment_base
from distribution.dht import P2PNode
from distribution.http import HTTPLoader
from distribution.spans import regions_of_fragments


class P2PLoader(HTTPLoader):
    """Fetches a store's fragments from whichever peers provide them, verified, with failover."""

    lookups_block = True  # fragment_urls walks the DHT on a retry: on a thread, within the deadline

    def __init__(self, address: str, cache_dir=None, concurrency: int = 8, attempts: int = 4, timeout: float | None = None,
                 progress: bool | None = None, listen: str = "/ip4/127.0.0.1/tcp/0", warn=None):
        digest, boots = parse_address(address)
        self.address = address
        self._urls: dict[str, str | None] = {}   # peer id -> HTTP base URL
        self._providers: dict[str, list[str]] = {}  # fragment id -> peer ids, for the fetch under way
        self._warn_sink = warn or (lambda line: tqdm.write(line, file=sys.stderr))  # above a progress bar
        self._warned: set[str] = set()  # peers already warned about
        self.node = P2PNode(listen, boots, server=False).start()
        try:
            self._open_from_a_provider(digest, cache_dir, concurrency, attempts, timeout, progress)
        except BaseException:
            self.node.stop()
            raise
        self.where = address
        self._regions = regions_of_fragments(self.manifest)

    def _open_from_a_provider(self, digest: str, *options) -> None:
        """Construct as the HTTP loader of the first provider whose manifest hashes to ``digest``."""
        peers = self.node.find_providers([digest])[digest]
        if not peers:
            raise StoreError(f"{self.address}: no peer provides the manifest {digest[:16]}...")
        last, cls = "none published its HTTP address", NetworkError
        for n, peer in enumerate(peers, 1):
            base = self._peer_url(peer)
            if base is None:
                continue
            try:
                super().__init__(f"{base}#{digest}", *options)
                return
            except UserError as e:  # unreachable, or a manifest that is not the one pinned
                last, cls = f"peer {peer}: {e}", (NetworkError if isinstance(e, NetworkError) else StoreError)
                if n < len(peers):
                    self._warn_sink(f"warning: {last}; trying another provider")
        raise cls(f"{self.address}: could not get the manifest from its {len(peers)} provider(s) ({last})")

    def _peer_url(self, peer: str) -> str | None:
        if peer not in self._urls:
            record = self.node.get_peer_record(peer)
            self._urls[peer] = peer_fragment_base(record.get("http")) if isinstance(record, dict) else None
        return self._urls[peer]

    def _lookup(self, fids: list[str], thorough: bool = False) -> dict[str, list[str]]:
        """fragment id -> provider peer ids: the holders of its region, else its own providers
        (``thorough``, after failures: both, walking the DHT, since region holders may be gone
        while a peer with a partial region still has the fragment)."""
        regions = sorted({r for f in fids for r in self._regions.get(f, [])})
        holders = self.node.find_region_providers(self.manifest_sha256, regions, thorough) if regions else {}
        found = {f: list(dict.fromkeys(p for r in self._regions.get(f, []) for p in holders[r])) for f in fids}
        lone = [f for f in fids if thorough or not found[f]]
        for f, peers in (self.node.find_providers(lone, thorough) if lone else {}).items():
            found[f] += [p for p in peers if p not in found[f]]
        return found

    def fragment_urls(self, fid: str, attempt: int = 0) -> list[str]:
        peers = self._providers.get(fid) or []
        if attempt > 0 or not peers:  # the providers we knew failed: walk the DHT for others
            fresh = self._lookup([fid], thorough=True)[fid]
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
        self._providers.update(self._lookup(missing))
        for peers in self._providers.values():
            for p in peers:
                self._peer_url(p)
        super().prefetch(missing)
        for fid in missing:  # the next lookup (a retry) asks the DHT afresh
            self._providers.pop(fid, None)

    def warn(self, url: str, problem: str) -> None:
        """Once per peer and run (a dead peer fails every fragment it holds: one line says it), above
        the progress bar; the fragments it failed are retried, from other providers when any."""
        peer = next((p for p, u in self._urls.items() if u and url.startswith(u)), "?")
        if peer in self._warned:
            return
        self._warned.add(peer)
        self._warn_sink(f"warning: peer {peer} ({url.split('/fragments/')[0]}): {problem}; its fragments are "
                        f"retried, from other providers when there are any")

    def close(self) -> None:
        super().close()
        self.node.stop()
