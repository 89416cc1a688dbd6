"""The command-line layer: wires loaders, engine and validation together; the only place that does."""
