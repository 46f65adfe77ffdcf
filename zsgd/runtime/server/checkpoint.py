"""Checkpoints: enough to continue a run after the broker dies.

One ``checkpoint.npz`` (central weights, optimizer state) and one
``checkpoint.json`` (counters), each replaced atomically, the JSON last: a
reader who finds the JSON finds the weights it describes. Losing the broker
costs at most the checkpoint interval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from zsgd.errors import ZsgdError
from zsgd.output.rundir import load_arrays, save_arrays, write_json


def save_checkpoint(run_dir: Path, w: np.ndarray, optimizer_state: dict[str, np.ndarray], counters: dict[str, Any]) -> None:
    arrays = {"w": w} | {f"opt.{k}": np.asarray(v) for k, v in optimizer_state.items()}
    save_arrays(Path(run_dir) / "checkpoint.npz", arrays)
    write_json(Path(run_dir) / "checkpoint.json", counters)


def load_checkpoint(run_dir: Path) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """(weights, optimizer state, counters) of RUN_DIR's last checkpoint, each checked; ZsgdError names what is wrong."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ZsgdError(f"{run_dir} is not a zsgd run directory (no config.yaml)")
    counters = load_counters(run_dir)
    arrays = load_arrays(run_dir / "checkpoint.npz")
    w = arrays.get("w")
    if w is None or w.ndim != 1 or w.dtype != np.float32 or not np.isfinite(w).all():
        raise ZsgdError(f"{run_dir / 'checkpoint.npz'} holds no usable weights (a finite float32 vector expected)")
    opt = {k[4:]: v for k, v in arrays.items() if k.startswith("opt.")}
    return w, opt, counters


def load_counters(run_dir: Path) -> dict[str, Any]:
    """The counters of RUN_DIR's checkpoint (``checkpoint.json``), checked: updates, samples, elapsed."""
    meta_path = Path(run_dir) / "checkpoint.json"
    if not meta_path.is_file():
        raise ZsgdError(f"{run_dir} has no checkpoint to resume from (checkpoint.json missing)")
    try:
        counters = json.loads(meta_path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise ZsgdError(f"cannot read {meta_path}: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(counters, dict):
        raise ZsgdError(f"{meta_path}: expected a JSON object of counters")
    for key in ("updates", "samples"):
        value = counters.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ZsgdError(f"{meta_path}: {key!r} must be a whole number >= 0, got {str(value)[:40]}")
    elapsed = counters.get("elapsed", 0.0)
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not 0 <= elapsed < float("inf"):
        raise ZsgdError(f"{meta_path}: 'elapsed' must be a number of seconds >= 0, got {str(elapsed)[:40]}")
    return counters
