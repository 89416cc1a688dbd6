"""A node under bad frames and at its limits: an error reply each time, and the other sessions go on
as if nothing happened. Private swarms: without the key nothing is served."""

import secrets

import numpy as np
import pytest

from engine.session import LocalSpanSession
from swarm import wire
from swarm.client import NodeError, NodeLink, RemoteSpanSession, distributed_text_model
from swarm.route import NoRoute
from tests.swarm.conftest import KEY, PROMPT, check_alive, greedy, hidden, start_node


@pytest.fixture(scope="module")
def node(six_loader):
    n = start_node(six_loader, 0, 2, max_sessions=4, max_positions=32)
    yield n
    n.stop()


class Told(list):
    """A relaying node's client connection as RelayLinks sees it: what it is told, decoded."""

    async def send_bytes(self, data):
        self.append(wire.decode(data))


def relay_to_nowhere(step: int):
    """A RELAY for a session the next node does not have (it refuses, naming ``step``): that
    session's id, and the frame's bytes."""
    sid = secrets.token_bytes(16)
    data = wire.encode(wire.Frame(wire.RELAY, sid, 3, hidden(2), first_block=0, last_block=0,
                                  body=wire.Trailer(step, [1])))
    return sid, data


async def until(check, tries: int = 250) -> None:
    import asyncio

    for _ in range(tries):
        if check():
            return
        await asyncio.sleep(0.02)


def error_of(link, data) -> dict:
    reply = wire.decode(link.exchange(data, 10))
    assert reply.type == wire.ERROR, reply
    return reply.body


def frame(rows=2, cols=96, session=None, position=0, first=0, last=2, **kw):
    return wire.Frame(wire.FORWARD, session or secrets.token_bytes(16), position, hidden(rows, dim=cols),
                      first_block=first, last_block=last, **kw)


def test_bad_frames_get_error_replies_and_others_are_unaffected(node, reference):
    # a session in the middle of its work, on its own connection, throughout
    bystander = RemoteSpanSession(node.url, 0, 2, 32, 96)
    mirror = LocalSpanSession(reference, 32)
    np.testing.assert_array_equal(bystander.forward(hidden(4)), mirror.forward(hidden(4)))

    link = NodeLink(node.url).connect()
    good = wire.encode(frame())
    bad = {
        "garbage": (secrets.token_bytes(100), "bad_frame"),
        "empty": (b"", "bad_frame"),
        "truncated": (good[:-10], "bad_frame"),
        "padded": (good + b"xx", "bad_frame"),
        "bad magic": (b"XXXX" + good[4:], "bad_frame"),
        "bad version": (good[:4] + b"\x09" + good[5:], "bad_frame"),
        "unknown type": (good[:5] + b"\x63" + good[6:], "bad_frame"),
        "wrong width": (wire.encode(frame(cols=64)), "bad_shape"),
        "too many rows": (wire.encode(frame(rows=33)), "too_long"),
        "blocks not served": (wire.encode(frame(first=2, last=4)), "span"),
        "zero session": (wire.encode(frame(session=bytes(16))), "wrong_session"),
        "unknown session": (wire.encode(frame(position=5)), "unknown_session"),
        "another's session": (wire.encode(frame(session=bystander.sid, position=4)), "wrong_session"),
        "result sent to a node": (wire.encode(wire.Frame(wire.RESULT, b"s" * 16, 0, hidden(1))), "bad_frame"),
    }
    for name, (data, code) in bad.items():
        assert error_of(link, data)["code"] == code, name
    # a position gap in one's own session
    sid = secrets.token_bytes(16)
    link.request(frame(session=sid), 10)
    assert error_of(link, wire.encode(frame(session=sid, position=7)))["code"] == "position"
    # text instead of binary
    link.run(link.ws.send_str("hello"), 5)
    reply = wire.decode(link.run(link.next_message(), 5).data)
    assert reply.body["code"] == "bad_frame"
    # the same connection still works after all that
    assert link.request(frame(), 10).type == wire.RESULT
    link.abort()

    # a message beyond the node's size limit closes only that connection
    huge = NodeLink(node.url).connect()
    with pytest.raises(NodeError):
        huge.exchange(b"\0" * (node.service.max_message + 10_000), 10)

    np.testing.assert_array_equal(bystander.forward(hidden(1, seed=9)), mirror.forward(hidden(1, seed=9)))
    bystander.close()
    check_alive(node, reference)


