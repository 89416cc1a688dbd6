"""The loader interface every backend implements, and everything that is the same for all of them.

A backend only knows how to ``fetch`` the bytes of a fragment by id. This base class checks every
fragment against its SHA-256 before anyone sees it, assembles tensors from their pieces and
dequantizes them, so the engine can take weights from a directory, a web server or a swarm of peers
without knowing which.
"""

from __future__ import annotations

import hashlib
import io
import mmap
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, Iterable

import numpy as np
from gguf import quants
from gguf.constants import GGMLQuantizationType

from common.errors import StoreError
from fragmenter.gguf_header import GGUFFormatError, GGUFHeader, parse_header
from fragmenter.manifest import Manifest, TensorEntry

# Non-quantized element types gguf.quants does not cover: read them as plain numpy values.
_PLAIN_TYPES = {"F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64}


MADV_POPULATE_WRITE = 23  # Linux 5.14+ (Python 3.11's mmap module lacks the name)


def _new_buffer(size: int) -> np.ndarray:
    """``size`` bytes of memory of its own, about to be written whole: an anonymous mapping whose
    pages the kernel provides in one call. np.empty's memory is faulted in 4 KB (or, as numpy asks,
    a compacted huge page) at a time as it is written, 2-8x slower here. madvise runs without the
    GIL (MAP_POPULATE in mmap() holds it), so the read-ahead threads go on meanwhile."""
    region = mmap.mmap(-1, max(size, 1))
    try:
        region.madvise(MADV_POPULATE_WRITE)
    except OSError:
        pass  # an older kernel: the pages fault in as they are written
    return np.frombuffer(region, np.uint8, count=size)


class FragmentError(StoreError):
    """A fragment cannot be had intact."""


class MissingFragment(FragmentError):
    """No copy of the fragment could be found."""


class CorruptFragment(FragmentError):
    """The bytes found are not the fragment: wrong length or wrong SHA-256."""


class FragmentLoader(ABC):
    """Reads a store's fragments, verified, and turns them into tensors."""

    #: How many bytes of verified fragments to keep, so tensors sharing a fragment read it once.
    #: Only while loading: ``release`` empties it once a model is built.
    cache_bytes = 64 * 1024 * 1024
    #: Read-ahead (backends that call ``_read_ahead``): at most this many bytes of fragments read
    #: and verified ahead of their use, on ``read_threads`` threads (file reads and hashlib's
    #: SHA-256 release the GIL, so both cores hash while the engine converts what came before).
    read_ahead_bytes = 64 * 1024 * 1024
    read_threads = 2
    #: True when ``fetch`` itself only returns bytes it has just checked against the id.
    fetch_verifies = False

    def __init__(self, manifest: Manifest, where: str):
        self.manifest = manifest
        self.where = where  # names the store in messages: a directory, URL or p2p address
        self._sizes = manifest.unique_fragments()
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached_bytes = 0
        self._header: GGUFHeader | None = None
        self._queue: deque[str] = deque()           # fragments asked for, not yet being read
        self._queued: set[str] = set()
        self._pending: dict[str, Future] = {}       # being read and verified (or done, not yet used)
        self._pool: ThreadPoolExecutor | None = None

    # -- what a backend provides ------------------------------------------------------------------
    @abstractmethod
    def fetch(self, fragment_id: str) -> bytes:
        """The fragment's bytes as the backend has them, not yet verified.

        Raises MissingFragment if the backend does not have it.
        """

    def prefetch(self, fragment_ids: Iterable[str]) -> None:
        """Get ready to serve these fragments soon (network backends fetch them in parallel)."""

    def describe(self, fragment_id: str) -> str:
        holders = self.manifest.holders(fragment_id)
        shown = ", ".join(holders[:4]) + (f" and {len(holders) - 4} more" if len(holders) > 4 else "")
        return f"fragment {fragment_id[:16]} (holds {shown or 'no tensor'})"

    # -- verified raw bytes -----------------------------------------------------------------------
    def check(self, fragment_id: str, data: bytes) -> None:
        """Raise FragmentError unless ``data`` is exactly the fragment ``fragment_id``."""
        if len(data) != self._sizes[fragment_id]:
            raise self.wrong_length(fragment_id, len(data))
        if hashlib.sha256(data).hexdigest() != fragment_id:
            raise self.corrupt(fragment_id)

    def corrupt(self, fragment_id: str) -> CorruptFragment:
        return CorruptFragment(f"{self.where}: {self.describe(fragment_id)} is corrupt (SHA-256 mismatch)")

    def wrong_length(self, fragment_id: str, length: int) -> CorruptFragment:
        return CorruptFragment(f"{self.where}: {self.describe(fragment_id)} is truncated or padded "
                               f"({length} bytes, expected {self._sizes[fragment_id]})")

    def load_raw(self, fragment_id: str) -> bytes:
        """The bytes of one fragment, checked against its SHA-256."""
        if fragment_id not in self._sizes:
            raise FragmentError(f"{self.where}: fragment {fragment_id!r} is not part of this store")
        data = self._cache.get(fragment_id)
        if data is not None:
            self._cache.move_to_end(fragment_id)
            return data
        job = self._pending.pop(fragment_id, None)
        data = job.result() if job is not None else self._fetch_verified(fragment_id)
        self._remember(fragment_id, data)
        self._fill()
        return data

    def _fetch_verified(self, fragment_id: str) -> bytes:
        data = self.fetch(fragment_id)
        if not self.fetch_verifies:
            self.check(fragment_id, data)
        return data

    # -- read-ahead -------------------------------------------------------------------------------
    def _read_ahead(self, fragment_ids: Iterable[str]) -> None:
        """Read and verify these fragments in the background, in this order, a bounded amount ahead
        of their use. Each still reaches a caller only through ``load_raw``, after its SHA-256 check
        (done by the worker); a failed fetch or check is raised there, naming the fragment, when the
        fragment is used, as without read-ahead. Call only from the thread that calls ``load_raw``."""
        for fid in fragment_ids:
            if fid in self._sizes and fid not in self._queued and fid not in self._pending and fid not in self._cache:
                self._queue.append(fid)
                self._queued.add(fid)
        self._fill()

    def _fill(self) -> None:
        """Start reading queued fragments while fewer than ``read_threads`` are under way or they fit
        in ``read_ahead_bytes`` (so at most that much, or ``read_threads`` fragments, waits unused)."""
        ahead = sum(self._sizes[f] for f in self._pending)
        while self._queue:
            fid = self._queue[0]
            if fid in self._cache or fid in self._pending:
                self._queued.discard(self._queue.popleft())
                continue
            if len(self._pending) >= self.read_threads and ahead + self._sizes[fid] > self.read_ahead_bytes:
                return
            self._queued.discard(self._queue.popleft())
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="fragment-read")
            self._pending[fid] = self._pool.submit(self._fetch_verified, fid)
            ahead += self._sizes[fid]

    def release(self) -> None:
        """Forget the fragments kept for loading (cache, read-ahead) once a model is built: the
        engine holds its own copies of what it needs, so keeping them would double that memory."""
        self._queue.clear()
        self._queued.clear()
        for job in self._pending.values():
            job.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)  # at most read_threads reads to finish
            self._pool = None
        self._cache.clear()
        self._cached_bytes = 0

    def open_unverified(self, fragment_id: str) -> BinaryIO:
        """A readable file of the fragment's bytes for a caller that checks a hash covering them.

        Recombining checks the whole file's SHA-256, which covers every byte of every fragment, so
        hashing each fragment too would only spend a second SHA-256 pass. Backends that can stream
        from disk override this and still check the length, so a truncated fragment is named at
        once; the default hands over the bytes ``load_raw`` has verified.
        """
        return io.BytesIO(self.load_raw(fragment_id))

    def _remember(self, fragment_id: str, data: bytes) -> None:
        if len(data) > self.cache_bytes:
            return
        self._cache[fragment_id] = data
        self._cached_bytes += len(data)
        while self._cached_bytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= len(old)

    def _assemble(self, pieces) -> bytes | memoryview:
        """The bytes of ``pieces`` (in order) as one buffer of their own: a whole fragment as it
        came, else a copy (a view would keep the whole fragment, other tensors' bytes too, alive
        as long as the tensor). Pieces are copied straight into one preallocated buffer."""
        if len(pieces) == 1:
            p = pieces[0]
            raw = self.load_raw(p.fragment)
            return raw if (p.offset == 0 and p.length == len(raw)) else bytes(raw[p.offset:p.offset + p.length])
        out = _new_buffer(sum(p.length for p in pieces))
        at = 0
        for piece in self._views(pieces):
            out[at:at + len(piece)] = np.frombuffer(piece, np.uint8)
            at += len(piece)
        return memoryview(out).toreadonly()

    def _views(self, pieces) -> list[memoryview]:
        """Read-only views of the pieces' bytes inside their verified fragments (no copy)."""
        return [memoryview(self.load_raw(p.fragment)).toreadonly()[p.offset:p.offset + p.length] for p in pieces]

    # -- header and metadata ----------------------------------------------------------------------
    def header(self) -> GGUFHeader:
        """The GGUF header (metadata and tensor infos), parsed from the store's header fragments.

        Its fragments are hash-checked; the manifest's tensor table is not, so it must agree with
        the header before anything is read through it (StoreError naming the tensor if not).
        """
        if self._header is None:
            data = self._assemble(self.manifest.header_pieces)
            try:
                header = parse_header(io.BytesIO(data), f"{self.where} (header)")
            except GGUFFormatError as e:  # hash-checked bytes that do not parse: the manifest cut them wrong
                raise StoreError(str(e)) from None
            self.manifest.check_header(header, self.where)
            self._header = header
        return self._header

    @property
    def metadata(self) -> dict[str, Any]:
        return self.header().metadata

    # -- tensors ----------------------------------------------------------------------------------
    def tensor_entry(self, name: str) -> TensorEntry:
        """A tensor's manifest entry, once the manifest has been checked against the header."""
        self.header()
        return self.manifest.tensor(name)

    def tensor_bytes(self, name: str) -> bytes:
        """A tensor's bytes exactly as stored in the GGUF file (still quantized)."""
        entry = self.tensor_entry(name)
        self.prefetch(self.manifest.fragments_for([name]))
        return self._assemble(entry.pieces)

    def tensor_pieces(self, name: str) -> list[memoryview]:
        """A tensor's bytes as stored, as views of its pieces in order (one per fragment it spans),
        without assembling them: for a caller that converts them into memory of its own at once
        (each view keeps its whole fragment alive while it exists)."""
        entry = self.tensor_entry(name)
        self.prefetch(self.manifest.fragments_for([name]))
        return self._views(entry.pieces)

    def load_quantized(self, name: str) -> tuple[np.ndarray, GGMLQuantizationType]:
        """The stored blocks as uint8 rows: shape (rows, bytes per row), plus the GGML type.

        For kernels that compute on quantized blocks and for row-by-row lookups (token embeddings).
        """
        entry = self.tensor_entry(name)
        qtype = GGMLQuantizationType[entry.ggml_type]
        rows = int(np.prod(entry.shape[:-1], dtype=np.int64)) if len(entry.shape) > 1 else 1
        raw = np.frombuffer(self.tensor_bytes(name), dtype=np.uint8)
        return raw.reshape(rows, entry.length // rows), qtype

    def load_tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, in numpy row-major shape ``entry.shape``.

        Orientation, once and for all (the seed's "Q8_0 transposed layout"): GGUF lists a weight's
        shape as [in, out] because ne0, the innermost and contiguous axis, comes first. The bytes
        are therefore row-major [out, in]: one row of ``in`` values (a run of quantization blocks)
        per output unit. We return exactly that, shape (out, in), with no transpose and no copy
        beyond dequantization; the engine computes y = x @ W.T. Reading the bytes as [in, out]
        instead is the bug that made the seed predict one token forever.
        """
        entry = self.tensor_entry(name)
        if entry.ggml_type in _PLAIN_TYPES:
            values = np.frombuffer(self.tensor_bytes(name), dtype=_PLAIN_TYPES[entry.ggml_type])
            return values.astype(np.float32).reshape(entry.shape)
        blocks, qtype = self.load_quantized(name)
        try:
            values = quants.dequantize(blocks, qtype)
        except NotImplementedError:
            raise StoreError(f"{self.where}: tensor {name!r} has type {qtype.name}, which cannot be dequantized")
        return np.ascontiguousarray(values, dtype=np.float32).reshape(entry.shape)

    def load_layer(self, index: int) -> dict[str, np.ndarray]:
        """All tensors of block ``index``, dequantized; reads only that block's fragments."""
        names = [t.name for t in self.manifest.layer_tensors(index, index)]
        self.prefetch(self.manifest.fragments_for(names))
        return {n: self.load_tensor(n) for n in names}

    def close(self) -> None:
        self.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
