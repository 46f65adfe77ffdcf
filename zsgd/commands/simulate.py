"""``zsgd sim``: simulate distributed SGD in virtual time over a grid of arms.

Defaults: everything that decides how the model trains (batch size, learning
rate, momentum, schedule, the one-epoch budget) is ``zsgd run``'s, and an
unset batch size or learning rate follows each arm's workers exactly as in
``zsgd run`` (``zsgd.algorithms.scaling``), so an arm predicts the real run of the
same flags; ``--literal`` keeps the values as given for sweeps that must change
one thing at a time. What is simulated differs, because a simulator computes
every worker's gradient on one core: the model is ``mlp`` (0.4-0.5 ms a step at
batch 16, against 19 ms and 3 s per evaluation for the cnn, whose three-arm
study would take about 7 minutes of CPU), over 8 workers (staleness 7, yet one
epoch still reaches 81.7 %; 16 workers end at 76.7 %), with a 75 % target
that every arm passes with a margin. Measured on 2 cores shared with other
jobs, with Fashion-MNIST installed, ``zsgd sim --latency 0,10,50ms`` took
21 s of CPU (71-95 s wall at load averages of 9-10); every arm ends at
81.65 % and reaches 75 % after 0.1, 4.8 and 24 virtual seconds (README,
docs/simulation.md).

Only click is imported here at start-up (the CLI registers this command when
``zsgd --help`` runs, which must stay instant); numpy, numba and matplotlib
are imported when the command runs.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

import click

from zsgd.commands.options import (build_config, decentralized_options, pop_decentralized, pop_network, sim_network_options,
                                   training_options_with)
from zsgd.commands.arms import arm_options, calibration_options
from zsgd.errors import ZsgdError

DEFAULT_TARGET = 0.75  # every arm of the default delay study passes it with a margin (see above)
_LIST = " A comma list makes arms (every combination with the other lists)."



# -- --validate and --tolerance: the command's side of zsgd.experiments.validate --------------------------------------
def validate_options(func: Callable) -> Callable:
    func = click.option("--tolerance", default=None, metavar="FRACTION",
                        help="With --validate: the largest error allowed on each figure, e.g. 5% or 0.05 [default: 5%].")(func)
    func = click.option("--validate", is_flag=True,
                        help="Check the simulator on these flags: a short real emulated run here beside its simulated twin; "
                             "prints time per update, staleness, accuracy and bytes, real against simulated, writes "
                             "validate.png, and exits 1 beyond --tolerance.")(func)
    return func


def run_validate(cfg: Any, spec: Any, arms: list, out: str | None, tolerance_text: str | None, quiet: bool) -> None:
    """Run the check (``zsgd.experiments.validate``); print the table and where it is; raise beyond the tolerance."""
    from zsgd.experiments.validate import ValidationFailed, check_validatable, failure_line, failures, parse_tolerance, table, validate
    from zsgd.output.live import stderr_console
    from zsgd.output.rundir import check_out_dir, create_run_dir

    tolerance = parse_tolerance(tolerance_text)
    check_validatable(spec, arms)  # refuses before anything is written
    if out is not None:
        check_out_dir(out)
    out_dir = create_run_dir(out, f"validate-{cfg.model}")
    log = None if quiet else (lambda msg: stderr_console.print(msg, highlight=False, markup=False, soft_wrap=True))
    command = "zsgd " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "zsgd sim --validate"
    rows = validate(cfg, spec, arms, out_dir, tolerance, log=log, command=command)
    if not quiet:
        stderr_console.print(table(rows, tolerance))
        for note in json.loads((out_dir / "validation.json").read_text())["notes"]:  # the run's own notes too (validation.md's)
            stderr_console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
        stderr_console.print(f"table: {out_dir / 'validation.md'}; curves: {out_dir / 'validate.png'}", highlight=False, markup=False)
    click.echo(str(out_dir))
    if failures(rows, tolerance):
        raise ValidationFailed(failure_line(rows, tolerance))


def refuse_tolerance_alone(validate: bool, tolerance: str | None) -> None:
    if tolerance is not None and not validate:
        raise ZsgdError("--tolerance applies to --validate; add --validate")


def figure_helpers(validate: bool) -> Any:
    """The sweep's two plotting helpers (``zsgd.output.plotter``), forked at the command's start: the parent is
    still small (click only), and matplotlib's import and warm-up (about 0.35 s of CPU) run on the other core
    while this process imports numba, loads the data and the kernels, which use one core. Forked later, once
    the arms run, the warm-up took its share of the cores from two arms (``--jobs 2``). ``--validate`` draws
    its own figures: no helpers."""
    from zsgd.output.plotter import Plotter
    from zsgd.output.sweep_plots import PRELOAD

    return Plotter(0 if validate else 2, preload=PRELOAD)


def _sim_options(func):
    opts = [
        click.option("--workers", default="8", show_default=True, help="Simulated workers, e.g. 64 or 16,64,256." + _LIST),
        click.option("--algo", default="async", show_default=True,
                     help="async, sync, ssp:S, localsgd:K, ksync:K, kasync:K; or decentralized dsgd, dsgt, cadmm (see --topology)." + _LIST),
        click.option("--staleness-lr", type=click.Choice(["off", "scalar", "per-coordinate"]), default="off", is_flag=False, flag_value="scalar",
                     help="Divide each async update's step by its staleness (scalar; the bare flag), or per coordinate (AdaComp)."),
        click.option("--compress", default="none", show_default=True,
                     help="Worker->broker codec: none, topk:FRACTION, adacomp:BIN, qsgd:8|4." + _LIST),
        click.option("--compress-replies", default="none", show_default=True,
                     help="Broker->worker replies as coded weight deltas: none, topk:FRACTION, qsgd:8|4." + _LIST),
        click.option("--servers", default="1", show_default=True,
                     help="Parameter servers, each holding a contiguous range of the model with its own step and NIC "
                          "(as 'zsgd run --servers K')." + _LIST),
        sim_network_options,  # --latency ... --broker-time: zsgd.network.knobs
        click.option("--target", default=None, type=float,
                     help="Accuracy whose virtual time-to-reach is reported (default: --target-acc when given, else 0.75)."),
        click.option("--literal", is_flag=True,
                     help="Take --batch-size and --lr as given, defaults included, in every arm (for sweeps that must change one "
                          "thing at a time). Without it, values left unset follow each arm's workers as in 'zsgd run'."),
        click.option("--arm-plots", is_flag=True, help="Also draw each arm's own curves in its directory."),
        click.option("--out", type=click.Path(file_okay=False), default=None, help="Output directory (default runs/<time>-<name>/)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar or table."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


@click.command("sim")
@training_options_with(model="mlp")
@_sim_options
@arm_options
@calibration_options
@validate_options
@decentralized_options
@click.pass_context
def sim_command(ctx: click.Context, workers: str, servers: str, algo: str, staleness_lr: str, compress: str, compress_replies: str,
                target: float | None, literal: bool, arm_plots: bool, out: str | None, quiet: bool, jobs: int | None, launcher: str,
                calibration_file: str | None, recalibrate: bool, validate: bool, tolerance: str | None, **params) -> None:
    """Simulate distributed SGD in virtual time: real gradients, simulated clock.

    Comma lists form a grid of arms, e.g. 'zsgd sim --latency 0,10,50ms' (a
    delay study of 8 async workers training the mlp for one epoch) or
    zsgd sim --workers 64 --algo async,sync,ssp:4 --latency 0,10,50,200ms --stragglers 0.1:4x
    --steps 2000 --out DIR

    As in 'zsgd run', a --batch-size or --lr left unset follows each arm's
    workers and algorithm (printed, and recorded in each arm's config.yaml);
    --literal keeps them as given.
    """
    from zsgd.runtime.threads import single_threaded_blas

    single_threaded_blas()  # measured compute must be a worker's (one thread), and arms must not fight over cores
    plotter = ctx.with_resource(figure_helpers(validate))  # before anything heavy is loaded; closed when the command ends
    from zsgd.commands.arms import use_calibration
    from zsgd.simulation.sweep import SweepSpec, build_arms

    use_calibration(calibration_file, recalibrate)  # a bad --calibration FILE fails before the data is loaded

    from zsgd.algorithms.scaling import SCALED_FIELDS

    world = pop_network(params)  # {knob: text}: the sweepable ones are axes of the grid, the others one value each
    decentralized = pop_decentralized(params)
    topology = decentralized.pop("topology")
    defaulted: set[str] = set()
    cfg = build_config(ctx, params, default_name=f"sim-{params['model']}", defaulted=defaulted)
    if target is None:  # one target: an arm that stops at --target-acc is reported as reaching it
        target = cfg.target_acc if cfg.target_acc is not None else DEFAULT_TARGET
    from zsgd.network.knobs import knob

    grid = {"algo": algo, "workers": workers, "compress": compress, "compress_replies": compress_replies, "servers": servers}
    spec = SweepSpec(grid=grid | {k: v for k, v in world.items() if knob(k).sweep},
                     **{k: v for k, v in world.items() if not knob(k).sweep}, staleness_lr=staleness_lr, target=target,
                     topology=topology or "ring", decentralized=decentralized,
                     auto_scale=() if literal else tuple(f for f in SCALED_FIELDS if f in defaulted))
    if not 0 < target <= 1:
        raise ZsgdError(f"--target must be in (0, 1], got {target}")
    arms = build_arms(spec)  # every spec checked before data is loaded
    refuse_tolerance_alone(validate, tolerance)
    if validate:  # a short real run beside its simulated twin, instead of the sweep (zsgd.experiments.validate)
        run_validate(cfg, spec, arms, out, tolerance, quiet)
        return
    from zsgd.output.live import stderr_console
    from zsgd.output.rundir import check_out_dir, create_run_dir
    from zsgd.simulation.sweep import prepare_workload, results_table, run_sweep, scaling_line

    if out is not None:
        check_out_dir(out)  # before the data is loaded
    workload = prepare_workload(cfg, arms)  # data, model and shards: may still reject e.g. too many workers
    from zsgd.simulation.sweep import check_sweep_size

    check_sweep_size(cfg, arms, spec, workload, Path(out) if out is not None else Path("runs"))  # before anything is written
    from zsgd.commands.arms import resolve_arm_launch
    from zsgd.simulation.arm_files import require_replayed
    from zsgd.simulation.sweep import arm_config

    require_replayed([(arm_config(cfg, a, spec)[0], a.opts) for a in arms], workload)  # --calibration FILE holds every figure the arms use
    launch = resolve_arm_launch(jobs, launcher, "sim-arm")  # outside an allocation, without srun: refused before anything is written
    out_dir = create_run_dir(out, cfg.name)
    ds, model = workload.problem.dataset, workload.model
    if not quiet:
        stderr_console.print(f"data: [bold]{ds.name}[/] ({ds.source}), {len(ds.y_train):,} train / {len(ds.y_test):,} test; "
                             f"model: [bold]{cfg.model}[/] ({model.n_params:,} parameters); {len(arms)} arm(s), "
                             f"{launch.where} -> {out_dir}")
    if not quiet:
        scaled = scaling_line(cfg, arms, spec)
        if scaled:
            stderr_console.print(scaled, highlight=False, markup=False, soft_wrap=True)  # one line, however wide
    from zsgd.simulation.interrupt import stop_on_signals

    with stop_on_signals(show=not quiet):  # Ctrl-C, SIGTERM: the running arms end with a summary, then exit 130
        outcomes = run_sweep(cfg, spec, out_dir, workload=workload, show=not quiet, arm_plots=arm_plots, jobs=launch.jobs,
                             step_argv=launch.step_argv and (lambda i: launch.step_argv(out_dir, i)), step_capacity=launch.capacity,
                             plotter=plotter)
    if not quiet:
        from zsgd.simulation.calibration import current

        line = current().summary()
        if line:
            stderr_console.print(line, highlight=False, markup=False, soft_wrap=True)
        stderr_console.print(results_table(outcomes, target))
        stderr_console.print(f"results: {out_dir / 'results.md'}, {out_dir / 'results.csv'}; plots in {out_dir}")
    click.echo(str(out_dir))


@click.command("sim-arm", hidden=True)
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.argument("index", type=int)
def sim_arm_command(out_dir: str, index: int) -> None:
    """One arm of a sweep that 'zsgd sim --launcher slurm' planned in OUT_DIR (run as an srun step)."""
    from zsgd.runtime.threads import single_threaded_blas

    single_threaded_blas()
    from zsgd.simulation.interrupt import requested, stop_on_signals
    from zsgd.simulation.sweep import run_planned_arm

    with stop_on_signals(show=False):  # the parent's SIGTERM (through srun) ends the arm with a summary
        click.echo(str(run_planned_arm(Path(out_dir), index)))
        if requested():
            raise KeyboardInterrupt
