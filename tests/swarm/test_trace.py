"""swarm/trace.py: off by default; with GGUF_FRAGMENTS_TRACE set, every relayed step leaves its
stages, in order, in the trace of each process it crossed (here one process: nodes in threads)."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
from tests.swarm.conftest import PROMPT, greedy, start_node
from distribution.local import LocalLoader
from swarm import trace
from swarm.client import distributed_text_model, timings

loader = LocalLoader(sys.argv[1])
nodes = [start_node(loader, 0, 2), start_node(loader, 3, 5)]
try:
    tm = distributed_text_model(loader, [n.url for n in nodes])
    with tm.open_session(64) as s:
        greedy(s, PROMPT, 5)
    print(trace.PREFIX is not None, timings(tm)["relayed_steps"])
finally:
    for n in nodes:
        n.stop()
"""
NODE_STAGES = ["arrive", "read", "compute", "computed", "framed"]


def run(six_store, env) -> str:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(six_store)], capture_output=True, text=True,
                          timeout=240, env=env, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_off_unless_asked(six_store, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GGUF_FRAGMENTS_TRACE"}
    assert run(six_store, env) == ["False", "4"]


def test_a_relayed_step_leaves_its_stages_in_order(six_store, tmp_path):
    prefix = tmp_path / "trace"
    assert run(six_store, {**os.environ, "GGUF_FRAGMENTS_TRACE": str(prefix)}) == ["True", "4"]
    files = list(tmp_path.glob("trace.*"))
    assert len(files) == 1  # one process
    lines = [line.split() for line in files[0].read_text().splitlines()]
    times = [int(t) for t, _, _ in lines]
    assert times == sorted(times)  # one clock, written as it goes
    steps = [int(s) for _, s, stage in lines if stage == "send"]
    assert len(steps) == 4  # the four relayed decode steps
    for step in steps:
        mine = [stage for _, s, stage in lines if int(s) == step]
        assert mine[0] == "send" and mine[-1] == "answer" and sorted(mine) == sorted(["send", "answer"] + NODE_STAGES[1:] * 2), mine
        assert mine.index("read") < mine.index("compute") < mine.index("computed") < mine.index("framed"), mine
    # and between a frame's sending and its reading, its bytes arrived at the node's socket
    stages = [stage for _, _, stage in lines]
    for i, stage in enumerate(stages):
        if stage == "read":
            sent = max(j for j in range(i) if stages[j] in ("send", "framed"))
            assert "arrive" in stages[sent + 1:i], stages[sent:i + 1]
