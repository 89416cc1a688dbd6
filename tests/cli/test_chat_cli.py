"""`chat` driven as a person drives it: through a pseudo-terminal (pexpect), prompt_toolkit and all.

The default model answers greedily (--temperature 0), so the answers are deterministic.
"""

import json
import os
import re
import subprocess
import time

import pexpect

from tests.conftest import BIN, assert_one_line_error, run_cli
from tests.swarm.conftest import six_loader, six_store  # noqa: F401  (fixtures)

# Terminal control sequences prompt_toolkit draws with, and carriage returns: stripped before matching.
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\x1b[=>]|[\x08\r]")
QUESTION = "Please answer with one word: what is the capital of France?"


class Terminal:
    """A program on a pseudo-terminal; ``until`` waits (bounded) for a pattern in what it showed."""

    def __init__(self, *args, timeout: float = 300):
        env = dict(os.environ, TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
        self.child = pexpect.spawn(str(BIN / "chat"), [str(a) for a in args], encoding="utf-8", timeout=timeout,
                                   env=env, dimensions=(50, 200))
        self.raw, self.pos, self.timeout = "", 0, timeout

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw)

    def until(self, pattern: str, timeout: float | None = None) -> re.Match:
        deadline = time.monotonic() + (timeout or self.timeout)
        rx = re.compile(pattern, re.M)
        while True:
            m = rx.search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not shown within the time; the screen:\n{self.text[-2000:]}")
            try:
                self.raw += self.child.read_nonblocking(4096, timeout=0.5)
            except pexpect.TIMEOUT:
                pass
            except pexpect.EOF:
                if not rx.search(self.text, self.pos):
                    raise AssertionError(f"{pattern!r} not shown before the program ended:\n{self.text[-2000:]}")

    def prompt(self) -> None:
        self.until(r"^> ?$")

    def ask(self, line: str) -> str:
        """Send a line at the prompt; the text shown until the next prompt."""
        self.child.sendline(line)
        start = self.until(re.escape(line) + r"\n").end()
        end = self.until(r"^> ?$").start()
        return self.text[start:end]

    def ended(self, timeout: float = 60) -> int:
        self.child.expect(pexpect.EOF, timeout=timeout)
        self.child.close()
        return self.child.exitstatus


def stats(term: Terminal) -> tuple[int, int, int]:
    """(processed, prompt tokens, reused) for the last turn, from /stats."""
    out = term.ask("/stats")
    m = re.search(r"prompt tokens processed: (\d+) of (\d+) \((\d+) reused from the cache\)", out)
    assert m, out
    return tuple(map(int, m.groups()))


def test_two_turns_then_save_and_continue_in_a_new_process(default_store, tmp_path):
    saved = tmp_path / "conversation.json"
    a = Terminal(default_store, "--temperature", "0", "--max-tokens", "40")
    a.prompt()
    assert "Paris" in a.ask(QUESTION)
    processed1, total1, reused1 = stats(a)
    assert reused1 == 0 and processed1 == total1
    assert "saved 2 messages" in a.ask(f"/save {saved}")
    answer2 = a.ask("Repeat your last answer.")
    assert "Paris" in answer2  # only the first turn said it: the second answer depends on the first
    processed2, total2, reused2 = stats(a)
    # The cache held the whole first turn (its prompt and its answer): only the new message was processed.
    assert reused2 > total1 and processed2 == total2 - reused2 and processed2 < 30
    a.child.sendline("/exit")
    assert a.ended() == 0

    b = Terminal(default_store, "--temperature", "0.7")
    b.prompt()
    loaded = b.ask(f"/load {saved}")
    assert "loaded 2 messages" in loaded and "temperature 0.0" in loaded  # the saved settings come back
    assert b.ask("Repeat your last answer.") == answer2
    processed, total, reused = stats(b)
    assert total == total2 and processed == total  # a new process reads the loaded history once
    b.child.sendeof()
    assert b.ended() == 0


def test_ctrl_c_stops_the_answer_and_a_second_one_leaves(default_store):
    term = Terminal(default_store, "--temperature", "0", "--max-tokens", "2000")
    term.prompt()
    term.child.sendintr()  # at an empty prompt, the first Ctrl-C only says how to leave
    term.until(r"Ctrl-C again, Ctrl-D or /exit to leave")
    term.child.sendline("Write a very long story about a dragon who learns to fly.")
    term.until(r"learns to fly\.\n")
    term.until(r"\w+ \w+ \w+ \w+")  # the answer is streaming
    started = time.monotonic()
    term.child.sendintr()
    term.until(r"\[stopped\]", timeout=60)
    term.prompt()
    assert time.monotonic() - started < 60
    term.child.sendintr()  # right after a Ctrl-C stopped the answer, a second one at the empty prompt leaves
    assert term.ended() == 0


