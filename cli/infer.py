"""`infer`: generate text from a store (or a .gguf file), streaming it as it comes."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from cli.common import user_errors


def _set_threads(threads: int | None) -> None:
    """Must run before numpy/numba are imported: their thread pools read these once."""
    if threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[var] = str(threads)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", required=False)
@click.option("-p", "--prompt", required=True, help="What to ask (or, with --no-chat, the raw text to continue).")
@click.option("-n", "--max-tokens", default=256, show_default=True, type=click.IntRange(1), help="Tokens to generate at most.")
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 is greedy (deterministic).")
@click.option("--top-k", default=40, show_default=True, type=int, help="Keep the K likeliest tokens (0: off).")
@click.option("--top-p", default=0.95, show_default=True, type=float, help="Nucleus sampling, in (0, 1].")
@click.option("--min-p", default=0.05, show_default=True, type=float, help="Drop tokens below this share of the best.")
@click.option("--repeat-penalty", default=1.0, show_default=True, type=float, help="Penalize recent tokens (1: off).")
@click.option("--seed", type=int, help="Random seed: the same seed repeats a sampled run.")
@click.option("--stop", multiple=True, help="Stop when this text appears (not printed). Repeatable.")
@click.option("--system", help="System message for the chat template.")
@click.option("--template", help="Chat template: chatml, llama2, llama3, mistral, gemma, alpaca, zephyr "
                                 "(default: the model's own, else detected).")
@click.option("--no-chat", is_flag=True, help="Send the prompt as is, with no chat template.")
@click.option("--ctx", default=4096, show_default=True, type=click.IntRange(16), help="Context window (KV cache size).")
@click.option("--threads", type=click.IntRange(1), help="CPU threads (default: all cores).")
@click.option("--backend", type=click.Choice(["engine", "llama.cpp"]), default="engine", show_default=True,
              help="engine: this project's engine; llama.cpp: the same request through llama-cpp-python.")
@click.option("--kernels", type=click.Choice(["numba", "numpy"]), default="numba", show_default=True,
              help="numba: the fast path (weights stay quantized); numpy: the plain reference.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end instead of streaming.")
@user_errors
def infer(source, prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, stop, system,
          template, no_chat, ctx, threads, backend, kernels, as_json):
    """Generate text from SOURCE: a store directory or a .gguf file.

    With no SOURCE, the default model's store (made by scripts/setup.sh) is used. Text streams to
    stdout as it is generated; --json prints prompt_tokens, tokens, text, load_s, prefill_tok_s and
    decode_tok_s at the end instead.
    """
    _set_threads(threads)
    from common.errors import UserError
    from engine.sampling import SamplingParams

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, seed=seed).validate()
    if no_chat and (template or system):
        raise UserError("--no-chat sends the raw prompt: it cannot be combined with --template or --system")
    if template:
        from engine.chat import NAMED_TEMPLATES

        if template not in NAMED_TEMPLATES:
            raise UserError(f"unknown template {template!r} (choose from: {', '.join(sorted(NAMED_TEMPLATES))})")
    if source is None:
        from models.default import DEFAULT_STORE

        source = str(DEFAULT_STORE)
        if not os.path.isdir(source):
            raise UserError(f"{source}: the default model's store is missing; run scripts/setup.sh first")

    from cli.common import open_store
    from engine.chat import STOPS, chat_prompt
    from engine.tokenizer import Tokenizer

    started = time.perf_counter()
    loader = open_store(source, allow_file=True)
    tokenizer = Tokenizer(loader.metadata, loader.where)
    stops = list(stop)
    if no_chat:
        text = prompt
    else:
        text, used = chat_prompt(tokenizer, prompt, system, template)
        stops += STOPS.get(used, [])
    prompt_tokens = tokenizer.encode(text)

    if backend == "llama.cpp":
        result = _run_llama_cpp(loader, prompt_tokens, max_tokens, params, stops, ctx, threads, as_json, started)
    else:
        result = _run_engine(loader, tokenizer, prompt_tokens, max_tokens, params, stops, ctx, kernels, as_json,
                             started)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo()


def _stream(as_json: bool):
    if as_json:
        return None

    def out(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    return out


def _run_engine(loader, tokenizer, prompt_tokens, max_tokens, params, stops, ctx, kernels, as_json, started):
    from engine.config import LlamaConfig
    from engine.model import LlamaModel
    from engine.sampling import Sampler
    from generation.stream import check_fits, generate

    config = LlamaConfig.from_metadata(loader.metadata, loader.where)
    capacity = min(ctx, config.context_length)
    check_fits(len(prompt_tokens), capacity)  # before any weight is loaded
    model = LlamaModel(loader, backend=kernels)
    load_s = time.perf_counter() - started
    with model.open_session(min(capacity, len(prompt_tokens) + max_tokens)) as session:
        result = generate(session, tokenizer, prompt_tokens, max_tokens, Sampler(params), stops, _stream(as_json))
    return {"prompt_tokens": len(result.prompt_tokens), "tokens": result.tokens, "text": result.text,
            "stop_reason": result.stop_reason, "load_s": round(load_s, 3),
            "prefill_tok_s": round(result.prefill_tok_s, 2), "decode_tok_s": round(result.decode_tok_s, 2)}


def _run_llama_cpp(loader, prompt_tokens, max_tokens, params, stops, ctx, threads, as_json, started):
    """The seed's bridge: the same request through llama.cpp, from a verified rebuild of the store."""
    from generation.stream import check_fits
    from validation.reference import load_llama, materialized

    with materialized(loader) as path:
        llm = load_llama(path, n_ctx=ctx, threads=threads or os.cpu_count() or 2)
        check_fits(len(prompt_tokens), llm.n_ctx())
        load_s = time.perf_counter() - started
        emit = _stream(as_json)
        t0 = time.perf_counter()
        tokens, pieces, first_at = [], [], None
        for chunk in llm.create_completion(prompt_tokens, max_tokens=max_tokens, temperature=params.temperature,
                                           top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                                           repeat_penalty=params.repeat_penalty, seed=params.seed,
                                           stop=stops or None, stream=True):
            if first_at is None:
                first_at = time.perf_counter()
            piece = chunk["choices"][0]["text"]
            pieces.append(piece)
            if emit and piece:
                emit(piece)
        end = time.perf_counter()
        text = "".join(pieces)
        tokens = llm.tokenize(text.encode(), add_bos=False, special=True) if text else []
    prefill_s = (first_at or end) - t0
    return {"prompt_tokens": len(prompt_tokens), "tokens": tokens, "text": text, "load_s": round(load_s, 3),
            "prefill_tok_s": round(len(prompt_tokens) / prefill_s, 2) if prefill_s else 0.0,
            "decode_tok_s": round((len(tokens) - 1) / (end - first_at), 2) if first_at and len(tokens) > 1 else 0.0}
