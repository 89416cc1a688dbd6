"""Cut a GGUF file into content-addressed fragments and write the store's manifest.

Cutting rule (deterministic, from the header alone):
  * the file is split into regions: the header (magic, metadata, tensor infos, padding), then runs
    of consecutive tensors that belong to the same group (one transformer block ``blk.N``, or the
    global tensors such as ``token_embd`` and ``output``);
  * each region is cut into fragments of at most ``fragment_size`` bytes.
So small tensors of one block are packed together, a large tensor spans several fragments, and no
fragment mixes two blocks: a node that serves blocks 10-19 needs exactly the fragments of those
blocks. Concatenating the fragments in manifest order gives back the file byte for byte.

Every byte needs two SHA-256 passes, one for its fragment's id and one for the whole file's hash,
and SHA-256 is what bounds the speed (one core hashes at about half the speed of `cp`). So the work
runs on two threads: one hashes the whole file from the start, while the header is parsed; then
both take fragments, each read, hashed and written in 1 MiB chunks. Memory stays at a few MiB
whatever the model's size.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError, naming
from common.files import remove_leftovers
from common.hashing import CHUNK, sha256_file
from common.progress import byte_progress
from fragmenter.gguf_header import GGUFHeader, read_file_header
from fragmenter.manifest import (FRAGMENTS_DIR, MANIFEST_NAME, Fragment, Manifest, gguf_summary, layer_of,
                                 model_summary, pieces_of, tensor_entries)

DEFAULT_FRAGMENT_SIZE = 10_000_000  # "10 MB", as the seed's store used
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'10MB' -> 10_000_000, '4MiB' -> 4_194_304, '65536' -> 65536."""
    s = text.strip().lower().replace(" ", "")
    digits = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(digits):]
    try:
        value = float(digits)
    except ValueError:
        raise UserError(f"fragment size {text!r}: expected a number with an optional unit (KB, MB, MiB, ...)")
    if unit not in _UNITS:
        raise UserError(f"fragment size {text!r}: unknown unit {unit!r} (use B, KB, MB, GB, KiB, MiB, GiB)")
    if not math.isfinite(value * _UNITS[unit]):  # ("1e400", "nan", "inf")
        raise UserError(f"fragment size {text!r}: not a finite number of bytes")
    return int(value * _UNITS[unit])


def plan_fragments(header: GGUFHeader, file_size: int, fragment_size: int) -> list[tuple[int, int]]:
    """(start, end) byte ranges of the fragments, in file order."""
    region_starts = [0]
    if header.data_offset < file_size:
        region_starts.append(header.data_offset)
    previous_group = object()
    for t in sorted(header.tensors, key=lambda t: t.offset):
        group = layer_of(t.name)
        start = header.data_offset + t.offset
        if group != previous_group and start > region_starts[-1]:
            region_starts.append(start)
        previous_group = group
    region_ends = region_starts[1:] + [file_size]
    cuts = []
    for start, end in zip(region_starts, region_ends):
        for s in range(start, end, fragment_size):
            cuts.append((s, min(s + fragment_size, end)))
    return cuts


def build_manifest(header: GGUFHeader, source: dict, fragment_size: int, fragments: list[Fragment]) -> Manifest:
    return Manifest(source=source, fragment_size=fragment_size, gguf=gguf_summary(header),
                    model=model_summary(header),
                    header_pieces=pieces_of(0, min(header.data_offset, source["size"]), fragments),
                    tensors=tensor_entries(header, fragments), fragments=fragments)


TEMP_PREFIX = ".tmp-"  # temporary files in a store: .tmp-<pid>-<name>, see common.files.remove_leftovers


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary name beside ``path`` and rename, so readers never see half a file."""
    tmp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        with naming(path), open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def store_lock(store: Path):
    """Hold an exclusive lock on the store directory while writing it.

    Two runs writing one directory at once (two models, or a fragment and a fetch) would each
    check it, each write, and the last manifest would win over fragments the other run deleted.
    flock on the directory itself leaves no lock file behind and is released if the process dies.
    """
    fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{store}: another run is writing this store right now; wait for it to finish") from None
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def prepare_store(store: Path) -> Path:
    """Create ``store/fragments`` and clear the temporary files of killed runs; returns that directory."""
    if store.exists() and not store.is_dir():
        raise UserError(f"{store}: exists and is not a directory")
    frag_dir = store / FRAGMENTS_DIR
    with naming(frag_dir, "create"):
        frag_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(frag_dir, TEMP_PREFIX)
    remove_leftovers(store, TEMP_PREFIX)
    return frag_dir


def _copy_fragment(fd: int, start: int, length: int, frag_dir: Path, source: str) -> str:
    """Copy bytes [start, start+length) of the open file ``fd`` into the store as one fragment.

    The bytes go to a temporary file in cache-sized chunks, hashed on the way, and the file is
    renamed to its id once complete. Safe to run on several threads at once. Returns the id.
    """
    tmp = frag_dir / f"{TEMP_PREFIX}{os.getpid()}-{start}"
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(min(CHUNK, length)))
    try:
        with naming(frag_dir.parent), open(tmp, "wb", buffering=0) as out:  # (the store, not the temp name)
            done = 0
            while done < length:
                view = buffer[: min(len(buffer), length - done)]
                if os.preadv(fd, [view], start + done) != len(view):
                    raise UserError(f"{source}: file changed size while being read")
                digest.update(view)
                out.write(view)
                done += len(view)
        fid = digest.hexdigest()
        os.replace(tmp, frag_dir / fid)  # same id, same bytes: replacing an old copy also repairs it
        return fid
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass
class FragmentResult:
    manifest: Manifest
    store: Path
    written: int  # fragments the store did not hold before (every fragment is rewritten: a damaged one is repaired)
    seconds: float

    def summary(self) -> str:
        m = self.manifest
        size = m.source["size"]
        unique = len(m.unique_fragments())
        rate = size / self.seconds / 1e6 if self.seconds > 0 else float("inf")
        return (f"fragmented {m.source['name']}: {len(m.fragments)} fragments ({unique} unique, {self.written} "
                f"new, {unique - self.written} rewritten), {size / 1e6:.1f} MB in {self.seconds:.2f} s ({rate:.0f} MB/s) -> {self.store}")


def _check_existing_store(store: Path, size: int, source_sha256) -> Manifest | None:
    """Refuse to mix two models in one directory; return the old manifest if it is this model's."""
    if not (store / MANIFEST_NAME).exists():
        return None
    try:
        old = Manifest.load(store)
    except UserError as e:
        raise UserError(f"{store}: holds a manifest this tool cannot read ({e}); remove it or choose another -o")
    same = old.source["size"] == size and old.source["sha256"] == source_sha256()
    if not same:
        raise UserError(f"{store}: already holds the store of another model ({old.source['name']}, sha256 "
                        f"{old.source['sha256'][:16]}...); choose another -o or remove it")
    return old


