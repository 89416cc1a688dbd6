"""`node`: run a span of transformer blocks for the swarm's clients."""

from __future__ import annotations

import click

from cli.common import user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.option("--layers", required=True, help="The blocks to run, e.g. 0-9.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=0, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--listen", default="/ip4/127.0.0.1/tcp/0", show_default=True, help="libp2p listen multiaddr.")
@click.option("--bootstrap", multiple=True, help="A peer to join through: p2p://<manifest>@<multiaddr> or the "
                                                 "bare multiaddr (repeatable).")
@click.option("--max-sessions", default=16, show_default=True, type=click.IntRange(1),
              help="Sessions held at once; one more is refused with a `full` error (its client routes elsewhere).")
@click.option("--max-positions", default=4096, show_default=True, type=click.IntRange(1),
              help="Positions (prompt + generated tokens) per session; beyond them, a `too_long` error.")
@click.option("--max-cache-mb", default=1024, show_default=True, type=click.IntRange(1),
              help="Memory for all sessions' KV caches together; a session that does not fit gets `full`.")
@click.option("--max-inflight-mb", default=256, show_default=True, type=click.IntRange(1),
              help="Memory for frames being received, computed and answered, all connections together (at "
                   "least one frame of --max-positions rows); a frame that does not fit is not read until it "
                   "does, for up to 10 s, then gets `full`.")
@click.option("--idle", default=600, show_default=True, type=click.IntRange(1),
              help="Seconds before an idle session is dropped and its connection closed (the client replays it).")
@click.option("--max-sessions-per-connection", "per_connection", default=0, show_default=True,
              type=click.IntRange(0), help="Sessions one connection may hold, one more gets `full`; 0: half of "
                                           "--max-sessions (at least 1).")
@click.option("--swarm-key", type=click.Path(dir_okay=False), help="Private swarm: the shared secret's file.")
@click.option("--announce", help="HOST[:PORT] others reach this node at (behind NAT or a proxy).")
@click.option("--kernels", type=click.Choice(["numba", "numpy"]), default="numba", show_default=True,
              help="numba: the fast path; numpy: the plain reference (the same on every node of a route).")
@click.option("--pin/--no-pin", default=True, show_default=True,
              help="Keep the thread that runs the blocks on one CPU and the kernels' other threads on the rest, "
                   "so the scheduler never stacks them (steps that stalled 7-37 ms on a busy machine; "
                   "common/affinity.py). Within the CPUs allowed, e.g. by taskset.")
@click.option("--lanes/--no-lanes", default=True, show_default=True,
              help="Take relayed decode steps on a lane too: plain TCP read by the thread that computes, "
                   "without the WebSocket's event loop (swarm/lane.py; the WebSocket serves them either way).")
@click.option("--lane-port", default=0, show_default=True, type=click.IntRange(0, 65535),
              help="The lanes' TCP port, on --host; 0 picks a free port (advertised to clients in INFO).")
@user_errors
def node(source, layers, host, port, listen, bootstrap, max_sessions, max_positions, max_cache_mb, max_inflight_mb,
         idle, per_connection, swarm_key, announce, kernels, pin, lanes, lane_port):
    """Serve blocks A-B of SOURCE (a store directory, http://, p2p:// or .gguf) to the swarm.

    Loads only those blocks, joins the DHT, announces its span under the model's per-block keys
    and prints its address, p2p://<manifest sha256>@<multiaddr>, for clients and other nodes to
    bootstrap from. The span's fragments are served to other peers too (from a store directory, or
    from the fragment cache for http:// and p2p:// sources). Clients connect with
    `infer p2p://... --distributed`. Ctrl-C stops it.
    """
    import tempfile

    from cli.common import open_store, set_threads

    set_threads(None)  # before numba starts its threads: brief OpenMP spinning (see cli.common)
    from common import compute
    from common.jobloop import JobLoop
    from common.errors import UserError
    from distribution.addresses import other_manifests, parse_announce, parse_bootstrap
    from common.aio_server import check_port
    from distribution.spans import parse_spans
    from engine.model import LlamaModel
    from swarm import manifest_sha
    from swarm.memory import Limits
    from swarm.node import serve_node, store_of
    from swarm.server import NodeService
    from swarm.wire import load_key

    check_port(host, port)  # before the model loads
    if lanes:
        check_port(host, lane_port, "--lane-port")
    compute.adopt(JobLoop())  # this thread loads, then computes every step and reads the lanes (swarm/node.py)
    try:
        spans = parse_spans(layers)
    except UserError as e:
        if "expected spans like" not in str(e):
            raise
        # (that hint names the comma form too, which a node does not take)
        raise UserError(f"--layers {layers!r}: a node runs one span of blocks, like 0-9 or 10-29") from None
    if len(spans) != 1:
        raise UserError(f"--layers {layers!r}: a node runs one contiguous span, like 0-9")
    key = load_key(swarm_key) if swarm_key else None
    public = parse_announce(announce)
    boots = parse_bootstrap(bootstrap)
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    loader = open_store(source, allow_file=True)
    blocks = loader.manifest.model.get("block_count")
    if isinstance(blocks, int) and spans[0][1] >= blocks:
        raise UserError(f"--layers {layers}: {source} has blocks 0-{blocks - 1}")
    # Blocks only: clients hold the embedding and the head (engine/session.py RoutedSession). The
    # engine loads on this thread, the one that will step the model.
    model = LlamaModel(loader, backend=kernels, layers=spans[0], edges=False)
    limits = Limits(max_sessions=max_sessions, max_positions=max_positions, max_cache_bytes=max_cache_mb << 20,
                    idle_s=idle, per_connection=per_connection, max_inflight_bytes=max_inflight_mb << 20)
    service = NodeService(model, manifest_sha(loader), limits, key)
    for other in other_manifests(bootstrap, service.manifest_sha):
        say(f"note: --bootstrap names manifest {other[:12]}..., this node serves {service.manifest_sha[:12]}... "
            f"(another model, or another fragmenting of it): clients of that address will not use this node; "
            f"they find it at the p2p:// address it prints")
    with tempfile.TemporaryDirectory(prefix="node-store-") as scratch:
        serve_node(service, host, port, listen, boots, public, store_of(loader, source, scratch), say, pin, lanes,
                   lane_port)
