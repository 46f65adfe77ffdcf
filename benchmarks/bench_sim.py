"""How fast is the simulator, and where does its time go?

Cases (all async unless named; compute time drawn from normal:5ms,1ms so runs
are deterministic; latency lognormal:10ms,0.5 each way):

* ``logreg x1024``: 1,024 simulated workers, 10,000 central updates on the
  embedded Fashion-MNIST subset, with ``--staleness-lr scalar`` (at lr 0.01
  the plain rule diverges near update 2,100 under 1,024 workers' staleness,
  and the case would not measure what it names; each case prints its stop
  reason). The cost should follow central updates, not workers.
* ``cnn x64``: the 1.2M-parameter CNN, where the real gradients dominate.
  Target: at most 10 % of simulation time outside gradient computation.
* ``sync logreg x64``: a synchronous round costs one gradient per worker,
  so here cost follows workers x rounds (shown for contrast).

"outside grad" is (simulation real time - time inside ``WorkerStep.compute``)
/ simulation real time, shown without and with the evaluations (which a real
run also pays, in its evaluator process).

Run: ``python benchmarks/bench_sim.py [--updates 10000] [--workers 1024] [--cnn-updates 200] [--skip-cnn]``.

``--speed [--rounds 3] [--baseline DIR]`` checks issue 22's targets: 1,024 workers x 10,000 updates of
logreg in under 5 s wall, 10,000 workers x 100,000 updates in under 20 s (async, ``--staleness-lr scalar``,
5 evaluations each), each case in a fresh interpreter with one BLAS thread (as ``zsgd sim`` runs), with its CPU time beside the wall time (on a busy
machine the wall time is mostly other processes' work) and its stop reason; with ``--baseline DIR``
side by side with another checkout's package, alternating.

``--start [--rounds 5] [--baseline DIR]`` times whole ``zsgd sim`` commands instead, what a user
waits for (issue 24): one short arm (logreg, 1,500 updates), and a sweep of four such arms
(``--latency 0,10,50,200ms``; also of 6,000 updates each: ``--sweep-steps``) with ``--jobs 1`` and ``--jobs 2``, alternating in every round so a
machine that speeds up or slows down moves both; with ``--baseline DIR`` (another checkout, e.g.
``git archive OLD | tar -x -C DIR``) each command also runs from DIR, side by side.

``--phases [--phase-steps 1500] [--rounds 5]`` says where such a sweep's wall time goes: commands at ``--jobs`` 1 and 2,
alternating, traced (``PHASE_TRACER``); the first round as a row per phase of every process (the parent's imports,
data, calibration, forks, each arm, the figures in the plotting helpers, the exit) with its start, end and CPU seconds;
then each command's CPU on its critical path (the parent's own, the busiest arm process's, the longer figure job's):
what its wall time would be with a core per process, a ratio that other work on the machine moves less than the wall.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zsgd.core.config import TrainConfig
from zsgd.network import parse_compute, parse_delay
from zsgd.network import Network
from zsgd.simulation.simulator import SimOptions, Workload, run_arm
from zsgd.core.problem import Problem
from zsgd.runtime.threads import SINGLE_THREAD_ENV


def run_case(name: str, model: str, algo: str, workers: int, updates: int, eval_every: int, out: Path,
             staleness_lr: str = "off") -> dict:
    cfg = TrainConfig(model=model, data="embedded", steps=updates, eval_every=eval_every, lr=0.01, log_every=50,
                      name=name).validate()
    t0 = time.perf_counter()
    workload = Workload(cfg, Problem.from_config(cfg))
    setup = time.perf_counter() - t0
    lat = parse_delay("lognormal:10ms,0.5")
    opts = SimOptions(algo=algo, n_workers=workers, compute=parse_compute("normal:5ms,1ms"),
                      network=Network(latency_up=lat, latency_down=lat), staleness_lr=staleness_lr)
    t0, c0 = time.perf_counter(), time.process_time()
    s = run_arm(cfg, opts, workload, out / name.replace(" ", "-")).summary
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    real, grad, ev = s["real_s"], s["gradient_real_s"], s["eval_real_s"]
    return {"case": name, "workers": workers, "updates": s["updates"], "events": s["events"], "setup_s": setup,
            "sim_s": real, "total_s": total, "cpu_s": cpu, "grad_s": grad, "eval_s": ev, "outside": (real - grad - ev) / real,
            "outside_with_eval": (real - grad) / real, "virtual_s": s["virtual_s"], "per_update_ms": real / s["updates"] * 1e3,
            "stop_reason": s["stop_reason"]}


#: Issue 22's speed targets: (workers, updates, wall-time goal in s). Async logreg with --staleness-lr scalar: at
#: lr 0.01, 1,024 workers' staleness (about 1,000 updates) makes the plain rule diverge near update 2,100 (the loss
#: stays above 100x its start), and 10,000 workers' sooner, so without it the cases would not measure what they name.
SPEED_CASES = ((1024, 10_000, 5.0), (10_000, 100_000, 20.0))


def one_case(spec: str) -> None:
    """``--one-case WORKERS,UPDATES``: one speed case in this interpreter (from whichever ``zsgd`` PYTHONPATH
    names), printed as one JSON line, after a warm-up arm that loads numba's kernels outside the timing."""
    import json

    import zsgd

    workers, updates = (int(v) for v in spec.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        run_case("warm-up", "logreg", "async", 4, 20, 20, Path(tmp))
        row = run_case(f"logreg x{workers}", "logreg", "async", workers, updates, max(1, updates // 5), Path(tmp), "scalar")
    print(json.dumps(row | {"package": str(Path(zsgd.__file__).resolve().parents[1])}))


def speed_rows(rounds: int, baseline: Path | None, cases: tuple[tuple[int, int, float], ...]) -> None:
    """Issue 22's targets, each case in a fresh interpreter per tree and round, the trees alternating."""
    import json

    trees: dict[str, Path] = {"this": Path(__file__).resolve().parents[1]} | ({"baseline": baseline.resolve()} if baseline else {})
    rows: dict[tuple[str, int], list[dict]] = {(t, c[0]): [] for t in trees for c in cases}
    loads = [os.getloadavg()[0]]
    for _ in range(rounds):
        for workers, updates, _goal in cases:
            for tree, root in trees.items():
                env = os.environ | SINGLE_THREAD_ENV | {"PYTHONPATH": str(root)}  # one BLAS thread, as zsgd sim runs
                done = subprocess.run([sys.executable, __file__, "--one-case", f"{workers},{updates}"], env=env, check=True,
                                      stdin=subprocess.DEVNULL, capture_output=True, text=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                if Path(row["package"]) != root:
                    raise SystemExit(f"the {tree} case ran {row['package']}'s zsgd, not {root}'s")
                rows[tree, workers].append(row)
                loads.append(os.getloadavg()[0])
    print(f"simulator speed (issue 22): async logreg, --staleness-lr scalar, median of {rounds} alternating rounds, each in a "
          f"fresh interpreter; 1-minute load average {min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} cores")
    head = f"{'case':<26}{'tree':<10}{'updates':>9}{'wall s':>8}{'CPU s':>8}{'goal s':>8}{'grad s':>8}{'eval s':>8}   stop reason"
    print(head)
    print("-" * (len(head) + 12))
    for workers, updates, goal in cases:
        for tree in trees:
            rs = rows[tree, workers]
            med = {k: statistics.median(r[k] for r in rs) for k in ("total_s", "cpu_s", "grad_s", "eval_s")}
            print(f"{f'{workers:,} x {updates:,}':<26}{tree:<10}{rs[0]['updates']:>9}{med['total_s']:>8.2f}{med['cpu_s']:>8.2f}{goal:>8.1f}"
                  f"{med['grad_s']:>8.2f}{med['eval_s']:>8.2f}   {rs[0]['stop_reason']}")
        if len(trees) > 1:
            ratio = statistics.median(r["total_s"] for r in rows["this", workers]) / statistics.median(r["total_s"] for r in rows["baseline", workers])
            cpu = statistics.median(r["cpu_s"] for r in rows["this", workers]) / statistics.median(r["cpu_s"] for r in rows["baseline", workers])
            print(f"{'':<26}{'this/base':<10}{'':>9}{ratio:>7.2f}x{cpu:>7.2f}x")


SHORT_ARM = ("sim", "--model", "logreg", "--steps", "1500", "--quiet")
SWEEP = ("sim", "--model", "logreg", "--quiet", "--latency", "0,10,50,200ms")  # with --steps N --jobs J


def command_wall(args: tuple[str, ...], out: Path, tree: Path | None = None) -> tuple[float, float]:
    """Seconds of ``zsgd ARGS --out OUT`` as a user runs it (a fresh interpreter, to its exit), from ``tree``'s
    package when given (else this checkout's): wall, and CPU of the command and its children (user + system;
    on a busy machine the wall time is mostly other people's work, the CPU time much less so)."""
    import resource

    root = tree or Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": str(root)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "zsgd", *args, "--out", str(out)], cwd=root, env=env, check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def start_rows(rounds: int, baseline: Path | None, sweep_steps: list[int], sweep: tuple[str, ...] = SWEEP) -> None:
    """The ``--start`` table: every command of a round run once per tree, rounds alternating (see the docstring);
    ``sweep``: the sweep's flags (``--sweep``), without ``--steps`` and ``--jobs``."""
    trees: dict[str, Path | None] = {"this": None} | ({"baseline": baseline} if baseline else {})
    cases = {"one arm": SHORT_ARM}
    name = "4x" if sweep == SWEEP else "grid x"
    for steps in sweep_steps:
        for jobs in (1, 2):
            cases[f"{name}{steps} --jobs {jobs}"] = sweep + ("--steps", str(steps), "--jobs", str(jobs))
    times: dict[tuple[str, str], list[float]] = {(t, c): [] for t in trees for c in cases}
    cpus: dict[tuple[str, str], list[float]] = {(t, c): [] for t in trees for c in cases}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        for tree, root in trees.items():  # warm-up: numba's cache and the calibration cache of each tree
            command_wall(SWEEP + ("--steps", "100", "--jobs", "2"), Path(tmp) / f"warm-{tree}", root)
            command_wall(SHORT_ARM, Path(tmp) / f"warm1-{tree}", root)
        for r in range(rounds):
            for case, args in cases.items():
                for tree, root in trees.items():
                    wall, cpu = command_wall(args, Path(tmp) / f"{tree}-{r}-{case.replace(' ', '_')}", root)
                    times[tree, case].append(wall)
                    cpus[tree, case].append(cpu)
            loads.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"zsgd sim, whole commands (s): median of {rounds} alternating rounds; 1-minute load average "
          f"{min(loads):.2f}-{max(loads):.2f} (before and after each round)")
    head = f"{'command':<20}" + "".join(f"{t:>12}" for t in trees) + ("" if len(trees) == 1 else f"{'this/base':>11}") + "   rounds (this)"
    print(head)
    print("-" * len(head))
    for case in cases:
        row = f"{case:<20}" + "".join(f"{med[t, case]:>12.2f}" for t in trees)
        if len(trees) > 1:
            row += f"{med['this', case] / med['baseline', case]:>10.2f}x"
        print(row + "   " + " ".join(f"{v:.2f}" for v in times["this", case]))
    print("CPU of each command and its children (s, median):")
    for case in cases:
        row = f"{case:<20}" + "".join(f"{statistics.median(cpus[t, case]):>12.2f}" for t in trees)
        if len(trees) > 1:
            row += f"{statistics.median(cpus['this', case]) / statistics.median(cpus['baseline', case]):>10.2f}x"
        print(row)
    for steps in sweep_steps:
        for tree in trees:
            pairs = [b / a for a, b in zip(times[tree, f"{name}{steps} --jobs 1"], times[tree, f"{name}{steps} --jobs 2"])]
            print(f"{'4 arms' if name == '4x' else 'the grid'} of {steps} updates, --jobs 2 / --jobs 1 ({tree}): {statistics.median(pairs):.2f}x, median of the "
                  f"rounds' ratios ({', '.join(f'{p:.2f}' for p in pairs)}); goal <= 0.6x, 0.5x the limit on 2 cores")
    print(f"one arm ({'this' if len(trees) == 1 else 'this tree'}): {med['this', 'one arm']:.2f} s; goal < 1 s")


#: ``--phases``: what runs ``zsgd sim`` with a timestamp (wall since the launch, and the process's CPU) written around its
#: phases, in every process (parent, plotting helpers, arm processes). Run as ``python -c``, so nothing is imported before
#: zsgd's own start (numpy after the BLAS thread settings, as in the command); a phase is a function wrapped as its module
#: is first imported (a missing one, as in an older tree, is skipped), so the command imports what and when it would.
PHASE_TRACER = r"""
import functools, os, sys, time
T0, LOG = float(os.environ["ZSGD_PHASE_T0"]), os.environ["ZSGD_PHASE_LOG"]
def mark(what):
    with open(LOG, "a") as f:
        f.write(f"{os.getpid()}\t{time.time() - T0:.4f}\t{time.process_time():.4f}\t{what}\n")
mark("interpreter started")
WRAP = {"zsgd.commands.simulate": ["figure_helpers"], "zsgd.commands.group": ["quick_exit"],
        "zsgd.simulation.sweep": ["prepare_workload", "run_sweep", "_simulate", "write_results", "plot_sweep"],
        "zsgd.simulation.arm_files": ["calibrate_once"], "zsgd.simulation.parallel": ["ForkRunner.__init__", "ForkRunner.close", "ForkRunner.join"],
        "zsgd.output.plotter": ["_warm_up", "Plotter.close"], "zsgd.output.sweep_plots": ["sweep_figures", "curves_quietly"]}
def wrapped(fn, name):
    @functools.wraps(fn)  # the same name: a job naming it still pickles by reference
    def phase(*a, **k):
        mark("> " + name)
        try:
            return fn(*a, **k)
        finally:
            mark("< " + name)
    return phase
def patch(module):
    for attr in WRAP[module.__name__]:
        owner, _, leaf = attr.rpartition(".")
        obj = getattr(module, owner, None) if owner else module
        if obj is not None and hasattr(obj, leaf):
            setattr(obj, leaf, wrapped(getattr(obj, leaf), attr))
from importlib.machinery import PathFinder
class Finder:
    def find_spec(self, name, path=None, target=None):
        spec = PathFinder.find_spec(name, path) if name in WRAP else None
        if spec is not None:
            run = spec.loader.exec_module
            def exec_module(module):
                run(module)
                patch(module)
            spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, Finder())
sys.argv = ["zsgd"] + sys.argv[1:]
from zsgd.cli import main
main()
"""


def traced_command(args: tuple[str, ...], out: Path, log: Path, tree: Path | None = None) -> float:
    """Run ``zsgd ARGS --out OUT`` under ``PHASE_TRACER`` (marks in ``log``); returns its wall time."""
    root = tree or Path(__file__).resolve().parents[1]
    t0 = time.time()
    env = os.environ | {"PYTHONPATH": str(root), "ZSGD_PHASE_T0": repr(t0), "ZSGD_PHASE_LOG": str(log)}
    subprocess.run([sys.executable, "-c", PHASE_TRACER, *args, "--out", str(out)], cwd=root, env=env, check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.time() - t0


def phase_rows(log: Path) -> list[tuple[str, int, str, float, float, float]]:
    """(process role, depth, phase, start s, end s, CPU s) from a tracer's log, every process's phases in time order."""
    marks: dict[int, list[tuple[float, float, str]]] = {}
    for line in log.read_text().splitlines():
        pid, t, cpu, what = line.split("\t")
        marks.setdefault(int(pid), []).append((float(t), float(cpu), what))
    parent = min(marks, key=lambda p: marks[p][0][0])
    rows = []
    for pid, ms in sorted(marks.items(), key=lambda kv: kv[1][0][0]):
        names = {w[2:] for _t, _c, w in ms}
        role = ("parent" if pid == parent else "plot helper" if names & {"_warm_up", "sweep_figures", "curves_quietly"}
                else "arm process" if "_simulate" in names else "other") + f" {pid}"
        if pid == parent:
            rows.append((role, 0, "interpreter start", 0.0, ms[0][0], ms[0][1]))
        open_: list[tuple[str, float, float]] = []
        last = ms[0][:2]  # (time, CPU) where the parent's previous top-level phase ended
        for t, cpu, what in ms:
            if pid == parent and not open_ and t - last[0] > 0.01:  # between phases: imports, flag checks, directories
                rows.append((role, 0, "(between phases: imports, checks)", last[0], t, cpu - last[1]))
            if what.startswith("> "):
                open_.append((what[2:], t, cpu))
            elif what.startswith("< ") and open_:
                name, t1, c1 = open_.pop()
                rows.append((role, len(open_), name, t1, t, cpu - c1))
            last = (t, cpu)
        rows += [(role, len(open_) - 1, name + " (to the end)", t1, ms[-1][0], ms[-1][1] - c1) for name, t1, c1 in open_]
    return sorted(rows, key=lambda r: (r[0] != f"parent {parent}", r[0], r[3], r[1]))


def phases(steps: int, jobs_list: list[int], rounds: int = 1, sweep: tuple[str, ...] = SWEEP) -> None:
    """``--phases``: traced sweeps (4 arms of ``steps`` updates; ``sweep``: other flags, ``--sweep``), one per ``--jobs``
    value and round, alternating, after a warm-up: the first round's phases in full, then every round's CPU on the
    critical path, and their medians."""
    paths: dict[int, list[tuple[float, float, float]]] = {j: [] for j in jobs_list}
    walls: dict[int, list[float]] = {j: [] for j in jobs_list}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        command_wall(SWEEP + ("--steps", "100", "--jobs", "2"), Path(tmp) / "warm")
        for r in range(rounds):
            for jobs in jobs_list:
                log = Path(tmp) / f"phases-{jobs}-{r}.log"
                wall = traced_command(sweep + ("--steps", str(steps), "--jobs", str(jobs)), Path(tmp) / f"out-{jobs}-{r}", log)
                rows = phase_rows(log)
                walls[jobs].append(wall)
                paths[jobs].append(critical_cpu(rows, log))
                loads.append(os.getloadavg()[0])
                if r == 0:
                    print(f"\nzsgd sim, {'4 arms' if sweep == SWEEP else ' '.join(sweep[1:])} of {steps} updates, --jobs {jobs}: {wall:.2f} s to the exit (1-minute load average "
                          f"{loads[-1]:.2f}); seconds since the launch")
                    print(f"{'process':<20}{'phase':<58}{'start':>7}{'end':>7}{'wall':>7}{'CPU':>7}")
                    for role, depth, name, t1, t2, cpu in rows:
                        print(f"{role:<20}{'  ' * depth + name:<58}{t1:>7.2f}{t2:>7.2f}{t2 - t1:>7.2f}{cpu:>7.2f}")
    print(f"\nCPU on the critical path, as if every process had its own core (s; {rounds} round(s), 1-minute load average "
          f"{min(loads):.2f}-{max(loads):.2f}): the parent's own (start-up, data, calibration, forks, exit) + the busiest arm "
          f"process's arms + the longer figure job")
    print(f"{'--jobs':<8}{'parent':>8}{'arms':>8}{'figures':>9}{'path':>8}{'wall':>8}   paths of the rounds")
    for jobs in jobs_list:
        med = [statistics.median(p[k] for p in paths[jobs]) for k in range(3)]
        totals = [sum(p) for p in paths[jobs]]
        print(f"{jobs:<8}{med[0]:>8.2f}{med[1]:>8.2f}{med[2]:>9.2f}{statistics.median(totals):>8.2f}{statistics.median(walls[jobs]):>8.2f}"
              f"   {' '.join(f'{t:.2f}' for t in totals)}")
    if 1 in paths and 2 in paths:
        pairs = [sum(b) / sum(a) for a, b in zip(paths[1], paths[2])]
        print(f"--jobs 2 / --jobs 1 by that path: {statistics.median(pairs):.2f}x, median of the rounds ({', '.join(f'{x:.2f}' for x in pairs)}): "
              f"an estimate of an idle machine's wall ratio that other work on the cores moves less than the wall itself")


def critical_cpu(rows: list[tuple[str, int, str, float, float, float]], log: Path) -> tuple[float, float, float]:
    """From ``phase_rows``: the parent's CPU outside its arms and figures (start-up, data, calibration, forks, the rest),
    the arm CPU of the busiest process, and the CPU of the longer figure job (the helpers draw side by side)."""
    parent = rows[0][0]
    pid = int(parent.split()[-1])
    total = max(float(cpu) for p, _t, cpu, _w in (line.split("\t") for line in log.read_text().splitlines()) if int(p) == pid)
    per_process: dict[str, float] = {}
    for role, _depth, name, *_t, cpu in rows:
        if name == "_simulate":
            per_process[role] = per_process.get(role, 0.0) + cpu
    plotted_here = sum(cpu for role, _d, name, *_t, cpu in rows if role == parent and name == "plot_sweep")
    figures = max((cpu for _r, _d, name, *_t, cpu in rows if name in ("sweep_figures", "curves_quietly")), default=0.0)
    return total - per_process.get(parent, 0.0) - plotted_here, max(per_process.values(), default=0.0), figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=1024)
    ap.add_argument("--cnn-updates", type=int, default=200)
    ap.add_argument("--cnn-workers", type=int, default=64)
    ap.add_argument("--sync-rounds", type=int, default=300)
    ap.add_argument("--skip-cnn", action="store_true")
    ap.add_argument("--start", action="store_true", help="time whole zsgd sim commands instead (one short arm; 4 arms, --jobs 1 and 2)")
    ap.add_argument("--rounds", type=int, default=5, help="with --start, --speed or --phases: alternating rounds")
    ap.add_argument("--baseline", type=Path, default=None, help="with --start or --speed: another checkout to run side by side")
    ap.add_argument("--sweep-steps", default="1500,6000", help="with --start: the sweep's updates per arm, one sweep per value")
    ap.add_argument("--sweep", default=None, help="with --start or --phases: the sweep's flags instead of '" + " ".join(SWEEP[1:]) + "' "
                    "(e.g. an uneven grid: '--model logreg --quiet --algo async,ssp:4,sync'); its rows are named 'grid xN')")
    ap.add_argument("--speed", action="store_true", help="issue 22's targets: 1,024 workers x 10,000 updates and 10,000 x 100,000 "
                    "(each in a fresh interpreter; with --baseline side by side, --rounds alternating rounds)")
    ap.add_argument("--speed-cases", default=None, help="with --speed: WORKERS:UPDATES:GOAL_S,... instead of issue 22's two")
    ap.add_argument("--phases", action="store_true", help="with --start's sweep: where one traced command's wall time goes, "
                    "phase by phase in every process, for --jobs 1 and 2 (4 arms of --phase-steps updates)")
    ap.add_argument("--phase-steps", type=int, default=1500, help="with --phases: updates per arm")
    ap.add_argument("--one-case", default=None, help=argparse.SUPPRESS)  # WORKERS,UPDATES: what --speed runs per tree
    args = ap.parse_args()
    if args.one_case:
        one_case(args.one_case)
        return
    if args.speed:
        cases = SPEED_CASES if args.speed_cases is None else tuple(
            (int(w), int(u), float(g)) for w, u, g in (c.split(":") for c in args.speed_cases.split(",")))
        speed_rows(args.rounds, args.baseline, cases)
        return
    sweep = SWEEP if args.sweep is None else ("sim", *shlex.split(args.sweep))
    if args.phases:
        phases(args.phase_steps, [1, 2], args.rounds, sweep)
        return
    if args.start:
        start_rows(args.rounds, args.baseline, [int(v) for v in args.sweep_steps.split(",")], sweep)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        run_case("warm-up", "logreg", "async", 4, 20, 20, out)  # JIT compile outside the timings
        rows.append(run_case(f"logreg x{args.workers}", "logreg", "async", args.workers, args.updates, 2000, out, "scalar"))
        rows.append(run_case("sync logreg x64", "logreg", "sync", 64, args.sync_rounds, args.sync_rounds, out))
        if not args.skip_cnn:
            run_case("warm-up cnn", "cnn", "async", 2, 2, 1_000_000, out)
            rows.append(run_case(f"cnn x{args.cnn_workers}", "cnn", "async", args.cnn_workers, args.cnn_updates, 1_000_000, out))
    head = (f"{'case':<18}{'workers':>8}{'updates':>9}{'events':>9}{'sim s':>9}{'ms/upd':>8}{'grad s':>9}{'eval s':>8}"
            f"{'outside grad':>14}{'(+eval)':>9}{'virtual s':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['case']:<18}{r['workers']:>8}{r['updates']:>9}{r['events']:>9}{r['sim_s']:>9.2f}{r['per_update_ms']:>8.3f}"
              f"{r['grad_s']:>9.2f}{r['eval_s']:>8.2f}{r['outside']:>13.1%} {r['outside_with_eval']:>8.1%}{r['virtual_s']:>11.2f}")
    for r in rows:
        print(f"{r['case']}: {r['stop_reason']}")


if __name__ == "__main__":
    main()
