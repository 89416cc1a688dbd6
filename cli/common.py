"""What every command shares: one-line errors and opening a store from a path or address."""

from __future__ import annotations

import functools
import sys

import click

from common.errors import EXIT_INTERRUPTED, EXIT_USAGE, UserError


# Click exits 2 on usage errors, but 2 is this project's code for a damaged store
# (common/errors.py): a wrong option is bad input like any other, exit 1. Every command imports
# this module, so the one class attribute covers them all.
click.exceptions.UsageError.exit_code = EXIT_USAGE


def user_errors(func):
    """Turn UserError (and the usual OS errors) into one line on stderr and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _fail(f"{where}{e.strerror or e}", EXIT_USAGE)
        except RecursionError:  # a structure nested deeper than Python's stack, from some input
            _fail("input nested too deeply to read", EXIT_USAGE)

    return wrapper


def _fail(message: str, code: int) -> None:
    # One line: a message that carries a newline (a server's reply, a file name) must not add lines.
    flat = message.replace("\r", " ").replace("\n", " ")
    click.echo(f"error: {flat}", err=True)
    sys.exit(code)


def open_store(source: str, allow_file: bool = False):
    """A loader for SOURCE: a store directory, an http(s):// store, or (where allowed) a .gguf file."""
    import os

    from distribution.local import LocalLoader

    if source.startswith("p2p://"):
        from distribution.p2p_loader import P2PLoader

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


def resolve_source(source: str | None) -> str:
    """SOURCE as given, or the default model's store (made by scripts/setup.sh)."""
    import os

    if source is not None:
        return source
    from models.default import DEFAULT_STORE

    if not os.path.isdir(DEFAULT_STORE):
        raise UserError(f"{DEFAULT_STORE}: the default model's store is missing; run scripts/setup.sh first")
    return str(DEFAULT_STORE)


def describe_model(loader) -> dict:
    """What a person wants to know about a loaded model: shown by `chat`, the API and the web page."""
    from collections import Counter

    manifest = loader.manifest
    types = Counter(t.ggml_type for t in manifest.tensors if len(t.shape) > 1)
    return {**{k: v for k, v in manifest.model.items() if v is not None},
            "source": loader.where,
            "file": manifest.source.get("name"),
            "file_size": manifest.source.get("size"),
            "sha256": manifest.source.get("sha256"),
            "quantization": ", ".join(f"{t} x{n}" for t, n in types.most_common()),
            "fragments": len(manifest.unique_fragments())}


def load_text_model(source: str | None, kernels: str = "numba", template: str | None = None):
    """A ``generation.TextModel`` for any source `infer` takes, with every block loaded here."""
    from engine.model import LlamaModel
    from engine.tokenizer import Tokenizer
    from generation.textmodel import TextModel

    loader = open_store(resolve_source(source), allow_file=True)
    tokenizer = Tokenizer(loader.metadata, loader.where)
    model = LlamaModel(loader, backend=kernels)
    info = describe_model(loader)
    return TextModel(name=info.get("name") or info.get("file") or "model", tokenizer=tokenizer,
                     context_length=model.config.context_length, open_session=model.open_session,
                     info=info, template=template)
