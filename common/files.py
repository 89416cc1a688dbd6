"""Reading files we did not write, and cleaning up temporary files of runs that were killed.

A store is a directory anyone can tamper with: a FIFO in place of a fragment blocks ``open``
forever, a symlink to /dev/zero reads until memory runs out. So files are opened without blocking,
refused unless they are regular files, and never read past the size the manifest promises.

An output is written to a temporary name and renamed over its final name when complete; so the
final name must be a regular file or nothing (``output_target``): renaming over /dev/null, a FIFO
or a symlink would replace it with a file.
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


def output_target(path: str | Path) -> Path:
    """The file to write for the output path ``path`` (by temporary name and rename): ``path``
    itself when it is new or a regular file, the regular file it names when it is a symlink (the
    link stays, as with ``cp``); UserError naming it when it is anything else, which the rename
    would replace: a device such as /dev/null, a FIFO, a socket, a directory, a dangling link."""
    from common.errors import UserError

    p = Path(path)
    try:
        mode = os.stat(p).st_mode  # (follows a symlink)
    except FileNotFoundError:
        if p.is_symlink():
            raise UserError(f"{p}: a symlink to {os.readlink(p)}, which does not exist; give the path "
                            f"of a file to write") from None
        return p
    except OSError as e:
        raise UserError(f"{p}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{p}: is a directory; give the path of a file to write")
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise UserError(f"{p}: is {kind}; outputs are written to a temporary name and then renamed, "
                        f"which would replace it: give the path of a regular file")
    return Path(os.path.realpath(p)) if p.is_symlink() else p


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
