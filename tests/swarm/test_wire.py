"""The swarm framing: every frame round-trips; anything else is a WireError, never a crash."""

from struct import error as struct_error

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
    trailer = draw(trailers(rows, ftype)) if ftype in wire.TRAILER_TYPES else None
    return wire.Frame(ftype, draw(sessions), draw(st.integers(0, 2**32 - 1)), array, body=trailer,
                      first_block=first, last_block=last, elapsed_us=draw(st.integers(0, 2**32 - 1)), dtype=dtype)


hop_urls = st.builds("ws://{}:{}/swarm".format, st.sampled_from(["127.0.0.1", "10.0.0.5", "node.example", "[fd00::2]"]),
                     st.integers(1, 65535))


@st.composite
def hops(draw, max_size: int = 4):
    from swarm import relay

    def hop(url, sid, first, span):
        return relay.Hop(url, sid, first, min(first + span, 2**16 - 1))

    nonzero = st.binary(min_size=16, max_size=16).filter(lambda b: b != bytes(16))
    return tuple(draw(st.lists(st.builds(hop, hop_urls, nonzero, st.integers(0, 2**16 - 1), st.integers(0, 50)),
                               max_size=max_size)))


@st.composite
def trailers(draw, rows: int, ftype: int):
    from swarm import relay

    elapsed = draw(st.lists(st.integers(0, 2**32 - 1), min_size=rows - 1, max_size=rows - 1))
    packed = relay.pack_hops(draw(hops())) if ftype == wire.RELAY else b""
    return wire.Trailer(draw(st.integers(0, 2**63 - 1)), elapsed, packed)


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
        if frame.type in wire.TRAILER_TYPES:  # RELAY, RELAYED: the array, then the binary trailer
            assert back.body == frame.body
    else:
        assert back.body == frame.body


@settings(max_examples=200, deadline=None)
@given(frame=array_frames(), split=st.integers(0, 8), key=st.none() | st.just(KEY))
def test_rows_passed_on_before_new_ones_frame_as_the_whole_array(frame, split, key):
    """A relaying node sends the rows it received (a checked view, in the wire's dtype) ahead of its
    output: the bytes are those of one frame holding every row."""
    def body(rows):  # a trailer's compute times are one fewer than the rows
        if frame.type not in wire.TRAILER_TYPES:
            return frame.body
        return wire.Trailer(frame.body.step, list(range(rows - 1)), frame.body.hops)

    first = frame.array[:max(split, 1)]
    received = wire.decode(wire.encode(wire.Frame(frame.type, frame.session, array=first, dtype=frame.dtype,
                                                  body=body(len(first))), key), key).array
    new = frame.array[max(split, 1):]
    if not len(new):
        new = frame.array[-1:]
    frame = frame._replace(body=body(len(received) + len(new)))
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
@given(raw=st.binary(max_size=200), good=hops(max_size=2), cut=st.integers(0, 200), flip=st.integers(0, 255))
def test_packed_hops_parse_back_and_anything_else_is_a_wire_error(raw, good, cut, flip):
    """pack_hops and parse_hops are inverse; random bytes, a cut or a flipped byte are either
    read as hops that pass every check or refused with bad_frame, never a crash."""
    from swarm import relay

    packed = relay.pack_hops(good)
    assert relay.parse_hops(packed) == good
    damaged = bytearray(packed)
    if damaged:
        damaged[cut % len(damaged)] ^= flip
    for data in (raw, packed[:cut], bytes(damaged)):
        try:
            parsed = relay.parse_hops(data)
        except wire.WireError as e:
            assert e.code == "bad_frame" and "next[" in str(e) or "at most" in str(e)
        else:
            assert relay.pack_hops(parsed) == data
            assert all(wire.is_node_url(h.url) and h.session != bytes(16) and h.first <= h.last for h in parsed)


def test_relay_hops_parse_and_bad_ones_name_the_hop():
    from swarm import relay

    sid = bytes.fromhex("ab" * 16)
    good = relay.Hop("ws://127.0.0.1:4001/swarm", sid, 10, 19)
    assert relay.parse_hops(relay.pack_hops((good,))) == (good,)
    assert relay.parse_hops(b"") == ()

    def packed(url: bytes, session=sid, first=0, last=1):
        return wire.HOP_HEAD.pack(session, first, last, len(url)) + url

    for bad, why in ((packed(b"http://127.0.0.1:4001/swarm"), "not a node's"),
                     (packed(b"ws://127.0.0.1:4001/elsewhere"), "not a node's"),
                     (packed(b"ws://127.0.0.1:4001/swarm", session=bytes(16)), "128 random bits"),
                     (packed(b"ws://127.0.0.1:4001/swarm", first=5, last=1), "blocks 5-1"),
                     (packed(b"ws://127.0.0.1:4001/swarm\xff"), "not UTF-8"),
                     (packed(b"ws://127.0.0.1:4001/swarm")[:-1], "truncated"),
                     (packed(b"ws://127.0.0.1:4001/swarm")[:10], "truncated")):
        with pytest.raises(wire.WireError, match=why) as e:
            relay.parse_hops(good.packed + bad)
        assert "next[1]" in str(e.value)
    with pytest.raises(wire.WireError, match="at most 64 hops"):
        relay.parse_hops(good.packed * 65)


