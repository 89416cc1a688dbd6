"""Distributed inference on one machine: local vs a route over 1, 2 and 3 `node` processes, in one run.

    .venv/bin/python benchmarks/pipeline.py [--models default,tinyllama] [--prompt 32] [--decode 32]
                                            [--delay-ms D]

For each model and route (1, 2 and 3 node processes on 127.0.0.1, spans split evenly, decode
steps relayed node to node as swarm/relay.py does; then 1 and 3 nodes hop by hop, every step a
FORWARD and its RESULT, back to the client after each node): prefill and decode tok/s of pairs of runs, the local engine (every
block in this process) then the same greedy run routed, back to back, and the median of the
pairs' ratios; the per-hop overhead in ms per decode token (the client's round trip minus the
nodes' own compute, per hop); and each node's RSS. The nodes share this
machine's cores with each other and with the client, as the issue's target (>= 0.8x local) assumes.
With --delay-ms, a proxy adds that latency each way to every connection to a node, as a network would.
Every run's tokens are checked equal to local's. Everything stops by itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Before numpy and numba start their threads (here and, inherited, in the nodes): the same brief
# waiting the commands use (cli.common.THREAD_ENV). libgomp's default long spin made the local
# engine's steps 10-100x slower on an oversubscribed machine, which would flatter every distributed
# figure; passive waiting (OMP_WAIT_POLICY=passive) cost the local decode 3x on a quiet one, which
# flattered them too. Set the variables to compare.
from cli.common import THREAD_ENV, apply_thread_env  # noqa: E402

apply_thread_env()

import numpy as np  # noqa: E402

BIN = Path(sys.executable).parent
# Made by `python -m models.factory tinyllama models/tinyllama-shaped-q8_0.gguf` and `fragment` (see README).
TINYLLAMA_STORE = Path(__file__).resolve().parent.parent / "models" / "tinyllama-shaped-q8_0"


NODE_ARGS: tuple[str, ...] = ()  # --node-args: given to every `node` this benchmark starts


class Node:
    """A `node` process; waits (bounded) for its address line."""

    def __init__(self, source: str, first: int, last: int, timeout: float = 300, args: tuple[str, ...] = ()):
        self.first, self.last = first, last
        self.proc = subprocess.Popen([str(BIN / "node"), source, "--layers", f"{first}-{last}", *NODE_ARGS, *args],
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: [self.lines.append(x.strip()) for x in self.proc.stderr], daemon=True).start()
        deadline = time.monotonic() + timeout
        while not any(x.startswith("p2p://") for x in self.lines):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"node {first}-{last} did not start: {self.lines}")
            time.sleep(0.1)
        self.url = next(x for x in self.lines if x.startswith("node: ")).split(" on ", 1)[1].split()[0]

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def run(session, prompt: list[int], n: int) -> tuple[list[int], float, float]:
    """Greedy: tokens, prefill tok/s, decode tok/s."""
    t0 = time.perf_counter()
    logits = session.feed(prompt)
    t1 = time.perf_counter()
    tokens = [int(np.argmax(logits))]
    for _ in range(n - 1):
        tokens.append(int(np.argmax(session.feed([tokens[-1]]))))
    t2 = time.perf_counter()
    return tokens, len(prompt) / (t1 - t0), (n - 1) / (t2 - t1)


def cpu_times() -> tuple[int, int] | None:
    """(steal, all) clock ticks of every CPU so far, from /proc/stat (Linux; None elsewhere). Steal is
    time the hypervisor gave this VM's CPUs to other work: in a spell of it the nodes' blocks ran 3x
    slower and the ratios fell (docs/distributed-performance.md), so every run prints its share."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return (fields[7], sum(fields)) if len(fields) == 8 else None


def steal_share(before: tuple[int, int] | None) -> str:
    """The hypervisor's share of CPU time since ``before`` (a ``cpu_times()``), as text."""
    after = cpu_times()
    if before is None or after is None or after[1] <= before[1]:
        return "host steal time unknown"
    return f"host steal time {100 * (after[0] - before[0]) / (after[1] - before[1]):.1f}%"


def splits(n_layers: int, k: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, n_layers, k + 1).round().astype(int)
    return [(int(bounds[i]), int(bounds[i + 1]) - 1) for i in range(k)]


