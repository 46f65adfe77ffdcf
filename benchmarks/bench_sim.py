"""How fast is the simulator, and where does its time go?

Cases (all async unless named; compute time drawn from normal:5ms,1ms so runs
are deterministic; latency lognormal:10ms,0.5 each way):

* ``logreg x1024``: 1,024 simulated workers, 10,000 central updates on the
  embedded Fashion-MNIST subset. Target: under 60 s on a 2-core machine.
  The cost should follow central updates, not workers.
* ``cnn x64``: the 1.2M-parameter CNN, where the real gradients dominate.
  Target: at most 10 % of simulation time outside gradient computation.
* ``sync logreg x64``: a synchronous round costs one gradient per worker,
  so here cost follows workers x rounds (shown for contrast).

"outside grad" is (simulation real time - time inside ``WorkerStep.compute``)
/ simulation real time, shown without and with the evaluations (which a real
run also pays, in its evaluator process).

Run: ``python benchmarks/bench_sim.py [--updates 10000] [--workers 1024] [--cnn-updates 200] [--skip-cnn]``.

``--start [--rounds 5] [--baseline DIR]`` times whole ``zsgd sim`` commands instead, what a user
waits for (issue 24): one short arm (logreg, 1,500 updates), and a sweep of four such arms
(``--latency 0,10,50,200ms``; also of 6,000 updates each: ``--sweep-steps``) with ``--jobs 1`` and ``--jobs 2``, alternating in every round so a
machine that speeds up or slows down moves both; with ``--baseline DIR`` (another checkout, e.g.
``git archive OLD | tar -x -C DIR``) each command also runs from DIR, side by side.
"""

from __future__ import annotations

import argparse
import os
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


def run_case(name: str, model: str, algo: str, workers: int, updates: int, eval_every: int, out: Path) -> dict:
    cfg = TrainConfig(model=model, data="embedded", steps=updates, eval_every=eval_every, lr=0.01, log_every=50,
                      name=name).validate()
    t0 = time.perf_counter()
    workload = Workload(cfg, Problem.from_config(cfg))
    setup = time.perf_counter() - t0
    lat = parse_delay("lognormal:10ms,0.5")
    opts = SimOptions(algo=algo, n_workers=workers, compute=parse_compute("normal:5ms,1ms"),
                      network=Network(latency_up=lat, latency_down=lat))
    t0 = time.perf_counter()
    s = run_arm(cfg, opts, workload, out / name.replace(" ", "-")).summary
    total = time.perf_counter() - t0
    real, grad, ev = s["real_s"], s["gradient_real_s"], s["eval_real_s"]
    return {"case": name, "workers": workers, "updates": s["updates"], "events": s["events"], "setup_s": setup,
            "sim_s": real, "total_s": total, "grad_s": grad, "eval_s": ev, "outside": (real - grad - ev) / real,
            "outside_with_eval": (real - grad) / real, "virtual_s": s["virtual_s"], "per_update_ms": real / s["updates"] * 1e3}


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


def start_rows(rounds: int, baseline: Path | None, sweep_steps: list[int]) -> None:
    """The ``--start`` table: every command of a round run once per tree, rounds alternating (see the docstring)."""
    trees: dict[str, Path | None] = {"this": None} | ({"baseline": baseline} if baseline else {})
    cases = {"one arm": SHORT_ARM}
    for steps in sweep_steps:
        for jobs in (1, 2):
            cases[f"4x{steps} --jobs {jobs}"] = SWEEP + ("--steps", str(steps), "--jobs", str(jobs))
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
            pairs = [b / a for a, b in zip(times[tree, f"4x{steps} --jobs 1"], times[tree, f"4x{steps} --jobs 2"])]
            print(f"4 arms of {steps} updates, --jobs 2 / --jobs 1 ({tree}): {statistics.median(pairs):.2f}x, median of the "
                  f"rounds' ratios ({', '.join(f'{p:.2f}' for p in pairs)}); goal <= 0.6x, 0.5x the limit on 2 cores")
    print(f"one arm ({'this' if len(trees) == 1 else 'this tree'}): {med['this', 'one arm']:.2f} s; goal < 1 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=1024)
    ap.add_argument("--cnn-updates", type=int, default=200)
    ap.add_argument("--cnn-workers", type=int, default=64)
    ap.add_argument("--sync-rounds", type=int, default=300)
    ap.add_argument("--skip-cnn", action="store_true")
    ap.add_argument("--start", action="store_true", help="time whole zsgd sim commands instead (one short arm; 4 arms, --jobs 1 and 2)")
    ap.add_argument("--rounds", type=int, default=5, help="with --start: alternating rounds")
    ap.add_argument("--baseline", type=Path, default=None, help="with --start: another checkout to run side by side")
    ap.add_argument("--sweep-steps", default="1500,6000", help="with --start: the sweep's updates per arm, one sweep per value")
    args = ap.parse_args()
    if args.start:
        start_rows(args.rounds, args.baseline, [int(v) for v in args.sweep_steps.split(",")])
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        run_case("warm-up", "logreg", "async", 4, 20, 20, out)  # JIT compile outside the timings
        rows.append(run_case(f"logreg x{args.workers}", "logreg", "async", args.workers, args.updates, 2000, out))
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


if __name__ == "__main__":
    main()
