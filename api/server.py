"""The HTTP server: OpenAI-compatible endpoints, health, metrics, model info and the web chat page.

    GET  /                      the chat page (api/static/: no build step, nothing from a CDN)
    GET  /health                {"status": "ok" | "loading" | "failed", ...}; 503 until the model is ready
    GET  /info                  the model's description (TextModel.info), slots, sampling defaults
    GET  /metrics               Prometheus text
    GET  /v1/models             the one model this server serves
    POST /v1/chat/completions   messages -> answer, streamed as server-sent events with "stream": true
    POST /v1/completions        prompt -> continuation, likewise

Every error is OpenAI's {"error": {"message", "type", "param", "code"}} with a 4xx/5xx status, and no
bad request can stop the server. With an API key, /v1/*, /info and /metrics need
``Authorization: Bearer KEY``; the page, its files and /health do not (the page asks for the key).
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

from api.loading import LoadingModel
from api.metrics import Metrics
from api.openai_schema import APIError, Request, parse_chat, parse_completion
from api.scheduler import GenerationFailed, Job, QueueFull, Scheduler, Work
from common.errors import UserError

STATIC = Path(__file__).parent / "static"
PAGES = {"/": "index.html", "/app.js": "app.js", "/style.css": "style.css"}
MAX_BODY = 4 * 1024 * 1024  # bytes; a prompt that fills any context we run is far smaller
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}
SERVICE = web.AppKey("service", object)


class Service:
    """The server's state: the (maybe still loading) model, the slots, the counters."""

    def __init__(self, model: LoadingModel, parallel: int, queue_size: int, context: int | None,
                 api_key: str | None, max_body: int):
        self.model = model
        self.parallel, self.queue_size, self.context = parallel, queue_size, context
        self.api_key, self.max_body = api_key, max_body
        self.metrics = Metrics()
        self.jobs: set[Job] = set()
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

    def close(self) -> None:
        for job in list(self.jobs):
            job.cancel.set()
        if self._scheduler is not None:
            self._scheduler.close()


def make_app(model, parallel: int = 1, queue_size: int = 16, api_key: str | None = None,
             context: int | None = None, max_body: int = MAX_BODY) -> web.Application:
    """An aiohttp application serving ``model``: a ``TextModel``, or a ``LoadingModel`` still loading."""
    if not isinstance(model, LoadingModel):
        model = LoadingModel(text_model=model)
    app = web.Application(client_max_size=max_body, middlewares=[_errors, _auth])
    app[SERVICE] = Service(model, parallel, queue_size, context, api_key, max_body)
    app.router.add_get("/", _page)
    app.router.add_get("/app.js", _page)
    app.router.add_get("/style.css", _page)
    app.router.add_get("/health", _health)
    app.router.add_get("/info", _info)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model_id:.+}", _model)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
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
    except UserError as e:
        response = _error_response(APIError(400, str(e)))
    except Exception as e:  # noqa: BLE001 - a bug must not take the server down: report it, keep serving
        response = _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}"))
    service.metrics.count_http(_route_name(request), response.status)
    return response


@web.middleware
async def _auth(request: web.Request, handler):
    key = request.app[SERVICE].api_key
    if key and (request.path.startswith("/v1/") or request.path in ("/info", "/metrics")):
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            what = "wrong API key" if given else "no API key"
            raise APIError(401, f"{what}: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")
    return await handler(request)


def _route_name(request: web.Request) -> str:
    """The route's pattern, not the raw path, so metrics labels stay few."""
    route = request.match_info.route
    resource = getattr(route, "resource", None)
    return resource.canonical if resource is not None else "other"


def _error_response(e: APIError) -> web.Response:
    return web.json_response(e.body(), status=e.status)


# -- pages, health, info --------------------------------------------------------------------------
async def _page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / PAGES[request.path], headers={"Cache-Control": "no-cache"})


async def _health(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    state = service.model.snapshot()
    if state["status"] == "ready":
        state["status"] = "ok"
        running, waiting = service.load()
        state.update(slots=service.parallel, running=running, queue=waiting)
    return web.json_response(state, status=200 if state["status"] == "ok" else 503)


async def _info(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    state = service.model.snapshot()
    out = {"state": state, "parallel": service.parallel, "queue_size": service.queue_size,
           "defaults": {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0}}
    tm = service.model.text_model
    if tm is not None:
        out.update(model=tm.name, info=_described(tm.info),
                   context=min(service.context or tm.context_length, tm.context_length))
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
async def _read_json(request: web.Request):
    raw = await request.read()  # HTTPRequestEntityTooLarge past client_max_size -> 413
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _complete(request, parse_chat)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, parse_completion)


def _prompt(text_model, req: Request) -> tuple[list[int], list[str]]:
    if req.kind == "chat":
        return text_model.chat_prompt(req.messages)
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
    tokens, template_stops = await asyncio.to_thread(_prompt, text_model, req)
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
            return await _stream(request, job, reply)
        pieces = [p async for p in job.pieces()]
        return web.json_response(reply.whole("".join(pieces), job))
    except GenerationFailed as e:
        raise _failed(e) from None
    finally:
        job.cancel.set()  # the client left (handler cancelled) or we are done: the worker stops either way
        service.jobs.discard(job)


async def _stream(request: web.Request, job: Job, reply: "_Reply") -> web.StreamResponse:
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
            await _send(response, _failed(e).body())
        else:
            await _send(response, reply.last_chunk(job))
            if reply.req.include_usage:
                await _send(response, reply.usage_chunk(job))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        job.cancel.set()  # the client went away: stop generating for it
    return response


def _failed(e: GenerationFailed) -> APIError:
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

    def first_chunk(self) -> dict:
        return self._envelope(self._stream_object(), [self._choice("", None, role=True)])

    def chunk(self, text: str) -> dict:
        return self._envelope(self._stream_object(), [self._choice(text, None)])

    def last_chunk(self, job: Job) -> dict:
        out = self._envelope(self._stream_object(), [self._choice(None, _finish(job.result))])
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
    return {"cache_n": job.reused, "prompt_n": len(result.prompt_tokens),
            "prompt_per_second": round(result.prefill_tok_s, 2), "predicted_n": len(result.tokens),
            "predicted_per_second": round(result.decode_tok_s, 2)}


# -- running it -----------------------------------------------------------------------------------
async def start(app: web.Application, host: str = "127.0.0.1", port: int = 8080) -> tuple[web.AppRunner, int]:
    """Listen on host:port (0: any free port); returns the runner and the port bound.

    ``handler_cancellation``: a client that disconnects cancels its handler, whose ``finally`` sets
    the job's cancel event, so a request waiting in the queue or generating stops at once.
    """
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    return runner, bound


class ServerThread:
    """The server on its own thread and event loop (tests, and anything embedding it)."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host = app, host
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.runner, self.port = self.loop.run_until_complete(start(app, host, port))
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
