"""Choosing the next token from logits, in llama.cpp's default order:
repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw (or argmax at temperature 0).

Any positive temperature and penalty give a valid draw: logits are kept finite after the penalty,
and the max is subtracted before dividing by the temperature, so a tiny temperature sends the others
to -inf (probability 0) instead of making inf - inf = NaN; those overflows are intended, not warned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64  # tokens the penalty looks back over, prompt included (0: none, -1: all)
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise UserError(f"--min-p must be in [0, 1), got {self.min_p}")
        if not np.isfinite(self.repeat_penalty) or self.repeat_penalty <= 0:
            raise UserError(f"--repeat-penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise UserError(f"--repeat-last-n must be >= 0, or -1 for the whole context, got {self.repeat_last_n}")
        return self


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params.validate()
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        with np.errstate(over="ignore", under="ignore"):  # see the module's docstring
            return self._choose(logits, history)

    def _choose(self, logits: np.ndarray, history: list[int]) -> int:
        logits = np.array(logits, dtype=np.float64)  # (vocab,)
        if self.p.repeat_penalty != 1.0 and history and self.p.repeat_last_n != 0:
            window = history if self.p.repeat_last_n == -1 else history[-self.p.repeat_last_n:]
            recent = np.unique(np.asarray(window))
            vals = logits[recent]
            logits[recent] = np.where(vals > 0, vals / self.p.repeat_penalty, vals * self.p.repeat_penalty)
        np.clip(logits, -_BIG, _BIG, out=logits)  # a huge or tiny penalty overflows to +-inf
        if self.p.temperature == 0:
            return int(np.argmax(logits))
        ids = np.argsort(-logits, kind="stable")  # candidates, best first
        if self.p.top_k > 0:
            ids = ids[: self.p.top_k]
        probs = _softmax(logits[ids])
        if self.p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), self.p.top_p) + 1)
            ids, probs = ids[:keep], probs[:keep]
        if self.p.min_p > 0:
            keep = probs >= self.p.min_p * probs[0]
            ids = ids[keep]
        probs = _softmax(logits[ids], self.p.temperature)
        return int(ids[self.rng.choice(len(ids), p=probs)])


_BIG = 1e300  # finite, and two of them still subtract without overflow


def _softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(x / temperature), shifted first: the best entry gets exp(0) = 1, never NaN."""
    e = np.exp((x - x.max()) / temperature)
    return e / e.sum()
