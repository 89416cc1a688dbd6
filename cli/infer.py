"""`infer`: generate text from any source (store, .gguf, http://, p2p://), streaming it as it comes."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import click

from cli.common import pin_option, sampling_options, user_errors
from common.errors import UserError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", required=False)
@click.option("-p", "--prompt", help="What to ask (with --no-chat: the raw text to continue); '-' reads it from "
                                     "standard input.")
@click.option("--prompt-file", type=click.Path(dir_okay=False),
              help="Read the prompt from this file (UTF-8) instead of --prompt.")
@sampling_options(temperature=0.0, max_tokens=256)
@click.option("--stop", multiple=True, help="Stop when this text appears (not printed). Repeatable.")
@click.option("--system", help="System message for the chat template.")
@click.option("--template", help="Chat template: chatml, llama2, llama3, mistral, gemma, alpaca, zephyr "
                                 "(default: the model's own, else detected).")
@click.option("--no-chat", is_flag=True, help="Send the prompt as is, with no chat template.")
@click.option("--ctx", default=4096, show_default=True, type=click.IntRange(16), help="Context window (KV cache size).")
@click.option("--threads", type=click.IntRange(1), help="CPU threads (default: all cores; at most the core count).")
@pin_option
@click.option("--backend", type=click.Choice(["engine", "llama.cpp"]), default="engine", show_default=True,
              help="engine: this project's engine; llama.cpp: the same request through llama-cpp-python.")
@click.option("--kernels", type=click.Choice(["numba", "numpy"]), default="numba", show_default=True,
              help="numba: the fast path (weights stay quantized); numpy: the plain reference.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end instead of streaming.")
@click.option("--distributed", is_flag=True, help="Run the blocks on the swarm's nodes (SOURCE: a node's p2p:// "
                                                   "address); only the embedding and head load here.")
@click.option("--swarm-key", type=click.Path(dir_okay=False), help="--distributed: the private swarm's key file.")
@click.option("--timings", is_flag=True,
              help="Timings on stderr: load, prefill and decode speed (with --distributed, per node).")
@user_errors
def infer(source, prompt, prompt_file, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
          seed, stop, system, template, no_chat, ctx, threads, pin, backend, kernels, as_json, distributed, swarm_key,
          timings):
    """Generate text from SOURCE: a store directory, a .gguf file, an http:// store address or a
    p2p:// address.

    With no SOURCE, the default model's store (made by scripts/setup.sh) is used. Text streams to
    stdout as it is generated; loading and first-time kernel compilation are reported on stderr
    when it is a terminal. --json prints prompt_tokens, tokens, text, load_s, prefill_tok_s,
    decode_tok_s and stop_reason at the end instead (and nothing on stderr); with --distributed also
    route, failovers, node_ms, hop_overhead_ms, relayed_steps and lane_steps.
    """
    from cli.common import check_utf8, read_prompt, seed_option, set_threads

    threads = set_threads(threads)  # before numpy and numba are imported
    from common.progress import Status
    from generation.sampling import SamplingParams

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                            seed=seed_option(seed)).validate()
    text = read_prompt(prompt, prompt_file)
    system = check_utf8(system, "--system") if system is not None else None
    stops = [check_utf8(s, "--stop") for s in stop]
    if no_chat and (template or system):
        raise UserError("--no-chat sends the raw prompt: it cannot be combined with --template or --system")
    if no_chat and not text:
        raise UserError("the prompt is empty: with --no-chat there is no text to continue")
    if template:
        from engine.chat import NAMED_TEMPLATES

        if template not in NAMED_TEMPLATES:
            raise UserError(f"unknown template {template!r} (choose from: {', '.join(sorted(NAMED_TEMPLATES))})")
    request = Request(text, system, template, no_chat, max_tokens, params, stops, ctx)
    if backend == "llama.cpp" and params.repeat_penalty != 1.0:  # (llama-cpp-python's own rule, not llama.cpp's)
        raise UserError("--backend llama.cpp cannot apply --repeat-penalty as llama.cpp's server and CLI do: "
                        "llama-cpp-python counts only the generated tokens, not the prompt's (the engine "
                        "counts both, as they do)")
    if distributed and backend != "engine":
        raise UserError(f"--backend {backend} runs the whole model here: it cannot be combined with --distributed")
    if swarm_key and not distributed:
        raise UserError("--swarm-key goes with --distributed")
    if distributed and not (source or "").startswith("p2p://"):
        raise UserError("--distributed runs the blocks on a swarm's nodes: SOURCE must be a p2p:// address "
                        "(each `node` prints one)")
    request.swarm = (swarm_key,) if distributed else None
    request.pin = pin
    say = Status(enabled=not as_json and sys.stderr.isatty())

    if backend == "llama.cpp":
        result = _run_llama_cpp(source, request, threads, as_json, say)
    else:
        result = _run_engine(source, request, kernels, as_json, say)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo()
    if timings:
        click.echo(_timings_text(result), err=True)


def _timings_text(result: dict) -> str:
    """--timings: one line of load, prefill and decode; after a table of the route's nodes when the
    blocks ran on a swarm."""
    line = (f"load {result['load_s']:.2f} s; prompt {result['prompt_tokens']} tokens, prefill "
            f"{result['prefill_tok_s']:.1f} tok/s; {len(result['tokens'])} tokens generated, decode "
            f"{result['decode_tok_s']:.1f} tok/s")
    if "route" not in result:
        return line
    rows = [f"{'blocks':<8} {'node':<40} {'ms/token':>9}"]
    for hop in result["route"]:
        ms = result.get("node_ms", {}).get(f"{hop['node']} ({hop['blocks']})")
        rows.append(f"{hop['blocks']:<8} {hop['node']:<40} " + (f"{ms:9.3f}" if ms is not None else f"{'-':>9}"))
    hop_ms = result.get("hop_overhead_ms")
    rows.append(f"hop overhead {'-' if hop_ms is None else f'{hop_ms:.3f}'} ms/token per hop; "
                f"{result.get('relayed_steps', 0)} decode steps relayed node to node "
                f"({result.get('lane_steps', 0)} on lanes); "
                f"failovers {result.get('failovers', 0)}")
    return "\n".join(rows + [line])


@dataclass
class Request:
    """What to generate, independent of where the model comes from."""
    text: str
    system: str | None
    template: str | None
    no_chat: bool
    max_tokens: int
    params: object  # generation.sampling.SamplingParams
    stops: list[str]
    ctx: int
    prompt_tokens: list[int] = field(default_factory=list)
    swarm: tuple | None = None  # (swarm key file or None,) with --distributed
    pin: bool = False           # --pin: the compute thread on a CPU of its own once loaded

    def tokenize(self, tokenizer, context_length: int) -> None:
        """Prompt tokens and the template's stop strings; refuses a prompt the context cannot hold."""
        from engine.chat import STOPS, chat_prompt
        from generation.stream import check_fits

        if self.no_chat:
            text = self.text
        else:
            text, used = chat_prompt(tokenizer, self.text, self.system, self.template)
            self.stops += STOPS.get(used, [])
        self.prompt_tokens = tokenizer.encode(text)
        if not self.prompt_tokens:
            raise UserError("the prompt is empty: there is nothing to continue")
        check_fits(len(self.prompt_tokens), min(self.ctx, context_length))


