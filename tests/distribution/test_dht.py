"""The DHT node's API on 127.0.0.1: region keys, signed peer records, addresses, and peers that
cannot be reached named in one line."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from common.errors import NetworkError
from distribution import dht, peer_records
from distribution.dht import P2PNode, block_key, dht_key
from tests.conftest import assert_one_line_error, run_cli

SHA = "ab" * 32


def peer_id_of(seed: bytes) -> str:
    from libp2p.crypto.secp256k1 import create_new_key_pair
    from libp2p.peer.id import ID

    return ID.from_pubkey(create_new_key_pair(seed).public_key).pretty()


@pytest.fixture(scope="module")
def pair():
    with P2PNode() as a, P2PNode(bootstrap=a.reachable_addrs()) as b:
        yield a, b


def test_block_keys_are_distinct_multihashes():
    keys = {block_key(m, r) for m in (SHA, "cd" * 32) for r in ("header", "globals", "blk.0", "blk.1", "blk.10")}
    assert len(keys) == 10
    assert all(k.startswith("1220") and len(k) == 68 for k in keys)
    assert block_key(SHA, "blk.0") != dht_key(SHA)


def test_regions_are_found_per_manifest_and_region(pair):
    a, b = pair
    b.provide_regions(SHA, ["header", "blk.0"])
    found = a.find_region_providers(SHA, ["header", "blk.0", "blk.1"])
    assert found == {"header": [b.peer_id], "blk.0": [b.peer_id], "blk.1": []}
    assert a.find_region_providers("cd" * 32, ["blk.0"]) == {"blk.0": []}  # another store
    assert b.find_region_providers(SHA, ["blk.0"], thorough=True)["blk.0"] == [b.peer_id]


def test_peer_records_are_signed_and_the_newest_wins(pair):
    a, b = pair
    b.put_peer_record({"http": "http://127.0.0.1:1/", "swarm": {"span": [0, 9]}})
    got = a.get_peer_record(b.peer_id)
    assert got["http"] == "http://127.0.0.1:1/" and got["swarm"] == {"span": [0, 9]}
    assert got["peer"] == b.peer_id and got["addrs"] == b.reachable_addrs()
    b.put_peer_record({"http": "http://127.0.0.1:2/"})
    assert a.get_peer_record(b.peer_id)["http"] == "http://127.0.0.1:2/"
    assert a.get_peer_record(peer_id_of(b"n" * 32)) is None


def test_a_forged_record_is_refused(pair):
    a, b = pair
    key = peer_records.record_key(b.peer_id)
    real = peer_records.sign_record({"peer": b.peer_id, "seq": 5, "http": "http://good/"}, b._key_pair.private_key)
    forged = json.dumps({**json.loads(real), "http": "http://evil/", "seq": 6}).encode()
    other_key = peer_records.sign_record({"peer": b.peer_id, "seq": 7}, a._key_pair.private_key)
    assert peer_records.parse_record(key, real)["http"] == "http://good/"
    for bad in (forged, other_key, b"[1]", b"\xff", json.dumps({"peer": b.peer_id, "seq": 9}).encode()):
        with pytest.raises(peer_records.InvalidRecord):
            peer_records.parse_record(key, bad)
    assert peer_records.newest(key, [forged, real, other_key])["seq"] == 5
    with pytest.raises(Exception):  # the DHT itself refuses to store it
        a.call(a.dht.put_value, key, forged)


def test_loopback_listen_announces_itself(pair):
    a, _ = pair
    (addr,) = a.reachable_addrs()
    assert addr.startswith("/ip4/127.0.0.1/tcp/") and addr.endswith("/p2p/" + a.peer_id)
    assert not addr.startswith("/ip4/127.0.0.1/tcp/0/")


_HELD = []  # bound, never listening: a connection is refused, and no other process can take the port


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _HELD.append(s)
    return s.getsockname()[1]


class Quiet(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_unreachable_bootstrap_peers_are_named(pair, monkeypatch):
    a, _ = pair
    live = a.reachable_addrs()[0].rsplit("/p2p/", 1)[0]
    stranger = peer_id_of(b"s" * 32)
    silent = socket.socket()  # accepts (the kernel does) and never says a word
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    web = HTTPServer(("127.0.0.1", 0), Quiet)  # speaks, but HTTP, not libp2p
    threading.Thread(target=web.serve_forever, daemon=True).start()
    monkeypatch.setattr(dht, "CONNECT_TIMEOUT", 1.0)
    cases = {
        f"/ip4/127.0.0.1/tcp/{web.server_port}/p2p/{stranger}": "not that peer",
        f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{stranger}": "connection refused",
        f"{live}/p2p/{stranger}": "not that peer",
        f"/ip4/127.0.0.1/tcp/{silent.getsockname()[1]}/p2p/{stranger}": "no answer within 1 s",
    }
    try:
        for addr, why in cases.items():
            started = time.monotonic()
            with pytest.raises(NetworkError) as info:
                P2PNode(bootstrap=[addr], server=False).start()
            message = str(info.value)
            assert stranger in message and addr.split("/p2p/")[0] in message and why in message, message
            assert "\n" not in message and time.monotonic() - started < 10
    finally:
        silent.close()
        web.shutdown()


def test_one_reachable_bootstrap_peer_is_enough(pair):
    a, b = pair
    b.provide_regions(SHA, ["globals"])
    dead = f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{peer_id_of(b'd' * 32)}"
    with P2PNode(bootstrap=[dead] + a.reachable_addrs(), server=False) as c:
        assert len(c.unreachable) == 1 and "connection refused" in c.unreachable[0]
        assert c.find_region_providers(SHA, ["globals"])["globals"] == [b.peer_id]


def test_cli_names_the_unreachable_peer(tmp_path, default_store):
    stranger = peer_id_of(b"c" * 32)
    addr = f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{stranger}"
    for proc in (run_cli("infer", f"p2p://{SHA}@{addr}", "--prompt", "hi", timeout=60,
                         env={"GGUF_FRAGMENTS_CACHE": str(tmp_path / "c")}),
                 run_cli("fetch", f"p2p://{SHA}@{addr}", "-o", tmp_path / "out", timeout=60),
                 run_cli("serve", default_store, "--p2p", "--port", "0", "--bootstrap", f"p2p://{SHA}@{addr}",
                         timeout=60)):
        assert_one_line_error(proc, stranger, "connection refused")
        assert proc.returncode == 3
    for bad in ("/ip4/127.0.0.1/tcp/1/p2p/notapeer", "/ip4/127.0.0.1/tcp/1", "127.0.0.1:4001"):
        assert_one_line_error(run_cli("infer", f"p2p://{SHA}@{bad}", "--prompt", "hi"), bad)


def test_wildcard_listen_advertises_interfaces_and_confirmed_observations(monkeypatch):
    """What libp2p tells other peers (its addrs_factory), without opening a socket."""
    from multiaddr import Multiaddr

    from distribution import addresses

    monkeypatch.setattr(addresses, "interface_addresses", lambda: ["10.77.0.3", "127.0.0.1"])
    node = P2PNode("/ip4/0.0.0.0/tcp/4001")
    node.peer_id, node._bound = "16Uiu2HAmPLe7Mzm8TsYUubgCAW1aJoeFScxrLj8ppHFivPo97bUZ", ["/ip4/0.0.0.0/tcp/4001"]
    told = node._advertise([Multiaddr("/ip4/0.0.0.0/tcp/4001"), Multiaddr("/ip4/203.0.113.5/tcp/4001")])
    assert [str(a) for a in told] == ["/ip4/10.77.0.3/tcp/4001", "/ip4/203.0.113.5/tcp/4001"]
    assert node.reachable_addrs() == [f"{a}/p2p/{node.peer_id}" for a in map(str, told)]
    node.announce = addresses.Announce("example.org", 8443)
    assert node.reachable_addrs() == [f"/dns4/example.org/tcp/4001/p2p/{node.peer_id}"]


def test_serve_announce_replaces_the_addresses(default_store):
    from tests.distribution.netutil import serving

    # As behind a NAT forwarding 127.0.0.2:9999 to the HTTP port and the libp2p port unchanged.
    with serving(default_store, "--p2p", "--port", "0", "--listen", "/ip4/127.0.0.2/tcp/0",
                 "--announce", "127.0.0.2:9999", wait_for="p2p://") as s:
        assert any("over http://127.0.0.2:9999/ " in line for line in s.lines), s.lines
        addr = s.line("p2p://")
        assert "@/ip4/127.0.0.2/tcp/" in addr
        peer = addr.rsplit("/p2p/", 1)[1]
        with P2PNode(bootstrap=[addr.split("@", 1)[1]], server=False) as c:
            record = c.get_peer_record(peer)
    assert record["http"] == "http://127.0.0.2:9999/" and record["addrs"] == [addr.split("@", 1)[1]]


def test_a_provider_whose_http_cannot_be_reached_is_named(default_store, tmp_path):
    from tests.distribution.netutil import serving

    # It announces an HTTP address where nothing listens (127.0.0.3:1), as a misconfigured NAT would.
    with serving(default_store, "--p2p", "--port", "0", "--listen", "/ip4/127.0.0.3/tcp/0",
                 "--announce", "127.0.0.3:1", wait_for="p2p://") as s:
        address = s.line("p2p://")
        proc = run_cli("infer", address, "--prompt", "hi", timeout=120,
                       env={"GGUF_FRAGMENTS_CACHE": str(tmp_path / "c")})
    assert_one_line_error(proc, address.rsplit("/p2p/", 1)[1], "127.0.0.3:1")
    assert proc.returncode == 3


def test_a_listen_address_that_cannot_be_bound_is_named():
    from common.errors import UserError

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        for listen, why in ((f"/ip4/127.0.0.1/tcp/{taken.getsockname()[1]}", "Address already in use"),
                            ("garbage", "Invalid MultiAddr")):
            with pytest.raises(UserError, match="cannot listen on " + listen) as info:
                P2PNode(listen).start()
            assert why in str(info.value) and info.value.exit_code == 1
    finally:
        taken.close()
