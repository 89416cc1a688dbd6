"""`infer p2p://... --distributed`: the same greedy tokens as a local `infer`, the route and timings in
--json and --timings, one-line errors, and a private swarm's key."""

import json
import re
import time

import pytest

from tests.conftest import assert_one_line_error, run_cli
from tests.swarm.nodeutil import NodeProcess

PROMPT = ["--prompt", "What is the capital of France?", "--max-tokens", "8"]


@pytest.fixture(scope="module")
def local_tokens(default_store):
    proc = run_cli("infer", default_store, *PROMPT, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["tokens"]


@pytest.fixture(scope="module")
def swarm(default_store):
    a = NodeProcess(default_store, "0-14")
    nodes = [a]
    try:
        nodes.append(NodeProcess(default_store, "15-29", "--bootstrap", a.address))
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def test_json_has_tokens_route_and_timings(swarm, local_tokens):
    proc = run_cli("infer", swarm[0].address, "--distributed", *PROMPT, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["tokens"] == local_tokens
    assert out["route"] == [{"blocks": "0-14", "node": swarm[0].url}, {"blocks": "15-29", "node": swarm[1].url}]
    assert out["failovers"] == 0
    assert set(out["node_ms"]) == {f"{swarm[0].url} (0-14)", f"{swarm[1].url} (15-29)"}
    assert out["hop_overhead_ms"] > 0
    assert 0 < out["relayed_steps"] <= len(out["tokens"])  # decode steps went node to node
    assert out["lane_steps"] == out["relayed_steps"]  # on the nodes' lanes (swarm/lane.py)


def test_a_node_without_lanes_is_relayed_to_over_its_websocket(default_store, local_tokens):
    node = NodeProcess(default_store, "0-29", "--no-lanes")
    try:
        assert "lanes on port" not in " ".join(node.lines)
        proc = run_cli("infer", node.address, "--distributed", *PROMPT, "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["tokens"] == local_tokens and out["relayed_steps"] > 0 and out["lane_steps"] == 0
    finally:
        node.stop()


def test_nodes_print_a_line_per_session_opened_and_closed(swarm):
    before = [len(n.lines) for n in swarm]
    proc = run_cli("infer", swarm[0].address, "--distributed", *PROMPT)
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 10
    for node, start, span in zip(swarm, before, ("0-14", "15-29")):
        # This run's lines: the session opened, and then closed. (The test before's "closed" line may
        # still come in after ``before``, from the thread that reads the node's output.)
        def lines(what: str) -> list[str]:
            return [line for line in node.lines[start:] if what in line]

        def sid_of(line: str) -> str:
            return line.split(" session ")[1].split()[0]

        while not (lines(" opened: ") and lines(f"session {sid_of(lines(' opened: ')[0])} closed: ")) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        opened = lines(" opened: ")
        assert len(opened) == 1, node.lines[start:]
        sid = sid_of(opened[0])
        assert f"session {sid} opened: blocks {span} (1 of 16 open)" in opened[0]
        closed = lines(f"session {sid} closed: ")
        assert len(closed) == 1, node.lines[start:]
        assert re.search(rf"session {sid} closed: \d+ positions, [\d.]+ s \(0 of 16 open\)", closed[0]), closed


def test_timings_table_on_stderr(swarm):
    proc = run_cli("infer", swarm[0].address, "--distributed", *PROMPT, "--timings")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "0-14" in proc.stderr and "15-29" in proc.stderr and "hop overhead" in proc.stderr


def test_distributed_needs_a_p2p_address(default_store):
    assert_one_line_error(run_cli("infer", default_store, "--distributed", *PROMPT), "--distributed", "p2p://")
    # each option named for what it is (the backend's misuse blamed --swarm-key, which was not given)
    assert_one_line_error(run_cli("infer", "p2p://" + "ab" * 32 + "@/ip4/127.0.0.1/tcp/1/p2p/x", "--distributed",
                                  "--backend", "llama.cpp", *PROMPT), "--backend llama.cpp", "--distributed")
    assert_one_line_error(run_cli("infer", default_store, "--swarm-key", "k", *PROMPT), "--swarm-key goes with")


def test_a_key_for_an_open_swarm_is_named_as_such(swarm, tmp_path):
    """The client's decoder spoke as a node would: 'this swarm is private', of an open one."""
    key = tmp_path / "swarm.key"
    key.write_text("correct horse battery staple 42")
    proc = run_cli("infer", swarm[0].address, "--distributed", "--swarm-key", key, *PROMPT)
    assert_one_line_error(proc, "swarm is open (its replies carry no HMAC): drop --swarm-key")
    assert "private" not in proc.stderr


def test_private_swarm_key(default_store, tmp_path, local_tokens):
    key = tmp_path / "swarm.key"
    key.write_text("correct horse battery staple 42")
    node = NodeProcess(default_store, "0-29", "--swarm-key", key)
    try:
        refused = run_cli("infer", node.address, "--distributed", *PROMPT)
        assert_one_line_error(refused, "refused", "--swarm-key", "nodes found but not usable")
        assert refused.returncode == 3  # no usable node: as for peers that cannot be reached (it was 1)
        other = tmp_path / "other.key"
        other.write_text("another swarm's key, 32 bytes..")
        assert_one_line_error(run_cli("infer", node.address, "--distributed", "--swarm-key", other, *PROMPT),
                              "signed with another swarm key (see --swarm-key)")
        proc = run_cli("infer", node.address, "--distributed", "--swarm-key", key, *PROMPT, "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["tokens"] == local_tokens
    finally:
        node.stop()


def test_a_prompt_past_the_nodes_positions_names_their_limit(default_store):
    """The nodes' --max-positions bounds the session, not the client's --ctx: the error said
    'raise --ctx' of a --ctx already large enough."""
    node = NodeProcess(default_store, "0-29", "--max-positions", "40")
    try:
        proc = run_cli("infer", node.address, "--distributed", "--ctx", "4000", "--prompt",
                       "Tell me everything about the history of the city of Paris, from the Romans to today.")
        assert_one_line_error(proc, "at most 40 positions", "--max-positions")
        assert "--ctx" not in proc.stderr
    finally:
        node.stop()


def test_ctrl_c_closes_the_sessions_on_the_nodes(swarm):
    import signal
    import subprocess
    import time

    from swarm.client import query_info
    from tests.conftest import BIN

    proc = subprocess.Popen([str(BIN / "infer"), swarm[0].address, "--distributed", "--prompt", "Tell me a long story.",
                             "--max-tokens", "500"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.read(1)  # the answer has begun: the sessions are open on both nodes
        assert first, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        infos = [query_info(n.url)[0] for n in swarm]
        if all(i["free_sessions"] == i["max_sessions"] for i in infos):
            break
        time.sleep(0.2)
    assert all(i["free_sessions"] == i["max_sessions"] for i in infos), infos
