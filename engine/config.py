"""LLaMA hyperparameters, read from GGUF metadata alone: nothing assumes a 7B (or any) config."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from common.errors import UserError

SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class LlamaConfig:
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_base: float
    rope_dim: int          # how many leading dimensions of each head are rotated
    rope_scale: float      # positions are multiplied by this (1 / linear scaling factor)

    @classmethod
    def from_metadata(cls, md: dict[str, Any], where: str) -> "LlamaConfig":
        arch = md.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UserError(f"{where}: architecture {arch!r} is not supported (this engine runs: "
                            f"{', '.join(SUPPORTED_ARCHITECTURES)})")

        def get(key, default=None):
            value = md.get(f"{arch}.{key}", default)
            if value is None:
                raise UserError(f"{where}: metadata {arch}.{key} is missing")
            return value

        def whole(key, default=None, least: int = 1) -> int:
            """A count from the metadata: a whole number >= ``least``, or one line naming the key."""
            return _whole(get(key, default), f"{where}: metadata {arch}.{key}", least)

        def real(key, default) -> float:
            value = get(key, default)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
                raise UserError(f"{where}: metadata {arch}.{key} must be a positive number, not {value!r:.40}")
            return float(value)

        dim = whole("embedding_length")
        n_heads = whole("attention.head_count")
        n_kv = get("attention.head_count_kv", n_heads)
        if hasattr(n_kv, "__len__") and not isinstance(n_kv, str):  # per-layer list: LLaMA uses one for all
            if len(set(_whole(v, f"{where}: metadata {arch}.attention.head_count_kv", 1) for v in n_kv)) != 1:
                raise UserError(f"{where}: per-layer KV head counts are not supported")
            n_kv = n_kv[0]
        n_kv = _whole(n_kv, f"{where}: metadata {arch}.attention.head_count_kv", 1)
        head_dim = whole("attention.key_length", dim // n_heads)
        if n_heads % n_kv:
            raise UserError(f"{where}: {n_heads} heads do not divide into {n_kv} KV heads")
        scale = _rope_scale(md, arch, where)
        tokens = md.get("tokenizer.ggml.tokens")
        # The embedding has a row per token of the list, as llama.cpp requires (a padded one is refused);
        # vocab_size counts only for a file without a token list.
        vocab = len(tokens) if hasattr(tokens, "__len__") and len(tokens) else whole("vocab_size")
        rope_dim = whole("rope.dimension_count", head_dim)
        if rope_dim != head_dim:  # llama.cpp refuses partial rotation for LLaMA ("invalid n_rot")
            raise UserError(f"{where}: metadata {arch}.rope.dimension_count is {rope_dim}, but a LLaMA rotates "
                            f"whole heads of {head_dim}")
        return cls(
            n_layers=whole("block_count"), dim=dim, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
            ffn_dim=whole("feed_forward_length"), vocab_size=vocab,
            # (both required, as llama.cpp requires them: a default would run a model differently)
            context_length=whole("context_length"), rms_eps=real("attention.layer_norm_rms_epsilon", None),
            rope_base=real("rope.freq_base", 10000.0), rope_dim=rope_dim, rope_scale=scale,
    )


def _rope_scale(md: dict[str, Any], arch: str, where: str) -> float:
    """What positions are multiplied by, as llama.cpp reads it: rope.scaling.factor (or the older
    rope.scale_linear) F means 1/F, 0 or absent means 1; the type defaults to linear, and only
    linear and none are run here (YaRN, LongRoPE and the like are refused)."""
    scaling_type = md.get(f"{arch}.rope.scaling.type", "linear")
    if scaling_type not in ("linear", "none"):
        raise UserError(f"{where}: rope scaling {scaling_type!r:.40} is not supported (only linear)")
    key = next((k for k in ("rope.scaling.factor", "rope.scale_linear") if f"{arch}.{k}" in md), None)
    if key is None or scaling_type == "none":
        return 1.0
    factor = md[f"{arch}.{key}"]
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not math.isfinite(factor) or factor < 0:
        raise UserError(f"{where}: metadata {arch}.{key} must be a number >= 0 (0: no scaling), not {factor!r:.40}")
    return 1.0 if factor == 0 else 1.0 / float(factor)


def _whole(value, what: str, least: int) -> int:
    """``value`` as an int if it is a whole number >= ``least`` (GGUF writers use any integer type,
    some a float), else one line: a string, NaN, a negative or zero count must not reach a division."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value or int(value) != value \
            or value < least:
        raise UserError(f"{what} must be a whole number >= {least}, not {value!r:.40}")
    return int(value)
