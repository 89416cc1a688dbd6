"""The local backend: a store directory on this machine."""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path
from typing import BinaryIO

from common.files import open_regular
from distribution.base import FragmentError, FragmentLoader, MissingFragment
from fragmenter.manifest import FRAGMENTS_DIR, MANIFEST_NAME, Manifest, read_manifest_bytes


_SLACK = 1 << 20  # a read buffer serves fragments up to this much smaller than itself


def _viewed(buf: mmap.mmap) -> bool:
    """Whether any buffer view (memoryview, numpy array) of ``buf`` exists: mmap refuses to resize
    then, and resizing to its own size changes nothing otherwise."""
    try:
        buf.resize(len(buf))
    except BufferError:
        return True
    return False


class LocalLoader(FragmentLoader):
    """Reads fragments from ``DIR/fragments/<sha256>``."""

    def __init__(self, store_dir: str | Path):
        self._buffers: list[mmap.mmap] = []  # read buffers, reused once nothing views them
        self._buffers_lock = threading.Lock()
        self.store = Path(store_dir)
        self.manifest_bytes = read_manifest_bytes(self.store)  # read once: what we parse is what we copy
        super().__init__(Manifest.from_json(self.manifest_bytes, str(self.store / MANIFEST_NAME)), str(self.store))
        self.fragment_dir = self.store / FRAGMENTS_DIR

    def fetch(self, fragment_id: str) -> memoryview:
        # One byte more than the fragment's size is enough to tell it is too long: never read on
        # (a fragment replaced by a 100 GB file, or one that keeps growing).
        want = self._sizes[fragment_id] + 1
        got = 0
        with self._open(fragment_id) as f:
            size = os.fstat(f.fileno()).st_size
            if size != want - 1:  # (before memory is taken for it: a manifest may claim 10^30 bytes)
                raise self.wrong_length(fragment_id, size)
            buf = self._buffer(want)
            while got < want and (n := f.readinto(buf[got:want])):
                got += n
        return buf[:got].toreadonly()  # as immutable as bytes: it may be cached and shared

    def _buffer(self, size: int) -> memoryview:
        """A view of ``size`` bytes of anonymous memory to read a fragment into: a buffer of an
        earlier fragment that nothing views any more (the mmap's own count of exported buffers says
        so), else a new one. Fresh memory costs a page fault per 4 KB, which here took longer than
        reading and hashing the bytes (1 s per GB); and anonymous maps go back to the system as soon
        as the last view goes, where bytes read by the read-ahead threads stayed in their malloc
        arenas after loading (40 MB of SmolLM2's 145 MB)."""
        with self._buffers_lock:  # read-ahead threads read at the same time
            for buf in self._buffers:
                if size <= len(buf) < size + _SLACK and not _viewed(buf):
                    return memoryview(buf)[:size]
            buf = mmap.mmap(-1, size)
            self._buffers.append(buf)
            return memoryview(buf)[:size]

    def prefetch(self, fragment_ids) -> None:
        self._read_ahead(fragment_ids)  # reads are cheap here: read and verify ahead on both cores

    def release(self) -> None:
        super().release()
        with self._buffers_lock:
            self._buffers.clear()  # unmapped once nothing views them (a tensor may keep a whole fragment)

    def open_unverified(self, fragment_id: str) -> BinaryIO:
        f = self._open(fragment_id)
        size = os.fstat(f.fileno()).st_size
        if size != self._sizes[fragment_id]:
            f.close()
            raise self.wrong_length(fragment_id, size)
        return f

    def _partial(self, missing: str) -> str:
        """For a missing fragment's error: whether the store looks like a copy of some blocks (as
        `fetch --layers` makes: one run of whole blocks, the others entirely absent, the missing
        fragment one of theirs), not a damaged store."""
        from distribution.spans import block_ranges, fragment_regions

        held = present_fragments(self.store, self.manifest)
        blocks = {int(r[4:]): set(ids) for r, ids in fragment_regions(self.manifest).items() if r.startswith("blk.")}
        whole = sorted(b for b, ids in blocks.items() if ids <= held)
        absent = [b for b in blocks if b not in whole]
        if (not whole or not absent or whole != list(range(whole[0], whole[-1] + 1))
                or any(blocks[b] & held for b in absent) or not any(missing in blocks[b] for b in absent)):
            return ""
        return f"; this store holds blocks {block_ranges(whole)} only (a copy of some blocks, as fetch --layers makes)"

    def _open(self, fragment_id: str) -> BinaryIO:
        # Ids come from a validated manifest (64 hex digits), so the path stays inside the store.
        # Only regular files: a FIFO would block forever, a link to /dev/zero never ends.
        try:
            return open_regular(self.fragment_dir / fragment_id)
        except FileNotFoundError:
            raise MissingFragment(f"{self.where}: {self.describe(fragment_id)} is missing{self._partial(fragment_id)}") from None
        except OSError as e:
            raise FragmentError(f"{self.where}: {self.describe(fragment_id)} cannot be read ({e.strerror})") from None


def present_fragments(store: Path, manifest) -> set[str]:
    """The fragments of ``store`` on disk at their manifest size (one cut short is not there).
    Their bytes are checked when they are read."""
    held = set()
    for f in manifest.fragments:
        try:
            if (store / FRAGMENTS_DIR / f.id).stat().st_size == f.size:
                held.add(f.id)
        except OSError:
            pass
    return held
