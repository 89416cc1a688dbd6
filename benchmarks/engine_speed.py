"""The engine beside llama.cpp, in one run: prefill and decode tok/s, memory, load time, bandwidth.

    .venv/bin/python benchmarks/engine_speed.py [--models NAME ...] [--prompts 512 3000] [--tokens 32]

For each (model, weight type) whose store and GGUF exist under models/, and each prompt length that
fits the model's context: prefill and decode tokens/s of the engine (numba kernels) and of llama.cpp
(llama-cpp-python, same file, same threads, no flash attention), alternating, best of ``--rounds``
(validation/speed.py), and their ratio. Each model runs in a subprocess of its own, so that the RSS
after loading (beside the file's size) is that model's alone. Beside it:

* load_s: seconds to load the store into the engine (page cache warm), and the bound the issue sets
  for it: SHA-256 of every fragment's bytes once, hashlib on two threads (both cores);
* the decode kernel's GB/s: every block matrix multiplied by one vector with the decode step's own
  kernels (as in a decode step, without attention and glue), beside a parallel byte sum over the
  same bytes: how fast Numba-compiled code reads memory here.

The machine is shared, so absolute numbers move from run to run; the ratios come from the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.common import THREAD_ENV  # noqa: E402  (the commands' thread waits, for each model's subprocess)

# (name, store directory, GGUF file) under models/; the TinyLlama-shaped one is made by
#   .venv/bin/python -m models.factory tinyllama models/tinyllama-shaped-q8_0.gguf
#   .venv/bin/fragment models/tinyllama-shaped-q8_0.gguf
MODELS = [("SmolLM2-135M Q8_0", "smollm2-135m-instruct-q8_0"),
          ("TinyLlama-shaped Q8_0", "tinyllama-shaped-q8_0"),
          ("SmolLM2-135M Q4_K_M", "smollm2-135m-instruct-q4_k_m"),
          ("SmolLM2-135M Q4_0", "smollm2-135m-instruct-q4_0"),
          ("SmolLM2-135M F16", "smollm2-135m-instruct-f16"),
          ("TinyLlama-shaped Q4_K_M", "tinyllama-shaped-q4_k_m")]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hash_fragments_s(store: Path) -> float:
    """Seconds to SHA-256 every fragment file once on two threads (hashlib releases the GIL)."""
    files = sorted((store / "fragments").iterdir())
    for f in files:  # page cache warm, as for the load
        f.read_bytes()

    def digest(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(digest, files))
    return time.perf_counter() - start


def kernel_gbs(model) -> tuple[float, float]:
    """(decode kernel GB/s over every block matrix, parallel byte sum GB/s over the same bytes)."""
    from benchmarks.kernel_bandwidth import read_all  # a plain parallel read, the same as there

    products, flats = _decode_products(model.decoder)
    nbytes = sum(f.nbytes for f in flats)
    best = lambda fn: min(_timed(fn) for _ in range(5))  # noqa: E731
    run_all = lambda: [p() for p in products]  # noqa: E731
    run_all(), [read_all(f) for f in flats]
    return nbytes / best(run_all) / 1e9, nbytes / best(lambda: [read_all(f) for f in flats]) / 1e9


def _decode_products(dec):
    """The decode step's matrix products, each as a call with one token's activations, and the
    weights' bytes as flat arrays (what a product must read)."""
    import numpy as np

    from engine.fast_decode import StackedDecoder
    from engine.kernels_numba import q8_0_matvec

    calls, flats = [], []
    if isinstance(dec, StackedDecoder):  # Q8_0, stacked by layer
        for qs3, d3 in (dec.qkv, dec.o, dec.gu, dec.down):
            flats += [qs3.reshape(-1).view(np.uint8), d3.reshape(-1).view(np.uint8)]
            for i in range(qs3.shape[0]):
                x, out = np.ones(qs3.shape[2], np.float32), np.empty(qs3.shape[1], np.float32)
                calls.append(lambda q=qs3[i], d=d3[i], x=x, out=out: q8_0_matvec(q, d, x, out))
        return calls, flats
    from engine.fast_decode_quant import Q8_0, _product, values_per_row  # any mix of stored types

    for values, d, kind in zip(dec.mats, dec.scales, dec.kinds):
        x, out = np.ones((1, values_per_row(values, kind)), np.float32), np.empty((1, values.shape[0]), np.float32)
        calls.append(lambda w=values, d=d, k=kind, x=x, out=out: _product(k, w, d, x, out))
        flats += [values.reshape(-1)] + ([d.reshape(-1).view(np.uint8)] if kind == Q8_0 else [])
    return calls, flats


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_model(store: Path, gguf: Path, prompts: list[int], tokens: int, rounds: int) -> dict:
    """Everything for one model, in this (fresh) process; prints one JSON object."""
    from numba import set_num_threads

    from distribution.local import LocalLoader
    from engine.model import LlamaModel
    from validation.corpus import corpus_prompt
    from validation.reference import load_llama
    from validation.speed import measure

    set_num_threads(2)
    loader = LocalLoader(store)
    hash_s = hash_fragments_s(store)
    before = rss_mb()
    start = time.perf_counter()
    model = LlamaModel(loader, backend="numba")
    load_s = time.perf_counter() - start
    rss = rss_mb() - before
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(loader.metadata, loader.where)
    result = {"file_mb": gguf.stat().st_size / 1e6, "rss_after_load_mb": rss, "load_s": load_s,
              "hash_2_threads_s": hash_s, "context": model.config.context_length, "runs": []}
    if model.decoder is not None:
        result["kernel_gbs"], result["read_gbs"] = kernel_gbs(model)
    for n in prompts:
        if n + tokens + 8 > model.config.context_length:
            continue
        prompt = corpus_prompt(tokenizer, n)
        llm = load_llama(gguf, n_ctx=n + tokens + 8, threads=2, batch=512)
        result["runs"].append(measure(model, llm, prompt, tokens, rounds))
        del llm
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", help="store directory names under models/ (default: all present)")
    ap.add_argument("--prompts", nargs="*", type=int, default=[512, 3000])
    ap.add_argument("--tokens", type=int, default=32, help="tokens decoded after each prompt")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("STORE", "GGUF"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_model(Path(args.one[0]), Path(args.one[1]), args.prompts, args.tokens, args.rounds)))
        return
    models = [(name, d) for name, d in MODELS if not args.models or d in args.models]
    print("| model | prompt | engine prefill | llama.cpp prefill | ratio | engine decode | llama.cpp decode | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rest = []
    for name, d in models:
        store, gguf = ROOT / "models" / d, ROOT / "models" / f"{d}.gguf"
        if not (store / "manifest.json").exists() or not gguf.exists():
            continue
        proc = subprocess.run([sys.executable, __file__, "--one", str(store), str(gguf), "--tokens", str(args.tokens),
                               "--rounds", str(args.rounds), "--prompts", *map(str, args.prompts)],
                              capture_output=True, text=True, env={**THREAD_ENV, **os.environ, "NUMBA_NUM_THREADS": "2"})
        if proc.returncode != 0:
            print(f"| {name} | failed: {proc.stderr.strip().splitlines()[-1:]} |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        for run in r["runs"]:
            e, ll = run["engine"], run["llama_cpp"]
            print(f"| {name} | {run['prompt_tokens']} | {e['prefill_tok_s']:.1f} | {ll['prefill_tok_s']:.1f} | "
                  f"{run['prefill_ratio']:.2f} | {e['decode_tok_s']:.1f} | {ll['decode_tok_s']:.1f} | "
                  f"{run['decode_ratio']:.2f} |")
        skipped = [n for n in args.prompts if n not in [run["prompt_tokens"] for run in r["runs"]]]
        if skipped:
            print(f"| {name} | {', '.join(map(str, skipped))} | beyond its {r['context']}-position context | |||||")
        rest.append((name, r))
    print()
    print("| model | file MB | RSS after load MB | load s | SHA-256 of its fragments, 2 threads, s | "
          "decode kernel GB/s | parallel read GB/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rest:
        k = f"{r['kernel_gbs']:.1f} | {r['read_gbs']:.1f}" if "kernel_gbs" in r else "n/a | n/a"
        print(f"| {name} | {r['file_mb']:.0f} | {r['rss_after_load_mb']:.0f} | {r['load_s']:.2f} | "
              f"{r['hash_2_threads_s']:.2f} | {k} |")
    print(f"\n2 threads, {args.tokens} tokens decoded, best of {args.rounds} alternating rounds; "
          f"load average {os.getloadavg()[0]:.1f} at the end (the machine is shared).")


if __name__ == "__main__":
    main()
