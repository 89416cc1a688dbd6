"""Servers for the API tests: the app in-process on 127.0.0.1, port 0, on its own thread and loop."""

from __future__ import annotations

import contextlib
import time

import pytest

from api.server import ServerThread, make_app
from cli.common import load_text_model


@pytest.fixture(scope="session")
def factory_text_model(factory_models):
    """A tiny random model with a real tokenizer and ChatML template: fast, deterministic answers."""
    return load_text_model(str(factory_models["q8_0-spm-gqa"]), kernels="numpy")


@pytest.fixture(scope="session")
def default_text_model(default_store):
    return load_text_model(str(default_store), kernels="numba")


@contextlib.contextmanager
def running(model, limits=None, **options):
    """A server for ``model`` (a TextModel or LoadingModel) for the duration of a with block;
    ``limits``: a common.aio_server.Limits (connections, timeouts), else the defaults."""
    extra = {} if limits is None else {"limits": limits}
    server = ServerThread(make_app(model, **options), **extra)
    try:
        yield server
    finally:
        server.stop()


class SlowSession:
    """A real session that takes ``delay`` seconds per feed, so a test can act mid-generation."""

    def __init__(self, session, delay: float):
        self.session, self.delay = session, delay

    position = property(lambda self: self.session.position)
    capacity = property(lambda self: self.session.capacity)

    def feed(self, tokens, all_logits=False):
        time.sleep(self.delay)
        return self.session.feed(tokens, all_logits)

    def rewind(self, position):
        self.session.rewind(position)

    def close(self):
        self.session.close()


def slowed(text_model, delay: float):
    """The same model, with every session slowed down."""
    from dataclasses import replace

    return replace(text_model, open_session=lambda n: SlowSession(text_model.open_session(n), delay))
