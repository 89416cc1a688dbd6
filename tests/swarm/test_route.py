"""Routes over in-process nodes (factory model, 6 blocks): same tokens as local, failover with
replay, the clear error when no node serves a span, routing around full nodes, concurrency."""

import threading
import time

import pytest

from common.errors import UserError
from swarm import manifest_sha
from swarm.client import distributed_text_model, timings
from swarm.route import Busy, NodeInfo, NoRoute, plan
from tests.swarm.conftest import PROMPT, SwapAt, greedy, hidden, join, start_node

N = 10


def text_model(loader, nodes, **kw):
    return distributed_text_model(loader, [n.url for n in nodes], **kw)


def test_three_nodes_equal_local(six_loader, local_greedy):
    nodes = [start_node(six_loader, a, b) for a, b in [(0, 1), (2, 3), (4, 5)]]
    try:
        tm = text_model(six_loader, nodes)
        for prompt in (PROMPT, PROMPT[:3], [5, 400, 12]):
            with tm.open_session(64) as s:
                assert greedy(s, prompt, N) == local_greedy(prompt, N)
        t = timings(tm)
        assert [r["blocks"] for r in t["route"]] == ["0-1", "2-3", "4-5"]
        rows = tm.info["route"]()  # live, with each hop's measured ms per token
        assert [(r["node"], r["blocks"]) for r in rows] == [(r["node"], r["blocks"]) for r in t["route"]]
        assert all(r["ms_per_token"] > 0 for r in rows) and tm.info["distributed"]
        assert t["failovers"] == 0 and len(t["node_ms"]) == 3 and t["hop_overhead_ms"] > 0
        assert t["relayed_steps"] == 3 * (N - 1)  # every decode step went node to node (swarm/relay.py)
        # closed sessions are gone from the nodes
        assert all(not n.service.cache.sessions for n in nodes)
    finally:
        for n in nodes:
            n.stop()


def test_steps_hop_by_hop_give_the_same_tokens(six_loader, local_greedy):
    nodes = [start_node(six_loader, a, b) for a, b in [(0, 1), (2, 3), (4, 5)]]
    try:
        tm = text_model(six_loader, nodes, relay=False)
        with tm.open_session(64) as s:
            assert greedy(s, PROMPT, N) == local_greedy(PROMPT, N)
        assert timings(tm)["relayed_steps"] == 0
    finally:
        for n in nodes:
            n.stop()


def test_relays_go_through_the_loop_when_the_socket_would_not_take_them_at_once(six_loader, local_greedy,
                                                                                monkeypatch):
    """relay_step writes a RELAY before entering the loop only when the socket takes it whole
    (relay.write_now); otherwise it is sent from the loop, with the same tokens."""
    from swarm import relay

    calls = []

    def refuse(ws, data):
        calls.append(len(data))
        return False

    monkeypatch.setattr(relay, "write_now", refuse)
    nodes = [start_node(six_loader, a, b, lanes=False) for a, b in [(0, 1), (2, 3), (4, 5)]]  # (WebSocket relays)
    try:
        tm = text_model(six_loader, nodes)
        with tm.open_session(64) as s:
            assert greedy(s, PROMPT, N) == local_greedy(PROMPT, N)
        assert timings(tm)["relayed_steps"] == N - 1 and len(calls) >= N - 1
    finally:
        for n in nodes:
            n.stop()


def test_a_sessions_hops_are_parsed_once_and_relays_for_no_session_never(six_loader, local_greedy, monkeypatch):
    """Every relayed step of a session names the same hops: each node parses them at the session's
    first relay and keeps them with the session. A RELAY naming no open session is refused before
    its hops are looked at (a stranger cannot make a node hold parsed hops)."""
    import secrets

    import numpy as np

    from swarm import relay, wire
    from swarm.client import NodeLink

    parsed = []
    real = relay.parse_hops
    monkeypatch.setattr(relay, "parse_hops", lambda raw: parsed.append(len(raw)) or real(raw))
    nodes = [start_node(six_loader, a, b) for a, b in [(0, 1), (2, 3), (4, 5)]]
    try:
        tm = text_model(six_loader, nodes)
        with tm.open_session(64) as s:
            assert greedy(s, PROMPT, N) == local_greedy(PROMPT, N)
        assert timings(tm)["relayed_steps"] == N - 1
        assert len(parsed) == 2  # nodes 1 and 2 (node 3's relays name no next hop), once each
        hops = relay.pack_hops(tuple(relay.Hop(nodes[1].url, secrets.token_bytes(16), 2, 3) for _ in range(8)))
        stranger = NodeLink(nodes[0].url, dim=96, max_rows=32).connect()
        try:
            for i in range(5):
                frame = wire.Frame(wire.RELAY, secrets.token_bytes(16), 3, np.zeros((1, 96), np.float32),
                                   first_block=0, last_block=1, body=wire.Trailer(i, [], hops))
                reply = wire.decode(stranger.exchange(wire.encode(frame), 10))
                assert reply.type == wire.ERROR and reply.body["code"] == "unknown_session", reply.body
        finally:
            stranger.abort()
        assert len(parsed) == 2
    finally:
        for n in nodes:
            n.stop()


