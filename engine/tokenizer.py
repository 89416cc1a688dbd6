"""Tokenizers built from GGUF metadata alone, token-for-token equal to llama.cpp's.

* ``tokenizer.ggml.model = llama``: SentencePiece. We build a SentencePiece model proto from the
  GGUF vocabulary (pieces, scores, types) and let the sentencepiece library encode.
* ``tokenizer.ggml.model = gpt2``: byte-level BPE, with the pre-tokenizer that
  ``tokenizer.ggml.pre`` names, run by the `tokenizers` library.

Around both, the rules llama.cpp adds (llama-vocab.cpp): the text is first split on special tokens
(control, user-defined and unknown tokens, longest first); for SentencePiece a space is prefixed to
each text run that starts the prompt or follows a special token; BOS per metadata.

Decoding works on bytes, so a streaming decoder can hold back a character split across tokens.
"""

from __future__ import annotations

import codecs
import numbers
import re
from functools import cached_property
from typing import Any, Iterable

from gguf.constants import TokenType

from common.errors import UserError

SPECIAL_TYPES = (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

# Pre-tokenizer regexes, as llama.cpp's llm_tokenizer_bpe lists them per tokenizer.ggml.pre.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    # (also for a file without tokenizer.ggml.pre, as llama.cpp does)
    "default": [r"[\p{P}\$\+<=>\^~\|]+", "gpt2", r"\p{N}+", "[0-9][0-9][0-9]"],
    "gpt-2": ["gpt2"],
    "smollm": [r"\p{N}", "gpt2"],
    "starcoder": [r"\p{N}", "gpt2"],
    "refact": [r"\p{N}", "gpt2"],
    "llama3": [_LLAMA3_REGEX],
    "llama-bpe": [_LLAMA3_REGEX],
    "llama-v3": [_LLAMA3_REGEX],
}
# llama.cpp's LLaMA-3 family: a word that is one token of the vocabulary is that token, whatever
# the merges would build (ignore_merges), and BOS is added unless the metadata says otherwise.
LLAMA3_FAMILY = ("llama3", "llama-bpe", "llama-v3")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE token text)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


LONG_PIECE = 4096  # characters: above it, BPE encodes without holding the interpreter's lock (_bpe_ids)
_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}
# The same map for str.translate (each character to the one whose code is its byte), and its domain:
# a token's text all in the domain becomes its bytes in two C calls, not a Python loop per character.
_TO_LATIN1 = {ord(c): b for c, b in _UNICODE_TO_BYTE.items()}
_BYTE_LEVEL_CHARS = frozenset(_UNICODE_TO_BYTE)


