"""The client's side of a node: one WebSocket per remote span session, driven synchronously.

Generation is synchronous (engine/session.py). Each WebSocket has its own asyncio loop, run in the
calling thread only while a call waits for its reply (with a timeout): no hand-over to another
thread on the way out or back, which on a busy machine costs more than the network hop itself.
``RemoteSpanSession`` is a ``SpanSession`` whose blocks run on a node; ``distributed_text_model``
builds the ``TextModel`` that `infer --distributed` (and chat, the API) use.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import numpy as np

from swarm import lane_client, relay, trace, wire
from swarm.tap import Tap

CONNECT_TIMEOUT = 10.0
STEP_TIMEOUT = 30.0        # one step's reply, beyond the allowance per position below
PER_POSITION_S = 0.5       # a prefill of T positions may take this much longer (at most; see per_row_s)
ROW_ALLOWANCE = 20         # a prefill row may take this many times the node's advertised ms per token
MIN_PER_POSITION_S = 0.01  # (a prefill row costs less than a decode step; 20x leaves room for a queue)


def per_row_s(ms_per_token: float | None) -> float:
    """The time a prefill frame may take per row beyond the step's bound: from the node's advertised
    speed when known, so a node frozen during a 1136-row prompt is given up on after about a
    minute, not after 10 (0.5 s a row)."""
    if ms_per_token is None or not ms_per_token > 0:
        return PER_POSITION_S
    return min(PER_POSITION_S, max(MIN_PER_POSITION_S, ROW_ALLOWANCE * ms_per_token / 1000))
QUIET_S = 1.0              # a link unused this long may have been closed by the node as idle
BUSY_RETRY_S = 0.005       # a step refused as `busy` is sent again after this (doubling, up to 0.1 s)...


class NodeError(Exception):
    """A node failed a request: it died, timed out, refused, or answered with an error."""

    def __init__(self, url: str, code: str, message: str):
        super().__init__(f"{url}: {message}")
        self.url, self.code, self.message = url, code, message


class Hub:
    """An event loop and one inbox for a set of links: a relayed step (swarm/relay.py) sends on the
    first node's link and waits for the answer on the last one's, or an error on any. Every link
    has a reader task that puts (link, message) in the inbox; the loop runs, in the calling thread,
    only while a call waits. A link has a hub of its own unless it is given one; one session's
    links share one (a session is driven from one thread at a time)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.watch = None      # while ``wait`` runs: sees each message before the inbox would
        self._outcome = None   # what the watch took (or raised), which ends ``wait``
        self._deadline = 0.0   # while ``wait`` runs: when it gives up (the loop's clock)
        self._alarm = None     # the timer that ends a wait at its deadline (``_ring``)

    def offer(self, link, msg) -> None:
        """A link's message: to the watch of a ``wait`` if one runs, else into the inbox."""
        watch = self.watch
        if watch is None:
            self.inbox.put_nowait((link, msg))
            return
        try:
            taken = watch(link, msg)
        except Exception as e:  # (raised again by wait, on its caller's side)
            taken = e
        if taken is not None:
            self.watch, self._outcome = None, taken
            self.loop.stop()

    def wait(self, watch, timeout: float, send=None):
        """Run the loop until ``watch(link, message)`` returns something other than None, and return
        that (or raise what it raised); asyncio.TimeoutError after ``timeout``. The watch sees the
        messages already in the inbox, then each as it is delivered, in the delivery callback itself
        (the tap's, swarm/tap.py), which stops the loop when it is taken: no task woken, no turn of
        the loop after the answer, on a step's critical path. Messages the watch does not take are
        dropped. ``send``: a function making a coroutine to run first (its error ends the wait too),
        called only if the wait runs the loop."""
        while not self.inbox.empty():
            link, msg = self.inbox.get_nowait()
            taken = watch(link, msg)
            if taken is not None:
                return taken
        return self._here(self._wait_here, watch, timeout, send)

    def _wait_here(self, watch, timeout: float, send):
        async def sending():
            try:
                await send()
            except Exception as e:
                self.watch, self._outcome = None, e
                self.loop.stop()

        self.watch, self._outcome = watch, None
        self._deadline = self.loop.time() + timeout
        alarm = self._alarm
        if alarm is None or alarm.cancelled() or alarm.when() > self._deadline:  # (or a shorter wait than before)
            self._alarm = None
            if alarm is not None:
                alarm.cancel()
            self._alarm = self.loop.call_at(self._deadline, self._ring)
        task = self.loop.create_task(sending()) if send is not None else None
        try:
            self.loop.run_forever()
        finally:
            self.watch = None
            if task is not None and not task.done():  # (Ctrl-C, a timeout): nothing left pending
                task.cancel()
                try:
                    self.loop.run_until_complete(task)
                except BaseException:
                    pass
        outcome, self._outcome = self._outcome, None
        if outcome is None:
            raise asyncio.TimeoutError()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _ring(self) -> None:
        """The alarm: ends the wait running at its deadline, or sets itself for that wait's deadline.
        One timer serves every wait until one of them runs out (a decode step waits about 10 ms,
        its timeout is seconds): a timer made and cancelled for each step cost the client's loop
        about 40 lines of Python per token (heap, handle, cancel), on a core just woken."""
        self._alarm = None
        if self.watch is None:  # no wait runs (the loop runs for something else): the next wait sets it
            return
        if self.loop.time() >= self._deadline - 0.001:
            self.watch = None
            self.loop.stop()
        else:
            self._alarm = self.loop.call_at(self._deadline, self._ring)

    def run(self, coro, timeout: float):
        """Run ``coro`` on this hub's loop, here; from inside a running loop, on a helper thread."""
        return self._here(self._run_here, coro, timeout)

    @staticmethod
    def _here(fn, *args):
        """``fn(*args)`` here, or from inside a running loop (the API server's) on a helper thread:
        this hub's loop cannot run inside another."""
        try:
            asyncio.get_running_loop()
            inside = True
        except RuntimeError:
            inside = False
        if not inside:  # (outside the except: errors raised here carry no "no running event loop")
            return fn(*args)
        with ThreadPoolExecutor(1) as helper:
            return helper.submit(fn, *args).result()

    def _run_here(self, coro, timeout: float):
        # One task and a timer, not asyncio.wait_for (a second task and more loop turns per call:
        # this runs once per hop of every token).
        task = self.loop.create_task(coro)
        expired = []
        timer = self.loop.call_later(timeout, lambda: (expired.append(True), task.cancel()))
        try:
            return self.loop.run_until_complete(task)
        except asyncio.CancelledError:
            if expired:
                raise asyncio.TimeoutError() from None
            raise
        except BaseException:  # Ctrl-C: leave no call pending on the connection, so it can be closed
            if not task.done():
                task.cancel()
                try:
                    self.loop.run_until_complete(task)
                except BaseException:
                    pass
            raise
        finally:
            timer.cancel()

    def close(self) -> None:
        """Cancel what is left on the loop (links' readers) and close it; callable from anywhere."""
        if self.loop.is_closed():
            return

        async def settle():
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        try:
            self.run(settle(), 5)
        except Exception:  # a task that will not finish: the loop is closed regardless
            pass
        self.loop.close()


