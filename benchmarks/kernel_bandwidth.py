"""How fast the Q8_0 decode kernel streams weights from memory, against a plain read of the same bytes.

    .venv/bin/python benchmarks/kernel_bandwidth.py

22 stacked TinyLlama-shaped gate/up matrices (11264 x 2048 int8 + scales, 557 MB: far larger than
any cache) are multiplied by one activation vector, in one call (as the fused decode step does)
and one call per matrix; a parallel sum over the same int8 bytes gives the read-only reference.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.common import apply_thread_env  # noqa: E402

apply_thread_env()  # the commands' thread waits, before numba starts its threads

import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

from engine.kernels_numba import _CHUNKS, q8_0_matvec, q8_0_rows  # noqa: E402


@njit(parallel=True, fastmath=True)
def stacked(qs3, d3, x, out):
    for layer in range(qs3.shape[0]):
        qs, d = qs3[layer], d3[layer]
        rows = qs.shape[0]
        step = (rows + _CHUNKS - 1) // _CHUNKS
        for c in prange(_CHUNKS):
            acc = np.empty(32, np.float32)
            q8_0_rows(qs, d, x, out, c * step, min(rows, (c + 1) * step), acc)


@njit(parallel=True)
def read_all(a):
    s = 0
    for i in prange(a.shape[0]):
        s += a[i]
    return s


def best_gbs(fn, nbytes, repeat=3):
    fn()
    return max(nbytes / min_time for min_time in [_time(fn) for _ in range(repeat)]) / 1e9


def _time(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    rng = np.random.default_rng(0)
    L, R, C = 22, 11264, 2048
    qs3 = rng.integers(-127, 128, (L, R, C), dtype=np.int8)
    d3 = rng.random((L, R, C // 32), dtype=np.float32)
    x = rng.standard_normal(C).astype(np.float32)
    out = np.empty(R, np.float32)
    nbytes = qs3.nbytes + d3.nbytes
    one_call = best_gbs(lambda: stacked(qs3, d3, x, out), nbytes)
    per_matrix = best_gbs(lambda: [q8_0_matvec(qs3[i], d3[i], x, out) for i in range(L)], nbytes)
    flat = qs3.reshape(-1)
    reading = best_gbs(lambda: read_all(flat), flat.nbytes)
    print(f"{nbytes / 1e6:.0f} MB of Q8_0 weights, 2 threads")
    print(f"decode kernel, one call over all matrices: {one_call:5.1f} GB/s")
    print(f"decode kernel, one call per matrix:        {per_matrix:5.1f} GB/s")
    print(f"parallel int8 sum of the same bytes:       {reading:5.1f} GB/s")


if __name__ == "__main__":
    main()
