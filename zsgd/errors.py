"""User-facing errors.

Anything a user can cause (bad flag, missing file, corrupt data) raises
``ZsgdError``; the CLI turns it into one line on stderr and exit code 2, so no
user ever sees a traceback for their own mistake. Bugs stay tracebacks.
"""


class ZsgdError(Exception):
    """An error the user can fix; its message says what to do."""

    exit_code = 2
