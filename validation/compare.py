"""Hold the engine against llama.cpp: the same tokens through both, logits compared position by position.

Metrics over all teacher-forced positions (rows of logits):
  max_abs_diff   largest |engine - llama.cpp| logit
  nmse           sum((e - r)^2) / sum(r^2)
  min_cosine     smallest cosine similarity between the two logit rows
  top1_agreement share of positions where both pick the same token
  mean_kl        mean KL(llama.cpp || engine) of the softmax distributions
and greedy_match: both engines' greedy continuations of each prompt are identical.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from validation.corpus import corpus_text

THRESHOLDS = {"top1_agreement": 0.99, "mean_kl": 1e-3, "min_cosine": 0.999}
DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash function is in one paragraph.",
    "List three fruits and their colors.",
    "def fibonacci(n):",
]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def logit_metrics(ours: np.ndarray, ref: np.ndarray) -> dict:
    """ours, ref: (positions, vocab)."""
    a, b = ours.astype(np.float64), ref.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    lp_ref, lp_ours = log_softmax(b), log_softmax(a)
    kl = (np.exp(lp_ref) * (lp_ref - lp_ours)).sum(1)
    return {
        "positions": int(a.shape[0]),
        "max_abs_diff": float(np.abs(a - b).max()),
        "nmse": float(((a - b) ** 2).sum() / (b ** 2).sum()),
        "min_cosine": float(cos.min()),
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
        "mean_kl": float(kl.mean()),
    }


@dataclass
class ValidationReport:
    activations: str
    metrics: dict
    greedy: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    reference: str = "direct"        # "direct": llama.cpp on the file as given; "f32-twin": on its F32 twin
    direct: dict | None = None       # with a twin: engine vs llama.cpp on the quantized file itself
    llama_cpp_self: dict | None = None  # llama.cpp batch 512 vs batch 1 on that file: its own noise

    @property
    def direct_ok(self) -> bool:
        """The direct divergence may not exceed the larger of the KL threshold and twice llama.cpp's own."""
        if self.direct is None:
            return True
        floor = self.llama_cpp_self["mean_kl"] if self.llama_cpp_self else 0.0
        return self.direct["mean_kl"] <= max(THRESHOLDS["mean_kl"], 2 * floor)

    @property
    def greedy_match(self) -> bool:
        return all(g["match"] for g in self.greedy)

    @property
    def passed(self) -> bool:
        m = self.metrics
        return (m["top1_agreement"] >= THRESHOLDS["top1_agreement"] and m["mean_kl"] <= THRESHOLDS["mean_kl"]
                and m["min_cosine"] >= THRESHOLDS["min_cosine"] and self.greedy_match and self.direct_ok)

    def to_json(self) -> dict:
        out = dict(self.metrics)
        out.update(greedy_match=self.greedy_match, reference=self.reference, activations=self.activations,
                   thresholds=THRESHOLDS, greedy=self.greedy, direct=self.direct, llama_cpp_self=self.llama_cpp_self,
                   direct_ok=self.direct_ok, seconds=round(self.seconds, 2))
        out["pass"] = self.passed
        return out


def corpus_sequences(tokenizer, n_positions: int, seq_len: int) -> list[list[int]]:
    """Varied text cut into sequences of seq_len tokens, the last one shorter, n_positions positions in all."""
    text = corpus_text()
    n_seqs = -(-n_positions // seq_len)
    stride = max(len(text) // n_seqs, 1)
    seqs = []
    for i in range(n_seqs):
        length = min(seq_len, n_positions - i * seq_len)
        chunk = text[i * stride: i * stride + length * 8]
        seqs.append(tokenizer.encode(chunk)[:length])
    return seqs


def engine_greedy(model, prompt: list[int], n: int, stop_ids: frozenset[int]) -> list[int]:
    cache = model.new_cache(len(prompt) + n + 1)
    logits = model.forward(np.asarray(prompt), cache)[-1]
    out = []
    for _ in range(n):
        token = int(np.argmax(logits))
        if token in stop_ids:
            break
        out.append(token)
        logits = model.forward(np.asarray([token]), cache)[-1]
    return out


def sequences_for(model, tokenizer, n_positions: int) -> list[list[int]]:
    return corpus_sequences(tokenizer, n_positions, min(256, model.config.context_length - 1))


def engine_logits(model, seqs: list[list[int]]) -> np.ndarray:
    out = []
    for seq in seqs:
        out.append(model.forward(np.asarray(seq), model.new_cache(len(seq)), all_logits=True))
    return np.concatenate(out)


def llama_logits(llm, seqs: list[list[int]], batch: int | None = None) -> np.ndarray:
    """llama.cpp's logits for each sequence, fed in chunks of ``batch`` tokens (default: all at once)."""
    from validation.reference import teacher_forced_logits

    if batch is None:
        return np.concatenate([teacher_forced_logits(llm, s) for s in seqs])
    out = []
    for s in seqs:
        llm.reset()
        for i in range(0, len(s), batch):
            llm.eval(s[i:i + batch])
        out.append(np.array(llm.scores[:len(s)], dtype=np.float32))
    return np.concatenate(out)


def validate(model, tokenizer, llm, prompts: list[str], n_positions: int = 512, greedy_tokens: int = 32,
             chat: bool = True, say=None) -> ValidationReport:
    """``say(message)``, when given, hears each stage as it starts (the whole run takes minutes)."""
    from engine.chat import chat_prompt
    from validation.reference import greedy

    say = say or (lambda message: None)
    started = time.perf_counter()
    seqs = sequences_for(model, tokenizer, n_positions)
    shape = f"{sum(map(len, seqs))} positions in {len(seqs)} sequence{'s' if len(seqs) > 1 else ''}"
    say(f"engine logits over {shape}...")
    ours = engine_logits(model, seqs)
    say(f"llama.cpp logits over {shape}...")
    metrics = logit_metrics(ours, llama_logits(llm, seqs))

    report = ValidationReport("llama.cpp" if model.emulate else "float", metrics)
    for i, prompt in enumerate(prompts, 1):
        say(f"greedy {i}/{len(prompts)}: {greedy_tokens} tokens from each engine for {prompt!r}...")
        text = chat_prompt(tokenizer, prompt)[0] if chat else prompt
        tokens = tokenizer.encode(text)
        a = engine_greedy(model, tokens, greedy_tokens, tokenizer.eog_ids)
        b = greedy(llm, tokens, greedy_tokens, tokenizer.eog_ids)
        report.greedy.append({"prompt": prompt, "match": a == b, "engine": tokenizer.decode(a),
                              "llama_cpp": tokenizer.decode(b)})
    report.seconds = time.perf_counter() - started
    return report
