"""The click group class every zsgd command runs under: errors as one line, never a traceback."""

from __future__ import annotations

import sys

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
