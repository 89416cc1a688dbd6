"""Writing a GGUF file with gguf-py's GGUFWriter, atomically: a temporary name, renamed when complete."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from gguf import GGUFWriter


@contextmanager
def gguf_writer(path: str | Path, arch: str):
    """Yields a GGUFWriter; on a clean exit writes header, metadata and tensors, then renames into place.

    On an error nothing is left behind, neither at ``path`` nor at the temporary name.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    writer = GGUFWriter(str(tmp), arch)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
