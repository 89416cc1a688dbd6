"""The floor under a three-node route on this machine: the same spans over bare sockets.

`benchmarks/pipeline.py` measures the swarm as shipped: aiohttp WebSockets, the wire's framing and
checks, asyncio on every side. This measures what is left with all of that taken away: three
worker processes, each holding a third of the default model's blocks (loaded, pinned and computed
as a `node` does: `LlamaModel.forward_layers` on its main thread, Numba's worker on the other
CPU), passing each step's rows around a ring of loopback TCP sockets with blocking ``recv`` and
``sendall`` and a 16-byte header, no framing, no checks, no event loop:

    client --rows--> worker 1 --rows--> worker 2 --rows--> worker 3 --rows--> client

With ``--wire``, the rows go as the swarm's relayed steps do: each worker decodes and checks a
``RELAY`` frame of swarm/wire.py (trailer, hops parsed once), computes the last row, and encodes
the next ``RELAY`` (or the ``RELAYED`` answer), each frame preceded by its length as on a lane
(swarm/lane.py); still blocking sockets and no event loop. That is what a lane costs at least.

The client is this process, embedding, sampling and applying the head through the engine's own
``RoutedSession``, as `infer --distributed` does. Pairs of greedy runs, local (every block in this
process) then over the ring, back to back; the tokens are checked equal. What this ratio misses
of 1.0 is the cost of the pipeline itself on this machine (processes woken on idle cores, steps
starting cold); what the real route misses beyond it is the software's.

    .venv/bin/python benchmarks/pipeline_floor.py [--sets 3] [--pairs 8] [--wire]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Before numpy and numba start their threads, here and in the workers (spawned: they import this
# module again): the brief waiting every command uses.
from cli.common import apply_thread_env  # noqa: E402

apply_thread_env()

import numpy as np  # noqa: E402

HEAD = struct.Struct("<qq")  # position, rows (rows < 0: stop)
LEN = struct.Struct("<I")    # --wire: a frame's length (as on a lane), then the frame; length 0: stop
TIMEOUT_S = 120.0            # no socket waits longer: a dead worker ends the benchmark


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("peer closed")
        got += k
    return bytes(buf)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def worker(first: int, last: int, next_port: int, ready, wire_frames: bool = False) -> None:
    """One span: accept the previous hop, connect to the next, then run every step received."""
    from common.affinity import pin_compute_thread
    from distribution.local import LocalLoader
    from engine.model import LlamaModel
    from models.default import DEFAULT_STORE

    model = LlamaModel(LocalLoader(DEFAULT_STORE), backend="numba", layers=(first, last), edges=False)
    dim = model.config.dim
    cache = model.new_cache(512)
    warm = np.zeros((1, dim), np.float32)
    for pos in range(8):  # kernels compiled and warm, as a node's start-up steps do
        model.forward_layers(warm, cache, pos)
    pin_compute_thread()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT_S)
    ready.send(listener.getsockname()[1])
    prev, _ = listener.accept()
    prev.settimeout(TIMEOUT_S)
    nxt = connect(next_port)
    if wire_frames:
        return relay_frames(model, cache, prev, nxt)
    while True:
        pos, rows = HEAD.unpack(recv_exactly(prev, HEAD.size))
        if rows < 0:
            nxt.sendall(HEAD.pack(0, -1))
            return
        x = np.frombuffer(recv_exactly(prev, rows * dim * 4), np.float32).reshape(rows, dim)
        y = model.forward_layers(x, cache, pos)
        nxt.sendall(HEAD.pack(pos, rows) + np.ascontiguousarray(y, np.float32).tobytes())


def relay_frames(model, cache, prev: socket.socket, nxt: socket.socket) -> None:
    """--wire: every step a RELAY frame in, checked as a node checks it, and a RELAY (RELAYED) out."""
    import time

    from swarm import relay, wire

    dim, parsed = model.config.dim, (None, ())
    while True:
        n, = LEN.unpack(recv_exactly(prev, LEN.size))
        if n == 0:
            nxt.sendall(LEN.pack(0))
            return
        frame = wire.decode(recv_exactly(prev, n), None, dim, wire.MAX_HOPS + 1)
        trailer = frame.body
        if trailer.hops != parsed[0]:
            parsed = (trailer.hops, relay.parse_hops(trailer.hops))
        hops = parsed[1]
        t0 = time.perf_counter()
        y = model.forward_layers(frame.array[-1:].astype(np.float32, copy=False), cache, frame.position)
        elapsed = trailer.elapsed_us + [int((time.perf_counter() - t0) * 1e6)]
        if hops:
            out = wire.Frame(wire.RELAY, hops[0].session, frame.position, y, first_block=hops[0].first,
                             last_block=hops[0].last, body=wire.Trailer(trailer.step, elapsed,
                                                                         trailer.hops[len(hops[0].packed):]))
        else:
            out = wire.Frame(wire.RELAYED, frame.session, frame.position, y, first_block=frame.first_block,
                             last_block=frame.last_block, elapsed_us=elapsed[-1],
                             body=wire.Trailer(trailer.step, elapsed))
        data = wire.encode(out, None, before=frame.array)
        nxt.sendall(LEN.pack(len(data)) + data)


class Ring:
    """A ``SpanSession`` over every block: the rows go around the ring of workers and come back."""

    def __init__(self, to_first: socket.socket, from_last: socket.socket, config, capacity: int):
        self.to_first, self.from_last, self.dim, self._capacity = to_first, from_last, config.dim, capacity
        self.first_layer, self.last_layer = 0, config.n_layers - 1
        self._position = 0

    @property
    def position(self) -> int:
        return self._position

    @property
    def capacity(self) -> int:
        return self._capacity

    def forward(self, hidden: np.ndarray) -> np.ndarray:
        # hidden: (T, dim) -> (T, dim)
        rows = hidden.shape[0]
        rows_out = np.ascontiguousarray(hidden, np.float32).tobytes()
        self.to_first.sendall(HEAD.pack(self._position, rows) + rows_out)
        pos, back = HEAD.unpack(recv_exactly(self.from_last, HEAD.size))
        if (pos, back) != (self._position, rows):
            raise RuntimeError(f"ring answered position {pos}, {back} rows; sent {self._position}, {rows}")
        self._position += rows
        return np.frombuffer(recv_exactly(self.from_last, rows * self.dim * 4), np.float32).reshape(rows, self.dim)

    def rewind(self, position: int) -> None:
        self._position = position  # (the workers overwrite their caches from there)

    def close(self) -> None:
        pass

    def stop(self) -> None:
        self.to_first.sendall(HEAD.pack(0, -1))
        recv_exactly(self.from_last, HEAD.size)


class WireRing(Ring):
    """--wire: every row a relayed step (one row at a time, prompts too), framed as the swarm's."""

    def __init__(self, to_first, from_last, config, capacity: int, spans: list[tuple[int, int]]):
        import secrets

        from swarm import relay

        super().__init__(to_first, from_last, config, capacity)
        self.spans, self.sids = spans, [secrets.token_bytes(16) for _ in spans]
        self.hops = relay.pack_hops(tuple(relay.Hop(f"ws://127.0.0.1:{9000 + i}/swarm", sid, a, b)  # (never dialled)
                                          for i, (sid, (a, b)) in enumerate(zip(self.sids, spans)) if i))
        self.step = 0

    def forward(self, hidden: np.ndarray) -> np.ndarray:
        # hidden: (T, dim) -> (T, dim)
        from swarm import wire

        out = np.empty((hidden.shape[0], self.dim), np.float32)
        for r in range(hidden.shape[0]):
            self.step += 1
            data = wire.encode(wire.Frame(wire.RELAY, self.sids[0], self._position, hidden[r:r + 1].astype(np.float32),
                                          first_block=self.spans[0][0], last_block=self.spans[0][1],
                                          body=wire.Trailer(self.step, [], self.hops)))
            self.to_first.sendall(LEN.pack(len(data)) + data)
            n, = LEN.unpack(recv_exactly(self.from_last, LEN.size))
            reply = wire.decode(recv_exactly(self.from_last, n), None, self.dim, len(self.spans) + 1)
            if reply.type != wire.RELAYED or reply.body.step != self.step or reply.position != self._position:
                raise RuntimeError(f"ring answered step {reply.body.step} at {reply.position}; sent {self.step}")
            out[r] = reply.array[-1]
            self._position += 1
        return out

    def stop(self) -> None:
        self.to_first.sendall(LEN.pack(0))
        recv_exactly(self.from_last, LEN.size)


