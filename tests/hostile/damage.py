"""Ways to damage a store or a GGUF file, shared by the hostile tests and the mutation suite."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

from fragmenter.gguf_header import GGUF_MAGIC


def copy_store(store: Path, to: Path) -> Path:
    """A private copy of a store (fragments copied, so a test may damage them)."""
    shutil.copytree(store, to)
    return to


def edit_manifest(store: Path, edit) -> None:
    """Apply ``edit(doc)`` to the store's manifest.json (it may return a replacement document)."""
    path = store / "manifest.json"
    doc = json.loads(path.read_text())
    new = edit(doc)
    path.write_text(json.dumps(doc if new is None else new))


def tensor(doc: dict, name: str) -> dict:
    return next(t for t in doc["tensors"] if t["name"] == name)


def swap_tensors(doc: dict, a: str, b: str) -> None:
    """The hostile run's silent-wrong case: two same-sized tensors trade their bytes."""
    ta, tb = tensor(doc, a), tensor(doc, b)
    for key in ("offset", "pieces"):
        ta[key], tb[key] = tb[key], ta[key]


def tensor_info_positions(data: bytes) -> dict[str, dict[str, int]]:
    """Where each tensor's info fields sit in a GGUF file: {name: {"n_dims", "dims", "type", "offset"}}.

    A small walker of its own (not the parser under test) so tests can aim at exact fields.
    """
    pos = 4 + 4
    n_tensors, n_kv = struct.unpack_from("<QQ", data, pos)
    pos += 16
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def value(vtype: int, pos: int) -> int:
        if vtype == 8:
            (n,) = struct.unpack_from("<Q", data, pos)
            return pos + 8 + n
        if vtype == 9:
            item, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(count):
                pos = value(item, pos)
            return pos
        return pos + sizes[vtype]

    assert data[:4] == GGUF_MAGIC
    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos = value(vtype, pos + 4)
    out = {}
    for _ in range(n_tensors):
        (n,) = struct.unpack_from("<Q", data, pos)
        name = data[pos + 8:pos + 8 + n].decode()
        pos += 8 + n
        (n_dims,) = struct.unpack_from("<I", data, pos)
        out[name] = {"n_dims": pos, "dims": pos + 4, "type": pos + 4 + 8 * n_dims, "offset": pos + 8 + 8 * n_dims}
        pos += 4 + 8 * n_dims + 4 + 8
    return out


def set_dim(src: Path, dst: Path, name: str, index: int, value: int) -> Path:
    """A copy of a GGUF file with one dimension of one tensor replaced."""
    data = bytearray(src.read_bytes())
    at = tensor_info_positions(bytes(data))[name]["dims"] + 8 * index
    struct.pack_into("<Q", data, at, value)
    dst.write_bytes(bytes(data))
    return dst
