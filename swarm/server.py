"""A node: runs a span of blocks for many sessions, over one aiohttp WebSocket per client session.

    client --FORWARD(session, position, blocks a..b, hidden (T, dim))--> node
    client <--RESULT(session, position, hidden (T, dim), compute time)-- node

or, for a decode step, RELAY from the client or the node before, passed on to the next node or
answered with RELAYED on the client's own connection (swarm/relay.py).

Each session has its own KV cache here (swarm/memory.py), created by its first FORWARD at
position 0, rewound by a FORWARD at an earlier position, dropped by CLOSE, by idle expiry, or when
the connection that opened it closes. A FORWARD may ask for any sub-span a..b of the node's
blocks, so a node holding 10-29 can stand in for a lost node that held 10-19. Every frame is
checked (swarm/wire.py) before anything is allocated; a bad one gets an ERROR reply and the
connection, like every other, goes on being served.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import statistics
import threading
import time
from collections import deque

import numpy as np
from aiohttp import WSMsgType, web

from common import compute
from engine import model as engine_model
from swarm import lane as lanes
from swarm import relay, relay_kernel, trace, wire
from swarm.fast_relay import FastRelay
from swarm.inflight import GatedWebSocket
from swarm.memory import Inflight, LimitError, Limits, SessionCache

log = logging.getLogger("aiohttp.server")  # common/aio_server.quiet_logs makes its records one line
RECENT_STEPS = 16  # decode steps whose median is the advertised ms_per_token


def span_view(model, first: int, last: int):
    """``model`` restricted to blocks first..last (a sub-span of its own), sharing its weights."""
    if (first, last) == (model.first_layer, model.last_layer):
        return model
    i, j = first - model.first_layer, last - model.first_layer + 1
    view = copy.copy(model)
    view.blocks = model.blocks[i:j]
    view.first_layer, view.last_layer = first, last
    if hasattr(model.decoder, "span"):  # a decoder that cuts itself (fast_decode_quant)
        view.decoder = model.decoder.span(i, j)
    elif model.decoder is not None:  # the decoder's per-block stacks sliced: views, not copies
        n = len(model.blocks)
        view.decoder = copy.copy(model.decoder)
        for name, value in vars(model.decoder).items():
            setattr(view.decoder, name, _layers(value, i, j, n))
    return view


def _layers(value, i: int, j: int, n: int):
    """Arrays stacked by block (leading axis n), alone or in tuples, cut to blocks i..j-1."""
    stacked = lambda a: isinstance(a, np.ndarray) and a.ndim > 0 and a.shape[0] == n  # noqa: E731
    if stacked(value):
        return value[i:j]
    if isinstance(value, tuple) and value and all(stacked(a) for a in value):
        return tuple(a[i:j] for a in value)
    return value


class NodeService:
    """The node's state and its answer to each frame; transport-free so it can be tested alone."""

    def __init__(self, model, manifest_sha: str, limits: Limits | None = None, key: bytes | None = None):
        cfg = model.config
        self.model, self.manifest_sha, self.key = model, manifest_sha, key
        self.limits = limits or Limits()
        self.limits.max_positions = min(self.limits.max_positions, cfg.context_length)
        self.dim = cfg.dim
        self.cache = SessionCache(self.limits, cfg.n_kv_heads, cfg.head_dim, model.new_cache(1).k.dtype)
        self.inflight = Inflight(self.limits.max_inflight_bytes)  # bytes of frames held, all connections
        self._check_inflight()
        # Every forward pass runs on the process's one compute thread (common.compute): one at a
        # time, as the kernels use every core already, and from one thread, as OpenMP needs to be
        # fast. It also reads the lanes (swarm/lane.py). The `node` command adopts its main thread
        # with a JobLoop and runs the event loop on another (swarm/node.py); a node run inside
        # another program (NodeThread) starts one.
        if not compute.on_compute_thread():
            compute.start()
        self.views: dict[tuple[int, int], object] = {}
        self.relays = relay.RelayLinks(key)  # this node's connections to the next hops of relayed steps
        self.recent: deque[float] = deque(maxlen=RECENT_STEPS)  # ms per token of real decode steps
        self.measured = self.measure()  # until real decode steps have been timed
        self.served = 0
        self.lane_steps = 0  # relayed steps taken on lanes (swarm/lane.py)
        self.relay_out = np.empty(0, np.uint8)  # compiled relays' output, reused (swarm/fast_relay.py)
        self.lane_server: lanes.LaneServer | None = None  # open_lanes

    def open_lanes(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Take relayed decode steps on a lane port too (swarm/lane.py), served by the compute
        thread's loop; returns the port. From the compute thread itself before its loop runs (a
        node process's main thread), or from any other thread once it runs."""
        jobs = compute.jobs()
        if jobs is None:
            raise RuntimeError("lanes need the compute thread's loop (common.compute.start, or adopt with one)")
        if self.key is None and hasattr(self.model.decoder, "arrays"):  # relays' compiled common case
            compute.run(relay_kernel.warm_up)  # (compiled now, not at a session's second step)
        if compute.on_compute_thread():
            self.lane_server = lanes.LaneServer(self, jobs, host, port)
        else:
            self.lane_server = lanes.LaneServer.start(self, jobs, host, port)
        return self.lane_server.port

    @property
    def ms_per_token(self) -> float:
        """The advertised speed: the median of the recent decode steps (computed when asked, not at
        every step: a node's work between frames is on every token's path)."""
        return statistics.median(self.recent) if self.recent else self.measured

    @property
    def max_message(self) -> int:
        return wire.HEADER.size + self.limits.max_positions * self.dim * 4 + wire.MAC_LEN

    def _check_inflight(self) -> None:
        """The in-flight budget must hold the largest frame the node takes, or a long prompt could
        never be served here: refused at start rather than at the first long prompt."""
        from common.errors import UserError

        if self.limits.max_inflight_bytes < self.max_message:
            raise UserError(f"--max-inflight-mb {self.limits.max_inflight_bytes / 2**20:g} is less than one "
                            f"frame of --max-positions {self.limits.max_positions} rows ({self.max_message / 2**20:.1f}"
                            f" MiB at width {self.dim}): raise it, or lower --max-positions")

    def info(self) -> dict:
        cfg = self.model.config
        return {"manifest": self.manifest_sha, "first_block": self.model.first_layer,
                "last_block": self.model.last_layer, "n_layers": cfg.n_layers, "dim": cfg.dim,
                "max_sessions": self.limits.max_sessions, "free_sessions": self.cache.free_sessions,
                "max_positions": self.limits.max_positions,
                "free_cache_mb": round(self.cache.free_bytes / 2**20, 1),
                "ms_per_token": round(self.ms_per_token, 3), "private": self.key is not None,
                "version": wire.VERSION, **({"lane": self.lane_server.port} if self.lane_server else {})}

    def measure(self, steps: int = 8, warm_up: int = 8) -> float:
        """ms per decode token over the whole span, before any real step has been timed: the fastest
        step after ``warm_up`` (the first steps compile and warm the kernels, and on a loaded
        machine single steps stall for whole scheduler slices: the fastest says what this node can
        do). Real decode steps replace it as they come (_observe)."""
        cache = self.model.new_cache(steps + warm_up)
        x = np.zeros((1, self.dim), np.float32) + 0.01
        times = []

        def step(pos: int) -> None:
            t0 = time.perf_counter()
            self.model.forward_layers(x, cache, pos)
            times.append(time.perf_counter() - t0)

        for pos in range(steps + warm_up):
            compute.run(step, pos)
        return min(times[warm_up:]) * 1000

    def remeasure_if_idle(self) -> None:
        """Measure again while no real step has been timed and no session is open: the first figure,
        taken while other nodes on the machine were loading, read 70 ms against 1.5 ms for real
        steps, and a client planned three hops where two would do. Keeps the faster figure."""
        if not self.recent and not self.cache.sessions:
            self.measured = min(self.measured, self.measure(steps=8, warm_up=2))

    def view(self, first: int, last: int):
        if (first, last) not in self.views:
            self.views[(first, last)] = span_view(self.model, first, last)
        return self.views[(first, last)]

    # -- one frame in, one frame out ----------------------------------------------------------------
    async def handle(self, data, conn) -> bytes | None:
        """The reply to one message, or None for a relayed step (its answer goes elsewhere)."""
        framed = isinstance(data, (bytes, bytearray)) and len(data) >= 24
        session = bytes(data[8:24]) if framed else bytes(16)
        relayed, frame = framed and data[5] == wire.RELAY, None
        try:
            frame = wire.decode(data, self.key, self.dim, self.limits.max_positions)
            reply = await self.dispatch(frame, conn)
        except (wire.WireError, LimitError) as e:
            reply = wire.error_frame(session, e.code, str(e), relayed, relay.step_or_none(frame))
        except Exception as e:  # a bug must not take the node down for everyone
            reply = wire.error_frame(session, "internal", f"{type(e).__name__}: {e}", relayed, relay.step_or_none(frame))
        return None if reply is None else wire.encode(reply, self.key)

    async def dispatch(self, frame: wire.Frame, conn) -> wire.Frame:
        if frame.type == wire.INFO_REQ:
            return wire.Frame(wire.INFO, frame.session, body=self.info())
        if frame.type == wire.CLOSE:
            owned = self.cache.sessions.get(frame.session)
            if owned is not None and owned.owner is conn:
                self.cache.close(frame.session)
            return wire.Frame(wire.CLOSED, frame.session)
        if frame.type == wire.FORWARD:
            return await self.forward(frame, conn)
        if frame.type == wire.RELAY:
            return await self.relay(frame)
        raise wire.WireError("bad_frame", f"a node does not take {wire.TYPE_NAMES[frame.type]} frames")

    async def forward(self, frame: wire.Frame, conn) -> wire.Frame:
        self._check_span(frame)
        session = self._session(frame, conn)
        y, seconds = await self._step(session, frame, frame.array)
        return wire.Frame(wire.RESULT, frame.session, frame.position, y, first_block=frame.first_block,
                          last_block=frame.last_block, elapsed_us=_us(seconds), dtype=frame.dtype)

    async def relay(self, frame: wire.Frame) -> None:
        """A relayed decode step (swarm/relay.py): run the last row through this node's blocks, then
        pass the rows plus the output to the next hop, or, at the last hop, back to the client on
        its own connection here. Errors about the frame itself go back where it came from (the
        client, or the node before, which passes them on); once the session is known, every error
        goes to its client, which then runs the step hop by hop."""
        step, hops, elapsed, session = self._relay_checks(frame)
        trace.mark("read", step)
        trace.mark("compute", step)
        try:
            y, seconds = await self._step(session, frame, frame.array[-1:])
            trace.mark("computed", step)
            hop, data = self._relay_output(frame, step, hops, elapsed, y, seconds)
        except Exception as e:
            return await self.relays.tell(session.owner, frame.session, *_failure(e), step)
        await self._pass_on(frame, step, session, hop, data)

    def relay_now(self, data) -> bool:
        """A relayed decode step taken straight from its connection's reader (swarm/inflight.py,
        ``Gate.fast``), computed and passed on before this returns: no message queued for the
        connection's handler, no task woken, no turn of the event loop between the frame's arrival
        and its output's departure. On a route sharing two cores, each of those costs tens of
        microseconds of cold Python per node and token (docs/distributed-performance.md, "Where a
        token's time goes").

        Returns False, having changed nothing, unless ``data`` is a well-formed RELAY for a session
        open here, computed (on the compute thread, the loop waiting) and whose output the next
        node (or the client) takes at once; the usual path (``handle``) then takes the frame, and
        answers its errors. A client uses this path when a node of its route has no lane
        (swarm/lane.py), where the compute thread reads the relay itself."""
        try:
            frame = wire.decode(data, self.key, self.dim, self.limits.max_positions)
            if frame.type != wire.RELAY:
                return False
            step, hops, elapsed, session = self._relay_checks(frame)
        except Exception:  # (the usual path meets the same error, and answers it)
            return False
        size = len(data) + self.dim * wire.DTYPES[frame.dtype].itemsize + 16  # the output, at most
        if not (self.relays.can_send_now(hops[0], size) if hops else self.relays.can_answer_now(session.owner, size)):
            return False
        trace.mark("read", step)
        trace.mark("compute", step)
        try:  # from here on the step is taken: its errors go to its client, as on the usual path
            y, seconds = self._step_now(session, frame, frame.array[-1:])
            trace.mark("computed", step)
            self._check_output(frame, y)
            hop, out = self._relay_output(frame, step, hops, elapsed, y, seconds)
        except Exception as e:
            self.relays.spawn(self.relays.tell(session.owner, frame.session, *_failure(e), step))
            return True
        try:
            sent = (self.relays.send_now(hop, out, session.owner, frame.session, step) if hop is not None
                    else self.relays.answer_now(session.owner, out))
        except Exception:  # (a bug: the usual sending path meets it and tells the client)
            sent = False
        if not sent:  # (or the estimate above was short: the output goes the usual way)
            self.relays.spawn(self._pass_on(frame, step, session, hop, out))
        self.count_step(session, y.shape[0], seconds)  # (after the output left: off the token's path)
        return True

    # -- lanes (swarm/lane.py): on the compute thread ---------------------------------------------------
    def lane_frame(self, lane, data) -> None:
        """A frame from a lane: a BIND, or a relayed decode step computed and written on at once.
        Its answer and its errors go to the session's client on its lane; an error about a frame
        whose session is not known goes back on the lane it came in on."""
        sid = bytes(data[8:24]) if len(data) >= 24 else bytes(16)
        session = self.cache.sessions.get(sid)
        if session is not None and session.fast_relay is not None and session.fast_relay.take(self, session, lane, data):
            return  # the common case of a bound session's relay (swarm/fast_relay.py)
        frame = session = None
        try:
            frame = wire.decode(data, self.key, self.dim, relay.MAX_HOPS + 1)
            if frame.type == wire.BIND:
                return self._bind(lane, frame)
            if frame.type == wire.FORWARD:
                return self._lane_forward(lane, frame)
            if frame.type != wire.RELAY:
                raise wire.WireError("bad_frame", f"a lane takes BIND, FORWARD and RELAY frames, not "
                                                  f"{wire.TYPE_NAMES[frame.type]}")
            step, hops, elapsed, session = self._relay_checks(frame)
        except Exception as e:  # a relay's error goes to its session's client if bound; any other back
            known = self.cache.sessions.get(sid) if frame is not None and frame.type == wire.RELAY else None
            to = known.lane if known is not None and known.lane is not None and not known.lane.closed else lane
            error = wire.error_frame(sid, *_failure(e), frame is None or frame.type == wire.RELAY,
                                     relay.step_or_none(frame))
            if frame is not None and frame.type == wire.BIND:
                error.body["bind"] = True  # (a client never takes it for a step's answer)
            to.send(wire.encode(error, self.key))
            self._strike(lane, unreadable=frame is None)
            return
        client = session.lane
        if client is None or client.closed:
            lane.send(wire.encode(wire.error_frame(sid, "lane", f"session {sid.hex()} is not bound to a lane: "
                                                                "BIND it first", True, step), self.key))
            self._strike(lane)
            return
        lane.strikes = 0
        trace.mark("read", step)
        try:
            if frame.position + 1 > session.cache.capacity:  # (growing it is the WebSocket's, with its budget)
                raise wire.WireError("lane", f"session {sid.hex()} must grow its cache: a FORWARD does that")
            session.last_used = time.monotonic()
            # (not marked busy: a FORWARD for this session arriving meanwhile, its client having given
            # this step up, is computed after it on this same thread, and its result is what stays)
            trace.mark("compute", step)
            y, seconds = self._compute(session, frame.array[-1:].astype(np.float32, copy=False), frame.position,
                                       frame.position)
            trace.mark("computed", step)
            self._check_output(frame, y)
            hop, out = self._relay_output(frame, step, hops, elapsed, y, seconds)
            self.lane_pass_on(session, client, step, hop, out)
        except Exception as e:
            return self.lane_failed(session, client, step, e)
        if frame.dtype == wire.F32 and (session.fast_relay is None or session.fast_relay.hops_raw != frame.body.hops):
            session.fast_relay = FastRelay(self, session, hops, frame.body.hops)  # (the steps after this one)
        self.count_step(session, 1, seconds)  # (after the output left: off the token's path)
        self.lane_steps += 1

    def lane_pass_on(self, session, client, step: int, hop, out, framed: bool = False) -> None:
        """A relayed step's output, framed (``framed``: with its lane's length prefix too): to the next
        node's lane (``hop``), or to its client's."""
        if hop is None:
            client.send(out, framed)
            return
        if session.lane_next is None:
            raise relay.RelayError("no next node's lane is bound for this session")
        link = self.lane_server.links.get(session.lane_next)
        if link is None or not link.send(out, framed):
            self.lane_server.link(session.lane_next)  # (connecting again, for the steps after this one)
            raise relay.RelayError(f"the next node's lane {lanes.format_address(*session.lane_next)} "
                                   f"is not connected")
        link.remember(hop.session, client, session.sid, step)

    def lane_failed(self, session, client, step: int, e: Exception) -> None:
        """A relayed step taken from a lane failed: its client hears why (and runs it hop by hop)."""
        client.send(wire.encode(wire.error_frame(session.sid, *_failure(e), True, step), self.key))

    @staticmethod
    def _strike(lane, unreadable: bool = False) -> None:
        """An error answered on ``lane``: a frame that does not even decode (garbage, another swarm's
        key) closes it at once, and so do MAX_STRIKES errors in a row. An honest peer meets an error
        now and then (a late relay); a stranger sending junk would have the compute thread answer
        it frame after frame."""
        lane.strikes += 1
        if unreadable or lane.strikes >= lanes.MAX_STRIKES:
            lane.close()

    def _lane_forward(self, lane, frame: wire.Frame) -> None:
        """A client's single-row step (a decode step run hop by hop: after a rewind or a relay that
        failed) for a session bound to this very lane, answered with its RESULT here. Whatever
        else a FORWARD does (open a session, a prompt, grow a cache) is the WebSocket's."""
        session = self.cache.sessions.get(frame.session)
        if session is None:
            raise wire.WireError("unknown_session", f"session {frame.session.hex()} is not open here (closed or "
                                                    f"expired); replay it from position 0")
        if session.lane is not lane:
            raise wire.WireError("wrong_session", f"session {frame.session.hex()} is not bound to this lane")
        if frame.array.shape[0] != 1:
            raise wire.WireError("lane", "a lane takes one-row FORWARDs; send a prompt over the WebSocket")
        self._check_span(frame)
        self._session(frame, session.owner)  # (its checks: blocks, position, a step part-way)
        if frame.position + 1 > session.cache.capacity:
            raise wire.WireError("lane", f"session {frame.session.hex()} must grow its cache: send this step "
                                         f"over the WebSocket")
        session.cache.truncate(frame.position)  # a step at an earlier position rewinds
        session.last_used = time.monotonic()
        y, seconds = self._compute(session, frame.array.astype(np.float32, copy=False), frame.position,
                                   frame.position)
        self._check_output(frame, y)
        lane.strikes = 0
        lane.send(wire.encode(wire.Frame(wire.RESULT, frame.session, frame.position, y,
                                         first_block=frame.first_block, last_block=frame.last_block,
                                         elapsed_us=_us(seconds), dtype=frame.dtype), self.key))
        self.count_step(session, y.shape[0], seconds)
        self.lane_steps += 1

    def _bind(self, lane, frame: wire.Frame) -> None:
        """A client's BIND: its session's relayed steps answer on ``lane``, and go on to the named next lane."""
        session = self.cache.sessions.get(frame.session)
        if session is None:
            raise wire.WireError("unknown_session", f"session {frame.session.hex()} is not open here")
        if session.lane is not None and session.lane is not lane and not session.lane.closed:
            raise wire.WireError("wrong_session", f"session {frame.session.hex()} is bound to another lane")
        nxt = (frame.body or {}).get("next")
        try:
            address = None if nxt is None else lanes.parse_address(nxt)
        except ValueError as e:
            raise wire.WireError("bad_frame", f"next: {e}") from None
        session.lane, session.lane_next = lane, address
        lane.strikes = 0
        bound = wire.encode(wire.Frame(wire.BOUND, frame.session), self.key)
        if address is None:
            lane.send(bound)
            return
        link = self.lane_server.link(address)

        def ready(outcome) -> None:
            if outcome is True:
                return lane.send(bound)
            error = wire.error_frame(frame.session, "relay", f"the next node's lane {link.name}: {outcome}")
            error.body["bind"] = True  # (it may come after the client has gone on: never a step's answer)
            lane.send(wire.encode(error, self.key))

        link.when_ready(ready)

    def unbind(self, lane) -> None:
        """A lane closed: its sessions answer on the WebSocket again."""
        for session in list(self.cache.sessions.values()):
            if session.lane is lane:
                session.lane, session.lane_next = None, None

    def lanes_in_use(self, now: float) -> set:
        """The lanes of sessions used within the idle time (they stay open, silent or not)."""
        return {s.lane for s in list(self.cache.sessions.values())
                if s.lane is not None and now - s.last_used <= self.limits.idle_s}

    def _relay_checks(self, frame: wire.Frame):
        """A RELAY's compute times, hops and session, checked (its trailer's sizes were, by
        wire.decode): (step, hops, elapsed, session), or WireError."""
        self._check_span(frame)
        trailer, rows = frame.body, frame.array.shape[0]
        if len(trailer.elapsed_us) != rows - 1:
            raise wire.WireError("bad_frame", f"a RELAY of {rows} rows carries {len(trailer.elapsed_us)} compute "
                                              f"times, not {rows - 1}")
        session = self._session(frame, None)
        # A session's relays all name the same hops: checked once and kept with the session (so
        # their memory goes with it, and a frame naming no open session costs no parse at all).
        raw, hops = session.relay_hops
        if trailer.hops != raw:
            hops = relay.parse_hops(trailer.hops)
            session.relay_hops = (trailer.hops, hops)
        if rows + len(hops) > relay.MAX_HOPS:  # (every hop run so far, this one, those to come)
            raise wire.WireError("bad_frame", f"a relayed step runs at most {relay.MAX_HOPS} hops; this one "
                                              f"{rows + len(hops)}")
        return trailer.step, hops, trailer.elapsed_us, session

    def _relay_output(self, frame: wire.Frame, step: int, hops: tuple, elapsed: list, y, seconds: float):
        """(next hop, its RELAY) or, at the last hop, (None, the RELAYED answer to the client)."""
        # every hop's input, then the output: the rows received (checked, in the wire's dtype) go
        # out as they came, with y after them; the hops after the next one as they came too
        elapsed = elapsed + [_us(seconds)]
        if hops:
            nxt, rest = hops[0], frame.body.hops[len(hops[0].packed):]
            out = wire.Frame(wire.RELAY, nxt.session, frame.position, y, first_block=nxt.first, last_block=nxt.last,
                             dtype=frame.dtype, body=wire.Trailer(step, elapsed, rest))
        else:
            out = wire.Frame(wire.RELAYED, frame.session, frame.position, y, first_block=frame.first_block,
                             last_block=frame.last_block, elapsed_us=_us(seconds), dtype=frame.dtype,
                             body=wire.Trailer(step, elapsed))
        data = wire.encode(out, self.key, before=frame.array)
        trace.mark("framed", step)
        return (hops[0] if hops else None), data

    async def _pass_on(self, frame: wire.Frame, step: int, session, hop, data: bytes) -> None:
        """A relayed step's output to the next hop or its client, sent now or queued, never waited
        for: a slow next node or client must not hold up the connection the frame came in on."""
        try:
            if hop is not None:
                await self.relays.send(hop, data, session.owner, frame.session, step)
            else:
                await self.relays.answer(session.owner, data)  # (never waits for that client)
        except Exception as e:
            await self.relays.tell(session.owner, frame.session, *_failure(e), step)

    def _check_span(self, frame: wire.Frame) -> None:
        first, last = frame.first_block, frame.last_block
        if not self.model.first_layer <= first <= last <= self.model.last_layer:
            raise wire.WireError("span", f"blocks {first}-{last} asked; this node serves "
                                         f"{self.model.first_layer}-{self.model.last_layer}")

    async def _step(self, session, frame: wire.Frame, x: np.ndarray) -> tuple[np.ndarray, float]:
        """x (T, dim) through the session's blocks at frame.position: (T, dim) and the compute seconds."""
        self._begin_step(session, frame, x.shape[0])
        session.busy = True  # (the pass gives the loop back between pieces: _session refuses steps meanwhile)
        try:
            y, seconds = await self._compute_pieces(session, x, frame.position)
        finally:
            session.busy = False
        return self._end_step(session, frame, y, seconds)

    def _step_now(self, session, frame: wire.Frame, x: np.ndarray) -> tuple[np.ndarray, float]:
        """``_step``'s compute for one row, from a caller that cannot await (relay_now), which
        checks and counts the step itself (``_check_output``; ``count_step`` once the output left)."""
        self._begin_step(session, frame, x.shape[0])
        x = x if x.dtype == np.float32 else x.astype(np.float32)
        return compute.run(self._compute, session, x, frame.position, frame.position)

    def _begin_step(self, session, frame: wire.Frame, T: int) -> None:
        self.cache.reserve(session, frame.position + T)
        session.cache.truncate(frame.position)  # a step at an earlier position rewinds
        session.last_used = time.monotonic()

    def _end_step(self, session, frame: wire.Frame, y: np.ndarray, seconds: float) -> tuple[np.ndarray, float]:
        self._check_output(frame, y)  # (a step refused is not counted: served, nor in the advertised speed)
        self.count_step(session, y.shape[0], seconds)
        return y, seconds

    def count_step(self, session, T: int, seconds: float) -> None:
        """A step of ``T`` rows served for ``session`` (in ``seconds`` of compute), its output gone."""
        session.last_used = time.monotonic()
        if T == 1:
            self._observe(seconds * 1000 / (session.last_block - session.first_block + 1))
        self.served += T

    def _check_output(self, frame: wire.Frame, y: np.ndarray) -> None:
        if frame.dtype == wire.F16 and not np.all(np.abs(y) <= wire.F16_MAX):
            raise wire.WireError("overflow", f"blocks {frame.first_block}-{frame.last_block} computed values beyond "
                                             f"float16's range (+-{wire.F16_MAX:g}); send this session as float32")

    def _observe(self, ms_per_block: float) -> None:
        """A real decode step's time: the advertised speed is the median of the recent ones, scaled
        to the whole span (a running average would carry the start-up measurement for long)."""
        self.recent.append(ms_per_block * (self.model.last_layer - self.model.first_layer + 1))

    def _session(self, frame: wire.Frame, conn):
        """The frame's session, opened by a FORWARD at position 0. A relayed step (conn None) may
        come over any connection, another node's: its session must be open, and its 128 random
        bits, known only to the client and the route it chose, are the permission."""
        sid = frame.session
        if sid == bytes(16):
            raise wire.WireError("wrong_session", "session id 0 is reserved: choose 128 random bits")
        session = self.cache.sessions.get(sid)
        if session is None:
            if frame.position != 0 or conn is None:
                raise wire.WireError("unknown_session", f"session {sid.hex()} is not open here (closed or "
                                                        f"expired); replay it from position 0")
            return self.cache.open(sid, conn, frame.first_block, frame.last_block, frame.array.shape[0])
        if conn is not None and session.owner is not conn:
            raise wire.WireError("wrong_session", f"session {sid.hex()} belongs to another connection")
        if session.busy:  # (a relay, from another connection, during its own client's multi-row step:
            # computed in between, it would write into the cache the step is filling; or the client's
            # own FORWARD for a relayed step that failed elsewhere while this node computed it: the
            # client sends it again shortly, RemoteSpanSession.forward)
            raise wire.WireError("busy", f"session {sid.hex()} is part-way through a step")
        if (session.first_block, session.last_block) != (frame.first_block, frame.last_block):
            raise wire.WireError("wrong_session", f"session {sid.hex()} runs blocks {session.first_block}-"
                                                  f"{session.last_block}, not {frame.first_block}-{frame.last_block}")
        if frame.position > session.position:
            raise wire.WireError("position", f"position {frame.position} asked; session {sid.hex()} holds "
                                             f"{session.position} positions")
        if conn is None and frame.position != session.position:
            # A relayed step only appends: one arriving late (its client gave up on it and went on
            # hop by hop) must not rewind what the client has computed since.
            raise wire.WireError("position", f"a relayed step appends: position {frame.position} asked; session "
                                             f"{sid.hex()} holds {session.position} positions")
        return session

    async def _compute_pieces(self, session, x: np.ndarray, position: int) -> tuple[np.ndarray, float]:
        """The forward pass on the process's compute thread, handed over from the event loop's. A
        long prefill goes in pieces of the engine's own prompt chunk, each queued on its own, so
        other sessions' decode steps (their lanes, their jobs) run between them; forward_layers
        splits at the same rows, so the result is bit for bit that of one call."""
        loop, piece, T = asyncio.get_running_loop(), engine_model.PROMPT_CHUNK, x.shape[0]
        y, seconds = np.empty((T, self.dim), np.float32), 0.0  # pieces in, pieces out: no whole-frame copies
        for i in range(0, T, piece):
            y[i:i + piece], s = await loop.run_in_executor(compute.executor(), self._compute, session,
                                                           x[i:i + piece].astype(np.float32),  # a copy we own
                                                           position + i, position)
            seconds += s
        return y, seconds

    def _compute(self, session, x: np.ndarray, position: int, frame_position: int):
        view = self.view(session.first_block, session.last_block)
        t0 = time.perf_counter()
        try:
            y = view.forward_layers(x, session.cache, position)
        except BaseException:
            session.cache.length = frame_position  # nothing of this frame is kept
            raise
        return y, time.perf_counter() - t0


def _failure(e: Exception) -> tuple[str, str]:
    """(code, message) of a relayed step's failure once its session is known (told to its client)."""
    if isinstance(e, (wire.WireError, LimitError)):
        return e.code, str(e)
    if isinstance(e, relay.RelayError):
        return "relay", str(e)
    if isinstance(e, ValueError):  # wire.encode: the rows overflow float16
        return "overflow", str(e)
    return "internal", f"{type(e).__name__}: {e}"  # a bug must not take the node down for everyone


def _us(seconds: float) -> int:
    return min(int(seconds * 1e6), 2**32 - 1)


def make_app(service: NodeService, app: web.Application | None = None) -> web.Application:
    """The node's WebSocket at /swarm, added to ``app`` (say, the fragment server's) or a new one."""
    connections: set[web.WebSocketResponse] = set()

    async def swarm(request: web.Request) -> web.WebSocketResponse:
        # Each frame's bytes are taken from the node's in-flight budget before they are read
        # (swarm/inflight.py), and given back once its reply has been sent.
        ws = GatedWebSocket(service.inflight, service.limits.inflight_wait_s, autoping=False,  # (_receive pongs)
                            max_msg_size=service.max_message + 4096, compress=False, timeout=5.0)
        await ws.prepare(request)
        gate = ws.gate
        gate.fast, gate.fast_kind = service.relay_now, wire.RELAY  # decode steps skip the queue (relay_now)
        connections.add(ws)
        conn = ws  # the owner of the sessions this connection opens (relayed steps answer on it)
        try:
            while True:
                gate.idle = True
                msg = await _receive(ws, gate, service, conn)
                gate.idle = False
                if msg is None:
                    break
                if msg.type not in (WSMsgType.BINARY, WSMsgType.TEXT):  # ERROR, CLOSE: the connection is over
                    break
                entry = gate.next()
                try:
                    reply = await _answer(service, msg, entry, conn)
                    msg = None
                    if reply is not None and not await relay.within(ws, ws.send_bytes(reply),  # (a relayed
                                                                    service.limits.frame_s):  # step answers
                        break                                                                  # elsewhere)
                finally:
                    gate.done(entry)
        finally:
            gate.close()
            connections.discard(ws)
            service.cache.close_owned_by(conn)
            if not ws.closed:
                await ws.close(code=1001, message=b"timed out")
        return ws

    async def expire_idle(app):
        async def loop():
            while True:
                await asyncio.sleep(min(service.limits.idle_s / 2, 5.0))
                service.cache.expire()

        task = asyncio.ensure_future(loop())
        yield
        task.cancel()

    async def close_connections(app):
        for ws in list(connections):
            await ws.close(code=1001, message=b"node stopping")
        await service.relays.close()

    app = app if app is not None else web.Application()
    app.router.add_get(wire.WS_PATH, swarm)
    app.cleanup_ctx.append(expire_idle)
    app.on_shutdown.append(close_connections)
    return app


async def _answer(service: NodeService, msg, entry, conn) -> bytes:
    if entry.refusal is not None:  # over the in-flight budget: its bytes were never kept
        code, message = entry.refusal
        return wire.encode(wire.error_frame(entry.session, code, message), service.key)
    if msg.type == WSMsgType.TEXT:
        return wire.encode(wire.error_frame(bytes(16), "bad_frame", "a frame is binary, not text"), service.key)
    return await service.handle(msg.data, conn)


async def _receive(ws: web.WebSocketResponse, gate, service: NodeService, conn):
    """The next message, or None when the connection has timed out: silent for ``idle_s`` with no
    session of its own used meanwhile (they would expire anyway), or a message begun and not
    finished within ``frame_s`` (a client that stalls mid-frame would hold its share of the
    in-flight budget forever). Silent is not idle: the fast lane takes relayed steps without a
    message here (Gate.fast), and a client's connection to the last node of its route only
    receives the answers of relayed steps, which use its sessions."""
    limits, quiet_since = service.limits, time.monotonic()
    while True:
        try:
            msg = await ws.receive(timeout=min(limits.frame_s, limits.idle_s))
        except asyncio.TimeoutError:
            msg = None
        if msg is not None and msg.type not in (WSMsgType.PING, WSMsgType.PONG):
            return msg
        # PINGs are answered here, not by aiohttp: its receive() starts its timeout afresh after each
        # one, so a client pinging every few seconds kept a half-sent frame's share of the budget, or
        # an idle connection, for ever. A PING or PONG is not activity.
        if msg is not None and msg.type == WSMsgType.PING and not await relay.within(ws, ws.pong(msg.data),
                                                                                     limits.frame_s):
            return None
        now = time.monotonic()
        quiet_since = max(quiet_since, gate.fast_seen, service.cache.last_used_by(conn))
        if gate.began is not None and now - gate.began > limits.frame_s:
            log.warning("closing a connection: a frame took over %gs to arrive", limits.frame_s)
            return None
        if now - quiet_since > limits.idle_s and gate.held is None:  # (not while waiting for the budget)
            return None


class NodeThread:
    """A node serving on 127.0.0.1 from a background thread (tests, benchmarks)."""

    def __init__(self, service: NodeService, host: str = "127.0.0.1", port: int = 0, lanes: bool = True):
        from distribution.server import start

        self.service = service
        if lanes and service.lane_server is None:  # (on the compute thread's loop: NodeService started it)
            service.open_lanes(host)
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def begin():
            self.runner, self.port = await start(make_app(service), host, port)
            ready.set()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(begin())
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="swarm-node", daemon=True)
        self.thread.start()
        if not ready.wait(30):
            raise RuntimeError("the node did not start within 30 s")
        self.url = f"ws://{host}:{self.port}{wire.WS_PATH}"

    def stop(self) -> None:
        """Close every connection and stop listening (what a client sees when a node dies)."""
        if not self.thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        server, self.service.lane_server = self.service.lane_server, None
        if server is not None:  # (its lanes close as a dead node's would)
            compute.run(server.close)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
