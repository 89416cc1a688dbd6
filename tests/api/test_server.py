"""The OpenAI-compatible server on a small factory model: the official `openai` client, raw bad
requests, slots and the queue, API keys, disconnects, health, metrics and the loading state."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from api.loading import LoadingModel
from tests.api.conftest import running, slowed

HELLO = [{"role": "user", "content": "Tell me about the quick brown fox."}]
GREEDY = {"temperature": 0}
JSON = {"Content-Type": "application/json"}  # the server refuses POSTs of anything else (415)


def client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def raw(server, path: str, body=None, method: str | None = None, headers: dict | None = None,
        timeout: float = 30) -> tuple[int, dict | str]:
    """One HTTP request with urllib: (status, parsed JSON or text)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method, headers={**JSON, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@pytest.fixture(scope="module")
def server(factory_text_model):
    with running(factory_text_model, parallel=2, queue_size=8) as s:
        yield s


@pytest.fixture(scope="module")
def greedy_answer(server):
    """The reference answer: greedy, not streamed, 24 tokens at most."""
    r = client(server).chat.completions.create(model=server_model(server), messages=HELLO, max_tokens=24, **GREEDY)
    return r


def server_model(server) -> str:
    return client(server).models.list().data[0].id


# -- the openai client ------------------------------------------------------------------------------
def test_models_lists_the_one_model(server, factory_text_model):
    models = client(server).models.list().data
    assert [m.id for m in models] == [factory_text_model.name]
    assert client(server).models.retrieve(factory_text_model.name).id == factory_text_model.name


def test_chat_not_streamed(greedy_answer):
    r = greedy_answer
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streamed_equals_not_streamed(server, greedy_answer):
    chunks = list(client(server).chat.completions.create(model=server_model(server), messages=HELLO, max_tokens=24,
                                                         stream=True, stream_options={"include_usage": True},
                                                         **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy_answer.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [greedy_answer.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == greedy_answer.usage.completion_tokens
    assert len(chunks) >= 4  # streamed in pieces, not one block


def test_sse_ends_with_done(server):
    req = urllib.request.Request(server.url + "/v1/completions", method="POST",
                                 data=json.dumps({"prompt": "The quick", "max_tokens": 5, "stream": True,
                                                      **GREEDY}).encode(), headers=JSON)
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] == "length"


def test_with_include_usage_every_chunk_but_the_last_says_usage_null(server):
    """OpenAI's wire form: "usage": null on each chunk, the counts on a last chunk with no choices."""
    body = {"messages": HELLO, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}, **GREEDY}
    req = urllib.request.Request(server.url + "/v1/chat/completions", method="POST", data=json.dumps(body).encode(),
                                 headers=JSON)
    with urllib.request.urlopen(req, timeout=30) as r:
        chunks = [json.loads(e[6:]) for e in r.read().decode().split("\n\n") if e and e != "data: [DONE]"]
    assert len(chunks) >= 3 and all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_completions_streamed_and_not(server):
    c = client(server)
    whole = c.completions.create(model=server_model(server), prompt="The quick brown", max_tokens=12, **GREEDY)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12
    pieces = [ch.choices[0].text for ch in c.completions.create(model=server_model(server), prompt="The quick brown",
                                                                max_tokens=12, stream=True, **GREEDY)]
    assert "".join(pieces) == whole.choices[0].text


def test_stop_string_ends_the_answer_before_it(server, greedy_answer):
    text = greedy_answer.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    r = client(server).chat.completions.create(model=server_model(server), messages=HELLO, max_tokens=24,
                                               stop=["never-appears", stop], **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[:text.index(stop)]


def test_seed_repeats_a_sampled_answer(server):
    def ask(seed):
        return client(server).completions.create(model=server_model(server), prompt="Once upon a time", max_tokens=20,
                                                 temperature=1.5, top_p=1.0, seed=seed,
                                                 extra_body={"top_k": 0, "min_p": 0.0}).choices[0].text

    first, again, other = ask(11), ask(11), ask(12)
    assert first == again
    assert first != other  # temperature 1.5 on a random model: a different seed draws differently


def test_concurrent_requests_get_their_own_answers(server, greedy_answer):
    """Four requests at once on two slots (two wait): each answer equals the one-at-a-time answer."""
    expected = greedy_answer.choices[0].message.content
    completion = client(server).completions.create(model=server_model(server), prompt="The quick brown",
                                                   max_tokens=12, **GREEDY).choices[0].text

    def chat(_):
        return client(server).chat.completions.create(model=server_model(server), messages=HELLO, max_tokens=24,
                                                      **GREEDY).choices[0].message.content

    def complete(_):
        return client(server).completions.create(model=server_model(server), prompt="The quick brown", max_tokens=12,
                                                 **GREEDY).choices[0].text

    with ThreadPoolExecutor(6) as pool:
        chats = [pool.submit(chat, i) for i in range(3)]
        completions = [pool.submit(complete, i) for i in range(3)]
        assert [f.result(timeout=60) for f in chats] == [expected] * 3
        assert [f.result(timeout=60) for f in completions] == [completion] * 3


def test_unknown_model_and_n_are_refused(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-17", messages=HELLO)
    assert e.value.body["code"] == "model_not_found" and "gpt-17" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=server_model(server), messages=HELLO, n=3)
    assert e.value.body["param"] == "n"


# -- raw bad requests: a clear 4xx each, and the server keeps serving -------------------------------------
@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, "invalid_json"),
    (b"\xff\xfe", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, "invalid_json"),
    ({"messages": "hello"}, 400, "messages", "invalid_type"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "invalid_type"),
    ({"messages": HELLO, "temperature": "warm"}, 400, "temperature", "invalid_type"),
    ({"messages": HELLO, "temperature": 10**400}, 400, "temperature", "invalid_type"),
    ({"messages": HELLO, "max_tokens": 10**12}, 400, "max_tokens", "context_length_exceeded"),
    ({"messages": HELLO, "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    ({"messages": HELLO, "seed": "x"}, 400, "seed", "invalid_type"),
    ({"messages": HELLO, "stop": {"a": 1}}, 400, "stop", "invalid_type"),
    ({"messages": [{"role": "user", "content": "word " * 2000}]}, 400, "messages", "context_length_exceeded"),
])
def test_bad_chat_requests(server, body, status, param, code):
    got, reply = raw(server, "/v1/chat/completions", body)
    assert got == status, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code:
        assert error["code"] == code
    assert error["message"]


def test_top_k_too_large_for_a_float_is_still_an_integer(server):
    got, reply = raw(server, "/v1/chat/completions", {"messages": HELLO, "top_k": 10**30, "max_tokens": 2})
    assert got == 200, reply  # an integer: any size is a valid top-k (keep everything)


def test_unknown_fields_are_ignored(server):
    got, reply = raw(server, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 3, "frobnicate": [1],
                                                      "user": "me", "metadata": {"a": "b"}})
    assert got == 200 and reply["choices"][0]["message"]["content"] is not None


def test_huge_body_is_refused_with_413(server):
    body = json.dumps({"messages": [{"role": "user", "content": "x" * (10 * 1000 * 1000)}]}).encode()
    try:
        got, reply = raw(server, "/v1/chat/completions", body)
    except (ConnectionError, urllib.error.URLError) as e:  # the server may close while we still send
        pytest.fail(f"no 413 reply: {e}")
    assert got == 413 and reply["error"]["code"] == "request_too_large", reply


def test_unknown_paths_and_methods(server):
    got, reply = raw(server, "/v1/embeddings", {"input": "x"})
    assert got == 404 and reply["error"]["type"] == "invalid_request_error"
    got, reply = raw(server, "/v1/chat/completions", method="GET")
    assert got == 405 and "error" in reply


def test_server_keeps_serving_after_bad_requests(server, greedy_answer):
    for body in (b"{", b"null", b'{"messages": 1}', b'{"prompt": {}}'):
        raw(server, "/v1/chat/completions", body)
        raw(server, "/v1/completions", body)
    r = client(server).chat.completions.create(model=server_model(server), messages=HELLO, max_tokens=24, **GREEDY)
    assert r.choices[0].message.content == greedy_answer.choices[0].message.content


# -- health, metrics, info, page ----------------------------------------------------------------------
def test_health_metrics_and_info(server, factory_text_model):
    got, health = raw(server, "/health")
    assert got == 200 and health["status"] == "ok" and health["slots"] == 2
    client(server).completions.create(model=server_model(server), prompt="The quick", max_tokens=4, **GREEDY)
    got, text = raw(server, "/metrics")
    assert got == 200
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["gguf_fragments_tokens_generated_total"] >= 4
    assert values["gguf_fragments_prompt_tokens_total"] > 0
    assert values["gguf_fragments_tokens_per_second"] > 0
    assert values["gguf_fragments_queue_length"] == 0 and values["gguf_fragments_slots"] == 2
    assert values['gguf_fragments_requests_total{path="/v1/completions",status="200"}'] >= 1
    got, info = raw(server, "/info")
    assert info["model"] == factory_text_model.name and info["info"]["fragments"] > 0
    assert info["defaults"]["temperature"] == 0.8
    for path in ("/", "/app.js", "/style.css"):
        got, page = raw(server, path)
        assert got == 200 and len(page) > 500


# -- slots, queue, disconnects ------------------------------------------------------------------------
def metric(server, name: str) -> float:
    _, text = raw(server, "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_full_queue_gets_503_and_a_disconnect_stops_generation(factory_text_model):
    """One slot, one waiting place: a third request is refused; clients that leave free the slot."""
    import http.client

    slow = slowed(factory_text_model, 0.05)  # 20 tokens/s: 400 tokens would take 20 s
    with running(slow, parallel=1, queue_size=1) as s:
        host, port = "127.0.0.1", s.port
        conns = []
        # The second is sent once the first generates: requests sent together are tokenized side by
        # side, and either may reach the slot first.
        for _ in range(2):
            conn = http.client.HTTPConnection(host, port, timeout=30)
            conn.request("POST", "/v1/completions", json.dumps({"prompt": "The quick", "max_tokens": 400,
                                                                "stream": True, **GREEDY}), JSON)
            conns.append(conn)
            if len(conns) == 1:
                first = conn.getresponse()
                assert first.status == 200
                assert first.read(6) == b"data: "  # the first generates
        assert wait_for(lambda: metric(s, "gguf_fragments_queue_length") == 1)  # the second waits
        got, reply = raw(s, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert got == 503 and reply["error"]["code"] == "server_busy" and reply["error"]["type"] == "unavailable_error"
        assert "1 request is waiting" in reply["error"]["message"]
        try:  # when to ask again (the OpenAI client's retries read it)
            urllib.request.urlopen(urllib.request.Request(s.url + "/v1/completions", data=b'{"prompt": "x"}',
                                                          headers=JSON), timeout=30)
        except urllib.error.HTTPError as e:
            assert e.code == 503 and e.headers["Retry-After"] == "1"
        else:
            raise AssertionError("a full queue answered 200")
        # Both clients leave, the waiting one first (seen gone before the slot frees, it never
        # starts), then the running one (its answer stops).
        for conn in reversed(conns):
            conn.sock.close()
            conn.close()
            if conn is conns[1]:
                assert wait_for(lambda: metric(s, "gguf_fragments_queue_length") == 0)
        assert wait_for(lambda: metric(s, "gguf_fragments_requests_running") == 0
                        and metric(s, "gguf_fragments_queue_length") == 0)
        assert metric(s, "gguf_fragments_tokens_generated_total") < 100
        assert metric(s, "gguf_fragments_completions_total") == 0  # the one that ran was cancelled
        assert wait_for(lambda: metric(s, "gguf_fragments_cancelled_total") == 1)
        got, reply = raw(s, "/v1/completions", {"prompt": "The quick", "max_tokens": 3, **GREEDY})
        assert got == 200 and reply["usage"]["completion_tokens"] == 3


def test_api_key(factory_text_model):
    with running(factory_text_model, api_key="sesame") as s:
        with pytest.raises(openai.AuthenticationError):
            client(s, "wrong").models.list()
        got, reply = raw(s, "/v1/chat/completions", {"messages": HELLO})
        assert got == 401 and reply["error"]["code"] == "invalid_api_key"
        assert raw(s, "/metrics")[0] == 401 and raw(s, "/info")[0] == 401
        assert raw(s, "/health")[0] == 200 and raw(s, "/")[0] == 200  # the page asks for the key itself
        r = client(s, "sesame").chat.completions.create(model=factory_text_model.name, messages=HELLO, max_tokens=3)
        assert r.usage.completion_tokens <= 3


def test_loading_state_then_ready(factory_text_model):
    go = threading.Event()

    def load(progress):
        progress("fetching fragments", 3, 12)
        assert go.wait(30)
        return factory_text_model

    model = LoadingModel(load)
    with running(model) as s:
        got, health = raw(s, "/health")
        assert got == 503 and health["status"] == "loading"
        assert wait_for(lambda: raw(s, "/health")[1].get("done") == 3)
        assert raw(s, "/health")[1]["progress"] == 0.25
        got, reply = raw(s, "/v1/chat/completions", {"messages": HELLO})
        assert got == 503 and reply["error"]["code"] == "model_loading"
        assert raw(s, "/")[0] == 200
        go.set()
        assert wait_for(lambda: raw(s, "/health")[0] == 200)
        got, reply = raw(s, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})
        assert got == 200


def test_failed_load_is_reported(factory_text_model):
    from common.errors import UserError

    def load(progress):
        raise UserError("nowhere/: no such store directory")

    model = LoadingModel(load)
    assert model.ready_event.wait(10)
    with running(model) as s:
        got, health = raw(s, "/health")
        assert got == 503 and health["status"] == "failed" and "no such store" in health["error"]
        got, reply = raw(s, "/v1/completions", {"prompt": "x"})
        assert got == 503 and "no such store" in reply["error"]["message"]


class BrokenAfter:
    """A session that fails like a lost node after ``n`` feeds."""

    def __init__(self, session, n: int):
        self.session, self.n = session, n

    position = property(lambda self: self.session.position)
    capacity = property(lambda self: self.session.capacity)

    def feed(self, tokens, all_logits=False):
        from common.errors import UserError

        self.n -= 1
        if self.n < 0:
            raise UserError("node ws://127.0.0.1:9 (blocks 1-1) went away and no other node serves them")
        return self.session.feed(tokens, all_logits)

    def rewind(self, position):
        self.session.rewind(position)

    def close(self):
        self.session.close()


def test_a_route_that_fails_gives_503_and_the_server_keeps_serving(factory_text_model):
    from dataclasses import replace

    from common.errors import UserError

    def no_route(n):
        raise UserError("no node serves blocks 1-1")

    with running(replace(factory_text_model, open_session=no_route)) as s:
        got, reply = raw(s, "/v1/completions", {"prompt": "The quick", "max_tokens": 3})
        assert got == 503 and reply["error"]["code"] == "generation_failed" and "blocks 1-1" in reply["error"]["message"]
        got, health = raw(s, "/health")  # it answers, and says the route is the problem
        assert got == 503 and health["status"] == "degraded" and "blocks 1-1" in health["reason"]

    flaky = replace(factory_text_model, open_session=lambda n: BrokenAfter(factory_text_model.open_session(n), 4))
    with running(flaky) as s:
        req = urllib.request.Request(s.url + "/v1/completions", method="POST",
                                     data=json.dumps({"prompt": "The quick", "max_tokens": 20, "stream": True,
                                                      **GREEDY}).encode(), headers=JSON)  # (sampled: EOS may come first)
        with urllib.request.urlopen(req, timeout=30) as r:
            events = [json.loads(e[6:]) for e in r.read().decode().split("\n\n") if e and e != "data: [DONE]"]
        assert events[-1]["error"]["code"] == "generation_failed" and "went away" in events[-1]["error"]["message"]
        assert len(events) >= 2  # some text came before the failure
        got, reply = raw(s, "/v1/completions", {"prompt": "The quick", "max_tokens": 2})  # a fresh session
        assert got == 200, reply


def test_cache_prompt_feeds_only_the_new_turn(factory_text_model):
    """llama-server's cache_prompt: the next turn reuses the slot's cache and answers as a fresh run."""
    with running(factory_text_model) as s:  # one slot: every request meets the previous one's cache
        got, first = raw(s, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 8, **GREEDY})
        conversation = HELLO + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                                {"role": "user", "content": "And what did the lazy dog do?"}]
        body = {"messages": conversation, "max_tokens": 12, **GREEDY}
        got, cached = raw(s, "/v1/chat/completions", {**body, "cache_prompt": True})
        assert got == 200, cached
        got, fresh = raw(s, "/v1/chat/completions", body)
        assert got == 200, fresh
    assert cached["choices"][0]["message"]["content"] == fresh["choices"][0]["message"]["content"]
    reused = cached["usage"]["prompt_tokens_details"]["cached_tokens"]
    # At least the first turn's prompt: its answer, re-tokenized inside the template, may be split
    # differently from how it was generated, and reuse stops at the first token that differs.
    assert reused >= first["usage"]["prompt_tokens"]
    assert cached["usage"]["prompt_tokens"] == fresh["usage"]["prompt_tokens"]
    assert cached["timings"]["prompt_n"] == fresh["usage"]["prompt_tokens"] - reused
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    t = fresh["timings"]  # llama-server's fields, consistent with each other
    assert t["prompt_ms"] > 0 and t["predicted_ms"] > 0 and t["predicted_n"] == fresh["usage"]["completion_tokens"]
    assert t["prompt_per_token_ms"] == pytest.approx(t["prompt_ms"] / t["prompt_n"], abs=1e-3)
    assert t["predicted_per_second"] == pytest.approx(1000 / t["predicted_per_token_ms"], rel=1e-2)


def test_an_answer_that_fills_the_context_ends_with_length(server, factory_text_model):
    """No max_tokens: the answer runs to the end of the context (512 positions) and says so."""
    prompt = "the quick brown fox " * 35
    got, reply = raw(server, "/v1/completions", {"prompt": prompt, **GREEDY})
    assert got == 200, reply
    usage = reply["usage"]
    assert usage["prompt_tokens"] > 400 and reply["choices"][0]["finish_reason"] == "length"
    assert usage["prompt_tokens"] + usage["completion_tokens"] in (512, 513)  # the last token is never fed
