"""SIGTERM and Ctrl-C stop a run the way its stop rule would: checkpoint, final evaluation, summary.

The broker of ``zsgd run`` and the single-process trainer of ``zsgd train``
both hand their ledger over; each ends its loop when the ledger has a stop
reason, so both write their summary and weights on either signal.

Slurm sends SIGTERM before a job's time limit (``#SBATCH --signal=B:TERM@120``),
on ``scancel --signal=TERM`` and before preemption, then SIGKILL after a
grace period. Dying on the signal would lose everything since the last
periodic checkpoint; instead the broker's loop ends at its next turn (a
fraction of a heartbeat), which writes the checkpoint that ``--resume auto``
picks up when the job is submitted again; the exit status is 0.

Ctrl-C (SIGINT) does the same and then exits with 130. It sets the stop
reason instead of raising KeyboardInterrupt: an exception raised by a signal
lands in whatever code runs at that instant, and when that is a finalizer
(a garbage-collected ZeroMQ object's ``__del__``) Python prints it as
"Exception ignored" and drops it, and the run went on training. A second
Ctrl-C raises KeyboardInterrupt at once, for a clean stop that hangs.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

_previous: dict[int, Any] = {}
_interrupted = False


def stop_on_signals(ledger: Any, show: bool = True, checkpoints: bool = True) -> None:
    """From now on SIGTERM and SIGINT set ``ledger``'s stop reason; ``None`` restores the previous handlers.

    ``ledger`` is a ``RunLedger`` (or anything with its ``stop_reason`` and ``stop``); ``checkpoints``: the
    run writes a checkpoint on its way out (``zsgd run``; ``zsgd train`` has none), as the messages say."""
    global _interrupted
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (a run started from a library thread keeps the default)
    if ledger is None:
        for signum, previous in _previous.items():
            signal.signal(signum, previous)
        _previous.clear()
        return
    _interrupted = False

    def say(text: str) -> None:
        if show:
            from zsgd.output.live import stderr_console

            stderr_console.print(text)

    def on_term(signum: int, frame: Any) -> None:
        if ledger.stop_reason is None:
            ledger.stop("stopped by SIGTERM (checkpoint written; continue with --resume)" if checkpoints else "stopped by SIGTERM")
            say("[yellow]SIGTERM[/]: stopping " + ("with a checkpoint" if checkpoints else "and writing the summary"))

    def on_int(signum: int, frame: Any) -> None:
        global _interrupted
        if _interrupted:
            raise KeyboardInterrupt
        _interrupted = True
        ledger.stop("interrupted")
        say("[yellow]Ctrl-C[/]: stopping with " + ("a checkpoint and " if checkpoints else "") + "a summary (Ctrl-C again to stop at once)")

    for signum, handler in ((signal.SIGTERM, on_term), (signal.SIGINT, on_int)):
        previous = signal.signal(signum, handler)
        _previous.setdefault(signum, previous)


def interrupted() -> bool:
    """Whether Ctrl-C stopped the run (its command then exits with 130, after the summary)."""
    return _interrupted
