"""Chat prompts: the model's own Jinja template when it has one, else a named template.

Named templates cover the families users meet: ChatML, Llama 2, Llama 3, Mistral, Gemma,
Alpaca and Zephyr (TinyLlama's ``<|system|> ... </s>`` form). Without a template in the model we
guess from the special tokens in its vocabulary, falling back to ChatML.
"""

from __future__ import annotations

import sys
import time

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from common.errors import UserError

NAMED_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "llama2": (
        "{% if messages[0].role == 'system' %}{% set sys = '<<SYS>>\n' + messages[0].content + '\n<</SYS>>\n\n' %}"
        "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
        "{% for m in messages %}{% if m.role == 'user' %}{{ bos_token }}[INST] {% if loop.first %}{{ sys }}{% endif %}"
        "{{ m.content }} [/INST]{% else %} {{ m.content }} {{ eos_token }}{% endif %}{% endfor %}"),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
        "{{ m.content | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "mistral": (
        "{{ bos_token }}{% set sys = '' %}{% if messages[0].role == 'system' %}{% set sys = messages[0].content + '\n\n' %}"
        "{% set messages = messages[1:] %}{% endif %}{% for m in messages %}{% if m.role == 'user' %}"
        "[INST] {% if loop.first %}{{ sys }}{% endif %}{{ m.content }}[/INST]{% else %}{{ m.content }}{{ eos_token }}"
        "{% endif %}{% endfor %}"),
    "gemma": (
        "{{ bos_token }}{% set sys = '' %}{% if messages[0].role == 'system' %}{% set sys = messages[0].content + '\n\n' %}"
        "{% set messages = messages[1:] %}{% endif %}{% for m in messages %}<start_of_turn>"
        "{{ 'model' if m.role == 'assistant' else 'user' }}\n{% if loop.first %}{{ sys }}{% endif %}{{ m.content | trim }}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
    "alpaca": (
        "{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}\n\n{% elif m.role == 'user' %}"
        "### Instruction:\n{{ m.content }}\n\n{% else %}### Response:\n{{ m.content }}\n\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Response:\n{% endif %}"),
    "zephyr": (
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
}
STOPS = {"alpaca": ["### Instruction:"], "llama2": ["[INST]"], "mistral": ["[INST]"]}

# Special tokens that give a family away, checked in this order.
_SIGNATURES = [("<|start_header_id|>", "llama3"), ("<|im_start|>", "chatml"), ("<start_of_turn>", "gemma"),
               ("<|assistant|>", "zephyr"), ("[INST]", "mistral")]


def detect_template(tokens: list[str]) -> str:
    vocab = set(tokens)
    for marker, name in _SIGNATURES:
        if marker in vocab:
            return name
    return "chatml"


def _raise(message):
    raise TemplateError(message)


RENDER_SECONDS = 2.0        # a chat template renders in milliseconds; one that runs longer loops on purpose
MAX_RENDERED = 16 * 2**20   # characters of prompt: far beyond any context window
MAX_BUILT = 2**20           # characters (or items) one * may build: 'a' * 3000000000 took gigabytes


class _TemplateBudget(Exception):
    """A chat template past its time or size budget."""


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox (no Python internals, no mutation), with * and ** bounded: a model's template is
    input from whoever made the file."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if hasattr(seq, "__len__") and isinstance(n, int) and len(seq) * n > MAX_BUILT:
                    raise _TemplateBudget(f"it builds more than {MAX_BUILT} characters with *")
        elif operator == "**" and isinstance(right, int) and abs(right) > 1024:
            raise _TemplateBudget("it raises a number to a power above 1024")
        return super().call_binop(context, operator, left, right)


def render(template: str, messages: list[dict], bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = True) -> str:
    """The template rendered in the sandbox, within RENDER_SECONDS and MAX_RENDERED characters;
    any failure of the template (its own raise_exception, a type error, a loop past the budget)
    is one UserError line."""
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    deadline = time.monotonic() + RENDER_SECONDS

    def tracer(frame, event, arg):  # (Jinja compiles to Python: its loops are Python lines)
        if time.monotonic() > deadline:
            raise _TemplateBudget(f"it ran past {RENDER_SECONDS:g} s")
        return tracer

    previous = sys.gettrace()
    try:
        compiled = env.from_string(template)
        pieces, size = [], 0
        sys.settrace(tracer)
        try:
            for piece in compiled.generate(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                           add_generation_prompt=add_generation_prompt):
                size += len(piece)
                if size > MAX_RENDERED:
                    raise _TemplateBudget(f"its output passed {MAX_RENDERED} characters")
                pieces.append(piece)
        finally:
            sys.settrace(previous)
        return "".join(pieces)
    except (TemplateError, _TemplateBudget) as e:
        message = str(e)
    except RecursionError:
        message = "it recurses too deeply"
    except (ArithmeticError, TypeError, ValueError, LookupError, AttributeError, MemoryError) as e:
        message = f"{type(e).__name__}: {e}"
    raise UserError("chat template failed: " + " ".join(message.split()))


def chat_prompt(tokenizer, user: str, system: str | None = None, template: str | None = None) -> tuple[str, str]:
    """(prompt text, template name used) for one user message. ``template`` None: the model's own,
    else detected."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return render_messages(tokenizer, messages, template)


def render_messages(tokenizer, messages: list[dict], template: str | None = None,
                    add_generation_prompt: bool = True) -> tuple[str, str]:
    """(prompt text, template name used) for a whole conversation: [{"role", "content"}, ...]."""
    bos = tokenizer.tokens[tokenizer.bos_id] if tokenizer.bos_id is not None else ""
    eos = tokenizer.tokens[tokenizer.eos_id] if tokenizer.eos_id is not None else ""
    if template is None and tokenizer.chat_template:
        text, name = render(tokenizer.chat_template, messages, bos, eos, add_generation_prompt), "model"
    else:
        name = template or detect_template(tokenizer.tokens)
        if name not in NAMED_TEMPLATES:
            raise UserError(f"unknown template {name!r} (choose from: {', '.join(sorted(NAMED_TEMPLATES))})")
        text = render(NAMED_TEMPLATES[name], messages, bos, eos, add_generation_prompt)
    # The tokenizer adds BOS itself when the model asks for it: do not send it twice.
    if bos and tokenizer.add_bos and text.startswith(bos):
        text = text[len(bos):]
    return text, name
