"""The predecessor's LSTM scaling table, reproduced in shape: tokens/s for 1, 2, 4 workers.

    python benchmarks/bench_lstm_scaling.py --time 60 --out runs/lstm-scaling

Runs, one after the other (each ``--time`` seconds of training):

1. ``zsgd train --model lstm``: one process, the baseline (one BLAS thread);
2. ``zsgd run --n-proc N --model lstm`` for N = 1, 2, 4 (async, the broker's
   default), local worker processes;
3. ``zsgd run --remote HOSTS --n-proc 0``: two workers on two loopback "hosts"
   (127.0.0.2 and 127.0.0.3) reached over a real OpenSSH server, after
   ``zsgd remote init`` installs this checkout there (needs root and sshd, as
   the remote tests do; skipped otherwise);
4. ``zsgd sim --model lstm --workers 1,2,4,8 --steps 160`` on the predecessor's kind of
   network (cloud VMs in one zone: 0.5 ms one way, 2 Gbit/s per link), with
   the worker step measured here and the broker's update (the optimizer on
   the flat vector) timed here and passed as ``--broker-time``.

Every run uses the same per-worker batch (``--batch-size``, default 32
streams x 64 tokens) so the table compares throughput, not batch sizes.
tokens/s is counted from ``metrics.jsonl``: the tokens of the updates
applied between the first and the last one, over the time between them (so
start-up, the final evaluation and teardown are left out). Runs evaluate
only at the end (``--eval-every 1000000``), so no evaluation competes with
the workers for the cores.
Prints the markdown table for docs/benchmarks.md and writes it to OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's zsgd, as the zsgd commands below get it through PYTHONPATH
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def zsgd(*args: str, cwd: Path | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = os.environ | ONE_THREAD | {"PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "zsgd", *args]
    print("$ zsgd " + " ".join(args), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"zsgd {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def tokens_per_s(run_dir: Path) -> tuple[float, float | None]:
    """(steady tokens/s, final test perplexity) of a run or a simulated arm.

    Counted from the ``update`` events after every worker has delivered one
    (the first N updates were computed before the window opens, and counting
    them would inflate N workers' rate), to the last update.
    """
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ups = [e for e in events if e.get("event") == "update"] or [e for e in events if e.get("event") == "train"]
    summary = json.loads((run_dir / "summary.json").read_text())
    k = min(int(summary.get("n_workers") or 1), len(ups) - 2) - 1
    first, last = ups[max(k, 0)], ups[-1]
    rate = (last["samples"] - first["samples"]) / (last["t"] - first["t"]) if last["t"] > first["t"] else float("nan")
    return rate, summary.get("test_perplexity")


def server_step_seconds(model: str) -> float:
    """Median seconds of the broker's update (Adam on the flat vector), the cost --broker-time models."""
    os.environ.update(ONE_THREAD)
    import numpy as np

    from zsgd.core.config import LM_DEFAULTS
    from zsgd.data.text import load_text
    from zsgd.nn.lstm import get_lstm
    from zsgd.nn.optim import clip_grad_norm, make_optimizer

    m = get_lstm(model, load_text(None).n_classes)
    w = m.init(0)
    g = np.random.default_rng(0).standard_normal(m.n_params).astype(np.float32)
    opt = make_optimizer(LM_DEFAULTS["optimizer"], m.n_params, lr=LM_DEFAULTS["lr"])
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        clip_grad_norm(g, 1e9)
        opt.step(w, g)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def remote_run(out: Path, common: list[str]) -> Path | None:
    """Two workers on two loopback hosts over real ssh; None (with a note) where sshd is not usable."""
    sys.path.insert(0, str(REPO / "tests"))
    from sshd import HOSTS, SshServer, missing_reason  # the remote tests' own loopback sshd

    why = missing_reason()
    if why:
        print(f"skipping the ssh row: {why}")
        return None
    root = out / "ssh"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    server = SshServer.start(root / "sshd")
    try:
        src = root / "src"  # a snapshot: the wheel is built from a copy of this checkout
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, src / name)
        for folder in ("zsgd", "scripts"):
            shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc"))
        hosts = root / "hosts.txt"
        hosts.write_text("".join(f"{h} slots=1 python={sys.executable}\n" for h in HOSTS))
        ssh = ["--ssh-config", str(server.ssh_config), "--remote-dir", str(root / "remote-zsgd"), "--connect-timeout", "10"]
        zsgd("remote", "init", str(hosts), *ssh, "--system-site-packages", cwd=src)
        run_dir = out / "run-ssh-2"
        zsgd("run", "--remote", str(hosts), *ssh, "--n-proc", "0", *common, "--out", str(run_dir), cwd=root)
        return run_dir
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--time", type=float, default=60.0, help="seconds of training per run")
    ap.add_argument("--model", default="lstm")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--out", type=Path, default=Path("runs/lstm-scaling"))
    ap.add_argument("--no-ssh", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="keep runs already finished in OUT (rerun only the rest)")
    ap.add_argument("--sim-steps", type=int, default=160, help="updates per simulated arm")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # No evaluation but the final one: a pass over the 103 K test tokens costs seconds, and the
    # runs' evaluator process would compete with the workers for this machine's two cores.
    common = ["--model", args.model, "--batch-size", str(args.batch_size), "--time", f"{args.time:g}", "--eval-every", "1000000", "-q"]
    rows: list[tuple[str, str, float, float | None]] = []

    def done(d: Path) -> bool:  # --reuse: keep a finished run of an earlier invocation
        return args.reuse and (d / "summary.json").is_file()

    if not done(out / "train"):
        zsgd("train", *common, "--out", str(out / "train"))
    rows.append(("1 process (`zsgd train`)", "1", *tokens_per_s(out / "train")))
    for n in (int(x) for x in args.workers.split(",")):
        d = out / f"run-local-{n}"
        if not done(d):
            zsgd("run", "--n-proc", str(n), *common, "--out", str(d))
        rows.append((f"{n} local worker{'s' if n > 1 else ''} (`zsgd run --n-proc {n}`)", str(n), *tokens_per_s(d)))
    if not args.no_ssh:
        d = out / "run-ssh-2" if done(out / "run-ssh-2") else remote_run(out, common)
        if d is not None:
            rows.append(("2 loopback-SSH hosts (`zsgd run --remote`)", "2", *tokens_per_s(d)))

    sim_dir = out / "sim"
    arms_done = sorted(sim_dir.glob("*/summary.json")) if args.reuse and sim_dir.is_dir() else []
    if arms_done:
        broker_ms = float(json.loads(arms_done[0].read_text())["sim"]["broker_s"]) * 1e3
    else:
        broker_ms = server_step_seconds(args.model) * 1e3
        shutil.rmtree(sim_dir, ignore_errors=True)
    # The simulator computes every gradient for real: a fixed number of updates (not --time of
    # virtual time) keeps its real cost bounded; throughput is steady after a few dozen.
    sim_args = ["--model", args.model, "--batch-size", str(args.batch_size), "--steps", str(args.sim_steps),
                "--eval-every", "1000000", "-q"]
    if not arms_done:
        zsgd("sim", *sim_args, "--workers", "1,2,4,8", "--latency", "0.5ms", "--bandwidth", "2Gbps", "--compute", "measured",
             "--broker-time", f"{broker_ms:.3f}ms", "--out", str(sim_dir))
    for arm in sorted(p for p in sim_dir.iterdir() if (p / "summary.json").is_file()):
        n = json.loads((arm / "summary.json").read_text())["n_workers"]
        rows.append((f"sim: {n} worker{'s' if n > 1 else ''}, 0.5 ms, 2 Gbit/s, broker {broker_ms:.2f} ms/update", str(n), *tokens_per_s(arm)))

    # speed-up against the first row of its kind: measured rows against `zsgd train`, simulated against 1 simulated worker
    base = {"run": rows[0][2], "sim": next((r[2] for r in rows if r[0].startswith("sim:")), float("nan"))}
    lines = ["| setup | workers | tokens/s | speed-up | test perplexity |", "|---|---|---|---|---|"]
    for label, n, rate, ppl in rows:
        ref = base["sim" if label.startswith("sim:") else "run"]
        lines.append(f"| {label} | {n} | {rate:,.0f} | {rate / ref:.2f}x | {'-' if ppl is None else f'{ppl:.2f}'} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
