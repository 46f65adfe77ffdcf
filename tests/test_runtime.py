"""The runtime end to end: real broker and worker processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import pid_alive, port_free, read_events, run_zsgd, wait_for, zsgd_cmd

FAST = ["--model", "logreg", "--data", "embedded", "--batch-size", "32", "--lr", "0.01", "--heartbeat", "0.2", "--timeout", "1.5", "--quiet"]


def summary_of(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def worker_pids(run_dir):
    return {e["worker"]: e["pid"] for e in read_events(run_dir) if e["event"] == "worker" and e.get("role") == "worker" and e.get("pid")}


@pytest.mark.parametrize("algo", ["async", "sync", "ssp:2"])
def test_run_trains_and_cleans_up(tmp_path, algo, no_orphans):
    out = tmp_path / "run"
    proc = run_zsgd("run", "--n-proc", "2", "--algo", algo, "--steps", "150", "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = summary_of(out)
    assert s["updates"] >= 150
    assert s["test_accuracy"] > 0.6, s
    assert s["rejected_messages"] == 0
    if algo == "sync":
        assert s["staleness_max"] == 0
    else:
        assert s["staleness_mean"] > 0
    assert {"config.yaml", "metrics.jsonl", "summary.json", "weights.npz", "checkpoint.npz", "curves_vs_time.png"} <= {p.name for p in out.iterdir()}
    events = read_events(out)
    assert any(e["event"] == "eval" for e in events)
    start = next(e for e in events if e["event"] == "start")
    assert port_free(int(start["address"].rsplit(":", 1)[1]))
    for pid in worker_pids(out).values():
        assert not pid_alive(pid)


def start_run(out, *args):
    return subprocess.Popen(zsgd_cmd("run", "--out", str(out), *FAST, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)


@pytest.mark.parametrize("algo", ["async", "sync"])
def test_kill_9_one_of_four_workers(tmp_path, algo, no_orphans):
    out = tmp_path / "run"
    proc = start_run(out, "--n-proc", "4", "--algo", algo, "--steps", "3000")
    try:
        pids = wait_for(lambda: (p := worker_pids(out)) and len(p) == 4 and p, 60, what="4 workers to join")
        wait_for(lambda: any(e["event"] == "update" and e["updates"] >= 20 for e in read_events(out)), 60, what="training to start")
        os.kill(pids[1], signal.SIGKILL)
        t_kill = time.monotonic()
        death = wait_for(lambda: [e for e in read_events(out) if e["event"] == "worker" and e.get("status") == "dead"], 10, what="death")
        assert death[0]["worker"] == 1
        assert time.monotonic() - t_kill < 3 * 1.5 + 2  # within a few heartbeat timeouts
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-2000:]
    s = summary_of(out)
    assert s["updates"] >= 3000 and s["worker_deaths"] == 1
    if algo == "sync":
        dead_t = death[0]["t"]
        later = [e for e in read_events(out) if e["event"] == "update" and e["t"] > dead_t + 0.5]
        assert later, "sync rounds did not resume after the death"


@pytest.mark.parametrize("replies", ["none", "topk:0.1"])
def test_restarted_worker_rejoins_and_contributes(tmp_path, replies, no_orphans):
    """With --compress-replies the restarted worker holds no weights: it must get full ones, then deltas again."""
    out = tmp_path / "run"
    proc = start_run(out, "--n-proc", "2", "--algo", "async", "--steps", "3000", "--compress-replies", replies)
    rejoined = None
    try:
        pids = wait_for(lambda: (p := worker_pids(out)) and len(p) == 2 and p, 60, what="workers")
        address = next(e["address"] for e in read_events(out) if e["event"] == "start")
        os.kill(pids[0], signal.SIGKILL)
        wait_for(lambda: any(e["event"] == "worker" and e.get("status") == "dead" for e in read_events(out)), 10, what="death")
        rejoined = subprocess.Popen(zsgd_cmd("worker", "--connect", address, "--id", "0", "--heartbeat", "0.2", "--timeout", "1.5", "--quiet"),
                                    stdin=subprocess.DEVNULL)
        _, err = proc.communicate(timeout=180)
        assert rejoined.wait(timeout=20) == 0
    finally:
        for p in (proc, rejoined):
            if p is not None and p.poll() is None:
                p.kill()
    assert proc.returncode == 0, err[-2000:]
    events = read_events(out)
    assert any(e["event"] == "worker" and e.get("status") == "rejoined" and e["worker"] == 0 for e in events)
    t_rejoin = next(e["t"] for e in events if e.get("status") == "rejoined")
    assert any(e["event"] == "update" and e["worker"] == 0 and e["t"] > t_rejoin for e in events)
    s = json.loads((out / "summary.json").read_text())
    assert s["rejected_messages"] == 0 and s["test_accuracy"] > 0.6
    if replies != "none":
        assert 3 < s["reply_compression_ratio"] < 6  # top-10 %: an int32 index and a float32 value per kept weight


def test_kill_9_broker_then_resume(tmp_path, no_orphans):
    out = tmp_path / "run"
    proc = start_run(out, "--n-proc", "2", "--algo", "async", "--steps", "100000", "--checkpoint-every", "50")
    try:
        pids = wait_for(lambda: (p := worker_pids(out)) and len(p) == 2 and p, 60, what="workers")
        wait_for(lambda: (out / "checkpoint.json").exists() and json.loads((out / "checkpoint.json").read_text())["updates"] >= 100, 90, what="checkpoint")
        os.kill(proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        wait_for(lambda: not any(pid_alive(p) for p in pids.values()), 15, what="workers to exit after broker death")
        assert time.monotonic() - t_kill < 1.5 + 5
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    saved = json.loads((out / "checkpoint.json").read_text())["updates"]
    res = run_zsgd("run", "--resume", str(out), "--steps", str(saved + 60), "--n-proc", "2", "--heartbeat", "0.2", "--timeout", "1.5", "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    s = summary_of(out)
    assert s["updates"] >= saved + 60
    resumed = [e for e in read_events(out) if e["event"] == "start" and e.get("resumed")]
    assert resumed


def test_port_in_use_is_a_one_line_error(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        proc = run_zsgd("run", "--n-proc", "1", "--port", str(port), "--out", str(tmp_path / "r"), *FAST)
    finally:
        s.close()
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "in use" in proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["--algo", "bogus"], "unknown algorithm"),
    (["--n-proc", "0"], "--n-proc"),
    (["--lr", "-1"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--timeout", "0.1"], "--timeout"),
])
def test_bad_flags_are_one_line_errors(tmp_path, args, needle):
    proc = run_zsgd("run", "--out", str(tmp_path / "r"), *FAST, *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and needle in proc.stderr, proc.stderr


def test_resume_of_non_run_dir_fails_cleanly(tmp_path):
    proc = run_zsgd("run", "--resume", str(tmp_path))
    assert proc.returncode == 2 and "not a zsgd run directory" in proc.stderr and proc.stderr.count("\n") == 1


def test_worker_without_broker_exits_with_message(no_orphans):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    t0 = time.monotonic()
    proc = run_zsgd("worker", "--connect", f"tcp://127.0.0.1:{port}", "--join-timeout", "2", "--heartbeat", "0.2", "--timeout", "1")
    assert proc.returncode == 3
    assert "no broker answered" in proc.stderr
    assert time.monotonic() - t0 < 15


def test_ctrl_c_tears_everything_down(tmp_path, no_orphans):
    out = tmp_path / "run"
    proc = start_run(out, "--n-proc", "2", "--algo", "sync", "--steps", "100000")
    try:
        pids = wait_for(lambda: (p := worker_pids(out)) and len(p) == 2 and p, 60, what="workers")
        wait_for(lambda: any(e["event"] == "update" for e in read_events(out)), 60, what="training")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-1000:]
    assert "interrupted" in err and "Traceback" not in err
    assert not any(pid_alive(p) for p in pids.values())
    assert (out / "checkpoint.json").exists()
