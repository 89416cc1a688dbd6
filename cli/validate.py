"""`validate`: the engine and llama.cpp on the same tokens, side by side."""

from __future__ import annotations

import json
import sys

import click

from cli.common import user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.option("--gguf", "gguf_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The GGUF file llama.cpp loads as the reference (the store's source).")
@click.option("--prompt", "prompts", multiple=True, help="Prompt for the greedy comparison (repeatable; "
                                                         "default: five built-in prompts).")
@click.option("--positions", default=512, show_default=True, type=click.IntRange(1),
              help="Teacher-forced positions to compare.")
@click.option("--greedy-tokens", default=32, show_default=True, type=click.IntRange(1))
@click.option("--activations", type=click.Choice(["llama.cpp", "float"]), default="llama.cpp", show_default=True,
              help="llama.cpp: round activations as llama.cpp's CPU kernels do (Q8_0 for quantized weights, "
                   "F16 K/V); float: keep them in float32.")
@click.option("--no-chat", is_flag=True, help="Greedy prompts without the chat template.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def validate(source, gguf_path, prompts, positions, greedy_tokens, activations, no_chat, threads, as_json):
    """Compare this engine's logits and greedy text on SOURCE with llama.cpp's on --gguf.

    Reports max abs difference, NMSE, minimum cosine, top-1 agreement and mean KL over all
    positions, and whether greedy generations match. Exits 1 when outside the thresholds
    (top-1 >= 0.99, mean KL <= 1e-3, min cosine >= 0.999, every greedy run identical).
    """
    from cli.common import open_store
    from engine.model import LlamaModel
    from engine.tokenizer import Tokenizer
    from validation.compare import DEFAULT_PROMPTS, THRESHOLDS
    from validation.compare import validate as run
    from validation.reference import load_llama

    loader = open_store(source, allow_file=True)
    tokenizer = Tokenizer(loader.metadata, loader.where)
    model = LlamaModel(loader, emulate_llama_cpp=(activations == "llama.cpp"))
    llm = load_llama(gguf_path, n_ctx=min(model.config.context_length, 2048), threads=threads, batch=512,
                     logits_all=True)
    report = run(model, tokenizer, llm, list(prompts) or DEFAULT_PROMPTS, positions, greedy_tokens, not no_chat)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=1))
    else:
        m = report.metrics
        click.echo(f"{source} vs llama.cpp ({gguf_path}), activations: {report.activations}")
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
        click.echo("PASS" if report.passed else "FAIL")
    sys.exit(0 if report.passed else 1)
