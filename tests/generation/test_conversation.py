"""Multi-turn conversations: only new tokens are fed, the cache is exactly known, saving and loading
continue the same context, a full context is an error and never a crash."""

import json
import os
import stat
import threading

import pytest

from common.errors import UserError
from generation.sampling import SamplingParams
from generation.conversation import ContextFull, Conversation, common_prefix, read_saved

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def text_model(factory_models):
    from cli.common import load_text_model

    return load_text_model(str(factory_models["q8_0-spm-gqa"]), kernels="numpy")


def run(turn) -> str:
    return "".join(turn)


def test_second_turn_feeds_only_what_the_cache_lacks(text_model):
    conv = Conversation(text_model, 256)
    run(conv.ask("The quick brown fox", GREEDY, 8))
    first = conv.last
    assert first.processed == first.prompt_tokens  # nothing cached yet
    cached_after_first = list(conv.cached)
    run(conv.ask("jumps over the lazy dog", GREEDY, 8))
    second = conv.last
    rendered, _ = text_model.chat_prompt(conv.all_messages()[:-1])  # the prompt of turn two
    prefix = common_prefix(cached_after_first, rendered)
    # At least the first prompt is reused (the answer too where its text re-tokenizes to the same
    # tokens: as a real model's usually does, tests/cli/test_chat_cli.py; not for random weights' babble).
    assert prefix >= first.prompt_tokens
    assert second.reused == prefix and second.processed == len(rendered) - prefix
    assert second.processed < second.prompt_tokens
    # The cache holds exactly what the conversation says it holds.
    assert conv.session.position == len(conv.cached)
    assert conv.cached[:len(rendered)] == rendered


def test_continued_answer_equals_a_fresh_run_of_the_whole_conversation(text_model, tmp_path):
    """Turn two over the reused cache gives the answer a new process gets after /load (whole history fed once)."""
    a = Conversation(text_model, 256)
    run(a.ask("The quick brown fox", GREEDY, 8))
    a.save(str(tmp_path / "conv.json"), {"temperature": 0})
    answer_a = run(a.ask("jumps over the lazy dog", GREEDY, 8))

    b = Conversation(text_model, 256)
    assert b.load(str(tmp_path / "conv.json")) == {"temperature": 0}
    assert b.messages == a.messages[:2]
    answer_b = run(b.ask("jumps over the lazy dog", GREEDY, 8))
    assert b.last.processed == b.last.prompt_tokens  # a new process has an empty cache: all of it once
    assert answer_b == answer_a and b.messages == a.messages


