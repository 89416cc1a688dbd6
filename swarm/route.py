"""The sequence manager: find the nodes, choose a route over blocks 0..L-1, fail over with replay.

A route is a list of *segments*, each a contiguous run of blocks with its own replay history:
every hidden-state chunk fed to the segment's first block in this session, in order. When a
node of a segment dies, times out or errors, the segment asks the directory again (a node that
joined since may take over), plans a new chain for exactly its blocks (one node or several, any
sub-span of a node's span), replays the history in the same chunks as the original steps, so
the new caches are bit for bit the old ones, and retries the step. Retries are bounded.

``SwarmRoute`` is the whole route as one span session: it relays decode steps from node to node
(swarm/relay.py) and runs a step segment by segment when a relay fails, so failures are pinned
on their node there.

Planning is a shortest path over block boundaries: a hop running blocks a..e on node n costs
n's round trip plus its measured ms per block times the blocks, up to doubled as n's session
slots fill (its compute is shared); nodes with no free session or cache memory, excluded after
failing, or serving another model, are skipped.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from common.errors import EXIT_UNREACHABLE, UserError
from distribution.spans import block_ranges
from swarm.client import Hub, NodeError, RelayFailed, RemoteSpanSession, query_info, relay_step, relay_timeout
from swarm.wire import MAX_HOPS

MAX_FAILOVERS = 4      # per step: then the error is the user's to see
MAX_RELAY_FAILURES = 3  # relayed steps failing in a row: then this session's steps go hop by hop
EXCLUDE_S = 60.0       # a node that failed is not chosen again for this long
FULL_EXCLUDE_S = 1.0   # ... but one that answered `full` only this long: its sessions come and go
BUSY_WAITS = (0.5, 1.0, 2.0)  # looks again after these pauses while only busy nodes serve a block
RETRYABLE_SAME_NODE = {"unknown_session"}  # the node is fine, it only lost (expired) our session


@dataclass
class NodeInfo:
    url: str
    first: int
    last: int
    ms_per_token: float
    free_sessions: int
    max_positions: int
    rtt_ms: float
    max_sessions: int = 1
    free_cache_mb: float = float("inf")
    lane: int | None = None  # its lane port (swarm/lane.py), if it offers one

    @property
    def per_block_ms(self) -> float:
        return self.ms_per_token / (self.last - self.first + 1)

    @property
    def load(self) -> float:
        """0 idle .. 1 every session slot taken: a busy node's blocks are shared with others."""
        return 1 - self.free_sessions / max(self.max_sessions, 1)


class NoRoute(UserError):
    """No node (left) can run some blocks: exit 3, as for any server or peer that cannot be reached."""
    exit_code = EXIT_UNREACHABLE


class Busy(NoRoute):
    """Every node serving some block is busy now (full, or failed a moment ago): worth a retry."""


class Directory:
    """The nodes serving one model: from explicit WebSocket URLs, or from a ``find`` callable
    (the DHT lookup) returning URLs; each is asked for its INFO, which also measures its latency."""

    def __init__(self, manifest_sha: str, urls: list[str] | None = None, find=None, key: bytes | None = None):
        self.manifest_sha, self.urls, self.find, self.key = manifest_sha, list(urls or []), find, key
        self.problems: dict[str, str] = {}  # url -> why it is not usable, for the no-route error

    def candidates(self) -> list[str]:
        found = list(self.find()) if self.find else []
        return list(dict.fromkeys(self.urls + found))

    def nodes(self, skip=frozenset()) -> list[NodeInfo]:
        """Every candidate's INFO; those in ``skip`` (unreachable on the last look) are not asked
        again, and keep their problem."""
        nodes, earlier, self.problems = [], self.problems, {}
        for url in self.candidates():
            if url in skip:
                self.problems[url] = earlier.get(url, "unreachable a moment ago")
                continue
            try:
                info, rtt = query_info(url, self.key)
            except NodeError as e:
                self.problems[url] = e.message
                continue
            if info.get("manifest") != self.manifest_sha:
                self.problems[url] = f"serves another model ({str(info.get('manifest'))[:16]}...)"
                continue
            nodes.append(NodeInfo(url, int(info["first_block"]), int(info["last_block"]),
                                  float(info["ms_per_token"]), int(info["free_sessions"]),
                                  int(info["max_positions"]), rtt, int(info["max_sessions"]),
                                  float(info["free_cache_mb"]), info.get("lane")))
        return nodes


