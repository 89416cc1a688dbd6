"""Rebuilds GGUF files from fragment stores and verifies stores, fragment by fragment and whole."""
