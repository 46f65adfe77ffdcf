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
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=1024)
    ap.add_argument("--cnn-updates", type=int, default=200)
    ap.add_argument("--cnn-workers", type=int, default=64)
    ap.add_argument("--sync-rounds", type=int, default=300)
    ap.add_argument("--skip-cnn", action="store_true")
    args = ap.parse_args()
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
