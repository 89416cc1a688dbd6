"""Fixtures shared by the whole suite: factory models, the default model, running the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models.factory import standard_specs, write_model  # noqa: E402

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def factory_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("factory")


@pytest.fixture(scope="session")
def factory_models(factory_dir) -> dict[str, Path]:
    """Every standard factory model, written once per test session."""
    return {name: write_model(spec, factory_dir / f"{name}.gguf") for name, spec in standard_specs().items()}


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from models.default import DEFAULT_GGUF

    if not DEFAULT_GGUF.exists():
        pytest.fail(f"{DEFAULT_GGUF} is missing: run scripts/setup.sh first (README command 2 does)")
    return DEFAULT_GGUF


@pytest.fixture(scope="session")
def default_store() -> Path:
    from models.default import DEFAULT_STORE

    if not (DEFAULT_STORE / "manifest.json").exists():
        pytest.fail(f"{DEFAULT_STORE} is missing: run scripts/setup.sh first (README command 2 does)")
    return DEFAULT_STORE


def run_cli(command: str, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the installed console scripts; capture its output."""
    import os

    return subprocess.run([str(BIN / command), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A user error: non-zero exit, exactly one line on stderr, no traceback, naming what is wrong."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def job_loop():
    """A JobLoop (common/jobloop.py) served by a thread of its own, stopped afterwards."""
    import threading

    from common.jobloop import JobLoop

    jobs = JobLoop()
    thread = threading.Thread(target=jobs.run, daemon=True)
    thread.start()
    yield jobs
    jobs.stop()
    thread.join(10)
    assert not thread.is_alive()
