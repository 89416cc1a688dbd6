"""What the engine needs from whoever holds a model's weights: the ``WeightSource`` protocol.

Every loader in distribution/ (a store directory, a .gguf file, an HTTP server, a swarm of peers)
provides it; the engine never imports them, and anything else with these members (a test's
in-memory model) can be loaded too. Every tensor handed over has already been checked against its
fragments' SHA-256 by the loader: the engine trusts these bytes and nothing else.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np


class TensorTable(Protocol):
    """The manifest's view the engine uses: which tensors exist, which fragments hold them."""

    def tensor_names(self) -> Iterable[str]: ...

    def fragments_for(self, names: Sequence[str]) -> list[str]: ...


class TensorEntry(Protocol):
    """One tensor's record: its GGUF type name ("Q8_0", "F32", ...) and numpy (out, in) shape."""

    ggml_type: str
    shape: Sequence[int]


@runtime_checkable
class WeightSource(Protocol):
    where: str                   # names the source in messages: a directory, file, URL or p2p address
    manifest: TensorTable

    @property
    def metadata(self) -> dict[str, Any]:
        """The GGUF header's key-value metadata (architecture, sizes, tokenizer)."""

    def tensor_entry(self, name: str) -> TensorEntry: ...

    def prefetch(self, fragment_ids: Iterable[str]) -> None:
        """Fetch (and verify) these fragments ahead of use, where that helps (remote sources)."""

    def load_tensor(self, name: str) -> np.ndarray:
        """The tensor as float32 (dequantized when stored quantized), numpy (out, in) shape."""

    def load_quantized(self, name: str) -> tuple[np.ndarray, Any]:
        """The tensor's stored blocks, (rows, bytes per row) uint8, and its GGML type."""

    def tensor_pieces(self, name: str) -> list[memoryview]:
        """The tensor's stored bytes as views of its pieces, in order, not assembled (a caller
        converting them into memory of its own at once saves a copy)."""

    def release(self) -> None:
        """Drop what was kept for loading (cache, read-ahead): the model holds its own arrays now."""
