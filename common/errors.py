"""One exception type for everything a user can cause, and the exit codes the commands use.

The command-line layer prints ``str(error)`` as a single line and exits with the error's
``exit_code``, without a traceback. Messages therefore always name the file, fragment, tensor,
peer or option at fault.

Exit codes (README, "Exit codes and time bounds"):
    0    success
    1    bad input or usage: a wrong option, a file that is not a GGUF, an output that cannot be
         written (full disk, no permission), an address that cannot be listened on
    2    a damaged store: a fragment missing or corrupt, a manifest that does not describe its file
    3    a network source or peer that cannot be reached or gives up (refused, timed out, too slow)
    130  interrupted (Ctrl-C)
    141  standard output's reader went away (`infer ... | head`): quiet, as `yes | head`
    143  terminated (SIGTERM: cleaned up as after Ctrl-C)
"""

from __future__ import annotations

from contextlib import contextmanager

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_DAMAGED_STORE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: standard output's reader went away (`infer | head`), quietly
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process the signal killed


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that every ``finally``
    and ``except KeyboardInterrupt`` that cleans up after Ctrl-C (temporary files, a first fetch's
    directory) runs for ``kill`` too."""


class UserError(Exception):
    """A problem with the user's input (file, store, option), reported as one clear line."""

    exit_code = EXIT_USAGE


class StoreError(UserError):
    """A fragment store is missing pieces, corrupt or not what was asked for."""

    exit_code = EXIT_DAMAGED_STORE


class NetworkError(UserError):
    """A server or peer could not be reached, or stopped answering in time. Names the address."""

    exit_code = EXIT_UNREACHABLE


@contextmanager
def naming(path, doing: str = "write"):
    """Turn an OSError inside the block into a UserError naming ``path``.

    A full disk raises ENOSPC from write(), whose OSError carries no file name; without this the
    user reads "No space left on device" and has to guess which of several files it was.
    """
    try:
        yield
    except OSError as e:
        raise UserError(f"{path}: cannot {doing} ({e.strerror or e})") from None
