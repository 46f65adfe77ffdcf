"""PNG figures from run directories.

Every figure is drawn from ``metrics.jsonl`` alone, so a real run and a
simulated arm (same schema) plot side by side, and a run can be re-plotted
long after it ended.
"""

from __future__ import annotations

import math
from array import array
from pathlib import Path
from typing import Any, Sequence

from zsgd.errors import ZsgdError
from zsgd.output.metrics import read_metrics


def _finite(value: Any) -> bool:
    """A number a figure can use (an int of 400 digits is none: it has no float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _series(events: list[dict[str, Any]], kind: str, x: str, y: str) -> tuple[list[float], list[float]]:
    """The points of one curve: events of ``kind`` whose ``x`` and ``y`` are finite numbers (a diverged
    loss is written as null, a hand-edited file may hold anything)."""
    if y == "tokens_per_s":  # derived: tokens between consecutive train events over their time
        train = [e for e in events if e.get("event") == "train" and _finite(e.get(x)) and _finite(e.get("samples")) and _finite(e.get("t"))]
        pairs = [(b[x], (b["samples"] - a["samples"]) / (b["t"] - a["t"])) for a, b in zip(train, train[1:]) if b["t"] > a["t"]]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    xs, ys = [], []
    for e in events:
        if e.get("event") == kind and _finite(e.get(x)) and _finite(e.get(y)):
            xs.append(e[x])
            ys.append(e[y])
    return xs, ys


def fixed_margins(fig: Any, panels: int = 1) -> None:
    """Margins in inches, set once, instead of ``tight_layout``: that measures every label with an
    extra draw of the figure (and makes ``savefig`` draw it once more), two thirds of a run's plotting
    time. The margins fit tick labels of up to about seven characters and one-line axis labels."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.85 / width, right=1 - 0.2 / width, bottom=0.55 / height, top=1 - 0.4 / height,
                        wspace=0.95 * panels / max(width - 1.05, 1.0) if panels > 1 else 0.2)


def _label(run_dir: Path) -> str:
    return run_dir.name


#: The largest metrics.jsonl plotted. Events are streamed and only the numbers a figure needs are kept
#: (about a fifth of the file's size at most), so this bounds memory; a long real run's file
#: (an ``update`` event per applied update, ~110 bytes) reaches it after about 20 million updates.
MAX_METRICS_BYTES = 2 << 30
MAX_WORKER_LINES = 256
CURVE_KEYS = ("event", "t", "updates", "samples", "loss", "test_acc", "test_perplexity")


def _metrics_path(run_dir: Path) -> Path:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ZsgdError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    size = path.stat().st_size
    if size > MAX_METRICS_BYTES:
        raise ZsgdError(f"{path} is {size / 2**30:.1f} GiB, more than the {MAX_METRICS_BYTES >> 30} GiB zsgd plot reads")
    return path


def _load(run_dir: Path, kinds: tuple[str, ...] = ("train", "eval"), keys: tuple[str, ...] = CURVE_KEYS) -> list[dict[str, Any]]:
    """The events of ``kinds``, each cut to ``keys``: what the curves need, not the whole file."""
    return [{k: e[k] for k in keys if k in e} for e in read_metrics(_metrics_path(run_dir)) if e.get("event") in kinds]


def run_dirs_of(path: Path) -> list[Path]:
    """The run directories ``path`` stands for: itself when it holds a metrics.jsonl, else the arm
    directories of a sweep (``zsgd sim``) or an experiment, in their order (what plotting a sweep means)."""
    path = Path(path)
    if (path / "metrics.jsonl").is_file():
        return [path]
    try:
        arms = sorted(d for d in path.iterdir() if d.is_dir() and (d / "metrics.jsonl").is_file())
    except OSError as exc:
        raise ZsgdError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not arms:
        raise ZsgdError(f"{path} is not a run directory (no metrics.jsonl), nor a sweep or experiment directory "
                        f"(no arm directory in it holds one)")
    return arms


