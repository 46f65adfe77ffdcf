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
from zsgd.simulation import interrupt
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
    """Loads data once, checks every arm can be served, runs the arms (simulated ones side by side with --jobs)."""

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
        self.show = log is not None  # progress bars go with the log lines
        self._workloads: dict[int, Any] = {}
        self.problem: Any = None

    def prepare(self) -> None:
        """Data, model and every arm's shards, so an arm that cannot run fails before the first one starts."""
        from zsgd.core.problem import Problem
        from zsgd.core.ranges import check_servers

        self.problem = Problem.from_config(self.spec.cfg)  # resolves data "default" to a concrete set
        for arm in self.arms:
            arm.cfg.data = self.spec.cfg.data
            try:
                self.workload(arm).shards(self._n(arm))
                check_servers(arm.opts.server.servers if arm.mode == "run" else getattr(arm.opts, "servers", 1), self.problem.model.n_params)
            except ZsgdError as exc:
                raise ZsgdError(f"{self.spec.path}:{arm.line}: arm {arm.name!r}: {exc}") from None
        from zsgd.simulation.plan import check_node_memory, check_plan_size

        check_plan_size([self.problem.stop_rule(a.cfg).total_updates for a in self.arms], 4 * self.problem.model.n_params,
                        self.out if self.out is not None else Path("runs"))  # before the output directory is made
        for arm in self.arms:
            if arm.mode == "sim" and arm.decentralized:
                try:
                    check_node_memory(arm.algo, self._n(arm), self.problem.model.n_params)
                except ZsgdError as exc:
                    raise ZsgdError(f"{self.spec.path}:{arm.line}: arm {arm.name!r}: {exc}") from None

    @staticmethod
    def _n(arm: ArmSpec) -> int:
        return int(arm.settings["workers"])

    def workload(self, arm: ArmSpec) -> Any:
        """One Workload per batch size (the message sizes and compute calibration depend on it);
        the weights and shards are the same in all of them (same model, seed and split)."""
        from zsgd.simulation.simulator import Workload

        bs = arm.cfg.batch_size
        if bs not in self._workloads:
            self._workloads[bs] = Workload(arm.cfg, self.problem)
        return self._workloads[bs]

    def run_arm(self, arm: ArmSpec, progress: Any = None) -> Path:
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

            run_decentralized_arm(arm.cfg, arm.opts, wl, run_dir, progress=progress)
        else:
            from zsgd.simulation.simulator import run_arm

            run_arm(arm.cfg, arm.opts, wl, run_dir, progress=progress)
        return run_dir

    def run(self, command: str = "", jobs: int = 1, step_argv: Callable[[Path, int], list[str]] | None = None,
            step_capacity: int = 1) -> list[dict[str, Any]]:
        """Run every arm; simulated arms ``jobs`` at a time (forked processes), or as the commands
        ``step_argv(out_dir, k)`` (srun steps of ``zsgd experiment-arm``); ``run`` arms one at a time in this
        process, as their workers need the cores and their wall times must not compete."""
        from zsgd.experiments.report import arm_row, plot_experiment, write_results
        from zsgd.output.rundir import create_run_dir
        from zsgd.simulation.arm_files import calibrate_once
        from zsgd.output.live import stderr_console
        from zsgd.simulation.parallel import ArmsView, CommandRunner, ForkRunner, InlineRunner, run_arms

        self.prepare()
        self.out_dir = create_run_dir(self.out, self.spec.name)
        (self.out_dir / "experiment.yaml").write_text(self.spec.text)
        sims = [k for k, a in enumerate(self.arms) if a.mode == "sim"]
        for bs, wl in self._workloads.items():  # compute=measured timed once per workload, before any fork
            calibrate_once(wl, [a.opts for a in self.arms if a.mode == "sim" and a.cfg.batch_size == bs])
        rows: dict[int, dict[str, Any]] = {}
        dirs: dict[int, Path] = {}
        title = f"experiment {self.spec.name}" + (f": {self.spec.description}" if self.spec.description else "")
        started: dict[int, float] = {}

        def begin(k: int) -> None:
            arm = self.arms[k]
            started[k] = time.perf_counter()
            self.log(f"[{k + 1}/{len(self.arms)}] {arm.name} ({arm.mode}, {arm.algo}, {self._n(arm)} workers) ...")

        def finish(k: int, _payload: Any = None) -> None:
            arm = self.arms[k]
            run_dir = self.out_dir / arm.dirname
            row = arm_row(arm.name, arm.settings, run_dir, self.spec.target)
            rows[k], dirs[k] = row, run_dir
            acc = row["final_acc"]
            self.log(f"      {arm.name}: accuracy {'-' if acc is None else f'{acc:.2%}'} after {row['updates']} updates, "
                     f"{row['time_s'] or 0:.3g} s {'virtual' if arm.mode == 'sim' else 'wall'} "
                     f"({time.perf_counter() - started.get(k, time.perf_counter()):.1f} s real)")

        def simulate(k: int, progress: Any) -> None:
            self.run_arm(self.arms[k], progress)

        view = ArmsView([a.name for a in self.arms], None, self.show, stderr_console, count=len(sims))

        class Logged:  # the scheduler's runner, with a start line per arm
            def __init__(self, inner: Any) -> None:
                self.inner, self.capacity = inner, inner.capacity

            def start(self, k: int) -> None:
                begin(k)
                self.inner.start(k)

            def poll(self, timeout: float) -> list:
                return self.inner.poll(timeout)

            def close(self, abort: bool = False) -> None:
                self.inner.close(abort)

        try:
            if sims:
                if step_argv is not None:
                    self.save_plan()
                    inner: Any = CommandRunner(lambda k: step_argv(self.out_dir, k), step_capacity, lambda k: self.out_dir / self.arms[k].dirname / "step.log")
                elif min(jobs, len(sims)) > 1:
                    inner = ForkRunner(simulate, min(jobs, len(sims)))
                else:
                    inner = InlineRunner(simulate, view.arm_progress)
                with view:  # closed before any run arm, whose own live view needs the terminal
                    run_arms(sims, Logged(inner), view, on_done=finish)
            for k, arm in enumerate(self.arms):
                if arm.mode == "run":
                    if interrupt.requested():  # Ctrl-C during the simulated arms: no real run starts
                        raise KeyboardInterrupt
                    begin(k)
                    self.run_arm(arm)
                    finish(k)
        finally:
            if rows:  # whatever finished is reported, even if a later arm failed
                done = sorted(rows)
                write_results([rows[k] for k in done], self.out_dir, title, self.spec.target, command)
                plot_experiment([dirs[k] for k in done], [rows[k]["arm"] for k in done], self.out_dir)
        return [rows[k] for k in sorted(rows)]

    def save_plan(self) -> None:
        """What an ``experiment-arm`` step needs to rebuild this experiment: the file and the calibrations (compute, server step, transport)."""
        from zsgd.simulation.arm_files import calibrations

        write_json(self.out_dir / "plan.json", {"config": str(Path(self.spec.path).resolve()), "only": [a.name for a in self.arms],
                                                **calibrations(self._workloads)})


