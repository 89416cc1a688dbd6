"""Swarm test helpers: a 6-block factory store, in-process nodes on 127.0.0.1, greedy loops."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from distribution.local import LocalLoader
from engine.model import LlamaModel
from fragmenter.fragment import fragment_file
from models.factory import ModelSpec, write_model
from engine.session import LocalSpanSession
from swarm import manifest_sha
from swarm.client import RemoteSpanSession
from swarm.memory import Limits
from swarm.server import NodeService, NodeThread

PROMPT = [1, 17, 99, 23, 250, 7, 311, 42]
KEY = b"a-private-swarm-key-0123456789"  # the swarm key of the private-swarm tests


def hidden(rows: int, seed: int = 0, dim: int = 96) -> np.ndarray:
    """(rows, dim) float32 hidden states drawn from ``seed``; 96 is the factory model's width."""
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


@pytest.fixture(scope="session")
def six_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("swarmstore")
    path = write_model(replace(ModelSpec(), n_layers=6, name="six-blocks"), tmp / "six.gguf")
    fragment_file(str(path), tmp / "store", 16384, progress=False)
    return tmp / "store"


@pytest.fixture(scope="session")
def six_loader(six_store):
    return LocalLoader(six_store)


def start_node(loader, first: int, last: int, key: bytes | None = None, lanes: bool = True, **limits) -> NodeThread:
    """A node on 127.0.0.1, with lanes (swarm/lane.py) unless ``lanes`` is False: a test of the
    WebSocket's own relay path turns them off, as a client then relays over the WebSockets."""
    model = LlamaModel(loader, backend="numba", layers=(first, last))
    return NodeThread(NodeService(model, manifest_sha(loader), Limits(**limits), key), lanes=lanes)


def close_all(spans=(), hubs=(), nodes=()) -> None:
    """A test's teardown: its span sessions, then their hubs, then the nodes."""
    for s in spans:
        s.close()
    for hub in hubs:
        hub.close()
    for node in nodes:
        node.stop()


@pytest.fixture(scope="session")
def reference(six_loader):
    """Blocks 0-2 in this process: what a node serving them must compute, bit for bit."""
    return LlamaModel(six_loader, backend="numba", layers=(0, 2))


def check_alive(node, reference, prompt_rows: int = 5) -> None:
    """A fresh session on its own connection to ``node`` (blocks 0-2, 32 positions or more)
    computes exactly what ``reference`` does: a prompt of ``prompt_rows``, then two steps."""
    remote = RemoteSpanSession(node.url, 0, 2, 32, 96)
    local = LocalSpanSession(reference, 32)
    try:
        for chunk in (hidden(prompt_rows, seed=1), hidden(1, seed=2), hidden(1, seed=3)):
            np.testing.assert_array_equal(remote.forward(chunk), local.forward(chunk))
    finally:
        remote.close()


def join(tm, url: str) -> None:
    """Make a node known to a text model's client, as one joining the swarm after its session began."""
    tm.open_session.__self__.directory.urls.append(url)


class SwapAt:
    """A greedy run's ``after_step``: after token ``at``, ``node`` stops and a spare serving ``span``
    starts and joins (``spare``, for the test's assertions and teardown)."""

    def __init__(self, tm, loader, node, span: tuple[int, int], at: int):
        self.tm, self.loader, self.node, self.span, self.at = tm, loader, node, span, at
        self.spare = None

    def __call__(self, i: int) -> None:
        if i == self.at:
            self.node.stop()
            self.spare = start_node(self.loader, *self.span)
            join(self.tm, self.spare.url)


def greedy(session, prompt: list[int], n: int, after_step=None) -> list[int]:
    """n greedy tokens; ``after_step(i)`` runs after the i-th token is chosen (to kill a node)."""
    logits = session.feed(prompt)
    tokens = []
    for i in range(n):
        tokens.append(int(np.argmax(logits)))
        if after_step:
            after_step(i)
        if i + 1 < n:
            logits = session.feed([tokens[-1]])
    return tokens


@pytest.fixture(scope="session")
def local_greedy(six_loader):
    model = LlamaModel(six_loader, backend="numba")

    def run(prompt, n):
        with model.open_session(64) as s:
            return greedy(s, prompt, n)

    return run


async def serve_ws(handler):
    """An aiohttp server on 127.0.0.1 taking WebSockets at /swarm with ``handler``: (runner, port);
    ``await runner.cleanup()`` stops it."""
    from aiohttp import web

    app = web.Application()
    app.router.add_get("/swarm", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]
