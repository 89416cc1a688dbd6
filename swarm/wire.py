"""The swarm's one binary framing (docs/wire.md): a fixed header, a body, an optional HMAC.

    offset size  field
    0      4     magic        b"GFSW"
    4      1     version      2 (1 carried RELAY trailers as JSON)
    5      1     type         INFO_REQ, INFO, FORWARD, RESULT, CLOSE, CLOSED, ERROR, RELAY, RELAYED,
                              BIND, BOUND (on lanes only: swarm/lane.py)
    6      1     dtype        0 none (body is UTF-8 JSON or empty), 1 float32, 2 float16
    7      1     flags        bit 0: a 32-byte HMAC-SHA256 follows the body
    8      16    session      the session id, 128 bits the client chose at random
    24     4     position     first position of the rows (FORWARD, RESULT)
    28     4     rows         T                      } the array's shape (T, dim);
    32     4     cols         dim                    } 0, 0 for a JSON body
    36     2     first_block  } blocks to run (FORWARD), a sub-span of the node's span
    38     2     last_block   }
    40     4     elapsed_us   the node's compute time for this reply (RESULT)
    44     4     body_len     bytes of body; for arrays exactly rows * cols * itemsize
    48     ...   body, then the MAC over header + body when flags bit 0 is set

RELAY and RELAYED frames carry the array, then a binary trailer (``Trailer``): the step's number,
the compute times of the hops run so far, and (RELAY) the hops still to run, packed by
swarm/relay.py. Binary, not JSON: a relayed decode step crosses every node's Python once per
token, on a core just woken, where JSON's parse and dump were a large part of the frame's handling.

All integers little-endian. Nothing is evaluated or unpickled: JSON bodies go through json.loads,
arrays are read-only numpy views of the received bytes, made after every size has been checked
against the caller's limits.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from typing import NamedTuple

import numba
import numpy as np

WS_PATH = "/swarm"  # where a node takes its WebSocket: ws://HOST:PORT/swarm
MAX_URL = 512


def is_node_url(url) -> bool:
    """Whether ``url`` is a node's activation address, ``ws(s)://HOST[:PORT]/swarm`` and nothing more
    (no user, query or fragment): what a DHT record or a RELAY's hop may make a client or node dial."""
    from yarl import URL

    if not isinstance(url, str) or len(url) > MAX_URL or not url.isprintable():
        return False
    try:
        u = URL(url)
        return (u.scheme in ("ws", "wss") and bool(u.host) and u.port is not None and u.raw_path == WS_PATH
                and u.user is None and u.password is None and not u.query_string and not u.fragment)
    except (ValueError, TypeError):
        return False
MAGIC = b"GFSW"
VERSION = 2
HEADER = struct.Struct("<4sBBBB16sIIIHHII")
MAC_LEN = 32
MAX_JSON = 64 * 1024  # a JSON body (info, error) is never larger
MAX_HOPS = 64         # hops one relay may name (a route of single-block nodes over a 64-block model)
TRAILER_HEAD = struct.Struct("<QH")  # a RELAY's or RELAYED's step, then how many compute times follow
HOP_HEAD = struct.Struct("<16sHHH")  # a packed hop: session, first block, last block, URL length; the URL
MAX_HOPS_BYTES = MAX_HOPS * (HOP_HEAD.size + MAX_URL)
_TIMES = [struct.Struct(f"<{n}I") for n in range(MAX_HOPS + 1)]  # a trailer's n compute times
F16_MAX = 65504.0     # float16's largest finite value: beyond it a cast gives infinity

INFO_REQ, INFO, FORWARD, RESULT, CLOSE, CLOSED, ERROR, RELAY, RELAYED, BIND, BOUND = range(1, 12)
TYPE_NAMES = {INFO_REQ: "INFO_REQ", INFO: "INFO", FORWARD: "FORWARD", RESULT: "RESULT", CLOSE: "CLOSE",
              CLOSED: "CLOSED", ERROR: "ERROR", RELAY: "RELAY", RELAYED: "RELAYED", BIND: "BIND", BOUND: "BOUND"}
ARRAY_TYPES = {FORWARD, RESULT, RELAY, RELAYED}
TRAILER_TYPES = {RELAY, RELAYED}  # an array, then a Trailer

