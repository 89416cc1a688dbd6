"""The HTTP server: OpenAI-compatible endpoints, health, metrics, model info and the web chat page.

    GET  /                      the chat page (api/static/: no build step, nothing from a CDN)
    GET  /health                {"status": "ok" | "loading" | "failed" | "degraded", ...}; 503 unless "ok"
                                ("degraded": the last generation failed for want of a node or route,
                                 with the "reason"; "ok" again after the next one succeeds)
    GET  /info                  the model's description (TextModel.info), slots, sampling defaults
    GET  /metrics               Prometheus text
    GET  /v1/models             the one model this server serves
    POST /v1/chat/completions   messages -> answer, streamed as server-sent events with "stream": true
    POST /v1/completions        prompt -> continuation, likewise

Every error is OpenAI's {"error": {"message", "type", "param", "code"}} with a 4xx/5xx status, and no
bad request can stop the server. POST bodies must be ``Content-Type: application/json`` (415 otherwise:
a web page elsewhere cannot make a browser send one without the browser asking first, CORS) and at
most ``max_body`` bytes (413, at once when ``Expect: 100-continue`` announces more); a body must arrive
within ``BODY_TIMEOUT`` s (408), and the bytes of bodies being received, counted as they arrive, are at
most ``body_budget`` (503 beyond). A prompt longer than the context could hold is refused before it is tokenized, and
one prompt is tokenized at a time, so a huge prompt cannot starve /health. Connections: see
common/aio_server.py (idle and silent ones closed after ``Limits.keepalive`` s, a cap on their number).
With an API key, /v1/*, /info and /metrics need ``Authorization: Bearer KEY``; the page, its files
and /health do not (the page asks for the key).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from pathlib import Path

from aiohttp import web
from aiohttp.web_urldispatcher import _default_expect_handler as _default_expect

from api.loading import LoadingModel
from api.metrics import Metrics
from api.openai_schema import APIError, Request, parse_chat, parse_completion
from api.scheduler import GenerationFailed, Job, QueueFull, Scheduler, Work
from common.aio_server import Limits, start_site
from common.errors import UserError

STATIC = Path(__file__).parent / "static"
PAGES = {"/": "index.html", "/app.js": "app.js", "/style.css": "style.css"}
MAX_BODY = 4 * 1024 * 1024  # bytes; a prompt that fills any context we run is far smaller
BODY_TIMEOUT = 30.0  # s for a request body to arrive once its headers have
BODY_BUDGET = 8 * MAX_BODY  # bytes of request bodies being received at once, all clients together
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}
SERVICE = web.AppKey("service", object)


class Service:
    """The server's state: the (maybe still loading) model, the slots, the counters."""

    def __init__(self, model: LoadingModel, parallel: int, queue_size: int, context: int | None,
                 api_key: str | None, max_body: int, body_budget: int = BODY_BUDGET):
        self.model = model
        self.parallel, self.queue_size, self.context = parallel, queue_size, context
        self.api_key, self.max_body, self.body_budget = api_key, max_body, body_budget
        self.loopback_only = False  # listening on a loopback address: requests must name it (start())
        self.metrics = Metrics()
        self.jobs: set[Job] = set()
        self.receiving = 0  # bytes of request bodies received so far by the requests still reading them
        self.tokenizing: asyncio.Semaphore | None = None  # one prompt at a time (made on the loop)
        self.failure: str | None = None  # why the last generation failed (a lost node, no route); None: it did not
        self._scheduler: Scheduler | None = None
        self._lock = threading.Lock()

    def scheduler(self) -> Scheduler:
        """The slots, started once the model is ready; 503 before."""
        model = self.model
        if model.status == "failed":
            raise APIError(503, f"the model failed to load: {model.error}", code="model_failed")
        if model.status != "ready":
            raise APIError(503, "the model is loading; try again shortly (GET /health shows progress)",
                           code="model_loading")
        with self._lock:
            if self._scheduler is None:
                self._scheduler = Scheduler(model.text_model, self.parallel, self.queue_size, self.context,
                                            on_result=self.metrics.record)
            return self._scheduler

    def load(self) -> tuple[int, int]:
        """(requests being generated, requests waiting for a slot)."""
        sched = self._scheduler
        return (sched.running, sched.queue_length) if sched is not None else (0, 0)

    def note(self, failure: "GenerationFailed | None") -> None:
        """A generation ended: a failure named in one line (503: a node lost, no route) makes
        /health "degraded" until a generation succeeds; a bug (500) says nothing about health."""
        if failure is None:
            self.failure = None
        elif failure.status == 503:
            self.failure = str(failure)

    def close(self) -> None:
        for job in list(self.jobs):
            job.cancel.set()
        if self._scheduler is not None:
            self._scheduler.close()


