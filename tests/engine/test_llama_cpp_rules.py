"""Files llama.cpp reads by rules of its own: the engine follows the same rule, or refuses the file in
one line. Each case came from a hostile review in which the engine gave other logits or tokens than
llama.cpp with exit 0 (biases ignored, a rope factor without its type, a pre-tokenizer's regexes...)."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import UserError
from distribution.gguf_file import GGUFFileLoader
from engine.model import LlamaModel
from engine.tokenizer import Tokenizer
from models.factory import bpe_vocab
from tests.conftest import assert_one_line_error, run_cli
from tests.engine.gguf_edit import edited
from tests.engine.test_tokenizer import corpus
from validation.reference import load_llama, teacher_forced_logits

TOKENS = [1, 17, 99, 23, 250, 7, 311, 42, 5, 128, 64, 300, 77, 401, 12, 9]
SPM = "f32-spm-gqa"


def agrees_with_llama_cpp(path) -> None:
    model = LlamaModel(GGUFFileLoader(path), emulate_llama_cpp=True)
    ours = model.forward(np.array(TOKENS), model.new_cache(64), all_logits=True)
    ref = teacher_forced_logits(load_llama(path, n_ctx=64, logits_all=True), TOKENS)
    assert (ours.argmax(1) == ref.argmax(1)).all()
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.9999, cos.min()


def refused(path, *needles) -> None:
    """The engine refuses the file in one line naming ``needles``, as a library call and from `infer`."""
    with pytest.raises(UserError, match=needles[0]):
        LlamaModel(GGUFFileLoader(path))
    assert_one_line_error(run_cli("infer", path, "--prompt", "hi", "--max-tokens", "2"), *needles)


# -- the forward pass -----------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["attn_q", "attn_v", "attn_output", "ffn_up", "ffn_down"])
def test_a_bias_is_refused_not_ignored(factory_models, tmp_path, which):
    """llama.cpp adds a LLaMA's optional biases (HF attention_bias / mlp_bias); ignoring them gave
    logits 5 apart and other text. The engine has no biases: it refuses the file."""
    src = GGUFFileLoader(factory_models[SPM])
    rows = src.tensor_entry(f"blk.1.{which}.weight").shape[0]
    path = edited(factory_models[SPM], tmp_path / "bias.gguf",
                  add_tensors={f"blk.1.{which}.bias": np.full(rows, 0.5, np.float32)})
    refused(path, f"blk.1.{which}.bias", "biases are not supported")


def test_any_tensor_the_pass_would_not_use_is_refused(factory_models, tmp_path):
    """llama.cpp refuses a file with tensors it does not load ("wrong number of tensors"); the engine
    used to run without them. An expert router stands in for any of them."""
    path = edited(factory_models[SPM], tmp_path / "router.gguf",
                  add_tensors={"blk.0.ffn_gate_inp.weight": np.zeros((4, 64), np.float32)})
    refused(path, "blk.0.ffn_gate_inp.weight", "not part of the LLaMA")


@pytest.mark.parametrize("kv", [
    {"llama.rope.scaling.factor": 4.0},                                   # no type: linear, as llama.cpp reads it
    {"llama.rope.scaling.factor": 4.0, "llama.rope.scaling.type": "none"},  # none: the factor is not applied
    {"llama.rope.scale_linear": 2.0},                                    # the older key
])
def test_rope_scaling_is_read_as_llama_cpp_reads_it(factory_models, tmp_path, kv):
    agrees_with_llama_cpp(edited(factory_models[SPM], tmp_path / "rope.gguf", set_kv=kv))


def test_without_its_type_a_rope_factor_still_changes_the_logits(factory_models, tmp_path):
    """(So the test above would fail if the factor were ignored.)"""
    plain = LlamaModel(GGUFFileLoader(factory_models[SPM]))
    scaled = LlamaModel(GGUFFileLoader(edited(factory_models[SPM], tmp_path / "rope.gguf",
                                              set_kv={"llama.rope.scaling.factor": 4.0})))
    a = plain.forward(np.array(TOKENS), plain.new_cache(64), all_logits=True)
    b = scaled.forward(np.array(TOKENS), scaled.new_cache(64), all_logits=True)
    assert np.abs(a - b).max() > 0.1


@pytest.mark.parametrize("edit, needles", [
    (dict(set_kv={"llama.rope.dimension_count": 8}), ("llama.rope.dimension_count", "whole heads")),
    (dict(drop_kv={"llama.attention.layer_norm_rms_epsilon"}), ("llama.attention.layer_norm_rms_epsilon", "missing")),
    (dict(drop_kv={"llama.context_length"}), ("llama.context_length", "missing")),
    (dict(set_kv={"llama.vocab_size": 520}, add_tensors={"token_embd.weight": np.ones((520, 96), np.float32)}),
     ("token_embd.weight", "(520, 96)")),
    (dict(add_tensors={"rope_freqs.weight": np.ones(1, np.float32)}), ("rope_freqs.weight", "shape")),
    (dict(add_tensors={"rope_freqs.weight": np.ones(4, np.float32)}), ("rope_freqs.weight", "shape")),
])
def test_files_llama_cpp_refuses_are_refused_in_one_line(factory_models, tmp_path, edit, needles):
    """The engine ran these with defaults of its own (partial rotation, eps 1e-5, context 2048), or
    crashed later (a padded vocabulary sampled a token it has no text for; a short rope_freqs)."""
    path = edited(factory_models[SPM], tmp_path / "bad.gguf", **edit)
    refused(path, *needles)
    with pytest.raises(Exception):  # the reference agrees that the file is bad
        load_llama(path, n_ctx=64)


def test_rope_freqs_of_the_right_length_still_agree(factory_models, tmp_path):
    factors = np.linspace(1.0, 8.0, 8).astype(np.float32)  # head_dim 16 -> 8 factors
    agrees_with_llama_cpp(edited(factory_models[SPM], tmp_path / "freqs.gguf",
                                 add_tensors={"rope_freqs.weight": factors}))


# -- the tokenizer --------------------------------------------------------------------------------
EXTRA_WORDS = ["Ġzebra", "quokka", "Ġxylophone"]  # whole tokens that no merge builds, as in LLaMA-3's vocabulary
TEXTS = ["a zebra", "quokka", "the xylophone and a zebra", "zebra", 'say "hi" ... done?', "12345 + 678 = 13023",
         "¿qué? ¡sí! 1,000,000", "a|b^c~d<e>f=g$h+i", "٣٤٥ and １２３", "tab\tquokka\n\nnew"]


def bpe_variant(factory_models, tmp_path, pre: str | None, drop=(), **kv):
    """The factory's BPE model with another pre-tokenizer, three whole-word tokens more, ``kv`` set
    and the keys ``drop`` removed."""
    tokens, _, types = bpe_vocab(512)
    set_kv = {"tokenizer.ggml.tokens": tokens + EXTRA_WORDS, "tokenizer.ggml.token_type": types + [1, 1, 1],
              "llama.vocab_size": len(tokens) + len(EXTRA_WORDS), **kv}
    drop = set(drop)
    if pre is None:
        drop.add("tokenizer.ggml.pre")
    else:
        set_kv["tokenizer.ggml.pre"] = pre
    return edited(factory_models["q8_0-bpe-mha-tied"], tmp_path / f"tok-{pre}.gguf", set_kv=set_kv, drop_kv=drop)


def same_tokens_as_llama_cpp(path) -> Tokenizer:
    tok = Tokenizer(GGUFFileLoader(path).metadata)
    llm = load_llama(path, vocab_only=True)
    texts = TEXTS + corpus()
    mismatches = [(t, ref, ours) for t in texts
                  if (ref := llm.tokenize(t.encode(), add_bos=True, special=True)) != (ours := tok.encode(t))]
    assert not mismatches, (len(mismatches), mismatches[:3])
    return tok


@pytest.mark.parametrize("pre", ["llama3", "llama-bpe", "default", None, "gpt-2", "smollm"])
def test_pre_tokenizers_follow_llama_cpp(factory_models, tmp_path, pre):
    """llama3's family takes a word that is one token whole (ignore_merges) and adds BOS unless the
    file says otherwise; "default" (also for a file without the key) is four regexes in turn, not
    GPT-2's one. (The factory's file says add_bos_token false: removed, so each default shows.)"""
    tok = same_tokens_as_llama_cpp(bpe_variant(factory_models, tmp_path, pre, drop={"tokenizer.ggml.add_bos_token"}))
    if pre in ("llama3", "llama-bpe"):
        assert tok.add_bos and tok.encode("quokka", add_special=False) == [tok.tokens.index("quokka")]


@pytest.mark.parametrize("kv", [{"tokenizer.ggml.add_eos_token": True},
                                {"tokenizer.ggml.add_eos_token": True, "tokenizer.ggml.add_bos_token": True},
                                {"tokenizer.ggml.pre": "llama3", "tokenizer.ggml.add_bos_token": False}])
def test_special_token_flags_follow_llama_cpp(factory_models, tmp_path, kv):
    tok = same_tokens_as_llama_cpp(bpe_variant(factory_models, tmp_path, "smollm", **kv))
    if kv.get("tokenizer.ggml.add_eos_token"):
        assert tok.encode("hi")[-1] == tok.eos_id and tok.encode("hi", add_special=False)[-1] != tok.eos_id


def test_unused_sentencepiece_pieces_are_merged_into_as_llama_cpp_does(factory_models, tmp_path):
    """llama.cpp's SPM tokenizer merges into any piece of the vocabulary; SentencePiece never produces
    an UNUSED one, so marking pieces UNUSED gave other ids for 78 of 240 strings."""
    from models.factory import spm_vocab

    tokens, _, types = spm_vocab(512)
    unused = [i for i, t in enumerate(tokens) if types[i] == 1 and len(t) > 2][:20]
    types = [5 if i in unused else t for i, t in enumerate(types)]
    tok = same_tokens_as_llama_cpp(edited(factory_models["q8_0-spm-gqa"], tmp_path / "unused.gguf",
                                          set_kv={"tokenizer.ggml.token_type": types}))
    assert set(unused) & set(tok.encode(" ".join(corpus())))  # (they are produced, so the check means something)


def test_add_eos_for_sentencepiece_too(factory_models, tmp_path):
    path = edited(factory_models["q8_0-spm-gqa"], tmp_path / "eos.gguf", set_kv={"tokenizer.ggml.add_eos_token": True})
    tok = same_tokens_as_llama_cpp(path)
    assert tok.encode("x")[-1] == tok.eos_id == 2
