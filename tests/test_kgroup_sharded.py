"""``ksync:K`` and ``kasync:K`` with ``--servers K``: the coordinator decides each step, the range servers replay it.

Real runs (coordinator, range-server and worker processes on loopback). Every range must apply the same workers'
gradients for the same step: each server keeps a digest of the steps it applied (versions, workers, gradient
numbers, in order), and the summary has the coordinator's (``step_digest``) beside each range server's
(``server_stats``), taken at the same point of the log (the final gather).
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from helpers import cli, read_events, run_zsgd, start_run, stop, summary_of, wait_for, wait_for_updates, wait_for_workers

FAST = ["--model", "logreg", "--data", "embedded", "--batch-size", "32", "--heartbeat", "0.2", "--timeout", "1.5", "--quiet", "--no-plots"]


def _run(tmp_path, name, *args, timeout=180):
    out = tmp_path / name
    proc = run_zsgd("run", "--out", str(out), *FAST, *args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _same_steps_everywhere(s: dict, since: int = 0) -> None:
    """Every range server replayed exactly the coordinator's steps (those after update ``since``, where this
    process started): same digest, none missing, versions agreed."""
    assert s["step_digest"] and s["server_stats"], s
    for i, stats in s["server_stats"].items():
        assert stats["step_digest"] == s["step_digest"], (i, stats)
        assert stats["missing_gradients"] == 0 and stats["version_mismatches"] == 0, (i, stats)
        assert stats["updates"] == s["updates"] == since + stats["followed_steps"], (i, stats, s["updates"])


@pytest.mark.slow
def test_ksync_on_two_servers_is_bit_identical_to_one_server(tmp_path, no_orphans):
    """Three workers, one 1000x slower (its 10 ms steps stretched to 10 s): every step is the two fast workers'
    gradients (equal batches of 32: their weighted sum does not depend on which came first), and the straggler
    abandons its step at every round's end (WAIT abandon, from the coordinator: a sharded worker listens to every
    server while it stretches). So the run is deterministic, and splitting it over 2 servers must not change a bit."""
    common = ("--n-proc", "3", "--algo", "ksync:2", "--steps", "40", "--checkpoint-every", "0", "--optimizer", "adam", "--lr", "0.01",
              "--inject-compute", "10ms", "--stragglers", "0.34:1000x")
    one = _run(tmp_path, "one", *common)
    two = _run(tmp_path, "two", *common, "--servers", "2")
    a, b = np.load(one / "weights.npz"), np.load(two / "weights.npz")
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])
    s1, s2 = summary_of(one), summary_of(two)
    assert s2["servers"] == 2 and s1["updates"] == s2["updates"] == 40
    _same_steps_everywhere(s2)
    for s in (s1, s2):
        steps = sorted(w["steps"] for w in s["workers"].values())
        assert steps == [0, 40, 40] and s["staleness_max"] == 0, s["workers"]  # the straggler never made a round
        assert s["dropped_updates"].get("stale-round", 0) >= 30, s["dropped_updates"]  # it abandoned about every round


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ksync:2", "kasync:2"])
def test_k_rules_on_three_servers_apply_the_same_steps_at_every_range(tmp_path, no_orphans, algo):
    """Random step times: each server sees its own arrival order, and each still applies the coordinator's sets."""
    out = _run(tmp_path, "r", "--n-proc", "4", "--servers", "3", "--algo", algo, "--steps", "150", "--lr", "0.05",
               "--inject-compute", "shifted-exp:1ms,4ms")
    s = summary_of(out)
    assert s["updates"] == 150 and s["stop_reason"] == "reached 150 updates" and s["test_accuracy"] > 0.6, s
    assert s["rejected_messages"] == 0 and all(st["rejected"] == 0 for st in s["server_stats"].values()), s["server_stats"]
    assert (s["k"], s["k_min"], s["short_steps"]) == (2, 2, 0)
    _same_steps_everywhere(s)
    if algo.startswith("ksync"):
        assert s["staleness_max"] == 0 and s["dropped_updates"].get("stale-round", 0) > 0
    else:
        assert s["staleness_mean"] > 0


@pytest.mark.slow
def test_a_killed_worker_shrinks_k_at_every_range(tmp_path, no_orphans):
    """K = N = 3 over 2 servers: the coordinator finds the killed worker dead, K shrinks to two, and the range
    server, which may have seen it die earlier or later, applies the same two-gradient steps."""
    out = tmp_path / "run"
    proc = start_run(out, *FAST, "--n-proc", "3", "--servers", "2", "--algo", "ksync:3", "--lr", "0.05", "--steps", "1000000")
    try:
        pids = wait_for_workers(out, 3)
        wait_for_updates(out, 20)
        os.kill(pids[1], signal.SIGKILL)
        death = wait_for(lambda: [e for e in read_events(out) if e["event"] == "worker" and e.get("status") == "dead"], 20, what="death")
        wait_for(lambda: sum(e["event"] == "update" and e["t"] > death[0]["t"] for e in read_events(out)) >= 60, 60,
                 what="60 steps after the death")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        stop(proc, group=True)
    assert proc.returncode == 0, err[-2000:]
    s = summary_of(out)
    assert s["worker_deaths"] == 1 and (s["k"], s["k_min"]) == (3, 2) and s["short_steps"] >= 60, s
    _same_steps_everywhere(s)


@pytest.mark.slow
def test_ksync_on_two_servers_checkpoints_and_resumes(tmp_path, no_orphans):
    """The checkpoint is gathered at one point of the log (every range at the same version); --resume continues
    it on two servers, and on one."""
    out = _run(tmp_path, "r", "--n-proc", "3", "--servers", "2", "--algo", "ksync:2", "--lr", "0.05", "--steps", "120",
               "--checkpoint-every", "40")
    assert json.loads((out / "checkpoint.json").read_text())["updates"] == 120
    _same_steps_everywhere(summary_of(out))
    for servers, steps in (("2", 200), ("1", 260)):
        res = run_zsgd("run", "--resume", str(out), "--steps", str(steps), "--servers", servers, "--heartbeat", "0.2", "--timeout", "1.5",
                       "--quiet", "--no-plots", timeout=180)
        assert res.returncode == 0, res.stderr[-2000:]
        s = summary_of(out)
        assert s["updates"] == steps and s["algo"] == "ksync:2" and s["test_accuracy"] > 0.6, s
        assert s.get("servers", 1) == int(servers)
        if servers == "2":
            _same_steps_everywhere(s, since=120)
    assert sum(bool(e.get("resumed")) for e in read_events(out) if e["event"] == "start") == 2


@pytest.mark.slow
def test_sim_models_k_rules_on_k_servers(tmp_path):
    """``zsgd sim --servers 2`` takes ksync and kasync (the same rule decides, as at the runtime's coordinator)."""
    out = tmp_path / "sim"
    result = cli("sim", "--workers", "4", "--servers", "1,2", "--algo", "ksync:3,kasync:2", "--compute", "shifted-exp:2ms,5ms",
                 "--model", "logreg", "--data", "embedded", "--steps", "80", "--quiet", "--out", str(out))
    assert result.exit_code == 0, result.output
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*/summary.json"))]
    assert sorted((s["algo"], s["servers"]) for s in summaries) == [("kasync:2", 1), ("kasync:2", 2), ("ksync:3", 1), ("ksync:3", 2)]
    for s in summaries:
        assert s["updates"] == 80 and s["k_min"] == s["k"], s
        if s["algo"] == "ksync:3":
            assert s["staleness_max"] == 0 and s["dropped_updates"].get("stale-round", 0) > 0, s
