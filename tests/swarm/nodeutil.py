"""`node` subprocesses on 127.0.0.1 for tests: started, read, killed, all with bounded waits."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

from tests.conftest import BIN


class NodeProcess:
    def __init__(self, source, layers: str, *args, timeout: float = 120):
        self.proc = subprocess.Popen([str(BIN / "node"), str(source), "--layers", layers, *map(str, args)],
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not any(line.startswith("p2p://") for line in self.lines):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.kill()
                raise TimeoutError(f"node {layers} did not start: {self.lines}")
            time.sleep(0.05)

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.strip())

    @property
    def url(self) -> str:
        line = next(line for line in self.lines if line.startswith("node: "))
        return line.split(" on ", 1)[1].split()[0]

    @property
    def address(self) -> str:
        return next(line for line in self.lines if line.startswith("p2p://"))

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
