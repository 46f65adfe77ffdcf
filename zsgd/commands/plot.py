"""``zsgd plot``: runs, real or simulated, side by side as PNG plots."""

from __future__ import annotations

import click


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=".", show_default=True, help="Where to write the PNGs.")
def plot(run_dirs: tuple[str, ...], out: str) -> None:
    """Draw runs (real or simulated) side by side as PNG plots."""
    from pathlib import Path

    from zsgd.errors import ZsgdError
    from zsgd.output.plots import plot_curves

    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZsgdError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    for path in plot_curves([Path(d) for d in run_dirs], Path(out)):
        click.echo(str(path))
