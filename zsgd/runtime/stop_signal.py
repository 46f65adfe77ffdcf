"""SIGTERM stops a run the way its stop rule would: checkpoint, final evaluation, summary, exit 0.

Slurm sends SIGTERM before a job's time limit (``#SBATCH --signal=B:TERM@120``),
on ``scancel --signal=TERM`` and before preemption, then SIGKILL after a
grace period. Dying on the signal would lose everything since the last
periodic checkpoint; instead the broker's loop ends at its next turn (a
fraction of a heartbeat), which writes the checkpoint that ``--resume auto``
picks up when the job is submitted again.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

_previous: Any = None


def stop_on_sigterm(broker: Any, show: bool = True) -> None:
    """From now on SIGTERM sets ``broker``'s stop reason; ``None`` restores the previous handler."""
    global _previous
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (a run started from a library thread keeps the default)
    if broker is None:
        if _previous is not None:
            signal.signal(signal.SIGTERM, _previous)
            _previous = None
        return

    def handle(signum: int, frame: Any) -> None:
        if broker.ledger.stop_reason is None:
            broker.ledger.stop("stopped by SIGTERM (checkpoint written; continue with --resume)")
            if show:
                from zsgd.output.live import stderr_console

                stderr_console.print("[yellow]SIGTERM[/]: stopping with a checkpoint")

    previous = signal.signal(signal.SIGTERM, handle)
    if _previous is None:
        _previous = previous
