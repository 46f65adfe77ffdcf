"""Local children forked from the running ``zsgd run`` process instead of started as new interpreters.

Why: a fresh ``python -m zsgd worker`` spends about a second of CPU before
its first gradient -- the interpreter, numpy, zmq and numba imports, and
numba's one-time set-up of its compiler target (about 0.9 s, paid on the
first call of any jitted function, cached or not). The ``zsgd run`` process
has paid all of that already (its optimizer step is jitted), so a child
forked from it reaches its first gradient in a few hundredths of a second
and only loads its own model's kernels. On a machine where the workers
outnumber the cores, those seconds of every worker were start-up that
delayed everybody's first update.

The child runs exactly what ``python -m zsgd worker ...`` runs (the same
command line through the same click group), so local and remote workers
still share one code path. It is made to look like a fresh process: its
own session, its parent-death signal, stdin/stdout/stderr on the log file
(and the keys pipe), every other inherited descriptor closed (the broker's
listening socket above all), the parent's signal handlers reset, the
parent's objects frozen out of the garbage collector (a collected file
object of the parent would close a descriptor number the child reuses),
and ``os._exit`` at the end so nothing of the parent is torn down twice.

Where this is unsafe the launcher starts a new interpreter as before: not
on Linux, when numpy in this process may run more than one BLAS thread, or
when ``ZSGD_LOCAL_START=exec`` asks for it (debugging the start path).
"""

from __future__ import annotations

import atexit
import gc
import io
import os
import signal
import subprocess
import sys
import time
from typing import IO, Any, Sequence

from zsgd.runtime.threads import SINGLE_THREAD_ENV

_KEPT: list = []  # the parent's stdio objects, kept alive in the child so none is finalized onto a reused fd


def fork_available() -> bool:
    """True when children may be forked from this process (see the module docstring)."""
    if os.environ.get("ZSGD_LOCAL_START", "fork").strip().lower() == "exec":
        return False
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return False
    from zsgd.runtime.threads import blas_single_threaded

    return blas_single_threaded()


class ForkedProcess:
    """A forked child, with the part of ``subprocess.Popen`` the launchers use."""

    def __init__(self, pid: int, args: Sequence[str], stdin: IO[bytes] | None) -> None:
        self.pid = pid
        self.args = list(args)
        self.stdin = stdin
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: it has ended, how is unknown
                self.returncode = 255
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.001
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(delay)  # polling a child's exit: there is no waitpid with a timeout
            delay = min(delay * 2, 0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never signal a pid that was reaped (and may be reused)
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork_command(args: Sequence[str], log_path: os.PathLike, title: str, stdin_pipe: bool = False) -> ForkedProcess:
    """Fork a child that runs ``zsgd ARGS`` (as ``python -m zsgd ARGS`` would) with its output on ``log_path``."""
    read_end = write_end = None
    if stdin_pipe:
        read_end, write_end = os.pipe()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()  # or the child would write this process's pending output again
        except (OSError, ValueError, AttributeError):
            pass
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            _become_fresh(log_fd, read_end, parent, title)
            code = _run(args)
        except BaseException:  # noqa: BLE001 -- whatever happens, the child must not return into the parent's code
            try:
                import traceback

                traceback.print_exc()
            except BaseException:  # noqa: BLE001
                pass
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:  # noqa: BLE001
                    pass
            os._exit(code)
    os.close(log_fd)
    stdin = None
    if stdin_pipe:
        os.close(read_end)
        stdin = os.fdopen(write_end, "wb", buffering=0)
    return ForkedProcess(pid, ["zsgd", *args], stdin)


def _become_fresh(log_fd: int, stdin_fd: int | None, parent: int, title: str) -> None:
    gc.freeze()  # the parent's objects: never collected here (their finalizers would act on the parent's descriptors)
    atexit._clear()  # nor its exit handlers run here (a command that succeeds runs them: zsgd.commands.group.quick_exit)
    os.setsid()
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        if callable(handler) or sig == signal.SIGINT:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    null = os.open(os.devnull, os.O_RDONLY) if stdin_fd is None else stdin_fd
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.closerange(3, _max_fd())
    _KEPT.extend([sys.stdin, sys.stdout, sys.stderr])
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True, write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, write_through=True,
                                  errors="backslashreplace")
    os.environ.update(SINGLE_THREAD_ENV | {"PYTHONUNBUFFERED": "1"})
    _set_name(title)


def _run(args: Sequence[str]) -> int:
    """``python -m zsgd ARGS``, in this process: the package's ``__main__`` with that command line."""
    import runpy

    sys.argv = ["zsgd", *args]
    try:
        runpy.run_module("zsgd", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1
    return 0


def warm_kernels(problem: Any, model_spec: str) -> None:
    """Load the model's training and evaluation kernels in this process, before its children are forked.

    Each worker's first step (``WorkerStep.warm_up``) and the evaluator's first evaluation load the model's
    numba kernels from the cache, about 0.1 s per process; loaded once here, a forked child inherits them
    (every process of ``--n-proc 4`` on two cores paid it at the same moment, before the first update).
    Built-in image models only: a language model warms on its token stream, and a user's model is run only
    by the processes started for it. With read-only weights too, as a child's arrive (views of the broker's
    frames), for which numba has kernels apart; the writable ones serve a worker's warm-up step."""
    import numpy as np

    from zsgd.nn.models import evaluate, is_user_model, read_only

    model, ds = problem.model, problem.dataset
    if is_user_model(model_spec) or getattr(model, "is_language_model", False) or not hasattr(ds, "x_train"):
        return
    from zsgd.data import to_float

    w = model.init(seed=0)
    n = min(2, len(ds.y_train))
    with np.errstate(over="ignore", invalid="ignore"):
        for weights in (w, read_only(w)):
            model.loss_and_grad(weights, to_float(ds.x_train[:n]), ds.y_train[:n], training=True, seed=0)
        if len(ds.y_test):
            evaluate(model, read_only(w), ds.x_test[:2], ds.y_test[:2])


def die_with_parent() -> None:
    """SIGTERM this process when the process that started it dies (Linux; elsewhere nothing)."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _max_fd() -> int:
    try:
        return max(int(name) for name in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return os.sysconf("SC_OPEN_MAX")


def _set_name(title: str) -> None:
    """The name ``top`` and ``ps -o comm`` show (15 bytes); the command line stays the parent's."""
    try:
        import ctypes

        PR_SET_NAME = 15
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_NAME, title.encode()[:15], 0, 0, 0)
    except OSError:
        pass
