"""The API server under hostile clients: huge prompts, slow or idle connections, stalled bodies,
too many connections, malformed input that must be a 4xx naming the field, clients that leave the
queue. Loopback only; every wait is bounded."""

from __future__ import annotations

import gzip
import io
import json
import logging
import socket
import threading
import time

import pytest

from api.server import MAX_BODY
from common.aio_server import Limits, OneLineLogs, quiet_logs
from tests.api.conftest import running, slowed
from tests.api.test_server import GREEDY, JSON, metric, raw, wait_for

FAST = Limits(keepalive=1.0, body_timeout=1.0, sweep_every=0.2)


@pytest.fixture(scope="module")
def server(factory_text_model):
    with running(factory_text_model, parallel=1, queue_size=4, api_key="sesame", limits=FAST) as s:
        yield s


AUTH = {"Authorization": "Bearer sesame", **JSON}


def send(server, data: bytes, timeout: float = 10) -> tuple[bytes, float]:
    """Raw bytes to the server; (everything it answered until it closed, seconds taken)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        return _read_all(sock), time.monotonic() - t0


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (socket.timeout, ConnectionResetError):
        out += b"<cut>"
    return out


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> dict:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def post(path: str, body: bytes, headers: dict) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}", "Connection: close"]
    head = "\r\n".join(lines + [f"{k}: {v}" for k, v in headers.items()]) + "\r\n\r\n"
    return head.encode("utf-8", "surrogateescape") + body


# -- a huge prompt ------------------------------------------------------------------------------------
def test_a_4mb_prompt_is_refused_cheaply_and_health_stays_fast(server):
    body = json.dumps({"prompt": "hello world " * 330000, "max_tokens": 1}).encode()
    assert len(body) < MAX_BODY
    replies = []

    def big():
        replies.append(raw(server, "/v1/completions", body, headers=AUTH, timeout=60))

    threads = [threading.Thread(target=big) for _ in range(3)]
    for t in threads:
        t.start()
    slowest = 0.0
    while any(t.is_alive() for t in threads):
        t0 = time.monotonic()
        assert raw(server, "/health", timeout=10)[0] == 200
        slowest = max(slowest, time.monotonic() - t0)
        time.sleep(0.02)
    for t in threads:
        t.join(60)
    assert slowest < 1.0, f"/health took {slowest:.2f}s while 4 MB prompts were refused"
    for status, reply in replies:
        assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
        assert reply["error"]["param"] == "prompt" and "characters" in reply["error"]["message"]


def test_the_character_bound_never_refuses_a_prompt_that_fits(server, factory_text_model):
    """A prompt just under the bound is tokenized (and then refused, or not, by its token count)."""
    from api.server import _max_token_chars

    ctx = factory_text_model.context_length
    longest = max(factory_text_model.tokenizer.tokens, key=len)
    text = longest * ctx  # ctx tokens at most: one vocabulary entry each
    status, reply = raw(server, "/v1/completions", {"prompt": text[: 2 * ctx * _max_token_chars(factory_text_model)],
                                                    "max_tokens": 1}, headers=AUTH)
    assert status == 400 and "tokens" in reply["error"]["message"] and "characters" not in reply["error"]["message"]


# -- slow, idle and too many connections ------------------------------------------------------------
def test_silent_dripping_and_stalled_connections_are_closed(server):
    socks = {name: socket.create_connection(("127.0.0.1", server.port), timeout=10) for name in
             ("silent", "headers", "body")}
    socks["headers"].sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    socks["body"].sendall(post("/v1/chat/completions", b"", AUTH).replace(b"Content-Length: 0",
                                                                            b"Content-Length: 100") + b"{")
    t0, closed = time.monotonic(), {}
    while len(closed) < 3 and time.monotonic() - t0 < 8:
        for name, sock in socks.items():
            if name in closed:
                continue
            try:
                if name == "headers":
                    sock.sendall(b"X-a: b\r\n")
                elif name == "body":
                    sock.sendall(b" ")
                sock.settimeout(0.05)
                data = sock.recv(65536)
                if not data or data.startswith(b"HTTP/1.1 408"):
                    closed[name] = time.monotonic() - t0
            except socket.timeout:
                pass
            except OSError:
                closed[name] = time.monotonic() - t0
        time.sleep(0.2)
    for sock in socks.values():
        sock.close()
    assert set(closed) == {"silent", "headers", "body"}, f"still open after 8 s: {set(socks) - set(closed)}"
    assert max(closed.values()) < 5


def test_connections_beyond_the_cap_are_refused_and_the_server_recovers(factory_text_model):
    with running(factory_text_model, limits=Limits(keepalive=30, max_connections=4)) as s:
        idle = [socket.create_connection(("127.0.0.1", s.port), timeout=5) for _ in range(4)]
        time.sleep(0.2)
        answer, _ = send(s, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", timeout=5)
        assert status_of(answer) == 503  # refused at once, not left to time out
        for sock in idle:
            sock.close()
        assert wait_for(lambda: raw(s, "/health", timeout=5)[0] == 200, timeout=5)


def test_stalled_bodies_are_capped_by_the_body_budget(factory_text_model):
    """Bodies being received hold at most body_budget bytes: one more is refused (503) at once."""
    with running(factory_text_model, max_body=1000, body_budget=2000, limits=FAST) as s:
        stalled = []
        for _ in range(2):  # 999 of 1000 declared bytes each: 2000 bytes reserved
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
            sock.sendall(post("/v1/completions", b"x" * 1000, JSON)[:-1])
            stalled.append(sock)
        time.sleep(0.3)
        status, reply = raw(s, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, timeout=5)
        assert status == 503 and reply["error"]["code"] == "server_busy"
        for sock in stalled:  # the body deadline answers 408 (or closes) and frees the budget
            sock.settimeout(5)
            answer = _read_all(sock)
            assert answer == b"" or status_of(answer) == 408
            sock.close()
        assert raw(s, "/v1/completions", {"prompt": "hi", "max_tokens": 1, **GREEDY}, timeout=30)[0] == 200


def test_bodies_announced_but_not_sent_hold_no_budget(factory_text_model):
    """The budget counts bytes received, not bytes announced: connections that each announce the
    largest body and send one byte used to hold all of it, and every other client got 503 for 30 s."""
    with running(factory_text_model, max_body=1000, body_budget=2000, limits=FAST) as s:
        stalled = []
        for _ in range(4):  # 4 x 1000 announced, far over the budget; 4 bytes sent
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
            sock.sendall(post("/v1/completions", b"x" * 1000, JSON)[:-999])
            stalled.append(sock)
        time.sleep(0.3)
        try:
            assert raw(s, "/v1/completions", {"prompt": "hi", "max_tokens": 1, **GREEDY}, timeout=30)[0] == 200
        finally:
            for sock in stalled:
                sock.close()


def test_expect_100_continue_with_a_too_large_body_gets_413_at_once(server):
    head = post("/v1/completions", b"", {**AUTH, "Expect": "100-continue"}).replace(
        b"Content-Length: 0", f"Content-Length: {10 * MAX_BODY}".encode())
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head)
        first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 413"), first[:80]
    assert body_of(first)["error"]["code"] == "request_too_large"


# -- bad input: a 4xx naming the field, never a 500 ---------------------------------------------------
@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800 hi"}]}', "messages[0].content"),
    ("/v1/completions", '{"prompt": "\\ud800 hi"}', "prompt"),
    ("/v1/completions", '{"prompt": "hi", "temperature": 5e-324}', "temperature"),
    ("/v1/completions", '{"prompt": "hi", "repeat_penalty": 5e-324}', "repeat_penalty"),
    ("/v1/completions", '{"prompt": "hi", "repeat_penalty": 1e300}', "repeat_penalty"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}',
     "max_completion_tokens"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, '
                             '"max_completion_tokens": 100000000}', "max_completion_tokens"),
    ("/v1/completions", '{"prompt": "hi", "stream": true, "stream_options": {"include_usage": 1}}',
     "stream_options.include_usage"),
])
def test_bad_fields_are_400s_naming_the_field(server, path, body, param):
    status, reply = raw(server, path, body.encode(), headers=AUTH)
    assert status == 400, reply
    assert reply["error"]["param"] == param and reply["error"]["message"].startswith(param)


def test_token_id_prompts_are_refused_by_name(server):
    status, reply = raw(server, "/v1/completions", {"prompt": [1, 2, 3]}, headers=AUTH)
    assert status == 400 and "token-id prompts are not supported" in reply["error"]["message"]


@pytest.mark.parametrize("body, headers, status, code", [
    (b"[" * 200000 + b"]" * 200000, {}, 400, "invalid_json"),
    (b"not gzip at all", {"Content-Encoding": "gzip"}, 400, "invalid_body"),
    (gzip.compress(b'{"prompt": "hi", "max_tokens": 1, "temperature": 0}'), {"Content-Encoding": "gzip"}, 200, None),
    (b'{"prompt": "hi"}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    (b'{"prompt": "hi"}', {"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    # an encoding aiohttp does not decode was read as it came
    (b'{"prompt": "hi"}', {"Content-Encoding": "compress"}, 415, "unsupported_media_type"),
    # encodings aiohttp's parser refuses itself, without its decoder installed (it said to install one)
    (b'{"prompt": "hi"}', {"Content-Encoding": "zstd"}, 415, "unsupported_media_type"),
    (b'{"prompt": "hi"}', {"Content-Encoding": "br"}, 415, "unsupported_media_type"),
    (b'{"prompt": "hi", "max_tokens": 1}', {"Content-Encoding": "identity"}, 200, None),
])
def test_bad_bodies_are_4xx(server, body, headers, status, code):
    answer, _ = send(server, post("/v1/completions", body, {**AUTH, **headers}))
    assert status_of(answer) == status, answer[:300]
    if code:
        assert body_of(answer)["error"]["code"] == code
        assert body_of(answer)["error"]["type"] == "invalid_request_error"  # the client's mistake, not ours


def test_a_deflate_body_is_refused_at_once_not_waited_out(server):
    """aiohttp cannot tell that this deflate body is broken and waited for more until the 30 s
    body deadline (408); sent with the headers, its parser refused it in plain text."""
    head = post("/v1/completions", b"abcd", {**AUTH, "Content-Encoding": "deflate"})
    split = head.index(b"\r\n\r\n") + 4
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head[:split])  # the headers alone: the answer comes from them, no body awaited
        t0 = time.monotonic()
        answer = sock.recv(65536)
    assert status_of(answer) == 415 and time.monotonic() - t0 < 5
    assert body_of(answer)["error"]["code"] == "unsupported_media_type"
    answer, _ = send(server, head)  # headers and body in one read
    assert 400 <= status_of(answer) < 500 and "error" in body_of(answer)


@pytest.mark.parametrize("data", [
    b"GET /health HTTP/1.1 extra\r\nHost: 127.0.0.1\r\n\r\n",  # a malformed request line
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",  # a header over aiohttp's limit
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",  # a chunk size that is no number
])
def test_requests_aiohttp_cannot_parse_get_a_json_error(server, data):
    """aiohttp answers these itself, before any handler; in plain text unless told otherwise."""
    answer, _ = send(server, data)
    assert status_of(answer) == 400 and b"application/json" in answer.split(b"\r\n\r\n")[0], answer[:300]
    assert body_of(answer)["error"]["code"] == "invalid_request"
    assert raw(server, "/health")[0] == 200  # and the server goes on


@pytest.mark.parametrize("key", ["Bearer s\u00e9same", "Bearer \udcff\udcfe", "Bearer \u2603"])
def test_a_non_ascii_api_key_is_a_401(server, key):
    answer, _ = send(server, post("/v1/completions", b'{"prompt": "hi"}', {**JSON, "Authorization": key}))
    assert status_of(answer) == 401 and body_of(answer)["error"]["code"] == "invalid_api_key"
    assert b"\r\nWWW-Authenticate: Bearer\r\n" in answer.split(b"\r\n\r\n")[0] + b"\r\n"


def test_a_405_names_the_allowed_methods(server):
    answer, _ = send(server, b"GET /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sesame\r\n"
                             b"Connection: close\r\n\r\n")
    head = answer.split(b"\r\n\r\n")[0].decode()
    assert status_of(answer) == 405 and "error" in body_of(answer)
    assert "Allow: POST" in head, head


def test_an_unknown_expectation_is_a_json_417(server):
    answer, _ = send(server, post("/v1/completions", b'{"prompt": "hi"}', {**AUTH, "Expect": "something-else"}))
    assert status_of(answer) == 417 and body_of(answer)["error"]["code"] == "expectation_failed"


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
def test_the_auth_scheme_is_case_insensitive(server, scheme):
    answer, _ = send(server, post("/v1/completions", b'{"prompt": "hi", "max_tokens": 1}',
                                  {**JSON, "Authorization": f"{scheme} sesame"}))
    assert status_of(answer) == 200, answer[:300]
    answer, _ = send(server, post("/v1/completions", b'{"prompt": "hi"}', {**JSON, "Authorization": f"{scheme} sesam"}))
    assert status_of(answer) == 401


# -- the queue ----------------------------------------------------------------------------------------
def test_clients_that_leave_the_queue_free_their_places_at_once(factory_text_model):
    import http.client

    slow = slowed(factory_text_model, 0.05)
    with running(slow, parallel=1, queue_size=2) as s:
        conns = []
        for _ in range(3):
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
            conn.request("POST", "/v1/completions", json.dumps({"prompt": "The quick", "max_tokens": 200,
                                                                "stream": True, **GREEDY}), JSON)
            conns.append(conn)
            if len(conns) == 1:  # the others are sent once it generates (sent together, any may go first)
                first = conn.getresponse()
                assert first.status == 200 and first.read(6) == b"data: "
        assert wait_for(lambda: metric(s, "gguf_fragments_queue_length") == 2)
        for conn in conns[1:]:  # the two waiting clients leave; the first still generates
            conn.sock.close()
            conn.close()
        assert wait_for(lambda: metric(s, "gguf_fragments_queue_length") == 0, timeout=5)
        assert metric(s, "gguf_fragments_requests_running") == 1
        replies = []
        threads = [threading.Thread(target=lambda: replies.append(
            raw(s, "/v1/completions", {"prompt": "x", "max_tokens": 1, **GREEDY}, timeout=60))) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        conns[0].sock.close()
        conns[0].close()
        for t in threads:
            t.join(60)
        assert [r[0] for r in replies] == [200, 200]  # both got a place: none was held by a gone client


# -- logs -----------------------------------------------------------------------------------------------
def test_malformed_requests_log_one_line_each_rate_limited(server):
    stream = io.StringIO()
    quiet_logs(stream, prefix="api")
    try:
        for garbage in (b"GET / HTTP/9.9\r\n\r\n", b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
                        b"POST /v1/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                        b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n") * 3:
            answer, _ = send(server, garbage, timeout=5)
            assert answer[:15] in (b"HTTP/1.1 400 Ba", b"HTTP/1.0 400 Ba") or answer in (b"", b"<cut>"), answer[:100]
        assert raw(server, "/health")[0] == 200
    finally:
        for name in ("aiohttp", "asyncio"):
            logging.getLogger(name).handlers[:] = []
            logging.getLogger(name).propagate = True
    text = stream.getvalue()
    assert "Bad status line" in text and "Traceback" not in text
    assert all(line.startswith("api: ") for line in text.splitlines())
    assert len(text.splitlines()) <= 5  # 15 bad requests of 5 kinds: each kind once per 10 s


def test_one_line_logs_are_rate_limited():
    filt = OneLineLogs(every=60)
    try:
        raise OSError(24, "Too many open files")
    except OSError:
        import sys

        exc_info = sys.exc_info()
    records = [logging.LogRecord("asyncio", logging.ERROR, "x", 1, "socket.accept() out of system resource",
                                 (), exc_info) for _ in range(1000)]
    passed = [r for r in records if filt.filter(r)]
    assert len(passed) == 1 and "Too many open files" in passed[0].getMessage() and passed[0].exc_info is None
    filt.last = {k: (when - 61, n) for k, (when, n) in filt.last.items()}  # a minute later
    again = logging.LogRecord("asyncio", logging.ERROR, "x", 1, "socket.accept() out of system resource", (),
                              exc_info)
    assert filt.filter(again) and "999 more like it" in again.getMessage()


# -- health after a failed route ------------------------------------------------------------------------
def test_health_is_degraded_after_a_generation_fails_for_want_of_a_node(factory_text_model):
    """A route with no node (a UserError from the session) makes /health 503 "degraded" naming the
    reason, and /info marks the route; the next generation that works makes it "ok" again."""
    from dataclasses import replace

    from common.errors import UserError

    broken = {"now": True}

    def open_session(n):
        if broken["now"]:
            raise UserError("no node serves blocks 0-1 (ws://127.0.0.1:9/swarm stopped answering)")
        return factory_text_model.open_session(n)

    with running(replace(factory_text_model, open_session=open_session)) as s:
        assert raw(s, "/health")[0] == 200
        status, reply = raw(s, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 503 and reply["error"]["code"] == "generation_failed"
        status, health = raw(s, "/health")
        assert status == 503 and health["status"] == "degraded" and "no node serves blocks 0-1" in health["reason"]
        assert "no node serves" in raw(s, "/info")[1]["info"]["route_status"]
        broken["now"] = False
        assert raw(s, "/v1/completions", {"prompt": "hi", "max_tokens": 2, **GREEDY})[0] == 200
        status, health = raw(s, "/health")
        assert status == 200 and health["status"] == "ok" and "reason" not in health


def test_no_character_bound_when_unknown_text_has_no_bound():
    """A SentencePiece vocabulary without byte tokens maps unknown text to one <unk> of any length:
    no character count proves such a prompt too long, so it goes to the tokenizer."""
    from types import SimpleNamespace

    from api.openai_schema import Request
    from api.server import _too_long

    def model(types):
        return SimpleNamespace(tokenizer=SimpleNamespace(kind="llama", tokens=["<unk>", "a", "\u2581b"], types=types))

    req = Request(kind="completion", prompt="\u4e00" * 1000)
    _too_long(model([2, 1, 1]), req, context=4)  # no BYTE (6) token: not refused here
    with pytest.raises(Exception, match="characters"):
        _too_long(model([2, 1, 1, 6]), req, context=4)  # with byte fallback: 4 tokens cover <= 2 * 4 * 5 chars


@pytest.mark.parametrize("host, status", [("evil.example:8080", 403), ("localhost:1", 200), ("127.0.0.1", 200),
                                          ("[::1]:8080", 200), ("app.localhost", 200)])
def test_a_loopback_server_answers_only_requests_addressed_to_loopback(server, host, status):
    """DNS rebinding: a page at evil.example resolving to 127.0.0.1 is same-origin to the browser;
    its requests name evil.example. The server checked no Host and answered them."""
    answer, _ = send(server, f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    assert status_of(answer) == status, answer[:200]
    if status == 403:
        assert body_of(answer)["error"]["code"] == "wrong_host"
