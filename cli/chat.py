"""`chat`: talk to a model in the terminal, streaming, with the model's chat template.

The conversation (generation.conversation) keeps the KV cache between turns, so each turn feeds
only its new tokens. This module is only the terminal: reading lines (prompt_toolkit on a
terminal, plain lines from a pipe), the /commands, and Ctrl-C, which stops the answer being
generated through the generation's cancel event.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from dataclasses import asdict, dataclass

import click

from cli.common import check_distributed_options, distributed_options, pin_option, sampling_options, user_errors
from common.errors import UserError

HELP = """\
/help                 this list
/exit                 leave (also Ctrl-D, or Ctrl-C twice at an empty prompt)
/clear                start a new conversation (keeps the system message and settings)
/system TEXT          set the system message (no TEXT: remove it)
/set NAME VALUE       temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed (-1: random)
                      or max_tokens; /set alone shows them
/save FILE            save the conversation and settings as JSON
/load FILE            continue a saved conversation
/stats                tokens, speed, context used, prompt tokens processed for the last turn
/route                where the model's blocks run
//TEXT                sends /TEXT as a message
Ctrl-C stops an answer being generated."""


@dataclass
class Settings:
    """What /set changes. Defaults follow llama-server's sampling."""
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = -1
    max_tokens: int = 1024

    def sampling(self):
        from generation.sampling import SamplingParams

        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repeat_penalty=self.repeat_penalty, repeat_last_n=self.repeat_last_n,
                              seed=None if self.seed == -1 else self.seed)

    def set(self, name: str, value: str) -> None:
        """One setting from text, checked; a bad name or value is a UserError saying what is allowed."""
        if name not in RULES:
            raise UserError(f"unknown setting {name!r} (settings: {', '.join(RULES)})")
        parse, ok, allowed = RULES[name]
        try:
            parsed = parse(value)
        except (TypeError, ValueError):
            raise UserError(f"{name} must be {allowed}, got {value!r}") from None
        if not ok(parsed):
            raise UserError(f"{name} must be {allowed}, got {value!r}")
        setattr(self, name, parsed)

    def show(self) -> str:
        return "  ".join(f"{k} {v}" for k, v in asdict(self).items())


def _finite(x: float) -> bool:
    return math.isfinite(x)


RULES = {  # name: (parse, check, what is allowed)
    "temperature": (float, lambda x: _finite(x) and x >= 0, "a number >= 0 (0: greedy)"),
    "top_k": (int, lambda x: x >= 0, "an integer >= 0 (0: off)"),
    "top_p": (float, lambda x: 0 < x <= 1, "a number in (0, 1]"),
    "min_p": (float, lambda x: 0 <= x < 1, "a number in [0, 1)"),
    "repeat_penalty": (float, lambda x: _finite(x) and x > 0, "a number > 0 (1: off)"),
    "repeat_last_n": (int, lambda x: x >= -1, "an integer >= 0 (0: none), or -1 for the whole context"),
    "seed": (int, lambda x: x >= -1, "an integer >= 0, or -1 for random"),
    "max_tokens": (int, lambda x: x >= 1, "an integer >= 1"),
}


