"""A grid of simulated arms: every combination of the comma lists given to
``zsgd sim``, one run directory per arm, a results table and plots.

Why a grid runner rather than a shell loop: every arm shares the loaded data
set, the initial weights (``model.init(seed)``) and the shards, so arms
differ only in the world they simulate, and the comparison (time to target
accuracy against latency, per algorithm) is drawn in one place. Every spec of
every arm is parsed before the first arm starts, so a typo in the tenth
value fails in the first millisecond, not after an hour.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from zsgd.core.config import TrainConfig, write_config
from zsgd.errors import ZsgdError
from zsgd.output.live import row_cells
from zsgd.network import Constant, Network
from zsgd.network.knobs import Knob, knob, split_values, sweepable
from zsgd.simulation.simulator import SimOptions, SimResult, Workload, run_arm


@dataclass(frozen=True)
class Dimension:
    """One axis of the grid: each value of its list (split as ``split``, one of ``zsgd.network.knobs.SPLITS``) is an arm."""

    key: str
    flag: str
    label: str  # the axis in an arm's name: lat=10ms
    split: str
    parse: Callable[[str, int], Any]  # (one value, the most workers of any arm) -> its model; ZsgdError when bad

    @classmethod
    def of(cls, k: Knob) -> "Dimension":
        return cls(k.name, k.flag, k.label, str(k.sweep), lambda text, n: k.parse_value(text, k.flag, n))


def dimensions() -> list[Dimension]:
    """The grid's axes in the order they vary (the last one fastest): algorithm and workers, the network knobs
    that sweep (``zsgd.network.knobs``), codecs and servers, and scenario lists (``--failures``) last.
    Read at call time, so a knob added to the table is an axis at once."""
    net = [Dimension.of(k) for k in sweepable()]
    return [*_HEAD, *(d for d in net if d.split != "scenarios"), *_CODECS, *(d for d in net if d.split == "scenarios")]


@dataclass
class SweepSpec:
    """Flag values as typed: each grid dimension may be a list (see ``dimensions``); the network knobs that
    do not sweep have a field each, defaulting as their flag does."""

    grid: dict[str, str | None]  # dimension -> spec text (None: not given)
    latency_worker: tuple[str, ...] = ()
    retransmit: str = str(knob("retransmit").default)
    detect: str = str(knob("detect").default)
    broker_time: str = str(knob("broker_time").default)
    broker_bandwidth: str = str(knob("broker_bandwidth").default)
    staleness_lr: str | bool = "off"
    target: float = 0.8
    topology: str = "ring"  # decentralized arms (dsgd, dsgt, cadmm): their graph and rule parameters
    decentralized: dict[str, Any] = field(default_factory=dict)
    # Fields neither a flag nor --config set, which each arm adapts to its workers as
    # 'zsgd run' does (zsgd.algorithms.scaling); empty with --literal.
    auto_scale: tuple[str, ...] = ()


@dataclass
class Arm:
    index: int
    values: dict[str, str]  # dimension -> this arm's spec text
    varying: list[str]  # dimensions with more than one value in the grid
    opts: Any  # SimOptions, or DecentralizedOptions for dsgd, dsgt and cadmm

    @property
    def label(self) -> str:
        shown = self.varying or ["algo"]
        short = {d.key: d.label for d in dimensions()}
        return " ".join(self.values.get(k, "async") if k == "algo" else f"{short[k]}={self.values[k]}" for k in shown)

    @property
    def dirname(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", self.label.replace("=", "")).strip("-")
        return f"{self.index:02d}-{slug or 'arm'}"[:100]


def _parse_workers(text: str, _n: int = 0) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ZsgdError(f"bad --workers {text!r}: expected a whole number >= 1 (or a comma list, e.g. 16,64)")
    return n


def _parse_servers(text: str, _n: int = 0) -> int:
    from zsgd.core.ranges import check_servers

    try:
        k = int(text)
    except ValueError:
        raise ZsgdError(f"bad --servers {text!r}: expected a whole number >= 1 (or a comma list, e.g. 1,2,4)") from None
    check_servers(k)
    return k


def _parse_compress(text: str, _n: int = 0) -> str:
    from zsgd.compression import make_codec

    return make_codec(text, 1).name and text


def _parse_algo(text: str, _n: int = 0) -> str:
    from zsgd.algorithms import parse_algo
    from zsgd.decentralized.rules import is_decentralized

    return text if is_decentralized(text) else parse_algo(text) and text


# The sweep's own axes; the network's come from zsgd.network.knobs (see dimensions).
_HEAD = (Dimension("algo", "--algo", "algo", "plain", _parse_algo), Dimension("workers", "--workers", "n", "plain", _parse_workers))
_CODECS = (Dimension("compress", "--compress", "comp", "plain", _parse_compress),
           Dimension("compress_replies", "--compress-replies", "reply", "plain", _parse_compress),
           Dimension("servers", "--servers", "srv", "plain", _parse_servers))


def build_arms(spec: SweepSpec) -> list[Arm]:
    """Parse every value of every dimension, then form the cross product."""
    from zsgd.decentralized.rules import is_decentralized

    axes = dimensions()
    lists: dict[str, list[str]] = {}
    for d in axes:
        text = spec.grid.get(d.key)
        if text is not None:
            lists[d.key] = split_values(d.split, text, d.flag)
    # ranges of workers (--failures 0-7@10s, --latency-worker 0-7=...) may name only workers some arm has:
    # they are expanded worker by worker, so they are bounded before that
    max_n = max(_parse_workers(w) for w in lists["workers"]) if "workers" in lists else 16
    from zsgd.simulation.plan import check_arm_count

    check_arm_count(math.prod(len(vs) for vs in lists.values()),  # before the cross product is built
                    " x ".join(d.flag for d in axes if len(lists.get(d.key, ())) > 1) or "the grid")
    parse_one = {d.key: d.parse for d in axes}
    parsed = {k: {v: parse_one[k](v, max_n) for v in vs} for k, vs in lists.items()}
    _refuse_duplicates(spec.grid, lists, parsed)
    overrides = knob("latency_worker").parse_value(spec.latency_worker, None, max_n)
    retransmit, detect, broker_s, broker_bw = (knob(k).parse_value(getattr(spec, k))
                                               for k in ("retransmit", "detect", "broker_time", "broker_bandwidth"))
    dec_algos = [a for a in lists.get("algo", ["async"]) if is_decentralized(a)]
    params = _decentralized_params(spec, dec_algos)
    varying = [k for k, vs in lists.items() if len(vs) > 1]
    keys = list(lists)
    arms = []
    for i, combo in enumerate(itertools.product(*(lists[k] for k in keys))):
        values = dict(zip(keys, combo))
        p = {k: parsed[k][v] for k, v in values.items()}
        n = p.get("workers", 16)
        base = p.get("latency", Constant(0.0))
        net = Network(latency_up=p.get("latency_up", base), latency_down=p.get("latency_down", base),
                      worker_latency={w: d for w, d in overrides.items() if w < n}, bandwidth=p.get("bandwidth", math.inf),
                      loss=p.get("loss", 0.0), retransmit=retransmit)
        algo = values.get("algo", "async")
        dec = is_decentralized(algo)
        opts = SimOptions(algo="sync" if dec else algo, n_workers=n, network=net, stragglers=p.get("stragglers"),
                          failures=p.get("failures"), detect_s=detect, broker_s=broker_s, broker_bandwidth=broker_bw,
                          staleness_lr=spec.staleness_lr, target=spec.target, compress=values.get("compress", "none"),
                          compress_replies=values.get("compress_replies", "none"), servers=p.get("servers", 1),
                          placement=p.get("placement", "spread"), host_cores=p.get("host_cores"))
        if "compute" in p:
            opts.compute = p["compute"]
        opts.validate()
        if dec and opts.servers > 1:
            raise ZsgdError(f"--servers splits the central model over server processes; {algo} has no central model")
        if dec and opts.placement == "local":
            raise ZsgdError(f"--placement local models a central server's host; {algo} is simulated with a host per node "
                            f"(drop --placement, or use a central algorithm)")
        if dec:
            from zsgd.simulation.decentralized import DecentralizedOptions

            opts = DecentralizedOptions.like(opts, algo, spec.topology, params)
        arms.append(Arm(i, values, varying, opts))
    if overrides and max(overrides) >= max(a.opts.n_workers for a in arms):
        raise ZsgdError(f"bad --latency-worker: worker {max(overrides)} does not exist (at most {max(a.opts.n_workers for a in arms)} workers)")
    return arms


def _refuse_duplicates(grid: dict[str, str | None], lists: dict[str, list[str]], parsed: dict[str, dict[str, Any]]) -> None:
    """A value given twice in one comma list (``--workers 1,1``, ``--latency 10,10ms``, ``10ms,0.01s``) would
    make the same arm twice, under two directory names: an error, as it is almost surely a typo."""
    flags = {d.key: d.flag for d in dimensions()}
    for key, values in lists.items():
        for j, later in enumerate(values):
            for earlier in values[:j]:
                if earlier == later or _same(parsed[key][earlier], parsed[key][later]):
                    same = "twice" if earlier == later else f"twice ({earlier} and {later} are the same)"
                    raise ZsgdError(f"bad {flags[key]} {grid[key]!r}: {later} is given {same}; "
                                    f"each value of a comma list makes one arm")


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 -- values without a meaningful == (arrays) are told apart by their text
        return False


def _decentralized_params(spec: SweepSpec, algos: list[str]) -> Any:
    """The rule parameters given as flags; each must belong to some decentralized arm of the grid."""
    from zsgd.decentralized.rules import PARAMS_OF, DecentralizedParams

    given = {k: v for k, v in spec.decentralized.items() if v is not None}
    if not algos:
        if given or spec.topology != "ring":
            first = next(iter(given), "topology")
            raise ZsgdError(f"--{first.replace('_', '-')} applies to decentralized algorithms (dsgd, dsgt, cadmm); add one to --algo")
        return DecentralizedParams()
    for k in given:
        if not any(k in PARAMS_OF[a] for a in algos):
            owners = ", ".join(a for a, ks in PARAMS_OF.items() if k in ks)
            raise ZsgdError(f"--{k.replace('_', '-')} is a parameter of {owners}, not of {', '.join(algos)}")
    return DecentralizedParams(**given).validate()


def arm_config(cfg: TrainConfig, arm: Arm, spec: SweepSpec) -> tuple[TrainConfig, str | None]:
    """The configuration ``arm`` trains with, and what was adapted (None: nothing).

    The batch size and learning rate the user left unset follow the arm's number
    of workers and algorithm exactly as in ``zsgd run`` (``scale_for_workers``),
    so a simulated arm predicts the real run of the same flags; decentralized
    arms and local SGD keep every value there too. Done per arm because a grid
    may vary ``--workers`` and ``--algo``.
    """
    from zsgd.algorithms.scaling import scale_for_workers

    return scale_for_workers(cfg, arm.values.get("algo", "async"), arm.opts.n_workers, set(spec.auto_scale))


def scaling_line(cfg: TrainConfig, arms: list[Arm], spec: SweepSpec) -> str | None:
    """One line saying how the arms' batch size and learning rate were adapted, or None.

    The same words as ``zsgd run`` when every arm changed alike; per (algorithm,
    workers) group when the grid varies them.
    """
    from zsgd.algorithms.scaling import scale_for_workers

    groups: dict[tuple[str, int], tuple[TrainConfig, str | None]] = {}
    for arm in arms:
        key = (arm.values.get("algo", "async"), arm.opts.n_workers)
        if key not in groups:
            groups[key] = scale_for_workers(cfg, key[0], key[1], set(spec.auto_scale))
    notes = [note for _c, note in groups.values() if note]
    if not notes:
        return None
    if len(groups) == 1:
        return f"{notes[0][:-1]}; --literal keeps them as given)"
    parts = [f"{algo} x{n}: " + (f"batch {scaled.batch_size}, lr {scaled.lr:g}" if note else "as given")
             for (algo, n), (scaled, note) in groups.items()]
    given = ", ".join("--" + k.replace("_", "-") for k in spec.auto_scale)
    return f"scaled per arm from batch {cfg.batch_size}, lr {cfg.lr:g}: {'; '.join(parts)} (set {given} to choose yourself; --literal keeps them)"


@dataclass
class ArmOutcome:
    arm: Arm
    result: SimResult
    run_dir: Path
    row: dict[str, Any] = field(default_factory=dict)


def result_row(arm: Arm, result: SimResult) -> dict[str, Any]:
    s = result.summary
    row: dict[str, Any] = {"arm": arm.label, "dir": arm.dirname}
    row |= {k: arm.values[k] for k in arm.values}
    row |= {"final_acc": s["test_accuracy"], "time_to_target_s": s["time_to_target_s"], "updates": s["updates"],
            "virtual_s": s["virtual_s"], "updates_per_s": s["updates_per_s"], "samples_per_s": s["samples_per_s"],
            "bytes_sent": s["bytes_sent"], "bytes_received": s["bytes_received"], "staleness_mean": s["staleness_mean"],
            "staleness_p50": s["staleness_p50"], "staleness_p99": s["staleness_p99"], "staleness_max": s["staleness_max"],
            "compute_s": s["compute_s"], "stop_reason": s["stop_reason"], "diverged": bool(s.get("diverged")), "real_s": s["real_s"]}
    if "test_perplexity" in s:  # a language model: perplexity and tokens/s (its samples) in the tables too
        row |= {"test_ppl": s["test_perplexity"], "tokens_per_s": s["tokens_per_s"]}
    return row


def check_sweep_size(cfg: TrainConfig, arms: list[Arm], spec: SweepSpec, workload: Workload, out: Path) -> None:
    """Refuse a sweep whose arms would write more than the disk of ``out`` holds, or whose decentralized arms'
    nodes would not fit in memory (``zsgd.simulation.plan``)."""
    from zsgd.simulation.decentralized import DecentralizedOptions
    from zsgd.simulation.plan import check_node_memory, check_plan_size

    stop = workload.problem.stop_rule
    check_plan_size([stop(arm_config(cfg, a, spec)[0]).total_updates for a in arms], 4 * workload.model.n_params, out)
    for arm in arms:  # before any arm builds its nodes
        if isinstance(arm.opts, DecentralizedOptions):
            check_node_memory(arm.opts.algo, arm.opts.n_workers, workload.model.n_params)
            arm.opts.graph(cfg.seed)  # a graph that cannot be built on the arm's nodes fails before anything is written


def prepare_workload(cfg: TrainConfig, arms: list[Arm], problem: Any = None) -> Workload:
    """Load data and model and cut the shards of every worker count, so that a
    split that cannot serve some arm fails before anything is written."""
    from zsgd.core.problem import Problem

    from zsgd.core.ranges import check_servers

    workload = Workload(cfg, problem or Problem.from_config(cfg))
    for n in sorted({a.opts.n_workers for a in arms}):
        workload.problem.check_fits(cfg, n)
        workload.shards(n)
    for k in sorted({getattr(a.opts, "servers", 1) for a in arms}):
        check_servers(k, workload.model.n_params)
    return workload


def run_sweep(cfg: TrainConfig, spec: SweepSpec, out_dir: Path, workload: Workload | None = None, show: bool = True,
              arm_plots: bool = False, jobs: int = 1, step_argv: Callable[[int], list[str]] | None = None,
              step_capacity: int = 1, plotter: Any = None) -> list[ArmOutcome]:
    """``_run_sweep``, with two processes that load matplotlib while the arms run and then draw the sweep's
    figures side by side (``zsgd.output.plotter``): ``plotter``'s when given (``zsgd sim`` forks them at its
    start, before it loads anything else), else forked now."""
    from zsgd.output.plotter import Plotter
    from zsgd.output.sweep_plots import PRELOAD

    if plotter is not None:
        return _run_sweep(cfg, spec, out_dir, workload, show, arm_plots, jobs, step_argv, step_capacity, plotter)
    with Plotter(2, preload=PRELOAD) as plotter:
        return _run_sweep(cfg, spec, out_dir, workload, show, arm_plots, jobs, step_argv, step_capacity, plotter)


def _run_sweep(cfg: TrainConfig, spec: SweepSpec, out_dir: Path, workload: Workload | None, show: bool, arm_plots: bool,
               jobs: int, step_argv: Callable[[int], list[str]] | None, step_capacity: int, plotter: Any) -> list[ArmOutcome]:
    """Simulate every arm into ``out_dir/NN-label/``; write results.csv/.md and plots.

    Each arm trains with ``arm_config`` (its own batch size and rate when they
    follow the workers); arms of one batch size share one ``Workload``, so one
    compute calibration, as in ``zsgd experiment``. ``jobs`` arms run at once in
    forked processes (``zsgd.simulation.parallel``); with ``step_argv`` each arm
    is instead the command ``step_argv(index)`` (an ``srun`` step running
    ``zsgd sim-arm``), ``step_capacity`` at a time, read back from its directory.
    """
    from dataclasses import replace

    from zsgd.output.live import stderr_console
    from zsgd.simulation.arm_files import calibrate_once, calibrations, load_result, save_plan
    from zsgd.simulation.parallel import ArmsView, CommandRunner, ForkRunner, InlineRunner, longest_first, run_arms

    cfg.validate()
    arms = build_arms(spec)
    workload = workload or prepare_workload(cfg, arms)
    problem = workload.problem
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_config(out_dir / "sweep.yaml", cfg.to_dict() | {"mode": "sim-sweep", "grid": {k: v for k, v in spec.grid.items() if v is not None},
                                                          "arms": [a.dirname for a in arms], "target": spec.target,
                                                          "auto_scale": list(spec.auto_scale)})
    workloads = {cfg.batch_size: workload}
    cfgs = []  # every arm's configuration and workload made here, before any fork
    for arm in arms:
        arm_cfg, note = arm_config(cfg, arm, spec)
        if note:  # only centralized arms (SimOptions) are ever scaled
            arm.opts = replace(arm.opts, scaling=note)
        if arm_cfg.batch_size not in workloads:
            workloads[arm_cfg.batch_size] = Workload(arm_cfg, problem)
            workloads[arm_cfg.batch_size].share_shards(workload)  # cut here, before any fork, by prepare_workload
        cfgs.append(arm_cfg)
    for bs, wl in workloads.items():  # compute=measured timed once per workload, wherever the arms run
        calibrate_once(wl, [a.opts for a, c in zip(arms, cfgs) if c.batch_size == bs])
    figures = calibrations(workloads)["calibration"]
    if any(k in figures for k in ("compute", "server_step", "transport")):  # what --calibration replays for the whole sweep
        (out_dir / "calibration.json").write_text(json.dumps(figures, indent=1) + "\n")
    rules = [problem.stop_rule(c) for c in cfgs]  # each bar's total: the update its stop rule stops at (ArmsView.arm_progress)
    view = ArmsView([a.label for a in arms], [r.expected_updates(0, 0, None) for r in rules], show, stderr_console, rules=rules)

    def simulate(index: int, progress: Any) -> SimResult:
        return _simulate(cfgs[index], arms[index], workloads[cfgs[index].batch_size], out_dir, progress, arm_plots)

    jobs = max(1, min(jobs, len(arms)))
    if step_argv is not None:
        save_plan(out_dir, cfg, spec, workloads, arm_plots)
        runner: Any = CommandRunner(step_argv, step_capacity, lambda i: out_dir / arms[i].dirname / "step.log")
    else:  # fork before the view's thread; the children's exit overlaps the tables and figures (ForkRunner.join below)
        runner = InlineRunner(simulate, view.arm_progress) if jobs == 1 else ForkRunner(simulate, jobs, linger=True)
    order = range(len(arms)) if runner.capacity == 1 else longest_first([arm_cost(a, r) for a, r in zip(arms, rules)])
    try:
        with view:
            results = run_arms(order, runner, view)
        outcomes = []
        for i, arm in enumerate(arms):
            result = results[i] if results[i] is not None else load_result(out_dir / arm.dirname)
            outcomes.append(ArmOutcome(arm, result, out_dir / arm.dirname, result_row(arm, result)))
        write_results(outcomes, out_dir, spec.target)
        plot_sweep(outcomes, out_dir, spec.target, plotter)
    finally:
        if isinstance(runner, ForkRunner):
            runner.join()
    return outcomes


def arm_cost(arm: Arm, rule: Any) -> float:
    """About how many gradients ``arm`` computes, to start the costliest arms first (``longest_first``): its
    ``--steps`` times the gradients of one central update (one for async and ssp; a round of every worker,
    each taking its local steps, for the synchronous and decentralized rules), or its epoch budget in batches,
    whichever is fewer; an arm stopped only by time or accuracy counts as the longest."""
    from zsgd.algorithms import gradients_per_update

    per_update = gradients_per_update(arm.values.get("algo", "async"), arm.opts.n_workers)
    limits = [] if rule.steps is None else [rule.steps * per_update]
    if rule.total_samples is not None:
        limits.append(rule.total_samples / rule.batch_size)
    return min(limits, default=math.inf)


def _simulate(cfg: TrainConfig, arm: Arm, workload: Workload, out_dir: Path, progress: Any, plots: bool) -> SimResult:
    from zsgd.simulation.decentralized import DecentralizedOptions, run_decentralized_arm

    if not isinstance(arm.opts, DecentralizedOptions):
        return run_arm(cfg, arm.opts, workload, out_dir / arm.dirname, progress=progress, plots=plots)
    result = run_decentralized_arm(cfg, arm.opts, workload, out_dir / arm.dirname, progress=progress)
    if plots:
        from zsgd.output.plots import plot_curves

        plot_curves([out_dir / arm.dirname], out_dir / arm.dirname, time_label="virtual time (s)")
    return result


def run_planned_arm(out_dir: Path, index: int) -> Path:
    """An srun step's side of ``zsgd sim --launcher slurm``: rebuild the sweep from ``plan.json``,
    simulate arm ``index`` with the parent's compute calibration, save its result; returns its directory."""
    from dataclasses import replace

    from zsgd.simulation.arm_files import load_plan, restore_calibration, save_result

    plan = load_plan(out_dir)
    spec = SweepSpec(**plan["spec"])
    spec.latency_worker, spec.auto_scale = tuple(spec.latency_worker), tuple(spec.auto_scale)
    cfg = TrainConfig.from_dict(plan["config"]).validate()
    arms = build_arms(spec)
    if not 0 <= index < len(arms):
        raise ZsgdError(f"{Path(out_dir) / 'plan.json'}: no arm {index} (the sweep has {len(arms)})")
    arm = arms[index]
    arm_cfg, note = arm_config(cfg, arm, spec)
    if note:
        arm.opts = replace(arm.opts, scaling=note)
    workload = prepare_workload(arm_cfg, [arm])
    restore_calibration(workload, plan, arm_cfg.batch_size)
    result = _simulate(arm_cfg, arm, workload, Path(out_dir), None, bool(plan["arm_plots"]))
    save_result(Path(out_dir) / arm.dirname, result)
    return Path(out_dir) / arm.dirname


