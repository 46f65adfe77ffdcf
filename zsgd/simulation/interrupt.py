"""Ctrl-C and SIGTERM end simulated arms the way a stop rule would: final evaluation, summary.json.

Why a flag and not KeyboardInterrupt: an exception raised by a signal lands
wherever the code is at that instant (inside numpy, a finalizer, the writing
of a metrics line), and an arm killed that way leaves a run directory with
no summary, so nothing says how far it got or why it ended. Instead the
handler sets a flag that the simulators' event loops read at every event
(``Simulation.run``, ``DecentralizedSimulation.run``): the running arm ends
with the stop reason ``interrupted``, its summary and weights are written
as for any other stop, and the sweep starts no further arm
(``zsgd.simulation.parallel.run_arms``), then raises KeyboardInterrupt,
which the ``zsgd`` group turns into one line and exit status 130. A second
Ctrl-C raises KeyboardInterrupt at once, for an arm whose final evaluation
takes too long. (The runtime does the same for real runs:
``zsgd.runtime.stop_signal``.)

Forked arm processes ignore SIGINT (the terminal sends it to the whole
process group; the parent decides) and take SIGTERM, which the parent sends
when it stops them, as the same request.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

STOP_REASON = "interrupted"
_requested = False


def requested() -> bool:
    """Whether Ctrl-C or SIGTERM asked the arms to stop."""
    return _requested


def request(_signum: int = 0, _frame: Any = None) -> None:
    """Ask the running arm to end (a signal handler, or a direct call in tests)."""
    global _requested
    _requested = True


def reset() -> None:
    global _requested
    _requested = False


@contextmanager
def stop_on_signals(show: bool = True) -> Iterator[None]:
    """While inside: SIGINT and SIGTERM request a stop; a second SIGINT raises KeyboardInterrupt at once.

    Outside the main thread (a library caller's thread) nothing is installed: only it may set handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reset()

    def on_signal(signum: int, frame: Any) -> None:
        if _requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        request()
        if show:
            from zsgd.output.live import stderr_console

            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            stderr_console.print(f"[yellow]{name}[/]: ending the running arm(s) with a summary (Ctrl-C again to stop at once)")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def in_forked_arm(busy: Callable[[], bool]) -> None:
    """A forked arm process: SIGINT is the parent's to handle; SIGTERM (the parent stopping it) ends the
    arm it runs with a summary, or, when ``busy()`` is false, the idle process at once (a blocking queue
    read would otherwise outlast the signal: Python retries an interrupted system call)."""
    reset()

    def on_term(_signum: int, _frame: Any) -> None:
        if busy():
            request()
        else:
            os._exit(0)  # idle: nothing to save, and no clean-up that could block on a full pipe

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_term)
