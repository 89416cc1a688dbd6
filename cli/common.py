"""What every command shares: one-line errors and opening a store from a path or address."""

from __future__ import annotations

import functools
import os
import select
import signal
import sys
import threading
import time

import click

from common.errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, Terminated, UserError


# Click exits 2 on usage errors, but 2 is this project's code for a damaged store
# (common/errors.py): a wrong option is bad input like any other, exit 1. Every command imports
# this module, so the one class attribute covers them all.
click.exceptions.UsageError.exit_code = EXIT_USAGE


def _show_usage_error(self, file=None) -> None:
    """A usage error as one line, like every other error, pointing at --help instead of
    printing click's usage block."""
    where = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
    click.echo(f"error: {self.format_message()}{where}", err=True)


click.exceptions.UsageError.show = _show_usage_error


def user_errors(func):
    """Turn UserError (and the usual OS errors) into one line on stderr and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            _terminate_like_ctrl_c()
            return func(*args, **kwargs)
        except UserError as e:
            _fail(str(e), e.exit_code)
        except Terminated:
            click.echo("terminated", err=True)
            sys.exit(EXIT_TERMINATED)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except BrokenPipeError as e:
            if not _stdout_closed():  # (a peer's socket: an error like any other)
                _fail(e.strerror or str(e), EXIT_USAGE)
            # `infer ... | head`: the reader has what it wanted; end quietly, as `yes | head` does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error at exit)
            sys.exit(EXIT_BROKEN_PIPE)
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _fail(f"{where}{e.strerror or e}", EXIT_USAGE)
        except RecursionError:  # a structure nested deeper than Python's stack, from some input
            _fail("input nested too deeply to read", EXIT_USAGE)

    return wrapper


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reading end has closed."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


# A second SIGTERM this soon after the first is the same request delivered twice (`timeout`
# signals its child, then the child's whole process group), not an order to skip the cleanup.
SIGTERM_REPEAT_S = 1.0


def _terminate_like_ctrl_c() -> None:
    """SIGTERM raises Terminated in the main thread, once. A repeat within SIGTERM_REPEAT_S is
    ignored, so the cleanup the first one started finishes; a later one kills at once, as the
    default would. Servers that handle SIGTERM themselves (node, an event loop's handler) replace this."""
    if threading.current_thread() is not threading.main_thread():
        return
    first: list[float] = []

    def terminate(signum, frame):
        if not first:
            first.append(time.monotonic())
            raise Terminated()
        if time.monotonic() - first[0] < SIGTERM_REPEAT_S:
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, terminate)


def _fail(message: str, code: int) -> None:
    # One line: a message that carries a newline (a server's reply, a file name) must not add lines.
    flat = message.replace("\r", " ").replace("\n", " ")
    click.echo(f"error: {flat}", err=True)
    sys.exit(code)


def open_store(source: str, allow_file: bool = False):
    """A loader for SOURCE: a store directory, an http(s):// store, or (where allowed) a .gguf file."""
    import os

    from distribution.local import LocalLoader

    if source.startswith("p2p://"):
        from distribution.p2p_loader import P2PLoader

        return P2PLoader(source)
    if source.startswith(("http://", "https://")):
        from distribution.http import HTTPLoader

        return HTTPLoader(source)
    if os.path.isdir(source):
        return LocalLoader(source)
    if os.path.exists(source) and not os.path.isfile(source):
        raise UserError(f"{source}: not a regular file or directory")
    if os.path.isfile(source):
        if allow_file:
            from distribution.gguf_file import GGUFFileLoader

            return GGUFFileLoader(source)
        raise UserError(f"{source}: not a store directory (a store holds manifest.json and fragments/)")
    scheme = source.split("://", 1)[0] if "://" in source else None
    if scheme is not None and scheme.isalnum():  # ftp://, s3://...: not a path that is missing
        raise UserError(f"{source}: {scheme}:// is not a source this tool reads (http://, https://, p2p://, "
                        f"a store directory" + (" or a .gguf file)" if allow_file else ")"))
    raise UserError(f"{source}: no such store directory" + (" or GGUF file" if allow_file else ""))


def resolve_source(source: str | None) -> str:
    """SOURCE as given, or the default model's store (made by scripts/setup.sh)."""
    import os

    if source is not None:
        return source
    from models.default import DEFAULT_STORE

    if not os.path.isdir(DEFAULT_STORE):
        raise UserError(f"{DEFAULT_STORE}: the default model's store is missing; run scripts/setup.sh first")
    return str(DEFAULT_STORE)


