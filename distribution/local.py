"""The local backend: a store directory on this machine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from common.files import open_regular
from distribution.base import FragmentError, FragmentLoader, MissingFragment
from fragmenter.manifest import FRAGMENTS_DIR, MANIFEST_NAME, Manifest, read_manifest_bytes


class LocalLoader(FragmentLoader):
    """Reads fragments from ``DIR/fragments/<sha256>``."""

    def __init__(self, store_dir: str | Path):
        self.store = Path(store_dir)
        self.manifest_bytes = read_manifest_bytes(self.store)  # read once: what we parse is what we copy
        super().__init__(Manifest.from_json(self.manifest_bytes, str(self.store / MANIFEST_NAME)), str(self.store))
        self.fragment_dir = self.store / FRAGMENTS_DIR

    def fetch(self, fragment_id: str) -> bytes:
        # One byte more than the fragment's size is enough to tell it is too long: never read on
        # (a fragment replaced by a 100 GB file, or one that keeps growing).
        with self._open(fragment_id) as f:
            return f.read(self._sizes[fragment_id] + 1)

    def open_unverified(self, fragment_id: str) -> BinaryIO:
        f = self._open(fragment_id)
        size = os.fstat(f.fileno()).st_size
        if size != self._sizes[fragment_id]:
            f.close()
            raise self.wrong_length(fragment_id, size)
        return f

    def _open(self, fragment_id: str) -> BinaryIO:
        # Ids come from a validated manifest (64 hex digits), so the path stays inside the store.
        # Only regular files: a FIFO would block forever, a link to /dev/zero never ends.
        try:
            return open_regular(self.fragment_dir / fragment_id)
        except FileNotFoundError:
            raise MissingFragment(f"{self.where}: {self.describe(fragment_id)} is missing") from None
        except OSError as e:
            raise FragmentError(f"{self.where}: {self.describe(fragment_id)} cannot be read ({e.strerror})") from None
