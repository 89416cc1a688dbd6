"""An F32 twin of a GGUF file: the same metadata, every tensor dequantized to float32.

Why: with Q8_0 (and other quantized) weights llama.cpp rounds activations to Q8_0 blocks before
each product, and those roundings amplify last-bit float differences. On SmolLM2-135M this makes
llama.cpp disagree with *itself* when only the batch size changes (batch 512 vs batch 1: mean KL
3.0e-3, top-1 0.977; see README). Running llama.cpp on the twin keeps the weights' values and
removes that path dependence, so the comparison measures whether our engine computes the same
function, not which of llama.cpp's kernels ran.

The twin is written with gguf-py's own reader and dequantizer, independently of this project's
loader, so a loader bug cannot hide by appearing on both sides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, quants

from models.gguf_write import gguf_writer

F32_FILE_TYPE = 0


def write_f32_twin(source: str | Path, target: str | Path) -> Path:
    reader = GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    with gguf_writer(target, arch) as writer:
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            value = field.contents()
            if key == "general.file_type":
                value = F32_FILE_TYPE
            vtype = field.types[0]
            sub_type = field.types[1] if vtype == GGUFValueType.ARRAY else None
            if key == "general.alignment":
                writer.data_alignment = int(value)
            writer.add_key_value(key, value, vtype, sub_type)
        for t in reader.tensors:
            values = quants.dequantize(t.data, t.tensor_type)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            writer.add_tensor(t.name, np.ascontiguousarray(values, dtype=np.float32).reshape(shape))
    return Path(target)


def is_float_model(reader_types: list[str]) -> bool:
    """True when llama.cpp would not quantize activations for any product (F32/F16/BF16 weights)."""
    return all(t in ("F32", "F16", "BF16") for t in reader_types)
