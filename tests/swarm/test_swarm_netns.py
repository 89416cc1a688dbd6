"""Real hosts, not only loopback: two nodes and a client on three namespaced hosts (tests/netns.py),
the nodes listening on the wildcard the way they are run for real. Each node must announce the
address others reach it at (10.77.0.x), never 0.0.0.0 or loopback, and the client, knowing one
node's p2p:// address, gets the same greedy tokens as a local run."""

import json
import re
from pathlib import Path

from tests.conftest import BIN
from tests.netns import netns_hosts
from tests.swarm.conftest import PROMPT

WILDCARD = ["--host", "0.0.0.0", "--port", "8001", "--listen", "/ip4/0.0.0.0/tcp/4001"]
PROBE = Path(__file__).with_name("probe.py")
N = 8


def test_two_wildcard_nodes_and_a_client_on_three_hosts(six_store, six_loader, local_greedy, tmp_path):
    expected = local_greedy(PROMPT, N)
    with netns_hosts(3) as net:
        node = [BIN / "node", six_store, *WILDCARD]
        first = net.start(0, [*node, "--layers", "0-2"], wait_for="p2p://", timeout=300)
        address = first.line("p2p://")
        net.start(1, [*node, "--layers", "3-5", "--bootstrap", address], wait_for="p2p://", timeout=300)
        for i, p in enumerate(net.processes):
            said = [line for line in p.lines if "p2p://" in line or "ws://" in line]
            assert said and all(net.addrs[i] in line for line in said), said
            assert not any(re.search(r"0\.0\.0\.0|127\.0\.0\.1", line) for line in said), said
        run = net.run(2, [BIN / "python", PROBE, address, N, *PROMPT], timeout=300,
                      env={"GGUF_FRAGMENTS_CACHE": str(tmp_path / "cache")})
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert result["tokens"] == expected
        assert [hop["node"] for hop in result["route"]] == [f"ws://{net.addrs[0]}:8001/swarm",
                                                           f"ws://{net.addrs[1]}:8001/swarm"]
        assert all(p.proc.poll() is None for p in net.processes)
