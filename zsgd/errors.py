"""User-facing errors.

Anything a user can cause (bad flag, missing file, corrupt data) raises
``ZsgdError``; the CLI turns it into one line on stderr and exit code 2, so no
user ever sees a traceback for their own mistake. Bugs stay tracebacks.
"""


class ZsgdError(Exception):
    """An error the user can fix; its message says what to do."""

    exit_code = 2


class RunDiverged(ZsgdError):
    """A run ended because its loss, gradient or model diverged (its summary is written).

    Exit code 3 (2 is a usage error), so scripts and sweeps can tell a run
    that went wrong from a command that was typed wrong.
    """

    exit_code = 3


class ProtocolError(ValueError):
    """A message (or a codec payload inside one) was rejected. Never fatal: count it by `reason` and go on.

    Defined here, below every layer, so that codecs and sans-IO rules can
    reject bad input without importing the wire layer. `reason` is a code
    from ``zsgd.wire.protocol.REASONS``, `detail` is for humans, `identity` is
    the ROUTER peer that sent it (when known), to answer with ERROR or drop it.
    """

    def __init__(self, reason: str, detail: str = "", identity: bytes | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.identity = identity
