"""The store's manifest: what the fragments are and which bytes of which tensor each one holds.

A store is a directory::

    manifest.json          this file's JSON (written last, so a store without it is incomplete)
    fragments/<sha256>     the fragments, each named by the SHA-256 of its bytes

The fragments, concatenated in manifest order, are the original GGUF file byte for byte. Each
tensor lists the (fragment, offset, length) pieces that hold its bytes, so a loader can fetch one
tensor or one layer from the manifest alone.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from common.errors import StoreError
from common.files import read_regular
from fragmenter.gguf_header import GGUFHeader

FORMAT_NAME = "gguf-fragment-store"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FRAGMENTS_DIR = "fragments"
FRAGMENT_ID = re.compile(r"^[0-9a-f]{64}$")
_LAYER = re.compile(r"^blk\.(\d+)\.")
# Far above the 46,000-fragment model's manifest (about 10 MB); stops a huge or endless file early.
MAX_MANIFEST_BYTES = 256 << 20
# JSON expands in memory: 256 MiB of `[],` is 6.7 GB of lists. Every value but the first follows a
# `[`, `,` or `:`, so counting those bounds the values (at about 72 bytes each in Python) before
# parsing. An 810 GB file in 10 MB fragments (81,000) has a manifest of 1.0 million; this allows
# eight times that, and bounds a parse well under 1 GB (8 million empty lists take 0.55 GB).
MAX_MANIFEST_VALUES = 8_000_000


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
        marks = ("[", ",", ":") if isinstance(text, str) else (b"[", b",", b":")
        if sum(text.count(m) for m in marks) > MAX_MANIFEST_VALUES:
            raise StoreError(f"{path}: not a valid manifest (more than {MAX_MANIFEST_VALUES:,} JSON values, "
                             f"far more than any manifest holds)")
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"{path}: not a valid manifest (bad JSON: {e})") from None
        except RecursionError:  # json recurses once per nesting level
            raise StoreError(f"{path}: not a valid manifest (nested too deeply)") from None
        if not isinstance(doc, dict):
            kind = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(type(doc),
                                                                                                 "a number")
            raise StoreError(f"{path}: not a valid manifest (a JSON object is needed, not {kind})")
        try:
            return _parse(doc, path)
        except StoreError:
            raise
        except KeyError as e:
            raise StoreError(f"{path}: not a valid manifest (the field {e.args[0]!r} is missing)") from None
        except (TypeError, ValueError, AttributeError, IndexError):
            raise StoreError(f"{path}: not a valid manifest (a field holds the wrong kind of value)") from None

    @classmethod
    def load(cls, store_dir: str | Path) -> "Manifest":
        return cls.from_json(read_manifest_bytes(store_dir), str(Path(store_dir) / MANIFEST_NAME))

    # -- the GGUF header is the authority ---------------------------------------------------------
    def check_header(self, header: GGUFHeader, where: str | None = None) -> None:
        """Raise StoreError unless this manifest's tensor table is exactly what ``header`` implies.

        The header sits inside hash-checked fragments; the table beside it in manifest.json does
        not. A table whose names, types, shapes, offsets or pieces differ from the header's (say two
        tensors' offsets swapped) would hand the engine the wrong bytes under the right name and
        produce fluent garbage. So every loader calls this before any tensor is used, and
        `recombine --verify` reports it. The table must equal the one the fragmenter derives from
        the header and the fragment list, piece for piece.
        """
        where = where or self.path
        gguf = gguf_summary(header)
        for key, value in gguf.items():
            if self.gguf.get(key) != value:
                raise StoreError(f"{where}: manifest gguf.{key} is {self.gguf.get(key)!r} but the GGUF header "
                                 f"says {value!r}")
        model = model_summary(header)
        if self.model != model:
            key = next(k for k in {**model, **self.model} if self.model.get(k) != model.get(k))
            raise StoreError(f"{where}: manifest model.{key} is {self.model.get(key)!r} but the GGUF header "
                             f"says {model.get(key)!r}")
        expected = tensor_entries(header, self.fragments)
        if self.tensors == expected:
            return
        listed = {t.name for t in expected}
        seen = set()
        for t in self.tensors:
            if t.name not in listed:
                raise StoreError(f"{where}: manifest lists tensor {t.name!r}, which the GGUF header does not have")
            if t.name in seen:
                raise StoreError(f"{where}: manifest lists tensor {t.name!r} twice")
            seen.add(t.name)
        missing = [t.name for t in expected if t.name not in seen]
        if missing:
            raise StoreError(f"{where}: manifest does not list tensor {missing[0]!r} of the GGUF header")
        for want, got in zip(expected, self.tensors):
            if want.name != got.name:
                raise StoreError(f"{where}: manifest lists tensor {got.name!r} where the GGUF header has "
                                 f"{want.name!r} (another order)")
            if want != got:
                raise StoreError(f"{where}: manifest entry for tensor {want.name!r} {_difference(want, got)}")


def read_manifest_bytes(store_dir: str | Path) -> bytes:
    """manifest.json's bytes: a regular file of sane size (a FIFO or /dev/zero would hang us)."""
    path = Path(store_dir) / MANIFEST_NAME
    try:
        data = read_regular(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise StoreError(f"{path}: no manifest (not a fragment store, or an incomplete one)") from None
    except OSError as e:
        raise StoreError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise StoreError(f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a manifest")
    return data


# -- what the header implies ----------------------------------------------------------------------
def pieces_of(start: int, length: int, fragments: list[Fragment], starts: list[int] | None = None
              ) -> tuple[Piece, ...]:
    """The pieces of source bytes [start, start+length) as held by ``fragments`` (in file order);
    ``starts``, their offsets, may be passed in when asking for many ranges."""
    if starts is None:
        starts = [f.offset for f in fragments]
    end = start + length
    pieces = []
    i = max(bisect.bisect_right(starts, start) - 1, 0)
    while i < len(fragments) and fragments[i].offset < end:
        f = fragments[i]
        lo, hi = max(start, f.offset), min(end, f.offset + f.size)
        if lo < hi:
            pieces.append(Piece(f.id, lo - f.offset, hi - lo))
        i += 1
    return tuple(pieces)


def tensor_entries(header: GGUFHeader, fragments: list[Fragment]) -> list[TensorEntry]:
    """The manifest's tensor table for a file with this header cut into these fragments."""
    starts = [f.offset for f in fragments]
    return [TensorEntry(t.name, t.type_name, t.dims, t.numpy_shape, header.data_offset + t.offset, t.n_bytes,
                        pieces_of(header.data_offset + t.offset, t.n_bytes, fragments, starts))
            for t in header.tensors]


def model_summary(header: GGUFHeader) -> dict:
    """The handful of hyperparameters a person (or a scheduler) wants without opening the file."""
    md = header.metadata
    arch = md.get("general.architecture", "unknown")

    def get(key):  # (a summary for people: a value that is no count is left out, the engine refuses it)
        value = md.get(f"{arch}.{key}")
        if hasattr(value, "__len__") and not isinstance(value, str):
            return value
        whole = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return int(value) if whole and int(value) == value else None

    tokens = md.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens) if tokens is not None else None)
    return {
        "architecture": arch,
        "name": md.get("general.name"),
        "block_count": get("block_count"),
        "embedding_length": get("embedding_length"),
        "feed_forward_length": get("feed_forward_length"),
        "head_count": get("attention.head_count"),
        "head_count_kv": get("attention.head_count_kv"),
        "vocab_size": vocab,
        "context_length": get("context_length"),
    }


