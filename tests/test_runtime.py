"""The runtime end to end: real broker and worker processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from helpers import (broker_address, cli, pid_alive, port_free, read_events, run_zsgd, start_run, start_worker, start_zsgd, stop, summary_of,
                     wait_for, wait_for_updates, wait_for_workers, worker_pids)
from zsgd.wire.shm import shm_dir

FAST = ["--model", "logreg", "--data", "embedded", "--batch-size", "32", "--lr", "0.01", "--heartbeat", "0.2", "--timeout", "1.5", "--quiet", "--no-plots"]  # the PNGs are tested where a test looks at them


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["async", "sync", "ssp:2"])
def test_run_trains_and_cleans_up(tmp_path, algo, no_orphans):
    out = tmp_path / "run"
    # Long enough for both workers to take part: 150 updates take a fraction of a second, less than one
    # worker can be ready before the other, and a run one worker did alone has no staleness to see.
    # The ssp run keeps every exchange on the socket (--no-shared-memory); the others go through shared memory,
    # the async one because --shared-memory overrides ZSGD_SHARED_MEMORY=0 for the run's workers too.
    flag = {"ssp:2": ("--no-shared-memory",), "async": ("--shared-memory",)}.get(algo, ())
    env = os.environ | ({"ZSGD_SHARED_MEMORY": "0"} if algo == "async" else {})
    proc = run_zsgd("run", "--n-proc", "2", "--algo", algo, "--steps", "600", "--out", str(out), *FAST, "--plots", *flag, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = summary_of(out)
    assert s["updates"] >= 150
    assert s["shared_memory_links"] == (0 if algo.startswith("ssp") else 2) and s["shared_memory_declined"] == {}
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
        assert not list(shm_dir().glob(f"zsgd-shm-{pid}-*"))  # no shared-memory file left behind


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["async", "sync"])
def test_kill_9_one_of_four_workers(tmp_path, algo, no_orphans):
    """A worker killed outright is declared dead within a few heartbeat timeouts, and the run trains on
    without it (sync: its rounds resume with three); then SIGTERM ends the run as a time limit would."""
    out = tmp_path / "run"
    proc = start_run(out, *FAST, "--n-proc", "4", "--algo", algo, "--steps", "1000000")
    try:
        pids = wait_for_workers(out, 4)
        wait_for_updates(out, 20)
        os.kill(pids[1], signal.SIGKILL)
        t_kill = time.monotonic()
        death = wait_for(lambda: [e for e in read_events(out) if e["event"] == "worker" and e.get("status") == "dead"], 10, what="death")
        assert death[0]["worker"] == 1
        assert time.monotonic() - t_kill < 3 * 1.5 + 2  # within a few heartbeat timeouts
        dead_t = death[0]["t"]
        wait_for(lambda: sum(e["event"] == "update" and e["t"] > dead_t + 0.5 for e in read_events(out)) >= 100, 60,
                 what="100 updates after the death")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        stop(proc, group=True)
    assert proc.returncode == 0, err[-2000:]
    s = summary_of(out)
    assert s["worker_deaths"] == 1 and s["stop_reason"].startswith("stopped by SIGTERM"), s


@pytest.mark.slow
@pytest.mark.parametrize("replies", ["none", "topk:0.1"])
def test_restarted_worker_rejoins_and_contributes(tmp_path, replies, no_orphans):
    """With --compress-replies the restarted worker holds no weights: it must get full ones, then deltas again."""
    out = tmp_path / "run"
    proc = start_run(out, *FAST, "--n-proc", "2", "--algo", "async", "--steps", "1000000", "--compress-replies", replies)
    rejoined = None
    try:
        pids = wait_for_workers(out, 2)
        address = broker_address(out)
        os.kill(pids[0], signal.SIGKILL)
        wait_for(lambda: any(e["event"] == "worker" and e.get("status") == "dead" for e in read_events(out)), 10, what="death")
        rejoined = start_worker(address, "--id", "0", "--heartbeat", "0.2", "--timeout", "1.5", "--quiet", keys=out / "keys")

        def contributed() -> bool:  # the restarted worker's updates count, and the run has trained a while
            events = read_events(out)
            t = next((e["t"] for e in events if e.get("status") == "rejoined"), None)
            ups = [e for e in events if e["event"] == "update"]
            return t is not None and len(ups) >= 600 and sum(e["worker"] == 0 and e["t"] > t for e in ups) >= 20

        wait_for(contributed, 120, what="the restarted worker to contribute")
        proc.send_signal(signal.SIGTERM)  # then end the run as a time limit would: no need to wait out a step budget
        _, err = proc.communicate(timeout=60)
        assert rejoined.wait(timeout=20) == 0
    finally:
        stop(proc, rejoined)
    assert proc.returncode == 0, err[-2000:]
    events = read_events(out)
    assert any(e["event"] == "worker" and e.get("status") == "rejoined" and e["worker"] == 0 for e in events)
    t_rejoin = next(e["t"] for e in events if e.get("status") == "rejoined")
    assert any(e["event"] == "update" and e["worker"] == 0 and e["t"] > t_rejoin for e in events)
    s = summary_of(out)
    assert s["rejected_messages"] == 0 and s["test_accuracy"] > 0.6
    if replies != "none":
        assert 3 < s["reply_compression_ratio"] < 6  # top-10 %: an int32 index and a float32 value per kept weight


@pytest.mark.slow
def test_kill_9_broker_then_resume(tmp_path, no_orphans):
    out = tmp_path / "run"
    proc = start_run(out, *FAST, "--n-proc", "2", "--algo", "async", "--steps", "100000", "--checkpoint-every", "50")
    try:
        pids = wait_for_workers(out, 2)
        wait_for(lambda: (out / "checkpoint.json").exists() and json.loads((out / "checkpoint.json").read_text())["updates"] >= 100, 90, what="checkpoint")
        os.kill(proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        wait_for(lambda: not any(pid_alive(p) for p in pids.values()), 15, what="workers to exit after broker death")
        assert time.monotonic() - t_kill < 1.5 + 5
    finally:
        stop(proc, group=True)
    saved = json.loads((out / "checkpoint.json").read_text())["updates"]
    res = run_zsgd("run", "--resume", str(out), "--steps", str(saved + 60), "--n-proc", "2", "--heartbeat", "0.2", "--timeout", "1.5", "--quiet",
                   "--no-plots")
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
        r = cli("run", "--n-proc", "1", "--port", str(port), "--out", str(tmp_path / "r"), *FAST)
    finally:
        s.close()
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().count("\n") == 0 and "in use" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--algo", "bogus"], "unknown algorithm"),
    (["--n-proc", "0"], "--n-proc"),
    (["--lr", "-1"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--timeout", "0.1"], "--timeout"),
    (["--start-wait", "-1"], "--start-wait"),
    (["--start-wait", "inf"], "--start-wait"),
])
def test_bad_flags_are_one_line_errors(tmp_path, args, needle):
    r = cli("run", "--out", str(tmp_path / "r"), *FAST, *args)
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().count("\n") == 0 and needle in r.stderr, r.stderr


def test_resume_of_non_run_dir_fails_cleanly(tmp_path):
    r = cli("run", "--resume", str(tmp_path))
    assert r.exit_code == 2 and "not a zsgd run directory" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.slow
def test_worker_without_broker_exits_with_message(no_orphans):
    import socket
    import subprocess

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = start_worker(f"tcp://127.0.0.1:{port}", "--join-timeout", "0.5", "--heartbeat", "0.2", "--timeout", "1",
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # it gives up after its --join-timeout (0.5 s), never hangs: the deadline allows a loaded machine
        wait_for(lambda: proc.poll() is not None, 60, what="the worker to give up on a broker that is not there")
        _, err = proc.communicate(timeout=10)
    finally:
        stop(proc)
    assert proc.returncode == 3, err
    assert "no broker answered" in err


def test_link_close_never_blocks_on_an_io_thread_that_just_ended():
    """The hang of the test above, once in many runs under load: the worker gave up on the broker just as its
    I/O thread did (it too saw no broker, for its --timeout), so close() found the thread alive, the thread then
    closed its end of the pipe, and close() sent STOP into a pipe with no peer -- a blocking send that never
    returns. The interleaving is made certain here: the thread has ended and is still reported alive."""
    import threading

    import zmq

    from zsgd.wire.link import BROKER_DEAD, BrokerLink
    from zsgd.node import UNASSIGNED_RUN

    class JustEnding:  # the I/O thread as close() saw it: alive, a moment before it closed its pipe and ended
        def __init__(self, thread: threading.Thread) -> None:
            self.thread = thread

        def is_alive(self) -> bool:
            return True

        def join(self, timeout: float | None = None) -> None:
            self.thread.join(timeout)

    s = __import__("socket").socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    ctx = zmq.Context()
    link = BrokerLink(ctx, f"tcp://127.0.0.1:{port}", b"zsgd-test-link", run=UNASSIGNED_RUN, worker=-1, heartbeat=0.05, timeout=0.2).open()
    wait_for(lambda: link.recv(timeout=0.5) is BROKER_DEAD, 30, what="the link's I/O thread to give up on the broker")
    wait_for(lambda: not link._thread.is_alive(), 30, what="the I/O thread to end")
    link._thread = JustEnding(link._thread)
    closer = threading.Thread(target=link.close, kwargs={"flush": False}, daemon=True)
    closer.start()
    closer.join(timeout=30)
    assert not closer.is_alive(), "BrokerLink.close() blocked on a pipe whose peer had closed"
    ctx.term()


@pytest.mark.slow
def test_ctrl_c_tears_everything_down(tmp_path, no_orphans):
    out = tmp_path / "run"
    proc = start_run(out, *FAST, "--n-proc", "2", "--algo", "sync", "--steps", "100000")
    try:
        pids = wait_for_workers(out, 2)
        wait_for_updates(out, 1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        stop(proc, group=True)
    assert proc.returncode == 130, err[-1000:]
    assert "interrupted" in err and "Traceback" not in err
    assert not any(pid_alive(p) for p in pids.values())
    assert (out / "checkpoint.json").exists()


@pytest.mark.slow
def test_training_waits_for_every_worker_at_the_start_barrier(tmp_path, no_orphans):
    """The first worker ready holds no weights until the second is ready too: no update comes before the
    second worker joined, and both start together (the ``barrier`` event)."""
    out = tmp_path / "run"
    broker = start_zsgd("broker", "--workers", "2", "--no-evaluator", "--steps", "200", "--start-wait", "60", "--out", str(out), *FAST)
    first = second = None
    try:
        address = broker_address(out)
        first = start_worker(address, "--id", "0", "--heartbeat", "0.2", "--timeout", "1.5", "--quiet", keys=out / "keys")
        wait_for_workers(out, 1)
        second = start_worker(address, "--id", "1", "--heartbeat", "0.2", "--timeout", "1.5", "--quiet", keys=out / "keys")
        _, err = broker.communicate(timeout=120)
        assert first.wait(timeout=30) == 0 and second.wait(timeout=30) == 0
    finally:
        stop(broker, first, second)
    assert broker.returncode == 0, err[-2000:]
    events = read_events(out)
    joined = max(e["t"] for e in events if e["event"] == "worker" and e.get("status") == "joined")
    barrier = next(e for e in events if e["event"] == "barrier")
    assert barrier["workers"] == 2 and barrier["expected"] == 2 and barrier["t"] >= joined
    assert min(e["t"] for e in events if e["event"] == "update") >= barrier["t"]


@pytest.mark.slow
def test_the_start_barrier_gives_up_on_a_missing_worker(tmp_path, no_orphans):
    """--start-wait bounds the barrier: a run expecting two workers trains with the one that came."""
    out = tmp_path / "run"
    broker = start_zsgd("broker", "--workers", "2", "--no-evaluator", "--steps", "100", "--start-wait", "0.5", "--out", str(out), *FAST)
    worker = None
    try:
        worker = start_worker(broker_address(out), "--id", "0", "--heartbeat", "0.2", "--timeout", "1.5", "--quiet", keys=out / "keys")
        _, err = broker.communicate(timeout=120)
        assert worker.wait(timeout=30) == 0
    finally:
        stop(broker, worker)
    assert broker.returncode == 0, err[-2000:]
    barrier = next(e for e in read_events(out) if e["event"] == "barrier")
    assert barrier["workers"] == 1 and barrier["expected"] == 2 and barrier["waited_s"] >= 0.5
    assert summary_of(out)["updates"] >= 100
    # --no-plots (in FAST): no PNG at the end; 'zsgd plot' draws them from the run directory later.
    assert not list(out.glob("*.png"))
    assert cli("plot", str(out), "--out", str(out)).exit_code == 0 and (out / "curves_vs_time.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("model,data", [("mlp", "embedded"), ("lstm", "text")])
def test_a_run_after_the_setup_warm_up_compiles_no_kernel(tmp_path, no_orphans, model, data):
    """scripts/setup.sh compiles the kernels once (``warm_up``) so that no run compiles any. A clean clone's first
    run still compiled 18 (5 s before its first update at load 8): the read-only variants numba keeps apart, for
    the weights a worker or the evaluator gets in a message and the gradients the broker steps with, and
    ``evaluate``'s kernel (an LSTM run: 7 more). Here, in a numba cache of its own: the warm-up of the run's model,
    then the run, whose broker and workers must load every kernel (``NUMBA_DEBUG_CACHE``: nothing 'saved')."""
    import subprocess
    import sys

    env = os.environ | {"NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    warm = subprocess.run([sys.executable, "-c", f"import zsgd.nn.models as m; m.warm_up(({model!r},))"], env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert warm.returncode == 0, warm.stderr[-2000:]
    out = tmp_path / "run"
    proc = run_zsgd("run", "--n-proc", "2", "--algo", "sync", "--steps", "20", "--out", str(out), *FAST[2:], "--model", model, "--data", data,
                    env=env | {"NUMBA_DEBUG_CACHE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    compiled = [line for text in (proc.stdout, *(p.read_text() for p in (out / "logs").glob("*.log")))
                for line in text.splitlines() if line.startswith("[cache] data saved")]
    assert compiled == [], compiled
