"""What generation needs from a model, wherever its blocks run: a tokenizer, sessions, a description.

The command-line layer builds a ``TextModel`` from any source (a store, a .gguf, http://, p2p://, a
distributed route); `infer`, `chat` and the API use only this, so none of them knows where the weights
came from or where the blocks run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from engine.chat import STOPS, render_messages
from engine.session import Session
from engine.tokenizer import Tokenizer


@dataclass
class TextModel:
    name: str                                   # shown to users and as the API's model id
    tokenizer: Tokenizer
    context_length: int                         # the most positions a session may hold
    open_session: Callable[[int], Session]      # max positions -> a fresh session
    info: dict = field(default_factory=dict)    # architecture, quantization, fragments, source, route...
    template: str | None = None                 # a named chat template, or None for the model's own

    def chat_prompt(self, messages: list[dict], template: str | None = None) -> tuple[list[int], list[str]]:
        """Token ids of a conversation rendered with the chat template, and the template's stop strings."""
        text, used = render_messages(self.tokenizer, messages, template or self.template)
        return self.tokenizer.encode(text), list(STOPS.get(used, []))

    def raw_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)