def describe_model(loader) -> dict:
    """What a person wants to know about a loaded model: shown by `chat`, the API and the web page."""
    from collections import Counter

    manifest = loader.manifest
    types = Counter(t.ggml_type for t in manifest.tensors if len(t.shape) > 1)
    return {**{k: v for k, v in manifest.model.items() if v is not None},
            "source": loader.where,
            "file": manifest.source.get("name"),
            "file_size": manifest.source.get("size"),
            "sha256": manifest.source.get("sha256"),
            "quantization": ", ".join(f"{t} x{n}" for t, n in types.most_common()),
            "fragments": len(manifest.unique_fragments())}


def load_text_model(source: str | None, kernels: str = "numba", template: str | None = None,
                    say=None, before_weights=None, pin: bool = False):
    """A ``generation.TextModel`` for any source `infer` takes, with every block loaded here.

    ``say(message)`` hears what takes time (loading, first-time kernel compilation);
    ``before_weights(tokenizer, context_length)`` runs before any weight is loaded, so a request
    that cannot be served (a prompt longer than the context) fails at once. ``pin``: once loaded,
    ``pin_kernels`` (the commands' --pin); it changes the whole process, so in-process
    callers (tests, a library user) leave it off.
    """
    from engine.config import LlamaConfig
    from engine.model import LlamaModel
    from engine.tokenizer import Tokenizer
    from generation.textmodel import TextModel

    say = say or (lambda message: None)
    loader = open_store(resolve_source(source), allow_file=True)
    tokenizer = Tokenizer(loader.metadata, loader.where)
    info = describe_model(loader)
    if before_weights is not None:
        before_weights(tokenizer, LlamaConfig.from_metadata(loader.metadata, loader.where).context_length)
    announce_loading(say, info, kernels)
    model = LlamaModel(loader, backend=kernels)
    say(loaded_message(model))
    if pin:
        pin_kernels(kernels)
    return TextModel(name=info.get("name") or info.get("file") or "model", tokenizer=tokenizer,
                     context_length=model.config.context_length, open_session=model.open_session,
                     info=info, template=template)


def pin_option(f):
    """--pin/--no-pin for the commands that run a whole model here (`infer`, `chat`, `api`)."""
    return click.option(
        "--pin/--no-pin", default=True, show_default=True,
        help="Once the model is loaded, keep the thread that runs the kernels on one CPU and their other "
             "threads on the rest (common/affinity.py, as every `node` does): beside a busy process or a "
             "second model the scheduler otherwise stacks them, and every step waits (decode kept 3-7x "
             "more of its speed, benchmarks/contention.py). Only the numba kernels running the whole model "
             "here (not with --distributed, nor infer's --backend llama.cpp), on 2 threads or more, no more than "
             "the CPUs allowed (e.g. by taskset).")(f)


def pin_kernels(kernels: str) -> tuple[int, set[int]] | None:
    """The compute thread (common/compute.py) on one CPU and the process's other threads on the
    rest, for the numba kernels on two threads or more; returns the layout, or None where nothing
    was done. Call it after the model has loaded: loading ran the kernels' first parallel region,
    which started their worker threads (a thread started later inherits the compute thread's CPU).
    The numpy kernels' BLAS threads were not measured pinned; one thread has nothing to keep
    apart (pinned, it could not leave a CPU something else takes); and more threads than CPUs
    (NUMBA_NUM_THREADS from the environment is not capped as --threads is) would crowd the CPUs
    left to the workers (NUMBA_NUM_THREADS=4 on 2 CPUs, SmolLM2 `infer`: 34-43 against 55-56 tok/s)."""
    if kernels != "numba":
        return None
    import numba

    from common import compute
    from common.affinity import allowed_cpus, pin_compute_thread as pin

    threads = compute.run(numba.get_num_threads)
    if not 2 <= threads <= len(allowed_cpus()):
        return None
    return compute.run(pin)