def test_a_stopped_answer_stays_in_the_conversation(default_store):
    term = Terminal(default_store, "--temperature", "0", "--max-tokens", "2000")
    term.prompt()
    term.child.sendline("Write a very long story about a dragon who learns to fly.")
    term.until(r"learns to fly\.\n")
    term.until(r"\w+ \w+ \w+ \w+")
    term.child.sendintr()
    term.until(r"\[stopped\]", timeout=60)
    term.prompt()
    out = term.ask("/stats")
    generated = int(re.search(r"last turn: (\d+) tokens generated \(cancelled\)", out).group(1))
    assert 0 < generated < 2000 and "conversation: 1 turn," in out
    term.child.send("\x1b[A")  # Up: history recalls /stats (prompt_toolkit's line editing)
    term.until(r"/stats$")
    term.child.send("\r")
    term.until(r"^conversation: 1 turn,")
    term.prompt()
    term.child.sendintr()  # not right after a stop: the first Ctrl-C at the prompt only tells how to leave
    term.until(r"Ctrl-C again, Ctrl-D or /exit to leave")
    term.child.sendintr()
    assert term.ended() == 0


def test_piped_lines_commands_and_mistakes(factory_models, tmp_path):
    """From a pipe: no prompt, one message per line; mistakes are one line each and the chat goes on."""
    other = tmp_path / "other.json"
    other.write_text('{"format": "gguf-fragments-conversation", "version": 1, "model": "another model", '
                     '"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], '
                     '"settings": {"max_tokens": 3}}')
    lines = [b"/set temperature 0", b"/set top_p 7", b"/set top_k x", b"/set repeat_last_n -2", b"/set repeat_last_n 0",
             b"/frobnicate", b"hello \xff there",
             b"The quick brown", b"/system Be brief.", b"/stats", b"/route", b"/help", b"/save", b"/load /nonexistent.json",
             b"/load " + str(other).encode()]
    proc = subprocess.run([str(BIN / "chat"), str(factory_models["q8_0-spm-gqa"]), "--max-tokens", "5"],
                          input=b"\n".join(lines) + b"\n", capture_output=True, timeout=300)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    for needle in ("temperature = 0.0", "top_p must be a number in (0, 1], got '7'", "top_k must be an integer",
                   "repeat_last_n must be an integer >= 0 (0: none), or -1 for the whole context, got '-2'",
                   "repeat_last_n = 0",
                   "unknown command /frobnicate", "not valid UTF-8 (byte 0xff at offset 6); ignored",
                   "system message set", "/save needs a file name", "/nonexistent.json", "loaded 2 messages",
                   "max_tokens 3", "saved with 'another model'; continuing with"):
        assert needle in err, needle
    assert "prompt tokens processed: " in out and "local: every block (0-" in out and "/clear" in out


def test_bad_options_are_one_line(factory_models, tmp_path):
    model = factory_models["q8_0-spm-gqa"]
    assert_one_line_error(run_cli("chat", model, "--temperature", "-1"), "temperature must be a number >= 0")
    assert_one_line_error(run_cli("chat", model, "--repeat-last-n", "-2"), "--repeat-last-n")
    assert_one_line_error(run_cli("infer", model, "--prompt", "x", "--repeat-last-n", "-2"), "--repeat-last-n")
    bad = tmp_path / "conv.json"
    bad.write_text('{"format": "something else"}')
    assert_one_line_error(run_cli("chat", model, "--load", bad), str(bad), "not a saved conversation")
    assert_one_line_error(run_cli("chat", model, "--template", "klingon"), "unknown template 'klingon'")


def test_help():
    out = run_cli("chat", "--help").stdout
    for needle in ("p2p://", "/help", "--system", "--temperature", "0.8", "--min-p", "--load"):
        assert needle in out, needle


