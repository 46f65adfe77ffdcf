"""Decentralized training on the real runtime: workers exchange PEER messages through the broker's relay."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest
import zmq

from helpers import (cli, join_proof, lines_of, pid_alive, read_events, run_zsgd, start_event, start_run, start_worker, start_zsgd, stop, summary_of,
                     wait_for, wait_for_updates, wait_for_workers, worker_pids)
from zsgd.wire import protocol
from zsgd.wire.protocol import Message, MsgType

FAST = ["--model", "logreg", "--data", "embedded", "--batch-size", "32", "--heartbeat", "0.2", "--timeout", "1.5", "--quiet", "--no-plots"]  # the PNGs are tested where a test looks at them


@pytest.mark.slow
def test_dsgd_on_a_ring_of_four_processes_learns_and_agrees(tmp_path, no_orphans):
    out = tmp_path / "run"
    proc = run_zsgd("run", "--n-proc", "4", "--algo", "dsgd", "--topology", "ring", "--steps", "200", "--lr", "0.05",
                    "--eval-every", "50", "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = summary_of(out)
    assert s["updates"] == 200 and s["stop_reason"] == "reached 200 updates"
    assert s["test_accuracy"] > 0.7, s
    assert s["consensus_error"] < 0.5, s
    assert s["rejected_messages"] == 0 and s["staleness_max"] == 0 and s["staleness_mean"] == 0
    assert s["samples"] == 200 * 4 * 32 and s["model_round"] == 200
    assert s["relayed_messages"] >= 200 * 8  # 4 nodes x 2 neighbours per round
    assert s["bytes_sent"] > 0 and s["bytes_received"] > 0
    events = read_events(out)
    rounds = [e for e in events if e["event"] == "update"]
    assert [e["updates"] for e in rounds] == list(range(1, 201))
    assert any(e["event"] == "train" and np.isfinite(e["loss"]) for e in events)
    evals = [e for e in events if e["event"] == "eval"]
    assert evals and all(e["consensus_error"] is not None for e in evals)
    for pid in worker_pids(out).values():
        assert not pid_alive(pid)


@pytest.mark.slow
@pytest.mark.parametrize("algo, args", [
    ("dsgt", ["--lr", "0.05"]),
    ("cadmm", ["--optimizer", "sgd", "--lr", "0.05", "--rho", "0.1", "--primal-steps", "3"]),
])
def test_dsgt_and_cadmm_finish_and_learn(tmp_path, algo, args, no_orphans):
    out = tmp_path / "run"
    proc = run_zsgd("run", "--n-proc", "4", "--algo", algo, "--topology", "ring", "--steps", "150", "--out", str(out), *args, *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = summary_of(out)
    assert s["updates"] == 150 and s["test_accuracy"] > 0.6, s
    assert np.isfinite(s["consensus_error"]) and s["consensus_error"] < 5, s


@pytest.mark.slow
def test_emulated_latency_and_a_straggler_slow_the_rounds(tmp_path, no_orphans):
    """--inject-latency holds every relayed peer message; --stragglers makes the seeded choice of node stretch its rounds."""
    from zsgd.network import parse_stragglers

    out = tmp_path / "run"
    proc = run_zsgd("run", "--n-proc", "4", "--algo", "dsgd", "--topology", "ring", "--steps", "30", "--lr", "0.05",
                    "--inject-latency", "40ms", "--stragglers", "0.25:3x", "--seed", "5", "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = summary_of(out)
    assert s["updates"] == 30 and s["relayed_messages"] >= 30 * 8
    rounds = [e["t"] for e in read_events(out) if e["event"] == "update"]
    # Every round waits for its neighbours' messages, each held 40 ms: a lower bound, not a timing guess.
    assert rounds[-1] - rounds[0] >= 29 * 0.040
    slow = parse_stragglers("0.25:3x").assign(4, 5).workers
    stalled = {int(w) for w, info in s["workers"].items() if info["emulated_stall_s"] > 0}
    assert stalled == slow and len(slow) == 1


def test_flags_are_checked_before_anything_starts(tmp_path):
    for args, needle in [(["--algo", "async", "--topology", "ring"], "decentralized"),
                         (["--algo", "dsgd", "--rho", "0.1"], "cadmm"),
                         (["--algo", "dsgd", "--topology", "moebius"], "unknown topology"),
                         (["--algo", "dsgd", "--inject-latency", "soon"], "--inject-latency")]:
        r = cli("run", "--n-proc", "4", "--steps", "5", "--out", str(tmp_path / "never"), *args, *FAST)
        lines = lines_of(r.stderr)
        assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], (args, r.output)
        assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_kill_9_of_one_worker_stops_the_run_cleanly(tmp_path, no_orphans):
    out = tmp_path / "run"
    proc = start_run(out, "--n-proc", "4", "--algo", "dsgd", "--topology", "ring", "--steps", "1000000", "--lr", "0.05", *FAST)
    try:
        pids = wait_for_workers(out, 4)
        wait_for_updates(out, 20)
        os.kill(pids[1], signal.SIGKILL)
        t_kill = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - t_kill < 15
    finally:
        stop(proc, group=True)
    lines = lines_of(err)
    # Whichever the broker notices first ends the run: the missed heartbeats,
    # or ZeroMQ refusing to route a neighbour's message to the dead worker.
    stopped = ("worker 1 died", "worker 1 is unreachable")
    assert proc.returncode == 1 and len(lines) == 1 and any(m in lines[0] for m in stopped), err[-2000:]
    s = summary_of(out)
    assert s["failed"] and s["worker_deaths"] <= 1 and any(m in s["stop_reason"] for m in stopped)
    assert s["updates"] >= 20 and np.isfinite(s["test_accuracy"])
    for pid in pids.values():
        wait_for(lambda pid=pid: not pid_alive(pid), 10, what=f"worker pid {pid} to exit")


class Rogue:
    """A hand-made worker on a raw DEALER: joins as worker ``wid``, then sends what it likes."""

    def __init__(self, address: str, wid: int) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.ROUTING_ID, b"rogue-%d" % wid)
        self.sock.connect(address)
        self.wid, self.run = wid, "-"

    def send(self, msg: Message) -> None:
        self.sock.send_multipart(protocol.encode(msg))

    def expect(self, kind: MsgType, timeout: float = 30) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.send(protocol.heartbeat(self.run, self.wid))  # stay alive while waiting
            if self.sock.poll(100):
                msg = protocol.decode(self.sock.recv_multipart())
                if msg.type == kind:
                    return msg
        raise AssertionError(f"no {kind.name} within {timeout} s")

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.mark.slow
def test_peer_message_to_a_non_neighbour_is_rejected_and_counted(tmp_path, no_orphans):
    out = tmp_path / "run"
    broker = start_zsgd("broker", "--workers", "4", "--no-evaluator", "--algo", "dsgd", "--topology", "ring", "--steps", "1000000", *FAST,
                        "--out", str(out))
    workers: list[subprocess.Popen] = []
    rogue = None
    try:
        start = start_event(out)
        address = start["address"]
        for i in range(3):
            workers.append(start_worker(address, "--id", str(i), "--heartbeat", "0.2", "--timeout", "1.5", "-q", keys=out / "keys",
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        rogue = Rogue(address, 3)
        rogue.send(Message(MsgType.HELLO, "-", 3, 0, {}, meta={"stage": "join", "role": "worker", "host": "rogue", "pid": os.getpid(),
                                                                **join_proof(out, "worker", 3)}))
        assign = rogue.expect(MsgType.ASSIGN)
        assert assign.worker == 3 and sorted(assign.meta["decentralized"]["neighbours"]) == [0, 2]
        rogue.run = assign.run
        rogue.send(Message(MsgType.HELLO, rogue.run, 3, 0, {}, meta={"stage": "ready", "role": "worker"}))
        rogue.expect(MsgType.WAIT)
        x = np.zeros(start["n_params"], np.float32)
        rogue.send(protocol.peer_message(rogue.run, 3, 1, 0, {"x": x}, codec="none"))  # 1 is not a neighbour of 3 on a ring of 4
        rogue.send(protocol.peer_message(rogue.run, 0, 2, 0, {"x": x}, codec="none"))  # and 3 is not worker 0
        rejected = wait_for(lambda: [e for e in read_events(out) if e["event"] == "rejected"], 10, what="the rejections")
        wait_for(lambda: len([e for e in read_events(out) if e["event"] == "rejected"]) >= 2, 10, what="both rejections")
        assert rejected[0]["reason"] == "not-neighbour"
        rogue.send(Message(MsgType.LEAVE, rogue.run, 3, 0, {}, meta={"reason": "done"}))
        _, err = broker.communicate(timeout=60)
        assert broker.returncode == 1 and "worker 3 left" in err, err[-2000:]
        for w in workers:
            assert w.wait(timeout=20) == 0
    finally:
        if rogue is not None:
            rogue.close()
        stop(broker, *workers)
    s = summary_of(out)
    assert s["rejected_by_reason"] == {"not-neighbour": 1, "wrong-identity": 1}
    assert s["updates"] == 0  # nobody completed a round without node 3


@pytest.mark.slow
def test_a_run_arm_matches_its_simulation_bit_for_bit(tmp_path, no_orphans):
    """Same w0, shards, batch streams and rules: the real processes compute what zsgd sim computes."""
    text = ("name: same\nproblem: {model: logreg, data: embedded, steps: 40, batch_size: 32, lr: 0.05}\ndefaults: {workers: 4}\narms:\n"
            "  - {name: sim, algo: dsgd, topology: ring, compute: 1ms}\n"
            "  - {name: real, algo: dsgd, topology: ring, mode: run, heartbeat: 0.2, timeout: 1.5}\n")
    (tmp_path / "exp.yaml").write_text(text)
    proc = run_zsgd("experiment", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "out"), "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    sim, real = (summary_of(tmp_path / "out" / d) for d in ("00-sim", "01-real"))
    assert real["mode"] == "run" and real["updates"] == sim["updates"] == 40
    assert real["test_accuracy"] == sim["test_accuracy"]
    assert real["consensus_error"] == pytest.approx(sim["consensus_error"], rel=1e-6)
