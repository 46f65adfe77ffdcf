"""How many workers can one server feed? Real servers against the simulator's prediction, K = 1, 2, 4.

Real: ``bench_broker.measure`` -- N pipelined synthetic workers with no
compute against ``zsgd broker --servers K`` (cnn-size updates), so the
servers are the only limit and updates/s flattens where they saturate.

Simulated: ``zsgd sim --model cnn --compute 0 --workers N --servers K`` with
the simulator's defaults: the server step measured on this machine, one
range per server, and the transport measured too (``--broker-bandwidth
measured``: a short in-process ZeroMQ echo of the model's message size,
cached under the zsgd home). Once more with the transport given by hand as
before the default existed: this script's raw pyzmq echo (child processes,
8 workers) at saturation, turned into ``--broker-bandwidth`` (the bytes each
server's NIC moves per second).

``--check`` exits 1 when a K = 1 point of the defaults column is more than
20 % off the real one (the issue's fidelity bar for the saturation knee).

Prints a table and draws ``--png`` (default docs/server_capacity.png): one
colour per K, real points solid, simulated dashed.

Run: ``python benchmarks/bench_server_capacity.py [--workers 1,2,4,8] [--servers 1,2,4] [--seconds 4] [--check]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_broker import N_PARAMS, measure  # noqa: E402


TOLERANCE = 0.20


def simulated(workers: list[int], servers: list[int], out: Path, broker_bandwidth: str) -> tuple[dict[tuple[int, int], float], float]:
    """updates/s of every (workers, servers) arm of one ``zsgd sim`` grid, and the broker bandwidth it used (bytes/s)."""
    cmd = [sys.executable, "-m", "zsgd", "sim", "--model", "cnn", "--data", "embedded", "--compute", "0", "--steps", "400",
           "--eval-every", "100000000", "--literal", "--workers", ",".join(map(str, workers)), "--servers", ",".join(map(str, servers)),
           "--broker-bandwidth", broker_bandwidth, "--quiet", "--out", str(out)]
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1800)
    rates, used = {}, 0.0
    for arm in sorted(p for p in out.iterdir() if p.is_dir()):
        s = json.loads((arm / "summary.json").read_text())
        rates[(s["n_workers"], s["servers"])] = s["updates_per_s"]
        used = s["broker_bandwidth_Bps"]
    return rates, used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--servers", default="1,2,4")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--check", action="store_true", help="exit 1 if a K = 1 point of the defaults is more than 20 %% off")
    ap.add_argument("--png", default=str(Path(__file__).resolve().parents[1] / "docs" / "server_capacity.png"))
    args = ap.parse_args()
    ns = [int(x) for x in args.workers.split(",")]
    ks = [int(x) for x in args.servers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    try:
        real = {(n, k): measure("zsgd", n, k, min(2, n), args.seconds, args.warmup, tmp / f"r{n}-{k}") for k in ks for n in ns}
        echo = statistics.median(measure("raw", max(ns), 1, 2, args.seconds, args.warmup, tmp) for _ in range(2))
        nic = echo * 4 * N_PARAMS  # bytes/s one echo process moved each way at saturation
        sim_default, measured = simulated(ns, ks, tmp / "sim", "measured")
        sim_calibrated, _ = simulated(ns, ks, tmp / "sim-nic", f"{nic / 1e6:.0f}MB/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ncnn-size updates, pipelined workers with no compute, tcp loopback, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; raw echo at saturation {echo:.0f} msg/s = {nic / 1e9:.2f} GB/s each way; "
          f"the default's measured transport {measured / 1e9:.2f} GB/s each way\n")
    print("| K | workers | real updates/s | sim (defaults: transport measured) | ratio | sim (bench's echo as --broker-bandwidth) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for k in ks:
        for n in ns:
            r, a, b = real[(n, k)], sim_default[(n, k)], sim_calibrated[(n, k)]
            print(f"| {k} | {n} | {r:.1f} | {a:.1f} | {a / r:.2f} | {b:.1f} | {b / r:.2f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, k in enumerate(ks):
        c = f"C{i}"
        ax.plot(ns, [real[(n, k)] for n in ns], "o-", color=c, label=f"real, K={k}")
        ax.plot(ns, [sim_default[(n, k)] for n in ns], "s--", color=c, alpha=0.8, label=f"sim, defaults (transport measured), K={k}")
        ax.plot(ns, [sim_calibrated[(n, k)] for n in ns], ":", color=c, alpha=0.5, label=f"sim, bench's echo given, K={k}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers (no compute)")
    ax.set_ylabel("updates/s")
    ax.set_title(f"How many workers can K servers feed? cnn, {os.cpu_count()} cores")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"\nchart: {args.png}")
    off = [(n, sim_default[(n, 1)] / real[(n, 1)]) for n in ns if 1 in ks and abs(sim_default[(n, 1)] / real[(n, 1)] - 1) > TOLERANCE]
    if args.check and off:
        print(f"check failed: K = 1 points off by more than {TOLERANCE:.0%}: " + ", ".join(f"{n} workers x{r:.2f}" for n, r in off))
        raise SystemExit(1)
    if args.check:
        print(f"check passed: every K = 1 point within {TOLERANCE:.0%}" if 1 in ks else "check: no K = 1 points to check")


if __name__ == "__main__":
    main()
