"""Decode on a machine something else is using: the engine, pinned or not, beside llama.cpp.

    .venv/bin/python benchmarks/contention.py [--rounds 2] [--tokens 32]

A user's machine is rarely idle. Each arm decodes SmolLM2 (the default model, its GGUF) greedily
on all cores, in a process of its own, under three conditions:

* quiet: nothing else of ours running;
* busy neighbour: one process spinning at normal priority (a browser tab, a build);
* two at once: two processes of the same arm decoding side by side (two users of one box).

Arms: the engine as `infer` runs it (Numba's OpenMP threads, unpinned); the engine with its
compute thread pinned to one CPU and its kernel threads to the others (``common/affinity.py``, as
every `node` does); llama.cpp (llama-cpp-python, same file, same thread count). Printed: decode
tok/s, the median of ``--rounds`` rounds (arms alternated within each), and each arm's ratio to
llama.cpp under the same condition. Everything stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARMS = ("engine", "engine, pinned", "llama.cpp")
CONDITIONS = ("quiet", "busy neighbour", "two at once")
SPINNER = "while True:\n    pass\n"
WORKER_TIMEOUT = 600


def worker(arm: str, tokens: int) -> None:
    """In a process of its own: load, warm up, then print {"tok_s": decode tok/s of one greedy run}
    (validation/speed.py's rounds, as `validate --speed` measures both engines)."""
    from cli.common import apply_thread_env

    apply_thread_env()  # the waits every command sets, before numpy and numba start threads
    from models.default import DEFAULT_GGUF, DEFAULT_STORE
    from validation.speed import engine_round, llama_round

    prompt = list(range(100, 132))
    if arm == "llama.cpp":
        from validation.reference import load_llama

        llm = load_llama(DEFAULT_GGUF, n_ctx=256, threads=os.cpu_count() or 1)

        def run() -> float:
            return llama_round(llm, prompt, tokens)[1]
    else:
        from distribution.local import LocalLoader
        from engine.model import LlamaModel

        model = LlamaModel(LocalLoader(DEFAULT_STORE), backend="numba")

        def run() -> float:
            return engine_round(model, prompt, tokens)[1]
    run()  # kernels compiled or loaded, the OpenMP threads started: pinning moves them all
    if arm == "engine, pinned":
        from common.affinity import pin_compute_thread

        pin_compute_thread()
    print(json.dumps({"tok_s": run()}), flush=True)


def start_worker(arm: str, tokens: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--worker", arm, "--tokens", str(tokens)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)


def finish(proc: subprocess.Popen) -> float:
    try:
        out, _ = proc.communicate(timeout=WORKER_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise SystemExit(f"a worker took over {WORKER_TIMEOUT} s")
    if proc.returncode != 0:
        raise SystemExit(f"a worker failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])["tok_s"]


def measure(arm: str, condition: str, tokens: int) -> float:
    """Decode tok/s of ``arm`` under ``condition`` (two at once: the mean of the two processes)."""
    spinner = subprocess.Popen([sys.executable, "-c", SPINNER]) if condition == "busy neighbour" else None
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(2 if condition == "two at once" else 1):
            procs.append(start_worker(arm, tokens))
        return statistics.mean([finish(p) for p in procs])
    finally:  # (a worker that failed leaves its twin and the spinner to stop here)
        for proc in procs + ([spinner] if spinner is not None else []):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32, help="tokens decoded per run (after a 32-token prompt)")
    parser.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.tokens)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; SmolLM2 Q8_0, decode tok/s, "
          f"medians of {args.rounds} rounds", flush=True)
    results: dict[tuple[str, str], list[float]] = {}
    for k in range(args.rounds):
        for condition in CONDITIONS:
            arms = ARMS if k % 2 == 0 else tuple(reversed(ARMS))
            for arm in arms:
                results.setdefault((arm, condition), []).append(measure(arm, condition, args.tokens))
        print(f"round {k + 1} of {args.rounds} done", flush=True)
    print(f"\n{'arm':<16}" + "".join(f"{c:>26}" for c in CONDITIONS))
    for arm in ARMS:
        cells = []
        for condition in CONDITIONS:
            tok_s = statistics.median(results[(arm, condition)])
            ref = statistics.median(results[("llama.cpp", condition)])
            cells.append(f"{tok_s:8.1f} ({tok_s / ref:4.2f}x llama.cpp)")
        print(f"{arm:<16}" + "".join(f"{c:>26}" for c in cells))
    print("\ntwo at once: the mean of the two processes' tok/s; busy neighbour: one Python process spinning")


if __name__ == "__main__":
    main()
