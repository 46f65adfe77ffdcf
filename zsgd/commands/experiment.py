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

from zsgd.commands.arms import arm_options, calibration_options
from zsgd.errors import ZsgdError


@click.command("experiment")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output directory (default runs/<time>-<name>/).")
@click.option("--only", multiple=True, metavar="ARM", help="Run only this arm (repeatable); the others are skipped.")
@click.option("--check", is_flag=True, help="Validate the file (every arm) and exit without running anything.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines or table.")
@arm_options
@calibration_options
@click.pass_context
def experiment_command(ctx: click.Context, config: str, out: str | None, only: tuple[str, ...], check: bool, quiet: bool,
                       jobs: int | None, launcher: str, calibration_file: str | None, recalibrate: bool) -> None:
    """Run the arms of an experiment file and compare them.

    The file names one problem (model, data, split, seed, hyper-parameters,
    stop rule) and a list of arms (algorithm, workers, network, compression,
    overrides); every arm starts from the same weights on the same shards.
    Writes per-arm run directories, results.md/.csv and plots. See
    examples/compare_small.yaml.
    """
    from zsgd.simulation.interrupt import stop_on_signals

    try:
        with stop_on_signals(show=not quiet):  # Ctrl-C, SIGTERM: running arms end with a summary, then exit 130
            _run(config, out, only, check, quiet, jobs, launcher, calibration_file, recalibrate)
    except ZsgdError as exc:
        if ctx.parent is not None:
            raise  # inside the zsgd group: it prints the one line and exits 2, as for every command
        click.echo(f"zsgd: error: {exc}", err=True)
        sys.exit(exc.exit_code)


def _run(config: str, out: str | None, only: tuple[str, ...], check: bool, quiet: bool, jobs: int | None = None,
         launcher: str = "local", calibration_file: str | None = None, recalibrate: bool = False) -> None:
    from zsgd.commands.arms import use_calibration
    from zsgd.runtime.threads import single_threaded_blas

    single_threaded_blas()  # as in zsgd sim: measured compute is one worker's, and parallel arms must not fight over cores
    use_calibration(calibration_file, recalibrate)  # a bad --calibration FILE fails before anything is loaded
    from zsgd.experiments.config import load_experiment

    spec = load_experiment(Path(config))
    if check:
        click.echo(f"{config}: {len(spec.arms)} arm(s) OK: {', '.join(a.name for a in spec.arms)}")
        return
    from zsgd.commands.arms import resolve_arm_launch
    from zsgd.experiments.experiment import run_experiment
    from zsgd.output.live import stderr_console
    from zsgd.output.rundir import check_out_dir

    if out is not None:
        check_out_dir(out)  # before any arm's data is loaded

    launch = resolve_arm_launch(jobs, launcher, "experiment-arm")

    log = None if quiet else (lambda msg: stderr_console.print(msg, highlight=False, markup=False))
    command = "zsgd experiment " + " ".join(shlex.quote(a) for a in [config] + [f"--only={o}" for o in only])
    out_dir, rows = run_experiment(spec, out, only, log=log, command=command, jobs=launch.jobs, step_argv=launch.step_argv,
                                   step_capacity=launch.capacity)
    if not quiet:
        from zsgd.experiments.report import results_table

        stderr_console.print(results_table(rows, f"{spec.name} (target {spec.target:.0%})"))
        stderr_console.print(f"results: {out_dir / 'results.md'}, {out_dir / 'results.csv'}; plots in {out_dir}")
    click.echo(str(out_dir))
    sys.stdout.flush()


@click.command("experiment-arm", hidden=True)
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.argument("index", type=int)
def experiment_arm_command(out_dir: str, index: int) -> None:
    """One simulated arm of an experiment that 'zsgd experiment --launcher slurm' planned in OUT_DIR (run as an srun step)."""
    from zsgd.runtime.threads import single_threaded_blas

    single_threaded_blas()
    from zsgd.experiments.experiment import run_planned_arm
    from zsgd.simulation.interrupt import requested, stop_on_signals

    with stop_on_signals(show=False):  # the parent's SIGTERM (through srun) ends the arm with a summary
        click.echo(str(run_planned_arm(Path(out_dir), index)))
        if requested():
            raise KeyboardInterrupt
