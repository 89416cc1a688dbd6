"""The test models of the common quantization types, made on demand by llama.cpp's own quantizer.

People download Q4_K_M, Q5_K_M, Q6_K, Q4_0, Q8_0 and F16 files. Each of these is made here from
SmolLM2-135M-Instruct (the wheel's file, as for the default model: models/default.py) or from
another GGUF (say the TinyLlama-shaped factory model) with ``llama_model_quantize`` through
llama-cpp-python, the same code that makes the files people use, into models/ (git-ignored).
Existing files are kept: quantizing SmolLM2 takes a few seconds, the 1.1B model about a minute.

    python -m models.requant smollm2 Q4_K_M          # models/smollm2-135m-instruct-q4_k_m.gguf
    python -m models.requant FILE.gguf Q4_0 [OUT]    # FILE-q4_0.gguf beside FILE unless OUT
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from models.default import MODELS_DIR, log, obtain_source

# llama_ftype values (llama.h): the "mostly" type of each file kind.
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_S": 14,
          "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "BF16": 32}


def requantize(source: Path, target: Path, kind: str, threads: int = 2) -> Path:
    """``target`` as llama.cpp quantizes ``source`` to ``kind`` (a key of FTYPES); kept if it exists."""
    if target.exists():
        return target
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.allow_requantize = True
    params.nthread = threads
    tmp = target.with_name(target.name + f".partial-{os.getpid()}")
    log(f"quantizing {source.name} to {kind} with llama.cpp")
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({source}, {kind}) failed with code {rc}")
    os.replace(tmp, target)
    return target


def smollm2(kind: str) -> Path:
    """SmolLM2-135M-Instruct as a ``kind`` file in models/ (made from the wheel's file if missing)."""
    return requantize(obtain_source(), MODELS_DIR / f"smollm2-135m-instruct-{kind.lower()}.gguf", kind)


@click.command()
@click.argument("source")
@click.argument("kind", type=click.Choice(sorted(FTYPES)))
@click.argument("output", required=False)
def main(source: str, kind: str, output: str | None) -> None:
    """Quantize SOURCE ('smollm2' or a GGUF file) to KIND with llama.cpp."""
    if source == "smollm2" and output is None:
        path = smollm2(kind)
    else:
        src = obtain_source() if source == "smollm2" else Path(source)
        path = requantize(src, Path(output) if output else src.with_name(f"{src.stem}-{kind.lower()}.gguf"), kind)
    click.echo(path)


if __name__ == "__main__":
    main()