# ---------------------------------------------------------------------------
# results table

TABLE_COLUMNS = [("arm", "arm"), ("final_acc", "acc"), ("time_to_target_s", "t→target s"), ("updates_per_s", "upd/s"),
                 ("bytes_sent", "sent"), ("bytes_received", "recv"), ("staleness_mean", "stale"), ("staleness_p50", "p50"),
                 ("staleness_p99", "p99"), ("staleness_max", "max")]


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The table's columns: a language model's arms show test perplexity and tokens/s after the accuracy."""
    if not any("test_ppl" in r for r in rows):
        return TABLE_COLUMNS
    return TABLE_COLUMNS[:2] + [("test_ppl", "ppl"), ("tokens_per_s", "tok/s")] + TABLE_COLUMNS[2:]


def write_results(outcomes: list[ArmOutcome], out_dir: Path, target: float) -> tuple[Path, Path]:
    """results.csv (every column, raw numbers) and results.md (the readable table)."""
    rows = [o.row for o in outcomes]
    csv_path, md_path = Path(out_dir) / "results.csv", Path(out_dir) / "results.md"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    columns = _columns(rows)
    heads = {"final_acc": "final accuracy", "tokens_per_s": "tokens/s (virtual)", "time_to_target_s": f"virtual s to {target:.0%}", "updates_per_s": "updates/s (virtual)",
             "bytes_sent": "bytes sent", "bytes_received": "bytes received", "staleness_mean": "staleness mean"}
    lines = [f"Arms of a zsgd simulation; times are virtual seconds; target accuracy {target:.0%}.", "",
             "| " + " | ".join(heads.get(k, h) for k, h in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row_cells(r, columns)) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def results_table(outcomes: list[ArmOutcome], target: float) -> Any:
    """The terminal table: arm names whole, the other columns as the width allows (see ``ResultsTable``)."""
    from zsgd.output.live import ResultsTable

    columns = _columns([o.row for o in outcomes])
    return ResultsTable(f"simulated arms (target {target:.0%}; virtual time)", [h for _k, h in columns],
                        [row_cells(o.row, columns) for o in outcomes])


# ---------------------------------------------------------------------------
# plots


def plot_sweep(outcomes: list[ArmOutcome], out_dir: Path, target: float, plotter: Any = None) -> list[Path]:
    """accuracy_vs_time.png, time_to_target.png, staleness.png, and the standard curves of all arms; with a
    ``Plotter``, the curves and the other three figures are drawn in its two processes at once. What is sent
    is plain numbers (``zsgd.output.sweep_plots.ArmFigure``): a helper forked before the simulator was
    imported draws them without importing it."""
    from zsgd.output.plotter import Plotter
    from zsgd.output.sweep_plots import curves_quietly, sweep_figures

    plotter = plotter or Plotter(0)
    curves = plotter.submit(curves_quietly, [o.run_dir for o in outcomes], out_dir, [o.arm.label for o in outcomes])
    figures = plotter.submit(sweep_figures, [arm_figure(o) for o in outcomes], out_dir, target)
    return figures() + curves()


LATENCY_KEYS = ("latency", "latency_up", "latency_down")


def arm_figure(outcome: ArmOutcome) -> Any:
    """What the sweep's figures show of one arm: its evaluations and staleness, and its place on the
    time-to-target plot (a line per combination of the varying values other than latency)."""
    from zsgd.output.sweep_plots import ArmFigure

    arm, result = outcome.arm, outcome.result
    others = [k for k in arm.varying if k not in LATENCY_KEYS] or ["algo"]
    group = " ".join(f"{k}={arm.values[k]}" if k != "algo" else arm.values.get("algo", "async") for k in others)
    net = arm.opts.network
    return ArmFigure(arm.label, group, (net.latency_up.mean + net.latency_down.mean) / 2 * 1e3, result.summary["time_to_target_s"],
                     list(result.evals), np.asarray(result.staleness))
