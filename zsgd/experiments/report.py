"""An experiment's comparison: results.csv / results.md and the PNG curves.

Everything here is read back from the arms' run directories (``summary.json``
and ``metrics.jsonl``), never from in-memory results, so a report can be
redrawn from an old experiment and an arm run in ``run`` mode is treated
exactly like a simulated one.

Bytes communicated count every message once: for centralized arms the
updates sent to the broker plus the weights sent back (``bytes_sent +
bytes_received``), for decentralized arms every peer message (their
``bytes_total``). Decentralized arms log the cumulative count on each event;
for the others the bytes at an event are interpolated as
``total x updates / final updates``, exact when every update costs the same
(async, ssp, sync rounds after the first).
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any, Sequence

from zsgd.errors import ZsgdError
from zsgd.output.live import row_cells
from zsgd.output.metrics import read_metrics

COLUMNS = [("arm", "arm"), ("mode", "mode"), ("algo", "algo"), ("workers", "workers"), ("final_acc", "final accuracy"),
           ("time_to_target_s", "time to target (s)"), ("updates", "updates"), ("time_s", "time (s)"),
           ("bytes_total", "bytes communicated"), ("consensus_error", "consensus error"), ("stop_reason", "stopped because")]


def total_bytes(summary: dict[str, Any]) -> int:
    if summary.get("bytes_total") is not None:
        return int(summary["bytes_total"])
    return int(summary.get("bytes_sent") or 0) + int(summary.get("bytes_received") or 0)


def arm_row(name: str, settings: dict[str, Any], run_dir: Path, target: float) -> dict[str, Any]:
    """One row of the table from an arm's directory."""
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError) as exc:
        raise ZsgdError(f"{run_dir}: no readable summary.json ({exc})") from None
    evals = [e for e in read_metrics(run_dir / "metrics.jsonl") if e.get("event") == "eval" and e.get("test_acc") is not None]
    ttt = next((e["t"] for e in evals if e["test_acc"] >= target), None)
    return {
        "arm": name, "mode": settings.get("mode", "sim"), "algo": settings.get("algo", "async"), "workers": settings.get("workers"),
        "topology": settings.get("topology", ""), "compress": settings.get("compress", "none"),
        "final_acc": summary.get("test_accuracy"), "test_loss": summary.get("test_loss"), "time_to_target_s": ttt,
        **({"test_ppl": summary["test_perplexity"]} if "test_perplexity" in summary else {}),
        "updates": summary.get("updates"), "samples": summary.get("samples"), "time_s": summary.get("wall_s"),
        "bytes_total": total_bytes(summary), "consensus_error": summary.get("consensus_error"),
        "stop_reason": summary.get("stop_reason"), "diverged": bool(summary.get("diverged")), "real_s": summary.get("real_s", summary.get("wall_s")), "dir": run_dir.name,
    }


def write_results(rows: list[dict[str, Any]], out_dir: Path, title: str, target: float, command: str = "") -> tuple[Path, Path]:
    """results.csv (every column, raw numbers) and results.md (the readable table)."""
    out_dir = Path(out_dir)
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r.get(k) for k in keys})
    columns = COLUMNS + ([("test_ppl", "test perplexity")] if any("test_ppl" in r for r in rows) else [])
    lines = [f"# {title}", ""]
    if command:
        lines += [f"`{command}`", ""]
    lines += [f"Target accuracy {target:.0%}. Time is virtual seconds for `sim` arms and wall seconds for `run` arms. "
              "An update is one central model update (async/ssp: one worker's gradient; sync/localsgd: one round) or one "
              "round of all nodes (dsgd/dsgt/cadmm). Bytes count every message once. Consensus error: mean distance of the "
              "nodes' models from their average (decentralized arms, whose accuracy is that of the average).", "",
              "| " + " | ".join(h for _k, h in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row_cells(r, columns)) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


#: The terminal table: the columns that decide a comparison, with short heads (the .md has them all).
SHORT_COLUMNS = [("arm", "arm"), ("final_acc", "acc"), ("time_to_target_s", "t→target s"), ("updates", "updates"),
                 ("time_s", "time s"), ("bytes_total", "bytes"), ("consensus_error", "consensus")]


def results_table(rows: list[dict[str, Any]], title: str) -> Any:
    """The terminal table: arm names whole, the other columns as the width allows (see ``ResultsTable``)."""
    from zsgd.output.live import ResultsTable

    return ResultsTable(title, [h for _k, h in SHORT_COLUMNS], [row_cells(r, SHORT_COLUMNS) for r in rows])


def _bytes_series(events: list[dict[str, Any]], kind: str, y: str, total: int, final_updates: int) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for e in events:
        if e.get("event") != kind or e.get(y) is None:
            continue
        if e.get("bytes_total") is not None:
            b = float(e["bytes_total"])
        elif final_updates and e.get("updates") is not None:
            b = total * e["updates"] / final_updates
        else:
            continue
        xs.append(b / 1e6)
        ys.append(e[y])
    return xs, ys


def plot_vs_bytes(run_dirs: Sequence[Path], labels: Sequence[str], out_dir: Path) -> Path:
    """curves_vs_bytes.png: train loss and test accuracy against megabytes communicated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for d, label in zip(run_dirs, labels):
        d = Path(d)
        summary = json.loads((d / "summary.json").read_text())
        events = list(read_metrics(d / "metrics.jsonl"))
        total, final = total_bytes(summary), int(summary.get("updates") or 0)
        for ax, (kind, y) in zip(axes, (("train", "loss"), ("eval", "test_acc"))):
            xs, ys = _bytes_series(events, kind, y, total, final)
            if xs:
                ax.plot(xs, ys, marker="o" if kind == "eval" and len(xs) < 30 else None, ms=3, label=label)
    for ax, ylabel in zip(axes, ("train loss", "test accuracy")):
        ax.set(xlabel="MB communicated (all links)", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(run_dirs) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / "curves_vs_bytes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_experiment(run_dirs: Sequence[Path], labels: Sequence[str], out_dir: Path) -> list[Path]:
    """curves_vs_time.png, curves_vs_updates.png (``zsgd.output.plots``) and curves_vs_bytes.png."""
    from zsgd.output.plots import plot_curves

    with warnings.catch_warnings():  # short arms may have no train events: an empty legend is fine
        warnings.simplefilter("ignore", UserWarning)
        written = plot_curves(list(run_dirs), Path(out_dir), labels=list(labels), time_label="time (s; virtual for sim arms)")
        written.append(plot_vs_bytes(run_dirs, labels, out_dir))
    return written
