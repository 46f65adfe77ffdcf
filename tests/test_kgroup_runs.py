"""``ksync:K`` and ``kasync:K`` in real runs (broker and worker processes on loopback) and in the simulator:
training, a killed worker (K shrinks to the live workers, and the log and summary say so), checkpoint and
resume, divergence, experiments."""

from __future__ import annotations

import json
import os
import signal

import pytest

from helpers import (cli, read_events, run_zsgd, start_run, stop, summary_of, wait_for, wait_for_updates, wait_for_workers)

FAST = ["--model", "logreg", "--data", "embedded", "--batch-size", "32", "--lr", "0.01", "--heartbeat", "0.2", "--timeout", "1.5",
        "--quiet", "--no-plots"]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ksync:3", "kasync:2"])
def test_k_rules_train_with_random_compute_times(tmp_path, algo, no_orphans):
    """Four workers, steps of random length: K-sync drops the late gradients (counted), K-async takes them stale."""
    out = tmp_path / "run"
    proc = run_zsgd("run", "--n-proc", "4", "--algo", algo, "--steps", "150", "--inject-compute", "shifted-exp:2ms,8ms",
                    "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = summary_of(out)
    assert s["updates"] == 150 and s["test_accuracy"] > 0.6 and s["rejected_messages"] == 0, s
    assert (s["k"], s["k_min"], s["short_steps"]) == (int(algo[-1]), int(algo[-1]), 0)
    ups = [e for e in read_events(out) if e["event"] == "update"]
    assert {e["worker"] for e in ups} == {-1}  # every step is one of K gradients
    if algo.startswith("ksync"):
        assert s["staleness_max"] == 0 and s["dropped_updates"].get("stale-round", 0) > 0
    else:
        assert s["staleness_mean"] > 0 and not s["dropped_updates"].get("stale-round")
    config = (out / "config.yaml").read_text()
    assert "inject_compute: shifted-exp:2ms,8ms" in config


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ksync:4", "kasync:4"])
def test_killed_worker_shrinks_k_and_the_run_goes_on(tmp_path, algo, no_orphans):
    """K = N: a killed worker would leave every step one gradient short; K shrinks to the three alive, the
    metrics log it (a "k" event) and the summary counts the short steps."""
    out = tmp_path / "run"
    proc = start_run(out, *FAST, "--n-proc", "4", "--algo", algo, "--steps", "1000000")
    try:
        pids = wait_for_workers(out, 4)
        wait_for_updates(out, 20)
        os.kill(pids[1], signal.SIGKILL)
        death = wait_for(lambda: [e for e in read_events(out) if e["event"] == "worker" and e.get("status") == "dead"], 10, what="death")
        dead_t = death[0]["t"]
        wait_for(lambda: sum(e["event"] == "update" and e["t"] > dead_t for e in read_events(out)) >= 60, 60,
                 what="60 steps after the death")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        stop(proc, group=True)
    assert proc.returncode == 0, err[-2000:]
    s = summary_of(out)
    assert s["worker_deaths"] == 1 and (s["k"], s["k_min"]) == (4, 3) and s["short_steps"] >= 60, s
    notes = [e for e in read_events(out) if e["event"] == "k"]
    assert notes and notes[-1]["k"] == 3 and notes[-1]["requested"] == 4 and notes[-1]["live"] == 3, notes
    first_step = next(e["t"] for e in read_events(out) if e["event"] == "update")
    assert len(notes) == 1 and notes[0]["t"] > first_step  # said once, when the worker was found dead (not at the start)


@pytest.mark.slow
def test_ksync_checkpoints_and_resumes(tmp_path, no_orphans):
    out = tmp_path / "run"
    first = run_zsgd("run", "--n-proc", "3", "--algo", "ksync:2", "--steps", "120", "--checkpoint-every", "40", "--out", str(out), *FAST)
    assert first.returncode == 0, first.stderr[-2000:]
    saved = json.loads((out / "checkpoint.json").read_text())["updates"]
    assert saved == 120
    res = run_zsgd("run", "--resume", str(out), "--steps", "200", "--n-proc", "3", "--heartbeat", "0.2", "--timeout", "1.5", "--quiet",
                   "--no-plots")
    assert res.returncode == 0, res.stderr[-2000:]
    s = summary_of(out)
    assert s["updates"] == 200 and s["algo"] == "ksync:2" and s["test_accuracy"] > 0.6, s
    assert any(e["event"] == "start" and e.get("resumed") for e in read_events(out))


@pytest.mark.slow
def test_a_diverging_kasync_run_says_so_and_exits_3(tmp_path, no_orphans):
    out = tmp_path / "run"
    proc = run_zsgd("run", "--n-proc", "2", "--algo", "kasync:2", "--model", "mlp", "--data", "embedded", "--lr", "50", "--steps", "200",
                    "--heartbeat", "0.2", "--timeout", "1.5", "--quiet", "--no-plots", "--out", str(out), timeout=180)
    assert proc.returncode == 3, proc.stderr[-2000:]
    s = summary_of(out)
    assert s["diverged"] is True and "diverged at update" in s["stop_reason"]


@pytest.mark.slow
def test_simulated_failure_shrinks_k_as_the_runtime_does(tmp_path):
    """The simulator drives the same rule: a worker that dies for good at 0.5 s leaves ksync:4 stepping on three."""
    out = tmp_path / "sim"
    result = cli("sim", "--workers", "4", "--algo", "ksync:4,kasync:4", "--compute", "shifted-exp:5ms,10ms", "--failures", "1@0.5s",
                 "--detect", "0.2s", "--model", "logreg", "--data", "embedded", "--steps", "150", "--out", str(out))
    assert result.exit_code == 0, result.stderr[-2000:]
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*/summary.json"))]
    assert len(summaries) == 2
    for s in summaries:
        assert s["worker_deaths"] == 1 and (s["k"], s["k_min"]) == (4, 3) and s["short_steps"] > 0, s
    ksync = next(s for s in summaries if s["algo"] == "ksync:4")
    assert ksync["staleness_max"] == 0


@pytest.mark.slow
def test_ksync_backup_worker_abandons_its_step(tmp_path, no_orphans):
    """One worker of four is 1000x slower: each of its steps is drawn 20 ms and stretched to 20 s. With K = 3 the
    others make every round, and at each round's end the straggler abandons its step (WAIT abandon), sends what it
    has (dropped as late) and starts on the new weights, so its late gradients are about one per round. A worker
    that could not abandon would send one in the whole run."""
    out = tmp_path / "run"
    proc = run_zsgd("run", "--n-proc", "4", "--algo", "ksync:3", "--steps", "60", "--inject-compute", "20ms", "--stragglers", "0.25:1000x",
                    "--out", str(out), *FAST, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = summary_of(out)
    assert s["updates"] == 60 and s["worker_deaths"] == 0, s
    assert s["dropped_updates"].get("stale-round", 0) >= 40, s["dropped_updates"]
