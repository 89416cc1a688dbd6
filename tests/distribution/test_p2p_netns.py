"""Real hosts, not only loopback: three `serve --p2p` peers in network namespaces of their own,
each listening on the wildcard the way a server is run for real, and a client on a fourth host.

Each peer must announce the address others reach it at (10.77.0.x), never 0.0.0.0 or loopback,
and a client that knows one peer's p2p:// address gets the same bytes and the same tokens as a
local run. Traffic stays inside the namespaces the test makes (tests/netns.py)."""

import json
import re
from dataclasses import replace

import pytest

from fragmenter.fragment import fragment_file
from models.factory import ModelSpec, write_model
from tests.conftest import BIN, run_cli
from tests.netns import netns_hosts

WILDCARD = ["--host", "0.0.0.0", "--port", "8001", "--listen", "/ip4/0.0.0.0/tcp/4001"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("netns")
    path = write_model(replace(ModelSpec(), n_layers=4), tmp / "four.gguf")
    fragment_file(str(path), tmp / "store", 8192, progress=False)
    return tmp / "store"


def test_wildcard_peers_on_three_hosts_serve_a_fourth(store, tmp_path):
    prompt = ["--prompt", "Once upon a time", "--max-tokens", "12", "--json"]
    local = run_cli("infer", store, *prompt, timeout=300)
    assert local.returncode == 0, local.stderr
    with netns_hosts(4) as net:
        serve = [BIN / "serve", store, "--p2p", *WILDCARD]
        first = net.start(0, [*serve, "--layers", "0-1"], wait_for="p2p://")
        address = first.line("p2p://")
        net.start(1, [*serve, "--layers", "2-2", "--bootstrap", address], wait_for="p2p://")  # the whole address
        # --host 0.0.0.0 alone: libp2p listens on the wildcard too (any port)
        third = net.start(2, [BIN / "serve", store, "--p2p", "--host", "0.0.0.0", "--port", "8001", "--layers", "3-3",
                              "--bootstrap", address.split("@", 1)[1]],  # the bare multiaddr
                          wait_for="p2p://")
        for i, p in enumerate(net.processes):
            mine = net.addrs[i]
            said = [line for line in p.lines if "p2p://" in line or "http://" in line]
            assert said and all(mine in line for line in said), said
            assert not any(re.search(r"0\.0\.0\.0|127\.0\.0\.1", line) for line in said), said
            assert f"over http://{mine}:8001/ " in p.wait_for("serving")

        env = {"GGUF_FRAGMENTS_CACHE": str(tmp_path / "cache")}
        fetched = net.run(3, [BIN / "fetch", third.line("p2p://"), "-o", tmp_path / "copy"], timeout=120, env=env)
        assert fetched.returncode == 0, fetched.stderr
        assert (tmp_path / "copy" / "manifest.json").read_bytes() == (store / "manifest.json").read_bytes()
        for f in (store / "fragments").iterdir():  # every fragment, from the three peers
            assert (tmp_path / "copy" / "fragments" / f.name).read_bytes() == f.read_bytes()

        remote = net.run(3, [BIN / "infer", address, *prompt], timeout=300,
                         env={"GGUF_FRAGMENTS_CACHE": str(tmp_path / "cache2")})
        assert remote.returncode == 0, remote.stderr
        assert json.loads(remote.stdout)["text"] == json.loads(local.stdout)["text"]
        assert all(p.proc.poll() is None for p in net.processes)  # nobody died on the way


def test_namespaces_are_gone_afterwards():
    import subprocess

    with netns_hosts(2) as net:
        names = list(net.names)
        probe = net.run(0, [BIN / "python", "-c", "import socket; s = socket.create_connection(('%s', 9), 2)"
                                                  % net.addrs[1]])
        assert "ConnectionRefused" in probe.stderr  # the other host answers (nothing listens on port 9)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names + [net.switch])
