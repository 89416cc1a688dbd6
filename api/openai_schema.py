"""OpenAI request bodies -> plain records, and OpenAI-shaped errors that name the field at fault.

Validation is strict about the fields we use and about fields we know but cannot honour (``n`` other
than 1, ``logprobs``, tools, penalties we do not implement): those are refused with a 400 naming the
field, so a client never silently gets something other than what it asked for. Fields we do not know
are ignored, as OpenAI's own API and llama-server do (clients send ``user``, ``metadata``, ``store``...).

Sampling defaults follow llama-server's: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05.
Ranges: temperature 0 (greedy) or in [0.01, 2]; repeat_penalty in [0.01, 100]; repeat_last_n >= -1
(llama-server's: 0 none, -1 the whole context; default 64); top_p in (0, 1]; min_p in [0, 1).
Text must be valid Unicode (no lone surrogates, which JSON's \ud800 escapes allow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from generation.sampling import SamplingParams

MAX_STOPS = 16


class APIError(Exception):
    """One error reply: HTTP status and OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
                415: "invalid_request_error", 503: "unavailable_error"}  # (any other 4xx is the client's too)


def bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


@dataclass
class Request:
    """What a completion needs, whichever endpoint it came through."""

    kind: str                              # "chat" | "completion"
    messages: list[dict] | None = None     # chat: [{"role", "content": str}]
    prompt: str | None = None              # completion: raw text
    max_tokens: int | None = None          # None: until the context is full
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False            # stream_options.include_usage: a last chunk with usage
    cache_prompt: bool = False             # llama-server's: reuse the slot's cache for a common prefix
    model: str | None = None