class Tokenizer:
    def __init__(self, md: dict[str, Any], where: str = "model"):
        self.where = where
        self.kind = md.get("tokenizer.ggml.model")
        if self.kind not in ("llama", "gpt2"):
            raise UserError(f"{where}: tokenizer {self.kind!r} is not supported (llama or gpt2)")
        tokens = md.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise UserError(f"{where}: metadata tokenizer.ggml.tokens is missing or not a list of strings")
        self.tokens: list[str] = tokens
        types = md.get("tokenizer.ggml.token_type")
        self.types = [int(t) for t in types] if types is not None else [int(TokenType.NORMAL)] * len(self.tokens)
        if len(self.types) != len(self.tokens):
            raise UserError(f"{where}: metadata tokenizer.ggml.token_type has {len(self.types)} entries for "
                            f"{len(self.tokens)} tokens")
        self.bos_id = self._token_id(md, "bos")
        self.eos_id = self._token_id(md, "eos")
        self.eot_id = self._token_id(md, "eot")
        pre = md.get("tokenizer.ggml.pre", "default")
        default_bos = self.kind == "llama" or pre in LLAMA3_FAMILY
        self.add_bos = bool(md.get("tokenizer.ggml.add_bos_token", default_bos)) and self.bos_id is not None
        self.add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False)) and self.eos_id is not None
        self.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", self.kind == "llama"))
        self.chat_template = md.get("tokenizer.chat_template")
        self.special = sorted((i for i, t in enumerate(self.types) if t in SPECIAL_TYPES),
                              key=lambda i: -len(self.tokens[i].encode()))
        self._special_by_text = {self.tokens[i]: i for i in self.special}
        self._special_re = (re.compile("|".join(re.escape(self.tokens[i]) for i in self.special if self.tokens[i]))
                            if self.special else None)
        if self.kind == "llama":
            self._sp = _sentencepiece_from_vocab(self.tokens, md.get("tokenizer.ggml.scores"), self.types)
        else:
            self._bpe = _bpe_from_vocab(self.tokens, md.get("tokenizer.ggml.merges"), pre, where)

    def _token_id(self, md: dict[str, Any], which: str) -> int | None:
        """tokenizer.ggml.<which>_token_id: None, or a token of the vocabulary (else one line)."""
        value = md.get(f"tokenizer.ggml.{which}_token_id")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < len(self.tokens):
            raise UserError(f"{self.where}: metadata tokenizer.ggml.{which}_token_id {value!r:.40} is not a token "
                            f"of its {len(self.tokens)}-token vocabulary")
        return int(value)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @cached_property
    def eog_ids(self) -> frozenset[int]:
        """Tokens that end generation: EOS, EOT, and chat turn ends the vocabulary defines."""
        ids = {i for i in (self.eos_id, self.eot_id) if i is not None}
        for text in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|end|>"):
            i = self._special_by_text.get(text)
            if i is not None:
                ids.add(i)
        return frozenset(ids)

    # -- encoding ---------------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special``, BOS and EOS around them where the metadata asks
        (llama.cpp's add_special: a continuation of a conversation passes False)."""
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)
        prev_special = True
        for piece, special_id in self._partition(text, parse_special):
            if special_id is not None:
                out.append(special_id)
                prev_special = True
                continue
            if self.kind == "llama":
                if self.add_space_prefix and prev_special:
                    piece = " " + piece
                out.extend(self._sp.encode(piece))
            else:
                out.extend(self._bpe_ids(piece))
            prev_special = False
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out

    def _bpe_ids(self, piece: str) -> list[int]:
        # `tokenizers` holds the interpreter's lock through encode() but releases it in
        # encode_batch() (same ids): a long prompt tokenized on a server's worker thread then no
        # longer stalls the model's thread and the event loop (a 640K-character prompt held them
        # 0.4 s each time; tests/engine/test_tokenizer_threads.py). Short pieces skip the batch's
        # hand-over to the library's thread pool.
        if len(piece) < LONG_PIECE:
            return self._bpe.encode(piece, add_special_tokens=False).ids
        return self._bpe.encode_batch([piece], add_special_tokens=False)[0].ids

    def _partition(self, text: str, parse_special: bool) -> Iterable[tuple[str, int | None]]:
        """Split text into (run, None) and (token text, special id), longest special token first."""
        if self._special_re is None:
            if text:
                yield text, None
            return
        pos = 0
        for m in self._special_re.finditer(text):
            sid = self._special_by_text[m.group(0)]
            if not parse_special and self.types[sid] != TokenType.USER_DEFINED:
                continue
            if m.start() > pos:
                yield text[pos:m.start()], None
            yield m.group(0), sid
            pos = m.end()
        if pos < len(text):
            yield text[pos:], None

    # -- decoding ---------------------------------------------------------------------------------
    @cached_property
    def _piece_bytes(self) -> list[bytes]:
        """What each token prints, as llama.cpp's token_to_piece (special tokens print nothing)."""
        out = []
        for text, t in zip(self.tokens, self.types):
            if t in (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.UNUSED):
                out.append(b"")
            elif t == TokenType.USER_DEFINED:
                out.append(text.encode())
            elif t == TokenType.BYTE:
                m = _BYTE_PIECE.match(text)
                out.append(bytes([int(m.group(1), 16)]) if m else b"")
            elif self.kind == "llama":
                out.append(text.replace("\u2581", " ").encode())
            else:
                out.append(text.translate(_TO_LATIN1).encode("latin-1") if _BYTE_LEVEL_CHARS.issuperset(text)
                           else text.encode())
        return out

    def token_bytes(self, token: int) -> bytes:
        return self._piece_bytes[token]

    def decode(self, tokens: Iterable[int]) -> str:
        return b"".join(self._piece_bytes[t] for t in tokens).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns tokens into text as they come, never emitting half of a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        tokenizer._piece_bytes  # built now (tens of ms, once per tokenizer), not inside the first token's time
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)




def _sentencepiece_from_vocab(tokens: list[str], scores, types: list[int]):
    """A SentencePiece BPE processor equal to llama.cpp's SPM tokenizer on this vocabulary."""
    import sentencepiece as spm

    from engine.sp_proto import model_proto_class

    proto = model_proto_class()()
    proto.trainer_spec.model_type = 2  # BPE: llama.cpp's SPM tokenizer merges by score, as BPE does
    proto.trainer_spec.vocab_size = len(tokens)
    proto.trainer_spec.byte_fallback = any(t == TokenType.BYTE for t in types)
    proto.trainer_spec.unk_id = next((i for i, t in enumerate(types) if t == TokenType.UNKNOWN), 0)
    # llama.cpp adds the leading space itself (only at the start and after special tokens).
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    # GGUF token types share SentencePiece's numbers; UNUSED pieces are NORMAL here, since llama.cpp
    # merges into any piece of the vocabulary (SentencePiece would never produce an UNUSED one)
    known = {int(t) for t in (TokenType.NORMAL, TokenType.UNKNOWN, TokenType.CONTROL, TokenType.USER_DEFINED,
                              TokenType.BYTE)}
    for i, (text, t) in enumerate(zip(tokens, types)):
        piece = proto.pieces.add()
        piece.piece = text
        piece.score = float(scores[i]) if scores is not None else 0.0
        piece.type = int(t) if int(t) in known else int(TokenType.NORMAL)
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def _bpe_from_vocab(tokens: list[str], merges, pre: str, where: str):
    from tokenizers import AddedToken, Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    if merges is None:
        raise UserError(f"{where}: gpt2 tokenizer without tokenizer.ggml.merges")
    if not isinstance(pre, str) or pre not in PRE_TOKENIZERS:
        raise UserError(f"{where}: pre-tokenizer {pre!r} is not supported "
                        f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                                 ignore_merges=pre in LLAMA3_FAMILY))
    steps = []
    rules = PRE_TOKENIZERS[pre]
    for i, rule in enumerate(rules):
        if rule == "gpt2" and i == len(rules) - 1:  # the split and the byte mapping in one step
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        else:  # (bytes are mapped only after the last split: a later \p{N} must see the text's digits)
            steps.append(pre_tokenizers.Split(Regex(_GPT2_REGEX if rule == "gpt2" else rule), behavior="isolated"))
    if PRE_TOKENIZERS[pre][-1] != "gpt2":
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok
