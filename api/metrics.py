"""Counters for GET /metrics, in Prometheus' text exposition format."""

from __future__ import annotations

import threading
from collections import Counter


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.http = Counter()           # (path, status) -> replies
        self.completions = 0            # generations that ran to an end
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self.decode_steps = 0           # tokens fed after the prompt (GenerationResult.decode_steps)
        self.rejected = 0               # 503: queue full
        self.cancelled = 0              # generations stopped because their client left (or asked)

    def count_http(self, path: str, status: int) -> None:
        with self.lock:
            self.http[(path, status)] += 1

    def count_rejected(self) -> None:
        with self.lock:
            self.rejected += 1

    def record(self, result) -> None:
        """A finished ``GenerationResult``."""
        with self.lock:
            if result.stop_reason == "cancelled":  # the client left: counted apart (the tokens are work done)
                self.cancelled += 1
            else:
                self.completions += 1
            self.prompt_tokens += len(result.prompt_tokens)
            self.generated_tokens += len(result.tokens)
            self.prefill_s += result.prefill_s
            self.decode_s += result.decode_s
            self.decode_steps += result.decode_steps

    def render(self, running: int, queued: int, parallel: int, ready: bool) -> str:
        with self.lock:
            lines = []
            add = _adder(lines)
            add("requests_total", "counter", "HTTP replies by path and status.",
                [({"path": p, "status": str(s)}, n) for (p, s), n in sorted(self.http.items())] or [({}, 0)])
            add("completions_total", "counter", "Generations run to their end.", [({}, self.completions)])
            add("cancelled_total", "counter", "Generations stopped before their end (the client left).",
                [({}, self.cancelled)])
            add("rejected_total", "counter", "Requests refused with 503 because the queue was full.",
                [({}, self.rejected)])
            add("prompt_tokens_total", "counter", "Prompt tokens processed.", [({}, self.prompt_tokens)])
            add("tokens_generated_total", "counter", "Tokens generated.", [({}, self.generated_tokens)])
            add("prompt_tokens_per_second", "gauge", "Prefill speed over all requests so far.",
                [({}, self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0)])
            add("tokens_per_second", "gauge", "Decode speed over all requests so far.",
                [({}, self.decode_steps / self.decode_s if self.decode_s else 0.0)])
            add("requests_running", "gauge", "Requests being generated now.", [({}, running)])
            add("queue_length", "gauge", "Requests waiting for a slot.", [({}, queued)])
            add("slots", "gauge", "Sessions that run at once (--parallel).", [({}, parallel)])
            add("model_ready", "gauge", "1 once the model is loaded.", [({}, int(ready))])
        return "\n".join(lines) + "\n"


PREFIX = "gguf_fragments_"


def _adder(lines: list[str]):
    def add(name: str, kind: str, help_text: str, samples) -> None:
        full = PREFIX + name
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"{full}{{{label_text}}} {_number(value)}" if label_text else f"{full} {_number(value)}")

    return add


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"
