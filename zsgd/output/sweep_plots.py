"""A sweep's own figures (accuracy against virtual time, time to target, staleness), from plain numbers.

They live here, below the simulator, and take what they draw as plain values (``ArmFigure``), so that a
plotting helper forked at the very start of ``zsgd sim`` (``zsgd.output.plotter``), before the parent
imports numba, the simulator and the data, can draw them without importing any of those: unpickling
a job that named the simulator's objects would import them in the helper, after the arms ended, on
the command's critical path.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

#: What a plotting helper imports while it waits (``Plotter(preload=)``), so unpickling a sweep's jobs imports nothing.
#: This module imports numpy only inside its functions: ``zsgd sim`` reads this before it forks the helpers.
PRELOAD = ("zsgd.output.plots", "zsgd.output.sweep_plots")


@dataclass
class ArmFigure:
    """What the sweep's figures show of one arm."""

    label: str  # the arm's name (its legend entry and its tick on the staleness plot)
    group: str  # the line it belongs to on the time-to-target plot: the arm's varying values other than latency
    latency_ms: float  # mean one-way latency, the time-to-target plot's x
    time_to_target_s: float | None  # None: the target was not reached
    evals: list[tuple[float, int, float]]  # (virtual t, updates, test accuracy) of each evaluation
    staleness: Any  # numpy array: the staleness of every applied update


def curves_quietly(run_dirs: Sequence[Path], out_dir: Path, labels: Sequence[str]) -> list[Path]:
    """``plot_curves`` of every arm in one pair of figures; short arms may have no train events, and an empty
    legend is fine, so matplotlib's warning about it is not shown."""
    from zsgd.output.plots import plot_curves

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return plot_curves(list(run_dirs), out_dir, labels=list(labels), time_label="virtual time (s)")


def sweep_figures(arms: Sequence[ArmFigure], out_dir: Path, target: float) -> list[Path]:
    """accuracy_vs_time.png, time_to_target.png and staleness.png in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir = Path(out_dir)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for a in arms:
        ev = a.evals
        ax.plot([e[0] for e in ev], [e[2] for e in ev], marker="o" if len(ev) < 30 else None, ms=3, label=a.label)
    ax.axhline(target, color="grey", ls="--", lw=0.8)
    log = log_time_axis([a.evals for a in arms])
    if log:
        ax.set_xscale("log")
    ax.set(xlabel="virtual time (s, log scale)" if log else "virtual time (s)", ylabel="test accuracy", title="test accuracy vs virtual time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    written.append(_save(fig, out_dir / "accuracy_vs_time.png", tight=False))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[tuple[float, float]]] = {}
    for a in arms:
        groups.setdefault(a.group, []).append((a.latency_ms, math.nan if a.time_to_target_s is None else a.time_to_target_s))
    for name, pts in groups.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if all(math.isnan(p[1]) for pts in groups.values() for p in pts):
        ax.text(0.5, 0.5, f"no arm reached {target:.0%}", transform=ax.transAxes, ha="center")
    ax.set(xlabel="mean one-way latency (ms)", ylabel=f"virtual time to {target:.0%} accuracy (s)",
           title="time to target vs latency (missing points: not reached)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    written.append(_save(fig, out_dir / "time_to_target.png", tight=False))

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(arms) + 2), 4.5))
    data = [a.staleness if len(a.staleness) else np.zeros(1) for a in arms]
    ax.boxplot(data, whis=(1, 99), showfliers=False)
    ax.plot(range(1, len(data) + 1), [d.mean() for d in data], "D", color="C3", ms=4, label="mean")
    ax.set_xticks(range(1, len(data) + 1), [a.label for a in arms], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="staleness (central updates)", title="staleness per arm (box: p25-p75, whiskers: p1-p99)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    written.append(_save(fig, out_dir / "staleness.png"))
    return written


def log_time_axis(evals: Sequence[Sequence[tuple[float, int, float]]]) -> bool:
    """Whether arms' lengths span more than 20x (latency 0 against 50 ms does, 100x):
    on a linear axis the fast arms' curves would be squeezed into the first pixels."""
    ends = [ev[-1][0] for ev in evals if len(ev)]
    firsts = [ev[0][0] for ev in evals if len(ev)]
    return bool(ends) and min(firsts) > 0 and max(ends) > 20 * min(ends)


def _save(fig: Any, path: Path, tight: bool = True) -> Path:
    """``tight``: fit the margins to the labels (one more draw; for the staleness plot's slanted arm names),
    else the fixed margins of ``zsgd.output.plots.fixed_margins``."""
    import matplotlib.pyplot as plt

    from zsgd.output.plots import fixed_margins

    if tight:
        fig.tight_layout()
    else:
        fixed_margins(fig)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
