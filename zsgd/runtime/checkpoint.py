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
    run_dir = Path(run_dir)
    meta_path = run_dir / "checkpoint.json"
    if not (run_dir / "config.yaml").is_file():
        raise ZsgdError(f"{run_dir} is not a zsgd run directory (no config.yaml)")
    if not meta_path.is_file():
        raise ZsgdError(f"{run_dir} has no checkpoint to resume from (checkpoint.json missing)")
    try:
        counters = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ZsgdError(f"cannot read {meta_path}: {exc}") from None
    arrays = load_arrays(run_dir / "checkpoint.npz")
    if "w" not in arrays:
        raise ZsgdError(f"{run_dir / 'checkpoint.npz'} holds no weights")
    opt = {k[4:]: v for k, v in arrays.items() if k.startswith("opt.")}
    return arrays["w"], opt, counters
