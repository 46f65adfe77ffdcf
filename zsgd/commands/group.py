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
            return super().main(args, prog_name or "zsgd", complete_var, standalone_mode=False, **extra)
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
