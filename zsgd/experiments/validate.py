"""``zsgd sim --validate``: the user's own case, run for real here beside its simulated twin.

Why: a simulator's numbers are worth what its model of the world is worth,
and that model (the network, the algorithm, the server's step and NIC, the
codecs) is checked in the project's tests for a few cases only. This runs
the case the user is about to simulate: a short real emulated run of the
same flags (``zsgd run`` with the latency, bandwidth, loss and stragglers
injected, the same algorithm, codecs and servers), then the simulator on
the same flags, and compares time per update, staleness (mean and p99),
test accuracy at an equal number of updates, and bytes per update each way.
A figure off by more than ``--tolerance`` (default 5 %) fails the check
(exit 1).

The twin is calibrated on the real run (``zsgd.experiments.twin``): its
compute time is the real workers' own turnaround (they share the cores);
a central twin's latency holds the broker's measured hand-offs each way
(the transfers through ZeroMQ, the loop's wait after a hold) and its server
step is the engine's in the run, with no NIC charged again; so what is
judged is everything else: the network's model, the rule, the queue. What plain ``zsgd sim`` would have
predicted with this machine's cached calibration is shown beside it, not
judged: on a machine whose cores the workers share it is expected to be
fast, and the row says by how much.

A central case whose flags emulate nothing (``--latency 0``) is run with its broker holding each message for
0 s (``StampedEmulation``), so that its hops are stamped as at any latency.

What it cannot validate, and says so: a run over remote hosts or Slurm
nodes (the real twin runs here); ``--failures``, per-direction or per-worker
latencies (the runtime's emulation injects one latency spec); a grid (one
arm at a time); and a case whose short real run would take more than
``BUDGET_S`` here (a model too slow for a short run), which it estimates
first with the simulator itself.

The real run sends every message through ZeroMQ sockets (no shared memory),
as the simulator models a network; evaluation happens at the same update
counts in both (four times in the run).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from zsgd.core.config import TrainConfig
from zsgd.errors import ZsgdError
from zsgd.runtime.run_options import EmulationOptions

DEFAULT_TOLERANCE = 0.05
BUDGET_S = 120.0  # the longest short real run it starts (estimated by the simulator, with the cores shared)
#: Updates of the short run when --steps is not given: enough for a steady state after the first quarter.
ASYNC_UPDATES, ROUND_UPDATES = 200, 60
MIN_RUN_S, MAX_LENGTHEN = 1.0, 20  # the default's run lengthened to a predicted second (``lengthened``), at most 20x
ROUND_ALGOS = ("sync", "ksync", "localsgd", "dsgd", "dsgt", "cadmm")
STALENESS_SLACK = 1.0  # staleness p99 is a whole number of updates: one apart is as close as it can be


class ValidationFailed(ZsgdError):
    """The simulator is off by more than the tolerance on at least one figure."""

    exit_code = 1


@dataclass
class Row:
    """One compared figure; ``judged`` False rows inform (they do not fail the check)."""

    name: str
    real: float | None
    sim: float | None
    kind: str = "num"  # how to show it: "ms", "num", "pct", "bytes"
    judged: bool = True
    slack: float = 0.0  # an absolute difference that always passes

    @property
    def error(self) -> float | None:
        if self.real is None or self.sim is None:
            return None
        if self.real == 0:
            return 0.0 if self.sim == 0 else math.inf
        return (self.sim - self.real) / abs(self.real)

    def passed(self, tolerance: float) -> bool | None:
        if not self.judged or self.error is None:
            return None
        return abs(self.error) <= tolerance or abs(self.sim - self.real) <= self.slack


def p99_row(real: float, real_interval: tuple[float, float], sim: float, sim_interval: tuple[float, float]) -> Row:
    """The p99 staleness row: it passes within one update (a whole number) or where the real and the simulated p99's
    95 % sampling intervals (``twin.staleness_p99_interval``) meet: two short runs' p99s that another draw of
    either could have made equal are not told apart."""
    (real_lo, real_hi), (sim_lo, sim_hi) = real_interval, sim_interval
    meet = (real_hi - real) + (sim - sim_lo) if sim >= real else (real - real_lo) + (sim_hi - sim)
    return Row("staleness, p99", real, sim, slack=max(STALENESS_SLACK, meet))


def parse_tolerance(text: str | None) -> float:
    """``5%`` or ``0.05`` -> 0.05; a tolerance must be in (0, 1]."""
    if text is None:
        return DEFAULT_TOLERANCE
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise ZsgdError(f"bad --tolerance {text!r}: expected a fraction in (0, 1] or a percentage, e.g. 5% or 0.05")
    return value


def _zero_delay(d: Any) -> bool:
    return getattr(d, "mean", None) == 0 and type(d).__name__ == "Constant"


def check_validatable(spec: Any, arms: list) -> list[str]:
    """Refuse, in one line, what a real run here cannot reproduce; return the notes on what is not checked."""
    if len(arms) != 1:
        raise ZsgdError(f"--validate checks one arm against a real run; the flags make {len(arms)} (give one value per flag)")
    grid = spec.grid
    for key, flag in (("failures", "--failures"), ("latency_up", "--latency-up"), ("latency_down", "--latency-down")):
        text = grid.get(key)
        if text is not None and str(text).strip().lower() not in ("none", ""):
            raise ZsgdError(f"--validate cannot check {flag}: a real run here injects one latency spec and no scheduled failures "
                            f"(validate without it)")
    if spec.latency_worker:
        raise ZsgdError("--validate cannot check --latency-worker: a real run here injects one latency spec for every worker")
    notes = ["not checked: remote hosts and Slurm nodes (the real run is on this machine, its messages over loopback TCP)",
             "staleness p99 passes within one update (it is a whole number of updates) or where the real and simulated "
             "p99s' 95 % sampling intervals meet (a short run's p99 is one of its few largest values)"]
    compute = grid.get("compute")
    if compute is not None and compute.strip() != "measured" and arms[0].values.get("algo", "async") in ROUND_ALGOS[3:]:
        notes.append(f"not checked: --compute {compute} is not injected into a decentralized run (no server hands out its steps): "
                     f"the twin uses the real nodes' own step times")
    return notes


def short_config(cfg: TrainConfig, updates: int | None) -> TrainConfig:
    """The run both sides train: ``updates`` updates (None: a default for the algorithm), evaluated four times, no early stop."""
    return replace(cfg, steps=updates, epochs=None, time_limit=None, target_acc=None, target_ppl=None,
                   eval_every=max(1, updates // 4), name=f"validate-{cfg.model}")


def lengthened(updates: int, estimate_s: float) -> int | None:
    """The default ``updates`` scaled to a predicted ``MIN_RUN_S`` (at most ``MAX_LENGTHEN`` times), or None if the
    default's predicted run (``estimate_s``) is that long already.

    Why: a short run's figures are its steady state, after its first quarter; a run far shorter than a second has
    none. 200 updates of logreg with 8 workers at 0 ms took 60 ms from the first update to the last on 2 cores at
    load 4: three of the 8 workers, started 20 ms apart and waiting for a core, had applied no update by its end, so
    its staleness was that of 5 workers (4.0, the twin's 8 gave 7.0) and its time per update no steady state's. The
    simulator's prediction is fast wherever the cores are shared (4-10x for logreg here), so the floor is on it."""
    if estimate_s >= MIN_RUN_S:
        return None
    return int(updates * min(MAX_LENGTHEN, MIN_RUN_S / max(estimate_s, 1e-9)))


def default_updates(algo: str) -> int:
    name = algo.split(":", 1)[0]
    return ROUND_UPDATES if name in ROUND_ALGOS else ASYNC_UPDATES


def real_options(arm: Any, spec: Any, n: int) -> Any:
    """``zsgd run`` options for the arm's world: the same algorithm, codecs, servers; its network and stragglers emulated."""
    from zsgd.decentralized.rules import is_decentralized
    from zsgd.runtime.run_options import RunOptions

    v, algo = arm.values, arm.values.get("algo", "async")
    net = arm.opts.network
    dec = is_decentralized(algo)
    flags: dict[str, Any] = dict(n_proc=n, algo=algo, show=False, plots=False, checkpoint_every=0, heartbeat=0.5, timeout=5.0,
                                 shared_memory=False, evaluator=True)
    if not _zero_delay(net.latency_up):
        flags["inject_latency"] = spec.grid.get("latency")
    if math.isfinite(net.bandwidth):
        flags["inject_bandwidth"] = v.get("bandwidth")
    if net.loss > 0:
        flags["inject_loss"] = v.get("loss")
    if v.get("stragglers", "none").strip().lower() != "none":
        flags["stragglers"] = v["stragglers"]
    if dec:
        flags["topology"] = spec.topology
        flags |= {k: val for k, val in spec.decentralized.items() if val is not None}
        flags["compress"] = v.get("compress", "none")
    else:
        flags |= dict(staleness_lr=spec.staleness_lr, compress=v.get("compress", "none"), compress_replies=v.get("compress_replies", "none"),
                      servers=int(v.get("servers", 1)))
        compute = v.get("compute", "measured")
        if compute.strip() != "measured":
            flags["inject_compute"] = compute
        nic = arm.opts.broker_bandwidth
        if isinstance(nic, (int, float)) and math.isfinite(nic):  # a server NIC given by hand: emulated for real too
            flags["inject_broker_bandwidth"] = f"{float(nic)!r}B/s"
    opts = RunOptions.from_flags(flags)
    if not dec and opts.server.servers == 1:  # range servers build their own emulation from the specs (StampedEmulation)
        opts.emulation = StampedEmulation(**asdict(opts.emulation))
    return opts.validate()


def run_emulates_nothing(opts: Any) -> bool:
    """Whether a plain ``zsgd run`` of these options would emulate nothing (the validated run's broker then holds for 0 s)."""
    return EmulationOptions.emulator(opts.emulation, opts.n_workers, 0) is None


class StampedEmulation(EmulationOptions):
    """A validated central run's ``EmulationOptions``: its broker emulated even with nothing injected, every message
    held for 0 s (no loss, no stragglers, no stretched steps).

    Why: the twin of a central run takes the broker's hops and its engine's step from the run, and only an emulated
    broker stamps them. A 0 ms case's real run emulated nothing before, so its twin fell back to the simulator's own
    server model (cnn, 8 workers, ``--compute 0``: -30.7 % on time per update at load 5, now -2.5 %). The real run now holds each message
    for 0 s, as it holds them for their drawn delays at any other latency; what an emulated run measures is
    unchanged, and a plain ``zsgd run`` at 0 ms still emulates nothing (its replies zero-copy).

    Not under ``--servers K``: the range servers build their emulation from the specs alone, so only the coordinator
    would hold its messages; a sharded worker's turnaround starts at the first of its K replies, so it held the
    coordinator's hop too, and the twin counted it twice (logreg, 2 workers, 0 ms: +32 and +42 % at load 8, against
    -49 % with nothing emulated). That case is noted as not checked."""

    def emulator(self, n_workers: int, seed: int) -> Any:
        from zsgd.runtime.emulation import LinkEmulator, Network

        return super().emulator(n_workers, seed) or LinkEmulator(Network(), n_workers=n_workers, seed=seed)  # latencies 0


def local_steps(algo: str) -> int:
    """Gradient steps a worker takes per reply: K for ``localsgd:K``, else 1."""
    from zsgd.algorithms import local_steps_of

    return 1 if algo.split(":", 1)[0] in ROUND_ALGOS[3:] else local_steps_of(algo)


def compare(real: Path, sim: Path, predicted: Path, updates: int, steps: int = 1, servers: int = 1) -> list[Row]:
    """The figures of the real run against its twin (judged) and against plain ``zsgd sim`` (informing).

    ``steps``: gradient steps per worker turnaround (``local_steps``); ``servers`` > 1: the real summary counts one
    server's bytes, so the bytes rows inform instead of judging."""
    from zsgd.experiments import twin

    real_ups = len(twin.events(real, "update"))
    skip = min(updates, real_ups) // 4
    if real_ups - skip < 3:
        raise ZsgdError(f"--validate: the real run applied {real_ups} updates: too few to compare (see {real}/logs)")
    (t_real, s_real), (t_sim, s_sim), (t_pred, _s) = twin.steady(real, skip), twin.steady(sim, skip), twin.steady(predicted, skip)
    rows = [Row("time per update (ms)", t_real * 1e3, t_sim * 1e3, "ms"),
            Row("staleness, mean", s_real, s_sim),
            p99_row(twin.staleness_p99(real, skip), twin.staleness_p99_interval(real, skip), twin.staleness_p99(sim, skip),
                    twin.staleness_p99_interval(sim, skip))]
    acc_real, acc_sim = twin.accuracies(real), twin.accuracies(sim)
    common = sorted(set(acc_real) & set(acc_sim))
    if common:
        u = common[-1]
        rows.append(Row(f"test accuracy at update {u}", acc_real[u], acc_sim[u], "pct"))
    s_real_sum, s_sim_sum = twin.summary(real), twin.summary(sim)
    if "relayed_messages" in s_real_sum:  # decentralized: the peer messages alone, as the simulator counts them
        rows.append(peer_bytes_row(s_real_sum, s_sim_sum))
    else:
        for key, label in (("bytes_sent", "bytes per update, workers to server"), ("bytes_received", "bytes per update, server to workers")):
            if s_real_sum.get("updates") and s_sim_sum.get("updates"):
                rows.append(Row(label, s_real_sum[key] / s_real_sum["updates"], s_sim_sum[key] / s_sim_sum["updates"], "bytes",
                                judged=servers == 1))
    pred = twin.summary(predicted)
    compute_real = s_real_sum.get("compute_s_mean")
    source = "this machine's calibration" if pred.get("compute_measured") else "--compute as given"
    rows.append(Row(f"compute per step (ms), {source}", None if compute_real is None else compute_real * 1e3 / steps,
                    pred["compute_s"] * 1e3, "ms", judged=False))
    rows.append(Row("time per update (ms), plain zsgd sim", t_real * 1e3, t_pred * 1e3, "ms", judged=False))
    return rows


PEER_BYTES = "bytes per peer message"


def peer_bytes_row(real: dict[str, Any], sim: dict[str, Any]) -> Row:
    """A decentralized run's bytes, like with like: the mean peer message, each counted once. The real broker also
    takes each node's round reports (and its model, when an evaluation is due) and its heartbeats, which the
    simulator does not send (a 4-node dsgd ring of mlp: 8.47 MB in per round against 7.53 MB of peer messages simulated, the
    row 11 % off with nothing wrong). The relay counts what it relays
    (``relayed_bytes``); the simulator's peer messages are ``rounds`` times two per edge."""
    d = sim.get("decentralized") or {}
    sent = (sim.get("rounds") or 0) * 2 * (d.get("n_edges") or 0)
    relayed = real.get("relayed_messages") or 0
    return Row(PEER_BYTES, real.get("relayed_bytes", 0) / relayed if relayed else None,
               sim.get("bytes_total", 0) / sent if sent else None, "bytes")


def _cell(row: Row, value: float | None) -> str:
    if value is None:
        return "-"
    if row.kind == "ms":
        return f"{value:.2f}"
    if row.kind == "pct":
        return f"{value:.2%}"
    if row.kind == "bytes":
        from zsgd.output.live import format_bytes

        return format_bytes(value)
    return f"{value:.2f}"


def _verdict(row: Row, tolerance: float) -> str:
    ok = row.passed(tolerance)
    return "info" if ok is None else ("ok" if ok else "OFF")


def cells(rows: list[Row], tolerance: float) -> list[list[str]]:
    return [[r.name, _cell(r, r.real), _cell(r, r.sim), "-" if r.error is None else f"{r.error:+.1%}", _verdict(r, tolerance)]
            for r in rows]


HEADS = ["figure", "real", "simulated", "error", "check"]


def write_report(rows: list[Row], out_dir: Path, tolerance: float, notes: list[str], command: str) -> Path:
    """validation.md (the table and the notes) and validation.json (the numbers)."""
    lines = [f"Validation: a real run on this machine against its simulated twin; tolerance {tolerance:.0%}.", "",
             f"Command: `{command}`", "", "| " + " | ".join(HEADS) + " |", "|" + "---|" * len(HEADS)]
    lines += ["| " + " | ".join(c) + " |" for c in cells(rows, tolerance)]
    lines += ["", "Notes (what is not checked, and how):"] + [f"- {n}" for n in notes] + [""]
    (out_dir / "validation.md").write_text("\n".join(lines))
    doc = {"tolerance": tolerance, "passed": all(r.passed(tolerance) is not False for r in rows), "notes": notes,
           "rows": [{"figure": r.name, "real": r.real, "simulated": r.sim, "error": r.error, "judged": r.judged,
                     "passed": r.passed(tolerance)} for r in rows]}
    (out_dir / "validation.json").write_text(json.dumps(doc, indent=1, default=lambda x: None) + "\n")
    return out_dir / "validation.md"


def plot(real: Path, sim: Path, out: Path) -> Path:
    """validate.png: test accuracy against updates, and updates against time (wall, virtual), real beside simulated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from zsgd.experiments import twin

    fig, (acc, ups) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, d, style in (("real", real, "-o"), ("simulated", sim, "--s")):
        a = sorted(twin.accuracies(d).items())
        acc.plot([u for u, _ in a], [x for _, x in a], style, ms=4, label=label)
        ev = twin.events(d, "update")
        t0 = ev[0]["t"] if ev else 0.0  # from the first update: the real run's start-up is not the simulator's to predict
        ups.plot([e["t"] - t0 for e in ev], range(1, len(ev) + 1), style[:-1] if len(ev) > 40 else style, ms=3, label=label)
    acc.set(xlabel="updates", ylabel="test accuracy", title="test accuracy at equal updates")
    ups.set(xlabel="seconds since the first update: wall (real), virtual (twin)", ylabel="updates applied", title="progress in time")
    for ax in (acc, ups):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "validate.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def validate(cfg: TrainConfig, spec: Any, arms: list, out_dir: Path, tolerance: float, log: Any = None,
             command: str = "zsgd sim --validate") -> list[Row]:
    """Run the check into ``out_dir`` (real/, sim/, predicted/, validation.md/.json, validate.png); the rows compared."""
    from zsgd.simulation.sweep import arm_config, build_arms, prepare_workload

    say = log or (lambda _msg: None)
    notes = check_validatable(spec, arms)
    arm = arms[0]
    algo, n = arm.values.get("algo", "async"), arm.opts.n_workers
    arm_cfg, _note = arm_config(cfg, arm, spec)
    run_cfg = short_config(arm_cfg, cfg.steps or default_updates(algo)).validate()
    updates = run_cfg.steps
    real_opts = real_options(arm, spec, n)  # every flag checked before anything runs
    workload = prepare_workload(run_cfg, [arm])
    # 1. plain zsgd sim, with this machine's calibration: what it predicts, and how long the real run would take. The real
    # run is local, so unless the user placed the processes, the prediction puts them on this host's cores too.
    plain = arm
    if spec.grid.get("placement") is None and not real_opts.server.decentralized:
        (plain,) = build_arms(replace(spec, grid={**spec.grid, "placement": "local"}))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    shared = getattr(plain.opts, "placement", "spread") == "local"  # the prediction already shares the cores
    predicted = _simulate(run_cfg, plain, workload, out_dir / "predicted")
    estimate = predicted.summary["virtual_s"] * (1.0 if shared else max(1.0, (n + 1) / cores))
    longer = None if cfg.steps else lengthened(updates, estimate)
    if longer is not None:  # a run over before its workers have all started is no steady state: the default, lengthened
        updates = longer
        run_cfg = short_config(arm_cfg, updates).validate()
        workload = prepare_workload(run_cfg, [arm], workload.problem)
        shutil.rmtree(out_dir / "predicted")
        predicted = _simulate(run_cfg, plain, workload, out_dir / "predicted")
        estimate = predicted.summary["virtual_s"] * (1.0 if shared else max(1.0, (n + 1) / cores))
        notes.append(f"{updates} updates, not the default {default_updates(algo)}: the simulator predicts the default's run "
                     f"under {MIN_RUN_S:g} s")
    if estimate > BUDGET_S:
        raise ZsgdError(f"--validate: a real run of {updates} updates with {n} workers would take about {estimate:.0f} s here "
                        f"(the simulator's estimate, {cores} core(s) shared); a model too slow for a short run is not validated: "
                        f"give fewer --steps or --workers, or a smaller --model")
    say(f"validate: a real run of {updates} updates, {n} workers ({algo}), about {max(estimate, 1):.0f} s of wall time ...")
    from zsgd.runtime.runner import run_distributed

    real_dir = out_dir / "real"
    real_dir.mkdir(parents=True, exist_ok=True)
    run_distributed(replace(run_cfg, time_limit=max(60.0, 4 * estimate), name="validate-real"), real_opts, out=real_dir)
    # 2. the twin: the same flags, its compute the real workers' own turnaround (or the injected draw)
    from zsgd.experiments.twin import central_latency, central_server, compute_trace, decentralized_latency, steps_per_turnaround
    from zsgd.network import parse_compute

    compute = arm.values.get("compute", "measured").strip()
    steps, grid = local_steps(algo), dict(spec.grid)
    if real_opts.server.decentralized:  # a node's turnaround is a round (cadmm's takes primal_steps); the relay's hop is measured
        compute = compute_trace(real_dir, out_dir / "turnaround.csv", steps_per_turnaround(algo, arm.opts.params.primal_steps))
        try:
            grid["latency"] = decentralized_latency(real_dir, str(grid.get("latency") or "0"), grid.get("bandwidth"))
        except ZsgdError as exc:
            notes.append(f"not in the twin: the relay's measured time per peer message ({exc})")
    else:  # the broker's hand-offs beyond the emulated delays, measured each way in the run (zsgd.runtime.worker.broker_hops)
        if run_emulates_nothing(real_opts) and real_opts.server.servers == 1:
            notes.append("the real run's broker holds each message for 0 s (a plain zsgd run at 0 ms does not), so that it "
                         "stamps the hops and engine steps the twin takes")
        elif run_emulates_nothing(real_opts):
            notes.append(f"not checked at 0 ms with --servers {real_opts.server.servers}: the real run emulates nothing, so no "
                         f"hops are stamped and the twin's server is the simulator's own model (expect it fast)")
        hops = central_latency(real_dir, str(grid.get("latency") or "0"), out_dir)
        if hops is not None:  # which hold the transfers (no NIC charged again) beside the engine's step in this run
            grid["latency_up"], grid["latency_down"] = hops
            server = central_server(real_dir, spec.broker_time, spec.broker_bandwidth)
            spec = replace(spec, broker_time=server["broker_time"], broker_bandwidth=server["broker_bandwidth"])
        if compute != "measured" and _zero_delay(parse_compute(compute)):  # a real worker's step cannot take no time
            notes.append(f"--compute {compute} is not injected (no step is stretched): the twin's compute is the real "
                         f"workers' own turnaround")
            compute = "measured"
        if compute == "measured":
            compute = compute_trace(real_dir, out_dir / "turnaround.csv", steps, per_round=True)
    grid, note = twin_placement(grid)
    notes += [note] if note else []
    (twin_arm,) = build_arms(replace(spec, grid={**grid, "compute": compute}))
    say("validate: the simulated twin ...")
    _simulate(run_cfg, twin_arm, workload, out_dir / "sim")
    rows = compare(real_dir, out_dir / "sim", out_dir / "predicted", updates, steps, real_opts.server.servers)
    if real_opts.server.servers > 1:
        notes.append(f"bytes under --servers {real_opts.server.servers}: the real run's summary counts one server's, so they are "
                     f"shown, not judged")
    write_report(rows, out_dir, tolerance, notes, command)
    plot(real_dir, out_dir / "sim", out_dir)
    return rows


def twin_placement(grid: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The twin's grid without ``--placement``/``--host-cores`` (each process on a core of its own, the default),
    and a note when the user placed the processes on one host. The twin's compute is the real workers' turnaround
    and its latency the measured hops, which already hold this host's sharing of its cores; ``--placement local``
    would charge it again on the simulator's host (its crossings and steps on a CpuPool of the host's cores). The
    plain prediction keeps the user's placement."""
    placement = grid.get("placement")
    twin_grid = {k: v for k, v in grid.items() if k not in ("placement", "host_cores")}
    if placement is None or str(placement).strip().lower() == "spread":
        return twin_grid, None
    return twin_grid, (f"the twin leaves out --placement {placement}: its turnaround and hops, measured here, already hold "
                       f"this host's shared cores (the plain prediction keeps it)")


def _simulate(cfg: TrainConfig, arm: Any, workload: Any, run_dir: Path) -> Any:
    from zsgd.simulation.decentralized import DecentralizedOptions, run_decentralized_arm

    if isinstance(arm.opts, DecentralizedOptions):
        return run_decentralized_arm(cfg, arm.opts, workload, run_dir)
    from zsgd.simulation.simulator import run_arm

    return run_arm(cfg, arm.opts, workload, run_dir)


def table(rows: list[Row], tolerance: float) -> Any:
    """The terminal table (rich)."""
    from rich.table import Table

    t = Table(title=f"zsgd sim --validate: real run vs simulated twin (tolerance {tolerance:.0%})")
    for h in HEADS:
        t.add_column(h, justify="left" if h == "figure" else "right")
    for c, r in zip(cells(rows, tolerance), rows):
        style = {"ok": "green", "OFF": "bold red"}.get(c[-1], "dim")
        t.add_row(*c[:-1], f"[{style}]{c[-1]}[/]")
    return t


def failures(rows: list[Row], tolerance: float) -> list[Row]:
    return [r for r in rows if r.passed(tolerance) is False]


def failure_line(rows: list[Row], tolerance: float) -> str:
    off = failures(rows, tolerance)
    return (f"the simulator is off by more than {tolerance:.0%} on " +
            "; ".join(f"{r.name} ({r.error:+.1%})" for r in off) + " (validation.md)")


__all__ = ["DEFAULT_TOLERANCE", "PEER_BYTES", "Row", "ValidationFailed", "check_validatable", "compare", "failure_line", "failures",
           "parse_tolerance", "peer_bytes_row", "real_options", "StampedEmulation", "table", "twin_placement", "validate", "write_report"]
