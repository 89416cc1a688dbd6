"""Speed of this engine beside llama.cpp's, measured in one run, alternating, same threads and prompt.

Prefill: tokens/s for one pass over a prompt (512 tokens by default) on an empty cache.
Decode: tokens/s generating greedily after that prompt (each step is one token through the model
and an argmax). Each engine runs ``rounds`` times, alternating with the other; the best round of
each counts, since on a shared machine the best is the least disturbed.
"""

from __future__ import annotations

import time

import numpy as np


def engine_round(model, prompt: list[int], n_tokens: int) -> tuple[float, float]:
    cache = model.new_cache(len(prompt) + n_tokens + 1)
    start = time.perf_counter()
    logits = model.forward(np.asarray(prompt), cache)[-1]
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n_tokens):
        logits = model.forward(np.asarray([int(np.argmax(logits))]), cache)[-1]
    decode = time.perf_counter() - start
    return len(prompt) / prefill, n_tokens / decode


def _last_logits(llm) -> np.ndarray:
    """The logits of the last evaluated token, read straight from the llama.cpp context."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def llama_round(llm, prompt: list[int], n_tokens: int) -> tuple[float, float]:
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n_tokens):
        llm.eval([int(np.argmax(_last_logits(llm)))])
    decode = time.perf_counter() - start
    return len(prompt) / prefill, n_tokens / decode


def measure(model, llm, prompt: list[int], n_tokens: int, rounds: int = 2) -> dict:
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(engine_round(model, prompt, n_tokens))
        theirs.append(llama_round(llm, prompt, n_tokens))
    engine = {"prefill_tok_s": round(max(p for p, _ in ours), 2), "decode_tok_s": round(max(d for _, d in ours), 2)}
    llama = {"prefill_tok_s": round(max(p for p, _ in theirs), 2), "decode_tok_s": round(max(d for _, d in theirs), 2)}
    return {
        "engine": engine, "llama_cpp": llama,
        "prefill_ratio": round(engine["prefill_tok_s"] / llama["prefill_tok_s"], 3),
        "decode_ratio": round(engine["decode_tok_s"] / llama["decode_tok_s"], 3),
        "prompt_tokens": len(prompt), "tokens": n_tokens, "rounds": rounds,
    }
