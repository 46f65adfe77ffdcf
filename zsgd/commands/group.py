"""The click group class every zsgd command runs under: errors as one line, never a traceback; and what
a zsgd process does at its start and end (no full garbage collection while it loads, numba without
scipy's BLAS probe, the quick exit)."""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

import click

from zsgd.errors import ZsgdError


MAX_ERROR_CHARS = 400  # a bad value can be 100,000 characters long: the line names it, it does not repeat it


def one_line(text: str) -> str:
    """An error for the terminal: its first line, cut to ``MAX_ERROR_CHARS`` (the middle elided)."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    if len(line) <= MAX_ERROR_CHARS:
        return line
    keep = MAX_ERROR_CHARS // 2 - 10
    return f"{line[:keep]} [... {len(line) - 2 * keep:,} characters ...] {line[-keep:]}"


class ZsgdGroup(click.Group):
    """A click group whose errors are one line on stderr and exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if args is None:  # a zsgd process (not click's test runner)
            start_quickly()
        try:
            result = super().main(args, prog_name or "zsgd", complete_var, standalone_mode=False, **extra)
            if args is None:  # the command line of a zsgd process (not click's test runner, not a caller's list)
                quick_exit()
            return result
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("zsgd: interrupted", err=True)
            sys.exit(130)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"zsgd: error: {one_line(exc.format_message())}{hint}", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            click.echo(f"zsgd: error: {one_line(exc.format_message())}", err=True)
            sys.exit(2)
        except ZsgdError as exc:
            click.echo(f"zsgd: error: {one_line(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("zsgd: interrupted", err=True)
            sys.exit(130)


def quick_exit(code: int = 0) -> None:
    """End this process now that its command succeeded, skipping the interpreter's teardown.

    Freeing every module of a process that ran numba kernels (its compiler and LLVM objects) takes
    0.2-0.3 s after the work is done, more than a short ``zsgd sim`` spends simulating. The exit
    handlers still run (multiprocessing's children, logging), and the standard streams are flushed;
    with other threads alive (which a normal exit would wait for), under a profiler or tracer (``python
    -m cProfile`` writes its stats after the command returns), or with ``ZSGD_QUICK_EXIT=0``, the
    interpreter ends as usual."""
    import os
    import threading

    if os.environ.get("ZSGD_QUICK_EXIT", "1").strip() == "0" or threading.active_count() > 1 \
            or sys.getprofile() is not None or sys.gettrace() is not None:
        return
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(code)


NUMBA_PROBE_MODULE = "numba.np.arraymath"  # its module body probes for BLAS: ``_HAVE_BLAS = _check_blas()``
NO_FULL_COLLECTION = 1_000_000_000  # gc's third threshold while a process loads: young generations only


def start_quickly() -> None:
    """No full garbage collection while the process loads its modules, and numba set up without scipy.linalg.

    Importing numpy, numba and the rest creates about 120,000 long-lived objects, and the collector scanned
    all of them twice over (two full collections: about 0.1 s of CPU per process on the development
    machine, as much as the rest of the collector's start-up work). So full collections wait until numba
    has set up its CPU target (the first jitted call: the process is loaded); then everything loaded so
    far is frozen out of the collector (``gc.freeze``: never garbage, never scanned again, and a forked
    child does not copy its pages by scanning them) and the thresholds are restored. A process that never
    runs a jitted function (``zsgd plot``, ``zsgd data``) keeps collecting its young generations only."""
    if NUMBA_PROBE_MODULE in sys.modules:
        return
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], NO_FULL_COLLECTION)

    def loaded() -> None:
        gc.freeze()
        gc.set_threshold(*thresholds)

    skip_numba_blas_probe(then=loaded)


def skip_numba_blas_probe(then: Any = None) -> None:
    """Let numba set up its CPU target without importing ``scipy.linalg`` (0.07 s of every zsgd process).

    numba runs ``numba.np.arraymath``'s module body when the process calls its first jitted function, and
    that body imports ``scipy.linalg.cython_blas`` to note whether ``np.correlate`` and ``np.convolve``
    inside jitted code may call BLAS (an ImportError: no, a loop instead). zsgd's kernels call neither,
    and anything that does need scipy's BLAS later (``np.dot`` in a user's jitted code) still imports it
    at its own compilation. So while that one module body runs, and only then, ``scipy.linalg`` is
    refused, unless something already imported it; ``ZSGD_NUMBA_BLAS_PROBE=1`` keeps numba's probe.
    ``then``: called once that module body has run (whether the probe was skipped or not)."""
    if NUMBA_PROBE_MODULE in sys.modules:
        return
    if not any(isinstance(f, _ProbeFinder) for f in sys.meta_path):
        keep = os.environ.get("ZSGD_NUMBA_BLAS_PROBE", "0").strip() == "1"
        sys.meta_path.insert(0, _ProbeFinder(refuse=not keep, then=then))


class _ProbeFinder:
    """Finds ``numba.np.arraymath`` (through the other finders) and runs its body with ``scipy.linalg`` refused."""

    def __init__(self, refuse: bool, then: Any) -> None:
        self.refuse, self.then = refuse, then

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != NUMBA_PROBE_MODULE:
            return None
        sys.meta_path.remove(self)  # once: and the lookup below must not find this finder again
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Probe(spec.loader, self.refuse and "scipy.linalg" not in sys.modules, self.then)
        return spec


class _Probe:
    """A loader that runs the wrapped loader's module body (with imports of ``scipy.linalg`` refused if
    ``refuse``), then calls ``then``."""

    def __init__(self, loader: Any, refuse: bool, then: Any) -> None:
        self.loader, self.refuse, self.then = loader, refuse, then

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        refuse = _Refuse() if self.refuse else None
        if refuse is not None:
            sys.meta_path.insert(0, refuse)
        try:
            self.loader.exec_module(module)
        finally:
            if refuse is not None:
                sys.meta_path.remove(refuse)
            if self.then is not None:
                self.then()

    def __getattr__(self, name: str) -> Any:  # get_code, get_source, ... as the wrapped loader has them
        return getattr(self.loader, name)


class _Refuse:
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name == "scipy.linalg" or name.startswith("scipy.linalg."):
            raise ImportError(f"{name}: not imported while numba sets up (zsgd.commands.group.skip_numba_blas_probe)", name=name)
        return None
