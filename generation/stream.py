"""The generation loop over a ``Session``: prefill the prompt in one pass, then one token per step,
streaming text.

Generation ends at an end-of-generation token, at a stop string (matched across token boundaries
and never printed), at the token limit, when the context is full, or when cancelled. Where the
session's blocks run (this process, or nodes of a swarm) is the session's business.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from common.errors import UserError
from generation.sampling import Sampler


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = "length"  # length | eos | stop | context | cancelled
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0  # tokens fed after the prompt within decode_s (an answer ended by EOS feeds all it made)

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_tokens) / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first generated token comes from the prefill's logits; each fed token is a decode step.
        return self.decode_steps / self.decode_s if self.decode_s and self.decode_steps else 0.0


class StopMatcher:
    """Holds back text that could still become a stop string; reports when one appears."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.done = False

    def feed(self, text: str) -> str:
        """New text in; returns what is safe to print now."""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:  # the earliest stop in the text wins, not the first in the list
            self.done = True
            out, self.pending = self.pending[:min(found)], ""
            return out
        hold = max(_could_begin(self.pending, s) for s in self.stops) if self.stops else 0
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _could_begin(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that ``stop`` begins with (and is not all of ``stop``):
    text to hold back, as the next piece may complete the stop string. Only the places in that end
    where ``stop``'s first character occurs are tried: trying every length, as this did, made each
    token cost the square of the stop strings' lengths (16 long stop strings doubled an answer's
    time at 1600 tokens)."""
    i = text.find(stop[0], max(0, len(text) - len(stop) + 1))
    while i >= 0:
        if stop.startswith(text[i:]):  # (the first place that fits is the longest end)
            return len(text) - i
        i = text.find(stop[0], i + 1)
    return 0


class PromptTooLong(UserError):
    """The prompt does not fit the session's capacity: the request's fault (an API answers 400),
    not the model's or the route's."""


def check_fits(prompt_len: int, capacity: int, where: str = "prompt", reason: str | None = None) -> None:
    """``reason``: what holds the capacity below the context asked for (a swarm's node limits), if
    something does; --ctx cannot raise that."""
    if prompt_len >= capacity:
        raise PromptTooLong(f"{where} is {prompt_len} tokens; " + (reason or f"the context window holds {capacity} "
                                                                           f"(shorten it or raise --ctx)"))


class Generation:
    """One answer, as a stream: iterate for text pieces as they become safe to show.

    Feeds ``prompt_tokens`` after whatever ``session`` already holds (a multi-turn conversation
    feeds only its new tokens), then samples until an end-of-generation token, a stop string, the
    token limit, a full context, or ``cancel`` being set (from any thread: a client that went away,
    Ctrl-C). ``result`` holds the tokens, text, timings and why it stopped; after a stream ends, the
    session holds the prompt and every generated token but the last one (never fed), so ``fed``
    tells exactly which tokens the cache covers.
    """

    def __init__(self, session, tokenizer, prompt_tokens: list[int], max_tokens: int, sampler: Sampler,
                 stop: list[str] | None = None, cancel: threading.Event | None = None,
                 history: list[int] | None = None):
        check_fits(session.position + len(prompt_tokens), session.capacity,
                   reason=getattr(session, "capacity_reason", None))
        if not prompt_tokens:
            raise UserError("the prompt is empty: there is nothing to continue")
        self.session = session
        self.tokenizer = tokenizer
        self.prompt_tokens = list(prompt_tokens)
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.stop = list(stop or [])
        self.cancel = cancel or threading.Event()
        self.history = list(history or []) + self.prompt_tokens  # for the repetition penalty
        self.result = GenerationResult(list(prompt_tokens))
        self.fed: list[int] = []  # tokens this generation fed to the session, in order

    def __iter__(self) -> Iterator[str]:
        result, session, tokenizer = self.result, self.session, self.tokenizer
        decoder = tokenizer.stream_decoder()
        matcher = StopMatcher(self.stop)
        pieces: list[str] = []

        start = time.perf_counter()
        logits = session.feed(self.prompt_tokens)
        self.fed.extend(self.prompt_tokens)
        result.prefill_s = time.perf_counter() - start

        decode_start = time.perf_counter()
        try:
            while len(result.tokens) < self.max_tokens:
                if self.cancel.is_set():
                    result.stop_reason = "cancelled"
                    break
                token = self.sampler(logits, self.history)
                if token in tokenizer.eog_ids:
                    result.stop_reason = "eos"
                    break
                result.tokens.append(token)
                self.history.append(token)
                safe = matcher.feed(decoder.push(token))
                if safe:
                    pieces.append(safe)
                    yield safe
                if matcher.done:
                    result.stop_reason = "stop"
                    break
                if len(result.tokens) >= self.max_tokens:
                    break
                if session.position + 1 >= session.capacity:  # the token just drawn takes the last
                    result.stop_reason = "context"              # position, as llama.cpp counts it
                    break
                if self.cancel.is_set():
                    result.stop_reason = "cancelled"
                    break
                logits = session.feed([token])
                self.fed.append(token)
        finally:
            result.decode_s = time.perf_counter() - decode_start
            result.decode_steps = len(self.fed) - len(self.prompt_tokens)
        if not matcher.done:
            tail = matcher.feed(decoder.flush()) + matcher.flush()
            if tail:
                pieces.append(tail)
                yield tail
        result.text = "".join(pieces)


def generate(session, tokenizer, prompt_tokens: list[int], max_tokens: int, sampler: Sampler,
             stop: list[str] | None = None, on_text: Callable[[str], None] | None = None,
             cancel: threading.Event | None = None) -> GenerationResult:
    """Run a ``Generation`` to its end, handing each text piece to ``on_text``."""
    gen = Generation(session, tokenizer, prompt_tokens, max_tokens, sampler, stop, cancel)
    for piece in gen:
        if on_text:
            on_text(piece)
    return gen.result