def one_set(model, prompt: list[int], pairs: int, decode: int, wire_frames: bool = False) -> tuple[list[float], list[float]]:
    """Start three workers, measure ``pairs`` pairs of runs, stop them: (ratios, local tok/s)."""
    import benchmarks.pipeline as pipeline
    from engine.session import RoutedSession

    ctx = mp.get_context("spawn")
    back = socket.create_server(("127.0.0.1", 0))
    back.settimeout(TIMEOUT_S)
    next_port, procs = back.getsockname()[1], []
    try:
        spans = pipeline.splits(model.config.n_layers, 3)
        for first, last in reversed(spans):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(first, last, next_port, theirs, wire_frames), daemon=True)
            proc.start()
            procs.append(proc)
            if not mine.poll(TIMEOUT_S):
                raise SystemExit(f"worker {first}-{last} did not start")
            next_port = mine.recv()
        to_first = connect(next_port)
        from_last, _ = back.accept()
        from_last.settimeout(TIMEOUT_S)
        ring = (WireRing(to_first, from_last, model.config, 512, spans) if wire_frames
                else Ring(to_first, from_last, model.config, 512))
        ratios, local = [], []
        pipeline.run(RoutedSession(model, [ring]), prompt[:4], 4)  # warm
        for _ in range(pairs):
            with model.open_session(512) as s:
                here = pipeline.run(s, prompt, decode)
            ring.rewind(0)
            there = pipeline.run(RoutedSession(model, [ring]), prompt, decode)
            if there[0] != here[0]:
                raise SystemExit("tokens over the ring differ from local")
            ratios.append(there[2] / here[2])
            local.append(here[2])
        ring.stop()
        return ratios, local
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
        back.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=3, help="fresh sets of three workers, one after another")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--wire", action="store_true", help="frames of swarm/wire.py, checked as a node checks them")
    args = parser.parse_args()

    from distribution.local import LocalLoader
    from engine.model import LlamaModel
    from models.default import DEFAULT_STORE

    model = LlamaModel(LocalLoader(DEFAULT_STORE), backend="numba")
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(10, model.config.vocab_size - 10, args.prompt)]
    how = "swarm/wire.py relay frames" if args.wire else "bare loopback sockets"
    print(f"{args.sets} sets of 3 workers over {how}, {args.pairs} pairs each "
          f"({args.prompt} prompt tokens, {args.decode} decoded)")
    medians = []
    for k in range(args.sets):
        ratios, local = one_set(model, prompt, args.pairs, args.decode, args.wire)
        medians.append(float(np.median(ratios)))
        print(f"set {k:2d}: decode {medians[-1]:.2f}x local (pairs {min(ratios):.2f}-{max(ratios):.2f}, "
              f"local {np.median(local):.0f} tok/s)", flush=True)
    print(f"sets' medians: {min(medians):.2f}-{max(medians):.2f}x, median {np.median(medians):.2f}x")


if __name__ == "__main__":
    main()
