"""Fresh sets of three `node` processes, one after another: the decode ratio of each set and each
node's ms for its blocks, so a node that is slow for its whole life shows up by name.

`benchmarks/pipeline.py` measures one set of nodes per route; a property of a node process (how
its threads are placed, where its memory fell) is then one draw. This draws many:

    .venv/bin/python benchmarks/node_sets.py --sets 20
    .venv/bin/python benchmarks/node_sets.py --sets 6 --node-args=--no-pin

Each set: three nodes over the default model's blocks split evenly, a warm-up run, then ``--pairs``
pairs of runs (32 prompt tokens, 32 decoded; local in this process, then routed, back to back).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchmarks.pipeline as pipeline  # noqa: E402  (its import sets the thread waits first)

import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--node-args", default="", metavar="ARGS", help="more arguments for every node")
    args = parser.parse_args()
    pipeline.NODE_ARGS = tuple(args.node_args.split())

    from distribution.local import LocalLoader
    from engine.model import LlamaModel
    from models.default import DEFAULT_STORE
    from swarm.client import distributed_text_model, timings

    loader = LocalLoader(DEFAULT_STORE)
    model = LlamaModel(loader, backend="numba")
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(10, model.config.vocab_size - 10, 32)]
    nodes_args = " ".join(pipeline.NODE_ARGS) or "(defaults)"
    print(f"{args.sets} sets of 3 nodes, {args.pairs} pairs each; nodes run with {nodes_args}")
    medians = []
    for k in range(args.sets):
        ticks = pipeline.cpu_times()
        nodes = [pipeline.Node(str(DEFAULT_STORE), a, b) for a, b in pipeline.splits(model.config.n_layers, 3)]
        try:
            tm = distributed_text_model(loader, [n.url for n in nodes])
            with tm.open_session(64) as s:  # connections and kernels warm
                pipeline.run(s, prompt[:4], 4)
            ratios, local = [], []
            for _ in range(args.pairs):
                with model.open_session(64) as s:
                    here = pipeline.run(s, prompt, 32)
                with tm.open_session(64) as s:
                    there = pipeline.run(s, prompt, 32)
                if there[0] != here[0]:
                    raise SystemExit(f"set {k}: routed tokens differ from local")
                ratios.append(there[2] / here[2])
                local.append(here[2])
            node_ms = " ".join(f"{ms:.2f}" for ms in timings(tm)["node_ms"].values())
        finally:
            for n in nodes:
                n.stop()
        medians.append(float(np.median(ratios)))
        print(f"set {k:2d}: decode {medians[-1]:.2f}x local (pairs {min(ratios):.2f}-{max(ratios):.2f}, "
              f"local {np.median(local):.0f} tok/s); ms per token of each node's 10 blocks: {node_ms}; "
              f"{pipeline.steal_share(ticks)}", flush=True)
    print(f"sets' medians: {min(medians):.2f}-{max(medians):.2f}x, median {np.median(medians):.2f}x")


if __name__ == "__main__":
    main()
