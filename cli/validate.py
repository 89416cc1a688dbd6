"""`validate`: the engine and llama.cpp on the same tokens, side by side."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

from cli.common import user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.option("--gguf", "gguf_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The GGUF file llama.cpp loads as the reference (the store's source).")
@click.option("--prompt", "prompts", multiple=True, help="Prompt for the greedy comparison (repeatable; "
                                                         "default: five built-in prompts).")
@click.option("--positions", default=512, show_default=True, type=click.IntRange(1),
              help="Teacher-forced positions to compare: corpus text cut into sequences of at most 256 tokens "
                   "(less than the model's context), the last one shortened so the total is exactly this.")
@click.option("--greedy-tokens", default=32, show_default=True, type=click.IntRange(1),
              help="Tokens each engine generates greedily from every prompt; the runs must be identical.")
@click.option("--reference", type=click.Choice(["auto", "direct", "twin"]), default="auto", show_default=True,
              help="direct: llama.cpp on --gguf as given; twin: on an F32 copy of it (same weight values, no "
                   "activation quantization); auto: twin when any weight is quantized.")
@click.option("--no-chat", is_flag=True, help="Greedy prompts without the chat template.")
@click.option("--kernels", type=click.Choice(["numpy", "numba"]), default=None,
              help="Engine kernels (default: numpy to compare logits, numba with --speed).")
@click.option("--speed", is_flag=True, help="Measure prefill and decode tokens/s of the engine and of llama.cpp "
                                            "in one run instead of comparing logits.")
@click.option("--tokens", default=64, show_default=True, type=click.IntRange(1), help="--speed: tokens to decode.")
@click.option("--prompt-tokens", default=512, show_default=True, type=click.IntRange(1),
              help="--speed: prompt length for prefill.")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(1), help="--speed: alternating rounds.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1),
              help="CPU threads for both engines (llama.cpp's n_threads, and numpy/numba's pools); at most "
                   "the core count.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def validate(source, gguf_path, prompts, positions, greedy_tokens, reference, no_chat, kernels, speed, tokens,
             prompt_tokens, rounds, threads, as_json):
    """Compare this engine's logits and greedy text on SOURCE with llama.cpp's on --gguf.

    Reports max abs difference, NMSE, minimum cosine, top-1 agreement and mean KL(llama.cpp ||
    engine) over all positions, and whether greedy generations match; exits 1 when outside the
    thresholds (top-1 >= 0.99, mean KL <= 1e-3, min cosine >= 0.999, every greedy run identical).

    For quantized models llama.cpp rounds activations to Q8_0 before each product, which makes its
    own results depend on the batch size. The default therefore compares against llama.cpp on an
    F32 twin of --gguf (same weight values, written by gguf-py) and, beside it, reports the direct
    comparison (engine rounding activations like llama.cpp) and llama.cpp's own batch-512 vs
    batch-1 disagreement; the direct KL may not exceed max(1e-3, twice that noise floor).
    """
    from cli.common import set_threads
    from common.progress import Status

    threads = set_threads(threads)  # before numpy and numba are imported
    say = Status(enabled=not as_json and sys.stderr.isatty(), prefix="validate ")
    if speed:
        return _speed(source, gguf_path, kernels or "numba", tokens, prompt_tokens, rounds, threads, as_json, say)
    kernels = kernels or "numpy"
    from cli.common import open_store
    from common.errors import UserError
    from engine.model import LlamaModel
    from engine.tokenizer import Tokenizer
    from fragmenter.gguf_header import read_file_header
    from validation.compare import (DEFAULT_PROMPTS, engine_logits, llama_logits, logit_metrics,
                                    sequences_for)
    from validation.compare import validate as run
    from validation.reference import load_llama
    from validation.twin import is_float_model, write_f32_twin

    loader = open_store(source, allow_file=True)
    header = _same_model(loader, source, gguf_path)
    tokenizer = Tokenizer(loader.metadata, loader.where)
    quantized = not is_float_model([t.type_name for t in header.tensors])
    use_twin = reference == "twin" or (reference == "auto" and quantized)
    n_ctx = min(loader.manifest.model.get("context_length") or 2048, 2048)
    prompts = list(prompts) or DEFAULT_PROMPTS

    with tempfile.TemporaryDirectory(prefix="validate-") as tmp:
        if use_twin:
            say(f"writing the F32 twin of {gguf_path} (the reference: same weight values, no activation rounding)...")
            twin = write_f32_twin(gguf_path, Path(tmp) / "twin-f32.gguf")
            say(f"loading the engine ({kernels} kernels) from {source}...")
            _announce_compiling(kernels, say)
            model = LlamaModel(loader, backend=kernels)
            say("loading llama.cpp on the F32 twin...")
            llm = load_llama(twin, n_ctx=n_ctx, threads=threads, logits_all=True)
            report = run(model, tokenizer, llm, prompts, positions, greedy_tokens, not no_chat, say=say)
            report.reference = "f32-twin"
            del llm
            # The quantized file as given: engine with llama.cpp's activation rounding, and llama.cpp's own noise.
            seqs = sequences_for(model, tokenizer, positions)
            say(f"direct comparison: llama.cpp on {gguf_path} as given, batch 512...")
            direct_llm = load_llama(gguf_path, n_ctx=n_ctx, threads=threads, logits_all=True)
            reference_logits = llama_logits(direct_llm, seqs)
            say("direct comparison: the engine rounding activations as llama.cpp does...")
            emulating = LlamaModel(loader, emulate_llama_cpp=True)
            report.direct = logit_metrics(engine_logits(emulating, seqs), reference_logits)
            say("llama.cpp's own noise: the same positions one token at a time (batch 1)...")
            report.llama_cpp_self = logit_metrics(llama_logits(direct_llm, seqs, batch=1), reference_logits)
        else:
            say(f"loading the engine (numpy kernels, llama.cpp-style activations) from {source}...")
            model = LlamaModel(loader, emulate_llama_cpp=True)
            say(f"loading llama.cpp on {gguf_path}...")
            llm = load_llama(gguf_path, n_ctx=n_ctx, threads=threads, logits_all=True)
            report = run(model, tokenizer, llm, prompts, positions, greedy_tokens, not no_chat, say=say)
    say("done")
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=1))
    else:
        _print_report(report, source, gguf_path)
    sys.exit(0 if report.passed else 1)


def _same_model(loader, source, gguf_path):
    """The header of ``gguf_path``, if it holds the store's tensors, each of the same type and shape
    (another model, or another quantization of the same one, would be compared as if it were this)."""
    from common.errors import UserError
    from fragmenter.gguf_header import read_file_header

    header, _ = read_file_header(gguf_path)
    theirs = {(t.name, t.type_name, tuple(t.dims)) for t in header.tensors}
    ours = {(t.name, t.ggml_type, tuple(t.gguf_shape)) for t in loader.manifest.tensors}
    if theirs != ours:
        name = sorted(ours ^ theirs)[0][0]
        mine = next((t for t in ours if t[0] == name), None)
        other = next((t for t in theirs if t[0] == name), None)
        how = (f"only in {source}" if other is None else f"only in {gguf_path}" if mine is None else
               f"{other[1]} {list(other[2])} there, {mine[1]} {list(mine[2])} in the store")
        raise UserError(f"{gguf_path}: holds different tensors than {source} (tensor {name!r}: {how}); "
                        f"give the store's source file")
    return header


def _announce_compiling(kernels: str, say) -> None:
    from cli.common import kernels_need_compiling

    if kernels == "numba" and say.enabled and kernels_need_compiling():
        say("compiling kernels (first run only)...")


def _speed(source, gguf_path, kernels, tokens, prompt_tokens, rounds, threads, as_json, say) -> None:
    import time

    from cli.common import open_store
    from engine.model import LlamaModel
    from engine.tokenizer import Tokenizer
    from validation.corpus import corpus_prompt
    from validation.reference import load_llama
    from validation.speed import measure

    loader = open_store(source, allow_file=True)
    _same_model(loader, source, gguf_path)
    tokenizer = Tokenizer(loader.metadata, loader.where)
    prompt = corpus_prompt(tokenizer, prompt_tokens)
    n_ctx = len(prompt) + tokens + 8
    say(f"loading the engine ({kernels} kernels) from {source}...")
    _announce_compiling(kernels, say)
    start = time.perf_counter()
    model = LlamaModel(loader, backend=kernels)
    load_s = time.perf_counter() - start
    say(f"loading llama.cpp on {gguf_path}...")
    llm = load_llama(gguf_path, n_ctx=n_ctx, threads=threads, batch=512)
    say(f"timing {rounds} alternating rounds: {len(prompt)}-token prefill, then {tokens} tokens decoded...")
    report = measure(model, llm, prompt, tokens, rounds)
    compile_s = getattr(model.backend, "compile_s", 0.0) + getattr(model.decoder, "compile_s", 0.0)
    report.update(kernels=kernels, threads=threads, load_s=round(load_s, 2), compile_s=round(compile_s, 2))
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    e, r = report["engine"], report["llama_cpp"]
    click.echo(f"{source} ({kernels} kernels) vs llama.cpp on {gguf_path}, {threads} threads, "
               f"{len(prompt)}-token prompt, {tokens} tokens decoded, best of {rounds}")
    click.echo(f"  prefill  engine {e['prefill_tok_s']:8.1f} tok/s   llama.cpp {r['prefill_tok_s']:8.1f} tok/s   "
               f"ratio {report['prefill_ratio']:.2f}")
    click.echo(f"  decode   engine {e['decode_tok_s']:8.1f} tok/s   llama.cpp {r['decode_tok_s']:8.1f} tok/s   "
               f"ratio {report['decode_ratio']:.2f}")


def _print_report(report, source, gguf_path) -> None:
    from validation.compare import THRESHOLDS

    m = report.metrics
    ref = "its F32 twin" if report.reference == "f32-twin" else "the file as given"
    click.echo(f"{source} vs llama.cpp on {gguf_path} ({ref}); engine activations: {report.activations}")
    click.echo(f"  positions       {m['positions']}")
    click.echo(f"  max |diff|      {m['max_abs_diff']:.4g}")
    click.echo(f"  NMSE            {m['nmse']:.3g}")
    click.echo(f"  min cosine      {m['min_cosine']:.6f}   (>= {THRESHOLDS['min_cosine']})")
    click.echo(f"  top-1 agreement {m['top1_agreement']:.4f}   (>= {THRESHOLDS['top1_agreement']})")
    click.echo(f"  mean KL         {m['mean_kl']:.3g}   (<= {THRESHOLDS['mean_kl']})")
    for g in report.greedy:
        click.echo(f"  greedy {'match   ' if g['match'] else 'MISMATCH'} {g['prompt']!r}")
        if not g["match"]:
            click.echo(f"      engine:    {g['engine']!r}\n      llama.cpp: {g['llama_cpp']!r}")
    if report.direct is not None:
        d, s = report.direct, report.llama_cpp_self
        click.echo(f"  direct (quantized file, llama.cpp-style activations): mean KL {d['mean_kl']:.3g}, "
                   f"top-1 {d['top1_agreement']:.4f}, min cosine {d['min_cosine']:.5f}")
        click.echo(f"  llama.cpp vs itself (batch 512 vs 1):                  mean KL {s['mean_kl']:.3g}, "
                   f"top-1 {s['top1_agreement']:.4f}, min cosine {s['min_cosine']:.5f}")
        click.echo(f"  direct within max(1e-3, 2 x llama.cpp's own): {'yes' if report.direct_ok else 'NO'}")
    click.echo("PASS" if report.passed else "FAIL")