def make_app(model, parallel: int = 1, queue_size: int = 16, api_key: str | None = None,
             context: int | None = None, max_body: int = MAX_BODY, body_budget: int = BODY_BUDGET) -> web.Application:
    """An aiohttp application serving ``model``: a ``TextModel``, or a ``LoadingModel`` still loading."""
    if not isinstance(model, LoadingModel):
        model = LoadingModel(text_model=model)
    app = web.Application(client_max_size=max_body, middlewares=[_errors, _hosts, _auth])
    app[SERVICE] = Service(model, parallel, queue_size, context, api_key, max_body, body_budget)
    app.router.add_get("/", _page)
    app.router.add_get("/app.js", _page)
    app.router.add_get("/style.css", _page)
    app.router.add_get("/health", _health)
    app.router.add_get("/info", _info)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model_id:.+}", _model)
    app.router.add_post("/v1/chat/completions", _chat, expect_handler=_expect)
    app.router.add_post("/v1/completions", _completions, expect_handler=_expect)
    app.on_shutdown.append(_shutdown)
    return app


async def _shutdown(app: web.Application) -> None:
    await asyncio.to_thread(app[SERVICE].close)


# -- middlewares ----------------------------------------------------------------------------------
@web.middleware
async def _errors(request: web.Request, handler):
    """Any failure becomes an OpenAI-shaped JSON error; nothing a client sends stops the server."""
    service = request.app[SERVICE]
    try:
        response = await handler(request)
    except APIError as e:
        response = _error_response(e)
    except web.HTTPRequestEntityTooLarge:
        response = _error_response(APIError(413, f"the request body is larger than "
                                                 f"{service.max_body} bytes", code="request_too_large"))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        response = _error_response(APIError(e.status, f"{request.method} {request.path}: {e.reason}",
                                            code=e.reason.lower().replace(" ", "_")))
        if "Allow" in e.headers:  # a 405 says which methods the path takes (HTTP requires it)
            response.headers["Allow"] = e.headers["Allow"]
    except UserError as e:
        response = _error_response(APIError(400, str(e)))
    except Exception as e:  # noqa: BLE001 - a bug must not take the server down: report it, keep serving
        response = _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}"))
    service.metrics.count_http(_route_name(request), response.status)
    return response


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@web.middleware
async def _hosts(request: web.Request, handler):
    """DNS rebinding: a web page elsewhere whose name resolves to 127.0.0.1 is same-origin to the
    browser, and could use a server listening on loopback (without --api-key, read /info and ask the
    model). Such a request names that page's host; one from this machine names a loopback one."""
    if request.app[SERVICE].loopback_only:
        try:
            name = (request.url.host or "").lower()  # (yarl parses the Host header: port, [::1])
        except ValueError:
            name = ""
        if name not in LOOPBACK_NAMES and not name.endswith(".localhost"):
            raise APIError(403, f"Host {request.host[:80]!r} is not this server's: it listens on loopback and "
                                f"answers requests addressed to localhost or 127.0.0.1 (start it with --host to "
                                f"serve other names)", code="wrong_host")
    return await handler(request)


@web.middleware
async def _auth(request: web.Request, handler):
    key = request.app[SERVICE].api_key
    if key and (request.path.startswith("/v1/") or request.path in ("/info", "/metrics")):
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")  # the scheme is case-insensitive (RFC 7235): bearer, BEARER
        # surrogatepass: a header may hold any bytes (undecodable ones arrive as surrogates)
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), key.encode()):
            what = "wrong API key" if given else "no API key"
            raise APIError(401, f"{what}: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")
    return await handler(request)