class Delayed:
    """benchmarks/delay_proxy.py in front of the given node URLs: the URLs to use instead."""

    def __init__(self, urls: list[str], delay_ms: float):
        ports = [int(u.rsplit(":", 1)[1].split("/")[0]) for u in urls]
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("delay_proxy.py")), str(delay_ms),
                                      *map(str, ports)], stdout=subprocess.PIPE, text=True)
        mapping = dict(reversed(self.proc.stdout.readline().split()) for _ in ports)
        self.urls = [u.replace(f":{p}/", f":{mapping[str(p)]}/") for u, p in zip(urls, ports)]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def bench_model(label: str, source: str, loader, prompt_len: int, decode: int, repeat: int,
                delay_ms: float = 0.0) -> list[str]:
    from engine.model import LlamaModel
    from swarm.client import distributed_text_model, timings

    rng = np.random.default_rng(0)
    model = LlamaModel(loader, backend="numba")
    prompt = [int(t) for t in rng.integers(10, model.config.vocab_size - 10, prompt_len)]
    capacity = prompt_len + decode
    n_layers = model.config.n_layers

    def warm(open_session) -> list[int]:
        """A short run first (connections, kernels), then the greedy tokens of the whole run."""
        with open_session(capacity) as s:
            run(s, prompt[:4], 4)
        with open_session(capacity) as s:
            return run(s, prompt, decode)[0]

    def pairs(open_session) -> list[tuple]:
        """``repeat`` pairs of runs, local then routed, back to back: on a shared machine whose load
        drifts, the ratio within a pair compares like with like (best-of figures taken minutes
        apart compared the machine's quiet moments instead)."""
        out = []
        for _ in range(repeat):
            with model.open_session(capacity) as s:
                local = run(s, prompt, decode)
            with open_session(capacity) as s:
                routed = run(s, prompt, decode)
            if routed[0] != local[0]:
                raise SystemExit(f"{label}: routed tokens differ from local")
            out.append((local[1], local[2], routed[1], routed[2]))
        return out

    expected = warm(model.open_session)
    rows = []
    for k, relay in ((1, True), (2, True), (3, True), (1, False), (3, False)):
        # (the proxy sits in front of the WebSocket ports: lanes, which would go around it, are off)
        nodes = [Node(source, a, b, args=("--no-lanes",) if delay_ms else ()) for a, b in splits(n_layers, k)]
        proxy = Delayed([n.url for n in nodes], delay_ms) if delay_ms else None
        try:
            tm = distributed_text_model(loader, proxy.urls if proxy else [n.url for n in nodes], relay=relay)
            if warm(tm.open_session) != expected:
                raise SystemExit(f"{label}, {k} nodes: tokens differ from local")
            measured = pairs(tm.open_session)
            t = timings(tm)
            if relay and t["relayed_steps"] == 0:
                raise SystemExit(f"{label}, {k} nodes: no decode step was relayed")
            rss = " ".join(f"{n.rss_mb():.0f}" for n in nodes)
        finally:
            if proxy:
                proxy.stop()
            for n in nodes:
                n.stop()
        med = lambda i: float(np.median([m[i] for m in measured]))  # noqa: E731
        ratio = lambda a, b: float(np.median([m[b] / m[a] for m in measured]))  # noqa: E731
        name = f"{k} node" + ("s" if k > 1 else "") + ("" if relay else ", hop by hop")
        rows.append(f"{label:<10} {name:<22} {med(0):>7.1f} {med(1):>7.1f} {med(2):>7.1f} {med(3):>7.1f} "
                    f"{ratio(0, 2):>6.2f}x {ratio(1, 3):>6.2f}x {t['hop_overhead_ms']:>9.3f}  {rss}")
    return rows


