"""Validation's own text: varied English prose, code and examples (Python documentation, PSF
license), independent of the test-model factory, for teacher-forced positions and speed prompts."""

from __future__ import annotations

from pathlib import Path

from common.errors import UserError

CORPUS = Path(__file__).parent / "data" / "corpus.txt"


def corpus_text() -> str:
    return CORPUS.read_text(encoding="utf-8")


def corpus_prompt(tokenizer, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` tokens of the corpus (UserError if the corpus is shorter)."""
    text = corpus_text()
    prompt = tokenizer.encode(text[: n_tokens * 12])[:n_tokens]
    if len(prompt) < n_tokens:
        raise UserError(f"could only make a {len(prompt)}-token prompt from {CORPUS}")
    return prompt
