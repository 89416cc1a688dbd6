"""Holds the engine against llama.cpp: logits, greedy generations and speed, side by side."""
