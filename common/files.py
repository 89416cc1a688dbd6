"""Reading files we did not write, and cleaning up temporary files of runs that were killed.

A store is a directory anyone can tamper with: a FIFO in place of a fragment blocks ``open``
forever, a symlink to /dev/zero reads until memory runs out. So files are opened without blocking,
refused unless they are regular files, and never read past the size the manifest promises.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def open_regular(path: str | Path):
    """Open ``path`` for reading (unbuffered) if it is a regular file; OSError naming the kind if not.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer; it changes
    nothing for regular files.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise OSError(errno.EINVAL, f"not a regular file: {kind}", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path, limit: int) -> bytes:
    """The bytes of a regular file, at most ``limit + 1`` of them (so a caller sees "too long")."""
    with open_regular(path) as f:
        chunks, left = [], limit + 1
        while left > 0:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


def running(pid: int) -> bool:
    """Whether a process with this id exists (a temporary file's writer may still be at work)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_leftovers(directory: str | Path, prefix: str) -> int:
    """Delete ``directory/<prefix><pid>-*`` files whose writing process is gone; returns how many.

    Every writer in this project names its temporary files ``<prefix><pid>-...`` so that a later
    run can tell a killed run's leftovers from a live run's work in progress.
    """
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not running(int(pid)):
            try:
                os.unlink(os.path.join(directory, name))
                removed += 1
            except OSError:
                pass
    return removed