def _route_name(request: web.Request) -> str:
    """The route's pattern, not the raw path, so metrics labels stay few."""
    route = request.match_info.route
    resource = getattr(route, "resource", None)
    return resource.canonical if resource is not None else "other"


def _unparsable(status: int, message: str) -> web.Response:
    """A request aiohttp could not parse (common/aio_server.py): in the same shape as every error.
    aiohttp's parser itself refuses a body in an encoding it has no decoder for (br, zstd), before
    the handler's own 415 for encodings other than gzip: the same 415 here, not its 400 asking to
    install a package."""
    if "Can not decode content-encoding" in message:
        return _error_response(APIError(415, f"Content-Encoding {message.rsplit(':', 1)[-1].split('.')[0].strip()[:40]}"
                                             " is not supported: send gzip or no encoding",
                                        code="unsupported_media_type"))
    return _error_response(APIError(status, f"the request could not be parsed: {message}", code="invalid_request"))


def _error_response(e: APIError) -> web.Response:
    # 503 (loading, busy): when to ask again, as HTTP says (the OpenAI client's retries read it)
    headers = {"Retry-After": "1"} if e.status == 503 else None
    if e.status == 401:  # how to authenticate, as HTTP requires of a 401
        headers = {"WWW-Authenticate": "Bearer"}
    return web.json_response(e.body(), status=e.status, headers=headers)


# -- pages, health, info --------------------------------------------------------------------------
# The page runs only its own files, and no other site may show it in a frame (where a click
# meant for that site could land on Send or Stop).
PAGE_HEADERS = {"Cache-Control": "no-cache", "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'"}


async def _page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / PAGES[request.path], headers=PAGE_HEADERS)


async def _health(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    state = service.model.snapshot()
    if state["status"] == "ready":
        state["status"] = "ok" if service.failure is None else "degraded"
        running, waiting = service.load()
        state.update(slots=service.parallel, running=running, queue=waiting)
        if service.failure is not None:
            state["reason"] = f"the last generation failed: {service.failure}"
    return web.json_response(state, status=200 if state["status"] == "ok" else 503)


async def _info(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    state = service.model.snapshot()
    out = {"state": state, "parallel": service.parallel, "queue_size": service.queue_size,
           "defaults": {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0,
                        "repeat_last_n": 64}}
    tm = service.model.text_model
    if tm is not None:
        out.update(model=tm.name, info=_described(tm.info),
                   context=min(service.context or tm.context_length, tm.context_length))
        if service.failure is not None:  # the route shown is the one that failed, until one works again
            out["info"]["route_status"] = f"failed: {service.failure}"
    return web.Response(text=json.dumps(out, default=str), content_type="application/json")


def _described(info: dict) -> dict:
    """TextModel.info as JSON values. A callable value is a live figure (a distributed route's nodes
    and ms per token change as sessions open and fail over): it is asked now."""
    out = {}
    for key, value in info.items():
        if callable(value):
            try:
                value = value()
            except Exception as e:  # noqa: BLE001 - a description must not fail the request
                value = f"unavailable ({e})"
        out[key] = value
    return json.loads(json.dumps(out, default=str))


async def _metrics(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    running, waiting = service.load()
    text = service.metrics.render(running=running, queued=waiting, parallel=service.parallel,
                                  ready=service.model.status == "ready")
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


def _model_card(service: Service) -> dict:
    service.scheduler()  # 503 while loading
    tm = service.model.text_model
    return {"id": tm.name, "object": "model", "created": int(service.model.started_wall), "owned_by": "gguf-fragments",
            "meta": _described(tm.info)}


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app[SERVICE])]})