@pytest.mark.parametrize("spare_span", [(2, 3), (2, 5)])
def test_middle_node_killed_mid_generation(six_loader, local_greedy, spare_span):
    a, b, c = (start_node(six_loader, *s) for s in [(0, 1), (2, 3), (4, 5)])
    swap = None
    try:
        tm = text_model(six_loader, [a, b, c])
        expected = local_greedy(PROMPT, N)
        swap = SwapAt(tm, six_loader, b, spare_span, at=4)  # (the spare joins after the session began)
        with tm.open_session(64) as s:
            assert greedy(s, PROMPT, N, swap) == expected
            t = timings(tm)
            assert t["failovers"] == 1
            assert {"blocks": "2-3", "node": swap.spare.url} in t["route"]
            # the step that found b gone ran hop by hop (and failed over); the others were relayed
            assert t["relayed_steps"] == N - 2
    finally:
        for n in (a, b, c, swap and swap.spare):
            if n:
                n.stop()


def test_a_one_node_route_relays_and_fails_over_to_a_spare(six_loader, local_greedy):
    """A route of one node relays its decode steps too (the node answers its own RELAY: both ends
    take the step in their read callbacks); the node killed mid-generation, a spare that joined
    since takes the whole span, the history replayed, and the tokens are local greedy's."""
    only, swap = start_node(six_loader, 0, 5), None
    try:
        tm = text_model(six_loader, [only])
        swap = SwapAt(tm, six_loader, only, (0, 5), at=4)
        with tm.open_session(64) as s:
            assert greedy(s, PROMPT, N, swap) == local_greedy(PROMPT, N)
        t = timings(tm)
        assert t["failovers"] == 1 and t["route"] == [{"blocks": "0-5", "node": swap.spare.url}]
        assert t["relayed_steps"] == N - 2  # all but the step that found the node gone
        assert not swap.spare.service.cache.sessions
    finally:
        for n in (only, swap and swap.spare):
            if n:
                n.stop()


def test_a_relayed_round_trip_counts_the_clients_framing_and_write(six_loader, monkeypatch):
    """hop_overhead_ms compares relayed and hop-by-hop routes: both count the client's framing and
    write of the step, as a FORWARD's round trip does (a relay's once left them out)."""
    import swarm.client as swarm_client

    encode = swarm_client.wire.encode

    def slow_relay_encode(frame, *args, **kw):
        if frame.type == swarm_client.wire.RELAY:
            time.sleep(0.05)
        return encode(frame, *args, **kw)

    node = start_node(six_loader, 0, 5)
    try:
        tm = text_model(six_loader, [node])
        monkeypatch.setattr(swarm_client.wire, "encode", slow_relay_encode)
        with tm.open_session(64) as s:
            greedy(s, PROMPT, 4)
        t = timings(tm)
        assert t["relayed_steps"] == 3 and t["hop_overhead_ms"] >= 50, t
    finally:
        node.stop()


def test_no_spare_names_the_lost_blocks(six_loader):
    a, b, c = (start_node(six_loader, *s) for s in [(0, 1), (2, 3), (4, 5)])
    try:
        tm = text_model(six_loader, [a, b, c])
        with tm.open_session(64) as s:
            with pytest.raises(UserError, match="no node serves blocks 2-3") as e:
                greedy(s, PROMPT, N, lambda i: b.stop() if i == 2 else None)
        assert "\n" not in str(e.value)
    finally:
        for n in (a, b, c):
            n.stop()