def tap(ws: aiohttp.ClientWebSocketResponse, deliver, max_size: int) -> None:
    """Put a Tap (swarm/tap.py) between ``ws``'s socket and aiohttp's reader."""
    protocol = ws._conn.protocol  # (aiohttp's private attributes, pinned in setup.cfg: see test_tap.py)
    protocol._payload_parser = Tap(protocol._payload_parser, ws._reader, deliver, max_size)


class NodeLink:
    """One WebSocket to one node; request() sends a frame and returns the checked reply."""

    def __init__(self, url: str, key: bytes | None = None, dim: int | None = None, max_rows: int | None = None,
                 hub: Hub | None = None):
        self.url, self.key, self.dim, self.max_rows = url, key, dim, max_rows
        self.hub, self.own_hub = hub or Hub(), hub is None
        self.loop = self.hub.loop
        self.http: aiohttp.ClientSession | None = None
        self.ws = None
        self.reader: asyncio.Task | None = None

    def run(self, coro, timeout: float):
        return self.hub.run(coro, timeout)

    def connect(self) -> "NodeLink":
        async def go():
            self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT))
            limit = wire.HEADER.size + (self.max_rows or 0) * (self.dim or 0) * 4 + wire.MAC_LEN + wire.MAX_JSON
            ws = await self.http.ws_connect(self.url, max_msg_size=limit, compress=0, autoping=True)
            tap(ws, self._deliver, limit)  # (before the first request: a node sends nothing unasked)
            self.reader = asyncio.ensure_future(self._read(ws))
            return ws

        try:
            self.ws = self.run(go(), CONNECT_TIMEOUT)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            self.abort()
            raise NodeError(self.url, "unreachable", f"cannot connect ({_why_not_connected(e)})") from None
        return self

    def _deliver(self, payload: bytes) -> None:
        """A binary message the tap took (swarm/tap.py) into the hub's inbox."""
        self.hub.offer(self, aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, payload, None))

    async def _read(self, ws) -> None:
        """Every message of this link the tap left to aiohttp into the hub's inbox, the connection's
        end included."""
        while True:
            msg = await ws.receive()
            self.hub.offer(self, msg)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return

    async def next_message(self):
        """This link's next message; another link's, left over from a relayed step that failed, is dropped."""
        while True:
            link, msg = await self.hub.inbox.get()
            if link is self:
                return msg

    def exchange(self, data: bytes | None, timeout: float) -> bytes:
        """Send one message (unless ``data`` is None), return the next message's bytes (raises
        NodeError if none comes)."""
        async def go():
            if data is not None:
                await self.ws.send_bytes(data)
            msg = await self.next_message()
            if msg.type != aiohttp.WSMsgType.BINARY:
                raise NodeError(self.url, "died", f"connection closed ({msg.type.name.lower()})")
            return msg.data

        if self.ws is None or self.ws.closed:
            raise NodeError(self.url, "died", "connection closed")
        try:
            return self.run(go(), timeout)
        except asyncio.TimeoutError:
            self.abort()
            raise NodeError(self.url, "timeout", f"no reply within {timeout:.0f} s") from None
        except (aiohttp.ClientError, OSError, ConnectionError) as e:
            raise NodeError(self.url, "died", f"connection lost ({type(e).__name__})") from None

    def request(self, frame: wire.Frame, timeout: float) -> wire.Frame:
        raw = self.exchange(wire.encode(frame, self.key), timeout)
        while True:
            try:
                reply = wire.decode(raw, self.key, self.dim, self.max_rows)
            except wire.WireError as e:
                if e.code == "auth":  # (the wording of wire.decode is the receiving node's)
                    raise NodeError(self.url, "auth", "this node's swarm is open (its replies carry no HMAC): "
                                    "drop --swarm-key" if not wire.carries_mac(raw) else
                                    "its replies are signed with another swarm key (see --swarm-key)") from None
                raise NodeError(self.url, "bad_reply", f"unusable reply: {e}") from None
            stale = reply.type == wire.RELAYED or (reply.type == wire.ERROR and (reply.body or {}).get("relay"))
            if not stale:
                break
            raw = self.exchange(None, timeout)  # that was a relayed step's, given up on: read on
        if reply.type == wire.ERROR:
            raise self.error(reply)
        if reply.session != frame.session:
            raise NodeError(self.url, "bad_reply", "the reply names another session")
        return reply

    def error(self, reply: wire.Frame) -> NodeError:
        """A node's ERROR reply as the NodeError its caller raises."""
        body = reply.body or {}
        code = str(body.get("code", "error"))
        message = str(body.get("message", "error"))
        if code == "auth":
            message = f"refused: {message} (see --swarm-key)"
        return NodeError(self.url, code, message)

    def abort(self) -> None:
        """Close the connection (if any); the link cannot be used afterwards (nor its own hub)."""
        if self.loop.is_closed():
            return

        async def close():
            if self.reader is not None:
                self.reader.cancel()
            if self.ws is not None and not self.ws.closed:
                await self.ws.close()
            if self.http is not None:
                await self.http.close()

        try:
            self.run(close(), 5)
        except Exception:  # closing a connection that is already gone
            pass
        if self.own_hub:
            self.hub.close()


