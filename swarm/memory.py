"""A node's session caches, within limits: how many sessions, how many positions each, how many
bytes in all, how long idle; and the bytes of frames it holds at once (``Inflight``).

Each session's KV cache starts small and doubles as the session grows (never past the
per-session limit), so a node's memory follows what its sessions hold rather than what they
might hold. Every allocation is checked against the budget first; a request that does not fit is
refused with a ``NodeFull`` or ``TooLong`` error the client can route around.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from engine.kv_cache import KVCache

MIN_POSITIONS = 64  # a new cache's size: a short prompt and some tokens without regrowing
log = logging.getLogger("swarm.sessions")  # a line per session opened and closed: `node` prints them


@dataclass
class Limits:
    max_sessions: int = 16
    max_positions: int = 4096          # per session
    max_cache_bytes: int = 1 << 30     # all sessions' KV caches together
    idle_s: float = 600.0              # a session unused this long is closed
    frame_s: float = 30.0              # a frame begun must arrive within this (else the connection closes)
    per_connection: int = 0            # sessions one connection may hold; 0: max(1, max_sessions // 2)
    max_inflight_bytes: int = 256 << 20  # frames being received, queued, computed or answered, all connections
    inflight_wait_s: float = 10.0      # a frame waits this long for room in that budget, then gets ``full``

    @property
    def sessions_per_connection(self) -> int:
        """So that one client cannot take every slot for the idle period (a route's client holds
        one session per node, so half the slots still serve several clients at once)."""
        return self.per_connection or max(1, self.max_sessions // 2)


class LimitError(Exception):
    code = "full"


class NodeFull(LimitError):
    code = "full"


class TooLong(LimitError):
    code = "too_long"


@dataclass
class NodeSession:
    sid: bytes
    owner: object                      # the connection that opened it
    first_block: int
    last_block: int
    cache: KVCache
    last_used: float = field(default_factory=time.monotonic)
    opened: float = field(default_factory=time.monotonic)
    relay_hops: tuple = (b"", ())      # its relays' packed hops and their parse (every step names the same)
    busy: bool = False                 # a step is part-way through (a multi-row pass yields between blocks)
    lane: object = None                # the client's lane its relayed steps answer on (swarm/lane.py)
    lane_next: tuple | None = None     # the next node's lane address, (host, port), or None: the last
    fast_relay: object = None          # its relays' common case on lanes (swarm/fast_relay.py), once seen

    @property
    def position(self) -> int:
        return self.cache.length


class SessionCache:
    """The sessions of one node, for a model with these KV heads and head size."""

    def __init__(self, limits: Limits, n_kv_heads: int, head_dim: int, dtype=np.float32):
        self.limits = limits
        self.kv_shape = (n_kv_heads, head_dim)
        self.dtype = dtype  # the engine's KV element type (its kernels expect it)
        self.position_bytes = 2 * n_kv_heads * head_dim * np.dtype(dtype).itemsize  # K and V
        self.sessions: dict[bytes, NodeSession] = {}

    # -- accounting -------------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return sum(s.cache.nbytes for s in self.sessions.values())

    @property
    def free_bytes(self) -> int:
        return max(self.limits.max_cache_bytes - self.used_bytes, 0)

    @property
    def free_sessions(self) -> int:
        return max(self.limits.max_sessions - len(self.sessions), 0)

    def _bytes(self, n_blocks: int, positions: int) -> int:
        return n_blocks * positions * self.position_bytes

    # -- life cycle -------------------------------------------------------------------------------
    def open(self, sid: bytes, owner, first_block: int, last_block: int, positions: int) -> NodeSession:
        """A new session able to hold ``positions`` (checked against every limit)."""
        if len(self.sessions) >= self.limits.max_sessions:
            raise NodeFull(f"node full: {len(self.sessions)} sessions open, the maximum (--max-sessions)")
        mine = sum(1 for s in self.sessions.values() if s.owner is owner)
        if mine >= self.limits.sessions_per_connection:
            raise NodeFull(f"node full for this connection: it holds {mine} sessions, the most one connection "
                           f"may (--max-sessions-per-connection)")
        self._check_length(positions)
        n_blocks = last_block - first_block + 1
        size = self._initial(positions)
        if self._bytes(n_blocks, size) > self.free_bytes:
            size = positions  # without the head room, if the exact need fits
        self._check_budget(self._bytes(n_blocks, size))
        session = NodeSession(sid, owner, first_block, last_block,
                              KVCache(n_blocks, size, *self.kv_shape, dtype=self.dtype))
        self.sessions[sid] = session
        log.info("session %s opened: blocks %d-%d (%d of %d open)", sid.hex()[:8], first_block, last_block,
                 len(self.sessions), self.limits.max_sessions)
        return session

    def reserve(self, session: NodeSession, positions: int) -> None:
        """Make ``session`` able to hold ``positions``, growing its cache within the limits."""
        if positions <= session.cache.capacity:
            return
        self._check_length(positions)
        n_blocks = session.last_block - session.first_block + 1
        size = min(max(positions, 2 * session.cache.capacity), self.limits.max_positions)
        extra = lambda n: self._bytes(n_blocks, n) - session.cache.nbytes  # noqa: E731
        if extra(size) > self.free_bytes:
            size = positions
        self._check_budget(extra(size))
        session.cache = grown(session.cache, size)
        session.fast_relay = None  # (its compiled path holds the old cache's K and V: planned anew, at the next relay)

    def last_used_by(self, owner) -> float:
        """When a session ``owner`` opened was last used (time.monotonic; 0.0 if it holds none)."""
        return max((s.last_used for s in self.sessions.values() if s.owner is owner), default=0.0)

    def close(self, sid: bytes) -> bool:
        return self._drop(sid, "closed")

    def close_owned_by(self, owner) -> int:
        gone = [sid for sid, s in self.sessions.items() if s.owner is owner]
        for sid in gone:
            self._drop(sid, "closed with its connection")
        return len(gone)

    def expire(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        idle = [sid for sid, s in self.sessions.items() if now - s.last_used > self.limits.idle_s]
        for sid in idle:
            self._drop(sid, f"expired (idle over {self.limits.idle_s:g} s)")
        return len(idle)

    def _drop(self, sid: bytes, how: str) -> bool:
        session = self.sessions.pop(sid, None)
        if session is not None:
            log.info("session %s %s: %d positions, %.1f s (%d of %d open)", sid.hex()[:8], how, session.position,
                     time.monotonic() - session.opened, len(self.sessions), self.limits.max_sessions)
        return session is not None

    # -- checks -----------------------------------------------------------------------------------
    def _initial(self, positions: int) -> int:
        return min(max(positions, MIN_POSITIONS), self.limits.max_positions)

    def _check_length(self, positions: int) -> None:
        if positions > self.limits.max_positions:
            raise TooLong(f"{positions} positions exceed this node's limit of {self.limits.max_positions} "
                          f"per session")

    def _check_budget(self, extra: int) -> None:
        if extra > self.free_bytes:
            raise NodeFull(f"node full: the KV cache budget has {_size(self.free_bytes)} free, "
                           f"{_size(extra)} needed (--max-cache-mb)")


class Inflight:
    """The bytes of frames a node holds at once, across all its connections: a frame's bytes are
    taken when its header announces its size (before any of its payload is buffered) and given back
    once its reply has been sent. A frame that does not fit waits, in arrival order, for room; one
    that fits goes at once even when bigger ones wait (a decode step is a few KiB and must not queue
    behind a prefill of megabytes; a waiting prefill is refused after ``inflight_wait_s``)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.waiting: list[tuple[int, object]] = []  # (bytes, granted callback), in arrival order

    @property
    def free(self) -> int:
        return self.limit - self.used

    def take(self, n: int) -> bool:
        if n > self.free:
            return False
        self.used += n
        return True

    def wait(self, n: int, granted) -> None:
        """Call ``granted()`` once ``n`` bytes have been taken for the caller (see ``release``)."""
        self.waiting.append((n, granted))

    def cancel(self, granted) -> None:
        self.waiting = [(n, g) for n, g in self.waiting if g != granted]  # (==: bound methods are new each time)

    def release(self, n: int) -> None:
        """Give back ``n`` bytes and hand them on to the waiters that now fit, oldest first."""
        self.used -= n
        for entry in list(self.waiting):
            size, granted = entry
            if size <= self.free:
                self.waiting.remove(entry)
                self.used += size
                granted()


def grown(cache: KVCache, positions: int) -> KVCache:
    """A copy of ``cache`` with room for ``positions``; the filled positions are kept."""
    n_layers, _, n_kv, head_dim = cache.k.shape
    new = KVCache(n_layers, positions, n_kv, head_dim, dtype=cache.k.dtype)
    n = cache.length
    new.k[:, :n] = cache.k[:, :n]
    new.v[:, :n] = cache.v[:, :n]
    new.length = n
    return new


def _size(n: int) -> str:
    """Bytes for a person: MiB, or KiB below one (a budget of 1 MiB with 40 KiB free read '0.0 MiB free')."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
