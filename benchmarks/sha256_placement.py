"""Where SHA-256 gets its bytes from decides its speed: the figures behind common/hashing.py.

    .venv/bin/python benchmarks/sha256_placement.py [--mib 256] [--repeat 3]

Prints MB/s of hashlib's SHA-256 over the same number of bytes:
  * from a 1 MiB buffer that stays in the core's L2 cache (the bound the store benchmark prints);
  * from a buffer far larger than the caches (main memory);
  * handed over by a second thread, hashed in place in the shared buffer;
  * handed over by a second thread and first copied into the hashing thread's own buffer
    (what BackgroundSHA256 does).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.hashing import CHUNK, BackgroundSHA256  # noqa: E402


def in_cache(total: int) -> None:
    digest, block = hashlib.sha256(), bytes(CHUNK)
    for _ in range(total // CHUNK):
        digest.update(block)


def from_memory(big: memoryview) -> None:
    digest = hashlib.sha256()
    for start in range(0, len(big), CHUNK):
        digest.update(big[start:start + CHUNK])


class _HashInPlace(BackgroundSHA256):
    """The first version of the hashing thread: SHA-256 straight from the shared slot."""

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            index, n = item
            self._hash.update(self._buffers[index][:n])
            self._free.put(index)


def handed_over(big: memoryview, ring: type[BackgroundSHA256]) -> None:
    """The filling thread copies chunks of ``big`` into the ring; the other thread hashes them."""
    with ring() as whole:
        for start in range(0, len(big), CHUNK):
            slot = whole.take()
            n = min(CHUNK, len(big) - start)
            slot.view[:n] = big[start:start + n]
            whole.submit(slot, n)
        whole.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="bytes to hash, in MiB (default 256)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    total = args.mib * CHUNK
    big = memoryview(bytearray(os.urandom(total)))
    cases = {
        "L2-resident buffer": lambda: in_cache(total),
        "main memory": lambda: from_memory(big),
        "second thread, in place": lambda: handed_over(big, _HashInPlace),
        "second thread, own copy": lambda: handed_over(big, BackgroundSHA256),
    }
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(args.repeat):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"SHA-256 of {args.mib} MiB, best of {args.repeat}")
    for name, seconds in best.items():
        print(f"{name:26s} {total / seconds / 1e6:7.0f} MB/s")


if __name__ == "__main__":
    main()
