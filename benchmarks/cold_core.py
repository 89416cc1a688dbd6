"""Python on a core that has just idled: the cost behind a relayed token's crossings.

A node (or the client) sleeps for most of a token while the other processes compute, then runs a
little Python: reading a frame, framing the next; then it computes its span. This measures, in
one run, the same work done back to back and after a pause of a token's length: the framing, a
node's compute (ten blocks of the default model, and the first parallel region alone, which
wakes the OpenMP worker thread), and a round trip between two processes over a raw TCP socket and
over aiohttp's WebSocket (what the swarm uses). docs/distributed-performance.md ("Where a token's
time goes") quotes it.

    .venv/bin/python benchmarks/cold_core.py [--pause-ms 6] [--repeat 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Before numpy and numba start their threads: the brief spin of idle worker threads that every
# command sets (cli.common.THREAD_ENV); libgomp's default spins for milliseconds, long enough to
# cover a pause of a token's length, which no node or client does.
from cli.common import apply_thread_env  # noqa: E402

apply_thread_env()

import numpy as np  # noqa: E402

from swarm import relay, wire  # noqa: E402


def after_pause(fn, pause_s: float, repeat: int) -> float:
    """Median us of one ``fn()`` called right after sleeping ``pause_s``."""
    times = []
    for _ in range(repeat):
        time.sleep(pause_s)
        t0 = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t0) / 1000)
    return statistics.median(times)


def framing_work() -> dict:
    """A node's per-relay Python, piece by piece: decode and check a RELAY, parse its hops, frame one."""
    x = np.random.default_rng(0).standard_normal((2, 576)).astype(np.float32)  # SmolLM2's width
    sid = bytes(range(1, 17))
    hops = relay.pack_hops((relay.Hop("ws://127.0.0.1:40001/swarm", sid, 20, 29),))
    body = wire.Trailer(12345, [2200], hops)
    data = wire.encode(wire.Frame(wire.RELAY, sid, 40, x, first_block=10, last_block=19, body=body))
    frame = wire.decode(data, None, 576, 4096)
    return {
        "wire.decode of a relay": lambda: wire.decode(data, None, 576, 4096),
        "relay.parse_hops": lambda: relay.parse_hops(frame.body.hops),
        "wire.encode of a relay": lambda: wire.encode(frame),
        "wire.Frame()": lambda: wire.Frame(wire.RELAY, sid, 40),
        "np.isfinite(a).all()": lambda: np.isfinite(x).all(),
    }


def compute_work() -> dict:
    """A node's compute after the same pause: Numba's first parallel region of a step (it wakes
    the OpenMP worker, asleep after its brief spin) and one token through ten of the default
    model's blocks, the span of one of three nodes."""
    from numba import njit, prange

    from distribution.local import LocalLoader
    from engine.model import LlamaModel
    from models.default import DEFAULT_STORE

    @njit(parallel=True)
    def touch(a):
        for i in prange(a.shape[0]):
            a[i] += 1.0

    flags = np.zeros(2)
    model = LlamaModel(LocalLoader(DEFAULT_STORE), backend="numba", layers=(0, 9), edges=False)
    x = np.random.default_rng(0).standard_normal((65, model.config.dim)).astype(np.float32) * 0.1
    cache = model.new_cache(65)
    model.forward_layers(x[:64], cache, 0)

    def blocks():  # the same step each time: position 64, after 64 cached positions
        cache.truncate(64)
        model.forward_layers(x[64:], cache, 64)

    touch(flags)  # compiled, and the blocks' kernels loaded, before timing
    blocks()
    return {"first parallel region": lambda: touch(flags), "10 blocks, one token": blocks}


def tcp_round_trip(pause_s: float, repeat: int, size: int = 2400) -> float:
    """Median us of a raw TCP round trip (loopback, another process echoes) after a pause."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    pid = os.fork()
    if pid == 0:  # the echoing process
        conn = socket.create_connection(("127.0.0.1", port))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        finally:
            os._exit(0)
    conn, _ = server.accept()
    conn.settimeout(10)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    message, times = b"x" * size, []
    try:
        for _ in range(repeat):
            time.sleep(pause_s)
            t0 = time.perf_counter_ns()
            conn.sendall(message)
            got = 0
            while got < size:
                got += len(conn.recv(65536))
            times.append((time.perf_counter_ns() - t0) / 1000)
    finally:
        conn.close()
        server.close()
        os.waitpid(pid, 0)
    return statistics.median(times)


def websocket_round_trip(pause_s: float, repeat: int, size: int = 2400) -> float:
    """Median us of the same round trip through aiohttp's WebSocket (the echo in another process)."""
    import aiohttp
    from aiohttp import web

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        async def echo(request):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                await ws.send_bytes(msg.data)
            return ws

        async def serve():
            app = web.Application()
            app.router.add_get("/", echo)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.SockSite(runner, server).start()
            await asyncio.sleep(120)  # bounded: the parent kills it when done

        try:
            asyncio.run(serve())
        finally:
            os._exit(0)
    server.close()
    loop = asyncio.new_event_loop()
    times = []
    try:
        async def connect():
            http = aiohttp.ClientSession()
            return http, await http.ws_connect(f"http://127.0.0.1:{port}/")

        http, ws = loop.run_until_complete(connect())
        message = b"x" * size

        async def one():
            await ws.send_bytes(message)
            return await ws.receive(timeout=10)

        for _ in range(repeat):
            time.sleep(pause_s)
            t0 = time.perf_counter_ns()
            loop.run_until_complete(one())
            times.append((time.perf_counter_ns() - t0) / 1000)
        loop.run_until_complete(ws.close())
        loop.run_until_complete(http.close())
    finally:
        loop.close()
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pause-ms", type=float, default=6.0, help="the idle time before each call (a token's length)")
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    pause = args.pause_ms / 1000
    print(f"load average {os.getloadavg()[0]:.1f}; medians of {args.repeat} calls, us")
    print(f"{'':<26} {'back to back':>12} {f'after {args.pause_ms:g} ms':>12} {'ratio':>7}")
    for name, fn in framing_work().items():
        hot, cold = after_pause(fn, 0, args.repeat), after_pause(fn, pause, args.repeat)
        print(f"{name:<26} {hot:>12.1f} {cold:>12.1f} {cold / hot:>6.1f}x")
    for name, fn in compute_work().items():
        hot, cold = after_pause(fn, 0, args.repeat), after_pause(fn, pause, args.repeat)
        print(f"{name:<26} {hot:>12.1f} {cold:>12.1f} {cold / hot:>6.1f}x")
    for name, trip in (("TCP round trip", tcp_round_trip), ("WebSocket round trip", websocket_round_trip)):
        hot, cold = trip(0, args.repeat), trip(pause, args.repeat)
        print(f"{name:<26} {hot:>12.1f} {cold:>12.1f} {cold / hot:>6.1f}x")


if __name__ == "__main__":
    main()