def test_route_around_full_node_and_short_node(six_loader, local_greedy):
    full = start_node(six_loader, 0, 5, max_sessions=1)
    short = start_node(six_loader, 0, 5, max_positions=4)
    other = start_node(six_loader, 0, 5)
    try:
        tm = text_model(six_loader, [full, short, other])
        blocker = full.service.cache.open(b"x" * 16, object(), 0, 5, 8)  # someone else holds the one slot
        with tm.open_session(64) as s:
            assert greedy(s, PROMPT, N) == local_greedy(PROMPT, N)
        assert timings(tm)["route"] == [{"blocks": "0-5", "node": other.url}]
        assert blocker.sid in full.service.cache.sessions
    finally:
        for n in (full, short, other):
            n.stop()


def test_eight_concurrent_sessions(six_loader):
    a, b = start_node(six_loader, 0, 2), start_node(six_loader, 3, 5)
    try:
        tm = text_model(six_loader, [a, b], kernels="numpy")  # numpy edges: safe from many threads
        prompts = [[1 + i, 17 * i % 500, 99, 23 + i] for i in range(8)]
        alone = []
        for p in prompts:
            with tm.open_session(64) as s:
                alone.append(greedy(s, p, N))
        together = [None] * 8
        barrier = threading.Barrier(8)

        def run(i):
            with tm.open_session(64) as s:
                barrier.wait(30)
                together[i] = greedy(s, prompts[i], N)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert together == alone
        assert len(set(map(tuple, alone))) > 1  # the prompts do lead to different outputs
    finally:
        a.stop()
        b.stop()


def test_wrong_model_is_skipped(six_loader, factory_models):
    from distribution.gguf_file import GGUFFileLoader

    node = start_node(six_loader, 0, 5)
    try:
        other = GGUFFileLoader(factory_models["q8_0-spm-gqa"])
        tm = distributed_text_model(other, [node.url])
        with pytest.raises(NoRoute, match="serves another model"):
            tm.open_session(16)
        assert manifest_sha(other) != manifest_sha(six_loader)
    finally:
        node.stop()


def info(url, first, last, ms=1.0, rtt=0.1, free=4, positions=100):
    return NodeInfo(url, first, last, ms, free, positions, rtt, max_sessions=4)


def test_plan_prefers_fast_nodes_and_uses_sub_spans():
    nodes = [info("a", 0, 9, ms=10), info("b", 10, 29, ms=20), info("c", 0, 14, ms=3), info("d", 20, 29, ms=100)]
    hops = [(n.url, a, b) for n, a, b in plan(nodes, 0, 29)]
    assert hops == [("c", 0, 14), ("b", 15, 29)]
    with pytest.raises(NoRoute, match=r"no usable node serves blocks 15-19 \(b: failed\)"):
        plan(nodes, 10, 19, exclude={"b"})
    with pytest.raises(NoRoute, match="no node serves blocks 30-31"):
        plan(nodes, 28, 31)
    with pytest.raises(Busy, match=r"every node serving blocks 10-29 is busy \(b: all 4 sessions taken\)"):
        plan([info("a", 0, 9), info("b", 10, 29, free=0)], 0, 29)
    with pytest.raises(Busy, match=r"blocks 10-29 is busy \(b: node full: frames in flight"):
        plan([info("a", 0, 9), info("b", 10, 29)], 0, 29, exclude={"b": ("node full: frames in flight", True)})
    with pytest.raises(NoRoute, match=r"no usable node serves blocks 10-29 \(b: internal: boom\)") as e:
        plan([info("a", 0, 9), info("b", 10, 29)], 0, 29, exclude={"b": ("internal: boom", False)})
    assert not isinstance(e.value, Busy)  # a node that failed stays out for EXCLUDE_S: no point waiting


def test_a_busy_swarm_is_asked_again_before_the_error(six_loader, local_greedy, monkeypatch):
    import swarm.route as route

    node = start_node(six_loader, 0, 5, max_sessions=1)
    try:
        tm = text_model(six_loader, [node])
        blocker = node.service.cache.open(b"x" * 16, object(), 0, 5, 8)  # another client's session
        threading.Timer(0.2, node.service.cache.close, [blocker.sid]).start()  # ... ends soon
        with tm.open_session(64) as s:  # the first look finds the node full; a later one does not
            assert greedy(s, PROMPT, N) == local_greedy(PROMPT, N)
        monkeypatch.setattr(route, "BUSY_WAITS", (0.05, 0.05))
        node.service.cache.open(b"y" * 16, object(), 0, 5, 8)  # and now it stays full
        with pytest.raises(Busy, match=rf"every node serving blocks 0-5 is busy \({node.url}: all 1 sessions taken"):
            tm.open_session(64)
        asked = []
        real_query = route.query_info
        monkeypatch.setattr(route, "query_info", lambda url, key=None: (asked.append(url), real_query(url, key))[1])
        gone = "ws://127.0.0.1:9/swarm"  # unreachable (a black hole would take 10 s per look)
        tm = distributed_text_model(six_loader, [node.url, gone])
        with pytest.raises(Busy, match=rf"is busy \({node.url}: all 1 sessions taken\); nodes found but not usable: {gone}: cannot connect"):
            tm.open_session(64)
        assert asked.count(node.url) == 3 and asked.count(gone) == 1  # only the busy one is asked again
    finally:
        node.stop()


