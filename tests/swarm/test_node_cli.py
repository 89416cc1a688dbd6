"""`node` processes that find each other through the DHT; a client that knows one p2p:// address
routes through them, and when a node is killed -9 mid-generation, finds (again in the DHT) a node
that joined after the session began. A node loaded from p2p:// serves its fragments in turn."""

import hashlib
import os
import urllib.request

import pytest

from distribution.p2p_loader import P2PLoader
from distribution.local import LocalLoader
from swarm.client import distributed_text_model, query_info, timings
from tests.conftest import assert_one_line_error, run_cli
from tests.swarm.conftest import greedy
from tests.swarm.nodeutil import NodeProcess

PROMPT = "What is the capital of France?"
N = 8


@pytest.mark.parametrize("args, needle", [
    (["--layers", "5-2"], "span 5-2 is empty"),
    (["--layers", "0-40"], "--layers 0-40: "),  # named as the option, with the blocks there are
    (["--layers", "0-30"], "has blocks 0-29"),
    (["--layers", "0-9,20-29"], "one contiguous span"),
    (["--layers", "0-9", "--bootstrap", "/ip4/127.0.0.1/tcp/1"], "--bootstrap"),
])
def test_node_user_errors(default_store, args, needle):
    assert_one_line_error(run_cli("node", default_store, *args, timeout=120), needle)


def test_short_swarm_key_is_refused(default_store, tmp_path):
    key = tmp_path / "key"
    key.write_text("short")
    assert_one_line_error(run_cli("node", default_store, "--layers", "0-9", "--swarm-key", key, timeout=120),
                          str(key), "at least 16 bytes")


def test_port_in_use_fails_before_loading_with_one_line(default_store):
    import socket
    import time

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        proc = run_cli("node", default_store, "--layers", "0-9", "--port", port, timeout=120)
    line = assert_one_line_error(proc, "--port", str(port))
    assert "stopped" not in proc.stderr and "ms/token" not in proc.stderr, line
    assert time.monotonic() - t0 < 60  # no model load, no libp2p start


def test_lane_port_in_use_fails_before_loading_with_one_line(default_store):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("node", default_store, "--layers", "0-9", "--lane-port", port, timeout=120)
    line = assert_one_line_error(proc, "--lane-port", str(port))
    assert "stopped" not in proc.stderr and "ms/token" not in proc.stderr, line


def test_dht_route_and_failover_to_a_node_that_joined_later(default_store, tmp_path):
    from cli.common import load_text_model

    local = load_text_model(str(default_store))
    tokens = local.chat_prompt([{"role": "user", "content": PROMPT}])[0]
    with local.open_session(len(tokens) + N) as s:
        expected = greedy(s, tokens, N)

    a = NodeProcess(default_store, "0-9")
    nodes, loader = [a], None
    try:
        for span in ("10-19", "20-29"):
            nodes.append(NodeProcess(default_store, span, "--bootstrap", a.address))
        loader = P2PLoader(a.address, cache_dir=tmp_path / "cache")
        tm = distributed_text_model(loader)
        # the client holds the edges only: no fragment of any block was fetched
        cached = {f.name for f in (tmp_path / "cache").iterdir()}
        blocks = set(loader.manifest.fragments_for([t for t in loader.manifest.tensor_names() if t.startswith("blk.")]))
        edges = set(loader.manifest.fragments_for(["token_embd.weight", "output_norm.weight"]))
        assert edges <= cached and not (blocks - edges) & cached

        def kill(i):
            if i == 3:
                nodes[1].kill()
                nodes.append(NodeProcess(default_store, "10-29", "--bootstrap", a.address))

        with tm.open_session(len(tokens) + N) as s:
            assert [hop["node"] for hop in timings(tm)["route"]] == [n.url for n in nodes]
            assert greedy(s, tokens, N, kill) == expected
        t = timings(tm)
        assert t["failovers"] == 1
        assert t["route"][1] == {"blocks": "10-19", "node": nodes[3].url}
    finally:
        if loader is not None:
            loader.close()
        for n in nodes:
            n.stop()


