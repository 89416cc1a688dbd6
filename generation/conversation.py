"""A multi-turn conversation over one ``Session``: each turn prefills only what the cache lacks.

The conversation keeps its messages and exactly which tokens the session's KV cache holds. A new
turn renders the whole conversation with the chat template (templates are not always append-only,
and a re-tokenized answer may differ from the generated tokens), finds the longest common token
prefix with the cache, rewinds the session there and feeds only the rest:

    cached:   [sys ... user1 ... answer1 tokens]
    rendered: [sys ... user1 ... answer1 tokens <end> user2 ... <assistant>]
                                               ^ common prefix: rewind here, feed the rest

Used by `chat` and the API alike, so it holds no terminal code. A conversation saved to JSON
(messages, system, template) continues in a new process with the same context: the first turn
there prefills the whole history once.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Iterator

from common.errors import UserError
from common.files import output_target, read_regular
from engine.chat import NAMED_TEMPLATES
from generation.sampling import Sampler, SamplingParams
from generation.stream import Generation, GenerationResult

FORMAT = "gguf-fragments-conversation"
VERSION = 1


class ContextFull(UserError):
    """The conversation no longer fits the session's context window."""


@dataclass
class TurnStats:
    """What the last turn cost: how much of the prompt the cache already held, and the speeds."""
    prompt_tokens: int       # the whole conversation as rendered for this turn
    processed: int           # of those, fed to the session this turn (the rest came from the cache)
    generated: int
    prefill_s: float
    decode_s: float
    stop_reason: str
    decode_steps: int = 0  # tokens fed after the prompt (GenerationResult.decode_steps)

    @property
    def reused(self) -> int:
        return self.prompt_tokens - self.processed

    @property
    def prefill_tok_s(self) -> float:
        return self.processed / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s and self.decode_steps else 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Turn:
    """One answer in progress: iterate for text pieces; the conversation is updated when it ends."""

    def __init__(self, conversation: "Conversation", user: str, generation: Generation, reused: int):
        self.conversation = conversation
        self.user = user
        self.generation = generation
        self.reused = reused
        self.done = False

    @property
    def result(self) -> GenerationResult:
        return self.generation.result

    def __iter__(self) -> Iterator[str]:
        if self.done:
            raise RuntimeError("this turn has already run")
        self.done = True
        try:
            yield from self.generation
        except BaseException:
            # Failed or abandoned mid-stream: the cache may hold part of a feed, so trust none of it,
            # and the exchange is not recorded.
            self.conversation._forget_cache()
            raise
        self.conversation._finish(self)