def test_node_that_stops_answering_times_out_and_is_replaced(six_loader, local_greedy):
    import asyncio

    a, b, spare = (start_node(six_loader, *s) for s in [(0, 2), (3, 5), (3, 5)])
    hang, release = threading.Event(), threading.Event()
    step = b.service._step

    async def slow(*args):  # b goes on holding its connection but stops answering (on its own loop:
        if hang.is_set():   # the in-process nodes share one compute thread, as processes would not)
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 60)
        return await step(*args)

    step_now = b.service._step_now

    def slow_now(*args):  # the same for relayed steps taken in the read callback (relay_now): the
        if hang.is_set():  # node's loop stalls
            release.wait(60)
        return step_now(*args)

    lane_frame = b.service.lane_frame

    def deaf(lane, data):  # and on its lanes it reads and never answers (a node that hung there would
        if not hang.is_set():  # hold the compute thread these in-process nodes share)
            lane_frame(lane, data)

    b.service._step, b.service._step_now, b.service.lane_frame = slow, slow_now, deaf
    try:  # (b never answers: the timeout is certain; every other step has 4 s, on a loaded machine too)
        tm = distributed_text_model(six_loader, [a.url, b.url], step_timeout=4.0)
        with tm.open_session(64) as s:
            def stall(i):
                if i == 3:
                    hang.set()
                    join(tm, spare.url)
            assert greedy(s, PROMPT, N, stall) == local_greedy(PROMPT, N)
        t = timings(tm)
        assert t["failovers"] == 1
        assert t["route"] == [{"blocks": "0-2", "node": a.url}, {"blocks": "3-5", "node": spare.url}]
    finally:
        release.set()
        for n in (a, b, spare):
            n.stop()


def test_a_failed_node_is_not_asked_again_while_it_is_passed_over(six_loader, monkeypatch):
    """A failover's look at the directory skips the nodes that failed a moment ago (plan passes
    over them anyway): a frozen node would hold each look for the INFO query's whole timeout. A
    node passed over only for being full is asked again: it may have room by now."""
    from swarm import route
    from swarm.client import NodeError

    a, b, spare = (start_node(six_loader, *s) for s in [(0, 2), (3, 5), (3, 5)])
    asked = []
    real = route.query_info
    monkeypatch.setattr(route, "query_info", lambda url, key=None: asked.append(url) or real(url, key))
    try:
        swarm = text_model(six_loader, [a, b, spare]).open_session.__self__
        swarm.exclude(NodeError(b.url, "timeout", "no reply within 1 s"))
        chain = swarm.open_chain(3, 5, 64)
        assert [s.url for s in chain] == [spare.url] and b.url not in asked and spare.url in asked
        for s in chain:
            s.close()
        spare.stop()
        with pytest.raises(NoRoute, match="no node serves blocks 3-5") as e:
            swarm.open_chain(3, 5, 64)
        assert f"{b.url}: failed a moment ago (no reply within 1 s)" in str(e.value) and b.url not in asked
        swarm.excluded.clear()
        swarm.exclude(NodeError(b.url, "full", "node full"))
        with pytest.raises(Busy):  # asked, full (for 1 s): awaited, then asked again
            monkeypatch.setattr(route, "BUSY_WAITS", ())
            swarm.open_chain(3, 5, 64)
        assert b.url in asked
    finally:
        for n in (a, b, spare):
            n.stop()


def test_plan_prefers_idle_nodes_and_those_that_hold_the_session():
    busy, idle = info("busy", 0, 9, ms=10, free=1), info("idle", 0, 9, ms=12, free=4)
    assert [n.url for n, _, _ in plan([busy, idle], 0, 9)] == ["idle"]
    short, roomy = info("short", 0, 9, ms=1, positions=10), info("roomy", 0, 9, ms=5, positions=100)
    assert [n.url for n, _, _ in plan([short, roomy], 0, 9, positions=50)] == ["roomy"]
    assert [n.url for n, _, _ in plan([short], 0, 9, positions=50)] == ["short"]  # better than nothing


