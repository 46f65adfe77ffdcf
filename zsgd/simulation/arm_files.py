"""A sweep's arms as files, so an arm can run in another process or on another node.

``zsgd sim --launcher slurm`` runs each arm as an ``srun`` step of
``zsgd sim-arm DIR INDEX`` (``zsgd.simulation.sweep.run_planned_arm``). That process has none of the parent's memory, so
the parent writes ``DIR/plan.json`` (the resolved configuration, the grid as
typed, the compute calibration) and the step rebuilds exactly the arms the
parent built; the step writes its result (staleness and evaluations, beside
the run directory's usual ``summary.json``) to ``NN-arm/result.npz``, and
the parent reads it back into the same table and plots.

Why the calibration travels in the plan: the measured figures are the parent's
for the whole sweep (``calibrate_once``, ``zsgd.simulation.calibration``); a step
timing its own node would let one busy node masquerade as an effect of the grid.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from zsgd.errors import ZsgdError

PLAN = "plan.json"
RESULT = "result.npz"


def calibrate_once(workload: Any, options: Iterable[Any]) -> None:
    """Get every measured figure the arms ``options`` use now, in this process (from the calibration cache, or
    measured: then before any fork, as arms timing at once would share the cores), so every arm shares them; then
    take one gradient step, so the kernels are compiled (or loaded from numba's cache) once, here, and forked
    arms inherit them instead of each compiling its own."""
    for o in options:
        workload.calibration_record(o)
    workload.gradient_step()(0)


def require_replayed(arms: list[tuple[Any, Any]], workload: Any) -> None:
    """With ``--calibration FILE``: every figure the arms use is in FILE (one line naming the first missing one),
    checked before anything is written; a replay measures nothing, so this costs a few look-ups. ``arms``: each
    arm's configuration (``sweep.arm_config``) and its options."""
    if workload.calibration.mode != "replay":
        return
    from zsgd.simulation.workload import Workload

    workloads = {workload.cfg.batch_size: workload}
    for arm_cfg, arm_opts in arms:
        if arm_cfg.batch_size not in workloads:
            workloads[arm_cfg.batch_size] = Workload(arm_cfg, workload.problem, workload.calibration)
        workloads[arm_cfg.batch_size].calibration_record(arm_opts)


def calibrations(workloads: dict[int, Any]) -> dict[str, Any]:
    """The measured figures every workload used (batch size -> Workload), for a plan file: a step started elsewhere
    (an srun step) simulates its arm with the parent's figures (``restore_calibration``) instead of measuring its
    own on a machine that may differ."""
    merged: dict[str, Any] = {}
    for wl in workloads.values():
        for kind, value in wl.calibration.record().items():
            if isinstance(value, dict) and kind != "machine":
                merged.setdefault(kind, {}).update(value)
            else:
                merged.setdefault(kind, value)
    return {"calibration": merged}


def save_plan(out_dir: Path, cfg: Any, spec: Any, workloads: dict[int, Any], arm_plots: bool) -> Path:
    """``workloads``: batch size -> Workload (arms of one batch size share one calibration)."""
    path = Path(out_dir) / PLAN
    path.write_text(json.dumps({"config": cfg.to_dict(), "spec": asdict(spec), **calibrations(workloads), "arm_plots": arm_plots}, indent=1))
    return path


def restore_calibration(workload: Any, plan: dict[str, Any], batch_size: int | None = None) -> None:
    """Give a step's workload the parent's figures (compute, server step, transport), so it simulates the arm the
    parent would have (``batch_size``: kept for callers; the figures are keyed by it already)."""
    from zsgd.simulation.calibration import Calibration

    record = plan.get("calibration")
    if not isinstance(record, dict):
        raise ZsgdError("the sweep's plan holds no calibration; run the sweep again with this version of zsgd")
    workload.calibration = Calibration("replay", record, source="the sweep's plan.json")
    workload.compute_samples, workload.transport = None, None


def load_plan(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / PLAN
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ZsgdError(f"{path}: not a sweep plan written by 'zsgd sim' ({exc})") from None


def save_result(run_dir: Path, result: Any) -> None:
    """The parts of a ``SimResult`` the sweep's table and plots need, beside the arm's summary.json."""
    evals = np.asarray(result.evals, dtype=np.float64).reshape(-1, 3)
    np.savez(Path(run_dir) / RESULT, staleness=np.asarray(result.staleness, dtype=np.int64), evals=evals)


def load_result(run_dir: Path) -> Any:
    """A ``SimResult`` from an arm's directory (the final weights stay in its ``weights.npz``)."""
    from zsgd.simulation.simulator import SimResult

    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        with np.load(Path(run_dir) / RESULT) as f:
            staleness, evals = f["staleness"], f["evals"]
    except (OSError, ValueError, KeyError) as exc:
        raise ZsgdError(f"{run_dir}: the arm's step left no result ({exc}); see its step.log") from None
    return SimResult(summary, staleness, [(float(t), int(u), float(a)) for t, u, a in evals], np.empty(0, np.float32))
