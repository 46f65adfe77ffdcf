"""The ``zsgd`` command line.

Commands are thin: they parse flags and call into the modules that do the
work, importing them lazily so ``zsgd --help`` stays instant (numba and
matplotlib cost a second to import).
"""

from __future__ import annotations

import sys

import click

from zsgd import __version__
from zsgd.cli_options import build_config, training_options
from zsgd.errors import ZsgdError


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
            click.echo(f"zsgd: error: {exc.format_message()}{hint}", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            click.echo(f"zsgd: error: {exc.format_message()}", err=True)
            sys.exit(2)
        except ZsgdError as exc:
            click.echo(f"zsgd: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("zsgd: interrupted", err=True)
            sys.exit(130)


@click.group(cls=ZsgdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="zsgd")
def main() -> None:
    """Distributed SGD over ZeroMQ: train across processes and machines, or
    simulate latency, stragglers and staleness in virtual time."""


@main.command()
@training_options
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory (default runs/<time>-<name>/).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def train(ctx: click.Context, out: str | None, quiet: bool, **params) -> None:
    """Train in one process: the baseline every distributed run is compared with."""
    cfg = build_config(ctx, params, default_name=f"train-{params['model']}")
    from zsgd.live import stderr_console, summary_table
    from zsgd.train import Problem, train as run_training

    problem = Problem.from_config(cfg)
    stderr_console.print(f"data: [bold]{problem.dataset.name}[/] ({problem.dataset.source}), "
                         f"{len(problem.dataset.y_train):,} train / {len(problem.dataset.y_test):,} test; "
                         f"model: [bold]{cfg.model}[/] ({problem.model.n_params:,} parameters)")
    summary = run_training(cfg, out=out, show_progress=not quiet, problem=problem)
    keys = ("test_accuracy", "test_loss", "train_loss", "updates", "samples", "epochs", "wall_s", "samples_per_s", "stop_reason", "run_dir")
    stderr_console.print(summary_table("summary", {k: summary[k] for k in keys}))
    if summary["stop_reason"] and summary["stop_reason"].startswith("diverged"):
        raise ZsgdError(f"training {summary['stop_reason']}")


def _register_subcommands() -> None:
    from zsgd.data.commands import data_group

    main.add_command(data_group)


_register_subcommands()