def test_rewind_by_position(node, reference):
    remote, local = RemoteSpanSession(node.url, 0, 2, 32, 96), LocalSpanSession(reference, 32)
    try:
        remote.forward(hidden(6))
        local.forward(hidden(6))
        remote.rewind(3)
        local.rewind(3)
        np.testing.assert_array_equal(remote.forward(hidden(2, seed=5)), local.forward(hidden(2, seed=5)))
    finally:
        remote.close()


def test_max_sessions(node, reference):
    sessions = [RemoteSpanSession(node.url, 0, 2, 32, 96) for _ in range(4)]
    for s in sessions:
        s.forward(hidden(1))
    extra = RemoteSpanSession(node.url, 0, 2, 32, 96)
    with pytest.raises(NodeError, match="node full: 4 sessions open") as e:
        extra.forward(hidden(1))
    assert e.value.code == "full"
    sessions[0].close()  # an explicit close frees the slot at once
    extra.forward(hidden(1))
    for s in sessions[1:] + [extra]:
        s.close()
    check_alive(node, reference)


def test_positions_limit(node, reference):
    s = RemoteSpanSession(node.url, 0, 2, 32, 96)
    s.forward(hidden(30))
    with pytest.raises(NodeError, match="33 positions exceed this node's limit of 32") as e:
        s.forward(hidden(3))
    assert e.value.code == "too_long"
    s.close()
    check_alive(node, reference)


def test_memory_budget_and_idle_expiry(six_loader):
    node = start_node(six_loader, 0, 2)
    cache = node.service.cache
    budget = int(2.1 * 3 * 64 * cache.position_bytes)  # two new sessions (64 positions each) and a bit
    cache.limits.max_cache_bytes = budget
    try:
        a, b, c = (RemoteSpanSession(node.url, 0, 2, 512, 96) for _ in range(3))
        a.forward(hidden(10))
        b.forward(hidden(10))
        with pytest.raises(NodeError, match="KV cache budget") as e:
            c.forward(hidden(10))
        assert e.value.code == "full"
        assert "0.0 MiB" not in e.value.message and "KiB free" in e.value.message  # (a small budget in KiB)
        with pytest.raises(NodeError, match="KV cache budget"):
            a.forward(hidden(100))  # growing past the budget is refused too
        a.forward(hidden(1))        # and the session is still usable
        assert cache.used_bytes <= budget
        import time

        assert cache.expire(time.monotonic() + cache.limits.idle_s + 1) == 2
        assert not cache.sessions
        with pytest.raises(NodeError, match="not open here") as e:
            a.forward(hidden(1))
        assert e.value.code == "unknown_session"
        c.forward(hidden(10))  # room again
        for s in (a, b, c):
            s.close()
    finally:
        node.stop()


def test_private_swarm(six_loader, local_greedy):
    node = start_node(six_loader, 0, 5, key=KEY)
    try:
        with pytest.raises(NoRoute, match="refused: this swarm is private"):
            distributed_text_model(six_loader, [node.url]).open_session(64)
        with pytest.raises(NoRoute, match=r"signed with another swarm key \(see --swarm-key\)"):
            distributed_text_model(six_loader, [node.url], key=b"another-key-0123456789").open_session(64)
        tm = distributed_text_model(six_loader, [node.url], key=KEY)
        with tm.open_session(64) as s:
            assert greedy(s, PROMPT, 6) == local_greedy(PROMPT, 6)
        assert tm.open_session.__self__.relayed_steps == 5  # one node relays too: it answers the relay itself
    finally:
        node.stop()
    # two keyed nodes pass decode steps to each other with the key too
    a, b = start_node(six_loader, 0, 2, key=KEY), start_node(six_loader, 3, 5, key=KEY)
    try:
        tm = distributed_text_model(six_loader, [a.url, b.url], key=KEY)
        with tm.open_session(64) as s:
            assert greedy(s, PROMPT, 6) == local_greedy(PROMPT, 6)
        assert tm.open_session.__self__.relayed_steps == 5
    finally:
        a.stop()
        b.stop()
    # and a keyed client does not use an open node's unauthenticated answers
    open_node = start_node(six_loader, 0, 5)
    try:
        with pytest.raises(NoRoute, match=r"swarm is open \(its replies carry no HMAC\): drop --swarm-key"):
            distributed_text_model(six_loader, [open_node.url], key=KEY).open_session(64)
    finally:
        open_node.stop()


