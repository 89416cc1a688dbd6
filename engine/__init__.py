"""Computes: the LLaMA forward pass (NumPy reference, Numba fast path), tokenizers, sampling."""
