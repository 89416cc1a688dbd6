"""The local backend: a store directory on this machine."""

from __future__ import annotations

from pathlib import Path

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
        # Ids come from a validated manifest (64 hex digits), so the path stays inside the store.
        path = self.fragment_dir / fragment_id
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise MissingFragment(f"{self.where}: {self.describe(fragment_id)} is missing") from None
        except OSError as e:
            raise FragmentError(f"{self.where}: {self.describe(fragment_id)} cannot be read ({e.strerror})") from None