# -- reading lines -------------------------------------------------------------------------------
class PlainReader:
    """Lines from a pipe or file: no prompt, no editing. Invalid UTF-8 is reported, not fatal."""

    def read(self) -> str | None:
        while True:
            raw = sys.stdin.buffer.readline()
            if not raw:
                return None
            try:
                return raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                note(f"error: that line is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                     f"ignored")


class TerminalReader:
    """prompt_toolkit: line editing and history (up/down) for this session.

    Ctrl-C on a line with text clears it, as in a shell; on an empty line it raises
    KeyboardInterrupt, which the loop counts towards leaving.
    """

    def __init__(self):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        keys = KeyBindings()

        @keys.add("c-c")
        def _(event):
            buffer = event.app.current_buffer
            if buffer.text:
                buffer.reset()
            else:
                event.app.exit(exception=KeyboardInterrupt())

        self.session = PromptSession(history=InMemoryHistory(), key_bindings=keys)

    def read(self) -> str | None:
        try:
            return self.session.prompt("> ")
        except EOFError:
            return None


def note(text: str) -> None:
    """Messages about the session (not answers) go to stderr, so stdout holds only what was asked for;
    one line each (an error may quote text with newlines in it: a template's, a server's)."""
    click.echo(" ".join(text.replace("\r", "\n").split("\n")), err=True)


def say_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# -- the loop ------------------------------------------------------------------------------------
class Chat:
    def __init__(self, conversation, settings: Settings, reader):
        self.conv = conversation
        self.settings = settings
        self.reader = reader
        self.interrupted = False  # the last thing that happened was a Ctrl-C
        self.reading = False      # waiting in reader.read()
        self.pending = False      # a Ctrl-C came between two prompts

    def _sigint(self, signum, frame) -> None:
        # Between prompts (printing, a command running) a Ctrl-C is remembered instead of raised
        # anywhere; while reading it interrupts the read. (On a terminal, prompt_toolkit reads
        # Ctrl-C as a key, see TerminalReader.)
        if self.reading:
            raise KeyboardInterrupt
        self.pending = True

    def run(self) -> None:
        previous = signal.signal(signal.SIGINT, self._sigint)
        try:
            self._loop()
        finally:
            signal.signal(signal.SIGINT, previous)

    def _read(self) -> str | None:
        """The next line; raises KeyboardInterrupt for a Ctrl-C at an empty prompt (or between prompts)."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt
        self.reading = True
        try:
            return self.reader.read()
        finally:
            self.reading = False

    def _loop(self) -> None:
        while True:
            try:
                line = self._read()
            except KeyboardInterrupt:
                if self.interrupted:
                    return
                self.interrupted = True
                note("(Ctrl-C again, Ctrl-D or /exit to leave)")
                continue
            if line is None:
                return
            self.interrupted = False
            if not line.strip():
                continue
            if line.startswith("//"):  # a message that begins with '/': its first '/' doubled
                self.answer(line[1:])
            elif line.startswith("/"):
                if not self.command(line):
                    return
            else:
                self.answer(line)

    def answer(self, text: str) -> None:
        from generation.conversation import ContextFull

        cancel = threading.Event()
        try:
            turn = self.conv.ask(text, self.settings.sampling(), self.settings.max_tokens, cancel=cancel)
        except ContextFull as e:
            note(f"context full: {e}. /clear starts a new conversation.")
            return
        except UserError as e:  # e.g. the chat template refuses the conversation
            note(f"error: {e}")
            return
        previous = signal.signal(signal.SIGINT, lambda signum, frame: cancel.set())
        try:
            for piece in turn:
                say_out(piece)
        except UserError as e:  # e.g. a remote part of the model went away: say so, stay in the chat
            say_out("\n")
            note(f"error: {e}")
            return
        finally:
            signal.signal(signal.SIGINT, previous)
        say_out("\n")
        reason = turn.result.stop_reason
        if reason == "cancelled":
            self.interrupted = True
            note("[stopped]")
        elif reason == "context":
            note("[the context window is full: /clear starts a new conversation]")
        elif reason == "length":
            note(f"[stopped at max_tokens {self.settings.max_tokens}: /set max_tokens N for longer answers]")

    # -- commands ---------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        handler = getattr(self, f"cmd_{name}", None)
        if name in ("exit", "quit"):
            return False
        if handler is None:
            note(f"unknown command /{name} (/help lists them; a message that begins with / is sent as //...)")
            return True
        try:
            handler(arg)
        except UserError as e:
            note(f"error: {e}")
        return True

    def cmd_help(self, arg: str) -> None:
        click.echo(HELP)

    def cmd_clear(self, arg: str) -> None:
        self.conv.clear()
        note("conversation cleared")

    def cmd_system(self, arg: str) -> None:
        self.conv.set_system(arg or None)
        note("system message set" if arg else "system message removed")

    def cmd_set(self, arg: str) -> None:
        if not arg:
            click.echo(self.settings.show())
            return
        name, _, value = arg.partition(" ")
        if not value.strip():
            raise UserError(f"/set {name} needs a value (/set alone shows the settings)")
        self.settings.set(name, value.strip())
        note(f"{name} = {getattr(self.settings, name)}")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise UserError("/save needs a file name")
        try:
            self.conv.save(arg, asdict(self.settings))
        except OSError as e:
            raise UserError(f"{arg}: {e.strerror or e}") from None
        note(f"saved {len(self.conv.messages)} messages to {arg}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise UserError("/load needs a file name")
        self.load(arg)

    def load(self, path: str, keep: frozenset[str] = frozenset()) -> None:
        """Continue the conversation saved in ``path``, with its settings except those named in
        ``keep`` (options given on the command line, which win over the file)."""
        from generation.conversation import read_saved

        saved = read_saved(path)  # checked before anything is replaced
        restored = Settings()
        for name, value in saved["settings"].items():
            if name in RULES and name not in keep:
                try:
                    restored.set(name, str(value))
                except UserError as e:
                    raise UserError(f"{path}: settings: {e}") from None
        for name in keep:
            setattr(restored, name, getattr(self.settings, name))
        self.conv.load(path)
        self.settings = restored
        kept = f" ({', '.join(sorted(keep))} from the command line)" if keep else ""
        note(f"loaded {len(self.conv.messages)} messages from {path}; settings: {restored.show()}{kept}")
        if saved["model"] and saved["model"] != self.conv.model.name:
            note(f"note: it was saved with {saved['model']!r}; continuing with {self.conv.model.name!r}")

    def cmd_stats(self, arg: str) -> None:
        conv, last = self.conv, self.conv.last
        click.echo(f"context: {conv.used} of {conv.capacity} positions used")
        if last is None:
            click.echo("last turn: none yet")
        else:
            click.echo(f"prompt tokens processed: {last.processed} of {last.prompt_tokens} "
                       f"({last.reused} reused from the cache)")
            click.echo(f"last turn: {last.generated} tokens generated ({last.stop_reason}), "
                       f"prefill {last.prefill_tok_s:.1f} tok/s, decode {last.decode_tok_s:.1f} tok/s")
        turns = len(conv.messages) // 2
        click.echo(f"conversation: {turns} turn{'' if turns == 1 else 's'}, {conv.generated_total} tokens generated")

    def cmd_route(self, arg: str) -> None:
        info = self.conv.model.info
        route = info.get("route")
        route = route() if callable(route) else route  # a distributed model's route is live
        if route is None:
            layers = info.get("block_count")
            click.echo(f"local: every block{f' (0-{layers - 1})' if isinstance(layers, int) else ''} "
                       f"runs in this process")
            return
        if not route:
            click.echo("distributed: no route yet (it is chosen when the first answer starts)")
            return
        for hop in route if isinstance(route, list) else [route]:
            if isinstance(hop, dict):  # {"node", "blocks", "ms_per_token"}, as the API's /info has it
                hop = "  ".join(f"{k.replace('_', ' ')} {v}" for k, v in hop.items() if v is not None)
            click.echo(f"  {hop}")


def banner(model, conv) -> str:
    info = model.info
    facts = [str(info[k]) for k in ("architecture",) if info.get(k)]
    if info.get("quantization"):
        facts.append(str(info["quantization"]).split(" x")[0])
    return (f"{model.name} ({', '.join(facts)}), context {conv.capacity} tokens. "
            f"/help lists commands; Ctrl-D leaves.")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", required=False)
@sampling_options(temperature=0.8, max_tokens=1024)
@click.option("--system", help="System message for the chat template.")
@click.option("--template", help="Chat template: chatml, llama2, llama3, mistral, gemma, alpaca, zephyr "
                                 "(default: the model's own, else detected).")
@click.option("--ctx", default=4096, show_default=True, type=click.IntRange(16),
              help="Context window (KV cache size): the whole conversation must fit.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads (default: all cores; at most the core count).")
@click.option("--kernels", type=click.Choice(["numba", "numpy"]), default="numba", show_default=True,
              help="numba: the fast path (weights stay quantized); numpy: the plain reference.")
@pin_option
@click.option("--load", "load_path", type=click.Path(dir_okay=False), help="Continue a conversation saved with /save.")
@distributed_options
@user_errors
def chat(source, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, system, template,
         ctx, threads, kernels, pin, load_path, distributed, nodes, swarm_key):
    """Talk to SOURCE (a store directory, a .gguf file, an http:// store address or a p2p://
    address; default: the default model's store) in the terminal.

    Answers stream as they are generated; earlier turns stay in the KV cache, so each turn
    processes only its new tokens. Sampling follows llama-server's defaults; /set temperature 0
    makes answers greedy (deterministic). Type /help inside for the commands. On a terminal,
    lines can be edited and recalled (up/down); from a pipe, each line is one message.
    """
    from cli.common import check_utf8, load_distributed_text_model, load_text_model, set_threads

    set_threads(threads)  # before numpy and numba are imported
    from common.progress import Status
    from generation.conversation import Conversation

    settings, explicit = Settings(), set()
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p),
                        ("repeat_penalty", repeat_penalty), ("repeat_last_n", repeat_last_n),
                        ("seed", -1 if seed is None else seed),
                        ("max_tokens", max_tokens)):
        try:
            settings.set(name, str(value))
        except UserError as e:
            raise UserError(f"--{name.replace('_', '-')}: {e}") from None
        if click.get_current_context().get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            explicit.add(name)  # wins over a --load file's settings
    system = check_utf8(system, "--system") if system is not None else None
    if template:
        from engine.chat import NAMED_TEMPLATES

        if template not in NAMED_TEMPLATES:
            raise UserError(f"unknown template {template!r} (choose from: {', '.join(sorted(NAMED_TEMPLATES))})")
    sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character gets '?', not a crash

    check_distributed_options(distributed, nodes, swarm_key)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    say = Status(enabled=sys.stderr.isatty())
    if distributed:
        model = load_distributed_text_model(source, kernels, template, list(nodes), swarm_key, say=say)
    else:
        model = load_text_model(source, kernels, template, say=say, pin=pin)
    conv = Conversation(model, ctx, system, template)
    given = click.get_current_context().get_parameter_source("ctx") == click.core.ParameterSource.COMMANDLINE
    if given and ctx > conv.capacity:
        note(f"note: --ctx {ctx} is more than this model's context of {conv.capacity}; using {conv.capacity}")
    loop = Chat(conv, settings, TerminalReader() if interactive else PlainReader())
    if load_path:
        loop.load(load_path, keep=frozenset(explicit))
        given = [f"--{name}" for name, value in (("system", system), ("template", template)) if value is not None]
        for name, value in (("system", system), ("template", template)):  # (they win over the file too)
            if value is not None:
                setattr(conv, name, value)
        if given:
            note(f"{' and '.join(given)} from the command line, not from {load_path}")
    if interactive:
        note(banner(model, conv))
    try:
        loop.run()
    finally:
        conv.close()
