"""Timestamps of the stages of relayed decode steps, for ``benchmarks/pipeline.py --trace``.

Off (``mark`` does nothing) unless the environment variable GGUF_FRAGMENTS_TRACE names a path
prefix when this module is first imported: each process then appends one line per stage to
PREFIX.PID, ``<ns> <step> <stage>``, with ``time.perf_counter_ns`` (CLOCK_MONOTONIC on Linux,
so the processes of one machine share the clock and their lines can be put in one order).

The stages: ``arrive`` (a node's WebSocket reader is handed bytes; step -1, as the frame is not
read yet), ``read`` (the frame is decoded and checked), ``compute`` and ``computed`` (around the
node's blocks), ``framed`` (the output is framed, about to be written to the next node or the
client: a mark after the write would come late whenever the woken next node takes the cores
first); on the client, ``send`` (before the RELAY is written) and ``answer`` (the RELAYED answer
is taken).
"""

from __future__ import annotations

import os
import sys
import time

PREFIX = os.environ.get("GGUF_FRAGMENTS_TRACE")
_out = None


def _write(stage: str, step: int, ns: int | None = None) -> None:
    """Append ``stage`` of ``step``, at ``ns`` (perf_counter_ns) if given (a stage passed before its
    step was known), else now."""
    global _out, mark
    if _out is None:
        path = f"{PREFIX}.{os.getpid()}"
        try:
            _out = open(path, "a", buffering=1)
        except OSError as e:  # say so once, and go on without a trace
            sys.stderr.write(f"warning: GGUF_FRAGMENTS_TRACE: cannot write {path} ({e.strerror}); not tracing\n")
            mark = _nothing
            return
    _out.write(f"{time.perf_counter_ns() if ns is None else ns} {step} {stage}\n")


def _nothing(stage: str, step: int, ns: int | None = None) -> None:
    pass


mark = _write if PREFIX else _nothing
