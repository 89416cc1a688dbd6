"""llama.cpp, through llama-cpp-python, as the reference engine, tokenizer oracle and bridge.

Settings are fixed so runs are comparable: CPU only, no flash attention, F16 KV cache (llama.cpp's
default), fixed batch size and thread count.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from common.errors import UserError


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp logs to fd 2 from C; silence it while loading unless asked to be verbose."""
    if os.environ.get("GGUF_FRAGMENTS_VERBOSE"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def load_llama(path: str | Path, n_ctx: int = 2048, threads: int = 2, batch: int = 512, logits_all: bool = False,
               vocab_only: bool = False):
    from llama_cpp import Llama

    try:
        with quiet_stderr():
            return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=batch,
                         n_ubatch=batch, logits_all=logits_all, vocab_only=vocab_only, flash_attn=False,
                         verbose=False, seed=0)
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file" (llama.cpp said why on stderr)
        raise UserError(f"{path}: llama.cpp cannot load it ({e}); `infer {path}` without --backend "
                        f"llama.cpp names what is wrong") from None


def teacher_forced_logits(llm, tokens: list[int]) -> np.ndarray:
    """Logits at every position of ``tokens`` in one pass: (T, vocab) float32."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def greedy(llm, prompt: list[int], n: int, stop_ids: frozenset[int] = frozenset()) -> list[int]:
    """Greedy continuation decided by argmax of llama.cpp's own logits."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in stop_ids:
            break
        out.append(token)
        llm.eval([token])
    return out


@contextlib.contextmanager
def materialized(loader):
    """A GGUF file for the loader's model: the file itself, or the store rebuilt (verified) into a
    temporary file that is removed afterwards."""
    from distribution.gguf_file import GGUFFileLoader
    from recombiner.recombine import recombine

    if isinstance(loader, GGUFFileLoader):
        yield loader.path
        return
    with tempfile.TemporaryDirectory(prefix="gguf-fragments-") as tmp:
        out = Path(tmp) / "model.gguf"  # (not the manifest's source.name: a name is no path to trust)
        recombine(loader, out, progress=False)
        yield out