def _stream(as_json: bool):
    if as_json:
        return None

    def out(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    return out


def open_model(source, request: Request, kernels: str, say):
    """SOURCE -> a generation.TextModel (the one place infer turns a source into a model)."""
    from cli.common import load_text_model

    if request.swarm is not None:  # the blocks run on the swarm's nodes (swarm/)
        from cli.common import load_distributed_text_model

        return load_distributed_text_model(source, kernels, request.template, key_file=request.swarm[0], say=say)
    return load_text_model(source, kernels, request.template, say=say, before_weights=request.tokenize,
                           pin=request.pin)


def _run_engine(source, request: Request, kernels, as_json, say):
    from generation.sampling import Sampler
    from generation.stream import generate

    started = time.perf_counter()
    model = open_model(source, request, kernels, say)
    load_s = time.perf_counter() - started
    if not request.prompt_tokens:  # a loader that could not tokenize before loading the weights
        request.tokenize(model.tokenizer, model.context_length)
    capacity = min(request.ctx, model.context_length, len(request.prompt_tokens) + request.max_tokens)
    session = model.open_session(capacity)
    try:
        result = generate(session, model.tokenizer, request.prompt_tokens, request.max_tokens,
                          Sampler(request.params), request.stops, _stream(as_json))
    except KeyboardInterrupt:
        if not as_json:
            sys.stdout.write("\n")  # end the streamed line before "interrupted" on stderr
            sys.stdout.flush()
        raise
    finally:
        session.close()
    out = {"prompt_tokens": len(result.prompt_tokens), "tokens": result.tokens, "text": result.text,
           "stop_reason": result.stop_reason, "load_s": round(load_s, 3),
           "prefill_tok_s": round(result.prefill_tok_s, 2), "decode_tok_s": round(result.decode_tok_s, 2)}
    if request.swarm is not None:
        from swarm.client import timings as swarm_timings

        out.update(swarm_timings(model))  # route, failovers, node_ms, hop_overhead_ms
    return out


def _llama_cpp_seed(seed: int | None) -> int:
    """A seed for llama-cpp-python: no seed means a fresh random one each run (given None, it derives
    the same one from the model's load-time seed every run)."""
    import random

    return random.SystemRandom().randrange(2**31) if seed is None else seed % 2**32


def _run_llama_cpp(source, request: Request, threads, as_json, say):
    """The seed's bridge: the same request through llama.cpp, from a verified rebuild of the store."""
    from cli.common import open_store, resolve_source, usable_cores
    from engine.config import LlamaConfig
    from engine.tokenizer import Tokenizer
    from generation.stream import StopMatcher, check_fits
    from validation.reference import load_llama, materialized

    started = time.perf_counter()
    loader = open_store(resolve_source(source), allow_file=True)
    request.tokenize(Tokenizer(loader.metadata, loader.where),
                     LlamaConfig.from_metadata(loader.metadata, loader.where).context_length)
    prompt_tokens, params = request.prompt_tokens, request.params
    say(f"rebuilding {loader.where} into a temporary GGUF for llama.cpp...")
    with materialized(loader) as path:
        say("loading llama.cpp...")
        llm = load_llama(path, n_ctx=request.ctx, threads=threads or usable_cores())
        capacity = min(request.ctx, llm.n_ctx())  # (llama.cpp rounds the context up: --ctx is ours)
        check_fits(len(prompt_tokens), capacity)
        room = capacity - len(prompt_tokens)
        limit = min(request.max_tokens, room)
        load_s = time.perf_counter() - started
        say("ready")
        emit = _stream(as_json)
        stops = StopMatcher(request.stops)  # ours, not llama.cpp's: the same rule as the engine's, and
        t0 = time.perf_counter()            # it tells a stop string from the end of the turn
        pieces, first_at, finish = [], None, None
        stream = llm.create_completion(prompt_tokens, max_tokens=limit, temperature=params.temperature,
                                       top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                                       repeat_penalty=1.0, seed=_llama_cpp_seed(params.seed), stream=True)
        for chunk in stream:
            if first_at is None:
                first_at = time.perf_counter()
            choice = chunk["choices"][0]
            piece = stops.feed(choice["text"])
            pieces.append(piece)
            if emit and piece:
                emit(piece)
            finish = choice.get("finish_reason") or finish
            if stops.done:
                stream.close()
                break
        if not stops.done:
            tail = stops.flush()
            pieces.append(tail)
            if emit and tail:
                emit(tail)
        end = time.perf_counter()
        text = "".join(pieces)
        tokens = llm.tokenize(text.encode(), add_bos=False, special=True) if text else []
    if stops.done:
        stop_reason = "stop"
    elif finish == "length":
        stop_reason = "context" if request.max_tokens > room else "length"
    else:
        stop_reason = "eos"
    prefill_s = (first_at or end) - t0
    return {"prompt_tokens": len(prompt_tokens), "tokens": tokens, "text": text, "load_s": round(load_s, 3),
            "prefill_tok_s": round(len(prompt_tokens) / prefill_s, 2) if prefill_s else 0.0,
            "decode_tok_s": round((len(tokens) - 1) / (end - first_at), 2) if first_at and len(tokens) > 1 else 0.0,
            "stop_reason": stop_reason}

