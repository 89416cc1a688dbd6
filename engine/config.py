"""LLaMA hyperparameters, read from GGUF metadata alone: nothing assumes a 7B (or any) config."""

from __future__ import annotations

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

        dim = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        n_kv = get("attention.head_count_kv", n_heads)
        if hasattr(n_kv, "__len__"):  # per-layer list: LLaMA uses one value for all layers
            if len(set(int(v) for v in n_kv)) != 1:
                raise UserError(f"{where}: per-layer KV head counts are not supported")
            n_kv = n_kv[0]
        n_kv = int(n_kv)
        head_dim = int(get("attention.key_length", dim // n_heads))
        if n_heads % n_kv:
            raise UserError(f"{where}: {n_heads} heads do not divide into {n_kv} KV heads")
        scale = 1.0
        scaling_type = md.get(f"{arch}.rope.scaling.type")
        if scaling_type == "linear":
            scale = 1.0 / float(get("rope.scaling.factor"))
        elif scaling_type not in (None, "none"):
            raise UserError(f"{where}: rope scaling {scaling_type!r} is not supported (only linear)")
        elif f"{arch}.rope.scale_linear" in md:
            scale = 1.0 / float(md[f"{arch}.rope.scale_linear"])
        tokens = md.get("tokenizer.ggml.tokens")
        vocab = int(md.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else 0))
        return cls(
            n_layers=int(get("block_count")), dim=dim, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
            ffn_dim=int(get("feed_forward_length")), vocab_size=vocab,
            context_length=int(get("context_length", 2048)),
            rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=float(get("rope.freq_base", 10000.0)),
            rope_dim=int(get("rope.dimension_count", head_dim)), rope_scale=scale,
        )
