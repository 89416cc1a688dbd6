"""A libp2p host with a Kademlia DHT (py-libp2p), run in its own thread: how peers find each other.

The DHT holds three kinds of entries, all written and read through ``P2PNode``:

  provider records  "peer P holds X", where X is a content hash (the manifest, a single fragment)
                    or a *region* of one store: ``block_key(manifest sha256, region)`` with region
                    "header", "blk.N" or "globals" (distribution/spans.py). One lookup per block
                    instead of one per fragment: the plan of docs/p2p-scale.md.
  peer records      a small JSON object per peer, signed by it, under ``/gguf-peer/<peer id>``
                    (distribution/peer_records.py): its HTTP address for fragments ("http"), the
                    multiaddrs it can be dialled at ("addrs"), and whatever else a kind of peer
                    publishes (a swarm node adds "swarm").
  routing           the usual Kademlia tables, which the two above ride on.

Bytes never travel over libp2p (one py-libp2p stream moved 71 MB/s on loopback, HTTP over
1 GB/s); the DHT only says who holds what and where to ask.

libp2p runs on trio; the node keeps it in a background thread with its own trio loop, and every
public method is a blocking call from the caller's thread, so the loaders stay synchronous.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import sys
import threading
import time
from typing import Callable

from common.errors import NetworkError, UserError
from distribution import peer_records
from distribution.addresses import Announce, host_protocol, multiaddr_host, reachable_hosts

LOOKUP_TIMEOUT = 10.0   # seconds for one DHT lookup
CONNECT_TIMEOUT = 10.0  # seconds to reach one bootstrap peer
DHT_PARALLEL = 8        # DHT operations in flight: py-libp2p fails to open streams beyond a few more
DIAL_FALLBACK_DELAY = 0.02


def dht_key(sha256_hex: str) -> str:
    """A content id as the DHT wants it: a sha2-256 multihash in hex."""
    return "1220" + sha256_hex


def block_key(manifest_sha: str, region: str) -> str:
    """The DHT key under which holders of one region of one store are announced.

    ``manifest_sha`` is the SHA-256 (hex) of the store's manifest.json, ``region`` is "header",
    "blk.N" (block N) or "globals". The key is a sha2-256 multihash (hex) of
    ``"<manifest_sha>/<region>"``, so it is spread over the DHT like any content id and cannot
    collide with a fragment's key."""
    return dht_key(hashlib.sha256(f"{manifest_sha}/{region}".encode()).hexdigest())


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


def _causes(e: BaseException, depth: int = 0):
    """``e`` and everything it wraps: causes, contexts and the members of libp2p's MultiError."""
    if e is None or depth > 8:
        return
    yield e
    for inner in [e.__cause__, e.__context__, *(getattr(e, "errors", None) or []),
                  *(getattr(e, "exceptions", None) or [])]:
        if isinstance(inner, BaseException):
            yield from _causes(inner, depth + 1)


def _why(e: BaseException) -> str:
    """The reason a dial failed, in a few words (libp2p wraps the cause two or three times)."""
    causes = list(_causes(e))
    for c in causes:
        if isinstance(c, ConnectionRefusedError):
            return "connection refused"
        if isinstance(c, OSError) and c.strerror:
            return c.strerror.lower()
    text = " ".join(str(c) for c in causes)
    if "upgrade security" in text or "handshake" in text:
        return "something answers there, but not that peer: the security handshake failed"
    if "fail to open connection" in text:
        return "no connection could be opened: refused, or nothing listens there"
    leaves = [c for c in causes if not getattr(c, "exceptions", None)]  # not a group of others
    first = str(leaves[0] if leaves else e) or type(e).__name__
    return first.splitlines()[0][:200]


