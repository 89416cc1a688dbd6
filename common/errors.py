"""One exception type for everything a user can cause.

The command-line layer prints ``str(error)`` as a single line and exits non-zero, without a
traceback. Messages therefore always name the file, fragment or tensor at fault.
"""


class UserError(Exception):
    """A problem with the user's input (file, store, option), reported as one clear line."""

    exit_code = 1


class StoreError(UserError):
    """A fragment store is missing pieces, corrupt or not what was asked for."""

    exit_code = 2
