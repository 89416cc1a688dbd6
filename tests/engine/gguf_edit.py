"""Copies of a GGUF with metadata set or removed and tensors added: the variants llama.cpp treats in
its own ways (biases, rope scaling keys, tokenizer flags), made from the factory's models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType

from models.gguf_write import gguf_writer


def edited(src: Path, dst: Path, set_kv: dict | None = None, drop_kv=(), add_tensors: dict | None = None) -> Path:
    """``src`` rewritten to ``dst``: ``set_kv`` {key: value} (type from the value: str, bool, float
    as F32, int as U32, list of str or of int as I32) replaces or adds keys, ``drop_kv`` removes keys,
    ``add_tensors`` {name: float32 array} appends tensors or replaces those of the same name."""
    reader = GGUFReader(src)
    set_kv = dict(set_kv or {})
    arch = str(reader.fields["general.architecture"].contents())
    with gguf_writer(dst, arch) as w:
        for field in reader.fields.values():
            if field.name == "general.architecture" or field.name.startswith("GGUF.") or field.name in drop_kv \
                    or field.name in set_kv:
                continue
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
        for key, value in set_kv.items():
            w.add_key_value(key, value, *_value_type(value))
        for t in reader.tensors:
            if t.name in (add_tensors or {}):
                continue
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)  # (quantized: its rows of bytes)
        for name, values in (add_tensors or {}).items():
            w.add_tensor(name, np.ascontiguousarray(values, dtype=np.float32))
    return dst


def _value_type(value) -> tuple:
    if isinstance(value, list):  # (integer arrays as INT32: token types are, and llama.cpp checks)
        item = GGUFValueType.INT32 if isinstance(value[0], int) else _value_type(value[0])[0]
        return GGUFValueType.ARRAY, item
    if isinstance(value, str):
        return (GGUFValueType.STRING,)
    if isinstance(value, bool):
        return (GGUFValueType.BOOL,)
    if isinstance(value, float):
        return (GGUFValueType.FLOAT32,)
    return (GGUFValueType.UINT32,)