NONE, F32, F16 = 0, 1, 2
DTYPES = {F32: np.dtype("<f4"), F16: np.dtype("<f2")}
DTYPE_CODES = {"float32": F32, "float16": F16}

FLAG_MAC = 1
_JSON = json.JSONEncoder(separators=(",", ":"))  # one encoder: json.dumps with options makes one per call


class WireError(Exception):
    """A frame that cannot be accepted; ``code`` says why (for the error reply)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Trailer(NamedTuple):
    """What a RELAY or RELAYED frame carries after its array (docs/wire.md, *Relayed steps*)."""
    step: int                  # below 2**63, never repeated by the client, passed on unchanged
    elapsed_us: list[int]      # the compute time of each hop run so far: one fewer than the rows
    hops: bytes = b""          # RELAY: the hops still to run, packed (relay.pack_hops); RELAYED: none

    def pack(self) -> bytes:
        n = len(self.elapsed_us)
        if not 0 <= self.step < 2**63 or n > MAX_HOPS or len(self.hops) > MAX_HOPS_BYTES:
            raise ValueError(f"a relay's step {self.step} (below 2**63), {n} compute times (at most {MAX_HOPS}) "
                             f"or {len(self.hops)} bytes of hops (at most {MAX_HOPS_BYTES})")
        return TRAILER_HEAD.pack(self.step, n) + _TIMES[n].pack(*self.elapsed_us) + self.hops


# Plain records, made in one call: a relayed token decodes and encodes one of each in every process
# of its route, on a core that has just woken (a dataclass's __init__ runs a line per field).
class Frame(NamedTuple):
    type: int
    session: bytes = bytes(16)
    position: int = 0
    array: np.ndarray | None = None   # (T, dim) for FORWARD / RESULT; (rows, dim) for RELAY / RELAYED
    body: dict | Trailer | None = None  # JSON for INFO / ERROR; RELAY / RELAYED: their Trailer
    first_block: int = 0
    last_block: int = 0
    elapsed_us: int = 0
    dtype: int = F32                  # the wire dtype of ``array``


def mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def encode(frame: Frame, key: bytes | None = None, before: np.ndarray | None = None) -> bytes:
    """A frame as bytes: header, body, and the HMAC when a swarm key is given.

    ``before``: rows that go ahead of ``frame.array``, already in the wire's dtype and known
    finite: a relaying node's received rows (a view of the frame that ``decode`` checked), passed
    on as they came, with its output after them; no copy made, no check repeated."""
    if frame.type in ARRAY_TYPES:
        if frame.dtype not in DTYPES:
            raise ValueError(f"unknown wire dtype {frame.dtype}")
        if frame.dtype == F32 and getattr(frame.array, "dtype", None) == np.float32:  # (no cast, no overflow)
            array = np.ascontiguousarray(frame.array, dtype=DTYPES[F32])
        else:
            with np.errstate(over="ignore"):  # an overflow is caught just below, as a clear error
                array = np.ascontiguousarray(frame.array, dtype=DTYPES[frame.dtype])
        if array.ndim != 2:
            raise ValueError(f"an activation array is (T, dim), not {array.shape}")
        if not all_finite(array):  # docs/wire.md: finite values only, after the cast too
            raise ValueError(f"activations hold NaN or infinity in {DTYPES[frame.dtype].name} "
                             f"(float16 holds at most +-{F16_MAX:g})")
        dtype, (rows, cols) = frame.dtype, array.shape
        parts, body_len = [b"", array], array.nbytes  # (the header goes first, once the body's size is known)
        if before is not None:
            if before.dtype != DTYPES[dtype] or before.ndim != 2 or before.shape[1] != cols:
                raise ValueError(f"rows {before.shape} of {before.dtype} cannot go before ({rows}, {cols}) "
                                 f"of {DTYPES[dtype].name}")
            parts, rows, body_len = [b"", np.ascontiguousarray(before), array], rows + before.shape[0], \
                body_len + before.nbytes
        if frame.type in TRAILER_TYPES:
            if not isinstance(frame.body, Trailer):
                raise ValueError(f"a {TYPE_NAMES[frame.type]} frame's body is a Trailer, "
                                 f"not {type(frame.body).__name__}")
            parts.append(frame.body.pack())
            body_len += len(parts[-1])
    else:
        parts = [b"", _JSON.encode(frame.body).encode() if frame.body is not None else b""]
        dtype, rows, cols, body_len = NONE, 0, 0, len(parts[1])
    parts[0] = HEADER.pack(MAGIC, VERSION, frame.type, dtype, FLAG_MAC if key else 0, frame.session,
                           frame.position, rows, cols, frame.first_block, frame.last_block, frame.elapsed_us, body_len)
    data = b"".join(parts)
    return data + mac(key, data) if key else data


def carries_mac(data) -> bool:
    """Whether a frame's header says a MAC follows (for telling an open swarm's reply from a forged one)."""
    return len(data) > 7 and bool(data[7] & FLAG_MAC)


def decode(data: bytes, key: bytes | None = None, dim: int | None = None, max_rows: int | None = None) -> Frame:
    """Parse and check a frame; raise WireError for anything malformed, unauthenticated or too big.

    ``dim`` and ``max_rows`` are the receiver's limits: an array frame must be (T, dim) with
    T <= max_rows. All sizes are checked before the body is looked at; the array is a read-only
    view of ``data`` (no copy: a node holding a 9 MiB prefill frame holds it once).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("bad_frame", "a frame is binary, not text")
    data = memoryview(data).cast("B")
    if len(data) < HEADER.size:
        raise WireError("bad_frame", f"truncated frame: {len(data)} bytes, the header alone is {HEADER.size}")
    (magic, version, ftype, dtype, flags, session, position, rows, cols, first, last, elapsed,
     body_len) = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireError("bad_frame", "not a swarm frame (bad magic)")
    if version != VERSION:
        raise WireError("bad_frame", f"protocol version {version}; this peer speaks version {VERSION}")
    if ftype not in TYPE_NAMES:
        raise WireError("bad_frame", f"unknown message type {ftype}")
    if flags & ~FLAG_MAC:
        raise WireError("bad_frame", f"unknown flags {flags:#x}")
    has_mac = bool(flags & FLAG_MAC)
    expected = HEADER.size + body_len + (MAC_LEN if has_mac else 0)
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "oversized"
        raise WireError("bad_frame", f"{kind} frame: {len(data)} bytes, the header says {expected}")
    if key is not None:
        if not has_mac:
            raise WireError("auth", "this swarm is private: frames must carry the swarm key's HMAC")
        if not hmac.compare_digest(bytes(data[-MAC_LEN:]), mac(key, data[:-MAC_LEN])):
            raise WireError("auth", "HMAC mismatch: the frame was not made with this swarm's key")
    start, end = HEADER.size, HEADER.size + body_len
    if ftype in TRAILER_TYPES:
        size = rows * cols * DTYPES[dtype].itemsize if dtype in DTYPES else 0
        if body_len < size:
            raise WireError("bad_frame", f"body is {body_len} bytes, shape ({rows}, {cols}) needs at least {size}")
        return Frame(ftype, session, position, _array(dtype, rows, cols, data[start:start + size], dim, max_rows),
                     _trailer(ftype, data[start + size:end]), first, last, elapsed, dtype)
    if ftype in ARRAY_TYPES:
        return Frame(ftype, session, position, _array(dtype, rows, cols, data[start:end], dim, max_rows), None,
                     first, last, elapsed, dtype)
    if dtype != NONE or rows or cols:
        raise WireError("bad_frame", f"a {TYPE_NAMES[ftype]} frame carries no array")
    return Frame(ftype, session, position, None, _json(data[start:end]), first, last, elapsed, dtype)


