"""A local content-addressed fragment cache shared by every network loader and every model.

Fragments are files named by their SHA-256 under one directory (default
``~/.cache/gguf-fragments/fragments``, or ``$GGUF_FRAGMENTS_CACHE``), so a fragment is fetched
once, whichever model or peer it came for. Every read is verified; a damaged entry is dropped.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from common.errors import naming
from common.files import read_regular, remove_leftovers

TEMP_PREFIX = ".partial-"  # downloads in progress: .partial-<pid>-<sha256>


def default_cache_dir() -> Path:
    env = os.environ.get("GGUF_FRAGMENTS_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gguf-fragments" / "fragments"


class FragmentCache:
    def __init__(self, directory: str | Path | None = None):
        self.dir = Path(directory) if directory is not None else default_cache_dir()
        with naming(self.dir, "create"):
            self.dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(self.dir, TEMP_PREFIX)  # downloads of killed runs

    def path(self, fid: str) -> Path:
        return self.dir / fid

    def has(self, fid: str, size: int) -> bool:
        p = self.path(fid)
        try:
            return p.is_file() and p.stat().st_size == size
        except OSError:
            return False

    def get(self, fid: str, size: int) -> bytes | None:
        """The fragment's bytes if cached and intact, else None (a damaged copy is removed)."""
        p = self.path(fid)
        try:
            data = read_regular(p, size)  # never more than one byte past the expected size
        except FileNotFoundError:
            return None
        except OSError:  # not a regular file, unreadable: treat as damaged
            data = b""
        if len(data) == size and hashlib.sha256(data).hexdigest() == fid:
            return data
        _remove(p)
        return None

    def temp_path(self, fid: str) -> Path:
        return self.dir / f"{TEMP_PREFIX}{os.getpid()}-{fid}"

    def commit(self, fid: str, temp: Path) -> None:
        """Move a downloaded, already verified temporary file into place."""
        os.replace(temp, self.path(fid))


def _remove(path: Path) -> None:
    """A damaged cache entry, whatever it is: a directory planted under a fragment's name made
    every fetch of it fail ("Is a directory") instead of being dropped and fetched again."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