def test_float16_wire_is_an_option(six_loader):
    import numpy as np

    a, b = start_node(six_loader, 0, 2), start_node(six_loader, 3, 5)
    try:
        logits = {}
        for dtype in ("float32", "float16"):
            tm = distributed_text_model(six_loader, [a.url, b.url], dtype=dtype)
            with tm.open_session(64) as s:
                logits[dtype] = s.feed(PROMPT)
        # half the bytes on the wire, the same answer up to float16 rounding of the hidden states
        np.testing.assert_allclose(logits["float16"], logits["float32"], rtol=0.05, atol=0.05)
        assert not np.array_equal(logits["float16"], logits["float32"])
    finally:
        a.stop()
        b.stop()


def test_a_session_driven_from_inside_a_running_loop(six_loader, local_greedy):
    """As the API server does: feed and close from a coroutine (each call then runs the session's
    loop on a helper thread); the same tokens, and the node's session is gone after close."""
    import asyncio
    import time

    nodes = [start_node(six_loader, 0, 2), start_node(six_loader, 3, 5)]
    try:
        tm = text_model(six_loader, nodes)

        async def generate():
            s = tm.open_session(64)
            try:
                return greedy(s, PROMPT, 6)
            finally:
                s.close()

        assert asyncio.run(generate()) == local_greedy(PROMPT, 6)
        assert timings(tm)["relayed_steps"] == 5
        deadline = time.monotonic() + 10
        while any(n.service.cache.sessions for n in nodes) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(n.service.cache.sessions for n in nodes)
    finally:
        for n in nodes:
            n.stop()


def test_relay_timeout_follows_the_recent_steps():
    from swarm.client import RELAY_MIN_S, relay_timeout

    assert relay_timeout(30.0, []) == 30.0                      # nothing measured yet: the step timeout
    assert relay_timeout(30.0, [0.01, 0.012, 0.011]) == RELAY_MIN_S  # fast steps: the floor
    assert relay_timeout(30.0, [0.5, 0.4, 0.6]) == 5.0            # ten times the median
    assert relay_timeout(3.0, [0.5, 0.4, 0.6]) == 3.0             # never beyond the step timeout


def test_after_a_rewind_one_step_goes_hop_by_hop_then_relaying_resumes(six_loader, local_greedy):
    import numpy as np

    nodes = [start_node(six_loader, a, b) for a, b in [(0, 1), (2, 3), (4, 5)]]
    try:
        tm = text_model(six_loader, nodes)
        with tm.open_session(64) as s:
            first = greedy(s, PROMPT, N)
            s.rewind(len(PROMPT) + 3)  # keep the prompt and three generated tokens
            again, route = [], s.route[0]
            for token in first[3:-1]:
                again.append(int(np.argmax(s.feed([token]))))
                assert route.relay_failures == 0  # no relay was tried where it could not append
            assert again == first[4:]
        # N - 1 relayed before; after the rewind the first step went as FORWARDs (the nodes rewind
        # only on those: a relayed step that does not append is refused), the others relayed
        assert timings(tm)["relayed_steps"] == (N - 1) + (len(first[3:-1]) - 1)
        assert timings(tm)["failovers"] == 0
    finally:
        for n in nodes:
            n.stop()



def test_a_step_refused_as_busy_is_sent_again_until_the_node_is_free(six_loader):
    """A relayed step failing at a dead node while an earlier node still computes it: the client's
    hop-by-hop step reaches that node part-way through (code `busy`) and is sent again shortly,
    not failed over (once taken for a dead node, which on a route with no spare ended it)."""
    from swarm.client import NodeError, RemoteSpanSession

    node = start_node(six_loader, 0, 5)
    span = RemoteSpanSession(node.url, 0, 5, 32, 96, step_timeout=1.0)
    try:
        span.forward(hidden(4, 1))
        session = node.service.cache.sessions[span.sid]
        session.busy = True  # (as during the relayed step's compute on this node)
        threading.Timer(0.3, lambda: setattr(session, "busy", False)).start()
        t0 = time.monotonic()
        out = span.forward(hidden(1, 2))
        assert 0.25 < time.monotonic() - t0 < 1.0 and out.shape == (1, 96) and span.position == 5
        session.busy = True  # busy past the step's time: the node's error, for failover as any other
        with pytest.raises(NodeError, match="part-way through a step") as e:
            span.forward(hidden(1, 3))
        assert e.value.code == "busy"
    finally:
        span.close()
        node.stop()