def test_ctrl_c_mid_step_then_close_frees_the_session(six_loader):
    import os
    import signal
    import threading
    import time

    node = start_node(six_loader, 0, 2)
    compute = node.service._compute
    node.service._compute = lambda *a: (time.sleep(1.5), compute(*a))[1]  # a step slow enough to interrupt
    try:
        s = RemoteSpanSession(node.url, 0, 2, 32, 96)
        s.forward(hidden(3))
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            s.forward(hidden(1))
        s.close()  # what infer does on Ctrl-C: must not raise, and the node must drop the session
        deadline = time.monotonic() + 10
        while node.service.cache.sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not node.service.cache.sessions
    finally:
        node.stop()


def relay_frame(session, position, rows, hops=(), elapsed=None, first=0, last=2, step=41):
    """A RELAY; ``hops`` as (url, session hex, first, last), packed unchecked (the node checks)."""
    elapsed = [7] * (rows.shape[0] - 1) if elapsed is None else elapsed
    packed = b"".join(wire.HOP_HEAD.pack(bytes.fromhex(sid), a, b, len(url.encode())) + url.encode()
                      for url, sid, a, b in hops)
    return wire.Frame(wire.RELAY, session, position, rows, first_block=first, last_block=last,
                      body=wire.Trailer(step, elapsed, packed))


def test_relayed_steps_answer_the_client_and_bad_ones_get_errors(node, reference):
    owner = RemoteSpanSession(node.url, 0, 2, 32, 96)   # the client: opens the session with a prompt
    mirror = LocalSpanSession(reference, 32)
    other = NodeLink(node.url, dim=96, max_rows=32).connect()  # another connection: the node before, say
    try:
        np.testing.assert_array_equal(owner.forward(hidden(5, seed=1)), mirror.forward(hidden(5, seed=1)))
        x = hidden(1, seed=2)
        carried = np.concatenate([hidden(1, seed=9), x])  # the earlier hop's input, then this hop's
        other.run(other.ws.send_bytes(wire.encode(relay_frame(owner.sid, 5, carried))), 5)
        reply = wire.decode(owner.link.run(owner.link.next_message(), 10).data)  # on the client's connection
        assert (reply.type, reply.session, reply.position) == (wire.RELAYED, owner.sid, 5)
        np.testing.assert_array_equal(reply.array[:2], carried)
        np.testing.assert_array_equal(reply.array[2:], mirror.forward(x))
        assert reply.body.elapsed_us[0] == 7 and len(reply.body.elapsed_us) == 2
        assert reply.body.step == 41  # echoed: the client matches the answer to its step

        # about the frame itself: an error back where it came from, marked as a relay's
        sid_hex = secrets.token_bytes(16).hex()
        for frame_, code, words in (
                (relay_frame(secrets.token_bytes(16), 0, x), "unknown_session", "not open here"),
                (relay_frame(owner.sid, 6, x, hops=[["http://127.0.0.1:1/swarm", sid_hex, 3, 5]]), "bad_frame",
                 "next[0]"),
                (relay_frame(owner.sid, 6, x, elapsed=[1, 2]), "bad_frame", "compute times"),
                (relay_frame(owner.sid, 6, x, first=0, last=1), "wrong_session", "runs blocks 0-2"),
                (relay_frame(owner.sid, 9, x), "position", "holds 6"),
                (relay_frame(owner.sid, 5, x), "position", "a relayed step appends")):  # late: no rewind
            body = error_of(other, wire.encode(frame_))
            assert body["code"] == code and words in body["message"] and body["relay"] is True, body
            assert body["step"] == 41, body
        bad_step = bytearray(wire.encode(relay_frame(owner.sid, 6, x)))
        at = wire.HEADER.size + x.nbytes  # the trailer: the step first
        bad_step[at:at + 8] = (2**63).to_bytes(8, "little")
        body = error_of(other, bytes(bad_step))
        assert body["code"] == "bad_frame" and "step must be below" in body["message"] and "step" not in body

        # a next hop that cannot be reached: the client hears it, on its own connection
        gone = [["ws://127.0.0.1:9/swarm", sid_hex, 3, 5]]
        other.run(other.ws.send_bytes(wire.encode(relay_frame(owner.sid, 6, x, hops=gone))), 5)
        body = wire.decode(owner.link.run(owner.link.next_message(), 10).data).body
        assert body["code"] == "relay" and "127.0.0.1:9" in body["message"] and body["relay"] is True
        assert body["step"] == 41
    finally:
        other.abort()
        owner.close()
    check_alive(node, reference)


