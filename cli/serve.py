"""`serve`: share a store over HTTP (and, with --p2p, announce it to peers through a DHT)."""

from __future__ import annotations

import click

from cli.common import user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@user_errors
def serve(store, host, port):
    """Serve STORE over HTTP: GET /manifest.json and GET /fragments/<sha256>.

    Only fragments listed in the manifest are served (no listing, no paths), with ETag = hash and
    Range requests. Any HTTP loader (`infer http://HOST:PORT/ ...`) can use it. Ctrl-C stops it.
    """
    from distribution.server import serve_forever

    serve_forever(store, host, port, announce=lambda line: click.echo(line, err=True))