def _why_not_connected(e: BaseException) -> str:
    """A connection failure in a few words ('Connection refused'), not aiohttp's repr of it."""
    if isinstance(e, asyncio.TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    os_error = getattr(e, "os_error", None) or (e if isinstance(e, OSError) else None)
    if os_error is not None and os_error.errno:
        return os.strerror(os_error.errno)
    return f"{type(e).__name__}: {e}".rstrip(": ")


def query_info(url: str, key: bytes | None = None, timeout: float = CONNECT_TIMEOUT) -> tuple[dict, float]:
    """A node's INFO and the round trip in ms (the best of three small requests)."""
    link = NodeLink(url, key).connect()
    try:
        best, info = float("inf"), {}
        for _ in range(3):
            t0 = time.perf_counter()
            info = link.request(wire.Frame(wire.INFO_REQ, secrets.token_bytes(16)), timeout).body or {}
            best = min(best, (time.perf_counter() - t0) * 1000)
        return info, best
    finally:
        link.abort()


class RemoteSpanSession:
    """A ``SpanSession`` for blocks first..last run by one node, over its own WebSocket."""

    def __init__(self, url: str, first_layer: int, last_layer: int, capacity: int, dim: int,
                 key: bytes | None = None, dtype: str = "float32", step_timeout: float = STEP_TIMEOUT,
                 hub: Hub | None = None, ms_per_token: float | None = None, lane_port: int | None = None):
        self.url, self.first_layer, self.last_layer = url, first_layer, last_layer
        self._capacity, self.dim, self.dtype = capacity, dim, wire.DTYPE_CODES[dtype]
        self.step_timeout = step_timeout  # a decode step's bound; a prefill gets per_row more per row
        self.per_row = per_row_s(ms_per_token)  # (ms_per_token: the node's advertised, for these blocks)
        self.sid = secrets.token_bytes(16)
        self._hop: relay.Hop | None = None
        self._position = 0
        self.key = key
        self.link = NodeLink(url, key, dim, capacity, hub).connect()
        self.node_s = 0.0       # node compute, decode steps only
        self.round_s = 0.0      # round trips seen by this client, decode steps only
        self.steps = 0          # decode steps
        self.closed = False
        self.last_used = time.perf_counter()  # the last exchange on the link
        self.lane_port = lane_port if isinstance(lane_port, int) and 0 < lane_port < 65536 else None  # INFO's
        self.lane = None           # its ClientLane once bound (swarm/lane_client.py)
        self.lane_address = None   # its node's lane, HOST:PORT (lane_client.address)
        self.lane_bound = None     # the next lane it was bound with
        self.lane_refused = False  # binding failed: this span relays over its WebSocket
        self.lane_ready = False    # its node has this session bound to self.lane

    @property
    def position(self) -> int:
        return self._position

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def hop(self) -> relay.Hop:
        """This span as a relay names it (made once: relay_step names it at every step)."""
        if self._hop is None or self._hop.url != self.url:
            self._hop = relay.Hop(self.url, self.sid, self.first_layer, self.last_layer)
        return self._hop

    def forward(self, hidden: np.ndarray) -> np.ndarray:
        # hidden: (T, dim) -> (T, dim)
        # A node computing this session's previous step answers `busy`: a relayed step that failed
        # at another node (say, a dead one, whose connection closed at once) while this one was
        # still computing it, now sent hop by hop. Sent again until that step ends, within the
        # step's time; a node that stays busy longer fails over as any other error does.
        deadline, wait = time.monotonic() + self.step_timeout, BUSY_RETRY_S
        while True:
            try:
                return self._forward(hidden)
            except NodeError as e:
                if e.code != "busy" or time.monotonic() + wait > deadline:
                    raise
            time.sleep(wait)
            wait = min(2 * wait, 0.1)

    def _forward(self, hidden: np.ndarray) -> np.ndarray:
        T = hidden.shape[0]
        frame = wire.Frame(wire.FORWARD, self.sid, self._position, hidden, first_block=self.first_layer,
                           last_block=self.last_layer, dtype=self.dtype)
        t0 = time.perf_counter()
        quiet = t0 - self.last_used
        try:
            reply = None
            if T == 1 and self._position > 0 and self.lane_port is not None:  # (a decode step of an open
                reply = lane_client.forward(self, wire.encode(frame, self.key), self._position,  # session:
                                            self.step_timeout, self.key)                          # its lane)
                if reply is not None and reply.type == wire.ERROR:
                    if (reply.body or {}).get("code") == "lane":  # (a cache to grow: the WebSocket's to do)
                        reply = None
                    else:
                        raise self.link.error(reply)
            if reply is None:
                reply = self.link.request(frame, self.step_timeout + self.per_row * (T - 1))
        except ValueError as e:  # wire.encode: the hidden states overflow the wire dtype (float16)
            raise NodeError(self.url, "overflow", f"{e}: this route needs float32 on the wire") from None
        except NodeError as e:
            if e.code == "died" and quiet >= QUIET_S:
                # a node closes a connection silent for its idle time (its sessions expired with it):
                # replay on the same node; a node truly gone fails the new connection and is avoided
                raise NodeError(self.url, "unknown_session", f"{e.message} after {quiet:.0f} s without a "
                                                             f"step; replaying") from None
            raise
        self.last_used = time.perf_counter()
        elapsed = time.perf_counter() - t0
        if reply.type != wire.RESULT or reply.array.shape != (T, self.dim) or reply.position != self._position:
            raise NodeError(self.url, "bad_reply", "the reply does not answer this step")
        if T == 1:
            self.steps += 1
            self.node_s += reply.elapsed_us / 1e6
            self.round_s += elapsed
        self._position += T
        return reply.array.astype(np.float32)

    def relayed(self, node_s: float, round_s: float) -> None:
        """A decode step this span ran inside a relayed step (relay_step): count it as its own."""
        self.steps += 1
        self.node_s += node_s
        self.round_s += round_s
        self._position += 1
        self.last_used = time.perf_counter()

    def rewind(self, position: int) -> None:
        if not 0 <= position <= self._position:
            raise ValueError(f"cannot rewind a span session at {self._position} to {position}")
        self._position = position  # the node rewinds when the next FORWARD names this position

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.link.request(wire.Frame(wire.CLOSE, self.sid), 5)
        except Exception:  # gone, or interrupted mid-call (Ctrl-C): closing the connection drops it too
            pass
        self.link.abort()
        lane_client.close(self)


class RelayFailed(Exception):
    """A relayed step did not come back; the step is then run hop by hop (which fails over)."""


RELAY_PATIENCE = 10   # a relayed step is given up on after this many times the recent ones...
RELAY_MIN_S = 2.0     # ...but never sooner than this (a loaded machine stalls for whole time slices)


def relay_timeout(step_timeout: float, recent_s: list[float]) -> float:
    """How long to wait for a relayed step: a stuck node is then found hop by hop (which waits the
    full step timeout on it) without first waiting as long on the relay."""
    if not recent_s:
        return step_timeout
    typical = sorted(recent_s)[len(recent_s) // 2]
    return min(step_timeout, max(RELAY_MIN_S, RELAY_PATIENCE * typical))


# Relayed steps' numbers: a counter from a random start, so every step of a process has its own
# (all a step number is for) without a call into the OS's random source at every token.
_STEPS = itertools.count(secrets.randbits(62))
STEP_MASK = 2**63 - 1  # (the wire takes numbers below 2**63)


def relay_step(spans: list[RemoteSpanSession], hidden: np.ndarray, timeout: float | None = None) -> np.ndarray:
    """One decode step through every span, passed node to node (swarm/relay.py); the spans share
    a hub. Returns (len(spans) + 1, dim): each span's input, then the last one's output; each span
    counts the step (its compute, and an equal share of the crossings' time). Raises RelayFailed
    on an error from any node, a connection lost, or no answer within ``timeout`` (by default the
    last span's step timeout); nothing is counted then."""
    first, last = spans[0], spans[-1]
    if len({id(s.link.hub) for s in spans}) != 1 or hidden.shape[0] != 1:
        raise ValueError("a relayed step is one row, through spans sharing a hub")
    if any(s.closed or s.link.ws is None or s.link.ws.closed or s.position != first.position for s in spans):
        raise RelayFailed("a span of the route is closed or out of step")
    position = first.position
    lanes = lane_client.usable(spans)
    if lanes:
        try:
            lane_client.bind(spans, first.key)  # (once per route: connect, BIND, BOUND)
        except lane_client.LaneLost:
            lanes = False  # (those spans relay over their WebSockets from now on)
    t0 = time.perf_counter()  # (the round trip counts the framing and the write, as a FORWARD's does)
    step = next(_STEPS) & STEP_MASK  # echoed in the answer and in errors: a late relay's are not this step's
    hops = relay.pack_hops(tuple(s.hop for s in spans[1:]))
    try:
        data = wire.encode(wire.Frame(wire.RELAY, first.sid, position, hidden, first_block=first.first_layer,
                                      last_block=first.last_layer, dtype=first.dtype,
                                      body=wire.Trailer(step, [], hops)), first.key)
    except ValueError as e:  # float16 overflow: the hop-by-hop step says so, naming the node
        raise RelayFailed(str(e)) from None

    timeout = last.step_timeout if timeout is None else timeout
    if lanes:
        trace.mark("send", step)
        try:
            first.lane.send(data)
        except lane_client.LaneLost as e:
            lane_client.close(first)
            raise RelayFailed(str(e)) from None
        try:
            reply = lane_client.wait(spans, first.key, step, position, timeout, RelayFailed)
        except RelayFailed:
            for span in spans:  # bound again at the next relayed step (a next node's link may have dropped)
                span.lane_bound = None
            raise
        trace.mark("answer", step)
    else:
        reply = _relay_over_websockets(spans, data, step, position, timeout)
    round_s = time.perf_counter() - t0
    elapsed = reply.body.elapsed_us
    rows = reply.array
    if rows.shape != (len(spans) + 1, first.dim) or len(elapsed) != len(spans):
        raise RelayFailed(f"{last.url}: the relayed answer does not match the route")
    node_s = [float(t) / 1e6 for t in elapsed]
    crossing = max(round_s - sum(node_s), 0.0) / len(spans)  # each hop's share of the time between nodes
    for span, s in zip(spans, node_s):
        span.relayed(s, s + crossing)
    return rows if rows.dtype == np.float32 else rows.astype(np.float32)  # (a read-only view of the answer)


def _relay_over_websockets(spans: list[RemoteSpanSession], data: bytes, step: int, position: int,
                           timeout: float) -> wire.Frame:
    """A relayed step's frame sent on the first span's WebSocket, its answer waited for on the
    last one's (an error on any ends the wait): the RELAYED frame."""
    first, last = spans[0], spans[-1]
    hub, links = first.link.hub, {s.link for s in spans}
    # written here when the socket takes it at once (relay.write_now), before the event loop is
    # entered: the loop's setup for the wait then overlaps the nodes' work instead of delaying it
    trace.mark("send", step)
    try:
        sent = relay.write_now(first.link.ws, data)
    except (aiohttp.ClientError, OSError, ConnectionError) as e:
        raise RelayFailed(f"{first.url}: connection lost ({type(e).__name__})") from None

    def answer(link, msg):  # the step's answer, an error naming it (raised), or None: not for this step
        if link not in links:
            return None  # a link of a chain this session has left
        if msg.type != aiohttp.WSMsgType.BINARY:
            raise RelayFailed(f"{link.url}: connection closed")
        try:
            reply = wire.decode(msg.data, link.key, link.dim, len(spans) + 1)
        except wire.WireError as e:
            raise RelayFailed(f"{link.url}: unusable reply: {e}") from None
        if reply.type == wire.ERROR and (reply.body or {}).get("step", step) == step:  # (none: the frame itself)
            raise RelayFailed(f"{link.url}: {(reply.body or {}).get('message', 'error')}")
        if (reply.type == wire.RELAYED and link is last.link and reply.session == last.sid
                and reply.position == position and reply.body.step == step):
            trace.mark("answer", step)
            return reply
        return None  # left over from an earlier step: skip it

    try:
        return hub.wait(answer, timeout, None if sent else lambda: first.link.ws.send_bytes(data))
    except asyncio.TimeoutError:
        raise RelayFailed(f"no answer within {timeout:.1f} s") from None
    except (aiohttp.ClientError, OSError, ConnectionError) as e:
        raise RelayFailed(f"{first.url}: connection lost ({type(e).__name__})") from None


def distributed_text_model(loader, nodes: list[str] | None = None, key: bytes | None = None, find=None,
                           kernels: str = "numba", template: str | None = None, dtype: str = "float32",
                           step_timeout: float = STEP_TIMEOUT, relay: bool = True):
    """A ``generation.TextModel`` whose sessions run every block on the swarm's nodes.

    Only the edges (embedding, output norm and head) and the tokenizer are loaded here. Nodes come
    from ``nodes`` (WebSocket URLs) and/or ``find`` (a callable returning URLs), by default the DHT
    of a p2p:// loader (the nodes announcing the manifest's blocks).
    ``timings(text_model)`` reports the route, failovers and per-node times afterwards. With
    ``relay`` (the default) decode steps pass from node to node (swarm/relay.py).
    """
    from engine.model import LlamaModel
    from engine.tokenizer import Tokenizer
    from generation.textmodel import TextModel
    from swarm import manifest_sha
    from swarm.route import Directory, Swarm

    sha = manifest_sha(loader)
    edges = LlamaModel(loader, backend=kernels, edges_only=True)
    if find is None and getattr(loader, "node", None) is not None:  # a p2p:// source: ask its DHT
        from swarm.discovery import dht_finder

        find = dht_finder(loader.node, sha, edges.config.n_layers)
    swarm = Swarm(edges, Directory(sha, nodes, find, key), key, dtype, step_timeout, relay)
    model = {k: v for k, v in loader.manifest.model.items() if v is not None}
    info = {**model, "source": loader.where, "sha256": loader.manifest.source.get("sha256"),
            "manifest": sha, "distributed": True}
    swarm.info = info
    text_model = TextModel(name=model.get("name") or loader.manifest.source.get("name") or "model",
                           tokenizer=Tokenizer(loader.metadata, loader.where),
                           context_length=edges.config.context_length, open_session=swarm.open_session,
                           info=info, template=template)
    info["route"] = lambda: route_rows(text_model)  # live: /info, the web page and chat's /route call it
    return text_model


def timings(text_model) -> dict:
    """route, failovers, node_ms, hop_overhead_ms, relayed_steps, lane_steps of a distributed text model's
    sessions so far."""
    return text_model.open_session.__self__.timings()


def route_rows(text_model) -> list[dict]:
    """One row per hop of the latest session's route: node, blocks, ms per token measured so far."""
    t = timings(text_model)
    return [{"node": hop["node"], "blocks": hop["blocks"],
             "ms_per_token": t["node_ms"].get(f"{hop['node']} ({hop['blocks']})")} for hop in t["route"]]
