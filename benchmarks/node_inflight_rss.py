"""A `node`'s resident memory while N connections send it the largest frame it takes at once.

    .venv/bin/python benchmarks/node_inflight_rss.py [--connections 8] [--layers 0-9] [-- NODE OPTIONS...]

Starts `node STORE --layers A-B` on 127.0.0.1 (NODE OPTIONS passed on, e.g. --max-inflight-mb 32),
asks it for its largest frame (INFO: max_positions x dim float32), then opens N WebSockets and,
at once on all of them, sends that frame minus its last KiB (a slow client), holds 3 s, and sends
the rest. The frames ask for blocks the node does not hold, so each is received and checked whole
and answered `span` without computing (memory for frames, not for compute). Prints the node's RSS
before, while the frames are held, its peak during the burst (VmHWM, reset first) and after.
With --compute the frames run through the node's blocks instead (N prefills: minutes of CPU).
`--python DIR` runs the node from another checkout (say, `git archive` of an older commit).
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swarm import wire  # noqa: E402


def rss_mb(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def websocket(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(f"GET /swarm HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 101"), reply
    return s


def ws_frame(payload: bytes) -> bytes:
    import numpy as np

    mask = os.urandom(4)
    masked = (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), len(payload))).tobytes()
    return bytes([0x82, 0x80 | 127]) + len(payload).to_bytes(8, "big") + mask + masked


def receive(s: socket.socket) -> wire.Frame:
    def exactly(n):
        out = bytearray()
        while len(out) < n:
            part = s.recv(min(n - len(out), 1 << 20))
            if not part:
                raise ConnectionError("closed by the node")
            out += part
        return bytes(out)

    head = exactly(2)
    n = head[1] & 0x7F
    if n >= 126:
        n = int.from_bytes(exactly(2 if n == 126 else 8), "big")
    return wire.decode(exactly(n))


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=str(ROOT / "models/smollm2-135m-instruct-q8_0"))
    ap.add_argument("--layers", default="0-9")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--compute", action="store_true", help="run the frames through the node's blocks")
    ap.add_argument("--python", help="a checkout to run the node from (default: this one)")
    ap.add_argument("node_args", nargs="*", help="options for `node` (after --)")
    args = ap.parse_args()

    tree = Path(args.python or ROOT)
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-c", "from cli.node import node; node()", args.store, "--layers", args.layers,
           "--port", "0", *args.node_args]
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + 300
        for line in proc.stderr:
            if line.startswith("node: "):
                url = line.split(" on ", 1)[1].split()[0]
                break
            if time.monotonic() > deadline:
                break
        if url is None:
            raise SystemExit(f"the node did not start: {proc.stderr.read() if proc.poll() is not None else ''}")
        threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()
        port = int(url.split(":")[2].split("/")[0])
        probe = websocket(port)
        probe.sendall(ws_frame(wire.encode(wire.Frame(wire.INFO_REQ, secrets.token_bytes(16)))))
        info = receive(probe).body
        rows, dim = info["max_positions"], info["dim"]
        first, last = (info["first_block"], info["last_block"]) if args.compute else (info["n_layers"] + 1,) * 2
        x = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
        frames = [ws_frame(wire.encode(wire.Frame(wire.FORWARD, secrets.token_bytes(16), 0, x,
                                                  first_block=first, last_block=last)))
                  for _ in range(args.connections)]
        socks = [websocket(port) for _ in frames]
        time.sleep(1.0)
        before = rss_mb(proc.pid)["VmRSS"]
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
        print(f"node {' '.join(args.node_args) or '(defaults)'}; {len(frames)} connections x frame of "
              f"{len(frames[0]) / 2**20:.1f} MiB ({rows} x {dim} float32); {'compute' if args.compute else 'no compute'}")
        go = threading.Event()
        replies: list = [None] * len(frames)

        def client(i: int) -> None:
            s, f = socks[i], frames[i]
            s.sendall(f[:-1024])  # blocks while the node does not read (a frame waiting for its budget)
            go.wait()
            s.sendall(f[-1024:])
            replies[i] = receive(s)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(frames))]
        for t in threads:
            t.start()
        time.sleep(3.0)
        held = rss_mb(proc.pid)["VmRSS"]
        go.set()
        t0 = time.monotonic()
        for t in threads:
            t.join(600)
        seconds = time.monotonic() - t0
        time.sleep(1.0)
        after = rss_mb(proc.pid)
        codes = [r.body["code"] if r.type == wire.ERROR else "result" for r in replies]
        for message in {r.body["message"] for r in replies if r.type == wire.ERROR and r.body["code"] != "span"}:
            print("  refused:", message)
        print(f"RSS MiB: before {before:.0f}, all frames held (last KiB unsent) {held:.0f} (+{held - before:.0f}), "
              f"peak during the burst {after['VmHWM']:.0f} (+{after['VmHWM'] - before:.0f}), "
              f"after {after['VmRSS']:.0f}; replies {sorted(set(codes))} x{len(codes)} in {seconds:.1f} s")
        for s in socks + [probe]:
            s.close()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
