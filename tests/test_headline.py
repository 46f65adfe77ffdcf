"""The README's headline commands, as typed plus a small budget, must learn.

``zsgd run --n-proc 4`` and ``zsgd sim --latency 0,10,50ms`` here;
``zsgd run --remote ssh_hosts.txt`` in ``test_remote.py``
(``test_readme_headline_remote_run_learns``), which owns the real sshd and
the ``zsgd remote init`` those hosts need. Each adds only what keeps it to a
few tens of seconds on two cores: a step budget, and for ``run`` the mlp
instead of the cnn (whose every evaluation of the test set takes seconds).
Every other value is the default a user gets, so a default that stops
learning (a learning rate that diverges with the workers, a simulator that
takes values literally, a cadence that never evaluates) fails here.

"Learns" means well above chance (10 %) and a training loss that fell; the
thresholds sit ten points or more under what these budgets reach on
Fashion-MNIST or the embedded subset.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess

import pytest

from helpers import read_events, zsgd_cmd

pytestmark = pytest.mark.slow


def zsgd(*args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    """Run zsgd; one that does not end in ``timeout`` gets a Ctrl-C and fails the test with what it said and logged."""
    proc = subprocess.Popen(zsgd_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            env=os.environ | env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        run_dir = args[args.index("--out") + 1] if "--out" in args else None
        events = [e for e in read_events(run_dir) if e.get("event") not in ("update", "train")][-15:] if run_dir else []
        pytest.fail(f"zsgd {' '.join(args)} did not end within {timeout:g} s; stderr ends:\n{err[-3000:]}\nlast events: {events}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def losses(run_dir) -> list[float]:
    return [e["loss"] for e in read_events(run_dir) if e["event"] == "train" and e.get("loss") is not None]


def test_run_n_proc_4_learns(tmp_path, no_orphans):
    out = tmp_path / "run"
    proc = zsgd("run", "--n-proc", "4", "--model", "mlp", "--steps", "400", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["updates"] >= 400 and s["n_workers"] == 4 and s["worker_deaths"] == 0, s
    assert s["test_accuracy"] > 0.55, s
    loss = losses(out)
    assert len(loss) >= 5 and loss[-1] < 0.6 * loss[0], loss


def test_sim_latency_study_learns_and_latency_shows_in_time_to_accuracy(tmp_path):
    out = tmp_path / "sim"
    proc = zsgd("sim", "--latency", "0,10,50ms", "--steps", "600", "--target", "0.55", "--out", str(out), COLUMNS="80")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scaled for 8 async workers: batch 64 -> 16" in proc.stderr  # run's defaults, run's scaling
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["arm"] for r in rows] == ["lat=0ms", "lat=10ms", "lat=50ms"]
    for r in rows:
        assert float(r["final_acc"]) > 0.55, r
        assert r["time_to_target_s"], r
        loss = losses(out / r["dir"])
        assert loss[-1] < 0.6 * loss[0], (r["arm"], loss)
        assert f"│ {r['arm']} " in proc.stderr  # the table names every arm at 80 columns
    ttt = [float(r["time_to_target_s"]) for r in rows]
    assert ttt[0] < ttt[1] < ttt[2] and ttt[2] > 3 * ttt[1], ttt  # each ms of latency costs virtual time
    assert (out / "accuracy_vs_time.png").stat().st_size > 1000 and (out / "time_to_target.png").stat().st_size > 1000
