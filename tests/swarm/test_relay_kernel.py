"""The compiled relay step (swarm/relay_kernel.py) on frames of any bytes: it reads and writes
nothing outside its arrays (a copy compiled with Numba's bounds checks raises IndexError where the
shipped one would read or write out of bounds), and answers as the shipped one does."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import njit
from numba.core.errors import NumbaPerformanceWarning

from swarm import relay_kernel, wire
from tests.swarm.test_fast_relay import NEXT, Node, timeless

FIELDS = {  # header fields after the session id, and the trailer's head: (offset, struct format)
    "position": (24, "<I"), "rows": (28, "<I"), "cols": (32, "<I"), "first": (36, "<H"), "last": (38, "<H"),
    "body": (44, "<I"),
}
EXTREMES = [0, 1, 2, 3, 7, 8, 9, 95, 96, 97, 2**15, 2**16 - 1, 2**31, 2**32 - 1]


@pytest.fixture(scope="module")
def checked():
    """relay_step compiled again with bounds checks (not cached: a copy for this test only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumbaPerformanceWarning)  # (it has no parallel loop: by design)
        kernel = njit(boundscheck=True, parallel=relay_kernel._SERIAL_BUT_PARALLEL)(relay_kernel.relay_step.py_func)
        relay_kernel.warm_up(kernel)
    return kernel


@pytest.fixture(scope="module")
def node(six_loader):
    node = Node(six_loader, (NEXT,))
    node.feed(node.relay())  # the general path plans the compiled one
    assert node.session.fast_relay.compiled
    return node


def _run(kernel, node, frame: bytes, capacity: int | None = None):
    plan = node.session.fast_relay
    cache = node.session.cache
    cache.length = 8
    p = plan.plan.copy()
    p[relay_kernel.POSITION], p[relay_kernel.CAPACITY] = 8, cache.capacity if capacity is None else capacity
    out, state = np.zeros(plan.out_size, np.uint8), np.zeros(2, np.int64)
    cos, sin = plan.view.rope_table(16)
    arrays = plan.view.decoder.arrays(cache)
    n = kernel(np.frombuffer(frame, np.uint8), p, plan.hops_array, plan.rest_array, out, state, *arrays, cos, sin,
               *plan.view.decoder.shape())
    return n, (timeless([bytes(out[4:n])])[0] if n > 0 else b"")  # (the two calls' compute times differ)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_frame_reads_or_writes_out_of_bounds(checked, node, data):
    frame = bytearray(node.relay(rows=data.draw(st.integers(1, 3)), seed=data.draw(st.integers(0, 3))))
    for _ in range(data.draw(st.integers(1, 4))):
        how = data.draw(st.sampled_from(["field", "step", "times", "byte", "cut", "add"]))
        if how == "field" and len(frame) >= 48:
            at, fmt = FIELDS[data.draw(st.sampled_from(sorted(FIELDS)))]
            value = data.draw(st.sampled_from(EXTREMES)) % (1 << (8 * struct.calcsize(fmt)))
            struct.pack_into(fmt, frame, at, value)
        elif how in ("step", "times") and len(frame) >= 48:  # the trailer's head, where the rows say it is
            rows = int.from_bytes(frame[28:32], "little")
            at = 48 + rows * 96 * 4
            if at + 10 <= len(frame):
                if how == "step":
                    frame[at:at + 8] = data.draw(st.sampled_from([0, 2**63 - 1, 2**63, 2**64 - 1])).to_bytes(8, "little")
                else:
                    frame[at + 8:at + 10] = data.draw(st.sampled_from(EXTREMES[:12])).to_bytes(2, "little")
        elif how == "byte" and frame:
            frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
        elif how == "cut" and frame:
            del frame[data.draw(st.integers(0, len(frame) - 1)):]
        elif how == "add":
            frame += bytes(data.draw(st.integers(1, 8)))
    capacity = data.draw(st.sampled_from([None, 8, 9]))  # (the session's cache: room, full, one position left)
    frame = bytes(frame)
    n, out = _run(checked, node, frame, capacity)  # an IndexError here is an out-of-bounds access
    assert (n, out) == _run(relay_kernel.relay_step, node, frame, capacity)
    if n > 0:
        assert wire.decode(out, None, 96, 66).type == wire.RELAY


def test_a_frame_of_the_common_case_is_taken_by_both(checked, node):
    n, out = _run(checked, node, node.relay())
    assert n > 0 and (n, out) == _run(relay_kernel.relay_step, node, node.relay())
    assert _run(checked, node, node.relay(), capacity=8)[0] == relay_kernel.NOT_TAKEN  # no room at position 8


def test_the_warm_up_compiles_what_relays_use(node):
    """One specialization only, after warm_up and real relays: the first relay of a node's session
    waits for no compilation (warm_up runs when a node opens its lanes)."""
    relay_kernel.warm_up()
    assert node.feed(node.relay()) and node.session.fast_relay.compiled
    assert len(relay_kernel.relay_step.signatures) == 1
