"""A node process computes on its event loop's own thread (common.compute.adopt): no hand-over per
step, and a long prompt gives the loop back between blocks, so other requests are answered meanwhile."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import asyncio, secrets, sys, threading
import numpy as np
from common import compute

compute.adopt()  # as `node` does, before the model loads
from distribution.local import LocalLoader
from engine.model import LlamaModel
from swarm import manifest_sha, wire
from swarm.server import NodeService

loader = LocalLoader(sys.argv[1])
model = LlamaModel(loader, backend="numba", layers=(0, 5))
service = NodeService(model, manifest_sha(loader))
assert not compute.started()  # no compute thread was started behind the adopted one

steps_on = set()
original = model.forward_layers_steps
def spy(*a, **k):
    steps_on.add(threading.get_ident())
    return original(*a, **k)
model.forward_layers_steps = spy

x = np.random.default_rng(0).standard_normal((40, model.config.dim)).astype(np.float32)
sid = secrets.token_bytes(16)
conn = object()
done = []

async def forward():
    reply = await service.handle(wire.encode(wire.Frame(wire.FORWARD, sid, 0, x, first_block=0, last_block=5)), conn)
    done.append("forward")
    return wire.decode(reply)

async def info():
    await asyncio.sleep(0)  # the prompt's pass has begun
    reply = await service.handle(wire.encode(wire.Frame(wire.INFO_REQ, secrets.token_bytes(16))), object())
    done.append("info")
    return wire.decode(reply)

async def main():
    return await asyncio.gather(forward(), info())

result, answer = asyncio.run(main())
assert answer.type == wire.INFO and answer.body["first_block"] == 0, answer
assert done == ["info", "forward"], done  # answered while the prompt was between blocks
assert result.type == wire.RESULT, result.body
assert steps_on == {threading.get_ident()}, steps_on  # on this thread, the loop's
expected = LlamaModel(loader, backend="numba", layers=(0, 5))
np.testing.assert_array_equal(result.array, expected.forward_layers(x, expected.new_cache(64), 0))
print("ok")
"""


def test_a_node_computes_on_its_loop_thread_and_answers_between_blocks(six_store):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(six_store)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
