"""The API over a distributed route: two in-process swarm nodes hold the blocks, this process only
the edges; the answers equal a local model's, and /info (the page's route panel) shows the route."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from cli.api import model_loader
from cli.common import load_text_model
from tests.api.conftest import running
from tests.swarm.conftest import six_loader, six_store, start_node  # noqa: F401 - fixtures used here

ASK = {"messages": [{"role": "user", "content": "The quick brown fox"}], "max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def nodes(six_loader):  # noqa: F811
    started = [start_node(six_loader, 0, 2), start_node(six_loader, 3, 5)]
    yield started
    for node in started:
        node.stop()


def answer(server, name: str) -> str:
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    return c.chat.completions.create(model=name, **ASK).choices[0].message.content


def test_distributed_route_answers_like_local_and_shows_its_route(six_store, nodes):  # noqa: F811
    local = load_text_model(str(six_store), kernels="numba")
    with running(local) as s:
        expected = answer(s, local.name)

    said = []
    routed = model_loader(str(six_store), "numba", None, said.append,
                          {"nodes": [n.url for n in nodes], "key_file": None})(lambda *report: None)
    assert routed.info["distributed"] and "blocks run on ws://127.0.0.1:" in said[0]
    with running(routed, parallel=2) as s:
        assert answer(s, routed.name) == expected
        with urllib.request.urlopen(s.url + "/info", timeout=10) as r:
            route = json.load(r)["info"]["route"]
    assert [(hop["node"], hop["blocks"]) for hop in route] == [(nodes[0].url, "0-2"), (nodes[1].url, "3-5")]
    assert all(hop["ms_per_token"] > 0 for hop in route)
