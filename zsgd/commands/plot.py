"""``zsgd plot``: runs, real or simulated, side by side as PNG plots."""

from __future__ import annotations

import click


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=".", show_default=True, help="Where to write the PNGs.")
@click.option("--against", "against", metavar="KEY", default=None,
              help="One experiment directory: its final accuracy and time against the arm setting KEY "
                   "(workers, bandwidth, latency, ...), one line per group of arms that agree on the rest (against_KEY.png).")
def plot(run_dirs: tuple[str, ...], out: str, against: str | None) -> None:
    """Draw runs (real or simulated) side by side as PNG plots; one run also gets its staleness and per-worker figures.

    A sweep ('zsgd sim') or experiment directory stands for all its arms.
    """
    from pathlib import Path

    from zsgd.errors import ZsgdError
    from zsgd.output.plots import plot_curves, run_dirs_of

    if against is not None:
        from zsgd.experiments.against import plot_against

        if len(run_dirs) != 1:
            raise ZsgdError(f"--against takes one experiment directory, got {len(run_dirs)}")
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ZsgdError(f"cannot create --out {out}: {exc.strerror or exc}") from None
        click.echo(str(plot_against(Path(run_dirs[0]), against, Path(out))))
        return
    runs = [(Path(d), arm) for d in run_dirs for arm in run_dirs_of(Path(d))]
    labels = [arm.name if arm == top or len(run_dirs) == 1 else f"{top.name}/{arm.name}" for top, arm in runs]
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZsgdError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    written = plot_curves([arm for _top, arm in runs], Path(out), labels=labels)
    if len(runs) == 1:  # one run: also its workers' figures, the set 'zsgd run' draws (--no-plots skips it)
        from zsgd.output.plots import plot_workers

        written += plot_workers(runs[0][1], Path(out))
    for path in written:
        click.echo(str(path))