# -- field readers: each names its field in the error -----------------------------------------------
def _number(body: dict, name: str, default, lo=None, hi=None, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise bad(name, f"must be a finite number, got {_show(value)}", "invalid_type")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise bad(name, f"must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise bad(name, f"must be <= {hi}, got {value}")
    return float(value)


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _integer(body: dict, name: str, default, lo=None, hi=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"must be an integer, got {_show(value)}", "invalid_type")
    if lo is not None and value < lo:
        raise bad(name, f"must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise bad(name, f"must be <= {hi}, got {value}")
    return value


def _boolean(body: dict, name: str, default: bool = False, where: str = "") -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(where + name, f"must be true or false, got {_show(value)}", "invalid_type")
    return value


def _text(value: str, where: str) -> str:
    """A string the tokenizer can take: JSON can carry lone surrogates ("\ud800"), UTF-8 cannot."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(where, f"is not valid Unicode text (a lone surrogate at character {e.start})") from None
    return value


def _show(value) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _stops(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad("stop", "must be a string or a list of strings", "invalid_type")
    if len(value) > MAX_STOPS:
        raise bad("stop", f"at most {MAX_STOPS} stop strings, got {len(value)}")
    return [_text(s, f"stop[{i}]") for i, s in enumerate(value) if s]


# llama-server's own fields that change the output, with the values that change nothing: refused
# otherwise, as OpenAI's own unsupported fields are (its users send them; ignoring them silently
# would answer something other than what was asked)
LLAMA_SERVER_FIELDS = {"grammar": (None, ""), "json_schema": (None, {}), "n_probs": (None, 0), "ignore_eos": (None, False),
                       "mirostat": (None, 0), "typical_p": (None, 1, 1.0), "dry_multiplier": (None, 0, 0.0),
                       "xtc_probability": (None, 0, 0.0), "dynatemp_range": (None, 0, 0.0),
                       "top_n_sigma": (None, -1, -1.0), "samplers": (None,), "min_keep": (None, 0, 1),
                       "n_indent": (None, 0), "t_max_predict_ms": (None, 0), "lora": (None, [])}


def _neutral(value, allowed: tuple) -> bool:
    """``value`` is one of ``allowed``, type for type: JSON's true is not 1, nor false 0."""
    return any(value is a or (type(value) is type(a) and value == a) or
               (type(value) in (int, float) and type(a) in (int, float) and value == a) for a in allowed)


def _refuse_unsupported(body: dict) -> None:
    """Fields we know but cannot honour: refused rather than silently ignored."""
    for name in ("n", "best_of"):
        if not _neutral(body.get(name), (None, 1)):
            raise bad(name, f"only {name}=1 is supported, got {_show(body[name])}", "unsupported_value")
    for name in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias"):
        if not _neutral(body.get(name), (None, False, [], {}, "")):  # (legacy logprobs 0 asks for them too)
            raise bad(name, "is not supported by this server", "unsupported_parameter")
    for name in ("tool_choice", "function_call"):  # (without tools: "none" and "auto" change nothing)
        if not _neutral(body.get(name), (None, "none", "auto")):
            raise bad(name, f"{_show(body[name])} asks for a tool call; tools are not supported by this server",
                      "unsupported_value")
    if not _neutral(body.get("modalities"), (None, ["text"])):
        raise bad("modalities", f"only [\"text\"] is supported, got {_show(body['modalities'])}", "unsupported_value")
    if body.get("audio") is not None:
        raise bad("audio", "is not supported by this server", "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if not _neutral(body.get(name), (None, 0)):
            raise bad(name, "is not supported by this server (use repeat_penalty)", "unsupported_parameter")
    if body.get("n_predict") is not None:
        raise bad("n_predict", "is llama-server's own name: send max_tokens", "unsupported_parameter")
    for name, allowed in LLAMA_SERVER_FIELDS.items():
        if not _neutral(body.get(name), allowed):
            raise bad(name, "is not supported by this server", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") in (None, "text")):
        raise bad("response_format", "only {\"type\": \"text\"} is supported", "unsupported_value")


def _sampling(body: dict) -> SamplingParams:
    seed = _integer(body, "seed", None)
    return SamplingParams(
        temperature=_temperature(body),
        top_k=_integer(body, "top_k", 40, lo=0),
        top_p=_number(body, "top_p", 0.95, lo=0, hi=1, lo_open=True),
        min_p=_number(body, "min_p", 0.05, lo=0, hi=0.999999),
        repeat_penalty=_number(body, "repeat_penalty", 1.0, lo=MIN_REPEAT_PENALTY, hi=MAX_REPEAT_PENALTY),
        repeat_last_n=_integer(body, "repeat_last_n", 64, lo=-1),  # (llama-server's: 0 none, -1 the whole context)
        seed=None if seed in (None, -1) else seed % (1 << 64),  # -1: random, as in llama-server
    )


MIN_TEMPERATURE = 0.01  # below it (but not 0) logits / temperature only overflows: use 0 for greedy
MIN_REPEAT_PENALTY, MAX_REPEAT_PENALTY = 0.01, 100.0  # beyond either, a penalised logit is +-inf


def _temperature(body: dict) -> float:
    value = _number(body, "temperature", 0.8, lo=0, hi=2)
    if 0 < value < MIN_TEMPERATURE:
        raise bad("temperature", f"must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {value}")
    return value


def _common(body, kind: str, context_length: int) -> Request:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    _refuse_unsupported(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"must be a string, got {_show(model)}", "invalid_type")
    limits = {name: _integer(body, name, None, lo=1) for name in ("max_tokens", "max_completion_tokens")}
    which = "max_completion_tokens" if limits["max_completion_tokens"] is not None else "max_tokens"
    max_tokens = limits[which]  # the newer name wins when both are sent, as OpenAI's (both are checked)
    if max_tokens is not None and max_tokens > context_length:
        raise bad(which, f"{max_tokens} is more than the context window holds ({context_length} tokens)",
                  "context_length_exceeded")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", "must be an object", "invalid_type")
    stream = _boolean(body, "stream")
    if options is not None and not stream:  # (as OpenAI answers it)
        raise bad("stream_options", "is only allowed when stream is true")
    return Request(kind=kind, max_tokens=max_tokens, sampling=_sampling(body), stop=_stops(body),
                   stream=stream,
                   include_usage=_boolean(options or {}, "include_usage", where="stream_options."),
                   cache_prompt=_boolean(body, "cache_prompt"), model=model)


# -- the two endpoints ----------------------------------------------------------------------------
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _content(message: dict, where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return _text(content, f"{where}.content")
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad(f"{where}.content[{j}]", "only text parts are supported", "unsupported_value")
            texts.append(_text(part["text"], f"{where}.content[{j}].text"))
        return "".join(texts)
    raise bad(f"{where}.content", f"must be a string or a list of text parts, got {_show(content)}", "invalid_type")


def parse_chat(body, context_length: int) -> Request:
    req = _common(body, "chat", context_length)
    messages = body.get("messages")
    if messages is None:
        raise bad("messages", "is required", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of messages", "invalid_type")
    req.messages = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"must be an object, got {_show(m)}", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"must be one of system, developer, user, assistant; got {_show(role)}")
        for name in ("tool_calls", "function_call"):  # (an answer's tool calls would be left out of the prompt)
            if not _neutral(m.get(name), (None, [])):
                raise bad(f"{where}.{name}", "tool calls are not supported by this server", "unsupported_parameter")
        req.messages.append({"role": ROLES[role], "content": _content(m, where)})
    return req


def parse_completion(body, context_length: int) -> Request:
    req = _common(body, "completion", context_length)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if prompt is None:
        raise bad("prompt", "is required", "missing_required_parameter")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise bad("prompt", "token-id prompts are not supported: send the prompt as text", "unsupported_value")
    if isinstance(prompt, list):
        raise bad("prompt", "must be one string (batches of prompts are not supported)", "unsupported_value")
    if not isinstance(prompt, str):
        raise bad("prompt", f"must be a string, got {_show(prompt)}", "invalid_type")
    req.prompt = _text(prompt, "prompt")
    return req