def plan(nodes: list[NodeInfo], first: int, last: int, exclude=frozenset(), positions: int = 1) -> list[tuple]:
    """The cheapest chain of (node, a, b) hops running blocks first..last in order. ``exclude``
    holds the URLs not to use (a dict gives (why, busy) for each). Raises NoRoute when no node
    serves some block, Busy when nodes do but none of them can take a session now."""
    usable = [n for n in nodes if n.url not in exclude and n.free_sessions > 0 and n.free_cache_mb > 0]
    roomy = [n for n in usable if n.max_positions >= positions]
    for pool in (roomy, usable):  # prefer nodes that can hold the whole session
        best = _shortest(pool, first, last)
        if best is not None:
            return best
    missing = [b for b in range(first, last + 1) if not any(n.first <= b <= n.last for n in usable)]
    absent = [b for b in missing if not any(n.first <= b <= n.last for n in nodes)]
    if absent:
        raise NoRoute(f"no node serves blocks {block_ranges(absent)}")
    held = [n for n in nodes if n not in usable and any(n.first <= b <= n.last for b in missing)]
    why = [_why_unusable(n, exclude) for n in held]
    reasons = "; ".join(f"{n.url}: {text}" for n, (text, _) in zip(held, why))
    if any(busy for _, busy in why):
        raise Busy(f"every node serving blocks {block_ranges(missing)} is busy ({reasons})")
    raise NoRoute(f"no usable node serves blocks {block_ranges(missing)} ({reasons})")


def _why_unusable(node: NodeInfo, exclude) -> tuple[str, bool]:
    """Why a node is passed over, and whether that may change within seconds (it is busy)."""
    if node.url in exclude:
        return exclude[node.url] if isinstance(exclude, dict) else ("failed", False)
    if node.free_sessions <= 0:
        return f"all {node.max_sessions} sessions taken", True
    return "no KV-cache memory free", True


def _shortest(nodes: list[NodeInfo], first: int, last: int) -> list[tuple] | None:
    best: dict[int, tuple[float, list]] = {last + 1: (0.0, [])}
    for a in range(last, first - 1, -1):
        options = []
        for n in nodes:
            if not n.first <= a <= n.last:
                continue
            for e in range(a, min(n.last, last) + 1):
                if e + 1 in best:
                    cost, rest = best[e + 1]
                    hop = (n.rtt_ms + n.per_block_ms * (e - a + 1)) * (1 + n.load)
                    options.append((hop + cost, len(rest), n.url, [(n, a, e)] + rest))
        if options:
            cost, _, _, hops = min(options, key=lambda o: o[:3])
            best[a] = (cost, hops)
    return best[first][1] if first in best else None