def test_save_writes_through_a_temporary_name(text_model, tmp_path):
    conv = Conversation(text_model, 128, system="Be brief.")
    run(conv.ask("hello \u00e9\u4e2d\U0001F600", GREEDY, 4))
    path = tmp_path / "c.json"
    conv.save(str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["system"] == "Be brief." and data["messages"][0]["content"] == "hello \u00e9\u4e2d\U0001F600"


@pytest.mark.parametrize("content, needle", [
    (b"not json", "invalid JSON"),
    (b"\xff\xfe", "invalid JSON"),
    (b"[]", "not a saved conversation"),
    (b'{"format": "gguf-fragments-conversation", "version": 9, "messages": []}', "version 9"),
    (b'{"format": "gguf-fragments-conversation", "version": 1, "messages": {}}', '"messages" must be a list'),
    (b'{"format": "gguf-fragments-conversation", "version": 1, "messages": [{"role": "system", "content": "x"}]}',
     "messages[0]"),
    (b'{"format": "gguf-fragments-conversation", "version": 1, "messages": [], "system": 5}', '"system"'),
    (b'{"format": "gguf-fragments-conversation", "version": 1, "messages": [], "template": "klingon"}',
     '"template" must be null'),
    (b"[" * 100000 + b"]" * 100000, "invalid JSON"),
    (b'{"format": "gguf-fragments-conversation", "version": 1, "messages": [{"role": "user", "content": "Hi '
     b'\\ud800"}]}', "messages[0].content is not valid Unicode"),
    (b'{"format": "gguf-fragments-conversation", "version": 1, "messages": [], "system": "\\udfff"}',
     "system is not valid Unicode"),
])
def test_bad_saved_files_are_one_clear_error(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        read_saved(str(path))
    assert str(path) in str(e.value) and needle in str(e.value)


def test_special_files_are_neither_read_nor_replaced(text_model, tmp_path):
    """A FIFO would block a load past Ctrl-C; a save renamed over a FIFO or a device would replace it."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        read_saved(str(fifo))  # (returns at once: no writer is waited for)
    conv = Conversation(text_model, 128)
    for path in (fifo, tmp_path / "null-link"):
        if path.name == "null-link":
            path.symlink_to("/dev/null")
        with pytest.raises(UserError, match="would replace it"):
            conv.save(str(path))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.path.islink(tmp_path / "null-link")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "null-link"]


def test_a_save_through_a_symlink_writes_the_file_it_names(text_model, tmp_path):
    conv = Conversation(text_model, 128, system="Be brief.")
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to("real.json")
    conv.save(str(tmp_path / "link.json"))
    assert os.path.islink(tmp_path / "link.json")
    assert read_saved(str(tmp_path / "real.json"))["system"] == "Be brief."


def test_a_failed_load_keeps_the_conversation(text_model, tmp_path):
    conv = Conversation(text_model, 128)
    run(conv.ask("hello", GREEDY, 4))
    before = list(conv.messages)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError):
        conv.load(str(tmp_path / "bad.json"))
    assert conv.messages == before


def test_full_context_is_reported_and_the_conversation_survives(text_model):
    conv = Conversation(text_model, 48)
    with pytest.raises(ContextFull, match="context window holds 48"):
        conv.ask("word " * 60, GREEDY, 4)
    assert conv.messages == [] and conv.used == 0
    run(conv.ask("hi", GREEDY, 200))  # stops at the window's end, not with an error
    assert conv.last.stop_reason in ("context", "eos") and conv.used <= 48
    if conv.last.stop_reason == "context":
        with pytest.raises(ContextFull):
            conv.ask("more " * 10, GREEDY, 4)
    conv.clear()
    assert conv.used == 0 and conv.messages == []
    run(conv.ask("hi again", GREEDY, 4))
    assert len(conv.messages) == 2


def test_changing_the_system_message_refeeds_from_the_start(text_model):
    conv = Conversation(text_model, 256)
    run(conv.ask("hello", GREEDY, 4))
    old = list(conv.cached)
    conv.set_system("You are terse.")
    run(conv.ask("again", GREEDY, 4))
    rendered, _ = text_model.chat_prompt(conv.all_messages()[:-1])
    assert conv.all_messages()[0] == {"role": "system", "content": "You are terse."}
    # Only the template's opening, before the system message, is shared with the old cache.
    assert conv.last.reused == common_prefix(old, rendered) < 5


def test_cancelled_turn_keeps_the_partial_answer_and_a_consistent_cache(text_model):
    conv = Conversation(text_model, 256)
    cancel = threading.Event()
    turn = conv.ask("Tell me a long story", GREEDY, 100, cancel=cancel)
    for _ in turn:
        cancel.set()
    assert conv.last.stop_reason == "cancelled" and conv.last.generated < 100
    assert conv.messages[-1] == {"role": "assistant", "content": turn.result.text}
    assert conv.session.position == len(conv.cached)
    run(conv.ask("go on", GREEDY, 4))
    assert conv.last.reused > 0


def test_a_failure_mid_answer_forgets_the_cache_and_the_turn(text_model):
    conv = Conversation(text_model, 256)
    run(conv.ask("hello", GREEDY, 4))
    real_feed, calls = conv.session.feed, []

    def failing_feed(tokens, all_logits=False):
        calls.append(1)
        if len(calls) == 3:
            raise UserError("peer 127.0.0.1:9 went away")
        return real_feed(tokens, all_logits)

    conv.session.feed = failing_feed
    with pytest.raises(UserError, match="went away"):
        run(conv.ask("and then", GREEDY, 20))
    conv.session.feed = real_feed
    assert len(conv.messages) == 2 and conv.cached == [] and conv.used == 0
    run(conv.ask("and then", GREEDY, 4))
    assert conv.last.processed == conv.last.prompt_tokens and len(conv.messages) == 4
