"""Our tokenizers give llama.cpp's token ids (llama-cpp-python, vocab_only) on a varied corpus."""

import random
import threading
import time

import pytest

from distribution.gguf_file import GGUFFileLoader
from engine.tokenizer import LONG_PIECE, Tokenizer
from validation.reference import load_llama

BASE = [
    "", " ", "  ", "\n", "\n\n", "\t", "a", "A", "Hello world", " leading space", "trailing space ",
    "The quick brown fox jumps over the lazy dog.", "What is the capital of France?",
    "don't you'll we've I'm they'd she's", "DON'T WE'LL", "1", "12", "123", "1234567890", "3.14159",
    "2026-11-22T12:00:00Z", "0x1F 0b1010 1e-5", "$100.00 and 50%", "a+b=c; x*y/z", "((nested)) [brackets] {braces}",
    "café naïve résumé Zürich", "Ελληνικά κείμενο", "русский текст", "日本語のテキスト", "中文文本测试",
    "한국어 텍스트", "العربية", "हिन्दी", "עברית", "ไทย", "🙂", "🚀🌍", "👍🏽", "❤️", "🧪 test 🧪",
    "👨‍👩‍👧‍👦 family", "def f(x):\n    return x ** 2", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<html><body>Hi</body></html>", '{"key": [1, 2, 3], "nested": {"a": null}}', "SELECT * FROM t WHERE x = 1;",
    "#!/usr/bin/env bash\necho $HOME", "   indented\n\tlines\n  ", "multiple     spaces", "tabs\t\tand\tspaces",
    "line1\r\nline2\r\n", "ALLCAPS words", "camelCaseWords and snake_case_words", "e-mail: someone@example.com",
    "https://example.com/path?q=1&r=2#frag", "a\u00a0non-breaking space", "zero\u200bwidth", "combining é (e\u0301)",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>", "text<|im_end|>more",
    "<s>", "</s>", "<unk>", "<|endoftext|>", "fake <|im_star|> token", "<<SYS>> [INST] tags [/INST]",
    "..." , "?!?!", "----", "____", "~~~~", "...and so on", "\"quoted\" 'single'", "back\\slash",
]


def corpus() -> list[str]:
    rng = random.Random(1234)
    words = ("the of and to in is you that it he was for on are as with his they I at be this have from or one had by "
             "word but not what all were we when your can said there use an each which she do how their if will up "
             "42 7 1999 3.5 café 日本 🙂 <|im_start|> \n \t").split(" ")
    out = list(BASE)
    while len(out) < 240:
        n = rng.randint(1, 14)
        sep = rng.choice([" ", "  ", "", "\n", " \n", "\t"])
        out.append(sep.join(rng.choice(words) for _ in range(n)))
    # pieces over LONG_PIECE characters take the tokenizer's other call (engine/tokenizer.py, _bpe_ids)
    out += [" ".join(out[:200]), "\n".join(out) * 2]
    assert max(map(len, out)) > 2 * LONG_PIECE
    return out


def check_against_llama_cpp(path):
    tok = Tokenizer(GGUFFileLoader(path).metadata)
    llm = load_llama(path, vocab_only=True)
    texts = corpus()
    assert len(texts) >= 200
    mismatches = []
    for text in texts:
        ref = llm.tokenize(text.encode(), add_bos=True, special=True)  # (add_special: BOS, EOS as the file says)
        ours = tok.encode(text)
        if ref != ours:
            mismatches.append((text, ref, ours))
    assert not mismatches, mismatches[:3]


def test_sentencepiece_vocabulary(factory_models):
    check_against_llama_cpp(factory_models["q8_0-spm-gqa"])


def test_gpt2_bpe_vocabulary(factory_models):
    check_against_llama_cpp(factory_models["q8_0-bpe-mha-tied"])


def test_default_model_vocabulary(default_gguf):
    check_against_llama_cpp(default_gguf)


def test_special_tokens_become_ids(default_gguf):
    tok = Tokenizer(GGUFFileLoader(default_gguf).metadata)
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.tokens.index("<|im_start|>") and ids[-1] == tok.tokens.index("<|im_end|>")
    assert tok.tokens.index("<|im_end|>") in tok.eog_ids