def plot_curves(run_dirs: Sequence[Path], out_dir: Path, labels: Sequence[str] | None = None, time_label: str = "time (s)") -> list[Path]:
    """Loss and test accuracy (language models: test perplexity and tokens/s) against time and updates, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(lbl, _load(Path(d))) for lbl, d in zip(labels or [_label(Path(d)) for d in run_dirs], run_dirs)]
    if not any(_series(events, kind, "t", y)[0] for _lbl, events in runs for kind, y in (("train", "loss"), ("eval", "test_acc"))):
        names = ", ".join(str(d) for d in run_dirs)
        raise ZsgdError(f"nothing to plot: the metrics.jsonl of {names} holds no train or eval events with numbers")
    written = []
    panels = [("train", "loss", "train loss"), ("eval", "test_acc", "test accuracy")]
    if any("test_perplexity" in e for _, events in runs for e in events):  # language models
        panels = [("train", "loss", "train loss"), ("eval", "test_perplexity", "test perplexity"),
                  ("train", "tokens_per_s", "tokens/s")]
    for x, xlabel, fname in (("t", time_label, "curves_vs_time.png"), ("updates", "central updates", "curves_vs_updates.png")):
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
        for ax, (kind, y, ylabel) in zip(axes, panels):
            for lbl, events in runs:
                xs, ys = _series(events, kind, x, y)
                if xs:
                    ax.plot(xs, ys, marker="o" if kind == "eval" and len(xs) < 30 else None, label=lbl)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if len(runs) > 1 and ax.get_lines():  # a panel no run has points for gets no (empty) legend
                ax.legend(fontsize=8)
        fixed_margins(fig, len(panels))
        path = Path(out_dir) / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_workers(run_dir: Path, out_dir: Path | None = None, time_label: str = "time (s)") -> list[Path]:
    """Staleness histogram and per-worker throughput of a distributed run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir)
    ts, stales, wks = array("d"), array("d"), array("d")  # 24 bytes an update event, however long the run
    for e in read_metrics(_metrics_path(run_dir)):
        if e.get("event") == "update" and _finite(e.get("t")) and _finite(e.get("staleness", 0)) and _finite(e.get("worker", -1)):
            ts.append(e["t"])
            stales.append(e.get("staleness", 0))
            wks.append(e.get("worker", -1))
    if not ts:
        return []
    written = []
    t_all, wk_all = np.frombuffer(ts), np.frombuffer(wks)
    stale = np.frombuffer(stales)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.arange(stale.max() + 2) - 0.5 if 0 <= stale.min() and stale.max() <= 200 else 100  # bounded, whatever the file says
    ax.hist(stale, bins=bins, color="tab:blue", alpha=0.8)
    ax.set_xlabel("staleness (central updates between fetch and apply)")
    ax.set_ylabel("updates")
    ax.set_title(f"mean {stale.mean():.2f}, p99 {np.percentile(stale, 99):.0f}, max {stale.max():g}")
    ax.grid(alpha=0.3)
    fixed_margins(fig)
    written.append(out_dir / "staleness_hist.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    workers = np.unique(wk_all[wk_all >= 0])
    if len(workers):
        shown = workers[:MAX_WORKER_LINES]  # a line per worker: bounded, whatever the file says
        t0, t1 = t_all.min(), t_all.max()
        bins = np.linspace(t0, t1 if t1 > t0 else t0 + 1.0, 21)
        fig, ax = plt.subplots(figsize=(7, 4))
        for w in shown:
            counts, _ = np.histogram(t_all[wk_all == w], bins=bins)
            ax.plot((bins[:-1] + bins[1:]) / 2, counts / np.diff(bins), label=f"worker {w:g}")
        if len(shown) < len(workers):
            ax.set_title(f"the first {len(shown)} of {len(workers)} workers")
        ax.set_xlabel(time_label)
        ax.set_ylabel("applied updates / s")
        ax.grid(alpha=0.3)
        if len(shown) <= 16:
            ax.legend(fontsize=8, ncol=2)
        fixed_margins(fig)
        written.append(out_dir / "worker_throughput.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def plot_run(run_dir: Path) -> list[Path]:
    """The standard figures of one run, written into its own directory."""
    return plot_curves([Path(run_dir)], Path(run_dir)) + plot_workers(Path(run_dir))