async def _model(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    card = _model_card(service)
    if request.match_info["model_id"] != card["id"]:
        raise _unknown_model(request.match_info["model_id"], card["id"])
    return web.json_response(card)


def _unknown_model(asked: str, served: str) -> APIError:
    return APIError(404, f"model {asked!r} does not exist; this server serves {served!r}", param="model",
                    code="model_not_found")


# -- completions ----------------------------------------------------------------------------------
async def _expect(request: web.Request):
    """``Expect: 100-continue``: refuse a body we would refuse anyway before the client sends it."""
    try:
        _check_headers(request)
        if request.app[SERVICE].api_key:
            await _auth(request, _nothing)
    except APIError as e:
        return _error_response(e)
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":  # (aiohttp's own answer to it is plain text)
        return _error_response(APIError(417, f"Expect: {expect[:80]!r} is not supported (only 100-continue)",
                                        code="expectation_failed"))
    return await _default_expect(request)


async def _nothing(request: web.Request) -> None:
    return None


def _check_headers(request: web.Request) -> None:
    """A POST body is JSON and fits: 415 / 413 from the headers alone."""
    service = request.app[SERVICE]
    if request.content_type != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {request.content_type!r}",
                       code="unsupported_media_type")
    if request.content_length is not None and request.content_length > service.max_body:
        raise APIError(413, f"the request body is larger than {service.max_body} bytes", code="request_too_large")
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in ("identity", "gzip"):  # (aiohttp waits out a bad deflate body, passes others on undecoded)
        raise APIError(415, f"Content-Encoding {coding[:40]!r} is not supported: send gzip or no encoding",
                       code="unsupported_media_type")


async def _read_json(request: web.Request):
    raw = await _read_body(request)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        what = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise APIError(400, f"the request body is not valid JSON ({what})", code="invalid_json") from None


async def _read_body(request: web.Request) -> bytes:
    """The body, counted against ``body_budget`` as its bytes arrive: a client that announces 4 MiB
    and sends one byte holds one byte of the budget, not four megabytes (eight such connections
    used to turn every other client away for 30 s)."""
    service = request.app[SERVICE]
    _check_headers(request)
    chunks, held = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            while chunk := await request.content.readany():  # (decompressed, when the body is gzip)
                if held + len(chunk) > service.max_body:
                    raise APIError(413, f"the request body is larger than {service.max_body} bytes",
                                   code="request_too_large")
                if service.receiving + len(chunk) > service.body_budget:
                    raise APIError(503, "server busy: too many request bodies are being received; retry later",
                                   code="server_busy")
                service.receiving += len(chunk)
                held += len(chunk)
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {BODY_TIMEOUT:g}s",
                       code="request_timeout") from None
    except (APIError, web.HTTPException, asyncio.CancelledError):
        raise
    except Exception as e:  # noqa: BLE001 - a broken gzip body, a truncated chunk: the client's fault
        raise APIError(400, f"the request body could not be read ({type(e).__name__}: {e})",
                       code="invalid_body") from None
    finally:
        service.receiving -= held
    return b"".join(chunks)


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _complete(request, parse_chat)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, parse_completion)


def _prompt_chars(req: Request) -> int:
    if req.kind == "chat":
        return sum(len(m["content"]) for m in req.messages)
    return len(req.prompt)


def _max_token_chars(text_model) -> int | None:
    """The most characters one token can stand for: its vocabulary entry's length (byte-level
    BPE entries are one character per byte, and a character is at least one byte; SentencePiece
    entries are the text with spaces as one character each). None when there is no such bound: a
    SentencePiece vocabulary without byte tokens maps unknown text to <unk>, of any length.
    Cached on the tokenizer."""
    tok = text_model.tokenizer
    cached = getattr(tok, "_api_max_token_chars", 0)
    if cached == 0:
        from gguf.constants import TokenType

        unbounded = tok.kind == "llama" and int(TokenType.BYTE) not in set(tok.types)
        cached = None if unbounded else max((len(t) for t in tok.tokens), default=1)
        try:
            tok._api_max_token_chars = cached
        except AttributeError:
            pass
    return cached


def _too_long(text_model, req: Request, context: int) -> None:
    """Refuse, without tokenizing, a prompt that cannot fit: n tokens cover at most
    n * (longest vocabulary entry) characters, so more characters than context * that (twice,
    for safety) can only be more tokens than the context holds. Tokenizing megabytes would hold
    the interpreter for seconds."""
    longest = _max_token_chars(text_model)
    if longest is None:
        return
    limit = 2 * context * longest
    chars = _prompt_chars(req)
    if chars > limit:
        where = "messages" if req.kind == "chat" else "prompt"
        raise APIError(400, f"{where}: the prompt is {chars} characters; the context window holds "
                            f"{context} tokens, which cover at most {limit} characters",
                       param=where, code="context_length_exceeded")


