"""Progress bars that appear only on a terminal, so logs and pipes stay clean."""

import sys

from tqdm import tqdm


def byte_progress(total: int, desc: str, enabled: bool | None = None) -> tqdm:
    """A bytes progress bar on stderr; silent unless stderr is a terminal (or forced).
    Watchers (``watch_progress``) hear it either way."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    # unit_divisor 1000: the bar's MB are the summaries' (10^6 bytes), not MiB labelled MB
    return _Watched(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                    disable=not enabled, file=sys.stderr, leave=False)


_watchers: list = []


def watch_progress(callback):
    """Call ``callback(desc, done_bytes, total_bytes)`` on every byte progress update in this
    process (fragment fetches...), terminal or not: a server shows its loading this way.
    Returns a function that stops watching."""
    _watchers.append(callback)
    return lambda: _watchers.remove(callback)


class _Watched(tqdm):
    def __init__(self, *args, desc: str = "", total: int | None = None, **kwargs):
        self._label, self._total, self._done = desc, total, 0  # tqdm keeps neither when disabled
        super().__init__(*args, desc=desc, total=total, **kwargs)
        self._tell()

    def update(self, n=1):
        self._done += n
        self._tell()
        return super().update(n)

    def _tell(self) -> None:
        for callback in list(_watchers):
            callback(self._label, self._done, self._total)


class Status:
    """Stage lines on stderr for long steps ("loading ...", "compiling kernels ..."), each with the
    seconds since the command started, so a person waiting sees what is happening and how long it
    took. Silent unless enabled (default: when stderr is a terminal)."""

    def __init__(self, enabled: bool | None = None, prefix: str = ""):
        import time

        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.prefix = prefix
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        import time

        return time.perf_counter() - self.started

    def __call__(self, message: str) -> None:
        if self.enabled:
            sys.stderr.write(f"{self.prefix}[{self.elapsed():5.1f} s] {message}\n")
            sys.stderr.flush()