def test_node_from_p2p_source_serves_its_span_and_fragments(default_store):
    full = NodeProcess(default_store, "0-29")
    try:
        peer = NodeProcess(full.address, "20-29")  # fetches its blocks from the swarm, then shares them
        try:
            info, _ = query_info(peer.url)
            assert (info["first_block"], info["last_block"]) == (20, 29)
            loader = LocalLoader(default_store)
            fid = loader.manifest.fragments_for(["blk.25.ffn_down.weight"])[0]
            url = peer.url.replace("ws://", "http://").replace("/swarm", f"/fragments/{fid}")
            with urllib.request.urlopen(url, timeout=10) as reply:
                assert hashlib.sha256(reply.read()).hexdigest() == fid
        finally:
            peer.stop()
    finally:
        full.stop()


def test_a_node_from_a_gguf_file_says_how_clients_reach_it(factory_models):
    """A .gguf is not a fragment store: its p2p:// address gives a client no manifest to start from
    (infer found none, with no word why). The node says so and names its ws:// URL for --node."""
    node = NodeProcess(factory_models["q8_0-spm-gqa"], "0-1", timeout=120)
    try:
        import time

        deadline = time.monotonic() + 10
        while not any(line.startswith("note:") for line in node.lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        note = next(line for line in node.lines if line.startswith("note:"))
        assert "not a fragment store" in note and f"--node {node.url}" in note
    finally:
        node.stop()


def test_a_node_joining_through_another_models_peer_is_told(factory_models):
    """Allowed (one DHT can carry several models), but the p2p:// address given to --bootstrap is
    another manifest's: clients starting from it look for that model's blocks, never this node."""
    a = NodeProcess(factory_models["q8_0-spm-gqa"], "0-1", timeout=120)
    try:
        theirs = a.address.split("@")[0][len("p2p://"):]
        b = NodeProcess(factory_models["f16-bpe-mqa"], "0-1", "--bootstrap", a.address, timeout=120)
        try:
            ours = b.address.split("@")[0][len("p2p://"):]
            assert ours != theirs
            notes = [line for line in b.lines if line.startswith("note: --bootstrap")]
            assert len(notes) == 1 and f"names manifest {theirs[:12]}..." in notes[0], b.lines
            assert f"this node serves {ours[:12]}..." in notes[0]
            assert not any(line.startswith("note: --bootstrap") for line in a.lines)
        finally:
            b.stop()
    finally:
        a.stop()


def thread_cpus(pid: int) -> dict[int, set[int]]:
    """Each thread of process ``pid``: the CPUs it may run on (Cpus_allowed_list, e.g. "0-3,6")."""
    cpus = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            listed = next(line.split()[1] for line in f if line.startswith("Cpus_allowed_list:"))
        cpus[int(tid)] = {c for part in listed.split(",")
                          for c in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)}
    return cpus


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or len(os.sched_getaffinity(0)) < 2,
                    reason="pinning needs Linux's /proc and two CPUs (with one it does nothing)")
@pytest.mark.parametrize("pin", [True, False])
def test_a_ready_node_computes_on_a_cpu_of_its_own(factory_models, pin):
    """Once a node prints its address, its main thread (which runs the blocks) has one CPU and its
    other threads (OpenMP's workers, the DHT's) have the rest; --no-pin leaves them to the OS."""
    allowed = os.sched_getaffinity(0)
    node = NodeProcess(factory_models["q8_0-spm-gqa"], "0-1", *([] if pin else ["--no-pin"]), timeout=120)
    try:
        cpus = thread_cpus(node.proc.pid)
        main = cpus.pop(node.proc.pid)
        assert len(cpus) >= 2  # the numba pool's worker and the DHT's thread at least
        if pin:
            assert len(main) == 1 and main <= allowed
            assert all(c == allowed - main for c in cpus.values()), cpus
        else:
            assert main == allowed and all(c == allowed for c in cpus.values()), cpus
    finally:
        node.stop()