def _array(dtype: int, rows: int, cols: int, body: memoryview, dim: int | None, max_rows: int | None) -> np.ndarray:
    if dtype not in DTYPES:
        raise WireError("bad_frame", f"unknown dtype code {dtype} (1 float32, 2 float16)")
    if rows == 0:
        raise WireError("bad_frame", "an activation frame needs at least one row")
    if dim is not None and cols != dim:
        raise WireError("bad_shape", f"activation width {cols}, this model's is {dim}")
    if max_rows is not None and rows > max_rows:
        raise WireError("too_long", f"{rows} positions in one frame, at most {max_rows} accepted")
    if rows * cols * DTYPES[dtype].itemsize != len(body):
        raise WireError("bad_frame", f"body is {len(body)} bytes, shape ({rows}, {cols}) needs "
                                     f"{rows * cols * DTYPES[dtype].itemsize}")
    # a read-only view of the received message (of a bytearray too), made in one call
    array = np.ndarray((rows, cols), DTYPES[dtype], buffer=body.toreadonly())
    if not all_finite(array):
        raise WireError("bad_frame", "activations hold NaN or infinity")
    return array


@numba.njit(cache=True, nogil=True)
def _finite_rows(a):
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            if not np.isfinite(a[i, j]):
                return False
    return True


