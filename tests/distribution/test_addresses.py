"""What users type (--bootstrap, --announce, p2p:// addresses) and which addresses a peer announces
behind a wildcard listen (never 0.0.0.0, loopback only when nothing else exists)."""

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from common.errors import UserError
from distribution import addresses
from distribution.addresses import (Announce, host_protocol, http_url, parse_address, parse_announce,
                                    parse_bootstrap, reachable_hosts)

SHA = "ab" * 32
PEER = "16Uiu2HAmPLe7Mzm8TsYUubgCAW1aJoeFScxrLj8ppHFivPo97bUZ"
MADDR = f"/ip4/10.77.0.1/tcp/4001/p2p/{PEER}"


def test_bootstrap_takes_the_whole_address_or_the_bare_multiaddr():
    assert parse_bootstrap([f"p2p://{SHA}@{MADDR}"]) == [MADDR]
    assert parse_bootstrap([MADDR]) == [MADDR]
    other = MADDR.replace("10.77.0.1", "10.77.0.2")
    assert parse_bootstrap([f"p2p://{SHA}@{MADDR},{other}", MADDR]) == [MADDR, other]
    for bad in ("10.77.0.1:4001", "/ip4/10.77.0.1/tcp/4001", "/ip4/10.77.0.1/tcp/4001/p2p/xyz",
                f"p2p://{SHA}@", "p2p://nothex@" + MADDR):
        with pytest.raises(UserError, match="bootstrap|multiaddr|SHA-256|P2P address"):
            parse_bootstrap([bad])
    assert parse_address(f"p2p://{SHA}@{MADDR}") == (SHA, [MADDR])


def test_announce():
    assert parse_announce("example.org") == Announce("example.org")
    assert parse_announce("203.0.113.7:8443") == Announce("203.0.113.7", 8443)
    assert parse_announce("[2001:db8::1]:80") == Announce("2001:db8::1", 80)
    assert parse_announce(None) is None
    for bad in ("0.0.0.0", "host:0", "host:http", ":80", "host:70000", "::::", "999.1.1.1", "1.2.3:80", "exa mple",
                "a/b", "-host", "host-", "host_name"):
        with pytest.raises(UserError, match="--announce"):
            parse_announce(bad)


@given(st.one_of(st.text(max_size=40), st.from_regex(r"[a-z0-9.:\-\[\]]{1,30}", fullmatch=True)))
@example("my-host.example:8000")
@example("[fe80::1]:80")
def test_an_accepted_announce_makes_a_multiaddr_libp2p_takes(text):
    """Whatever --announce accepts, the node can put in the multiaddrs it announces (a host such as
    '::::' was accepted and then failed as the node started, with a traceback)."""
    from multiaddr import Multiaddr

    try:
        announce = parse_announce(text)
    except UserError:
        return
    if announce is not None:
        Multiaddr(f"/{host_protocol(announce.host)}/{announce.host}/tcp/4001")


@given(st.text(max_size=40))
def test_announce_never_crashes(text):
    try:
        parse_announce(text)
    except UserError:
        pass


@pytest.fixture
def interfaces(monkeypatch):
    """A host with one bridge address and loopback; routes to 10.77/16 leave from the bridge."""
    monkeypatch.setattr(addresses, "interface_addresses", lambda: ["10.77.0.3", "192.0.2.9", "127.0.0.1"])
    monkeypatch.setattr(addresses, "route_source", lambda h: "10.77.0.3" if h.startswith("10.77.") else
                        ("127.0.0.1" if h.startswith("127.") else "192.0.2.9"))


def test_wildcard_listen_announces_interface_addresses(interfaces):
    assert reachable_hosts("0.0.0.0") == ["10.77.0.3", "192.0.2.9"]
    assert reachable_hosts("0.0.0.0", toward=["192.0.2.1"]) == ["192.0.2.9", "10.77.0.3"]
    assert reachable_hosts("0.0.0.0", toward=["127.0.0.1"]) == ["10.77.0.3", "192.0.2.9"]  # never loopback
    assert reachable_hosts("0.0.0.0", observed=["203.0.113.5"]) == ["10.77.0.3", "192.0.2.9", "203.0.113.5"]
    assert reachable_hosts("127.0.0.1") == ["127.0.0.1"] and reachable_hosts("10.77.0.3") == ["10.77.0.3"]
    assert http_url("0.0.0.0", 8001) == "http://10.77.0.3:8001/"
    assert http_url("0.0.0.0", 8001, Announce("example.org", 443)) == "http://example.org:443/"
    assert http_url("0.0.0.0", 8001, Announce("example.org")) == "http://example.org:8001/"


def test_a_loopback_only_host_announces_loopback(monkeypatch):
    monkeypatch.setattr(addresses, "interface_addresses", lambda: ["127.0.0.1"])
    assert reachable_hosts("0.0.0.0") == ["127.0.0.1"]


def test_interface_addresses_of_this_host():
    found = addresses.interface_addresses()
    assert found and "0.0.0.0" not in found
    assert not any(addresses.is_loopback(a) for a in found[:-1]) or all(addresses.is_loopback(a) for a in found)


def test_default_listen_follows_the_http_host():
    from distribution.addresses import default_listen

    assert default_listen("0.0.0.0") == "/ip4/0.0.0.0/tcp/0"
    assert default_listen("127.0.0.1") == "/ip4/127.0.0.1/tcp/0"
    assert default_listen("localhost") == "/ip4/127.0.0.1/tcp/0"
    assert default_listen("::1") == "/ip6/::1/tcp/0"
    with pytest.raises(UserError, match="999.1.1.1: cannot listen"):
        default_listen("999.1.1.1")


@pytest.mark.parametrize("url, base", [
    ("http://10.0.0.5:8001/", "http://10.0.0.5:8001/"),
    ("http://10.0.0.5:8001", "http://10.0.0.5:8001/"),
    ("https://peer.example:443/", "https://peer.example/"),
    ("http://[fd00::1]:8001/", "http://[fd00::1]:8001/"),
    ("http://10.0.0.5:8001/admin/", None),              # a path: the record steers our GETs elsewhere
    ("http://10.0.0.5:8001/?x=fragments/", None),
    ("http://user:pw@10.0.0.5:8001/", None),
    ("http://10.0.0.5:8001/#frag", None),
    ("file:///etc/passwd", None), ("ftp://10.0.0.5/", None), ("gopher://10.0.0.5:70/", None),
    ("http://10.0.0.5:99999/", None), ("http:///", None), ("", None), ("http://a\nb:1/", None),
    (None, None), (5, None), (["http://10.0.0.5:8001/"], None),
])
def test_a_peer_record_names_only_a_fragment_server(url, base):
    """Anyone can put a peer record in the DHT: a fetch follows only an http(s) origin from it."""
    assert addresses.peer_fragment_base(url) == base


@given(st.text(max_size=80))
def test_a_peer_record_never_yields_more_than_an_origin(text):
    base = addresses.peer_fragment_base(text)
    assert base is None or (base.startswith(("http://", "https://")) and base.endswith("/")
                            and base.count("/") == 3 and "@" not in base and "?" not in base and "#" not in base)
