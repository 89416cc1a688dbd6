"""`api`: an OpenAI-compatible HTTP API and a web chat page over any source."""

from __future__ import annotations

import asyncio
import sys

import click

from cli.common import check_distributed_options, distributed_options, pin_option, user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", required=False)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--parallel", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Requests generated at once, each in its own session (KV cache of --ctx positions).")
@click.option("--queue", "queue_size", default=16, show_default=True, type=click.IntRange(0, 100000),
              help="Requests that may wait for a free slot; beyond that the server answers 503.")
@click.option("--api-key", help="Require 'Authorization: Bearer KEY' on /v1/*, /info and /metrics.")
@click.option("--ctx", default=4096, show_default=True, type=click.IntRange(16),
              help="Context window per session (at most the model's).")
@click.option("--template", help="Chat template: chatml, llama2, llama3, mistral, gemma, alpaca, zephyr "
                                 "(default: the model's own, else detected).")
@click.option("--kernels", type=click.Choice(["numba", "numpy"]), default="numba", show_default=True,
              help="numba: the fast path (weights stay quantized); numpy: the plain reference.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads (default: all cores; at most the core count).")
@pin_option
@distributed_options
@user_errors
def api(source, host, port, parallel, queue_size, api_key, ctx, template, kernels, threads, pin, distributed, nodes,
        swarm_key):
    """Serve SOURCE (a store directory, a .gguf file, an http:// store address or a p2p:// address)
    over an OpenAI-compatible API, with a chat page at /.

    Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (with "stream": true
    as server-sent events), GET /health, GET /metrics (Prometheus), GET /info. The server listens at
    once and prints its URL; until the model is loaded, /health and the page show the loading
    progress and completion requests get 503. Sampling defaults follow llama-server's (temperature
    0.8, top-k 40, top-p 0.95, min-p 0.05). With no SOURCE, the default model's store is used.
    Ctrl-C stops it.
    """
    from cli.common import set_threads

    set_threads(threads)  # before numpy and numba are imported
    from common.errors import UserError

    if template:
        from engine.chat import NAMED_TEMPLATES

        if template not in NAMED_TEMPLATES:
            raise UserError(f"unknown template {template!r} (choose from: {', '.join(sorted(NAMED_TEMPLATES))})")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty")
    check_distributed_options(distributed, nodes, swarm_key)
    swarm = {"nodes": list(nodes), "key_file": swarm_key} if distributed else None
    if source is None or "://" not in source:  # a local source is checked before listening
        import os

        from cli.common import resolve_source

        source = resolve_source(source)
        if not os.path.exists(source):
            raise UserError(f"{source}: no such store directory or GGUF file")
    try:
        asyncio.run(_serve(source, host, port, parallel, queue_size, api_key, ctx, template, kernels, swarm, pin))
    except KeyboardInterrupt:
        click.echo("stopped", err=True)


async def _serve(source, host, port, parallel, queue_size, api_key, ctx, template, kernels, swarm, pin) -> None:
    from api.loading import LoadingModel
    from api.server import make_app, start
    from common import compute
    from common.aio_server import quiet_logs
    from common.progress import Status

    quiet_logs(prefix="api")  # a malformed request or a failed accept: one line, rate-limited

    compute.start()  # before loading begins: every kernel, loading's included, runs on this one thread
    model = LoadingModel(model_loader(source, kernels, template, Status(enabled=sys.stderr.isatty()), swarm, pin))
    app = make_app(model, parallel=parallel, queue_size=queue_size, api_key=api_key, context=ctx)
    runner, bound = await start(app, host, port)
    try:
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"api: listening on http://{shown}:{bound}/ (OpenAI API under /v1, chat page at /)")
        while not model.ready_event.is_set():  # polled: a thread blocked in wait() would delay Ctrl-C
            await asyncio.sleep(0.1)
        if model.status == "failed":
            raise model.exception
        click.echo(f"api: model ready: {model.text_model.name}")
        await asyncio.Event().wait()  # serve until Ctrl-C
    finally:
        await runner.cleanup()


def model_loader(source, kernels, template, status, swarm: dict | None = None, pin: bool = False):
    """``load(progress)`` for a ``LoadingModel``: the stages go to ``progress`` (and to ``status`` on
    stderr), and so do the bytes of fragments being fetched from a remote source. ``swarm``
    ({"nodes", "key_file"}): the blocks run on swarm nodes. ``pin``: see ``load_text_model``."""

    def load(progress):
        from cli.common import load_distributed_text_model, load_text_model
        from common.progress import watch_progress

        def say(message: str) -> None:
            progress(message)
            status(message)

        stop = watch_progress(lambda desc, done, total: progress(desc, done, total, "B"))
        try:
            # The engine loads its kernels' weights on the server's compute thread (common.compute).
            if swarm is not None:
                return load_distributed_text_model(source, kernels, template, say=say, **swarm)
            return load_text_model(source, kernels, template, say=say, pin=pin)
        finally:
            stop()

    return load


