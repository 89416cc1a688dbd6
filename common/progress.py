"""Progress bars that appear only on a terminal, so logs and pipes stay clean."""

import sys

from tqdm import tqdm


def byte_progress(total: int, desc: str, enabled: bool | None = None) -> tqdm:
    """A bytes progress bar on stderr; silent unless stderr is a terminal (or forced)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, file=sys.stderr, leave=False)