def test_relay_links_pass_errors_back_and_stay_bounded(six_loader, monkeypatch):
    import asyncio

    from swarm import relay

    monkeypatch.setattr(relay, "MAX_LINKS", 2)
    nodes = [start_node(six_loader, 0, 0) for _ in range(3)]
    told = Told()
    mine = b"\x01" * 16  # the relaying node's own session, which its client knows

    async def main():
        links = relay.RelayLinks()
        try:
            for i, n in enumerate(nodes):
                sid, data = relay_to_nowhere(i)
                links.submit(relay.Hop(n.url, sid, 0, 0), data, told, mine, i)
                await until(lambda: len(told) > i)
            return list(links.links)
        finally:
            await links.close()

    try:
        still_open = asyncio.run(main())
    finally:
        for n in nodes:
            n.stop()
    assert still_open == [nodes[1].url, nodes[2].url]  # the least recently used one was closed
    assert len(told) == 3
    for i, (frame, n) in enumerate(zip(told, nodes)):  # the next node's error, passed back to the client
        assert frame.type == wire.ERROR and frame.session == mine and frame.body["relay"] is True
        assert frame.body["code"] == "unknown_session" and n.url in frame.body["message"]
        assert frame.body["step"] == i


def test_a_relay_on_an_idle_link_is_sent_at_once_and_a_busy_one_queues(six_loader, monkeypatch):
    import asyncio

    from swarm import relay

    node = start_node(six_loader, 0, 0)
    told = Told()  # the next node's refusals come back, one per relay

    def frame(i):
        sid, data = relay_to_nowhere(i)
        return relay.Hop(node.url, sid, 0, 0), data

    async def main():
        links = relay.RelayLinks()
        try:
            await links.send(*frame(0), told, b"\x01" * 16, 0)  # no link yet: queued, connects
            await until(lambda: len(told) >= 1)
            spawned = []
            real_spawn = links.spawn
            monkeypatch.setattr(links, "spawn", lambda coro: (spawned.append(coro), real_spawn(coro)))
            await links.send(*frame(1), told, b"\x01" * 16, 1)  # open and idle: written here
            assert spawned == [] and links.queues == {}
            await until(lambda: len(told) >= 2)
            monkeypatch.setattr(relay, "_writes_at_once", lambda ws, size: False)  # as if its buffer held bytes
            await links.send(*frame(2), told, b"\x01" * 16, 2)
            assert len(spawned) == 1 and node.url in links.queues  # queued behind them, in order
            await until(lambda: len(told) >= 3)
        finally:
            await links.close()

    try:
        asyncio.run(main())
    finally:
        node.stop()
    assert [f.body["step"] for f in told] == [0, 1, 2]  # each relay reached the next node
    assert all(f.body["code"] == "unknown_session" for f in told)


def test_a_next_nodes_late_error_keeps_the_step_it_names(six_loader):
    """The next node refuses a relay late, after this node has passed it a newer step of the same
    session: the error goes to the client under the refused step's number (which the client no
    longer waits for), not the newer one (whose relay would then be failed for nothing)."""
    import asyncio

    from swarm import relay

    node = start_node(six_loader, 0, 0)
    told = Told()

    async def main():
        links = relay.RelayLinks()
        sid, data = relay_to_nowhere(7)  # the next node refuses step 7
        try:
            links.submit(relay.Hop(node.url, sid, 0, 0), data, told, b"\x01" * 16, 8)  # 8: remembered now
            await until(lambda: told)
        finally:
            await links.close()

    try:
        asyncio.run(main())
    finally:
        node.stop()
    assert len(told) == 1 and told[0].body["code"] == "unknown_session" and told[0].body["step"] == 7


def test_an_idle_node_measures_again_until_real_steps_are_timed(six_loader):
    """The start-up figure, taken while other nodes load on the same cores, read 70 ms against 1.5 ms
    for real steps; an idle node measures again at each republish and keeps the faster figure."""
    n = start_node(six_loader, 0, 2, max_sessions=2, max_positions=32)
    try:
        service = n.service
        service.measured = 1e6  # as if measured on a machine busy loading
        service.remeasure_if_idle()
        assert 0 < service.measured < 1e6 and service.ms_per_token == service.measured
        s = RemoteSpanSession(n.url, 0, 2, 32, 96)
        s.forward(hidden(1))
        service.measured = 1e6
        service.remeasure_if_idle()  # a session is open: not now
        assert service.measured == 1e6
        for _ in range(3):
            s.forward(hidden(1))
        s.close()
        service.remeasure_if_idle()  # real steps are timed: they are the figure
        assert service.measured == 1e6 and service.recent and service.ms_per_token < 1e6
    finally:
        n.stop()
