"""`fragment` and `recombine`: write a store from a GGUF file, and rebuild or verify one."""

from __future__ import annotations

import click

from cli.common import open_store, user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", type=click.Path(file_okay=False),
              help="Store directory to write (default: MODEL's path without .gguf).")
@click.option("--fragment-size", default="10MB", show_default=True,
              help="Largest fragment, e.g. 10MB, 4MiB, 65536. At least 1KiB.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@user_errors
def fragment(model, output, fragment_size, progress):
    """Cut MODEL.gguf into content-addressed fragments plus manifest.json.

    Fragments are named by the SHA-256 of their bytes and never mix two transformer blocks, so a
    node serving some layers fetches only those. Running it again on the same model repairs a
    store in place; a directory holding another model's store is refused.
    """
    from common.errors import UserError
    from fragmenter.fragment import fragment_file, parse_size

    size = parse_size(fragment_size)
    if size < 1024:
        raise UserError(f"fragment size {fragment_size!r} is below the 1KiB minimum")
    result = fragment_file(model, output, size, progress)
    click.echo(result.summary())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("store")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="GGUF file to write.")
@click.option("--verify", is_flag=True, help="Check every fragment and the whole-file hash; write nothing.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@user_errors
def recombine(store, output, verify, progress):
    """Rebuild the original GGUF file from STORE, or check STORE with --verify.

    The rebuilt file is written under a temporary name and renamed only once its SHA-256 equals
    the source's. --verify lists every missing or corrupt fragment and the tensors it holds.
    """
    import sys

    from common.errors import EXIT_DAMAGED_STORE, EXIT_OK, UserError
    from recombiner.recombine import recombine as rebuild
    from recombiner.recombine import verify as check

    if verify == bool(output):
        raise UserError("give either -o OUT.gguf (rebuild) or --verify (check only)")
    loader = open_store(store)
    if verify:
        report = check(loader, progress)
        for line in report.lines():
            click.echo(line, err=not report.ok)
        sys.exit(EXIT_OK if report.ok else EXIT_DAMAGED_STORE)
    result = rebuild(loader, output, progress)
    click.echo(result.summary())
    if result.warning():
        click.echo(result.warning(), err=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Store directory to write.")
@click.option("--layers", help="Only these blocks (with the header, and the embedding/head their ends need), "
                               "e.g. 0-14 or 0-9,20-29.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@user_errors
def fetch(source, output, layers, progress):
    """Copy a store (or some of its blocks) from SOURCE into a local store directory.

    SOURCE is a store directory, an http(s):// store or a p2p:// address. The manifest is copied
    byte for byte, so `serve OUTPUT --p2p` re-provides what was fetched under the same address.
    """
    from pathlib import Path

    from distribution.spans import parse_spans
    from distribution.store_copy import fetch_store

    spans = parse_spans(layers) if layers is not None else None
    loader = open_store(source)
    try:
        if progress is not None and hasattr(loader, "fetcher"):
            loader.fetcher.progress = progress
        click.echo(fetch_store(loader, Path(output), spans).summary())
    finally:
        loader.close()
