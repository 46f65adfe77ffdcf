"""When does distributing pay? The batch-size crossover, predicted then confirmed.

An earlier TensorFlow parameter-server example found that with a small
per-step batch (50 images) training on several workers was *slower* than on
one machine, because every step pays two model transfers, and with a large
batch (1000) it was faster. Throughput of n async workers with per-sample
compute c, batch B and per-transfer time T (latency + bytes/bandwidth) is
about n*B / (B*c + 2T) against 1/c for one machine, so the crossover is
B* = 2T / ((n - 1) c).

This script (1) asks ``zsgd sim`` for the throughput of one machine and of n
workers behind the given network over a range of batch sizes and finds the
predicted crossover, then (2) runs the real thing: ``zsgd train`` against
``zsgd run --n-proc n`` with the same latency and bandwidth injected, at a
batch below and above the crossover.

Run: ``python benchmarks/crossover.py [--model mlp] [--workers 2] [--latency 5ms] [--bandwidth 1Gbps]``
Writes ``docs/crossover.png`` and prints the tables recorded in ``docs/simulation.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# One machine of the emulated cluster is one core: the baseline and the
# simulator's compute calibration run single-threaded, like each worker.
ENV = os.environ | {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def zsgd(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "zsgd", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, env=ENV)
    if proc.returncode != 0:
        raise SystemExit(f"zsgd {' '.join(args)} failed:\n{proc.stderr[-2000:]}")


def steady_samples_per_s(run_dir: Path, skip: float = 0.2) -> float:
    path = next(Path(run_dir).rglob("metrics.jsonl"))
    ups = [json.loads(line) for line in path.read_text().splitlines() if '"event":"update"' in line]
    a, b = ups[int(len(ups) * skip)], ups[-1]
    return (b["samples"] - a["samples"]) / (b["t"] - a["t"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--data", default="embedded")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--latency", default="5ms")
    ap.add_argument("--bandwidth", default="1Gbps")
    ap.add_argument("--batches", default="16,32,64,128,256,512,1024")
    ap.add_argument("--real-batches", default="50,1000")
    ap.add_argument("--real-seconds", type=float, default=25.0)
    args = ap.parse_args()
    common = ["--model", args.model, "--data", args.data, "--lr", "0.01", "--lr-schedule", "constant", "--momentum", "0.9",
              "--eval-every", "100000000", "--quiet"]
    batches = [int(b) for b in args.batches.split(",")]
    one, many = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for b in batches:
            steps = str(max(20, 2000 // b))
            zsgd("sim", "--workers", "1", "--compute", "measured", "--batch-size", str(b), "--steps", steps, *common, "--out", str(tmp / f"one{b}"))
            zsgd("sim", "--workers", str(args.workers), "--algo", "async", "--latency", args.latency, "--bandwidth", args.bandwidth,
                 "--compute", "measured", "--batch-size", str(b), "--steps", steps, *common, "--out", str(tmp / f"many{b}"))
            one.append(steady_samples_per_s(tmp / f"one{b}"))
            many.append(steady_samples_per_s(tmp / f"many{b}"))
        ratio = np.array(many) / np.array(one)
        crossing = None
        for i in range(1, len(batches)):
            if ratio[i - 1] < 1 <= ratio[i]:
                x0, x1, r0, r1 = np.log(batches[i - 1]), np.log(batches[i]), ratio[i - 1], ratio[i]
                crossing = float(np.exp(x0 + (1 - r0) * (x1 - x0) / (r1 - r0)))
        print(f"## Simulated: {args.model}, {args.workers} async workers, latency {args.latency}, bandwidth {args.bandwidth}\n")
        print("| batch | one machine (samples/s) | distributed (samples/s) | ratio |")
        print("|---:|---:|---:|---:|")
        for b, o, m, r in zip(batches, one, many, ratio):
            print(f"| {b} | {o:,.0f} | {m:,.0f} | {r:.2f}x |")
        print(f"\npredicted crossover batch: {crossing:.0f}" if crossing else "\nno crossover in this range")

        print(f"\n## Real: zsgd train vs zsgd run --n-proc {args.workers} with the network injected\n")
        print("| batch | one machine (samples/s) | distributed (samples/s) | ratio | simulated ratio |")
        print("|---:|---:|---:|---:|---:|")
        real = []
        for b in [int(x) for x in args.real_batches.split(",")]:
            zsgd("train", "--batch-size", str(b), "--time", str(args.real_seconds), *common, "--out", str(tmp / f"train{b}"))
            zsgd("run", "--n-proc", str(args.workers), "--algo", "async", "--inject-latency", args.latency, "--inject-bandwidth", args.bandwidth,
                 "--batch-size", str(b), "--time", str(args.real_seconds), "--checkpoint-every", "0", *common, "--out", str(tmp / f"run{b}"))
            o = json.loads((tmp / f"train{b}" / "summary.json").read_text())["samples_per_s"]
            m = steady_samples_per_s(tmp / f"run{b}")
            sim_r = float(np.interp(np.log(b), np.log(batches), ratio))
            print(f"| {b} | {o:,.0f} | {m:,.0f} | {m / o:.2f}x | {sim_r:.2f}x |")
            real.append((b, m / o))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.semilogx(batches, ratio, marker="o", label=f"{args.workers} workers / one machine (simulated)")
    ax.plot([b for b, _ in real], [r for _, r in real], "x", color="tab:red", ms=10, mew=2, label="measured: zsgd run with the network injected")
    ax.axhline(1.0, color="gray", lw=1, ls="--")
    if crossing:
        ax.axvline(crossing, color="tab:red", lw=1, ls=":", label=f"predicted crossover B = {crossing:.0f}")
    ax.set_xlabel("per-step batch size")
    ax.set_ylabel("throughput ratio")
    ax.set_title(f"{args.model}: latency {args.latency}, bandwidth {args.bandwidth}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "crossover.png", dpi=110)


if __name__ == "__main__":
    main()
