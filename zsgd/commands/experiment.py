"""``zsgd experiment CONFIG.yaml``: run a comparison of algorithms described in a file.

Register it on the main group with ``main.add_command(experiment_command)``.
Only click is imported at start-up (``zsgd --help`` must stay instant); the
experiment modules load when the command runs. A ``ZsgdError`` (bad file,
unknown key, bad value, an arm that cannot run) is one line on stderr and
exit code 2: the ``zsgd`` group does that for its commands, and this command
does it itself when invoked on its own (tests, other entry points).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from zsgd.errors import ZsgdError


@click.command("experiment")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output directory (default runs/<time>-<name>/).")
@click.option("--only", multiple=True, metavar="ARM", help="Run only this arm (repeatable); the others are skipped.")
@click.option("--check", is_flag=True, help="Validate the file (every arm) and exit without running anything.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines or table.")
@click.pass_context
def experiment_command(ctx: click.Context, config: str, out: str | None, only: tuple[str, ...], check: bool, quiet: bool) -> None:
    """Run the arms of an experiment file and compare them.

    The file names one problem (model, data, split, seed, hyper-parameters,
    stop rule) and a list of arms (algorithm, workers, network, compression,
    overrides); every arm starts from the same weights on the same shards.
    Writes per-arm run directories, results.md/.csv and plots. See
    examples/compare_small.yaml.
    """
    try:
        _run(config, out, only, check, quiet)
    except ZsgdError as exc:
        if ctx.parent is not None:
            raise  # inside the zsgd group: it prints the one line and exits 2, as for every command
        click.echo(f"zsgd: error: {exc}", err=True)
        sys.exit(exc.exit_code)


def _run(config: str, out: str | None, only: tuple[str, ...], check: bool, quiet: bool) -> None:
    from zsgd.experiments.config import load_experiment

    spec = load_experiment(Path(config))
    if check:
        click.echo(f"{config}: {len(spec.arms)} arm(s) OK: {', '.join(a.name for a in spec.arms)}")
        return
    from zsgd.experiments.experiment import run_experiment
    from zsgd.output.live import stderr_console
    from zsgd.output.rundir import check_out_dir

    if out is not None:
        check_out_dir(out)  # before any arm's data is loaded

    log = None if quiet else (lambda msg: stderr_console.print(msg, highlight=False, markup=False))
    command = "zsgd experiment " + " ".join(shlex.quote(a) for a in [config] + [f"--only={o}" for o in only])
    out_dir, rows = run_experiment(spec, out, only, log=log, command=command)
    if not quiet:
        from zsgd.experiments.report import results_table

        stderr_console.print(results_table(rows, f"{spec.name} (target {spec.target:.0%})"))
        stderr_console.print(f"results: {out_dir / 'results.md'}, {out_dir / 'results.csv'}; plots in {out_dir}")
    click.echo(str(out_dir))
    sys.stdout.flush()
