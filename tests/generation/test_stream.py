"""Generation over a session: streaming pieces, cancellation, and feeding only new tokens."""

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import UserError
from distribution.gguf_file import GGUFFileLoader
from engine.model import LlamaModel
from generation.sampling import Sampler, SamplingParams
from engine.tokenizer import Tokenizer
from generation.stream import Generation, StopMatcher, generate

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model_and_tokenizer(factory_models):
    loader = GGUFFileLoader(factory_models["q8_0-spm-gqa"])
    return LlamaModel(loader), Tokenizer(loader.metadata)


def test_stream_pieces_join_to_text(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = tok.encode("The quick brown")
    gen = Generation(model.open_session(64), tok, prompt, 12, Sampler(GREEDY))
    pieces = list(gen)
    assert "".join(pieces) == gen.result.text
    assert len(gen.result.tokens) <= 12
    assert gen.fed[:len(prompt)] == prompt and gen.session.position == len(gen.fed)


def test_cancel_stops_the_stream(model_and_tokenizer):
    model, tok = model_and_tokenizer
    cancel = threading.Event()
    gen = Generation(model.open_session(64), tok, tok.encode("The quick brown"), 40, Sampler(GREEDY), cancel=cancel)
    for _ in gen:
        cancel.set()
    assert gen.result.stop_reason == "cancelled"
    assert len(gen.result.tokens) < 40


def test_continuing_a_session_equals_one_long_prompt(model_and_tokenizer):
    """A second turn fed after the first one's cache gives what a fresh run of the whole gives."""
    model, tok = model_and_tokenizer
    first, second = tok.encode("The quick brown"), tok.encode(" fox jumps", add_special=False)
    whole = generate(model.open_session(64), tok, first + second, 8, Sampler(GREEDY))
    s = model.open_session(64)
    s.feed(first)
    assert s.position == len(first)
    cont = generate(s, tok, second, 8, Sampler(GREEDY))
    assert cont.tokens == whole.tokens


def test_empty_prompt_and_full_context_are_clear(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(UserError, match="empty"):
        Generation(model.open_session(8), tok, [], 4, Sampler(GREEDY))
    with pytest.raises(UserError, match="context window"):
        Generation(model.open_session(4), tok, [1, 2, 3, 4, 5], 4, Sampler(GREEDY))


def test_decode_speed_counts_the_steps_run(model_and_tokenizer):
    """The same three tokens: ended by EOS, each was fed (three decode steps); ended by max_tokens,
    the last one was not (two). The speed divides the steps run, not tokens - 1 (which made an
    answer ended by EOS look 15-20% slower at seven tokens)."""
    model, tok = model_and_tokenizer
    eos = min(tok.eog_ids)
    for max_tokens, script, steps in ((8, [5, 6, 7, eos], 3), (3, [5, 6, 7], 2)):
        picks = iter(script)
        gen = Generation(model.open_session(64), tok, tok.encode("The quick brown"), max_tokens,
                         lambda logits, history: next(picks))
        list(gen)
        assert gen.result.tokens == [5, 6, 7]
        assert gen.result.decode_steps == steps == len(gen.fed) - len(gen.result.prompt_tokens)
        assert gen.result.decode_tok_s == pytest.approx(steps / gen.result.decode_s)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abc ", max_size=30), stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=3),
                                                                 max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=6))
def test_stop_matcher_cuts_at_the_earliest_stop_however_the_text_arrives(text, stops, cuts):
    """Whatever the pieces, generation stops with the first piece after which a stop string has
    appeared, and the text shown is the text up to the earliest of the stop strings that have
    appeared by then (OpenAI and llama.cpp's rule; the first stop in the list used to win even when
    another came earlier in the text, which showed text past a stop); all of it when none appears.
    (A stop string that would have begun earlier but ends later never appears: nothing is generated
    after the stop.)"""
    ends = sorted({max(0, min(c, len(text))) for c in cuts} | {len(text)})
    expected, stopped = text, False
    for end in ends:
        hits = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
        if hits:
            expected, stopped = text[:min(hits)], True
            break
    m = StopMatcher(stops)
    shown, at = "", 0
    for cut in sorted(cuts) + [len(text)]:
        if m.done:
            break
        shown += m.feed(text[at:max(at, cut)])
        at = max(at, cut)
    if not m.done:
        shown += m.flush()
    assert shown == expected and m.done == stopped


def test_a_stop_string_completed_first_wins_over_one_begun_earlier():
    """"ab" then "c" with stops "abc" and "b": "b" completes first, generation stops there."""
    m = StopMatcher(["abc", "b"])
    assert m.feed("ab") == "a" and m.done
    m = StopMatcher(["abc", "b"])
    assert m.feed("abc") == "" and m.done


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab", max_size=40), stop=st.text(alphabet="ab", min_size=1, max_size=12))
def test_held_back_text_is_the_longest_end_a_stop_string_begins_with(text, stop):
    from generation.stream import _could_begin
    longest = max((n for n in range(1, min(len(stop) - 1, len(text)) + 1) if text.endswith(stop[:n])), default=0)
    assert _could_begin(text, stop) == longest
