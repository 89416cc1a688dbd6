"""Sessions: one conversation's state, wherever its transformer blocks run.

Generation talks to a ``Session`` only: feed tokens, get the logits of the last one, rewind to an
earlier position, close. A session is made of the model's *edges* (token embedding, final norm and
head, which stay with whoever tokenizes and samples) and a *route*: a list of ``SpanSession`` s, each
mapping hidden states to hidden states through a contiguous span of blocks and keeping its own
attention (KV) cache. A local model is one span on this machine; a distributed route is several
spans on remote nodes (``swarm/``). Generation never knows which.

    tokens (T,) -> embed -> (T, dim) -> span 0..a -> span a+1..b -> ... -> head -> logits (T, vocab)

Positions are implicit: every span session's position is the number of positions it has cached,
and a feed of T tokens fills positions position..position+T-1 in every span.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from common import compute
from engine.kv_cache import KVCache


@runtime_checkable
class SpanSession(Protocol):
    """Hidden states through a span of blocks, with this session's KV cache for that span."""

    first_layer: int
    last_layer: int

    @property
    def position(self) -> int:
        """Positions cached so far (the next hidden state fed is at this position)."""

    @property
    def capacity(self) -> int:
        """Positions this span's cache can hold at most."""

    def forward(self, hidden: np.ndarray) -> np.ndarray:
        """(T, dim) float32 hidden states at positions position..position+T-1 -> (T, dim)."""

    def rewind(self, position: int) -> None:
        """Forget every position from ``position`` on (0 <= position <= self.position)."""

    def close(self) -> None:
        """Release the cache; the session cannot be used afterwards."""


@runtime_checkable
class Session(Protocol):
    """Tokens in, logits out, for one conversation."""

    @property
    def position(self) -> int: ...

    @property
    def capacity(self) -> int: ...

    def feed(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append tokens; logits (vocab,) of the last one, or (T, vocab) with ``all_logits``."""

    def rewind(self, position: int) -> None: ...

    def close(self) -> None: ...


class LocalSpanSession:
    """A span of a ``LlamaModel`` held in this process, with its own KV cache.

    Its kernels run on the process's compute thread when a server has started one (common.compute).
    """

    local = True  # computes here (a RoutedSession of local spans hops to the compute thread once per feed)

    def __init__(self, model, max_positions: int | None = None):
        self.model = model
        self.cache: KVCache = model.new_cache(max_positions)
        self.first_layer, self.last_layer = model.first_layer, model.last_layer
        self.closed = False

    @property
    def position(self) -> int:
        return self.cache.length

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def forward(self, hidden: np.ndarray) -> np.ndarray:
        # hidden: (T, dim) -> (T, dim)
        if self.closed:
            raise RuntimeError("session is closed")
        return compute.run(self.model.forward_layers, np.ascontiguousarray(hidden, dtype=np.float32), self.cache,
                           self.cache.length)

    def rewind(self, position: int) -> None:
        self.cache.truncate(position)

    def close(self) -> None:
        self.closed = True
        self.cache = KVCache(0, 0, 1, 1)  # drop the arrays now, not when the session is collected


class RoutedSession:
    """A ``Session`` from a model's edges (embedding, head) and a route of span sessions.

    ``edges`` is a ``LlamaModel`` that holds the embedding and the head (a whole model, or one
    loaded with ``edges_only=True``); ``route`` covers blocks 0..L-1 in order.
    """

    def __init__(self, edges, route: list):
        self.edges = edges
        self.route = route
        self._check_route()

    def _check_route(self) -> None:
        expected = 0
        for span in self.route:
            if span.first_layer != expected:
                raise ValueError(f"route does not cover block {expected} (next span starts at {span.first_layer})")
            expected = span.last_layer + 1
        if expected != self.edges.config.n_layers:
            raise ValueError(f"route ends at block {expected - 1}, the model has {self.edges.config.n_layers}")

    @property
    def position(self) -> int:
        return self.route[0].position if self.route else 0

    @property
    def capacity(self) -> int:
        return min(s.capacity for s in self.route)

    def hidden(self, tokens: Sequence[int]) -> np.ndarray:
        """Hidden states after the last block, (T, dim), for tokens appended at ``position``."""
        # The embedding is a row lookup in NumPy (no parallel kernel), so it runs on the calling
        # thread: a hand-over to the compute thread and back costs more than the lookup.
        x = self.edges.embed(np.asarray(tokens, dtype=np.int64))
        for span in self.route:
            x = span.forward(x)
        return x

    def feed(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        # tokens: (T,) -> logits (vocab,) for the last token, or (T, vocab)
        if len(tokens) == 0:
            raise ValueError("feed needs at least one token")
        if self.position + len(tokens) > self.capacity:
            from common.errors import UserError

            raise UserError(f"context full: {self.position + len(tokens)} positions exceed the "
                            f"session's {self.capacity}")
        if all(getattr(span, "local", False) for span in self.route):
            return compute.run(self._feed, tokens, all_logits)  # one hop to the compute thread, if any
        return self._feed(tokens, all_logits)  # remote spans: only the edges' kernels hop

    def _feed(self, tokens: Sequence[int], all_logits: bool) -> np.ndarray:
        x = self.hidden(tokens)
        logits = compute.run(self.edges.head, x if all_logits else x[-1:])
        return logits if all_logits else logits[-1]

    def rewind(self, position: int) -> None:
        for span in self.route:
            span.rewind(position)

    def close(self) -> None:
        for span in self.route:
            span.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