SMALL = 1 << 16  # values: a decode step's rows (a relay's at most 65 rows), not a prompt's


def all_finite(array: np.ndarray) -> bool:
    """No NaN or infinity in the (T, dim) ``array``. A relayed token makes this check twice on
    every node and twice on the client, each time on a core that has just woken, where one call of
    a compiled loop took half the time of ``np.isfinite(a).all()``'s two numpy calls (46-58 against
    96-127 us with the view's making, ad hoc, 1 Dec). A prompt's frame is numpy's (vectorised: 186
    against 794 us for 4096 x 576), as is float16 (which Numba lacks)."""
    if array.dtype == np.float32 and array.size <= SMALL:
        return _finite_rows(array)
    return bool(np.isfinite(array).all())


def _trailer(ftype: int, raw: memoryview) -> Trailer:
    """A RELAY's or RELAYED's trailer, its sizes checked. Its receiver checks the rest (one compute
    time per row but the last, the hops' contents: relay.parse_hops), the step known by then, so
    that its error names the step."""
    name = TYPE_NAMES[ftype]
    if len(raw) < TRAILER_HEAD.size:
        raise WireError("bad_frame", f"a {name}'s trailer is {len(raw)} bytes, at least {TRAILER_HEAD.size}")
    step, n = TRAILER_HEAD.unpack_from(raw)
    if step >= 2**63:
        raise WireError("bad_frame", f"a {name}'s step must be below 2**63")
    if n > MAX_HOPS:
        raise WireError("bad_frame", f"a {name} carries {n} compute times, at most {MAX_HOPS}")
    at = TRAILER_HEAD.size + 4 * n
    if len(raw) < at:
        raise WireError("bad_frame", f"a {name}'s trailer is {len(raw)} bytes, its {n} compute times need {at}")
    hops = bytes(raw[at:])
    if hops and ftype == RELAYED or len(hops) > MAX_HOPS_BYTES:
        raise WireError("bad_frame", f"{len(hops)} bytes of hops in a {name} (at most "
                                     f"{0 if ftype == RELAYED else MAX_HOPS_BYTES})")
    return Trailer(step, list(_TIMES[n].unpack_from(raw, TRAILER_HEAD.size)), hops)


def _json(body: memoryview) -> dict | None:
    if not body:
        return None
    if len(body) > MAX_JSON:
        raise WireError("bad_frame", f"JSON body of {len(body)} bytes, at most {MAX_JSON}")
    try:
        value = json.loads(bytes(body).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise WireError("bad_frame", "the body is not UTF-8 JSON") from None
    except RecursionError:  # "[[[[..." nested past the parser's depth
        raise WireError("bad_frame", "the JSON body is nested too deeply") from None
    if not isinstance(value, dict):
        raise WireError("bad_frame", "a JSON body must be an object")
    return value


def error_frame(session: bytes, code: str, message: str, relayed: bool = False, step: int | None = None) -> Frame:
    """An ERROR; ``relayed`` marks the failure of a relayed step (``step``: its number, when known),
    so that a client never takes it for the answer to another request or relayed step."""
    body = {"code": code, "message": message}
    if relayed:
        body["relay"] = True
    if step is not None:
        body["step"] = step
    return Frame(ERROR, session, body=body)


def load_key(path) -> bytes:
    """A swarm key file: its bytes (whitespace-trimmed) are the HMAC secret; at least 16 of them."""
    from common.errors import UserError

    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as e:
        raise UserError(f"{path}: cannot read the swarm key ({e.strerror})") from None
    if len(key) < 16:
        raise UserError(f"{path}: a swarm key needs at least 16 bytes (make one: head -c 32 /dev/urandom | base64)")
    return key
