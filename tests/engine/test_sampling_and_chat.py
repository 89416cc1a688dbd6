"""Sampling rules, stop strings across token boundaries, and chat templates."""

import time
import warnings

import numpy as np
import pytest

from common.errors import UserError
from distribution.gguf_file import GGUFFileLoader
from engine.chat import NAMED_TEMPLATES, chat_prompt, detect_template, render
from generation.stream import StopMatcher
from generation.sampling import Sampler, SamplingParams
from engine.tokenizer import Tokenizer

LOGITS = np.array([1.0, 3.0, 2.5, -1.0, 0.0, 2.9])


def test_greedy_is_argmax():
    assert Sampler(SamplingParams(temperature=0))(LOGITS, []) == 1


def test_seed_reproduces_a_sampled_run():
    draws = lambda seed: [Sampler(SamplingParams(temperature=1.5, top_k=0, top_p=1, min_p=0, seed=seed))(LOGITS, [])
                          for _ in range(1)]
    a = Sampler(SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0, seed=7))
    b = Sampler(SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0, seed=7))
    assert [a(LOGITS, []) for _ in range(50)] == [b(LOGITS, []) for _ in range(50)]
    assert draws(1) is not None


def test_top_k_top_p_min_p_restrict_candidates():
    s = Sampler(SamplingParams(temperature=5.0, top_k=2, top_p=1.0, min_p=0, seed=0))
    assert {s(LOGITS, []) for _ in range(200)} == {1, 5}
    s = Sampler(SamplingParams(temperature=5.0, top_k=0, top_p=0.3, min_p=0, seed=0))
    assert {s(LOGITS, []) for _ in range(200)} == {1}
    s = Sampler(SamplingParams(temperature=5.0, top_k=0, top_p=1.0, min_p=0.5, seed=0))
    assert {s(LOGITS, []) for _ in range(300)} == {1, 2, 5}


def test_repetition_penalty_steers_away():
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=2.0))
    assert s(LOGITS, [1]) == 5  # 3.0 / 2 = 1.5 falls below 2.9


@pytest.mark.parametrize("last_n, best", [(0, 1), (1, 1), (2, 5), (-1, 5), (64, 5)])  # history [1, 4]
def test_the_penalty_looks_back_repeat_last_n_tokens(last_n, best):
    """0: no penalty; N: the last N tokens of the history (prompt included); -1: all of it."""
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=2.0, repeat_last_n=last_n))
    assert s(LOGITS, [1, 4]) == best


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.1}, "--temperature"), ({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p"),
    ({"top_k": -1}, "--top-k"), ({"min_p": 1.0}, "--min-p"), ({"repeat_penalty": 0}, "--repeat-penalty"),
    ({"repeat_last_n": -2}, "--repeat-last-n"),
])
def test_nonsense_values_are_refused(kwargs, message):
    with pytest.raises(UserError, match=message):
        SamplingParams(**kwargs).validate()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=5e-324, seed=0),
    SamplingParams(temperature=1e-300, top_k=0, top_p=1.0, min_p=0, seed=0),
    SamplingParams(temperature=0.8, repeat_penalty=5e-324, seed=0),
    SamplingParams(temperature=0.8, repeat_penalty=1e300, top_k=0, top_p=1.0, min_p=0, seed=0),
    SamplingParams(temperature=1e-300, repeat_penalty=1e300, seed=0),
])
def test_extreme_positive_values_still_draw_a_token_without_warnings(params):
    """A tiny temperature or an extreme penalty: still a valid draw (no NaN probabilities, no
    RuntimeWarning), the best candidate when the temperature is tiny."""
    history = [1, 2, 5]
    logits = np.array([1.0, 3.0, 2.5, -1.0, 0.0, 2.9, -np.inf])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        token = Sampler(params)(logits, history)
    assert 0 <= token < 6
    if params.temperature < 1e-3 and params.repeat_penalty == 1.0:
        assert token == 1


def test_stop_string_across_token_boundaries():
    m = StopMatcher(["</answer>", "STOP"])
    out = [m.feed(p) for p in ["The ans", "wer is 4", "2.</ans", "wer> tail"]]
    assert "".join(out) == "The answer is 42." and m.done


def test_stop_matcher_releases_false_alarms():
    m = StopMatcher(["STOP"])
    out = m.feed("ST") + m.feed("ill going") + m.flush()
    assert out == "STill going" and not m.done


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_named_templates_render(name):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = render(NAMED_TEMPLATES[name], messages, "<s>", "</s>")
    assert "Hi there" in text and "Be brief." in text


def test_zephyr_is_tinyllamas_form():
    text = render(NAMED_TEMPLATES["zephyr"], [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                  "<s>", "</s>")
    assert text == "<|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\n"


def test_model_template_is_used(default_gguf):
    tok = Tokenizer(GGUFFileLoader(default_gguf).metadata)
    text, used = chat_prompt(tok, "Hello?", system="Be kind.")
    assert used == "model"
    assert text.startswith("<|im_start|>system\nBe kind.<|im_end|>") and text.endswith("<|im_start|>assistant\n")


def test_detection_and_unknown_template(factory_models):
    assert detect_template(["<s>", "<|start_header_id|>"]) == "llama3"
    assert detect_template(["<start_of_turn>"]) == "gemma"
    assert detect_template(["hello"]) == "chatml"
    tok = Tokenizer(GGUFFileLoader(factory_models["q8_0-spm-gqa"]).metadata)
    with pytest.raises(UserError, match="unknown template 'nope'"):
        chat_prompt(tok, "hi", template="nope")
    text, used = chat_prompt(tok, "hi", template="alpaca")
    assert used == "alpaca" and "### Instruction:\nhi" in text


@pytest.mark.parametrize("template, needle", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "it ran past 0.3 s"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "its output passed"),
    ("{{ 'a' * 3000000000 }}", "builds more than"),
    ("{{ 7 ** 123456789 }}", "power above 1024"),
    ("{{ 1 + 'a' }}", "TypeError"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recurses too deeply"),
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ("{{ raise_exception('two\\nlines') }}", "two lines"),
])
def test_a_hostile_chat_template_is_one_line_within_a_budget(monkeypatch, template, needle):
    """A model's template is input: it looped forever (chat and the API's threads spun), built
    gigabytes (infer was killed), or raised a TypeError traceback."""
    import engine.chat as chat

    # (only the endless loop meets the time limit: writing 100000 characters takes 0.2-0.45 s, traced)
    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.3 if "ran past" in needle else 60)
    monkeypatch.setattr(chat, "MAX_RENDERED", 100000)
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        chat.render(template, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 5
    assert str(e.value).startswith("chat template failed: ") and needle in str(e.value)
    assert "\n" not in str(e.value)


def test_a_budgeted_render_equals_jinjas_own():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And?"}]
    for name, template in NAMED_TEMPLATES.items():
        plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template).render(
            messages=messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=True)
        assert render(template, messages, "<s>", "</s>") == plain, name
