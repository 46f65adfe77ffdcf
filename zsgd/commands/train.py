"""``zsgd train``: one process, the baseline every distributed run is compared with."""

from __future__ import annotations

import click

from zsgd.commands.options import build_config, training_options
from zsgd.errors import RunDiverged


@click.command()
@training_options
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory (default runs/<time>-<name>/).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def train(ctx: click.Context, out: str | None, quiet: bool, **params) -> None:
    """Train in one process: the baseline every distributed run is compared with."""
    cfg = build_config(ctx, params, default_name=f"train-{params['model']}")
    from zsgd.output.rundir import check_out_dir

    if out is not None:
        check_out_dir(out)  # before the data is loaded
    from zsgd.output.live import stderr_console, summary_table
    from zsgd.core.problem import Problem
    from zsgd.runtime.trainer import train as run_training

    problem = Problem.from_config(cfg)
    problem.check_fits(cfg)
    stderr_console.print(f"data: [bold]{problem.dataset.name}[/] ({problem.dataset.source}), "
                         f"{len(problem.dataset.y_train):,} train / {len(problem.dataset.y_test):,} test; "
                         f"model: [bold]{cfg.model}[/] ({problem.model.n_params:,} parameters)")
    summary = run_training(cfg, out=out, show_progress=not quiet, problem=problem)
    keys = ("test_accuracy", "test_loss", "test_perplexity", "train_loss", "updates", "samples", "epochs", "wall_s", "samples_per_s",
            "tokens_per_s", "stop_reason", "run_dir")
    stderr_console.print(summary_table("summary", {k: summary[k] for k in keys if k in summary}))
    if summary["diverged"]:
        raise RunDiverged(f"training {summary['stop_reason']}; the summary is in {summary['run_dir']}")