def fragment_file(model_path: str, store_dir: str | Path | None = None,
                  fragment_size: int = DEFAULT_FRAGMENT_SIZE, progress: bool | None = None) -> FragmentResult:
    """Fragment ``model_path`` into ``store_dir`` (default: the model's path without ``.gguf``)."""
    started = time.perf_counter()
    if fragment_size < 1:
        raise UserError(f"fragment size must be positive, got {fragment_size}")
    if not os.path.isfile(model_path):
        raise UserError(f"{model_path}: " + ("not a regular file" if os.path.exists(model_path) else "no such file"))
    stat_before = os.stat(model_path)
    if store_dir is None and Path(model_path).suffix.lower() != ".gguf":
        raise UserError(f"{model_path}: no -o given, and the name has no .gguf to drop for the store's; "
                        f"pass -o DIRECTORY")
    store = Path(store_dir) if store_dir is not None else Path(model_path).with_suffix("")
    created = [d for d in (store / FRAGMENTS_DIR, store) if not os.path.lexists(d)]  # (innermost first)
    partial: dict = {}  # while a new store's fragments are written, what to take back if the run fails
    try:
        return _fragment(model_path, store, fragment_size, progress, started, stat_before, partial)
    except BaseException:  # Ctrl-C included: a new store is left as it was found, not half written
        if partial:
            take_back(partial["frag_dir"], partial["existing"], created)
        raise


def take_back(frag_dir: Path, existing: set[str], created: list[Path]) -> None:
    """Remove the fragments a failed run wrote into a store that had no manifest, and the
    directories it created. (A store that had one keeps its fragments: each was rewritten with the
    same bytes, and its manifest still describes them.)"""
    try:
        for name in set(os.listdir(frag_dir)) - existing:
            (frag_dir / name).unlink(missing_ok=True)
    except OSError:
        pass
    for d in created:
        try:
            d.rmdir()
        except OSError:
            pass


def _fragment(model_path, store: Path, fragment_size: int, progress, started: float, stat_before,
              partial: dict) -> FragmentResult:
    stop, jobs = threading.Event(), []
    with ThreadPoolExecutor(2, thread_name_prefix="fragment") as pool, ExitStack() as locked:
        # The whole-file hash is one sequential chain: start it first, on a core of its own.
        whole = pool.submit(sha256_file, model_path, stop)
        try:
            header, size = read_file_header(model_path, decode_strings=False)
            frag_dir = prepare_store(store)
            locked.enter_context(store_lock(store))  # held until the manifest is written
            old = _check_existing_store(store, size, whole.result)
            existing = set(os.listdir(frag_dir))
            if old is None:
                partial.update(frag_dir=frag_dir, existing=existing)
            cuts = plan_fragments(header, size, fragment_size)
            with open(model_path, "rb", buffering=0) as f, \
                    byte_progress(size, f"fragment {Path(model_path).name}", progress) as bar:
                jobs = [pool.submit(_copy_fragment, f.fileno(), start, end - start, frag_dir, model_path)
                        for start, end in cuts]
                fragments = []
                for (start, end), job in zip(cuts, jobs):
                    fragments.append(Fragment(job.result(), end - start, start))
                    bar.update(end - start)
            source_hash = whole.result()
        except BaseException:
            stop.set()
            for job in jobs:
                job.cancel()
            raise
        stat_after = os.stat(model_path)
        if (stat_after.st_size, stat_after.st_mtime_ns) != (stat_before.st_size, stat_before.st_mtime_ns):
            raise UserError(f"{model_path}: file changed while being read; nothing recorded")
        written = len({f.id for f in fragments} - existing)

        source = {"name": Path(model_path).name, "size": size, "sha256": source_hash}
        manifest = build_manifest(header, source, fragment_size, fragments)
        manifest.path = str(store / MANIFEST_NAME)
        write_atomically(store / MANIFEST_NAME, manifest.to_json().encode())
        partial.clear()  # (the store is whole: nothing to take back any more)
        if old is not None:  # re-cut with another fragment size: drop what only the old cut used
            for fid in set(old.unique_fragments()) - set(manifest.unique_fragments()):
                (frag_dir / fid).unlink(missing_ok=True)
    return FragmentResult(manifest, store, written, time.perf_counter() - started)
