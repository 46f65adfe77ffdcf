"""A sweep's arms as files, so an arm can run in another process or on another node.

``zsgd sim --launcher slurm`` runs each arm as an ``srun`` step of
``zsgd sim-arm DIR INDEX`` (``zsgd.simulation.sweep.run_planned_arm``). That process has none of the parent's memory, so
the parent writes ``DIR/plan.json`` (the resolved configuration, the grid as
typed, the compute calibration) and the step rebuilds exactly the arms the
parent built; the step writes its result (staleness and evaluations, beside
the run directory's usual ``summary.json``) to ``NN-arm/result.npz``, and
the parent reads it back into the same table and plots.

Why the calibration travels in the plan: compute=measured is timed once for
the whole sweep (``calibrate_once``); a step timing its own node would let
one busy node masquerade as an effect of the grid.
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
    """Time compute=measured now, in this process, if any arm uses it (every arm then shares the number);
    else take one gradient step, so the kernels are compiled (or loaded from numba's cache) once, here,
    and forked arms inherit them instead of each compiling its own."""
    from zsgd.simulation.netmodel import Measured

    options = list(options)
    for o in options:  # broker-time=measured: timed once per (algorithm, codecs), cached on the workload
        if isinstance(getattr(o, "broker_s", None), Measured):
            workload.broker_model(o)
    for o in options:  # broker-bandwidth=measured: one echo, before any fork (arms timing it at once would share the cores)
        if isinstance(getattr(o, "broker_bandwidth", None), Measured):
            workload.transport_model(o)
            break
    steps = [o.calibration_steps for o in options if isinstance(getattr(o, "compute", None), Measured)]
    if steps:
        workload.calibrate(steps[0])
        return
    workload.gradient_step()(0)


def calibrations(workloads: dict[int, Any]) -> dict[str, Any]:
    """What every batch size's workload measured (compute, server step, transport; batch size -> Workload), for a
    plan file: a step started elsewhere (an srun step, a pool worker) simulates its arm with the parent's timings
    (``restore_calibration``) instead of measuring its own on a machine that may differ."""
    return {"compute_samples": {str(bs): wl.compute_samples for bs, wl in workloads.items()},
            "server_step_samples": {str(bs): [[list(k), v] for k, v in wl.server_step_samples.items()] for bs, wl in workloads.items()},
            "transport": {str(bs): asdict(wl.transport) if wl.transport is not None else None for bs, wl in workloads.items()}}


def save_plan(out_dir: Path, cfg: Any, spec: Any, workloads: dict[int, Any], arm_plots: bool) -> Path:
    """``workloads``: batch size -> Workload (arms of one batch size share one calibration)."""
    path = Path(out_dir) / PLAN
    path.write_text(json.dumps({"config": cfg.to_dict(), "spec": asdict(spec), **calibrations(workloads), "arm_plots": arm_plots}, indent=1))
    return path


def restore_calibration(workload: Any, plan: dict[str, Any], batch_size: int) -> None:
    """Give a step's workload the parent's timings (compute, broker step, transport), so it simulates the arm the parent would have."""
    workload.compute_samples = plan["compute_samples"].get(str(batch_size))
    workload.server_step_samples = {tuple(k): v for k, v in plan.get("server_step_samples", {}).get(str(batch_size), [])}
    measured = plan.get("transport", {}).get(str(batch_size))
    if measured is not None:
        from zsgd.simulation.transport import Transport

        workload.transport = Transport(**measured)


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
    from zsgd.sim import SimResult

    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        with np.load(Path(run_dir) / RESULT) as f:
            staleness, evals = f["staleness"], f["evals"]
    except (OSError, ValueError, KeyError) as exc:
        raise ZsgdError(f"{run_dir}: the arm's step left no result ({exc}); see its step.log") from None
    return SimResult(summary, staleness, [(float(t), int(u), float(a)) for t, u, a in evals], np.empty(0, np.float32))
