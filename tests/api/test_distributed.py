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


def test_a_prompt_longer_than_the_route_holds_is_a_400_and_health_stays_ok(six_store, six_loader):  # noqa: F811
    """The request is checked against the model's context, but a route's nodes may hold fewer
    positions: the prompt is the client's fault (400), not a failed route (503, /health degraded)."""
    short = [start_node(six_loader, 0, 2, max_positions=8),
             start_node(six_loader, 3, 5, max_positions=8)]
    try:
        routed = model_loader(str(six_store), "numba", None, lambda line: None,
                              {"nodes": [n.url for n in short], "key_file": None})(lambda *report: None)
        with running(routed) as s:
            c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(model=routed.name, **ASK)
            assert e.value.body["code"] == "context_length_exceeded" and "tokens" in e.value.body["message"]
            with urllib.request.urlopen(s.url + "/health", timeout=10) as r:
                assert json.load(r)["status"] == "ok"
            assert c.completions.create(model=routed.name, prompt="a", max_tokens=2, temperature=0).choices
    finally:
        for node in short:
            node.stop()
