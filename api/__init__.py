"""An OpenAI-compatible HTTP API and a web chat page over any ``generation.TextModel``."""