def gguf_summary(header: GGUFHeader) -> dict[str, int]:
    return {"version": header.version, "alignment": header.alignment, "data_offset": header.data_offset,
            "tensor_count": len(header.tensors), "metadata_count": len(header.metadata)}


def _difference(want: TensorEntry, got: TensorEntry) -> str:
    """How a manifest entry differs from the header's, for the error message."""
    for field in ("ggml_type", "gguf_shape", "shape", "offset", "length"):
        a, b = getattr(want, field), getattr(got, field)
        if a != b:
            return f"has {field} {_show(b)} but the GGUF header says {_show(a)}"
    return "has pieces that do not tile its bytes as the fragment list places them"


def _show(value) -> str:
    return str(list(value)) if isinstance(value, tuple) else repr(value)


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


def _check_file_name(name, path: str) -> None:
    """source.name is shown, and names files the tools write (fetch's store, a temporary GGUF): a plain
    file name, never a path (``../x`` or ``/home/you/.bashrc`` from a server's manifest would write there)."""
    if (not isinstance(name, str) or not name or len(name) > 255 or name in (".", "..")
            or any(c in name for c in "/\\\0")):
        raise StoreError(f"{path}: source.name {str(name)[:80]!r} is not a plain file name")


def _parse(doc: dict, path: str) -> Manifest:
    if doc.get("format") != FORMAT_NAME:
        raise StoreError(f"{path}: not a fragment-store manifest (format {doc.get('format')!r})")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(f"{path}: unknown manifest format version {version!r} (this tool reads {FORMAT_VERSION})")

    source = doc["source"]
    _check_file_name(source["name"], path)
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
            before = (f"fragment {fragments[-1].id[:16]} (offset {fragments[-1].offset}, size "
                      f"{fragments[-1].size}) ends at {pos}") if fragments else "the first fragment starts at 0"
            raise StoreError(f"{path}: fragment {fid[:16]} is listed at offset {f['offset']}, but {before}: "
                             f"one of the two entries is wrong")
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

    tensors, names = [], set()
    for t in doc["tensors"]:
        name = t["name"]
        if not isinstance(name, str):
            raise StoreError(f"{path}: tensor name {name!r} is not a string")
        if name in names:
            raise StoreError(f"{path}: tensor {name!r} is listed twice")
        names.add(name)
        try:
            qtype = GGMLQuantizationType[t["ggml_type"]]
        except KeyError:
            raise StoreError(f"{path}: tensor {name!r} has unknown GGML type {t['ggml_type']!r}") from None
        gguf_shape = tuple(_int(d, f"tensor {name!r} dimension", path, 1) for d in t["gguf_shape"])
        shape = tuple(reversed(gguf_shape))
        if list(t["shape"]) != list(shape) or any(type(d) is not int for d in t["shape"]):
            raise StoreError(f"{path}: tensor {name!r} shape {t['shape']!r} is not gguf_shape reversed")
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
        source={"name": source["name"], "size": source_size, "sha256": source["sha256"]},
        fragment_size=fragment_size, gguf=dict(gguf), model=dict(doc["model"]),
        header_pieces=header_pieces, tensors=tensors, fragments=fragments, path=path,
    )
