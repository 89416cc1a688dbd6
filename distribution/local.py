"""The local backend: a store directory on this machine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from distribution.base import FragmentError, FragmentLoader, MissingFragment
from fragmenter.manifest import FRAGMENTS_DIR, Manifest


class LocalLoader(FragmentLoader):
    """Reads fragments from ``DIR/fragments/<sha256>``."""

    def __init__(self, store_dir: str | Path):
        self.store = Path(store_dir)
        super().__init__(Manifest.load(self.store), str(self.store))
        self.manifest_bytes = (self.store / "manifest.json").read_bytes()
        self.fragment_dir = self.store / FRAGMENTS_DIR

    def fetch(self, fragment_id: str) -> bytes:
        with self._open(fragment_id) as f:
            return f.read()

    def open_unverified(self, fragment_id: str) -> BinaryIO:
        f = self._open(fragment_id)
        size = os.fstat(f.fileno()).st_size
        if size != self._sizes[fragment_id]:
            f.close()
            raise self.wrong_length(fragment_id, size)
        return f

    def _open(self, fragment_id: str) -> BinaryIO:
        # Ids come from a validated manifest (64 hex digits), so the path stays inside the store.
        try:
            return open(self.fragment_dir / fragment_id, "rb", buffering=0)
        except FileNotFoundError:
            raise MissingFragment(f"{self.where}: {self.describe(fragment_id)} is missing") from None
        except OSError as e:
            raise FragmentError(f"{self.where}: {self.describe(fragment_id)} cannot be read ({e.strerror})") from None
