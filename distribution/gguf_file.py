"""A plain .gguf file behind the loader interface, so every tool that takes a store takes a file too.

There are no fragments and no hashes to check here: the file is memory-mapped and tensors are
sliced out of it. Its manifest is built from the header as if the whole file were one fragment.
"""

from __future__ import annotations

import mmap
from pathlib import Path

from common.errors import UserError
from distribution.base import FragmentLoader
from fragmenter.fragment import build_manifest
from fragmenter.gguf_header import read_file_header
from fragmenter.manifest import Fragment

WHOLE_FILE = "0" * 64  # the one pseudo-fragment; never fetched


class GGUFFileLoader(FragmentLoader):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        header, size = read_file_header(str(self.path))
        source = {"name": self.path.name, "size": size, "sha256": WHOLE_FILE}
        # The manifest is derived from the header, so it needs no check against it.
        super().__init__(build_manifest(header, source, size, [Fragment(WHOLE_FILE, size, 0)]), str(self.path))
        self._header = header
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def fetch(self, fragment_id: str) -> bytes:
        raise UserError(f"{self.where}: a plain GGUF file has no fragments (fragment it first)")

    def tensor_bytes(self, name: str):
        """A read-only view into the mapped file (no copy). Views may outlive ``close``: see there."""
        entry = self.manifest.tensor(name)
        return memoryview(self._map)[entry.offset:entry.offset + entry.length]

    def tensor_pieces(self, name: str) -> list[memoryview]:
        return [self.tensor_bytes(name)]  # one piece: the file is one pseudo-fragment

    def close(self) -> None:
        """Unmap the file. Arrays still viewing it (the engine keeps quantized weights as views) would
        turn into dangling pointers, so while any exist mmap refuses, and the mapping then ends when
        the last of them is garbage-collected."""
        super().close()
        try:
            self._map.close()
        except BufferError:
            pass
