"""Addresses: parsing what users type (p2p:// addresses, --bootstrap, --announce) and choosing the
addresses a peer announces, which other hosts must be able to reach.

A server is run for real with a wildcard listen (``--host 0.0.0.0``, ``/ip4/0.0.0.0/tcp/4001``).
0.0.0.0 is not an address anyone can dial, and 127.0.0.1 means *the dialler's own* host, so a peer
announces instead the addresses of its interfaces (loopback only when it has nothing else), or
what the user gives with ``--announce HOST[:PORT]`` (a host behind NAT or a proxy).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from common.errors import UserError
from fragmenter.manifest import FRAGMENT_ID

WILDCARDS = {"0.0.0.0", "::", ""}
ADDRESS_FORM = "p2p://<manifest sha256>@/ip4/HOST/tcp/PORT/p2p/PEER"


# -- what users type ---------------------------------------------------------------------------------
def check_multiaddr(addr: str, what: str) -> str:
    """A dialable peer multiaddr (``/ip4/HOST/tcp/PORT/p2p/PEER``), or a UserError naming ``what``."""
    if not addr.startswith("/") or "/p2p/" not in addr:
        raise UserError(f"{what}: bootstrap peers must be multiaddrs ending in /p2p/<peer id>, got {addr!r}")
    try:
        from libp2p.peer.peerinfo import info_from_p2p_addr
        from multiaddr import Multiaddr

        info_from_p2p_addr(Multiaddr(addr))
    except ImportError:  # the parse is a courtesy; the dial reports the same problem later
        pass
    except Exception as e:  # multiaddr and base58 raise assorted types for assorted typos
        raise UserError(f"{what}: {addr!r} is not a valid peer multiaddr ({e or type(e).__name__})") from None
    return addr


def parse_address(address: str) -> tuple[str, list[str]]:
    """``p2p://<manifest sha256>@<multiaddr>[,<multiaddr>]`` -> (manifest hash, bootstrap multiaddrs)."""
    if not address.startswith("p2p://") or "@" not in address:
        raise UserError(f"{address}: a P2P address looks like {ADDRESS_FORM}")
    digest, _, rest = address[len("p2p://"):].partition("@")
    if not FRAGMENT_ID.match(digest):
        raise UserError(f"{address}: {digest!r} is not a manifest SHA-256 (64 hex digits)")
    boots = [b for b in rest.split(",") if b]
    if not boots:
        raise UserError(f"{address}: no bootstrap peer after '@' (a P2P address looks like {ADDRESS_FORM})")
    return digest, [check_multiaddr(b, address) for b in boots]


def parse_bootstrap(values) -> list[str]:
    """--bootstrap values -> multiaddrs. Each value is a whole ``p2p://<sha>@<multiaddr>`` address
    (as `serve --p2p` and `node` print it) or a bare multiaddr; either may list several, comma-separated."""
    out: list[str] = []
    for value in values:
        if value.startswith("p2p://"):
            out += parse_address(value)[1]
        else:
            out += [check_multiaddr(b, f"--bootstrap {value}") for b in value.split(",") if b]
    return list(dict.fromkeys(out))


def other_manifests(values, manifest: str) -> list[str]:
    """The manifest hashes that ``p2p://`` --bootstrap values name, other than ``manifest``
    (a node joining through another model's peer: allowed, the DHT is shared, but its clients
    will look for that model's blocks, not this node's)."""
    named = [parse_address(v)[0] for v in values if v.startswith("p2p://")]
    return [h for h in dict.fromkeys(named) if h != manifest]


@dataclass(frozen=True)
class Announce:
    """``--announce HOST[:PORT]``: the host name or address others reach this peer at, and the
    public port of its HTTP (or activation) server when a proxy or NAT maps it to another."""

    host: str
    port: int | None = None


def parse_announce(text: str | None) -> Announce | None:
    if not text:
        return None
    host, port = text, None
    if text.startswith("["):  # [v6]:port
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or host in WILDCARDS:
        raise UserError(f"--announce {text!r}: give the host name or address others reach this peer at")
    _check_host(host, f"--announce {text!r}")
    if port is not None:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"--announce {text!r}: the port must be a number from 1 to 65535")
        port = int(port)
    return Announce(host, port)