def load_distributed_text_model(source: str | None, kernels: str = "numba", template: str | None = None,
                                nodes: list[str] | None = None, key_file: str | None = None, say=None):
    """A ``generation.TextModel`` whose blocks run on swarm nodes; only the embedding, the head and the
    tokenizer are loaded here. Nodes are found through SOURCE's DHT (a p2p:// address a node printed)
    and/or given as WebSocket URLs (``nodes``). ``info["route"]`` is live: node, blocks, ms per token."""
    from swarm.client import distributed_text_model
    from swarm.wire import load_key

    say = say or (lambda message: None)
    key = load_key(key_file) if key_file else None
    loader = open_store(resolve_source(source), allow_file=True)
    say(f"loading the embedding and head of {loader.where}; the blocks run on "
        f"{', '.join(nodes) if nodes else 'nodes found through the DHT'}...")
    text_model = distributed_text_model(loader, nodes=list(nodes) if nodes else None, key=key, kernels=kernels,
                                        template=template)
    say("ready (the route is chosen when a session opens)")
    return text_model


def announce_loading(say, info: dict, kernels: str) -> None:
    """Tell a waiting person what is about to take time: the weights, and kernels compiled on first use."""
    size = info.get("file_size")
    what = f"{size / 1e6:.0f} MB in {info.get('fragments')} fragments" if size else f"{info.get('fragments')} fragments"
    say(f"loading {info.get('name') or info.get('file') or 'the model'} from {info.get('source')} ({what})...")
    if kernels == "numba" and kernels_need_compiling():
        say("compiling kernels (first run only)...")


def loaded_message(model) -> str:
    compile_s = getattr(model.backend, "compile_s", 0.0) + getattr(model.decoder, "compile_s", 0.0)
    return f"ready ({model.backend.name} kernels" + (f", {compile_s:.1f} s of it compiling or loading them)"
                                                     if compile_s >= 1 else ")")


def kernels_need_compiling() -> bool:
    """True when loading will compile the engine's Numba kernels: on a machine that never compiled
    them (no cache index at all), or after their source changed (an index that is stale). Reads
    Numba's cache index; if Numba's internals differ, says False (better quiet than wrong)."""
    import importlib

    try:
        from pathlib import Path

        from numba.core.dispatcher import Dispatcher

        import engine

        for path in sorted(Path(engine.__file__).parent.glob("*.py")):  # every module with cached kernels
            if "cache=True" in path.read_text(encoding="utf-8"):
                importlib.import_module(f"engine.{path.stem}")
        indexes = [obj._cache._cache_file for name, module in list(sys.modules.items())
                   if name.startswith("engine.") and module is not None
                   for obj in vars(module).values()
                   if isinstance(obj, Dispatcher) and not obj.signatures
                   and hasattr(getattr(obj, "_cache", None), "_cache_file")]
        written = [index for index in indexes if os.path.exists(index._index_path)]
        stale = any(not index._load_index() for index in written)
        return bool(indexes) and (not written or stale)
    except Exception:  # an internal detail changed
        return False


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


#: How long idle worker threads wait busily before they sleep, for the two pools a step uses.
#:
#: GOMP_SPINCOUNT (Numba's OpenMP threads): libgomp's default spins long enough that Numba's
#: threads, idle between its kernels, fight OpenBLAS's threads in every prompt matrix product;
#: sleeping at once (OMP_WAIT_POLICY=passive) makes each decode step wait for threads to wake.
#: Measured on the default model, quiet 2-core machine, 517-token prompt, 48 tokens decoded
#: (infer --json, two runs each): default prefill 225-243 tok/s, decode 80-99; passive 472 and 36;
#: GOMP_SPINCOUNT=5000 440-454 and 95-100.
#:
#: OPENBLAS_THREAD_TIMEOUT (OpenBLAS's threads, which run the prompt's matrix products): by default
#: they spin 2^28 cycles (about 0.1 s) after each product, so the first decode steps after a
#: prompt took 40-113 ms instead of 6.7 (their threads and Numba's on the same 2 cores). 2^4 cycles
#: lets them sleep at once: `validate --speed` on SmolLM2 Q8_0, 512 prompt tokens, same quiet
#: machine, one run each: prefill 516 -> 558 tok/s, decode 103 -> 124 (llama.cpp: 616 and 107-109,
#: unaffected: it uses neither pool).
THREAD_ENV = {"GOMP_SPINCOUNT": "5000", "OPENBLAS_THREAD_TIMEOUT": "4"}


def apply_thread_env() -> None:
    """THREAD_ENV's waits, unless the environment sets them; before numpy or numba start threads."""
    for var, value in THREAD_ENV.items():
        os.environ.setdefault(var, value)


