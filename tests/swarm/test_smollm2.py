"""SmolLM2-135M over three nodes (0-9, 10-19, 20-29): the same greedy tokens as one machine, also
when the middle node dies mid-generation and a spare takes over. The nodes run in this process
(each loads in well under a second); tests/swarm/test_node_cli.py runs `node` processes."""

import pytest

from common.errors import UserError
from distribution.local import LocalLoader
from swarm.client import distributed_text_model, timings
from tests.swarm.conftest import greedy, join, start_node

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Count: one, two,"]
N = 8


def prompt_tokens(tm, text):
    return tm.chat_prompt([{"role": "user", "content": text}])[0]


@pytest.fixture(scope="module")
def local(default_store):
    from cli.common import load_text_model

    tm = load_text_model(str(default_store))

    def run(text, n=N):
        tokens = prompt_tokens(tm, text)
        with tm.open_session(len(tokens) + n) as s:
            return greedy(s, tokens, n)

    return run


@pytest.fixture(scope="module")
def loader(default_store):
    return LocalLoader(default_store)


def node(loader, span: str):
    first, last = map(int, span.split("-"))
    return start_node(loader, first, last)


@pytest.fixture(scope="module")
def edges(loader):
    nodes = [node(loader, "0-9"), node(loader, "20-29")]
    yield nodes
    for n in nodes:
        n.stop()


def distributed(loader, urls):
    return distributed_text_model(loader, urls)


def test_three_nodes_equal_local(loader, edges, local):
    middle = node(loader, "10-19")
    try:
        tm = distributed(loader, [edges[0].url, middle.url, edges[1].url])
        for text in PROMPTS:
            tokens = prompt_tokens(tm, text)
            with tm.open_session(len(tokens) + N) as s:
                assert greedy(s, tokens, N) == local(text)
        t = timings(tm)
        assert [hop["blocks"] for hop in t["route"]] == ["0-9", "10-19", "20-29"]
        assert t["failovers"] == 0
    finally:
        middle.stop()


@pytest.mark.parametrize("spare_span", ["10-19", "10-29"])
def test_middle_node_killed_mid_generation(loader, edges, local, spare_span):
    middle = node(loader, "10-19")
    spare = node(loader, spare_span)  # not known to the client until the kill
    try:
        tm = distributed(loader, [edges[0].url, middle.url, edges[1].url])
        tokens = prompt_tokens(tm, PROMPTS[0])

        def kill(i):
            if i == 3:
                middle.stop()
                join(tm, spare.url)

        with tm.open_session(len(tokens) + N) as s:
            assert greedy(s, tokens, N, kill) == local(PROMPTS[0])
        t = timings(tm)
        assert t["failovers"] == 1
        assert {"blocks": "10-19", "node": spare.url} in t["route"]
    finally:
        middle.stop()
        spare.stop()


def test_no_spare_is_one_clear_error(loader, edges):
    middle = node(loader, "10-19")
    try:
        tm = distributed(loader, [edges[0].url, middle.url, edges[1].url])
        tokens = prompt_tokens(tm, PROMPTS[0])
        with tm.open_session(len(tokens) + N) as s:
            with pytest.raises(UserError, match="no node serves blocks 10-19") as e:
                greedy(s, tokens, N, lambda i: middle.stop() if i == 2 else None)
        assert "\n" not in str(e.value)
    finally:
        middle.stop()


def test_a_failover_after_a_rewind_into_a_prompt_rebuilds_the_cache_bit_for_bit(loader, edges):
    """From a chaos test: a rewind into the middle of a prefill chunk (chat re-rendering, the API's
    prompt cache) kept the chunk's first rows, and the replay sent those alone; computed apart
    from their chunk's other rows, their K/V differed in the last bits (logits up to 0.02 apart).
    The replay now sends the whole chunk, then rewinds."""
    import numpy as np

    middle, spare = node(loader, "10-19"), None
    try:
        tm = distributed(loader, [edges[0].url, middle.url, edges[1].url])
        prompt = prompt_tokens(tm, "Tell me a long story about a dragon and a knight who live in a castle.")
        logits = []
        for fail in (False, True):
            with tm.open_session(256) as s:
                s.feed(prompt)
                s.rewind(6)  # into the prompt's chunk: the next turn shares only its start
                s.feed(prompt_tokens(tm, "Write a poem about autumn leaves.")[-12:])
                if fail:
                    middle.stop()
                    spare = node(loader, "10-19")
                    join(tm, spare.url)
                logits.append(s.feed([42]))
        assert timings(tm)["failovers"] == 1
        np.testing.assert_array_equal(logits[1], logits[0])
    finally:
        for n in (middle, spare):
            if n:
                n.stop()
