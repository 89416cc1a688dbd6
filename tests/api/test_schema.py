"""Request validation: every body is either a clean record or a 400 that names the field at fault."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.openai_schema import APIError, parse_chat, parse_completion

CTX = 512
json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True)
                           | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=3),
                           max_leaves=8)
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "repeat_penalty", "seed", "stop", "stream", "stream_options", "n", "logprobs", "frobnicate"]
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
good_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                      "content": st.text(max_size=20)})


@settings(max_examples=300, deadline=None)
@given(body=bodies | json_values, messages=st.none() | st.lists(good_message, min_size=1, max_size=3))
def test_any_body_is_a_request_or_a_named_400(body, messages):
    if messages is not None and isinstance(body, dict):
        body = {**body, "messages": messages, "prompt": "hi"}
    for parse in (parse_chat, parse_completion):
        try:
            req = parse(body, CTX)
        except APIError as e:
            assert e.status == 400
            assert e.body()["error"]["type"] == "invalid_request_error"
            if e.param:
                assert e.message.startswith(e.param), e.message
            continue
        req.sampling.validate()  # whatever passed the parser is a valid sampler setting
        assert req.max_tokens is None or 1 <= req.max_tokens <= CTX
        assert all(isinstance(s, str) and s for s in req.stop)


def test_defaults_follow_llama_server():
    req = parse_chat({"messages": [{"role": "user", "content": "hi"}]}, CTX)
    s = req.sampling
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.repeat_penalty) == (0.8, 40, 0.95, 0.05, 1.0)
    assert req.max_tokens is None and req.stop == [] and not req.stream


@pytest.mark.parametrize("body, param", [
    ({"n": 2}, "n"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": 1.5}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**9}, "max_tokens"),
    ({"stop": ["a", 3]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    # JSON's true is not 1, nor false 0 (Python's == says they are)
    ({"n": True}, "n"),
    ({"best_of": True}, "best_of"),
    ({"presence_penalty": False}, "presence_penalty"),
    # both names of the limit are checked, whichever wins
    ({"max_tokens": "x", "max_completion_tokens": 3}, "max_tokens"),
    # llama-server's own fields that change the answer
    ({"grammar": "root ::= \"a\""}, "grammar"),
    ({"json_schema": {"type": "object"}}, "json_schema"),
    ({"n_probs": 3}, "n_probs"),
    ({"ignore_eos": True}, "ignore_eos"),
    ({"n_predict": 5}, "n_predict"),
    ({"mirostat": 2}, "mirostat"),
    ({"top_n_sigma": 0.01}, "top_n_sigma"), ({"samplers": ["temperature"]}, "samplers"), ({"min_keep": 5}, "min_keep"),
    ({"t_max_predict_ms": 100}, "t_max_predict_ms"), ({"repeat_last_n": -2}, "repeat_last_n"),
    ({"repeat_last_n": 4.5}, "repeat_last_n"),
    # tool calls and other outputs this server cannot make: refused, not answered with plain text
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"function_call": {"name": "f"}}, "function_call"),
    ({"modalities": ["text", "audio"]}, "modalities"), ({"audio": {"voice": "alloy"}}, "audio"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]}]},
     "messages[1].tool_calls"),
    # OpenAI's rule: usage chunks belong to a stream
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {}}, "stream_options"),
])
def test_chat_refusals_name_the_field(body, param):
    body = {"messages": [{"role": "user", "content": "hi"}], **body}
    with pytest.raises(APIError) as e:
        parse_chat(body, CTX)
    assert e.value.status == 400 and e.value.param == param and param in e.value.message


def test_neutral_values_of_unsupported_fields_are_accepted():
    req = parse_chat({"messages": [{"role": "user", "content": "hi"}], "n": 1, "best_of": 1, "logprobs": False,
                      "presence_penalty": 0.0, "frequency_penalty": 0, "grammar": "", "ignore_eos": False,
                      "typical_p": 1.0, "n_probs": 0, "max_completion_tokens": 3, "max_tokens": 9,
                      "top_n_sigma": -1, "min_keep": 0, "tool_choice": "none", "function_call": "auto",
                      "modalities": ["text"], "stream": True, "stream_options": {"include_usage": True}}, CTX)
    assert req.max_tokens == 3 and req.stream and req.include_usage


@pytest.mark.parametrize("value", [0, 4, -1, 64])
def test_repeat_last_n_is_taken_as_llama_server_takes_it(value):
    """It was ignored (the window stayed 64): with repeat_last_n 0 llama-server turns the penalty off."""
    req = parse_chat({"messages": [{"role": "user", "content": "hi"}], "repeat_penalty": 1.5,
                      "repeat_last_n": value}, CTX)
    assert req.sampling.repeat_last_n == value and req.sampling.repeat_penalty == 1.5


def test_legacy_logprobs_zero_is_refused():
    """In OpenAI's legacy completions, logprobs 0 still asks for the sampled tokens' logprobs."""
    with pytest.raises(APIError) as e:
        parse_completion({"prompt": "hi", "logprobs": 0}, CTX)
    assert e.value.param == "logprobs"


def test_chat_accepts_text_parts_developer_role_and_stop_string():
    req = parse_chat({"messages": [{"role": "developer", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]}],
                      "stop": "END", "seed": 7, "temperature": 0, "frobnicate": {"x": 1}}, CTX)
    assert req.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert req.stop == ["END"] and req.sampling.seed == 7 and req.sampling.temperature == 0


def test_completion_prompt_forms():
    assert parse_completion({"prompt": ["one"]}, CTX).prompt == "one"
    for prompt, param in ((["a", "b"], "prompt"), (None, "prompt"), ([1, 2], "prompt")):
        with pytest.raises(APIError) as e:
            parse_completion({"prompt": prompt}, CTX)
        assert e.value.param == param


def test_a_chat_template_that_fails_on_the_messages_is_a_400_naming_them():
    """The model's own template refusing (or running too long on) the messages is the request's
    fault: a 400 whose param is messages, not a bare message."""
    from api.server import _prompt
    from common.errors import UserError

    class Refusing:
        def chat_prompt(self, messages):
            raise UserError("chat template failed: it ran past 2 s")

    req = parse_chat({"messages": [{"role": "user", "content": "hi"}]}, CTX)
    with pytest.raises(APIError) as e:
        _prompt(Refusing(), req)
    assert e.value.status == 400 and e.value.param == "messages" and "ran past 2 s" in e.value.message


def test_long_prompts_are_tokenized_one_at_a_time_and_short_ones_do_not_wait_behind_them():
    import asyncio
    import threading
    from types import SimpleNamespace

    from api.server import QUEUED_TOKENIZING, _tokenize

    release, inside, most = threading.Event(), [0], [0]
    lock = threading.Lock()

    class TextModel:
        def raw_prompt(self, text):
            if len(text) >= QUEUED_TOKENIZING:
                with lock:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                release.wait(20)
                with lock:
                    inside[0] -= 1
            return [1, 2]

    async def scenario():
        service, tm = SimpleNamespace(tokenizing=None), TextModel()
        long_req = parse_completion({"prompt": "x" * QUEUED_TOKENIZING}, CTX)
        longs = [asyncio.create_task(_tokenize(service, tm, long_req)) for _ in range(2)]
        await asyncio.sleep(0.05)
        short = await asyncio.wait_for(_tokenize(service, tm, parse_completion({"prompt": "hi"}, CTX)), 10)
        waiting = [t.done() for t in longs]
        release.set()
        await asyncio.wait_for(asyncio.gather(*longs), 20)
        return short, waiting

    short, waiting = asyncio.run(scenario())
    assert short == ([1, 2], []) and waiting == [False, False]
    assert most[0] == 1
