"""A `serve` subprocess for benchmarks: started, waited for (bounded), stopped with SIGINT.

Benchmarks must not import tests/, so this is their own small copy of what the network tests use.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent


class ServeProcess:
    """`serve ARGS...`; waits (bounded) until a stderr line contains ``wait_for``."""

    def __init__(self, *args, wait_for: str, timeout: float = 60):
        self.proc = subprocess.Popen([str(BIN / "serve"), *map(str, args)], stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not any(wait_for in line for line in self.lines):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise TimeoutError(f"serve did not print {wait_for!r}: {self.lines}")
            time.sleep(0.05)

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.strip())

    def line(self, prefix: str) -> str:
        return next(line for line in self.lines if line.startswith(prefix))

    @property
    def url(self) -> str:
        line = next(line for line in self.lines if " on http://" in line or " over http://" in line)
        return "http://" + line.split("http://", 1)[1].split()[0]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@contextmanager
def serving(*args, wait_for: str = "serving", timeout: float = 60):
    p = ServeProcess(*args, wait_for=wait_for, timeout=timeout)
    try:
        yield p
    finally:
        p.stop()