class P2PNode:
    """A libp2p host with a Kademlia DHT, running in its own thread.

    ``P2PNode(listen, bootstrap)`` makes it; ``start()`` (or ``with``) listens, joins the DHT
    through the bootstrap peers and returns once ready; ``stop()`` leaves. Every other method is
    a blocking call that may be made from any thread (the node serializes nothing: calls run
    concurrently in its trio loop).

    listen     multiaddr to listen on, e.g. "/ip4/127.0.0.1/tcp/0" (0: any free port) or
               "/ip4/0.0.0.0/tcp/4001" (every interface; the node then announces its interface
               addresses, see ``reachable_addrs``).
    bootstrap  multiaddrs ending in /p2p/<peer id> (``addresses.parse_bootstrap`` turns what a
               user types into these). start() raises NetworkError naming the peers if none of
               them can be reached.
    server     True: answer other peers' DHT queries (peers that hold something); False: only
               ask (clients, which leave soon and should not linger in routing tables).
    announce   ``addresses.Announce`` from --announce HOST[:PORT]: advertise HOST instead of the
               interface addresses (a host behind NAT or a proxy).
    seed       32 bytes fixing the peer's key, hence its peer id (random by default).
    """

    def __init__(self, listen: str = "/ip4/127.0.0.1/tcp/0", bootstrap: list[str] | None = None,
                 seed: bytes | None = None, server: bool = True, announce: Announce | None = None):
        self.listen = listen
        # A peer that serves answers DHT queries; a client only asks, so that when it leaves it
        # does not linger in the others' routing tables and slow their lookups.
        self.server = server
        self.bootstrap = list(bootstrap or [])
        self.announce = announce
        self.seed = seed or secrets.token_bytes(32)
        self.peer_id = ""             #: this peer's id (base58, "16Uiu2HAm..."), set by start()
        self.unreachable: list[str] = []  #: one line per bootstrap peer that could not be reached
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="p2p-node", daemon=True)
        self._token = None
        self._stop = None
        self._bound: list[str] = []   # what the transport listens on, e.g. /ip4/0.0.0.0/tcp/4001
        self._observed: list[str] = []  # our hosts as identify saw them confirmed by other peers
        self._record: dict | None = None

    # -- life cycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0 + CONNECT_TIMEOUT) -> "P2PNode":
        """Listen, join the DHT through the bootstrap peers; returns once ready."""
        _check_port_free(self.listen)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise NetworkError(f"p2p: the libp2p host did not start within {timeout:.0f} s")
        if self._error is not None:
            raise UserError(f"p2p: cannot listen on {self.listen} ({_why(self._error)})")
        if self.bootstrap and len(self.unreachable) == len(self.bootstrap):
            self.stop()
            raise NetworkError("p2p: " + "; ".join(self.unreachable))
        return self

    def stop(self) -> None:
        """Leave the DHT and stop the host's thread (idempotent)."""
        if self._token is not None and self._thread.is_alive():
            import trio

            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except (RuntimeError, trio.RunFinishedError):
                pass
        if self._thread.is_alive():
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
        # What the host tells other peers (identify, provider records) is what they can dial,
        # not the wildcard it listens on: to another host 0.0.0.0 and 127.0.0.1 are itself.
        self._key_pair = create_new_key_pair(self.seed)
        host = new_host(key_pair=self._key_pair, addrs_factory=self._advertise)
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with host.run(listen_addrs=[Multiaddr(self.listen)]):
            self.host = host
            self.peer_id = host.get_id().pretty()
            self._bound = [str(a) for a in host.get_transport_addrs()]
            if not self._bound:  # py-libp2p logs a failed bind (port in use, not our address) and goes on
                raise OSError("nothing bound: the port is in use or the address is not this host's")
            self.dht = KadDHT(host, DHTMode.SERVER if self.server else DHTMode.CLIENT)
            self.dht.register_validator(peer_records.NAMESPACE, peer_records.validator())
            async with background_trio_service(self.dht):
                async with trio.open_nursery() as nursery:
                    for addr in self.bootstrap:
                        nursery.start_soon(self._connect_bounded, addr)
                self._ready.set()
                await self._stop.wait()

    def _advertise(self, candidates) -> list:
        """libp2p's addrs_factory: the transport's listen addresses, plus those identify has seen
        confirmed by several peers (a NAT's public side), in -> the addresses to advertise."""
        from multiaddr import Multiaddr

        bound = set(self._bound)
        seen = [multiaddr_host(str(a)) for a in candidates if str(a).split("/p2p/")[0] not in bound]
        self._observed = [h for h in seen if h]
        return [Multiaddr(a) for a in self._dialable()]

    async def _connect_bounded(self, addr: str) -> None:
        import trio

        peer = addr.rsplit("/p2p/", 1)[-1]
        where = addr.split("/p2p/")[0]
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await self._connect(addr)
        except trio.TooSlowError:
            self.unreachable.append(f"cannot reach peer {peer} at {where} (no answer within {CONNECT_TIMEOUT:.0f} s)")
        except Exception as e:  # refused, unroutable, another peer id answering...
            self.unreachable.append(f"cannot reach peer {peer} at {where} ({_why(e)})")

    async def _connect(self, addr: str) -> None:
        from libp2p.peer.peerinfo import info_from_p2p_addr
        from multiaddr import Multiaddr

        info = info_from_p2p_addr(Multiaddr(addr))
        await self.host.connect(info)
        await self.dht.routing_table.add_peer(info.peer_id)
        self._known.append(info.peer_id)

    # -- addresses --------------------------------------------------------------------------------
    def reachable_addrs(self) -> list[str]:
        """Multiaddrs, ending in /p2p/<peer id>, at which other hosts can dial this node.

        A specific listen address is returned as it is. Behind a wildcard listen (0.0.0.0): one
        per interface address, those on the routes to the bootstrap peers first, then addresses
        libp2p's identify saw confirmed by several peers; loopback only if the host has nothing
        else. With ``announce``, its host instead (and the listen port: a NAT or proxy must
        forward the libp2p port unchanged; its PORT is the HTTP server's)."""
        return [f"{a}/p2p/{self.peer_id}" for a in self._dialable()]

    def _dialable(self) -> list[str]:
        toward = [h for h in map(multiaddr_host, self.bootstrap) if h]
        out = []
        for bound in self._bound:
            parts = bound.split("/")  # ['', 'ip4', HOST, 'tcp', PORT]
            if len(parts) < 5:
                continue
            hosts = [self.announce.host] if self.announce else reachable_hosts(parts[2], toward, self._observed)
            for h in hosts:
                out.append(f"/{host_protocol(h)}/{h}/{parts[3]}/{parts[4]}")  # (--announce was checked)
        return list(dict.fromkeys(out))

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
            raise NetworkError(f"p2p: a DHT operation took longer than {timeout:.0f} s") from None

    # -- provider records -------------------------------------------------------------------------
    def provide(self, hashes: list[str]) -> None:
        """Announce that this node holds the content with these SHA-256s (manifest, fragments)."""
        self.provide_keys([dht_key(h) for h in hashes])

    def provide_regions(self, manifest_sha: str, regions: list[str]) -> None:
        """Announce that this node holds every fragment of these regions ("header", "blk.N",
        "globals"; see distribution/spans.py) of the store whose manifest hashes to ``manifest_sha``."""
        self.provide_keys([block_key(manifest_sha, r) for r in regions])

    def provide_keys(self, keys: list[str]) -> None:
        """Add a provider record for each DHT key (hex multihash), a few in flight at a time."""
        async def one(key):
            async with self._limit:
                await self.dht.provide(key)

        async def run():
            import trio

            async with trio.open_nursery() as nursery:
                for key in keys:
                    nursery.start_soon(one, key)

        self.call(run, timeout=60 + len(keys))  # a provide takes ~25 ms on loopback

    def find_providers(self, hashes: list[str], thorough: bool = False) -> dict[str, list[str]]:
        """content SHA-256 -> peer ids that announced it (see ``find_keys``)."""
        found = self.find_keys([dht_key(h) for h in hashes], thorough)
        return {h: found[dht_key(h)] for h in hashes}

    def find_region_providers(self, manifest_sha: str, regions: list[str],
                              thorough: bool = False) -> dict[str, list[str]]:
        """region -> peer ids that announced holding all of it, for the store whose manifest
        hashes to ``manifest_sha``; regions nobody announced map to []. Lookups run concurrently,
        each bounded by LOOKUP_TIMEOUT; ``thorough`` as in ``find_keys``."""
        keys = {r: block_key(manifest_sha, r) for r in regions}
        found = self.find_keys(list(keys.values()), thorough)
        return {r: found[k] for r, k in keys.items()}

    def find_keys(self, keys: list[str], thorough: bool = False) -> dict[str, list[str]]:
        """DHT key -> provider peer ids, looked up concurrently. First one round trip to each peer
        we are connected to; if none knows, py-libp2p's iterative walk. ``thorough`` walks the DHT
        at once (used when the providers we knew have all failed)."""
        from libp2p.kad_dht.kad_dht import _encode_key

        found: dict[str, list[str]] = {}

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

        async def one(key):
            import trio

            async with self._limit:
                with trio.move_on_after(LOOKUP_TIMEOUT):
                    found[key] = [] if thorough else await ask_known(_encode_key(key))
                    if not found[key]:
                        infos = await self.dht.find_providers(key, 20)
                        found[key] = [i.peer_id.pretty() for i in infos]

        async def run():
            import trio

            async with trio.open_nursery() as nursery:
                for key in keys:
                    found[key] = []
                    nursery.start_soon(one, key)

        self.call(run, timeout=LOOKUP_TIMEOUT * (1 + len(keys) // DHT_PARALLEL) + 30)
        return found

    # -- peer records -----------------------------------------------------------------------------
    def put_peer_record(self, record: dict) -> None:
        """Publish this peer's record, a JSON object, under ``/gguf-peer/<peer id>``.

        ``record`` holds what this peer offers, e.g. ``{"http": "http://10.0.0.5:8001/"}`` for a
        fragment server, plus ``"swarm": {...}`` for a node. The node adds "peer" (its id),
        "addrs" (``reachable_addrs()``), "seq" (a nanosecond timestamp: publishing again replaces
        the record; readers keep the highest seq) and "sig" (its signature with this peer's key,
        so nobody else can publish for it). Keep it small (well under 10 KB)."""
        value = {**record, "peer": self.peer_id, "addrs": self.reachable_addrs(), "seq": time.time_ns()}
        self._record = value
        signed = peer_records.sign_record(value, self._key_pair.private_key)
        self.call(self.dht.put_value, peer_records.record_key(self.peer_id), signed)

    def get_peer_record(self, peer_id: str) -> dict | None:
        """The newest valid record ``peer_id`` published (a dict with at least "peer", "addrs",
        "seq" and what the peer put in it), or None if none is found within LOOKUP_TIMEOUT.
        Asks the peers we are connected to first (one round trip each), then walks the DHT.
        Values that are not JSON objects signed by ``peer_id`` are ignored."""
        if peer_id == self.peer_id and self._record is not None:
            return dict(self._record)
        key = peer_records.record_key(peer_id)

        async def get():
            import trio

            values = []
            with trio.move_on_after(LOOKUP_TIMEOUT):
                for peer in self._known:  # as for providers: the peers we know first, then the network
                    try:  # private API of the pinned libp2p 0.8.1
                        values.append(await self.dht.value_store._get_from_peer(peer, key.encode()))
                    except Exception:
                        continue
                if peer_records.newest(key, [v for v in values if v]) is None:
                    values.append(await self.dht.get_value(key))
            return peer_records.newest(key, [v for v in values if v])

        record = self.call(get, timeout=LOOKUP_TIMEOUT + 5)
        if record is not None:
            record.pop("sig", None)
        return record


def _check_port_free(listen: str) -> None:
    """py-libp2p listens with SO_REUSEPORT, so a port another node already listens on is taken
    again silently and the kernel splits the connections between the two. A plain bind first
    (no SO_REUSEPORT) fails as `--port` does."""
    import socket

    parts = listen.split("/")  # ['', 'ip4', HOST, 'tcp', PORT]
    if len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp" or parts[4] in ("", "0"):
        return
    family = socket.AF_INET6 if parts[1] == "ip6" else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR: a port left in TIME_WAIT by a node just stopped is free; a listener is not
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((parts[2], int(parts[4])))
    except (OSError, ValueError) as e:
        raise UserError(f"p2p: cannot listen on {listen} ({getattr(e, 'strerror', None) or e})") from None