QUEUED_TOKENIZING = 64 * 1024  # characters: longer prompts are tokenized one at a time


async def _tokenize(service: Service, text_model, req: Request) -> tuple[list[int], list[str]]:
    """The prompt's tokens, on a worker thread. Long prompts one at a time: their encoding lets go
    of the interpreter's lock, but the rest of the work (the special-token split, the id lists, a
    chat template) holds it, and a client sending megabyte prompts on many connections would take
    all of it. A short prompt does not wait behind them (it waited a second behind each such
    prompt, its tokens 100 ms away)."""
    if _prompt_chars(req) < QUEUED_TOKENIZING:
        return await asyncio.to_thread(_prompt, text_model, req)
    if service.tokenizing is None:
        service.tokenizing = asyncio.Semaphore(1)
    async with service.tokenizing:
        return await asyncio.to_thread(_prompt, text_model, req)


def _prompt(text_model, req: Request) -> tuple[list[int], list[str]]:
    if req.kind == "chat":
        try:
            return text_model.chat_prompt(req.messages)
        except UserError as e:  # (the model's chat template refused them, or ran too long on them)
            raise APIError(400, f"messages: {e}", param="messages") from None
    return text_model.raw_prompt(req.prompt), []


async def _complete(request: web.Request, parse) -> web.StreamResponse:
    service = request.app[SERVICE]
    body = await _read_json(request)
    scheduler = service.scheduler()
    text_model = scheduler.text_model
    req = parse(body, scheduler.context)
    if req.model is not None and req.model != text_model.name:
        raise _unknown_model(req.model, text_model.name)
    req.sampling.validate()  # the parser checked every range already; a UserError here is a 400
    _too_long(text_model, req, scheduler.context)
    tokens, template_stops = await _tokenize(service, text_model, req)
    where = "messages" if req.kind == "chat" else "prompt"
    if not tokens:
        raise APIError(400, f"{where}: the prompt is empty", param=where, code="invalid_value")
    if len(tokens) >= scheduler.context:
        raise APIError(400, f"{where}: the prompt is {len(tokens)} tokens; the context window holds "
                            f"{scheduler.context}", param=where, code="context_length_exceeded")
    room = scheduler.context - len(tokens)
    work = Work(tokens, min(req.max_tokens or room, room), req.sampling, req.stop + template_stops,
                req.cache_prompt)
    job = Job(work, asyncio.get_running_loop())
    try:
        scheduler.submit(job)
    except QueueFull as e:
        service.metrics.count_rejected()
        raise APIError(503, f"server busy: {e}; retry later", code="server_busy") from None
    service.jobs.add(job)
    try:
        reply = _Reply(req, text_model.name)
        if req.stream:
            return await _stream(request, job, reply, service)
        pieces = [p async for p in job.pieces()]
        service.note(None)
        return web.json_response(reply.whole("".join(pieces), job))
    except GenerationFailed as e:
        service.note(e)
        raise _failed(e) from None
    finally:
        job.cancel.set()  # the client left (handler cancelled) or we are done: the worker stops either way
        scheduler.withdraw(job)  # still queued: its place is free now, not when a slot reaches it
        service.jobs.discard(job)


async def _stream(request: web.Request, job: Job, reply: "_Reply", service: "Service") -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    try:
        if reply.chat:  # the role comes first, before any token
            await _send(response, reply.first_chunk())
        try:
            async for piece in job.pieces():
                await _send(response, reply.chunk(piece))
        except GenerationFailed as e:  # headers are sent: the error goes in the stream
            service.note(e)
            await _send(response, _failed(e).body())
        else:
            service.note(None)
            await _send(response, reply.last_chunk(job))
            if reply.req.include_usage:
                await _send(response, reply.usage_chunk(job))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        job.cancel.set()  # the client went away: stop generating for it
    return response


def _failed(e: GenerationFailed) -> APIError:
    if e.status == 400:
        return APIError(400, str(e), code="context_length_exceeded")
    return APIError(e.status, f"generation failed: {e}", code="generation_failed")