def trace_model(label: str, source: str, loader, prompt_len: int, decode: int, prefix: Path) -> list[str]:
    """Where a relayed decode token's time goes on a three-node route: per-stage medians from the
    timestamps every process writes (swarm/trace.py), against a local step measured alongside."""
    from engine.model import LlamaModel
    from swarm.client import distributed_text_model

    model = LlamaModel(loader, backend="numba")
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(10, model.config.vocab_size - 10, prompt_len)]
    nodes = [Node(source, a, b) for a, b in splits(model.config.n_layers, 3)]
    try:
        tm = distributed_text_model(loader, [n.url for n in nodes])
        with tm.open_session(prompt_len + decode) as s:  # connections and kernels warm
            run(s, prompt[:4], 4)
        local, routed, spans = [], [], []  # spans: (start, end) ns of each routed run
        for _ in range(3):
            with model.open_session(prompt_len + decode) as s:
                local.append(run(s, prompt, decode)[2])
            with tm.open_session(prompt_len + decode) as s:
                spans.append(time.perf_counter_ns())
                routed.append(run(s, prompt, decode)[2])
                spans[-1] = (spans[-1], time.perf_counter_ns())
    finally:
        for n in nodes:
            n.stop()
    events = {}  # pid -> [(ns, step, stage)]
    for path in prefix.parent.glob(prefix.name + ".*"):
        events[int(path.suffix[1:])] = [(int(t), int(s), g) for t, s, g in (x.split() for x in path.read_text().splitlines())]
    client = events.get(os.getpid(), [])
    per_node = []
    for n in nodes:
        marks, stages, arrived = events.get(n.proc.pid, []), {}, None
        for t, step, stage in marks:
            if stage == "arrive":
                arrived = t
            else:
                stages.setdefault(step, {})[stage] = t
                if stage == "read":
                    stages[step]["arrive"] = arrived
        per_node.append(stages)
    sends = {s: t for t, s, g in client if g == "send"}
    answers = {s: t for t, s, g in client if g == "answer"}
    rows: dict[str, list[float]] = {}

    def add(name: str, a, b) -> None:
        if a is not None and b is not None:
            rows.setdefault(name, []).append((b - a) / 1e6)

    order = sorted(sends, key=sends.get)
    for i, step in enumerate(order[len(order) // 4:], len(order) // 4):  # the first steps warm up
        if step not in answers or not all(step in p for p in per_node):
            continue
        at = sends[step]
        for k, p in enumerate(per_node, 1):
            got = p[step]
            add(f"{'client' if k == 1 else f'node {k - 1}'} -> node {k}: written, woken, read", at, got.get("arrive"))
            add(f"node {k}: frame checked", got.get("arrive"), got.get("compute"))
            add(f"node {k}: blocks {nodes[k - 1].first}-{nodes[k - 1].last}", got.get("compute"), got.get("computed"))
            add(f"node {k}: output framed", got.get("computed"), got.get("framed"))
            at = got.get("framed")
        add(f"node {len(nodes)} -> client: written, woken, read, checked", at, answers[step])
        following = sends.get(order[i + 1]) if i + 1 < len(order) else None
        if following is not None and any(a <= sends[step] and following <= b for a, b in spans):  # (same run)
            add("client: head, sampling, embedding, framing", answers[step], following)
    tokens = len(rows.get("client: head, sampling, embedding, framing", []))
    out = [f"{label}: where a relayed decode token's time goes, 3 nodes, over {tokens} tokens (ms)",
           f"  {'stage':<48} {'median':>7} {'mean':>7} {'p90':>7} {'max':>7}"]
    for name, values in rows.items():
        out.append(f"  {name:<48} {np.median(values):7.3f} {np.mean(values):7.3f} "
                   f"{np.percentile(values, 90):7.3f} {np.max(values):7.3f}")
    out.append(f"  {'sum':<48} {sum(np.median(v) for v in rows.values()):7.3f} "
               f"{sum(np.mean(v) for v in rows.values()):7.3f}")
    out.append(f"  decode: local {np.median(local):.1f} tok/s ({1000 / np.median(local):.2f} ms per token), "
               f"routed {np.median(routed):.1f} tok/s ({1000 / np.median(routed):.2f} ms), traced "
               f"(each stage mark writes a line: a few us)")
    return out


def transport_alone(source: str) -> float:
    """``transport_overhead`` measured in a process of its own (its node computes on a compute thread)."""
    out = subprocess.run([sys.executable, __file__, "--transport-alone", source], capture_output=True, text=True,
                         timeout=600)
    if out.returncode:
        raise SystemExit(f"transport figure for {source} failed: {out.stderr.strip()[-500:]}")
    return float(out.stdout.split()[-1])


def open_loader(source: str):
    from distribution.gguf_file import GGUFFileLoader
    from distribution.local import LocalLoader

    return LocalLoader(Path(source)) if Path(source).is_dir() else GGUFFileLoader(Path(source))


def transport_overhead(loader, steps: int = 300) -> float:
    """ms per decode step beyond compute for one hop to a one-block node in this process: the
    WebSocket, framing and both event loops, without another process to wake up."""
    from common import compute
    from engine.model import LlamaModel
    from swarm import manifest_sha
    from swarm.client import RemoteSpanSession
    from swarm.server import NodeService, NodeThread

    compute.start()  # before any kernel: the node's and the client's run on this one thread
    node = NodeThread(NodeService(LlamaModel(loader, backend="numba", layers=(0, 0), edges=False),
                                  manifest_sha(loader)))
    try:
        span = RemoteSpanSession(node.url, 0, 0, steps + 1, node.service.dim)
        x = np.zeros((1, node.service.dim), np.float32)
        for _ in range(steps):
            span.forward(x)
        span.close()
        return (span.round_s - span.node_s) * 1000 / span.steps
    finally:
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default,tinyllama")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="pairs of runs (local, routed) per route")
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="latency added each way to every connection to a node (benchmarks/delay_proxy.py)")
    parser.add_argument("--trace", action="store_true",
                        help="instead of the table: where a three-node relayed token's time goes, stage by stage "
                             "(timestamps from every process, swarm/trace.py)")
    parser.add_argument("--node-args", default="", metavar="ARGS",
                        help="more arguments for every node, e.g. --node-args=--no-pin to compare")
    parser.add_argument("--transport-alone", metavar="SOURCE", help=argparse.SUPPRESS)  # (transport_alone)
    args = parser.parse_args()
    global NODE_ARGS
    NODE_ARGS = tuple(args.node_args.split())
    if args.transport_alone:
        print(f"{transport_overhead(open_loader(args.transport_alone)):.6f}")
        return
    trace_dir = tempfile.mkdtemp(prefix="pipeline-trace-") if args.trace else None
    if trace_dir:  # before swarm/trace.py is imported, here and (inherited) in the nodes
        os.environ["GGUF_FRAGMENTS_TRACE"] = str(Path(trace_dir) / "trace")

    from distribution.gguf_file import GGUFFileLoader
    from distribution.local import LocalLoader
    from models.default import DEFAULT_STORE
    from models.factory import TINYLLAMA_SHAPE, write_model

    # Every kernel of this process (the local runs, the client's edges) runs on this thread, as in
    # `infer` and `infer --distributed`, which start no compute thread (common/compute.py). The
    # transport figure's in-process node needs one, so it runs in a process of its own: OpenMP
    # entered from two threads throttles its waits (the local TinyLlama decode fell from 21 to 12
    # tok/s when they shared this one).
    print(f"load average {os.getloadavg()[0]:.1f} at the start")
    started = cpu_times()
    if args.delay_ms:
        print(f"every connection to a node: {args.delay_ms:g} ms of latency each way (benchmarks/delay_proxy.py); "
              f"the nodes run --no-lanes, as lanes would go around the proxy")
    if not trace_dir:
        print(f"{'':<10} {'':<22} {'local tok/s':>15} {'routed tok/s':>15}")
        print(f"{'model':<10} {'route':<22} {'prefill':>7} {'decode':>7} {'prefill':>7} {'decode':>7} {'pre/loc':>7} "
              f"{'dec/loc':>7} {'hop ms/t':>9}  node RSS MB")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "default":
                loader, source = LocalLoader(DEFAULT_STORE), str(DEFAULT_STORE)
            elif name == "tinyllama" and TINYLLAMA_STORE.is_dir():  # a store: nodes hold only their span
                loader, source = LocalLoader(TINYLLAMA_STORE), str(TINYLLAMA_STORE)
            elif name == "tinyllama":  # a .gguf: node RSS counts the mapped file's pages it read too
                path = write_model(TINYLLAMA_SHAPE, Path(tmp) / "tinyllama-shaped.gguf")
                loader, source = GGUFFileLoader(path), str(path)
            else:
                raise SystemExit(f"unknown model {name!r} (default, tinyllama)")
            if trace_dir:
                for row in trace_model(name, source, loader, args.prompt, args.decode, Path(trace_dir) / "trace"):
                    print(row, flush=True)
                for path in Path(trace_dir).glob("trace.*"):  # emptied, not removed: this process's
                    path.write_text("")                          # file stays open for the next model
                continue
            for row in bench_model(name, source, loader, args.prompt, args.decode, args.repeat, args.delay_ms):
                print(row, flush=True)
            print(f"{name:<10} transport alone (a one-block node in the measuring process): "
                  f"{transport_alone(source):.3f} ms per decode step beyond compute", flush=True)
    if trace_dir:
        shutil.rmtree(trace_dir)
        print(f"{steal_share(started)} over the run")
        return
    print(f"tok/s: medians of {args.repeat} pairs of runs, local then routed, back to back; ratios: the "
          f"median of the pairs' ratios")
    waits = ", ".join(f"{var}={os.environ.get(var, '(unset)')}" for var in ("OMP_WAIT_POLICY", *THREAD_ENV))
    nodes = f"nodes run with {' '.join(NODE_ARGS)}; " if NODE_ARGS else ""
    print(f"\n{waits}; {nodes}{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end, "
          f"{steal_share(started)} over the run; "
          f"prompt {args.prompt} tokens, {args.decode} decoded; hop ms/t = client round trip minus node compute per decode token, averaged over hops")


if __name__ == "__main__":
    main()