@pytest.mark.parametrize("model", ["q8_0-spm-gqa", "q8_0-bpe-mha-tied"])
def test_stream_decoder_never_splits_a_character(factory_models, model):
    tok = Tokenizer(GGUFFileLoader(factory_models[model]).metadata)
    text = "emoji 🙂🚀 and 日本語 and café"
    ids = tok.encode(text, add_special=False)
    multi_byte_tokens = [t for t in ids if len(tok.token_bytes(t)) and not tok.token_bytes(t).decode("utf-8", "ignore")]
    assert multi_byte_tokens, "the test text must split some character across tokens"
    decoder = tok.stream_decoder()
    pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces).strip() == text
    assert tok.decode(ids).strip() == text


def test_unsupported_tokenizer_is_a_clear_error():
    from common.errors import UserError

    with pytest.raises(UserError, match="tokenizer 'bert' is not supported"):
        Tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "m.gguf")
    with pytest.raises(UserError, match="pre-tokenizer 'klingon'"):
        Tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": [],
                   "tokenizer.ggml.pre": "klingon"}, "m.gguf")


def test_piece_bytes_are_built_before_the_first_token_is_timed(default_gguf):
    """Every token's bytes: byte-level BPE text mapped back character by character (the plain
    definition, GPT-2's map), control tokens empty. The table is built when a stream decoder is
    made (before generation starts its clocks), not at the first token pushed."""
    from engine.tokenizer import _UNICODE_TO_BYTE, TokenType

    tok = Tokenizer(GGUFFileLoader(default_gguf).metadata)
    assert tok.kind == "gpt2" and "_piece_bytes" not in tok.__dict__
    tok.stream_decoder()
    assert "_piece_bytes" in tok.__dict__
    for i, (text, kind) in enumerate(zip(tok.tokens, tok.types)):
        if kind == TokenType.NORMAL:
            expected = (bytes(_UNICODE_TO_BYTE[c] for c in text) if all(c in _UNICODE_TO_BYTE for c in text)
                        else text.encode())
        elif kind == TokenType.CONTROL:
            expected = b""
        else:
            continue
        assert tok.token_bytes(i) == expected, (i, text)


@pytest.mark.parametrize("key, value, needle", [
    ("tokenizer.ggml.bos_token_id", 10**6, "bos_token_id 1000000 is not a token of its"),
    ("tokenizer.ggml.eos_token_id", -1, "eos_token_id -1 is not a token of its"),
    ("tokenizer.ggml.eot_token_id", "2", "eot_token_id '2' is not a token"),
    ("tokenizer.ggml.tokens", None, "tokenizer.ggml.tokens is missing or not a list of strings"),
    ("tokenizer.ggml.token_type", [1, 1], "token_type has 2 entries for"),
])
def test_bad_tokenizer_metadata_is_one_line(factory_models, key, value, needle):
    """A BOS/EOS id past the vocabulary was an IndexError when the chat template ran; missing tokens a KeyError."""
    from common.errors import UserError

    md = dict(GGUFFileLoader(factory_models["q8_0-spm-gqa"]).metadata)
    if value is None:
        del md[key]
    else:
        md[key] = value
    with pytest.raises(UserError, match="m.gguf: metadata .*" + needle):
        Tokenizer(md, "m.gguf")


def test_a_long_prompt_is_tokenized_without_holding_the_interpreter(default_gguf):
    """A server tokenizes on a worker thread so that its model thread and event loop go on; with
    `tokenizers`' encode() they stood still until a 640K-character prompt was done (0.4 s here, each
    time: a client sending such prompts slowed everyone's tokens a thousandfold). While the long
    encode runs, this thread must get to run again and again; holding the lock, it got one turn."""
    tok = Tokenizer(GGUFFileLoader(default_gguf).metadata)
    text = "The capital of France is Paris. " * 20_000
    done, ids = threading.Event(), []
    worker = threading.Thread(target=lambda: (ids.append(tok.encode(text)), done.set()))
    turns = 0
    worker.start()
    while not done.is_set():
        time.sleep(0.0005)
        turns += 1
    worker.join()
    assert len(ids[0]) > 100_000
    assert turns >= 5, f"this thread ran {turns} times during the encode"
