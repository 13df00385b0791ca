"""User errors: bad input that the CLI reports as one line (naming the flag or
file and the fix) and exit status 2, without a traceback.

The library raises ordinary exception types where a Python caller expects
them (ValueError for a bad value, FileNotFoundError for a missing file,
FileExistsError for results that would be overwritten); `USER_ERRORS` is the
set the CLI treats as the user's to fix. `--debug` (or QLIP_DEBUG=1) shows the
traceback instead."""
from __future__ import annotations

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)


class UserError(ValueError):
    """A bad flag value or a bad combination of flags."""


class RunDirError(FileExistsError):
    """A run directory that already holds results (or another run's progress)."""
