"""The store's manifest: what the fragments are and which bytes of which tensor each one holds.

A store is a directory::

    manifest.json          this file's JSON (written last, so a store without it is incomplete)
    fragments/<sha256>     the fragments, each named by the SHA-256 of its bytes

The fragments, concatenated in manifest order, are the original GGUF file byte for byte. Each
tensor lists the (fragment, offset, length) pieces that hold its bytes, so a loader can fetch one
tensor or one layer from the manifest alone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from common.errors import StoreError

FORMAT_NAME = "gguf-fragment-store"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FRAGMENTS_DIR = "fragments"
FRAGMENT_ID = re.compile(r"^[0-9a-f]{64}$")
_LAYER = re.compile(r"^blk\.(\d+)\.")


def layer_of(tensor_name: str) -> int | None:
    """The transformer block a tensor belongs to (``blk.N.*``), or None for global tensors."""
    m = _LAYER.match(tensor_name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Piece:
    fragment: str  # fragment id (sha256 hex)
    offset: int    # offset inside the fragment
    length: int


@dataclass(frozen=True)
class Fragment:
    id: str
    size: int
    offset: int  # where its bytes start in the source file


@dataclass(frozen=True)
class TensorEntry:
    name: str
    ggml_type: str
    gguf_shape: tuple[int, ...]  # as GGUF lists it: innermost dimension (ne0) first
    shape: tuple[int, ...]       # numpy row-major shape of the elements (gguf_shape reversed)
    offset: int                  # absolute byte offset in the source file
    length: int
    pieces: tuple[Piece, ...]

    @property
    def layer(self) -> int | None:
        return layer_of(self.name)


@dataclass
class Manifest:
    source: dict[str, Any]       # name, size, sha256
    fragment_size: int
    gguf: dict[str, Any]         # version, alignment, data_offset, tensor_count, metadata_count
    model: dict[str, Any]        # summary read from metadata
    header_pieces: tuple[Piece, ...]
    tensors: list[TensorEntry]
    fragments: list[Fragment]
    path: str = MANIFEST_NAME    # where it was read from, for error messages

    # -- queries -------------------------------------------------------------------------------
    def tensor(self, name: str) -> TensorEntry:
        try:
            return self._by_name[name]
        except KeyError:
            raise StoreError(f"{self.path}: no tensor named {name!r}") from None

    @property
    def _by_name(self) -> dict[str, TensorEntry]:
        cache = self.__dict__.get("_by_name_cache")
        if cache is None:
            cache = self.__dict__["_by_name_cache"] = {t.name: t for t in self.tensors}
        return cache

    def tensor_names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def layer_tensors(self, first: int, last: int) -> list[TensorEntry]:
        """Tensors of blocks first..last inclusive."""
        return [t for t in self.tensors if t.layer is not None and first <= t.layer <= last]

    def fragments_for(self, tensor_names: Iterable[str], header: bool = False) -> list[str]:
        """Unique fragment ids holding the given tensors (and the header if asked), in file order."""
        wanted = set()
        if header:
            wanted.update(p.fragment for p in self.header_pieces)
        for name in tensor_names:
            wanted.update(p.fragment for p in self.tensor(name).pieces)
        seen, ordered = set(), []
        for f in self.fragments:
            if f.id in wanted and f.id not in seen:
                seen.add(f.id)
                ordered.append(f.id)
        return ordered

    def unique_fragments(self) -> dict[str, int]:
        """id -> size for each distinct fragment."""
        return {f.id: f.size for f in self.fragments}

    def holders(self, fragment_id: str) -> list[str]:
        """Names of the tensors with bytes in a fragment ("<header>" for the GGUF header)."""
        names = ["<header>"] if any(p.fragment == fragment_id for p in self.header_pieces) else []
        names += [t.name for t in self.tensors if any(p.fragment == fragment_id for p in t.pieces)]
        return names

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_json(self) -> str:
        def pieces(ps):
            return [{"fragment": p.fragment, "offset": p.offset, "length": p.length} for p in ps]

        doc = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "fragment_size": self.fragment_size,
            "gguf": self.gguf,
            "model": self.model,
            "header": {"offset": 0, "length": sum(p.length for p in self.header_pieces),
                       "pieces": pieces(self.header_pieces)},
            "tensors": [
                {"name": t.name, "ggml_type": t.ggml_type, "gguf_shape": list(t.gguf_shape), "shape": list(t.shape),
                 "offset": t.offset, "length": t.length, "pieces": pieces(t.pieces)}
                for t in self.tensors
            ],
            "fragments": [{"id": f.id, "size": f.size, "offset": f.offset} for f in self.fragments],
        }
        return _dump(doc)

    @classmethod
    def from_json(cls, text: str | bytes, path: str = MANIFEST_NAME) -> "Manifest":
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"{path}: not a valid manifest (bad JSON: {e})") from None
        try:
            return _parse(doc, path)
        except StoreError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StoreError(f"{path}: not a valid manifest (missing or malformed field: {e})") from None

    @classmethod
    def load(cls, store_dir: str | Path) -> "Manifest":
        path = Path(store_dir) / MANIFEST_NAME
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{path}: no manifest (not a fragment store, or an incomplete one)") from None
        except OSError as e:
            raise StoreError(f"{path}: cannot read ({e.strerror})") from None
        return cls.from_json(text, str(path))


def _dump(doc: dict) -> str:
    """JSON with one line per list item: diffable and greppable, and compact for 46,000 fragments."""
    compact = {"separators": (", ", ": ")}
    lines = ["{"]
    keys = list(doc)
    for i, key in enumerate(keys):
        value = doc[key]
        end = "," if i < len(keys) - 1 else ""
        if isinstance(value, list):
            items = [json.dumps(v, **compact) for v in value]
            body = ",\n".join(f"  {item}" for item in items)
            lines.append(f' "{key}": [\n{body}\n ]{end}' if items else f' "{key}": []{end}')
        else:
            lines.append(f' "{key}": {json.dumps(value, **compact)}{end}')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _int(value: Any, what: str, path: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise StoreError(f"{path}: {what} must be an integer >= {minimum}, found {value!r}")
    return value


def _parse_pieces(raw: list, sizes: dict[str, int], what: str, path: str) -> tuple[Piece, ...]:
    pieces = []
    for p in raw:
        fid = p["fragment"]
        if fid not in sizes:
            raise StoreError(f"{path}: {what} refers to fragment {fid!r}, which is not in the fragment list")
        off = _int(p["offset"], f"{what} piece offset", path)
        length = _int(p["length"], f"{what} piece length", path, 1)
        if off + length > sizes[fid]:
            raise StoreError(f"{path}: {what} piece runs past the end of fragment {fid[:16]} "
                             f"({off}+{length} > {sizes[fid]})")
        pieces.append(Piece(fid, off, length))
    return tuple(pieces)


def _check_contiguous(pieces: tuple[Piece, ...], start: int, length: int, offsets: dict[str, set[int]],
                      what: str, path: str) -> None:
    """Pieces must cover [start, start+length) of the source in order, as the fragment list places them."""
    pos = start
    for p in pieces:
        if pos - p.offset not in offsets[p.fragment]:
            raise StoreError(f"{path}: {what} piece in fragment {p.fragment[:16]} does not sit where the "
                             f"fragment list puts it")
        pos += p.length
    if pos - start != length:
        raise StoreError(f"{path}: {what} pieces hold {pos - start} bytes, its length is {length}")


def _parse(doc: dict, path: str) -> Manifest:
    if doc.get("format") != FORMAT_NAME:
        raise StoreError(f"{path}: not a fragment-store manifest (format {doc.get('format')!r})")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(f"{path}: unknown manifest format version {version!r} (this tool reads {FORMAT_VERSION})")

    source = doc["source"]
    source_size = _int(source["size"], "source.size", path)
    if not isinstance(source.get("sha256"), str) or not FRAGMENT_ID.match(source["sha256"]):
        raise StoreError(f"{path}: source.sha256 is not a SHA-256 hex digest")
    fragment_size = _int(doc["fragment_size"], "fragment_size", path, 1)

    fragments, sizes, offsets = [], {}, {}
    pos = 0
    for f in doc["fragments"]:
        fid = f["id"]
        if not isinstance(fid, str) or not FRAGMENT_ID.match(fid):
            raise StoreError(f"{path}: fragment id {fid!r} is not a SHA-256 hex digest")
        size = _int(f["size"], f"size of fragment {fid[:16]}", path, 1)
        if size > fragment_size:
            raise StoreError(f"{path}: fragment {fid[:16]} is {size} bytes, above the store's fragment size "
                             f"{fragment_size}")
        if fid in sizes and sizes[fid] != size:
            raise StoreError(f"{path}: fragment {fid[:16]} is listed with two different sizes")
        if _int(f["offset"], f"offset of fragment {fid[:16]}", path) != pos:
            raise StoreError(f"{path}: fragment {fid[:16]} offset {f['offset']} does not follow the previous "
                             f"fragment (expected {pos})")
        sizes[fid] = size
        offsets.setdefault(fid, set()).add(pos)
        fragments.append(Fragment(fid, size, pos))
        pos += size
    if pos != source_size:
        raise StoreError(f"{path}: fragments add up to {pos} bytes but the source file has {source_size}")

    gguf = doc["gguf"]
    data_offset = _int(gguf["data_offset"], "gguf.data_offset", path, 8)
    header_pieces = _parse_pieces(doc["header"]["pieces"], sizes, "header", path)
    # A file without tensors may end before the padding that would lead to its data section.
    _check_contiguous(header_pieces, 0, min(data_offset, source_size), offsets, "header", path)

    tensors = []
    for t in doc["tensors"]:
        name = t["name"]
        if not isinstance(name, str):
            raise StoreError(f"{path}: tensor name {name!r} is not a string")
        try:
            qtype = GGMLQuantizationType[t["ggml_type"]]
        except KeyError:
            raise StoreError(f"{path}: tensor {name!r} has unknown GGML type {t['ggml_type']!r}") from None
        gguf_shape = tuple(_int(d, f"tensor {name!r} dimension", path, 1) for d in t["gguf_shape"])
        shape = tuple(t["shape"])
        if shape != tuple(reversed(gguf_shape)):
            raise StoreError(f"{path}: tensor {name!r} shape {list(shape)} is not gguf_shape reversed")
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = 1
        for d in gguf_shape:
            n *= d
        length = _int(t["length"], f"tensor {name!r} length", path, 1)
        if gguf_shape[0] % block or n // block * type_size != length:
            raise StoreError(f"{path}: tensor {name!r} length {length} does not match its {qtype.name} shape "
                             f"{list(gguf_shape)}")
        offset = _int(t["offset"], f"tensor {name!r} offset", path, data_offset)
        if offset + length > source_size:
            raise StoreError(f"{path}: tensor {name!r} runs past the end of the source file")
        pieces = _parse_pieces(t["pieces"], sizes, f"tensor {name!r}", path)
        _check_contiguous(pieces, offset, length, offsets, f"tensor {name!r}", path)
        tensors.append(TensorEntry(name, qtype.name, gguf_shape, shape, offset, length, pieces))

    return Manifest(
        source={"name": str(source["name"]), "size": source_size, "sha256": source["sha256"]},
        fragment_size=fragment_size, gguf=dict(gguf), model=dict(doc["model"]),
        header_pieces=header_pieces, tensors=tensors, fragments=fragments, path=path,
    )
