"""Parse a GGUF header (metadata and tensor infos) from a byte stream.

gguf-py's GGUFReader memory-maps a whole file and builds a view of every tensor, so it cannot read
the header fragment of a store on its own, and on a truncated file it fails deep inside numpy.
This parser reads only the header, from any binary stream, and reports damage as one clear line.
It uses gguf-py's constants (value types, tensor types, block sizes) so the two never disagree;
the tests check it against GGUFReader on every factory model.

Layout (GGUF v2/v3, little-endian):
    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset)
    padding to general.alignment (default 32), then tensor data; offsets are relative to it.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from common.errors import UserError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# Far above any real model, low enough to stop a corrupt count from allocating the machine away.
MAX_COUNT = 1 << 24
# llama.cpp refuses element counts that do not fit an int64; so do we, as every reader must agree.
MAX_ELEMENTS = (1 << 63) - 1

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}
_NUMPY_TYPES = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.FLOAT64: "<f8",
    GGUFValueType.BOOL: "?",
}


class UndecodedStrings:
    """A string array that was skipped rather than decoded (``decode_strings=False``): the fragmenter
    needs its length, not SmolLM2's 98k vocabulary and merge strings, which are half its parse time."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"<{self.count} undecoded strings>"


class GGUFFormatError(UserError):
    """The bytes are not a GGUF file this project can read."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the GGUF header describes it."""

    name: str
    ggml_type: int
    dims: tuple[int, ...]  # GGUF order: dims[0] (ne0) is the innermost, contiguous axis
    offset: int            # relative to the start of the data section

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.ggml_type).name

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        """Row-major shape of the elements: GGUF's dims reversed (ne1 rows of ne0 values)."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:  # Python ints: numpy's int64 product would wrap around silently
            n *= d
        return n

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        return self.n_elements // block * size


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int  # absolute offset of the data section (header plus padding)
    value_types: dict[str, int] = field(default_factory=dict)
    header_end: int = 0  # absolute end of the tensor infos, before the padding

    def tensor_extent(self) -> int:
        """Absolute end of the last tensor's bytes: the smallest size a complete file can have.

        A file without tensors (a vocabulary-only GGUF) may end right after its tensor infos,
        without the padding that would lead to a data section.
        """
        ends = [self.data_offset + t.offset + t.n_bytes for t in self.tensors]
        return max(ends, default=self.header_end)


_U64 = struct.Struct("<Q")


class _Reader:
    """Reads from a stream through a growing in-memory buffer: the header is parsed with
    struct.unpack_from on the buffer instead of one small read per field (SmolLM2's 49k-token
    vocabulary and merges are about 100k strings)."""

    _CHUNK = 1 << 20

    def __init__(self, stream: BinaryIO, source: str, decode_strings: bool = True):
        self.stream = stream
        self.source = source
        self.decode_strings = decode_strings
        self.buf = bytearray()
        self.pos = 0

    def _need(self, n: int) -> None:
        while len(self.buf) - self.pos < n:
            chunk = self.stream.read(max(self._CHUNK, n))
            if not chunk:
                raise GGUFFormatError(f"{self.source}: truncated GGUF header (ends at byte {len(self.buf)})")
            self.buf += chunk

    def take(self, n: int) -> bytes:
        self._need(n)
        data = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return data

    def scalar(self, vtype: GGUFValueType) -> Any:
        fmt = _SCALAR_FORMATS[vtype]
        size = struct.calcsize(fmt)
        self._need(size)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def u32(self) -> int:
        return self.scalar(GGUFValueType.UINT32)

    def u64(self) -> int:
        return self.scalar(GGUFValueType.UINT64)

    def count(self, what: str) -> int:
        n = self.u64()
        if n > MAX_COUNT:
            raise GGUFFormatError(f"{self.source}: corrupt GGUF header ({what} = {n} at byte {self.pos - 8})")
        return n

    def string(self) -> str:
        n = self.u64()
        if n > MAX_COUNT * 4:
            raise GGUFFormatError(f"{self.source}: corrupt GGUF header (string of {n} bytes at byte {self.pos - 8})")
        return self.take(n).decode("utf-8", errors="surrogateescape")

    def strings(self, count: int) -> list[str]:
        """An array of strings, the bulk of a header: one tight loop over the buffer, with the
        buffer's state in locals (SmolLM2 has 98k of them)."""
        out, decode = [], self.decode_strings
        append = out.append
        length_at = _U64.unpack_from
        buf, pos, end = self.buf, self.pos, len(self.buf)
        for _ in range(count):
            if end - pos < 8:
                self.pos = pos
                self._need(8)
                end = len(buf)
            (n,) = length_at(buf, pos)
            if n > MAX_COUNT * 4:
                raise GGUFFormatError(f"{self.source}: corrupt GGUF header (string of {n} bytes at byte {pos})")
            start = pos + 8
            pos = start + n
            if pos > end:
                self.pos = start - 8
                self._need(8 + n)
                end = len(buf)
            if decode:
                append(str(buf[start:pos], "utf-8", "surrogateescape"))
        self.pos = pos
        return out if decode else UndecodedStrings(count)

    def value_type(self) -> GGUFValueType:
        raw = self.u32()
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise GGUFFormatError(f"{self.source}: corrupt GGUF header (unknown value type {raw} at byte {self.pos - 4})")

    def value(self, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type = self.value_type()
            n = self.count("array length")
            if item_type in _NUMPY_TYPES:
                dtype = np.dtype(_NUMPY_TYPES[item_type])
                return np.frombuffer(self.take(n * dtype.itemsize), dtype=dtype).copy()
            if item_type == GGUFValueType.STRING:
                return self.strings(n)
            return [self.value(item_type) for _ in range(n)]
        return self.scalar(vtype)


def parse_header(stream: BinaryIO, source: str = "<stream>", decode_strings: bool = True) -> GGUFHeader:
    """Read the GGUF header from ``stream`` (positioned at byte 0). ``source`` names it in errors.

    With ``decode_strings=False`` string arrays are checked and skipped, not decoded.
    """
    r = _Reader(stream, source, decode_strings)
    try:
        magic = r.take(4)
    except GGUFFormatError:
        magic = bytes(r.buf)
    if magic != GGUF_MAGIC:
        raise GGUFFormatError(f"{source}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    version = r.u32()
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and (version >> 16) in SUPPORTED_VERSIONS:
            raise GGUFFormatError(f"{source}: big-endian GGUF files are not supported")
        raise GGUFFormatError(f"{source}: unsupported GGUF version {version} (supported: 2, 3)")
    tensor_count = r.count("tensor count")
    kv_count = r.count("metadata count")

    metadata: dict[str, Any] = {}
    value_types: dict[str, int] = {}
    for _ in range(kv_count):
        key = r.string()
        vtype = r.value_type()
        metadata[key] = r.value(vtype)
        value_types[key] = int(vtype)

    tensors = []
    seen = set()
    for _ in range(tensor_count):
        name = r.string()
        n_dims = r.u32()
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFFormatError(f"{source}: tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        dims = tuple(r.u64() for _ in range(n_dims))
        _check_dims(name, dims, source)
        raw_type = r.u32()
        offset = r.u64()
        try:
            ggml_type = GGMLQuantizationType(raw_type)
            block, _ = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"{source}: tensor {name!r} has unknown GGML type {raw_type}")
        if dims[0] % block:
            raise GGUFFormatError(f"{source}: tensor {name!r} row of {dims[0]} values is not a whole number "
                                  f"of {ggml_type.name} blocks ({block})")
        if name in seen:
            raise GGUFFormatError(f"{source}: tensor {name!r} appears twice")
        seen.add(name)
        tensors.append(TensorInfo(name, int(ggml_type), dims, offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFFormatError(f"{source}: general.alignment {alignment!r:.40} is not a power of two")
    data_offset = -(-r.pos // alignment) * alignment
    header = GGUFHeader(version, metadata, tensors, alignment, data_offset, value_types, r.pos)
    for t in tensors:
        if t.offset % alignment:
            raise GGUFFormatError(f"{source}: tensor {t.name!r} data offset {t.offset} is not aligned to {alignment}")
    ordered = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):  # two tensors sharing bytes: one of them reads the other's weights
        if a.offset + a.n_bytes > b.offset:
            raise GGUFFormatError(f"{source}: tensor {b.name!r} at data offset {b.offset} overlaps tensor {a.name!r} "
                                  f"({a.offset}-{a.offset + a.n_bytes})")
    return header


def _check_dims(name: str, dims: tuple[int, ...], source: str) -> None:
    """Every dimension at least 1 and the element count an int64: what llama.cpp and the manifest
    accept. Refusing here, where the header is read, keeps `fragment` from writing a store that no
    reader accepts and gives `infer FILE.gguf` the same one-line error."""
    if 0 in dims:
        raise GGUFFormatError(f"{source}: tensor {name!r} has a dimension of 0 (dims {list(dims)})")
    n = 1
    for d in dims:
        n *= d
    if n > MAX_ELEMENTS:
        raise GGUFFormatError(f"{source}: tensor {name!r} has dims {list(dims)}: more elements than a GGUF "
                              f"tensor can hold (2^63 - 1)")


def parse_header_bytes(data: bytes, source: str) -> GGUFHeader:
    return parse_header(io.BytesIO(data), source)


def read_file_header(path: str, decode_strings: bool = True) -> tuple[GGUFHeader, int]:
    """Parse a GGUF file's header and check that the file holds every tensor's bytes.

    Returns the header and the file's size.
    """
    import os

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = parse_header(io.BufferedReader(f, buffer_size=1 << 20), path, decode_strings)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})")
    extent = header.tensor_extent()
    if size < extent:
        raise GGUFFormatError(f"{path}: truncated GGUF file ({size} bytes, tensors need {extent})")
    return header, size