async def _send(response: web.StreamResponse, payload: dict) -> None:
    await response.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")


class _Reply:
    """OpenAI's reply shapes for one request: whole, or as stream chunks."""

    def __init__(self, req: Request, model: str):
        self.req, self.model = req, model
        self.chat = req.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def _choice(self, text: str | None, finish: str | None, role: bool = False) -> dict:
        if self.chat:
            delta = ({"role": "assistant", "content": text} if role else {"content": text}) if text is not None else {}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def _stream_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _streamed(self, choices: list) -> dict:
        out = self._envelope(self._stream_object(), choices)
        if self.req.include_usage:  # OpenAI's form: "usage": null on every chunk but the usage chunk
            out["usage"] = None
        return out

    def first_chunk(self) -> dict:
        return self._streamed([self._choice("", None, role=True)])

    def chunk(self, text: str) -> dict:
        return self._streamed([self._choice(text, None)])

    def last_chunk(self, job: Job) -> dict:
        out = self._streamed([self._choice(None, _finish(job.result))])
        out["timings"] = _timings(job)
        return out

    def usage_chunk(self, job: Job) -> dict:
        out = self._envelope(self._stream_object(), [])
        out["usage"] = _usage(job)
        return out

    def whole(self, text: str, job: Job) -> dict:
        finish = _finish(job.result)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        out = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        out.update(usage=_usage(job), timings=_timings(job))
        return out


def _finish(result) -> str:
    return FINISH.get(result.stop_reason, "stop") if result is not None else "stop"


def _usage(job: Job) -> dict:
    """Counts as OpenAI reports them: the whole prompt, of which ``cached_tokens`` came from the cache."""
    prompt = len(job.work.prompt_tokens)
    generated = len(job.result.tokens) if job.result is not None else 0
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
            "prompt_tokens_details": {"cached_tokens": job.reused}}


def _timings(job: Job) -> dict:
    """llama-server's extension: this request's speeds; prompt_n tokens fed, cache_n reused."""
    result = job.result
    if result is None:
        return {}
    prompt_n, steps = len(result.prompt_tokens), result.decode_steps
    return {"cache_n": job.reused, "prompt_n": prompt_n, "prompt_ms": round(result.prefill_s * 1000, 3),
            "prompt_per_token_ms": round(result.prefill_s * 1000 / prompt_n, 3) if prompt_n else 0.0,
            "prompt_per_second": round(result.prefill_tok_s, 2), "predicted_n": len(result.tokens),
            "predicted_ms": round(result.decode_s * 1000, 3),
            "predicted_per_token_ms": round(result.decode_s * 1000 / steps, 3) if steps else 0.0,
            "predicted_per_second": round(result.decode_tok_s, 2)}


# -- running it -----------------------------------------------------------------------------------
async def start(app: web.Application, host: str = "127.0.0.1", port: int = 8080,
                limits: Limits = Limits()) -> tuple[web.AppRunner, int]:
    """Listen on host:port (0: any free port); returns the runner and the port bound. An address
    that cannot be listened on is a UserError naming --host/--port.

    ``handler_cancellation``: a client that disconnects cancels its handler, whose ``finally`` sets
    the job's cancel event, so a request waiting in the queue or generating stops at once.
    ``limits``: idle and silent connections, stalled bodies and the connection count are bounded.
    """
    app[SERVICE].loopback_only = _is_loopback(host)
    try:
        return await start_site(app, host, port, limits, error_reply=_unparsable, handler_cancellation=True,
                                access_log=None)
    except OSError as e:  # unresolvable host, address in use, no permission for the port
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ServerThread:
    """The server on its own thread and event loop (tests, and anything embedding it)."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0, limits: Limits = Limits()):
        self.app, self.host = app, host
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.runner, self.port = self.loop.run_until_complete(start(app, host, port, limits))
            except BaseException as e:  # noqa: BLE001 - re-raised in the constructor
                self.error = e
                started.set()
                return
            started.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self.runner.cleanup())
            self.loop.close()

        self.thread = threading.Thread(target=run, name="api-server", daemon=True)
        self.thread.start()
        started.wait(30)
        if self.error:
            raise self.error
        self.url = f"http://{host}:{self.port}"

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