def test_a_hops_url_is_at_most_512_bytes_not_characters():
    from swarm import relay

    sid = bytes.fromhex("cd" * 16)
    host = "\u00e9" * 300  # 300 characters, 600 bytes
    url = f"ws://{host}.example:9/swarm".encode()
    assert len(url.decode()) <= wire.MAX_URL < len(url)
    with pytest.raises(wire.WireError, match=r"next\[0\]: a URL of \d+ bytes, at most 512"):
        relay.parse_hops(wire.HOP_HEAD.pack(sid, 0, 1, len(url)) + url)


@settings(max_examples=300, deadline=None)
@given(rows=st.integers(1, 4), trailer=st.binary(max_size=64), key=st.none() | st.just(KEY),
       ftype=st.sampled_from([wire.RELAY, wire.RELAYED]))
def test_any_trailer_bytes_decode_or_are_refused_with_bad_frame(rows, trailer, key, ftype):
    """Whatever follows a relay's array is a trailer that re-encodes to the same bytes, or a
    bad_frame."""
    x = np.zeros((rows, 4), np.float32)
    good = wire.encode(wire.Frame(ftype, b"s" * 16, 0, x, body=wire.Trailer(1, [0] * (rows - 1))))
    header = bytearray(good[:wire.HEADER.size])
    header[44:48] = (rows * 16 + len(trailer)).to_bytes(4, "little")
    data = bytes(header) + x.tobytes() + trailer
    if key:
        header[7] = wire.FLAG_MAC
        data = bytes(header) + x.tobytes() + trailer
        data += wire.mac(key, data)
    try:
        frame = wire.decode(data, key)
    except wire.WireError as e:
        assert e.code == "bad_frame"
    else:
        assert len(frame.body.elapsed_us) <= wire.MAX_HOPS and frame.body.step < 2**63
        assert frame.body.pack() == trailer
        assert ftype == wire.RELAY or not frame.body.hops


def test_trailers_refused_name_what_is_wrong():
    x = np.zeros((2, 4), np.float32)

    def frame(trailer: bytes, ftype=wire.RELAY) -> bytes:
        good = bytearray(wire.encode(wire.Frame(ftype, b"s" * 16, 0, x, body=wire.Trailer(1, [5]))))
        good[44:48] = (x.nbytes + len(trailer)).to_bytes(4, "little")
        return bytes(good[:wire.HEADER.size]) + x.tobytes() + trailer

    for trailer, why in ((b"", "trailer is 0 bytes"),
                         (wire.TRAILER_HEAD.pack(2**63, 1) + bytes(4), r"step must be below 2\*\*63"),
                         (wire.TRAILER_HEAD.pack(1, 65) + bytes(260), "carries 65 compute times, at most 64"),
                         (wire.TRAILER_HEAD.pack(1, 1) + bytes(3), "compute times need 14")):
        with pytest.raises(wire.WireError, match=why):
            wire.decode(frame(trailer))
    with pytest.raises(wire.WireError, match="bytes of hops in a RELAYED"):
        wire.decode(frame(wire.TRAILER_HEAD.pack(1, 1) + bytes(4) + b"x", wire.RELAYED))
    with pytest.raises(wire.WireError, match="bytes of hops in a RELAY "):
        wire.decode(frame(wire.TRAILER_HEAD.pack(1, 1) + bytes(4) + bytes(wire.MAX_HOPS_BYTES + 1)))
    for bad in (wire.Trailer(-1, []), wire.Trailer(2**63, []), wire.Trailer(0, [0] * 65), wire.Trailer(0, [2**32])):
        with pytest.raises((ValueError, struct_error)):
            bad.pack()
    with pytest.raises(ValueError, match="Trailer, not dict"):
        wire.encode(wire.Frame(wire.RELAY, b"s" * 16, 0, x[:1], body={"step": 1}))


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.floats(width=32) | st.sampled_from([np.inf, -np.inf, np.nan, 3e38, -3e38, 1e-45]),
                       min_size=1, max_size=64), f16=st.booleans(), cols=st.integers(1, 8), readonly=st.booleans())
def test_all_finite_agrees_with_numpy(values, f16, cols, readonly):
    with np.errstate(over="ignore"):
        flat = np.array(values, np.float16 if f16 else np.float32)
    array = flat[:len(flat) // cols * cols].reshape(-1, cols) if len(flat) >= cols else flat.reshape(1, -1)
    array.flags.writeable = not readonly
    assert wire.all_finite(array) == bool(np.isfinite(array).all())
    assert wire.all_finite(array[:, ::2]) == bool(np.isfinite(array[:, ::2]).all())  # (any layout)


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
