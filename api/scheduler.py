"""Worker slots for generation: N threads, each with its own session (KV cache), and a bounded queue.

The engine is synchronous numpy/Numba code, so answers are generated in worker threads, never on
the event loop. A ``Job`` carries one request in and its text pieces out: the worker hands each piece
to the event loop with ``call_soon_threadsafe`` into an ``asyncio.Queue`` the HTTP handler reads.
Setting ``job.cancel`` (a client went away) stops the generation at the next token, or before it
starts if the job is still waiting.

At most ``parallel + queue_size`` jobs are admitted at once; beyond that ``submit`` raises
``QueueFull`` (the server answers 503), so a burst cannot pile up unbounded work. A job whose client
leaves while it waits is ``withdraw``n: its place is free at once, and no worker runs it.

Each slot opens its session once (the KV cache is allocated once per slot) and rewinds it to 0 for
every request, so an answer never depends on which slot or which earlier request it follows; unless
the request asks for ``cache_prompt`` (as llama-server's field), when the slot keeps the prompt's
common prefix with what its cache holds and feeds only the rest: a conversation's next turn then
costs only its new tokens.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass

from common import compute
from generation.sampling import Sampler, SamplingParams
from generation.stream import Generation, GenerationResult


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full."""


class GenerationFailed(Exception):
    """A valid request that the model could not serve: a session that would not open (a route with
    no node for some blocks), a node lost mid-answer, or a bug. ``status``: 503 for a problem named
    in one line (a ``UserError``: try again later), 500 for anything else; 400 for a prompt longer
    than the session holds (a route's nodes may hold fewer positions than the model's context, which
    the request was checked against: the request's fault, and no sign of ill health)."""

    def __init__(self, error: BaseException):
        from common.errors import UserError
        from generation.stream import PromptTooLong

        super().__init__(str(error) or type(error).__name__)
        self.status = 400 if isinstance(error, PromptTooLong) else 503 if isinstance(error, UserError) else 500


@dataclass
class Work:
    """What a slot runs: tokens in, limits and sampling."""

    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    cache_prompt: bool = False  # reuse the slot's cache for the prompt's common prefix


class Job:
    """One request between the event loop (reads ``events``) and a worker thread (writes them)."""

    def __init__(self, work: Work, loop: asyncio.AbstractEventLoop):
        self.work = work
        self.loop = loop
        self.cancel = threading.Event()
        self.events: asyncio.Queue = asyncio.Queue()
        self.result: GenerationResult | None = None
        self.reused = 0  # prompt tokens taken from the slot's cache instead of being fed
        self.taken = False  # a worker has it (guarded by the scheduler's lock)
        self.withdrawn = False  # its client left while it waited: it no longer counts, no worker runs it

    # -- worker side ------------------------------------------------------------------------------
    def _send(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancel.set()

    def piece(self, text: str) -> None:
        self._send("piece", text)

    def finish(self, result: GenerationResult | None) -> None:
        self._send("done", result)

    def fail(self, error: BaseException) -> None:
        self._send("error", error)

    # -- event-loop side --------------------------------------------------------------------------
    async def pieces(self):
        """Text pieces as they come; ``result`` is set when this ends. Re-raises a worker's error."""
        while True:
            kind, value = await self.events.get()
            if kind == "piece":
                yield value
            elif kind == "done":
                self.result = value
                return
            else:
                raise value


class Scheduler:
    def __init__(self, text_model, parallel: int = 1, queue_size: int = 16, context: int | None = None,
                 on_result=None):
        self.text_model = text_model
        self.parallel, self.queue_size = parallel, queue_size
        self.context = min(context or text_model.context_length, text_model.context_length)
        self.on_result = on_result  # called with each finished GenerationResult (metrics)
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        # Every slot's kernels run on the one compute thread, a feed at a time in arrival order: the
        # kernels use every core already, so N answers interleave fairly, one token per turn while
        # decoding, and OpenMP is entered from one thread only (common.compute says why that matters).
        # A distributed route's slots wait on the network meanwhile, and only its edges hop.
        compute.start()
        self.open_lock = threading.Lock()
        self.admitted = 0  # waiting + running
        self.running = 0
        self.workers = [threading.Thread(target=self._work, name=f"api-slot-{i}", daemon=True)
                        for i in range(parallel)]
        for w in self.workers:
            w.start()

    @property
    def queue_length(self) -> int:
        with self.lock:
            return self.admitted - self.running

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.admitted >= self.parallel + self.queue_size:
                waiting = "1 request is" if self.queue_size == 1 else f"{self.queue_size} requests are"
                raise QueueFull(f"all {self.parallel} slots are busy and {waiting} waiting")
            self.admitted += 1
        self.jobs.put(job)

    def withdraw(self, job: Job) -> None:
        """The job's client is gone: if no worker has taken it yet, it stops counting now."""
        with self.lock:
            if not job.taken and not job.withdrawn:
                job.withdrawn = True
                self.admitted -= 1

    def close(self) -> None:
        for _ in self.workers:
            self.jobs.put(None)
        for w in self.workers:
            w.join(timeout=10)

    # -- worker threads ---------------------------------------------------------------------------
    def _work(self) -> None:
        session, cached = None, []  # this slot's session, and the tokens its cache holds
        while (job := self.jobs.get()) is not None:
            with self.lock:
                if job.withdrawn:
                    continue
                job.taken = True
                self.running += 1
            try:
                if session is None:
                    with self.open_lock:  # one at a time: a swarm's route planner is shared by the slots
                        session = self.text_model.open_session(self.context)
                cached = self._run(session, cached, job)
            except Exception as e:  # noqa: BLE001 - the reply says what failed; the slot keeps serving
                job.fail(GenerationFailed(e))
                session, cached = _close_quietly(session), []
            finally:
                with self.lock:
                    self.running -= 1
                    self.admitted -= 1
        _close_quietly(session)

    def _run(self, session, cached: list[int], job: Job) -> list[int]:
        """Generate one answer; returns the tokens the session's cache holds afterwards."""
        if job.cancel.is_set():  # the client left while the job waited
            job.finish(None)
            return cached
        w = job.work
        job.reused = keep = reusable(cached, w.prompt_tokens) if w.cache_prompt else 0
        session.rewind(keep)
        gen = Generation(session, self.text_model.tokenizer, w.prompt_tokens[keep:], w.max_tokens,
                         Sampler(w.sampling), w.stop, job.cancel, history=w.prompt_tokens[:keep])
        for piece in gen:
            job.piece(piece)
        if self.on_result:
            self.on_result(gen.result)
        job.finish(gen.result)
        return w.prompt_tokens[:keep] + gen.fed


def reusable(cached: list[int], prompt: list[int]) -> int:
    """How many of the prompt's first tokens the cache already holds; at least one token is always
    fed again, since its logits are what the first answer token is drawn from."""
    n = 0
    for a, b in zip(cached, prompt):
        if a != b:
            break
        n += 1
    return min(n, len(prompt) - 1)


def _close_quietly(session) -> None:
    if session is not None:
        try:
            session.close()
        except Exception:  # noqa: BLE001 - a broken session is being dropped anyway
            pass
    return None
