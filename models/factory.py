"""Small synthetic LLaMA GGUF files with seeded random weights, for tests and benchmarks.

Every file this factory writes is a complete model llama.cpp can load and run: real tokenizers
(SentencePiece trained with the sentencepiece package, or a byte-level BPE trained with
`tokenizers`, both on ``data/corpus.txt``), every LLaMA hyperparameter in the metadata, and
weights in F32, F16, BF16, Q8_0, Q4_0, Q4_1 (quantized by gguf-py, the reference for these
formats). A few K-quant tensors can be added for format-level tests of the store.

The same spec and seed always give the same bytes.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, quants

from models.gguf_write import gguf_writer
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, TokenType

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WEIGHT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


@dataclass(frozen=True)
class ModelSpec:
    """What to build. Dimensions are multiples of 32 (quant blocks) and need not be of 256."""

    dim: int = 96
    n_layers: int = 2
    n_heads: int = 6
    n_kv_heads: int = 2            # == n_heads: MHA; 1: MQA; otherwise GQA
    ffn_dim: int = 160
    vocab: str = "spm"             # "spm" (tokenizer.ggml.model = llama) or "bpe" (gpt2)
    vocab_size: int = 512
    weight_type: str = "Q8_0"
    tied_output: bool = False      # no output.weight: the head reuses token_embd
    context_length: int = 512
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    chat_template: bool = True
    k_quant_extra: bool = False    # add opaque Q4_K / Q6_K tensors (format-level tests only)
    direct_q8_0: bool = False      # write random Q8_0 blocks directly (fast for big models)
    seed: int = 0
    name: str = "factory-llama"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# A TinyLlama-1.1B-shaped model (about 1.17 GB in Q8_0) for speed work.
TINYLLAMA_SHAPE = ModelSpec(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, vocab="spm",
                            vocab_size=32000, weight_type="Q8_0", context_length=2048, name="tinyllama-shaped",
                            direct_q8_0=True)
TRAINED_SPM_MAX = 2000  # the shipped corpus supports about this many learned pieces


def standard_specs() -> dict[str, ModelSpec]:
    """The small models the test suite runs over: every weight type, both vocabularies, MHA/GQA/MQA."""
    base = ModelSpec()
    specs = {f"{t.lower()}-spm-gqa": replace(base, weight_type=t) for t in WEIGHT_TYPES}
    specs["q8_0-bpe-mha-tied"] = replace(base, vocab="bpe", n_kv_heads=6, tied_output=True, vocab_size=512)
    specs["f16-bpe-mqa"] = replace(base, vocab="bpe", weight_type="F16", n_kv_heads=1, vocab_size=512)
    specs["q4_0-spm-mha-tied"] = replace(base, weight_type="Q4_0", n_kv_heads=6, tied_output=True)
    return specs


# -- tokenizers ----------------------------------------------------------------------------------
def _corpus_lines() -> list[str]:
    return [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


@lru_cache(maxsize=8)
def spm_vocab(vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Train a SentencePiece BPE model with byte fallback; return (tokens, scores, token types).

    Beyond what the corpus supports, the vocabulary is padded with unreachable pieces of very low
    score, so a big model (32000 tokens) gets a real, working tokenizer of the right size.
    """
    if vocab_size > TRAINED_SPM_MAX:
        tokens, scores, types = spm_vocab(TRAINED_SPM_MAX)
        extra = vocab_size - len(tokens)
        low = min(scores) - 1.0
        return (tokens + [f"\u2581<pad{i}>" for i in range(extra)], scores + [low - i for i in range(extra)],
                types + [int(TokenType.NORMAL)] * extra)
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines()), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.995, num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], split_digits=True, minloglevel=2,
        max_sentence_length=1 << 16, train_extremely_large_corpus=False,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(TokenType.UNUSED)
        elif tokens[-1] in ("<|im_start|>", "<|im_end|>"):
            types.append(TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    return tokens, scores, [int(t) for t in types]


BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@lru_cache(maxsize=8)
def bpe_vocab(vocab_size: int) -> tuple[list[str], list[str], list[int]]:
    """Train a GPT-2 style byte-level BPE; return (tokens, merges, token types)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BPE_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in by_id]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [int(TokenType.CONTROL) if t in BPE_SPECIALS else int(TokenType.NORMAL) for t in tokens]
    return tokens, merges, types


def _add_tokenizer(w: GGUFWriter, spec: ModelSpec) -> int:
    """Write tokenizer metadata; returns the real vocabulary size."""
    if spec.vocab == "spm":
        tokens, scores, types = spm_vocab(spec.vocab_size)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
    elif spec.vocab == "bpe":
        tokens, merges, types = bpe_vocab(spec.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tokens.index("<|im_start|>"))
        w.add_eos_token_id(tokens.index("<|im_end|>"))
        w.add_unk_token_id(tokens.index("<|endoftext|>"))
        w.add_add_bos_token(False)
    else:
        raise ValueError(f"unknown vocabulary kind {spec.vocab!r}")
    if spec.chat_template:
        w.add_chat_template(CHATML_TEMPLATE)
    return len(tokens)


# -- weights -------------------------------------------------------------------------------------
def _encode(values: np.ndarray, type_name: str) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    """Array to hand to GGUFWriter.add_tensor for the given storage type."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if type_name == "F32":
        return values, None
    if type_name == "F16":
        return values.astype(np.float16), None
    qtype = GGMLQuantizationType[type_name]
    return quants.quantize(values, qtype), qtype


def _random_q8_0(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random Q8_0 blocks with scales that keep activations in a sane range, without quantizing."""
    blocks = np.empty((rows, cols // 32, 34), dtype=np.uint8)
    scale = np.float16(2.0 / (127 * np.sqrt(cols)))
    blocks[:, :, :2] = np.frombuffer(scale.tobytes(), dtype=np.uint8)
    blocks[:, :, 2:] = rng.integers(-127, 128, size=(rows, cols // 32, 32), dtype=np.int8).view(np.uint8)
    return blocks.reshape(rows, -1)


def _opaque_quant(rng: np.random.Generator, rows: int, cols: int, qtype: GGMLQuantizationType) -> np.ndarray:
    """Random bytes shaped as ``qtype`` blocks: real layout, meaningless values."""
    block, size = GGML_QUANT_SIZES[qtype]
    return rng.integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)


def tensor_specs(spec: ModelSpec, vocab: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, numpy shape, is a 2-D weight) for every tensor, in file order."""
    d, hd = spec.dim, spec.head_dim
    out = [("token_embd.weight", (vocab, d), True)]
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        out += [
            (p + "attn_norm.weight", (d,), False),
            (p + "attn_q.weight", (spec.n_heads * hd, d), True),
            (p + "attn_k.weight", (spec.n_kv_heads * hd, d), True),
            (p + "attn_v.weight", (spec.n_kv_heads * hd, d), True),
            (p + "attn_output.weight", (d, spec.n_heads * hd), True),
            (p + "ffn_norm.weight", (d,), False),
            (p + "ffn_gate.weight", (spec.ffn_dim, d), True),
            (p + "ffn_up.weight", (spec.ffn_dim, d), True),
            (p + "ffn_down.weight", (d, spec.ffn_dim), True),
        ]
    out.append(("output_norm.weight", (d,), False))
    if not spec.tied_output:
        out.append(("output.weight", (vocab, d), True))
    return out


def write_model(spec: ModelSpec, path: str | Path) -> Path:
    """Write the model described by ``spec`` to ``path`` (atomically). Returns the path."""
    rng = np.random.default_rng(spec.seed)
    with gguf_writer(path, "llama") as w:
        w.add_name(spec.name)
        w.add_context_length(spec.context_length)
        w.add_embedding_length(spec.dim)
        w.add_block_count(spec.n_layers)
        w.add_feed_forward_length(spec.ffn_dim)
        w.add_head_count(spec.n_heads)
        w.add_head_count_kv(spec.n_kv_heads)
        w.add_rope_dimension_count(spec.head_dim)
        w.add_rope_freq_base(spec.rope_base)
        w.add_layer_norm_rms_eps(spec.rms_eps)
        w.add_file_type(_file_type(spec.weight_type))
        vocab = _add_tokenizer(w, spec)
        w.add_vocab_size(vocab)

        for name, shape, is_weight in tensor_specs(spec, vocab):
            if is_weight and spec.direct_q8_0 and spec.weight_type == "Q8_0":
                data, qtype = _random_q8_0(rng, *shape), GGMLQuantizationType.Q8_0
            elif is_weight:
                scale = 1.0 / np.sqrt(shape[1]) if name != "token_embd.weight" else 1.0
                values = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
                data, qtype = _encode(values, spec.weight_type)
            else:  # norms stay F32, near 1 like trained models
                data, qtype = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)), None
            w.add_tensor(name, data, raw_dtype=qtype)
        if spec.k_quant_extra:
            for qname in ("Q4_K", "Q6_K"):
                qtype = GGMLQuantizationType[qname]
                w.add_tensor(f"extra.{qname.lower()}.weight", _opaque_quant(rng, 4, 256, qtype), raw_dtype=qtype)
    return Path(path)


def _file_type(type_name: str) -> int:
    """llama_ftype value for a model whose weights are all of one type."""
    return {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "BF16": 32}[type_name]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Write a synthetic LLaMA GGUF from the factory.")
    ap.add_argument("which", choices=["tinyllama"] + sorted(standard_specs()))
    ap.add_argument("output")
    args = ap.parse_args()
    spec = TINYLLAMA_SHAPE if args.which == "tinyllama" else standard_specs()[args.which]
    print(write_model(spec, args.output))
