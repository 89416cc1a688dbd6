"""`serve`: share a store over HTTP (and, with --p2p, announce it to peers through a DHT)."""

from __future__ import annotations

import click

from cli.common import user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--p2p", is_flag=True, help="Also join the DHT and announce the fragments held (see --listen, --bootstrap).")
@click.option("--listen", help="--p2p: libp2p listen multiaddr [default: --host's address, any port, e.g. "
                                "/ip4/127.0.0.1/tcp/0].")
@click.option("--bootstrap", multiple=True, help="--p2p: a peer to join through, as its p2p://<sha>@<multiaddr> address "
                                                 "or the bare multiaddr (repeatable).")
@click.option("--announce", help="--p2p: HOST[:PORT] others reach this server at (NAT, proxy); default: the "
                                 "interface addresses behind a wildcard --host/--listen.")
@click.option("--layers", help="--p2p: serve only these blocks (and the header, the embedding with block 0, the "
                                "head with the last block), e.g. 0-14 or 0-9,20-29.")
@user_errors
def serve(store, host, port, p2p, listen, bootstrap, announce, layers):
    """Serve STORE over HTTP: GET /manifest.json and GET /fragments/<sha256>.

    Only fragments listed in the manifest are served (no listing, no paths), with ETag = hash and
    Range requests. Any HTTP loader (`infer http://HOST:PORT/ ...`) can use it. Ctrl-C stops it.

    With --p2p the peer also joins a Kademlia DHT (py-libp2p), announces the fragments it holds
    (all, or those of --layers A-B) and prints its address: p2p://<manifest sha256>@<multiaddr>.
    Clients (`infer p2p://...`) find providers through the DHT and fetch over HTTP, verified.
    """
    from common.errors import UserError

    say = lambda line: click.echo(line, err=True)  # noqa: E731
    if not p2p:
        if bootstrap or layers or announce or listen:
            raise UserError("--bootstrap, --announce, --listen and --layers go with --p2p")
        from distribution.server import serve_forever

        serve_forever(store, host, port, announce=say)
        return
    from distribution.addresses import default_listen, parse_announce, parse_bootstrap
    from distribution.p2p_server import serve_p2p
    from distribution.spans import parse_spans

    serve_p2p(store, host, port, listen or default_listen(host), parse_bootstrap(bootstrap),
              parse_spans(layers) if layers is not None else None, announce=say, public=parse_announce(announce))
