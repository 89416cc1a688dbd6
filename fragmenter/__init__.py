"""Writes fragment stores: GGUF files cut into content-addressed fragments plus a manifest."""
