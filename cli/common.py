"""What every command shares: one-line errors and opening a store from a path or address."""

from __future__ import annotations

import functools
import sys

import click

from common.errors import UserError


def user_errors(func):
    """Turn UserError (and the usual OS errors) into one line on stderr and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            click.echo(f"error: {where}{e.strerror or e}", err=True)
            sys.exit(1)

    return wrapper


def open_store(source: str, allow_file: bool = False):
    """A loader for SOURCE: a store directory, an http(s):// store, or (where allowed) a .gguf file."""
    import os

    from distribution.local import LocalLoader

    if source.startswith("p2p://"):
        from distribution.p2p import P2PLoader

        return P2PLoader(source)
    if source.startswith(("http://", "https://")):
        from distribution.http import HTTPLoader

        return HTTPLoader(source)
    if os.path.isdir(source):
        return LocalLoader(source)
    if os.path.isfile(source):
        if allow_file:
            from distribution.gguf_file import GGUFFileLoader

            return GGUFFileLoader(source)
        raise UserError(f"{source}: not a store directory (a store holds manifest.json and fragments/)")
    raise UserError(f"{source}: no such store directory" + (" or GGUF file" if allow_file else ""))
