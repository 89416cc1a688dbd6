"""Network namespaces for tests: N hosts with their own network stacks on one private bridge.

    with netns_hosts(3) as net:            # skips the test, with the reason, where they cannot be made
        net.addrs[0]                       # "10.77.0.1"
        p = net.start(0, [BIN / "serve", store, "--p2p", ...], wait_for="p2p://")
        p.line("p2p://")                   # a line it printed on stderr
        net.run(2, [BIN / "fetch", ...])   # run to completion inside host 2 (CompletedProcess)

Layout: one namespace per host (``eth0`` = 10.77.0.<i+1>/24, ``lo`` up) and one "switch" namespace
holding a bridge with the other end of every veth pair. Nothing is created in the test's own
namespace and no host has a default route, so the hosts reach each other and nothing else: a
test's traffic cannot leave. Everything is removed when the block ends, also on failure; names
carry the creating process id, so namespaces left by a killed run are removed by the next one.

Needs root (CAP_NET_ADMIN) and iproute2. Where namespaces cannot be made the test is skipped with
the reason; set GGUF_FRAGMENTS_REQUIRE_NETNS=1 (CI that has root) to make that a failure instead.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from itertools import count

import pytest

PREFIX = "gguf-test-"
SUBNET = "10.77.0"
_serial = count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Delete namespaces of earlier runs whose process is gone (a run killed before its cleanup)."""
    listed = _ip("netns", "list", check=False).stdout
    for name in re.findall(rf"^({PREFIX}(\d+)-\S+)", listed, flags=re.M):
        if not _alive(int(name[1])):
            _ip("netns", "del", name[0], check=False)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None if they can."""
    if not shutil.which("ip"):
        return "iproute2 ('ip') is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN)"
    probe = f"{PREFIX}{os.getpid()}-probe{next(_serial)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"'ip netns add' failed: {made.stderr.strip() or made.returncode}"
    _ip("netns", "del", probe, check=False)
    return None


class HostProcess:
    """A process inside a namespace; its stderr lines are collected as they come."""

    def __init__(self, argv: list, namespace: str, env: dict | None = None):
        self.argv = [str(a) for a in argv]
        self.proc = subprocess.Popen(["ip", "netns", "exec", namespace, *self.argv], stderr=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.stdout_lines: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stderr, self.lines), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout_lines), daemon=True).start()

    @staticmethod
    def _read(stream, into):
        for line in stream:
            into.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 60) -> str:
        """The first stderr line containing ``text``; TimeoutError (with what it printed) if none comes."""
        deadline = time.monotonic() + timeout
        while True:
            hit = next((line for line in list(self.lines) if text in line), None)
            if hit is not None:
                return hit
            if time.monotonic() > deadline or self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader catch the last lines
                raise TimeoutError(f"{' '.join(self.argv[:2])} did not print {text!r}: {self.lines}")
            time.sleep(0.05)

    def line(self, prefix: str) -> str:
        return next(line for line in self.lines if line.startswith(prefix))

    def stop(self, timeout: float = 10) -> None:
        """SIGINT (a clean stop), then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)


class Hosts:
    """N namespaced hosts; see the module's docstring."""

    def __init__(self, n: int, subnet: str = SUBNET):
        tag = f"{PREFIX}{os.getpid()}-{next(_serial)}"
        self.switch = f"{tag}-sw"
        self.names = [f"{tag}-h{i}" for i in range(n)]
        self.addrs = [f"{subnet}.{i + 1}" for i in range(n)]
        self.processes: list[HostProcess] = []
        self._made: list[str] = []
        try:
            self._build(subnet)
        except BaseException:
            self.close()
            raise

    def _build(self, subnet: str) -> None:
        for ns in [self.switch, *self.names]:
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (ns, addr) in enumerate(zip(self.names, self.addrs)):
            # Both ends made directly inside their namespaces: nothing ever appears in ours.
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", self.switch)
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", self.switch, "link", "set", f"p{i}", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def start(self, i: int, argv: list, wait_for: str | None = None, timeout: float = 60,
              env: dict | None = None) -> HostProcess:
        """Start ``argv`` inside host ``i``; if ``wait_for`` is given, return once it printed that."""
        p = HostProcess(argv, self.names[i], env)
        self.processes.append(p)
        if wait_for is not None:
            p.wait_for(wait_for, timeout)
        return p

    def run(self, i: int, argv: list, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` to completion inside host ``i``."""
        return subprocess.run(["ip", "netns", "exec", self.names[i], *map(str, argv)], capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, **(env or {})})

    def close(self) -> None:
        for p in self.processes:
            try:
                p.stop()
            except Exception:  # keep cleaning up
                pass
        for ns in reversed(self._made):
            _ip("netns", "del", ns, check=False)
        self._made.clear()


@contextmanager
def netns_hosts(n: int, subnet: str = SUBNET):
    """``n`` namespaced hosts for the block (see the module's docstring); skips the test if impossible."""
    reason = unavailable()
    if reason is not None:
        if os.environ.get("GGUF_FRAGMENTS_REQUIRE_NETNS"):
            pytest.fail(f"network namespaces required but unavailable: {reason}")
        pytest.skip(f"network namespaces unavailable: {reason}")
    remove_stale()
    hosts = Hosts(n, subnet)
    try:
        yield hosts
    finally:
        hosts.close()