class Segment:
    """A ``SpanSession`` for blocks first..last on one or more nodes, with replay on failure."""

    def __init__(self, swarm, first: int, last: int, capacity: int, spans: list, hub: Hub | None = None):
        self.swarm, self.first_layer, self.last_layer, self.hub = swarm, first, last, hub
        self._capacity = capacity
        self.spans = spans
        self.taken = self.describe()       # the chain in use (kept after close, for the report)
        # Inputs to block ``first``, chunk by chunk from position 0, as (chunk, rows in use): a rewind
        # into a chunk keeps the whole chunk, since a chunk's rows are computed together and its first
        # k rows alone would give a cache that differs in the last bits.
        self.history: list[tuple[np.ndarray, int]] = []
        self._position = 0

    @property
    def position(self) -> int:
        return self._position

    @property
    def capacity(self) -> int:
        return self._capacity

    def forward(self, hidden: np.ndarray) -> np.ndarray:
        # hidden: (T, dim) -> (T, dim)
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        lost = None
        for attempt in range(MAX_FAILOVERS + 1):
            try:
                if lost is not None:
                    self._rebuild(lost)
                out = self._through(hidden)
                break
            except NodeError as e:
                if attempt == MAX_FAILOVERS:
                    raise NoRoute(f"blocks {self.first_layer}-{self.last_layer}: gave up after "
                                  f"{MAX_FAILOVERS} failovers (last: {e})") from None
                self.swarm.failed(e)
                lost = e
        self.history.append((hidden, hidden.shape[0]))
        self._position += hidden.shape[0]
        return out

    def _through(self, x: np.ndarray) -> np.ndarray:
        for span in self.spans:
            x = span.forward(x)
        return x

    def _rebuild(self, lost: NodeError) -> None:
        """A new chain for this segment's blocks, its caches rebuilt by replaying the history."""
        for span in self.spans:
            span.close()
        self.spans = []
        try:
            self.spans = self.swarm.open_chain(self.first_layer, self.last_layer, self._capacity, self.hub)
        except NoRoute as e:
            raise NoRoute(f"{e} (lost {lost.url}: {lost.message})") from None
        self.taken = self.describe()
        at = 0
        for chunk, used in self.history:  # the same chunks as the original steps: the same cache, bit for bit
            self._through(chunk)
            at += used
            if used < len(chunk):  # (a rewind went into this chunk: back to where it went)
                for span in self.spans:
                    span.rewind(at)

    def relayed(self, hidden: np.ndarray) -> None:
        """A decode step its spans ran inside a relayed step; ``hidden`` (1, dim) was its input."""
        self.history.append((hidden, 1))
        self._position += 1

    def rewind(self, position: int) -> None:
        if not 0 <= position <= self._position:
            raise ValueError(f"cannot rewind blocks {self.first_layer}-{self.last_layer} at "
                             f"{self._position} to {position}")
        kept, at = [], 0
        for chunk, used in self.history:
            if at + used <= position:
                kept.append((chunk, used))
            elif at < position:
                kept.append((chunk, position - at))
            at += used
        self.history, self._position = kept, position
        for span in self.spans:
            span.rewind(position)

    def close(self) -> None:
        for span in self.spans:
            span.close()
        self.spans = []

    def describe(self) -> list[dict]:
        return [{"blocks": f"{s.first_layer}-{s.last_layer}", "node": s.url} for s in self.spans]