def set_threads(threads: int | None) -> int | None:
    """Thread count for numpy/numba; must run before they are imported (their pools read it once).

    More threads than cores only slows every step down (and 100000 crashed OpenBLAS), so a larger
    request is capped at the core count with a note on stderr. Returns the count used. Idle worker
    threads wait briefly (``THREAD_ENV`` above; a value in the environment wins).
    """
    apply_thread_env()
    if not threads:
        return None
    cores = usable_cores()
    if threads > cores:
        click.echo(f"note: --threads {threads} is more than the {cores} cores here; using {cores}", err=True)
        threads = cores
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(threads)
    return threads


def seed_option(seed: int | None) -> int | None:
    """--seed as llama.cpp reads it: -1 (or none) draws a random seed."""
    if seed is None or seed == -1:
        return None
    if seed < 0:
        raise UserError(f"--seed must be >= 0, or -1 for a random seed; got {seed}")
    return seed


def check_utf8(text: str, what: str) -> str:
    """Command-line text that held invalid UTF-8 arrives with surrogate escapes: refuse it clearly."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        raise UserError(f"{what} is not valid UTF-8 (byte 0x{bad.hex()} at character {e.start})") from None
    return text


def decode_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


MAX_PROMPT_BYTES = 64 * 2**20  # far beyond any context window: more is a mistake (/dev/zero), not a prompt


def _capped(data: bytes, what: str) -> bytes:
    if len(data) > MAX_PROMPT_BYTES:
        raise UserError(f"{what}: more than {MAX_PROMPT_BYTES // 2**20} MiB, too long for a prompt")
    return data


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The prompt from --prompt TEXT, --prompt - (standard input) or --prompt-file FILE."""
    if (prompt is None) == (prompt_file is None):
        raise UserError("give the prompt with exactly one of --prompt TEXT, --prompt - (standard input) "
                        "or --prompt-file FILE")
    if prompt_file is not None:
        try:  # (a pipe is fine: --prompt-file <(cmd); /dev/zero ends at the cap)
            with open(prompt_file, "rb") as f:
                return decode_utf8(_capped(f.read(MAX_PROMPT_BYTES + 1), prompt_file), prompt_file)
        except OSError as e:
            raise UserError(f"{prompt_file}: {e.strerror or e}") from None
    if prompt == "-":
        return decode_utf8(_capped(sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1), "standard input"), "standard input")
    return check_utf8(prompt, "--prompt")


def distributed_options(command):
    """--distributed, --node and --swarm-key, which `chat` and `api` share (`infer` takes a p2p://
    address only, so it has its own)."""
    options = [
        click.option("--distributed", is_flag=True,
                     help="Run the blocks on swarm nodes (`node`): found through SOURCE's DHT for p2p://, or "
                          "given with --node. Only the embedding, the head and the tokenizer load here."),
        click.option("--node", "nodes", multiple=True, help="--distributed: a node's ws:// URL (repeatable)."),
        click.option("--swarm-key", type=click.Path(dir_okay=False), help="--distributed: a private swarm's key file."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def check_distributed_options(distributed: bool, nodes, swarm_key) -> None:
    if (nodes or swarm_key) and not distributed:
        raise UserError("--node and --swarm-key go with --distributed")


def sampling_options(temperature: float, max_tokens: int):
    """The sampling options `infer` and `chat` share (their defaults differ: greedy vs llama-server's)."""

    def apply(command):
        options = [
            click.option("-n", "--max-tokens", default=max_tokens, show_default=True, type=click.IntRange(1),
                         help="Tokens to generate at most" + (" per answer." if temperature else ".")),
            click.option("--temperature", default=temperature, show_default=True, type=float,
                         help="0 is greedy (deterministic); higher is more varied."),
            click.option("--top-k", default=40, show_default=True, type=int, help="Keep the K likeliest tokens (0: off)."),
            click.option("--top-p", default=0.95, show_default=True, type=float, help="Nucleus sampling, in (0, 1]."),
            click.option("--min-p", default=0.05, show_default=True, type=float,
                         help="Drop tokens below this share of the best."),
            click.option("--repeat-penalty", default=1.0, show_default=True, type=float,
                         help="Penalize recent tokens (1: off)."),
            click.option("--repeat-last-n", default=64, show_default=True, type=int,
                         help="How many recent tokens, prompt included, the penalty looks at (0: none, -1: all)."),
            click.option("--seed", type=int, help="Random seed: the same seed repeats a sampled run (-1: random)."),
        ]
        for option in reversed(options):
            command = option(command)
        return command

    return apply
