"""The Q8_0 kernel's lane accumulators where they fall: on a cache line, or straddling a 4 KB page.

`q8_0_rows` loads and stores its 32 accumulators at every block of a row. Where they come from
np.empty (16-byte aligned), about 2 placements in 128 straddle a page and every load then waits
for the store before it; the allocator hands a thread the same chunk again and again, so such a
process stays slow. The kernels now take them from `aligned_scratch` (64-byte aligned). This runs
one row product, single-threaded, with the accumulators placed at chosen offsets of a page, and
prints each against the aligned placement.

    .venv/bin/python benchmarks/scratch_alignment.py
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

from engine.kernels_numba import q8_0_rows  # noqa: E402


@njit(fastmath=True)
def products(qs, d, x, out, acc, repeat):
    for _ in range(repeat):
        q8_0_rows(qs, d, x, out, 0, qs.shape[0], acc)


def main(rows: int = 1536, cols: int = 576, repeat: int = 20, rounds: int = 7) -> None:
    rng = np.random.default_rng(0)
    qs = rng.integers(-127, 128, (rows, cols)).astype(np.int8)
    d = rng.random((rows, cols // 32)).astype(np.float32)
    x = rng.random(cols).astype(np.float32)
    out = np.empty(rows, np.float32)
    buf = np.zeros(4 * 4096 // 4, np.float32)
    page = -(-buf.ctypes.data // 4096) * 4096  # a page boundary inside buf

    def placed(offset: int) -> np.ndarray:  # 32 floats starting ``offset`` bytes past that boundary
        start = (page + offset - buf.ctypes.data) // 4
        return buf[start:start + 32]

    def ms(acc) -> float:
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            products(qs, d, x, out, acc, repeat)
            best = min(best, time.perf_counter() - t0)
        return best * 1000 / repeat

    products(qs, d, x, out, placed(4096), 1)  # compile
    aligned = ms(placed(4096))
    print(f"{rows} x {cols} Q8_0 row products, one thread, best of {rounds} x {repeat}")
    print(f"  accumulators 64-byte aligned (aligned_scratch): {aligned:.3f} ms")
    for offset, what in ((4096 + 16, "16-byte aligned, inside a page"),
                         (4096 + 48, "16-byte aligned, inside a page"),
                         (4096 - 64, "64-byte aligned, ending at a page boundary"),
                         (4096 - 48, "16-byte aligned, straddling a page"),
                         (4096 - 112, "16-byte aligned, straddling a page")):
        t = ms(placed(offset))
        print(f"  at page offset {offset % 4096:4d} ({what}): {t:.3f} ms, {t / aligned:.2f}x the aligned")


if __name__ == "__main__":
    main()