class Swarm:
    """Opens routed sessions over the nodes a ``Directory`` knows; keeps the timings and failovers."""

    def __init__(self, edges, directory: Directory, key: bytes | None = None, dtype: str = "float32",
                 step_timeout: float = 30.0, relay: bool = True):
        self.edges, self.directory, self.key, self.dtype = edges, directory, key, dtype
        self.relay = relay               # decode steps passed node to node (swarm/relay.py)
        self.relayed_steps = 0
        self.lane_steps = 0  # of those, relayed on lanes (swarm/lane.py)
        self.step_timeout = step_timeout
        self.n_layers, self.dim = edges.config.n_layers, edges.config.dim
        self.failovers = 0
        self.excluded: dict[str, tuple] = {}     # url -> (until when it is passed over, why, only full)
        self.opened: list[RemoteSpanSession] = []
        self.closed_stats: dict[tuple, list] = {}  # (url, first, last) -> [node_s, round_s, steps]
        self.last_segments: list[Segment] = []
        self.info: dict = {}  # the TextModel's info: "route" is kept up to date there

    def failed(self, error: NodeError) -> None:
        self.failovers += 1
        if error.code not in RETRYABLE_SAME_NODE:
            self.exclude(error)

    def exclude(self, error: NodeError) -> None:
        """Pass over ``error``'s node for a while: briefly when it was only full."""
        full = error.code == "full"
        self.excluded[error.url] = (time.monotonic() + (FULL_EXCLUDE_S if full else EXCLUDE_S), error.message, full)

    def _excluded(self) -> dict[str, tuple[str, bool]]:
        now = time.monotonic()
        return {u: (why, full) for u, (until, why, full) in self.excluded.items() if now < until}

    def open_chain(self, first: int, last: int, capacity: int, hub: Hub | None = None) -> list[RemoteSpanSession]:
        """Remote span sessions covering first..last, chosen from a fresh look at the directory.
        While the only nodes for some block are busy (full), it looks again after BUSY_WAITS."""
        waits, attempts, skip = list(BUSY_WAITS), MAX_FAILOVERS + 1, frozenset()
        while attempts:
            # A node that failed a moment ago is passed over anyway: it is not asked for its INFO
            # either (a frozen one takes the query's whole timeout, at every look of a failover).
            failed = {u: why for u, (why, full) in self._excluded().items() if not full}
            nodes = self.directory.nodes(skip | failed.keys())
            for url, why in failed.items():
                if url in self.directory.problems:
                    self.directory.problems[url] = f"failed a moment ago ({why})"
            skip = frozenset()
            try:
                hops = plan(nodes, first, last, self._excluded(), capacity)
            except Busy as e:
                if not waits:
                    raise Busy(str(e) + self._problems()) from None
                time.sleep(waits.pop(0))
                skip = frozenset(self.directory.problems)  # only sessions are awaited: the unreachable
                continue                                   # (up to 10 s each to find out) are not asked again
            except NoRoute as e:
                raise NoRoute(str(e) + self._problems()) from None
            try:
                return self._connect(hops, capacity, hub)
            except NodeError as e:
                self.exclude(e)
                self.directory.problems[e.url] = e.message
                attempts -= 1
        raise NoRoute(f"no reachable nodes for blocks {first}-{last}" + self._problems())

    def _connect(self, hops, capacity: int, hub: Hub | None = None) -> list[RemoteSpanSession]:
        spans = []
        try:
            for node, a, b in hops:
                spans.append(RemoteSpanSession(node.url, a, b, min(capacity, node.max_positions), self.dim,
                                               self.key, self.dtype, self.step_timeout, hub,
                                               node.per_block_ms * (b - a + 1), node.lane))
        except NodeError:
            for s in spans:
                s.close()
            raise
        self._fold_closed()
        self.opened += spans
        return spans

    def _fold_closed(self) -> None:
        """Keep closed spans' timings as sums, so a long-lived client does not keep every span."""
        for s in [s for s in self.opened if s.closed]:
            sums = self.closed_stats.setdefault((s.url, s.first_layer, s.last_layer), [0.0, 0.0, 0])
            sums[0] += s.node_s
            sums[1] += s.round_s
            sums[2] += s.steps
        self.opened = [s for s in self.opened if not s.closed]

    def _problems(self) -> str:
        """The nodes found but not usable, and why: a 'no node serves' error is about the nodes that
        answered, and these could not be asked (dead, unreachable, or not of this client's --swarm-key)."""
        if not self.directory.problems:
            return ""
        return "; nodes found but not usable: " + "; ".join(f"{u}: {m}" for u, m in self.directory.problems.items())

    def open_session(self, max_positions: int | None = None):
        from engine.session import RoutedSession

        capacity = min(max_positions or self.edges.config.context_length, self.edges.config.context_length)
        hub = Hub()  # the session's links share one loop, so a relayed step can wait on all of them
        try:
            chain = self.open_chain(0, self.n_layers - 1, capacity, hub)
        except BaseException:
            hub.close()
            raise
        self.last_segments = [Segment(self, s.first_layer, s.last_layer, s.capacity, [s], hub) for s in chain]
        session = RoutedSession(self.edges, [SwarmRoute(self, self.last_segments, hub)])
        held = min(s.capacity for s in chain)
        if held < capacity:  # the nodes' --max-positions, not the client's --ctx, bound this session
            session.capacity_reason = (f"the nodes of this route hold at most {held} positions per session "
                                       f"(their --max-positions); shorten it")
        return session

    def timings(self) -> dict:
        """route, failovers, node_ms (per node, ms per decode token), hop_overhead_ms, relayed_steps
        and, of those, lane_steps."""
        sums = {k: list(v) for k, v in self.closed_stats.items()}
        for s in self.opened:
            total = sums.setdefault((s.url, s.first_layer, s.last_layer), [0.0, 0.0, 0])
            total[0] += s.node_s
            total[1] += s.round_s
            total[2] += s.steps
        node_ms, overhead = {}, []
        for (url, first, last), (node_s, round_s, steps) in sums.items():
            if steps:
                node_ms[f"{url} ({first}-{last})"] = round(node_s * 1000 / steps, 3)
                overhead.append((round_s - node_s) * 1000 / steps)
        route = [hop for seg in self.last_segments for hop in seg.taken]
        return {"route": route, "failovers": self.failovers, "node_ms": node_ms,
                "hop_overhead_ms": round(sum(overhead) / len(overhead), 3) if overhead else None,
                "relayed_steps": self.relayed_steps, "lane_steps": self.lane_steps}


