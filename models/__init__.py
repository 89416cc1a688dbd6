"""Obtains and builds model files: the default real model and the synthetic test-model factory."""
