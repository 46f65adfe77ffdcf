"""Figures drawn in processes forked while this one works.

Importing matplotlib (pyplot, its fonts) takes about 0.3 s and drawing a
sweep's five figures about 0.4 s: more than a short simulation's own work,
and all of it paid after the arms ended. ``Plotter(n)`` forks one child at
the start of the work, which imports matplotlib and draws a throw-away
figure (fonts loaded) on another core while this process computes, then
forks ``n - 1`` more helpers that start warm (sharing those pages), and
they wait. When the results are ready, ``submit`` hands each helper one
share of the figures and they are drawn side by side. ``zsgd sim`` forks them
first thing, while the parent is still small and one core is idle
(``zsgd.commands.simulate.figure_helpers``); ``preload`` names the modules
their jobs come from, imported during the wait, not on the job's arrival.

The helpers serve this process only: they ignore Ctrl-C (the parent ends
them), leave when the parent dies or closes their pipe, and a job whose
arguments cannot be sent, or whose helper is gone, is drawn here
instead -- the files are the same either way. Not on Linux, or with
``ZSGD_PLOT_FORK=0``, everything is drawn here, as before.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import traceback
from typing import Any, Callable

from zsgd.errors import ZsgdError

JOB_TIMEOUT_S = 900.0  # drawing the figures of a few hundred arms takes a minute; a child silent this long is stuck
PARENT_CHECK_S = 1.0  # an idle child looks this often whether its parent is still there


def fork_available() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "fork") and os.environ.get("ZSGD_PLOT_FORK", "1").strip() != "0"


def _warm_up(preload: tuple[str, ...] = ()) -> None:
    """Import matplotlib and draw a throw-away figure: fonts, the Agg canvas and the PNG writer loaded;
    then import ``preload`` (the modules of the jobs to come, so that unpickling one imports nothing)."""
    try:
        import importlib
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [0, 1], label="warm")
        ax.set(xlabel="x", ylabel="y", title="t")
        ax.legend(fontsize=7)
        fig.savefig(io.BytesIO(), dpi=110, format="png")
        plt.close(fig)
        for name in preload:
            importlib.import_module(name)
    except Exception:  # noqa: BLE001 -- only a warm-up: the job meets the same error and reports it
        pass


def _first_child(conns: list[Any], parent_ends: list[Any], parent: int, preload: tuple[str, ...] = ()) -> None:
    """The one forked child: warm up once, then fork one more helper per further connection (each starts
    warm, sharing these pages), and serve the first connection itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: it is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # close() ends a helper with SIGTERM, whatever handler the parent had set:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked from the fork to here (Plotter.__init__), so none is lost
    for end in parent_ends:
        end.close()  # or the parent's closing would never read as EOF here
    _warm_up(preload)
    for i, conn in enumerate(conns[1:], start=1):
        if os.fork() == 0:
            try:
                for j, other in enumerate(conns):
                    if j != i:
                        other.close()
                _serve(conn, parent)
            finally:
                os._exit(0)
    for conn in conns[1:]:
        conn.close()
    _serve(conns[0], parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _serve(conn: Any, parent: int) -> None:
    """Run at most one job from ``conn`` and send back its outcome; leave on EOF or when ``parent`` is gone."""
    try:
        while not conn.poll(PARENT_CHECK_S):
            if not _alive(parent):
                return
        job = conn.recv()
    except (EOFError, OSError):
        return
    if job is None:
        return
    fn, args, kwargs = job
    try:
        outcome = ("ok", fn(*args, **kwargs))
    except ZsgdError as exc:
        outcome = ("error", str(exc))
    except BaseException:  # noqa: BLE001 -- a bug: the parent raises it with this traceback
        outcome = ("bug", traceback.format_exc())
    try:
        conn.send(outcome)
    except (OSError, ValueError):
        pass


class Plotter:
    """``n`` forked children, each ready to run one plotting job (see the module docstring)."""

    def __init__(self, n: int = 1, preload: tuple[str, ...] = ()) -> None:
        """``preload``: modules the jobs' functions and arguments come from, imported by the helpers while they
        wait (a helper forked before the caller imported them would otherwise import them on unpickling)."""
        self._idle: list[Any] = []  # the parent's ends of the helpers' pipes
        self._proc: Any = None
        self._used = False  # whether a job was sent: until then, closing ends the helpers at once
        if n <= 0 or not fork_available():
            return
        ctx = multiprocessing.get_context("fork")
        pairs = [ctx.Pipe() for _ in range(n)]
        self._idle = [mine for mine, _theirs in pairs]
        self._proc = ctx.Process(target=_first_child, args=([t for _m, t in pairs], self._idle, os.getpid(), tuple(preload)),
                                 daemon=True, name="zsgd-plot")
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # until the child has its own handler
        try:
            self._proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for _mine, theirs in pairs:
            theirs.close()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], Any]:
        """Start ``fn(*args, **kwargs)`` in an idle child (here, when none is left or the job cannot be sent);
        returns the function that waits for its result (raising what ``fn`` raised)."""
        if self._idle:
            conn = self._idle.pop(0)
            self._used = True
            try:
                conn.send((fn, args, kwargs))
                return lambda: self._result(conn, fn, args, kwargs)
            except Exception:  # noqa: BLE001 -- arguments that do not pickle, or a helper that is gone: draw here
                conn.close()
        result = fn(*args, **kwargs)
        return lambda: result

    @staticmethod
    def _result(conn: Any, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        try:
            if conn.poll(JOB_TIMEOUT_S):
                status, value = conn.recv()
            else:
                status, value = "lost", None
        except (EOFError, OSError):  # the helper died (killed, out of memory): draw here
            status, value = "lost", None
        conn.close()
        if status == "ok":
            return value
        if status == "error":
            raise ZsgdError(value)
        if status == "bug":
            raise RuntimeError(f"drawing figures failed in their process:\n{value}")
        return fn(*args, **kwargs)

    def close(self, abort: bool = False) -> None:
        """End the helpers: an idle one reads EOF and leaves; the forked child, still drawing after its
        grace (an interrupted sweep), is terminated (its own helpers then read EOF and leave). With
        ``abort``, or when no job was ever sent (a command that failed before its figures), the forked child
        is terminated at once: an error must not wait for matplotlib to finish loading."""
        for conn in self._idle:
            conn.close()
        self._idle = []
        if self._proc is not None:
            self._proc.join(timeout=0.0 if abort or not self._used else 2.0)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(timeout=2.0)
            self._proc = None

    def __enter__(self) -> "Plotter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(abort=exc_type is not None)

