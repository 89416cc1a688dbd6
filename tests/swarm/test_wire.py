"""The swarm framing: every frame round-trips; anything else is a WireError, never a crash."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm import wire

KEY = b"k" * 32
sessions = st.binary(min_size=16, max_size=16)


@st.composite
def array_frames(draw):
    rows, cols = draw(st.integers(1, 8)), draw(st.integers(1, 16))
    dtype = draw(st.sampled_from([wire.F32, wire.F16]))
    values = draw(st.lists(st.floats(-1e3, 1e3, width=16), min_size=rows * cols, max_size=rows * cols))
    array = np.array(values, np.float32).reshape(rows, cols)
    first = draw(st.integers(0, 100))
    last = first + draw(st.integers(0, 50))
    ftype = draw(st.sampled_from([wire.FORWARD, wire.RESULT, wire.RELAY, wire.RELAYED]))
    trailer = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=5)) if ftype in wire.TRAILER_TYPES else None
    return wire.Frame(ftype, draw(sessions), draw(st.integers(0, 2**32 - 1)), array, body=trailer,
                      first_block=first, last_block=last, elapsed_us=draw(st.integers(0, 2**32 - 1)), dtype=dtype)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=10)


@st.composite
def json_frames(draw):
    ftype = draw(st.sampled_from([wire.INFO_REQ, wire.INFO, wire.CLOSE, wire.CLOSED, wire.ERROR]))
    body = draw(st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=5))
    return wire.Frame(ftype, draw(sessions), body=body or None)


@settings(max_examples=200, deadline=None)
@given(frame=array_frames() | json_frames(), key=st.none() | st.just(KEY))
def test_round_trip(frame, key):
    back = wire.decode(wire.encode(frame, key), key)
    assert (back.type, back.session) == (frame.type, frame.session)
    if frame.array is not None:
        assert (back.position, back.first_block, back.last_block, back.elapsed_us, back.dtype) == \
            (frame.position, frame.first_block, frame.last_block, frame.elapsed_us, frame.dtype)
        np.testing.assert_array_equal(back.array.astype(np.float32), frame.array)  # exact in f16 too
        if frame.type in wire.TRAILER_TYPES:  # RELAY, RELAYED: the array, then the JSON trailer
            assert back.body == frame.body
    else:
        assert back.body == frame.body


@settings(max_examples=200, deadline=None)
@given(frame=array_frames(), split=st.integers(0, 8), key=st.none() | st.just(KEY))
def test_rows_passed_on_before_new_ones_frame_as_the_whole_array(frame, split, key):
    """A relaying node sends the rows it received (a checked view, in the wire's dtype) ahead of its
    output: the bytes are those of one frame holding every row."""
    received = wire.decode(wire.encode(wire.Frame(frame.type, frame.session, array=frame.array[:max(split, 1)],
                                                  dtype=frame.dtype, body=frame.body), key), key).array
    new = frame.array[max(split, 1):]
    if not len(new):
        new = frame.array[-1:]
    whole = wire.Frame(frame.type, frame.session, frame.position, np.concatenate([received.astype(np.float32), new]),
                       body=frame.body, first_block=frame.first_block, last_block=frame.last_block,
                       elapsed_us=frame.elapsed_us, dtype=frame.dtype)
    appended = wire.Frame(frame.type, frame.session, frame.position, new, body=frame.body,
                          first_block=frame.first_block, last_block=frame.last_block,
                          elapsed_us=frame.elapsed_us, dtype=frame.dtype)
    assert wire.encode(appended, key, before=received) == wire.encode(whole, key)
    other = np.zeros_like(received, dtype=np.float64)  # not in the wire's dtype: refused, not cast
    with pytest.raises(ValueError, match="cannot go before"):
        wire.encode(appended, key, before=other)


def test_float32_is_bit_exact():
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    back = wire.decode(wire.encode(wire.Frame(wire.FORWARD, b"s" * 16, 3, x)))
    assert back.array.dtype == np.float32 and back.array.tobytes() == x.tobytes()


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=300), key=st.none() | st.just(KEY))
def test_garbage_is_a_wire_error(data, key):
    try:
        wire.decode(data, key, dim=16, max_rows=8)
    except wire.WireError as e:
        assert e.code in {"bad_frame", "auth", "bad_shape", "too_long"}


@settings(max_examples=300, deadline=None)
@given(frame=array_frames() | json_frames(), cut=st.integers(0, 10_000), key=st.none() | st.just(KEY))
def test_truncated_and_padded_frames_are_refused(frame, cut, key):
    data = wire.encode(frame, key)
    short = data[:cut % len(data)]
    with pytest.raises(wire.WireError, match="truncated"):
        wire.decode(short, key)
    with pytest.raises(wire.WireError, match="oversized"):
        wire.decode(data + b"\0", key)


@settings(max_examples=200, deadline=None)
@given(frame=array_frames(), flip=st.integers(0, 10_000))
def test_any_flipped_bit_fails_the_mac(frame, flip):
    data = bytearray(wire.encode(frame, KEY))
    i = flip % len(data)
    data[i] ^= 1 << (flip % 8)
    with pytest.raises(wire.WireError):
        wire.decode(bytes(data), KEY)


def test_limits_checked_before_the_body():
    x = np.zeros((4, 8), np.float32)
    data = wire.encode(wire.Frame(wire.FORWARD, b"s" * 16, 0, x))
    with pytest.raises(wire.WireError, match="width 8") as e:
        wire.decode(data, dim=16)
    assert e.value.code == "bad_shape"
    with pytest.raises(wire.WireError, match="at most 3") as e:
        wire.decode(data, dim=8, max_rows=3)
    assert e.value.code == "too_long"
    # A header claiming a huge array with a short body: refused by length, nothing allocated.
    header = bytearray(data[:wire.HEADER.size])
    header[28:32] = (2**31).to_bytes(4, "little")
    with pytest.raises(wire.WireError):
        wire.decode(bytes(header) + data[wire.HEADER.size:], dim=8, max_rows=10)


def test_key_required_and_checked():
    frame = wire.Frame(wire.INFO_REQ, b"s" * 16)
    with pytest.raises(wire.WireError, match="private") as e:
        wire.decode(wire.encode(frame), KEY)
    assert e.value.code == "auth"
    with pytest.raises(wire.WireError, match="HMAC mismatch"):
        wire.decode(wire.encode(frame, b"x" * 32), KEY)
    assert wire.decode(wire.encode(frame, KEY), KEY).type == wire.INFO_REQ


def test_nan_and_text_refused():
    x = np.full((1, 4), np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN"):  # encode keeps the rule too
        wire.encode(wire.Frame(wire.FORWARD, b"s" * 16, 0, x))
    finite = wire.encode(wire.Frame(wire.FORWARD, b"s" * 16, 0, np.zeros((1, 4), np.float32)))
    with pytest.raises(wire.WireError, match="NaN"):  # a peer that does not
        wire.decode(finite[:wire.HEADER.size] + x.tobytes())
    with pytest.raises(wire.WireError, match="binary"):
        wire.decode("hello")


@settings(max_examples=300, deadline=None)
@given(body=st.dictionaries(st.sampled_from(["next", "elapsed_us", "x"]),
                            json_values | st.lists(st.lists(json_values, max_size=5), max_size=3), max_size=3))
def test_relay_trailers_are_checked_or_refused_with_a_wire_error(body):
    from swarm import relay

    for check in (relay.parse_hops, relay.elapsed_list):
        try:
            check(body)
        except wire.WireError as e:
            assert e.code == "bad_frame"


def test_relay_hops_parse_and_bad_ones_name_the_hop():
    from swarm import relay

    sid = "ab" * 16
    hops = relay.parse_hops({"next": [["ws://127.0.0.1:4001/swarm", sid, 10, 19]]})
    assert hops == [relay.Hop("ws://127.0.0.1:4001/swarm", bytes.fromhex(sid), 10, 19)]
    assert relay.parse_hops({"next": []}) == []
    for bad, why in (([["http://127.0.0.1:4001/swarm", sid, 0, 1]], "not a node's"),
                     ([["ws://127.0.0.1:4001/elsewhere", sid, 0, 1]], "not a node's"),
                     ([["ws://127.0.0.1:4001/swarm", "00" * 16, 0, 1]], "128 random bits"),
                     ([["ws://127.0.0.1:4001/swarm", "zz", 0, 1]], "unreadable"),
                     ([["ws://127.0.0.1:4001/swarm", sid, 5, 1]], "blocks 5-1"),
                     ([["ws://127.0.0.1:4001/swarm", sid, 0]], "a hop is"),
                     ("ws://x", "a list")):
        with pytest.raises(wire.WireError, match=why) as e:
            relay.parse_hops({"next": bad})
        assert "next" in str(e.value)


def test_relay_hops_are_checked_once_per_session_and_refusals_are_not_remembered():
    """A session's decode steps all name the same hops: the second parse takes the checked hop
    from the cache (the same object); a bad hop is refused every time, and a good hop's cached
    check does not let a variant of it (another session id, other blocks) through."""
    from swarm import relay

    good = ["ws://127.0.0.1:4002/swarm", "cd" * 16, 3, 7]
    first = relay.parse_hops({"next": [good]})[0]
    hits = relay._checked_hop.cache_info().hits
    assert relay.parse_hops({"next": [list(good)]})[0] is first
    assert relay._checked_hop.cache_info().hits == hits + 1
    for variant in ([good[0], "00" * 16, 3, 7], [good[0], good[1], 7, 3], ["ws://127.0.0.1:4002/other", good[1], 3, 7]):
        for _ in range(2):
            with pytest.raises(wire.WireError, match=r"next\[1\]"):
                relay.parse_hops({"next": [good, variant]})


@pytest.mark.parametrize("url, ok", [
    ("ws://10.0.0.5:9000/swarm", True), ("wss://node.example:443/swarm", True), ("ws://[fd00::2]:9000/swarm", True),
    ("ws://10.0.0.5:9000/other", False), ("ws://10.0.0.5:9000/swarm/", False), ("ws://10.0.0.5:9000/swarm?x=1", False),
    ("ws://u:p@10.0.0.5:9000/swarm", False), ("ws://10.0.0.5:9000/swarm#f", False),
    ("http://10.0.0.5:9000/swarm", False),
    ("ws://10.0.0.5:99999/swarm", False), ("ws:///swarm", False), ("ws://" + "a" * 600 + ":1/swarm", False),
    ("ws://a\nb:1/swarm", False), (None, False), (7, False),
])
def test_only_a_nodes_own_address_is_dialled(url, ok):
    """What a DHT record or a RELAY's hop may make a client or node dial."""
    assert wire.is_node_url(url) is ok
