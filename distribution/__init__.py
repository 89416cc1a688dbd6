"""Moves fragments between machines: the loader interface and its backends (local, HTTP, P2P)."""
