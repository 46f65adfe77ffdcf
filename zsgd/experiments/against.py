"""An experiment's outcome against one arm setting: ``zsgd plot EXPERIMENT --against KEY``.

Accuracy against the number of learners (Zhang et al. 2016: ``--against workers``), time against the
bandwidth (Lian et al. 2017: ``--against bandwidth``): the figure a sweep over one setting is read from.

* **x**: one position per value of KEY, in the order the experiment's arms first give it (so the file says
  which way the axis runs: ``inf, 10Gbps, 1Gbps`` reads as a network that slows down).
* **Series**: the arms that agree on every other setting are one line. A setting that follows KEY (the
  same value wherever KEY has the same value, and more than one value in all: ``broker_bandwidth`` set
  with ``bandwidth``) is part of the x value, not a series of its own; a setting an arm lacks counts as
  its own value (``staleness_lr: scalar`` on some async arms and not on others makes two lines).
* **Panels**: the final test accuracy (from 50 %, or lower to show the lowest point, to 100 %; a diverged arm is an ``x`` at the accuracy it was evaluated at)
  and the time the arm ran (virtual seconds for ``sim`` arms, log scale; a diverged arm has none).

Everything is read back from the arms' ``arm.json`` and ``summary.json``, as ``report.py`` reads them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from zsgd.errors import ZsgdError

IGNORED = ("name",)


def load_arms(exp_dir: Path) -> list[dict[str, Any]]:
    """Each arm's settings and summary, in the experiment's order; a one-line error for anything else."""
    exp_dir = Path(exp_dir)
    try:
        dirs = sorted(d for d in exp_dir.iterdir() if d.is_dir() and (d / "arm.json").is_file())
    except OSError as exc:
        raise ZsgdError(f"cannot read {exp_dir}: {exc.strerror or exc}") from None
    if not dirs:
        raise ZsgdError(f"--against needs an experiment directory ('zsgd experiment'); {exp_dir} has no arm with an arm.json")
    arms = []
    for d in dirs:
        try:
            arm = json.loads((d / "arm.json").read_text())
            summary = json.loads((d / "summary.json").read_text())
        except (OSError, ValueError) as exc:
            raise ZsgdError(f"{d}: no readable arm.json and summary.json ({exc})") from None
        if not isinstance(arm, dict) or not isinstance(arm.get("settings"), dict) or not isinstance(summary, dict):
            raise ZsgdError(f"{d}: arm.json or summary.json is not an arm's record")
        arms.append({"name": str(arm.get("name", d.name)), "settings": arm["settings"], "summary": summary})
    return arms


def _value(settings: dict[str, Any], key: str) -> str | None:
    v = settings.get(key)
    return None if v is None else str(v)


def series_keys(arms: list[dict[str, Any]], key: str) -> list[str]:
    """The settings other than ``key`` that tell the lines apart (see the module's docstring)."""
    keys = sorted({k for a in arms for k in a["settings"]} - {key, *IGNORED})
    out = []
    for k in keys:
        values = {_value(a["settings"], k) for a in arms}
        if len(values) < 2:
            continue
        having = [a for a in arms if k in a["settings"]]
        by_x: dict[str | None, set[str | None]] = {}
        for a in having:
            by_x.setdefault(_value(a["settings"], key), set()).add(_value(a["settings"], k))
        follows = all(len(v) == 1 for v in by_x.values()) and len({_value(a["settings"], k) for a in having}) > 1
        if not follows:
            out.append(k)
    return out


def table(arms: list[dict[str, Any]], key: str) -> tuple[list[str], dict[str, list[tuple[str, dict[str, Any]]]]]:
    """The x values in order and, per series label, its (x value, summary) points."""
    missing = [a["name"] for a in arms if key not in a["settings"]]
    if missing:
        known = sorted({k for a in arms for k in a["settings"]} - set(IGNORED))
        raise ZsgdError(f"--against {key}: arm {missing[0]!r} has no setting {key!r} (the arms set: {', '.join(known)})")
    xs = list(dict.fromkeys(_value(a["settings"], key) or "" for a in arms))
    if len(xs) < 2:
        raise ZsgdError(f"--against {key}: every arm has {key} = {xs[0]}; nothing to plot against")
    skeys = series_keys(arms, key)
    lines: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for a in arms:
        parts = []
        for k in skeys:
            v = _value(a["settings"], k)
            if v is not None:
                parts.append(v if k == "algo" else f"{k}={v}")
        label = ", ".join(parts) or "arms"
        lines.setdefault(label, []).append((_value(a["settings"], key) or "", a["summary"]))
    return xs, lines


def plot_against(exp_dir: Path, key: str, out_dir: Path) -> Path:
    """``against_KEY.png`` in ``out_dir``: final accuracy and time, one line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from zsgd.output.plots import _finite

    key = key.replace("-", "_")
    xs, lines = table(load_arms(exp_dir), key)
    pos = {x: i for i, x in enumerate(xs)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for n, (label, points) in enumerate(lines.items()):
        color = f"C{n % 10}"
        acc = [(pos[x], s.get("test_accuracy"), bool(s.get("diverged"))) for x, s in points if _finite(s.get("test_accuracy"))]
        if acc:
            axes[0].plot([p for p, _a, _d in acc], [a for _p, a, _d in acc], color=color, marker="o", label=label)
            bad = [(p, a) for p, a, d in acc if d]
            if bad:
                axes[0].plot([p for p, _a in bad], [a for _p, a in bad], "x", color="k", ms=9)
        t = [(pos[x], s.get("wall_s")) for x, s in points if _finite(s.get("wall_s")) and not s.get("diverged") and s["wall_s"] > 0]
        if t:
            axes[1].plot([p for p, _t in t], [v for _p, v in t], color=color, marker="o", label=label)
    for ax, ylabel in zip(axes, ("final test accuracy", "time (s; virtual for sim arms)")):
        ax.set_xticks(range(len(xs)), xs)
        ax.set_xlabel(key)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    accs = [s["test_accuracy"] for pts in lines.values() for _x, s in pts if _finite(s.get("test_accuracy"))]
    if accs:  # from 50 % (or lower, to the lowest point) to 100 %: a 2-point gap is not drawn as a chasm
        axes[0].set_ylim(min(0.5, math.floor(min(accs) * 10) / 10), 1.0)
    if axes[1].get_lines():
        axes[1].set_yscale("log")
    if any(s.get("diverged") for pts in lines.values() for _x, s in pts):
        axes[0].set_title("x: diverged (accuracy as last evaluated)", fontsize=9)
    fig.tight_layout()
    path = Path(out_dir) / f"against_{key}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
