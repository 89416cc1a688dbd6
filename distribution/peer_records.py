"""Peer records: what a peer offers (its HTTP address, a swarm node's span...), signed by the peer.

A record is a JSON object stored in the DHT under ``/gguf-peer/<peer id>``. It always holds
"peer" (the id), "seq" (a nanosecond timestamp: the higher replaces the lower, so a peer can
republish changing figures) and "sig", the signature of the rest by the peer's own libp2p key.
A secp256k1 peer id embeds its public key, so anyone can check that a record is the peer's own:
in an open swarm nobody can redirect another peer's clients by publishing under its key.

The DHT validates records with ``PeerRecordValidator`` when they are stored (on every node, since
every node registers it) and we check them again when read.
"""

from __future__ import annotations

import json

NAMESPACE = "gguf-peer"


class InvalidRecord(ValueError):
    pass


def record_key(peer_id: str) -> str:
    return f"/{NAMESPACE}/{peer_id}"


def _body(record: dict) -> bytes:
    """The signed bytes: the record without its signature, in one canonical JSON form."""
    return json.dumps({k: v for k, v in record.items() if k != "sig"}, sort_keys=True,
                      separators=(",", ":")).encode()


def sign_record(record: dict, private_key) -> bytes:
    """``record`` (with "peer" and "seq") signed with the peer's libp2p private key, as DHT bytes."""
    return json.dumps({**record, "sig": private_key.sign(_body(record)).hex()}).encode()


def parse_record(key: str, value: bytes) -> dict:
    """The record stored under ``key``, checked: a JSON object of that key's peer, signed by it."""
    from libp2p.peer.id import ID

    peer_id = key.rsplit("/", 1)[-1]
    try:
        record = json.loads(value)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise InvalidRecord(f"peer record of {peer_id}: not JSON") from None
    if not isinstance(record, dict) or record.get("peer") != peer_id:
        raise InvalidRecord(f"peer record under {key}: not a record of that peer")
    if not isinstance(record.get("seq"), int) or not isinstance(record.get("sig"), str):
        raise InvalidRecord(f"peer record of {peer_id}: no seq or signature")
    try:
        public = ID.from_base58(peer_id).extract_public_key()
        ok = public is not None and public.verify(_body(record), bytes.fromhex(record["sig"]))
    except Exception:  # a malformed id or signature: not the peer's
        ok = False
    if not ok:
        raise InvalidRecord(f"peer record of {peer_id}: bad signature")
    return record


def newest(key: str, values: list[bytes]) -> dict | None:
    """The valid record with the highest seq among ``values`` (None if none is valid)."""
    records = []
    for value in values:
        try:
            records.append(parse_record(key, value))
        except InvalidRecord:
            continue
    return max(records, key=lambda r: r["seq"], default=None)


def seq_of(key: str, value: bytes) -> int:
    """A stored value's seq, or -1 if it is not a valid record for ``key``."""
    try:
        return parse_record(key, value)["seq"]
    except InvalidRecord:
        return -1


def validator():
    """A py-libp2p Validator for the /gguf-peer/ namespace: valid = signed by the key's peer;
    select = the highest seq."""
    from libp2p.records.validator import Validator

    class PeerRecordValidator(Validator):
        def validate(self, key: str, value: bytes) -> None:
            parse_record(key, value)

        def select(self, key: str, values: list[bytes]) -> int:
            seqs = [seq_of(key, v) for v in values]
            return seqs.index(max(seqs))

    return PeerRecordValidator()
