"""Loading alone, for each model: RSS after loading beside the file's size, and load time beside hashing.

    .venv/bin/python benchmarks/engine_load.py [--models NAME ...]

Each model loads in a subprocess of its own (numba kernels, 2 threads, page cache warm), as
benchmarks/engine_speed.py loads it, without the llama.cpp runs. Per model:

* rss_mb: RSS growth over ``LlamaModel(LocalLoader(store), backend="numba")``, in MB (1e6 bytes)
  like the file's size (issue 13's target: at most the file + 15%, before any KV cache);
* held_mb: the bytes the model's arrays occupy (views counted once): the rest of rss_mb is not
  weights (compiled kernels loaded for the first time, allocator slack);
* decoder_mb: the part of rss_mb that appeared while the one-call decode step was made (kernels
  loaded from Numba's cache, any copies the decoder makes);
* load_s beside hash_s, SHA-256 of every fragment once on two threads (the target: within 2x).

The machine is shared: the load average is printed, and load_s and hash_s come from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.engine_speed import MODELS, hash_fragments_s, rss_mb  # noqa: E402
from cli.common import THREAD_ENV  # noqa: E402

MB = 1e6 / 2**20  # rss_mb's MiB -> MB


def held_mb(model) -> float:
    """MB of memory under the model's arrays (engine objects walked; overlapping views once)."""
    import numpy as np

    seen, spans = set(), {}

    def walk(obj, depth=0):
        if id(obj) in seen or depth > 6:
            return
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            lo, hi = np.lib.array_utils.byte_bounds(obj)
            spans[lo] = max(spans.get(lo, lo), hi)
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x, depth + 1)
        elif isinstance(obj, dict):
            for x in obj.values():
                walk(x, depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("engine"):
            for x in vars(obj).values():
                walk(x, depth + 1)

    walk(model)
    total, end = 0, 0
    for lo in sorted(spans):
        if spans[lo] > end:
            total, end = total + spans[lo] - max(lo, end), spans[lo]
    return total / 1e6


def one_model(store: Path) -> dict:
    from numba import set_num_threads

    import engine.backends as backends
    from distribution.local import LocalLoader
    from engine import fast_decode, fast_decode_quant, kernels_numba, kernels_quant
    from engine.model import LlamaModel

    set_num_threads(2)
    # Every kernel loaded first, as a second model in the process would find them (their code is
    # the same for every model, tens of MB): what loading adds is then the model's own memory.
    kernels_numba.warm_up(), fast_decode.warm_up(), fast_decode_quant.warm_up()
    for kind in range(len(kernels_quant.BLOCKS)):
        kernels_quant.warm_up(kind)
    decoder_mb = []
    make = backends.NumbaBackend.make_decoder

    def measured_make(self, blocks, config):
        before = rss_mb()
        decoder = make(self, blocks, config)
        decoder_mb.append((rss_mb() - before) / MB)
        return decoder

    backends.NumbaBackend.make_decoder = measured_make
    hash_s = hash_fragments_s(store)
    loader = LocalLoader(store)
    before = rss_mb()
    start = time.perf_counter()
    model = LlamaModel(loader, backend="numba")
    load_s = time.perf_counter() - start
    return {"file_mb": (store.parent / f"{store.name}.gguf").stat().st_size / 1e6,
            "rss_mb": (rss_mb() - before) / MB, "held_mb": held_mb(model), "decoder_mb": sum(decoder_mb),
            "load_s": load_s, "hash_s": hash_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", help="store directory names under models/ (default: all present)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_model(Path(args.one))))
        return
    print("| model | file MB | RSS after load MB | ratio | arrays MB | of it at decoder MB | load s | "
          "SHA-256 2 threads s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, d in MODELS:
        store = ROOT / "models" / d
        if (args.models and d not in args.models) or not (store / "manifest.json").exists() \
                or not (ROOT / "models" / f"{d}.gguf").exists():
            continue
        proc = subprocess.run([sys.executable, __file__, "--one", str(store)], capture_output=True, text=True,
                              env={**THREAD_ENV, **os.environ, "NUMBA_NUM_THREADS": "2"})
        if proc.returncode != 0:
            print(f"| {name} | failed: {proc.stderr.strip().splitlines()[-1:]} |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['file_mb']:.0f} | {r['rss_mb']:.0f} | {r['rss_mb'] / r['file_mb']:.2f} | "
              f"{r['held_mb']:.0f} | {r['decoder_mb']:.0f} | {r['load_s']:.2f} | {r['hash_s']:.2f} | "
              f"{r['load_s'] / r['hash_s']:.1f} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end (the machine is shared).")


if __name__ == "__main__":
    main()
