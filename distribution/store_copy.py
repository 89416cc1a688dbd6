"""`fetch`: copy a store (or some of its blocks) from any loader into a local store directory.

The manifest is copied byte for byte, so the copy is the same store (``serve --p2p`` re-provides
it under the same address). Every fragment reaches the copy through ``load_raw``, verified; one
the copy already holds with the right bytes is left as it is, so a fetch that was stopped goes on
where it stopped.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from distribution.spans import span_tensors
from fragmenter.fragment import prepare_store, store_lock, take_back, write_atomically
from fragmenter.manifest import FRAGMENTS_DIR, MANIFEST_NAME, Manifest, read_manifest_bytes


@dataclass
class FetchResult:
    out: Path
    name: str
    wanted: int      # fragments the blocks asked for need
    total: int       # fragments in the store
    written: int     # copied into ``out`` this run
    kept: int        # already in ``out`` with the right bytes
    downloaded: int | None = None  # of those written, fetched over the network (None: a local source)

    def summary(self) -> str:
        parts = [f"{self.written} written"]
        if self.downloaded is not None:
            parts[0] += f" ({self.downloaded} downloaded, {self.written - self.downloaded} from the cache)"
        if self.kept:
            parts.append(f"{self.kept} already there")
        name = self.name if self.name.isprintable() else repr(self.name)  # (the manifest is the server's text)
        return (f"fetched {self.wanted} of {self.total} fragments of {name} into {self.out}: "
                f"{', '.join(parts)}")


def fetch_store(loader, out: Path, spans: list[tuple[int, int]] | None = None) -> FetchResult:
    """Copy ``loader``'s store, or the fragments ``spans`` need (with the header), into ``out``.
    A directory this run created is removed again if the copy fails."""
    m = loader.manifest
    here = getattr(loader, "store", None)  # a local store directory (LocalLoader)
    if here is not None and (out.resolve() == here.resolve() or here.resolve() in out.resolve().parents):
        raise UserError(f"{out}: is inside the store being read ({here}); fetch into another directory")
    names = span_tensors(m, spans) if spans else m.tensor_names()
    loader.header()  # refuse to copy a manifest whose tensor table the header contradicts
    created, locked = not out.exists(), False
    made_dir = not (out / FRAGMENTS_DIR).exists()
    existing = None  # the fragments a directory without a manifest held before this run
    try:
        with ExitStack() as stack:
            prepare_store(out)
            stack.enter_context(store_lock(out))
            locked = True  # (a run that loses the lock must not remove what the winner is writing)
            if not (out / MANIFEST_NAME).exists():
                existing = set(os.listdir(out / FRAGMENTS_DIR))
            if (out / MANIFEST_NAME).exists() and read_manifest_bytes(out) != loader.manifest_bytes:
                raise UserError(f"{out}: already holds the store of another model; choose another -o")
            wanted = m.fragments_for(names, header=True)
            sizes = {f.id: f.size for f in m.fragments}
            todo = [f for f in wanted if not _holds(out / FRAGMENTS_DIR / f, f, sizes[f])]
            cache = getattr(getattr(loader, "fetcher", None), "cache", None)
            downloaded = None if cache is None else sum(not cache.has(f, sizes[f]) for f in todo)
            loader.prefetch(todo)
            for fid in todo:
                write_atomically(out / FRAGMENTS_DIR / fid, loader.load_raw(fid))
            write_atomically(out / MANIFEST_NAME, loader.manifest_bytes)
            Manifest.load(out)  # what we wrote reads back as a valid store
    except BaseException:
        if created and locked:  # nothing of a failed first fetch is left behind (the fragment cache keeps what came)
            shutil.rmtree(out, ignore_errors=True)
        elif locked and existing is not None and not (out / MANIFEST_NAME).exists():  # a directory the user made
            take_back(out / FRAGMENTS_DIR, existing, [out / FRAGMENTS_DIR] if made_dir else [])
        raise
    return FetchResult(out, m.source["name"], len(wanted), len(m.unique_fragments()), len(todo),
                       len(wanted) - len(todo), downloaded)


def _holds(path: Path, fid: str, size: int) -> bool:
    """Whether ``path`` is fragment ``fid``: its size, then its SHA-256."""
    try:
        if path.stat().st_size != size:
            return False
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest() == fid
    except OSError:
        return False