def peer_fragment_base(url) -> str | None:
    """A peer record's fragment server as ``http(s)://HOST[:PORT]/``, or None for anything else
    (another scheme, a user, a path, a query). Anyone can put a record in the DHT and the bytes are
    hash-checked anyway; this keeps what a record makes us ask for to /fragments/<sha256> of some host."""
    from yarl import URL

    if not isinstance(url, str) or not url.isprintable():
        return None
    try:
        u = URL(url)
        if (u.scheme not in ("http", "https") or not u.host or u.user is not None or u.password is not None
                or u.query_string or u.fragment or u.raw_path not in ("", "/")):
            return None
        return str(u.origin()) + "/"
    except (ValueError, TypeError):  # (yarl: a bad port, a bad IDNA name)
        return None


def host_protocol(host: str) -> str:
    """The multiaddr protocol of a host others dial: ip4 or ip6 for an address, else dns4."""
    try:
        return f"ip{ipaddress.ip_address(host).version}"
    except ValueError:
        return "dns4"


def _check_host(host: str, what: str) -> None:
    """A host others can dial: an IP address, or a DNS name that libp2p's multiaddr takes (never
    all digits at the end, as '999.1.1.1', which is a mistyped address rather than a name)."""
    from multiaddr import Multiaddr

    proto = host_protocol(host)
    try:
        if proto == "dns4" and host.rstrip(".").rsplit(".", 1)[-1].isdigit():
            raise ValueError(host)
        Multiaddr(f"/{proto}/{host}/tcp/1")
    except Exception:  # (multiaddr raises several kinds, idna's among them)
        raise UserError(f"{what}: {host!r} is neither an IP address nor a host name "
                        f"(IPv6 with a port: [ADDRESS]:PORT)") from None


def default_listen(host: str) -> str:
    """The libp2p listen multiaddr that goes with an HTTP ``--host``: the same address, any port
    (``--host 0.0.0.0`` then listens for libp2p on every interface too, as one would expect)."""
    if host in WILDCARDS:
        return "/ip4/0.0.0.0/tcp/0"
    if host == "localhost":
        return "/ip4/127.0.0.1/tcp/0"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:  # a host name: the address it stands for here (a malformed address is no name)
            if not host or set(host) <= set("0123456789.:"):
                raise ValueError(host)
            ip = ipaddress.ip_address(socket.gethostbyname(host))
        except (OSError, UnicodeError, ValueError):
            raise UserError(f"--host {host}: cannot listen there (not an address, nor a name this host resolves); "
                            f"or give --listen /ip4/ADDRESS/tcp/PORT") from None
    return f"/ip{ip.version}/{ip}/tcp/0"


# -- what a peer announces ------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def interface_addresses() -> list[str]:
    """IPv4 addresses of this host's interfaces, loopback last (Linux; elsewhere the host name's)."""
    found = []
    try:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:  # SIOCGIFADDR: the interface's (primary) IPv4 address
                    raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
                except OSError:  # no IPv4 address, or down
                    continue
                found.append(socket.inet_ntoa(raw[20:24]))
    except (ImportError, OSError, AttributeError):
        pass
    if not found:
        try:
            found = [i[4][0] for i in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
        except OSError:
            found = []
    found = list(dict.fromkeys(found))
    return [a for a in found if not is_loopback(a)] + [a for a in found if is_loopback(a)]


def route_source(peer_host: str) -> str | None:
    """The local address the kernel would use to reach ``peer_host`` (connect() on a UDP socket
    picks a route and sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer_host, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def reachable_hosts(bound: str, toward: list[str] = (), observed: list[str] = ()) -> list[str]:
    """The hosts to announce for a socket bound to ``bound``.

    A specific address is announced as it is. Behind a wildcard: the interface addresses, first
    the ones the routes toward the ``toward`` hosts (bootstrap peers) leave from, then the ones
    other peers ``observed`` us at (libp2p's identify: the public side of a NAT); loopback only
    when nothing else exists, since to any other host 127.0.0.1 is itself."""
    if bound not in WILDCARDS:
        return [bound]
    interfaces = interface_addresses()
    routed = [route_source(h) for h in toward]
    ordered = [h for h in routed if h in interfaces] + interfaces + list(observed)
    outside = [h for h in ordered if h and not is_loopback(h)]
    return list(dict.fromkeys(outside or [h for h in ordered if h] or ["127.0.0.1"]))


def http_url(host: str, port: int, announce: Announce | None = None, toward: list[str] = ()) -> str:
    """The URL others fetch from for an HTTP server bound to ``host:port``."""
    if announce is not None:
        host, port = announce.host, announce.port or port
    else:
        host = reachable_hosts(host, toward)[0]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def multiaddr_host(addr: str) -> str | None:
    """'/ip4/10.0.0.1/tcp/4001/...' -> '10.0.0.1' (None for other forms)."""
    parts = addr.split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6", "dns4", "dns6", "dns") else None
