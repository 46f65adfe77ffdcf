"""``zsgd experiment FILE.yaml``: run every arm of a comparison, then tabulate and plot.

Why a runner of its own rather than a ``zsgd sim`` grid: an experiment
compares *different* algorithms, each with its own hyper-parameters (a
dsgd arm's topology and step schedule, a cadmm arm's rho, an ssp bound),
some simulated and some on real processes, which a cross product of flags
cannot say. What it shares with the grid is the discipline that makes the
comparison fair: one data set, one model, **identical initial weights and
identical shards** in every arm (one ``Workload``: ``model.init(seed)`` and
``make_shards(labels, split, seed, n)``), recorded per arm in ``arm.json``
as SHA-256 hashes so it can be checked after the fact.

Each arm runs through the function its mode already has, nothing is
re-implemented here:

- centralized ``sim`` arms: ``zsgd.sim.run_arm`` with the ``SimOptions``
  that ``zsgd.simulation.sweep.build_arms`` parses (so specs mean what they mean in ``zsgd sim``);
- decentralized ``sim`` arms: ``zsgd.simulation.decentralized.run_decentralized_arm``;
- ``run`` arms: ``zsgd.runtime.runner.run_distributed`` (real worker processes).

Outputs (``--out``, default ``runs/<time>-<name>/``): ``experiment.yaml``
(the file as given), ``NN-<arm>/`` per arm (the runtime's run directory
layout plus ``arm.json``), ``results.md`` / ``results.csv`` and
``curves_vs_time.png``, ``curves_vs_updates.png``, ``curves_vs_bytes.png``.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from zsgd.errors import ZsgdError
from zsgd.experiments.config import ArmSpec, ExperimentSpec
from zsgd.output.rundir import write_json

Log = Callable[[str], None]


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def identity(workload: Any, n_workers: int) -> dict[str, Any]:
    """What must be equal across arms: hashes of the initial weights and of each worker's shard indices."""
    from zsgd.data import make_shards

    cfg = workload.cfg
    shards = make_shards(workload.problem.dataset.y_train, cfg.split, cfg.seed, n_workers)
    return {"seed": cfg.seed, "split": str(cfg.split), "n_workers": n_workers, "w0_sha256": _sha(workload.w0),
            "shards_sha256": [_sha(s) for s in shards], "shard_sizes": [len(s) for s in shards]}


class Experiment:
    """Loads data once, checks every arm can be served, runs arms in order."""

    def __init__(self, spec: ExperimentSpec, out_dir: Path | None, only: Sequence[str] = (), log: Log | None = None) -> None:
        names = [a.name for a in spec.arms]
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ZsgdError(f"--only: no arm named {unknown[0]!r} in {spec.path} (arms: {', '.join(names)})")
        self.spec = spec
        self.arms = [a for a in spec.arms if not only or a.name in only]
        self.out = out_dir  # created after prepare(): a file that cannot run leaves nothing behind
        self.out_dir = Path(".")
        self.log = log or (lambda _msg: None)
        self._workloads: dict[int, Any] = {}
        self.problem: Any = None

    def prepare(self) -> None:
        """Data, model and every arm's shards, so an arm that cannot run fails before the first one starts."""
        from zsgd.core.problem import Problem

        self.problem = Problem.from_config(self.spec.cfg)  # resolves data "default" to a concrete set
        for arm in self.arms:
            arm.cfg.data = self.spec.cfg.data
            try:
                self.workload(arm).shards(self._n(arm))
            except ZsgdError as exc:
                raise ZsgdError(f"{self.spec.path}:{arm.line}: arm {arm.name!r}: {exc}") from None

    @staticmethod
    def _n(arm: ArmSpec) -> int:
        return int(arm.settings["workers"])

    def workload(self, arm: ArmSpec) -> Any:
        """One Workload per batch size (the message sizes and compute calibration depend on it);
        the weights and shards are the same in all of them (same model, seed and split)."""
        from zsgd.sim import Workload

        bs = arm.cfg.batch_size
        if bs not in self._workloads:
            self._workloads[bs] = Workload(arm.cfg, self.problem)
        return self._workloads[bs]

    def run_arm(self, arm: ArmSpec) -> Path:
        run_dir = self.out_dir / arm.dirname
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a re-run into the same --out starts clean
        wl = self.workload(arm)
        write_json(run_dir / "arm.json", {"name": arm.name, "mode": arm.mode, "algo": arm.algo,
                                          "settings": {k: _plain(v) for k, v in arm.settings.items()},
                                          "config": arm.cfg.to_dict(), **identity(wl, self._n(arm))})
        if arm.mode == "run":
            from zsgd.runtime.runner import run_distributed

            run_distributed(arm.cfg, arm.opts, out=run_dir)
        elif arm.decentralized:
            from zsgd.simulation.decentralized import run_decentralized_arm

            run_decentralized_arm(arm.cfg, arm.opts, wl, run_dir)
        else:
            from zsgd.sim import run_arm

            run_arm(arm.cfg, arm.opts, wl, run_dir)
        return run_dir

    def run(self, command: str = "") -> list[dict[str, Any]]:
        from zsgd.experiments.report import arm_row, plot_experiment, write_results

        from zsgd.output.rundir import create_run_dir

        self.prepare()
        self.out_dir = create_run_dir(self.out, self.spec.name)
        (self.out_dir / "experiment.yaml").write_text(self.spec.text)
        rows: list[dict[str, Any]] = []
        dirs: list[Path] = []
        title = f"experiment {self.spec.name}" + (f": {self.spec.description}" if self.spec.description else "")
        try:
            for k, arm in enumerate(self.arms, 1):
                self.log(f"[{k}/{len(self.arms)}] {arm.name} ({arm.mode}, {arm.algo}, {self._n(arm)} workers) ...")
                t0 = time.perf_counter()
                run_dir = self.run_arm(arm)
                row = arm_row(arm.name, arm.settings, run_dir, self.spec.target)
                rows.append(row)
                dirs.append(run_dir)
                acc = row["final_acc"]
                self.log(f"      accuracy {'-' if acc is None else f'{acc:.2%}'} after {row['updates']} updates, "
                         f"{row['time_s'] or 0:.3g} s {'virtual' if arm.mode == 'sim' else 'wall'} ({time.perf_counter() - t0:.1f} s real)")
        finally:
            if rows:  # whatever finished is reported, even if a later arm failed
                write_results(rows, self.out_dir, title, self.spec.target, command)
                plot_experiment(dirs, [r["arm"] for r in rows], self.out_dir)
        return rows


def _plain(v: Any) -> Any:
    return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)


def run_experiment(spec: ExperimentSpec, out_dir: str | Path | None, only: Sequence[str] = (), log: Log | None = None,
                   command: str = "") -> tuple[Path, list[dict[str, Any]]]:
    """Run the (selected) arms of ``spec`` into ``out_dir`` (None: ``runs/<time>-<name>/``);
    returns the directory and the table's rows."""
    exp = Experiment(spec, None if out_dir is None else Path(out_dir), only, log)
    rows = exp.run(command)
    return exp.out_dir, rows
