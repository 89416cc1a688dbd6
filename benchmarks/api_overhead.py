"""What the API costs over calling the engine directly, and what --parallel 2 gives, on the default model.

    .venv/bin/python benchmarks/api_overhead.py [--tokens 64] [--repeat 3] [--ctx 4096]

The same greedy answer (a fixed question, --tokens tokens, no end-of-turn stop) is generated
  1. directly: ``generation.Generation`` on a session of the loaded model, as large as a server
     slot's (--ctx), in this thread (the reference);
  2. through the server, not streamed (HTTP + JSON, the worker thread, the event loop);
  3. through the server, streamed with the official ``openai`` client (one SSE event per piece);
  4. as two requests at once on a --parallel 2 server (aggregate tokens per second).
Each figure is the best of --repeat runs, printed as tokens per second and as a ratio to (1)
measured in the same run, so the ratio means something on a busy machine too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Before numpy and numba start their threads: the brief waits the commands use (cli.common.THREAD_ENV);
# without them this process decoded at a third of `api`'s speed (36 against 115 tok/s).
from cli.common import apply_thread_env  # noqa: E402

apply_thread_env()

from api.server import ServerThread, make_app  # noqa: E402
from cli.common import load_text_model  # noqa: E402
from generation.sampling import Sampler, SamplingParams  # noqa: E402
from generation.stream import Generation  # noqa: E402

QUESTION = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def direct(model, tokens: int, ctx: int) -> float:
    prompt, _ = model.chat_prompt(QUESTION)
    with model.open_session(ctx) as session:  # the same cache size as a server slot's
        gen = Generation(session, model.tokenizer, prompt, tokens, Sampler(SamplingParams(temperature=0)))
        start = time.perf_counter()
        for _ in gen:
            pass
        return len(gen.result.tokens) / (time.perf_counter() - start)


JSON = {"Content-Type": "application/json"}  # the server answers 415 to anything else


def body(tokens: int) -> bytes:
    return json.dumps({"messages": QUESTION, "max_tokens": tokens, "temperature": 0}).encode()


def not_streamed(url: str, tokens: int) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url + "/v1/chat/completions", data=body(tokens), headers=JSON),
                                timeout=600) as r:
        n = json.load(r)["usage"]["completion_tokens"]
    return n / (time.perf_counter() - start)


def streamed(url: str, model_name: str, tokens: int) -> float:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    start = time.perf_counter()
    chunks = client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    n = [c.usage.completion_tokens for c in chunks if c.usage][0]
    return n / (time.perf_counter() - start)


def two_at_once(url: str, tokens: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        counts = list(pool.map(lambda _: json.load(urllib.request.urlopen(
            urllib.request.Request(url + "/v1/chat/completions", data=body(tokens), headers=JSON), timeout=600))
            ["usage"]["completion_tokens"], range(2)))
    return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ctx", type=int, default=4096, help="positions per session (api's --ctx default)")
    args = parser.parse_args()
    # As `api` does: every kernel on one compute thread from the start (common.compute), loading
    # included; a model loaded on this thread first would leave a second OpenMP pool behind.
    from common import compute

    compute.start()
    model = load_text_model(None)
    one = ServerThread(make_app(model, parallel=1, context=args.ctx))
    two = ServerThread(make_app(model, parallel=2, context=args.ctx))
    n = args.tokens
    runs = {"direct Generation (reference)": lambda: direct(model, n, args.ctx),
            "API, not streamed": lambda: not_streamed(one.url, n),
            "API, streamed (openai client)": lambda: streamed(one.url, model.name, n),
            "API --parallel 2, two requests (aggregate)": lambda: two_at_once(two.url, n)}
    best = dict.fromkeys(runs, 0.0)
    try:
        for fn in runs.values():  # warm-up: first-call costs are not what is measured
            fn()
        for _ in range(args.repeat):  # interleaved, so a busy spell on the machine hits every variant
            for name, fn in runs.items():
                best[name] = max(best[name], fn())
    finally:
        one.stop()
        two.stop()
    reference = best["direct Generation (reference)"]
    print(f"{n} greedy tokens, best of {args.repeat} interleaved rounds (each figure includes its prompt's prefill)")
    for name, tok_s in best.items():
        print(f"  {name:45s} {tok_s:7.1f} tok/s  {tok_s / reference:5.2f}x")


if __name__ == "__main__":
    main()