def run_planned_arm(out_dir: Path, index: int) -> Path:
    """An srun step's side: rebuild the experiment from ``OUT_DIR/plan.json`` and run its arm ``index``."""
    import json

    from zsgd.experiments.config import load_experiment

    path = Path(out_dir) / "plan.json"
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ZsgdError(f"{path}: not an experiment plan written by 'zsgd experiment' ({exc})") from None
    exp = Experiment(load_experiment(Path(plan["config"])), Path(out_dir), plan["only"])
    if not 0 <= index < len(exp.arms):
        raise ZsgdError(f"{path}: no arm {index} (the experiment has {len(exp.arms)})")
    exp.prepare()
    exp.out_dir = Path(out_dir)
    from zsgd.simulation.arm_files import restore_calibration

    for bs, wl in exp._workloads.items():
        restore_calibration(wl, plan, bs)
    return exp.run_arm(exp.arms[index])


def _plain(v: Any) -> Any:
    return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)


def run_experiment(spec: ExperimentSpec, out_dir: str | Path | None, only: Sequence[str] = (), log: Log | None = None,
                   command: str = "", jobs: int = 1, step_argv: Callable[[Path, int], list[str]] | None = None,
                   step_capacity: int = 1) -> tuple[Path, list[dict[str, Any]]]:
    """Run the (selected) arms of ``spec`` into ``out_dir`` (None: ``runs/<time>-<name>/``);
    returns the directory and the table's rows."""
    exp = Experiment(spec, None if out_dir is None else Path(out_dir), only, log)
    rows = exp.run(command, jobs=jobs, step_argv=step_argv, step_capacity=step_capacity)
    return exp.out_dir, rows
