"""SHA-256 of a byte stream computed on the second core while this thread moves the bytes.

Fragmenting and rebuilding are bound by SHA-256, not by I/O: a page-cache copy runs at about
3 GB/s here while one core hashes (SHA-NI, through OpenSSL) at about 1.6 GB/s, and only when the
data sits in that core's L2 cache; from main memory it drops to about 1.04 GB/s. The whole-file hash
is one sequential chain, so it cannot be split across cores. What we can do is give it a core of
its own and feed it cache-sized chunks:

    with BackgroundSHA256() as whole:
        while ...:
            slot = whole.take()              # a free 1 MiB buffer (waits while all are in use)
            n = f.readinto(slot.view)        # this thread fills it ...
            out.write(slot.view[:n])         # ... and uses it
            whole.submit(slot, n)            # the other thread hashes it, then frees it
    whole.hexdigest()

The hashing thread first copies each chunk into a buffer of its own (a memcpy at memory speed),
so that SHA-256 then reads from its own L2 cache: 1.25 vs 1.02 GB/s for hashing straight from
the shared buffer (benchmarks/sha256_placement.py prints all these figures). hashlib releases the
GIL for large updates, so both threads really run at once.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from dataclasses import dataclass

CHUNK = 1 << 20   # fits the hashing core's L2 cache with room to spare
SLOTS = 8         # enough for the filling thread to run ahead while the hasher catches up


@dataclass
class Slot:
    index: int
    view: memoryview  # the whole buffer; fill a prefix and submit its length


class BackgroundSHA256:
    """A SHA-256 fed through a ring of reusable buffers and computed on a separate thread."""

    def __init__(self, chunk: int = CHUNK, slots: int = SLOTS):
        self._buffers = [memoryview(bytearray(chunk)) for _ in range(slots)]
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(slots):
            self._free.put(i)
        self._work: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._hash = hashlib.sha256()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()
        self._closed = False

    def _run(self) -> None:
        own = memoryview(bytearray(len(self._buffers[0])))
        while (item := self._work.get()) is not None:
            index, n = item
            try:
                own[:n] = self._buffers[index][:n]
            finally:
                self._free.put(index)  # even after a failure, or the filling thread would wait forever
            if self._error is None:
                try:
                    self._hash.update(own[:n])
                except BaseException as e:  # reported by hexdigest; keep draining the queue
                    self._error = e

    def take(self) -> Slot:
        """A free buffer to fill; it belongs to the caller until ``submit``."""
        index = self._free.get()
        return Slot(index, self._buffers[index])

    def submit(self, slot: Slot, n: int) -> None:
        """Hash the first ``n`` bytes of ``slot`` (in order of submission) and free the slot."""
        self._work.put((slot.index, n))

    def close(self) -> None:
        """Wait for every submitted chunk to be hashed. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._work.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        if self._error is not None:
            raise RuntimeError("background SHA-256 failed") from self._error
        return self._hash.hexdigest()

    def __enter__(self) -> BackgroundSHA256:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sha256_file(path: str | os.PathLike, stop: threading.Event | None = None, chunk: int = CHUNK) -> str | None:
    """The SHA-256 of a file, read in cache-sized chunks; None if ``stop`` is set before the end.

    Meant to run on a thread of its own beside other work on the same file: reading the file a
    second time from the page cache costs far less than handing chunks between threads.
    """
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(chunk))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            if stop is not None and stop.is_set():
                return None
            digest.update(buffer[:n])
    return digest.hexdigest()