class SwarmRoute:
    """The whole route as one ``SpanSession`` over blocks 0..L-1, made of segments.

    A decode step is relayed node to node when it can be (swarm/relay.py): one crossing per node
    instead of two, and the answer brings every segment's input back for its replay history (a
    route of one node relays too: both ends then take the step in their read callbacks). Any
    other step, and a relayed one that fails (a node died, errs or is slow), goes segment by
    segment, where a failure is pinned on its node and failed over. After MAX_RELAY_FAILURES
    failed relays in a row (say, nodes that cannot reach each other) the session stops relaying.
    """

    def __init__(self, swarm: Swarm, segments: list[Segment], hub: Hub):
        self.swarm, self.segments, self.hub = swarm, segments, hub
        self.first_layer, self.last_layer = segments[0].first_layer, segments[-1].last_layer
        self.relay_failures = 0
        self.recent: deque[float] = deque(maxlen=16)  # seconds of the latest relayed steps
        self.rewound = False  # the nodes learn of a rewind from a FORWARD: relays only append

    @property
    def position(self) -> int:
        return self.segments[0].position

    @property
    def capacity(self) -> int:
        return min(seg.capacity for seg in self.segments)

    def forward(self, hidden: np.ndarray) -> np.ndarray:
        # hidden: (T, dim) -> (T, dim)
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        spans = [span for seg in self.segments for span in seg.spans]
        relay = (self.swarm.relay and 0 < len(spans) <= MAX_HOPS and not self.rewound
                 and self.relay_failures < MAX_RELAY_FAILURES)
        self.rewound = False
        if hidden.shape[0] == 1 and relay:
            t0 = time.perf_counter()
            try:
                rows = relay_step(spans, hidden, relay_timeout(self.swarm.step_timeout, list(self.recent)))
            except RelayFailed:
                self.relay_failures += 1
            else:
                self.recent.append(time.perf_counter() - t0)
                self.relay_failures = 0
                self.swarm.relayed_steps += 1
                if spans[0].lane is not None:  # (bound and used: a relay over the WebSockets leaves none)
                    self.swarm.lane_steps += 1
                at = 0
                for seg in self.segments:
                    seg.relayed(rows[at:at + 1])
                    at += len(seg.spans)
                return rows[-1:]
        for seg in self.segments:
            hidden = seg.forward(hidden)
        return hidden

    def rewind(self, position: int) -> None:
        if position < self.position:
            self.rewound = True
        for seg in self.segments:
            seg.rewind(position)

    def close(self) -> None:
        for seg in self.segments:
            seg.close()
        self.hub.close()
