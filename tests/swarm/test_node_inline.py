"""A node process computes every step on its main thread (common.compute.adopt with a JobLoop),
which also reads the lanes; the WebSocket's event loop runs on a second thread and hands its
computing over, so it answers INFO while the compute thread is busy, and a prompt's result is bit
for bit one pass's."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import asyncio, secrets, sys, threading
import numpy as np
from common import compute
from common.jobloop import JobLoop

jobs = JobLoop()
compute.adopt(jobs)  # as `node` does, before the model loads
from distribution.local import LocalLoader
from engine.model import LlamaModel
from swarm import manifest_sha, wire
from swarm.server import NodeService

loader = LocalLoader(sys.argv[1])
model = LlamaModel(loader, backend="numba", layers=(0, 5))
service = NodeService(model, manifest_sha(loader))
service.open_lanes()  # on this thread, before its loop runs (swarm/node.py)
assert service.info()["lane"] == service.lane_server.port

computed_on = set()
original = model.forward_layers
def spy(*a, **k):
    computed_on.add(threading.get_ident())
    return original(*a, **k)
model.forward_layers = spy

x = np.random.default_rng(0).standard_normal((40, model.config.dim)).astype(np.float32)
sid = secrets.token_bytes(16)
done, held, release = [], threading.Event(), threading.Event()

async def forward():
    reply = await service.handle(wire.encode(wire.Frame(wire.FORWARD, sid, 0, x, first_block=0, last_block=5)), object())
    done.append("forward")
    return wire.decode(reply)

async def info():
    await asyncio.get_running_loop().run_in_executor(None, held.wait, 30)  # the compute thread is busy
    reply = await service.handle(wire.encode(wire.Frame(wire.INFO_REQ, secrets.token_bytes(16))), object())
    done.append("info")
    release.set()
    return wire.decode(reply)

def hold():
    held.set()
    release.wait(30)

async def main():
    jobs.submit(hold)  # (the prompt's pass is queued behind this)
    try:
        return await asyncio.gather(forward(), info())
    finally:
        jobs.stop()

outcome = []
loop_thread = threading.Thread(target=lambda: outcome.append(asyncio.run(main())))
loop_thread.start()
jobs.run()  # this thread computes until the loop's work is done
loop_thread.join(30)
result, answer = outcome[0]
assert answer.type == wire.INFO and answer.body["first_block"] == 0, answer
assert done == ["info", "forward"], done  # answered while the compute thread was busy
assert result.type == wire.RESULT, result.body
assert computed_on == {threading.get_ident()}, computed_on  # on this thread, not the loop's
expected = LlamaModel(loader, backend="numba", layers=(0, 5))
np.testing.assert_array_equal(result.array, expected.forward_layers(x, expected.new_cache(64), 0))
print("ok")
"""


def test_a_node_computes_on_its_main_thread_and_its_loop_answers_meanwhile(six_store):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(six_store)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
