"""Distributed inference: nodes run spans of blocks for many sessions; clients route hidden states
through them (wire.py framing, server.py node, memory.py limits, client.py remote spans, route.py
routing and failover with replay)."""

import hashlib


def manifest_sha(loader) -> str:
    """The model's identity in the swarm: the SHA-256 of its manifest as the loader read it."""
    sha = getattr(loader, "manifest_sha256", None)
    if sha:
        return sha
    raw = getattr(loader, "manifest_bytes", None)
    if raw is None:
        raw = loader.manifest.to_json().encode()
    return hashlib.sha256(raw).hexdigest()
