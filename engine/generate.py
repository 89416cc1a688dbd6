"""The generation loop: prefill the prompt in one pass, then one token per step, streaming text.

Generation ends at an end-of-generation token, at a stop string (matched across token boundaries
and never printed), or at the token limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from common.errors import UserError
from engine.sampling import Sampler


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = "length"
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_tokens) / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first generated token comes from the prefill's logits; the rest are decode steps.
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_s if self.decode_s and steps else 0.0


class StopMatcher:
    """Holds back text that could still become a stop string; reports when one appears."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.done = False

    def feed(self, text: str) -> str:
        """New text in; returns what is safe to print now."""
        self.pending += text
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                self.done = True
                out, self.pending = self.pending[:i], ""
                return out
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def check_fits(prompt_len: int, capacity: int, where: str = "prompt") -> None:
    if prompt_len >= capacity:
        raise UserError(f"{where} is {prompt_len} tokens; the context window holds {capacity} "
                        f"(shorten it or raise --ctx)")


def generate(model, tokenizer, prompt_tokens: list[int], max_tokens: int, sampler: Sampler,
             stop: list[str] | None = None, on_text: Callable[[str], None] | None = None,
             ctx: int | None = None) -> GenerationResult:
    capacity = min(ctx or model.config.context_length, model.config.context_length)
    check_fits(len(prompt_tokens), capacity)
    cache = model.new_cache(min(capacity, len(prompt_tokens) + max_tokens))
    result = GenerationResult(list(prompt_tokens))
    emit = on_text or (lambda s: None)
    decoder = tokenizer.stream_decoder()
    matcher = StopMatcher(stop or [])
    pieces: list[str] = []

    start = time.perf_counter()
    logits = model.forward(np.asarray(prompt_tokens), cache)[-1]
    result.prefill_s = time.perf_counter() - start

    history = list(prompt_tokens)
    decode_start = time.perf_counter()
    while len(result.tokens) < max_tokens:
        token = sampler(logits, history)
        if token in tokenizer.eog_ids:
            result.stop_reason = "eos"
            break
        result.tokens.append(token)
        history.append(token)
        safe = matcher.feed(decoder.push(token))
        if safe:
            pieces.append(safe)
            emit(safe)
        if matcher.done:
            result.stop_reason = "stop"
            break
        if len(result.tokens) >= max_tokens or cache.length >= cache.capacity:
            break
        logits = model.forward(np.asarray([token]), cache)[-1]
    result.decode_s = time.perf_counter() - decode_start
    if not matcher.done:
        tail = matcher.feed(decoder.flush()) + matcher.flush()
        if tail:
            pieces.append(tail)
            emit(tail)
    result.text = "".join(pieces)
    return result