def test_a_full_context_is_said_and_clear_starts_over(factory_models):
    lines = [b"/set temperature 0", b"word " * 40, b"/clear", b"hi", b"/stats"]
    proc = subprocess.run([str(BIN / "chat"), str(factory_models["q8_0-spm-gqa"]), "--ctx", "32", "--max-tokens", "4"],
                          input=b"\n".join(lines) + b"\n", capture_output=True, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "context full: the conversation is" in err and "the context window holds 32" in err
    assert "/clear starts a new conversation" in err and "conversation cleared" in err
    assert "conversation: 1 turn," in proc.stdout.decode()


def test_route_shows_a_distributed_models_hops(capsys):
    """/route prints TextModel.info's live route (a callable, as the swarm's models give it)."""
    from types import SimpleNamespace

    from cli.chat import Chat, Settings

    rows = [{"node": "127.0.0.1:7001", "blocks": "0-14", "ms_per_token": 3.5},
            {"node": "127.0.0.1:7002", "blocks": "15-29", "ms_per_token": None}]
    conv = SimpleNamespace(model=SimpleNamespace(info={"route": lambda: rows}))
    Chat(conv, Settings(), reader=None).cmd_route("")
    out = capsys.readouterr().out.splitlines()
    assert out == ["  node 127.0.0.1:7001  blocks 0-14  ms per token 3.5", "  node 127.0.0.1:7002  blocks 15-29"]
    conv.model.info = {"route": lambda: []}
    Chat(conv, Settings(), reader=None).cmd_route("")
    assert "no route yet" in capsys.readouterr().out


def test_distributed_chat_answers_like_the_local_one_and_shows_its_route(six_store, six_loader):
    """chat --distributed: the blocks run on two nodes, the answer equals the local chat's, /route names them."""
    from tests.swarm.conftest import start_node

    script = "/set temperature 0\n/set max_tokens 8\nhello there\n/route\n"

    def chat(*args):
        proc = subprocess.run([str(BIN / "chat"), str(six_store), *args], input=script.encode(),
                              capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode()

    local = chat()
    nodes = [start_node(six_loader, 0, 2), start_node(six_loader, 3, 5)]
    try:
        remote = chat("--distributed", "--node", nodes[0].url, "--node", nodes[1].url)
    finally:
        for n in nodes:
            n.stop()
    local_lines, remote_lines = local.splitlines(), remote.splitlines()
    assert remote_lines[0].strip() and remote_lines[0] == local_lines[0]  # the answer
    assert [line.split("  ms per token")[0] for line in remote_lines[1:]] == [
        f"  node {nodes[0].url}  blocks 0-2", f"  node {nodes[1].url}  blocks 3-5"]
    assert "local" in local_lines[-1]


def test_distributed_options_need_distributed(six_store):
    assert_one_line_error(run_cli("chat", six_store, "--node", "ws://127.0.0.1:1/swarm"), "--distributed")


def test_options_given_with_load_win_over_the_saved_settings(factory_models, tmp_path):
    """`chat --load FILE -n 4`: the file's other settings come back, max_tokens is the command
    line's (the file's replaced every option before, silently)."""
    saved = tmp_path / "conv.json"
    saved.write_text('{"format": "gguf-fragments-conversation", "version": 1, "model": "m", '
                     '"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], '
                     '"settings": {"max_tokens": 300, "temperature": 0.7, "top_k": 7}}')
    proc = subprocess.run([str(BIN / "chat"), str(factory_models["q8_0-spm-gqa"]), "--load", str(saved), "-n", "4"],
                          input=b"/set\n", capture_output=True, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "(max_tokens from the command line)" in err
    shown = [line for line in proc.stdout.decode().splitlines() if line.startswith("temperature")][-1]  # /set
    assert "max_tokens 4" in shown and "temperature 0.7" in shown and "top_k 7" in shown, shown


def test_system_and_template_given_with_load_win_over_the_file(factory_models, tmp_path):
    """They were silently replaced by the file's (its null system, its template)."""
    saved = tmp_path / "conv.json"
    saved.write_text('{"format": "gguf-fragments-conversation", "version": 1, "system": null, "template": "zephyr", '
                     '"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}')
    again = tmp_path / "again.json"
    proc = subprocess.run([str(BIN / "chat"), str(factory_models["q8_0-spm-gqa"]), "--load", str(saved), "-n", "2",
                           "--system", "Be brief.", "--template", "llama3"], input=f"/save {again}\n".encode(),
                          capture_output=True, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "--system and --template from the command line" in err
    data = json.loads(again.read_text())
    assert data["system"] == "Be brief." and data["template"] == "llama3"


def test_a_message_beginning_with_a_slash_is_sent_doubled(factory_models):
    """'/usr/bin ...' is taken for a command and the error says how to send it; '//usr/bin ...' is
    sent as the message '/usr/bin ...' (there was no way to send it)."""
    lines = b"/usr/bin is a folder\n//usr/bin is a folder\n/stats\n"
    proc = subprocess.run([str(BIN / "chat"), str(factory_models["q8_0-spm-gqa"]), "-n", "3"], input=lines,
                          capture_output=True, timeout=300)
    err, out = proc.stderr.decode(), proc.stdout.decode()
    assert proc.returncode == 0, err
    assert "unknown command /usr/bin" in err and "sent as //" in err
    assert "conversation: 1 turn," in out  # the doubled one was sent, once


def test_a_ctx_beyond_the_model_is_said(factory_models):
    """--ctx above the model's context was capped without a word (only /stats showed it)."""
    proc = subprocess.run([str(BIN / "chat"), str(factory_models["q8_0-spm-gqa"]), "--ctx", "100000"],
                          input=b"/exit\n", capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "--ctx 100000 is more than this model's context of" in proc.stderr.decode()