class Conversation:
    """Messages plus one session whose cache holds a known prefix of their rendering."""

    def __init__(self, model, max_positions: int | None = None, system: str | None = None,
                 template: str | None = None):
        self.model = model  # a generation.TextModel
        self.capacity = min(max_positions or model.context_length, model.context_length)
        self.session = model.open_session(self.capacity)
        self.capacity = self.session.capacity
        self.system = system or None
        self.template = template
        self.messages: list[dict] = []   # user and assistant turns, in order
        self.cached: list[int] = []      # exactly the tokens the session's cache holds
        self.last: TurnStats | None = None
        self.generated_total = 0

    # -- state ------------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        """Positions of the context window in use."""
        return self.session.position

    def all_messages(self, user: str | None = None) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user}] if user is not None else []
        return head + self.messages + tail

    def clear(self) -> None:
        self.messages = []
        self.last = None
        self.generated_total = 0  # (/stats after /clear counted the old conversation's tokens)
        self._forget_cache()

    def set_system(self, text: str | None) -> None:
        """A new system message; the next turn re-renders (and so re-feeds) from where it changed."""
        self.system = text or None

    def close(self) -> None:
        self.session.close()

    # -- a turn -----------------------------------------------------------------------------------
    def ask(self, user: str, sampling: SamplingParams, max_tokens: int, stop: list[str] | None = None,
            cancel: threading.Event | None = None) -> Turn:
        """Start the answer to ``user``; iterate the returned ``Turn`` for its text.

        Raises ``ContextFull`` when the conversation with this message no longer fits the context.
        One turn at a time: run a turn to its end (or cancel it) before asking the next.
        """
        tokens, stops = self.model.chat_prompt(self.all_messages(user), self.template)
        if len(tokens) >= self.capacity:
            raise ContextFull(f"the conversation is {len(tokens)} tokens with this message; the context "
                              f"window holds {self.capacity}")
        # Keep at least one token to feed: its logits choose the first answer token.
        keep = min(common_prefix(self.cached, tokens), len(tokens) - 1)
        self.session.rewind(keep)
        self.cached = self.cached[:keep]
        gen = Generation(self.session, self.model.tokenizer, tokens[keep:], max_tokens, Sampler(sampling),
                         list(stop or []) + stops, cancel, history=tokens[:keep])
        return Turn(self, user, gen, keep)

    def _finish(self, turn: Turn) -> None:
        gen, result = turn.generation, turn.generation.result
        if self.session.position == turn.reused + len(gen.fed):
            self.cached = self.cached + gen.fed
        else:
            self._forget_cache()
        self.messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": result.text}]
        self.last = TurnStats(prompt_tokens=turn.reused + len(result.prompt_tokens),
                              processed=len(result.prompt_tokens), generated=len(result.tokens),
                              prefill_s=result.prefill_s, decode_s=result.decode_s, stop_reason=result.stop_reason,
                              decode_steps=result.decode_steps)
        self.generated_total += len(result.tokens)

    def _forget_cache(self) -> None:
        self.session.rewind(0)
        self.cached = []

    # -- saving -----------------------------------------------------------------------------------
    def to_json(self, settings: dict | None = None) -> dict:
        return {"format": FORMAT, "version": VERSION, "model": self.model.name, "system": self.system,
                "template": self.template, "messages": self.messages, "settings": settings or {}}

    def save(self, path: str, settings: dict | None = None) -> None:
        """Write the conversation to ``path`` (a temporary name first, renamed when complete)."""
        data = json.dumps(self.to_json(settings), ensure_ascii=False, indent=1).encode("utf-8")
        path = str(output_target(path))  # (never renamed over a FIFO, a device, a symlink)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def load(self, path: str) -> dict:
        """Replace this conversation with the one saved in ``path``; returns its saved settings."""
        data = read_saved(path)
        self.clear()
        self.system = data["system"]
        self.template = data["template"] if data["template"] is not None else self.template
        self.messages = data["messages"]
        return data["settings"]


def _check_unicode(path: str, where: str, text: str) -> None:
    """JSON's escapes can carry a lone surrogate ("\\ud800"), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{path}: {where} is not valid Unicode text (a lone surrogate at character "
                        f"{e.start})") from None


def read_saved(path: str) -> dict:
    """A saved conversation, checked field by field; a bad file is one clear error naming it."""
    try:  # (a FIFO would block until a writer came, past Ctrl-C; /dev/zero would never end)
        raw = read_regular(path, 64 * 1024 * 1024)
    except OSError as e:
        raise UserError(f"{path}: {e.strerror or e}") from None
    if len(raw) > 64 * 1024 * 1024:
        raise UserError(f"{path}: larger than 64 MiB, not a saved conversation")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path}: not a saved conversation (invalid JSON: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path}: not a saved conversation (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise UserError(f"{path}: conversation format version {data.get('version')!r} is not supported "
                        f"(this program reads {VERSION})")
    system, template, settings = data.get("system"), data.get("template"), data.get("settings", {})
    messages = data.get("messages")
    if system is not None and not isinstance(system, str):
        raise UserError(f"{path}: \"system\" must be a string or null")
    if template is not None and template not in NAMED_TEMPLATES:
        raise UserError(f"{path}: \"template\" must be null (the model's own) or one of "
                        f"{', '.join(sorted(NAMED_TEMPLATES))}")
    if not isinstance(settings, dict):
        raise UserError(f"{path}: \"settings\" must be an object")
    if not isinstance(messages, list):
        raise UserError(f"{path}: \"messages\" must be a list")
    for i, m in enumerate(messages):
        if (not isinstance(m, dict) or m.get("role") not in ("user", "assistant")
                or not isinstance(m.get("content"), str)):
            raise UserError(f"{path}: messages[{i}] must be {{\"role\": \"user\" or \"assistant\", "
                            f"\"content\": string}}")
        _check_unicode(path, f"messages[{i}].content", m["content"])
    if system is not None:
        _check_unicode(path, "system", system)
    model = data.get("model")
    return {"system": system, "template": template, "settings": settings,
            "model": model if isinstance(model, str) else None,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
