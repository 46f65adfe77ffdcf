"""``--servers K``: the parameter vector split over K server processes.

The split itself (ranges, optimizer state) is tested in-process; the runs
are real: a coordinator, range-server processes and workers on loopback.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from helpers import cli, events, lines_of, read_events, run_zsgd, start_run, stop, summary_of, wait_for

from zsgd.core.ranges import join_state, slice_state, split_ranges
from zsgd.errors import ZsgdError
from zsgd.wire import protocol


# -- the split --------------------------------------------------------------------------
@pytest.mark.parametrize("n,k", [(10, 1), (10, 3), (7850, 2), (7850, 7), (5, 5)])
def test_ranges_cover_the_vector_contiguously_and_evenly(n, k):
    ranges = split_ranges(n, k)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


@pytest.mark.parametrize("k", [0, -1, 11])
def test_impossible_server_counts_are_refused(k):
    with pytest.raises(ZsgdError, match="--servers"):
        split_ranges(10, k)


def test_optimizer_state_splits_and_joins_back():
    n = 11
    state = {"m": np.arange(n, dtype=np.float32), "v": np.arange(n, dtype=np.float32) * 2, "step": np.array(7, dtype=np.int64)}
    parts = [slice_state(state, n, lo, hi) for lo, hi in split_ranges(n, 3)]
    assert [len(p["m"]) for p in parts] == [3, 4, 4]
    assert all(int(p["step"]) == 7 for p in parts)
    joined = join_state(parts, n)
    assert set(joined) == set(state)
    for key in state:
        np.testing.assert_array_equal(joined[key], state[key])


# -- bad input: one line, exit 2 ----------------------------------------------------------
@pytest.mark.parametrize("args,match", [
    (["--servers", "0"], "--servers must be a whole number >= 1, got 0"),
    (["--servers", "2", "--algo", "dsgd"], "dsgd has no central model"),
    (["--servers", "8000", "--model", "logreg"], "more servers than zsgd splits a model over (at most 1,024)"),
    (["--servers", "1000", "--model", "logreg"], "would start 999 range servers on this machine"),
])
def test_bad_server_flags_are_one_line(tmp_path, args, match):
    result = cli("run", "--n-proc", "1", "--steps", "5", "--quiet", "--out", str(tmp_path / "r"), *args)
    assert result.exit_code == 2, result.output
    assert match in result.stderr
    assert len(lines_of(result.stderr)) == 1
    assert "Traceback" not in result.output


# -- real runs ------------------------------------------------------------------------------
def _run(tmp_path, name, *args, timeout=240):
    out = tmp_path / name
    proc = run_zsgd("run", "--out", str(out), "--quiet", "--no-plots", "--model", "logreg", *args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_sync_sharded_run_is_bit_identical_to_one_server(tmp_path, no_orphans):
    """Optimizers act per coordinate, so one worker's sync run must not change by a bit when split in 3."""
    common = ("--n-proc", "1", "--algo", "sync", "--steps", "40", "--checkpoint-every", "0", "--optimizer", "adam", "--lr", "0.01")
    one = _run(tmp_path, "one", *common)
    three = _run(tmp_path, "three", *common, "--servers", "3")
    a, b = np.load(one / "weights.npz"), np.load(three / "weights.npz")
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])
    assert summary_of(one)["shared_memory_links"] == 1  # one server: through shared memory, as each of the 3 is
    s = summary_of(three)
    assert s["servers"] == 3 and s["updates"] == 40
    assert sorted(s["server_stats"]) == ["1", "2"]
    assert s["shared_memory_links"] == 1 and [s["server_stats"][i]["shared_memory_links"] for i in "12"] == [1, 1]
    served = [e for e in events(three, "server") if e["status"] == "serving"]
    assert sorted(e["server"] for e in served) == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("algo,extra,shared", [
    ("async", ("--compress", "topk:0.1", "--compress-replies", "qsgd:8", "--staleness-lr"), 0),  # compressed: on the socket
    ("ssp:1", ("--inject-latency", "2ms", "--stragglers", "0.5:2x", "--secure"), 2),
    ("localsgd:2", ("--no-shared-memory",), 0),
])
def test_sharded_runs_train(tmp_path, no_orphans, algo, extra, shared):
    out = _run(tmp_path, "r", "--n-proc", "2", "--servers", "2", "--algo", algo, "--steps", "120", "--lr", "0.05", *extra)
    s = summary_of(out)
    assert s["updates"] == 120 and s["stop_reason"] == "reached 120 updates"
    assert s["test_accuracy"] > 0.5, s["test_accuracy"]
    assert s["rejected_messages"] == 0 and s["refused_clients"] == 0
    stats = s["server_stats"]["1"]
    assert stats["updates"] >= 100 and stats["range"] == list(s["server_ranges"][1])
    assert s["shared_memory_links"] == stats["shared_memory_links"] == shared and s["shared_memory_declined"] == {}
    if "--compress" in extra:
        assert s["compression_ratio"] > 2
    for w in (0, 1):
        log = (out / "logs" / f"worker-{w}.log").read_text()
        assert "joined 2 servers" in log and "done" in log


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["sync", "localsgd:2"])
def test_workers_that_start_at_once_share_every_servers_rounds(tmp_path, no_orphans, algo):
    """Forked workers and servers start within milliseconds and reach the 3 servers in different orders;
    a server that held a joiner for its next round while another put it in the current one deadlocked
    both (about 4 runs in 10 of this shape hung before servers admitted joiners into the open round)."""
    out = _run(tmp_path, "r", "--n-proc", "4", "--servers", "3", "--algo", algo, "--steps", "150", "--lr", "0.05", "--timeout", "5",
               timeout=90)
    s = summary_of(out)
    assert s["updates"] == 150 and s["worker_deaths"] == 0, s
    assert set(s["workers"]) <= {"0", "1", "2", "3"}


@pytest.mark.slow
def test_killed_server_stops_the_run_and_resume_continues(tmp_path, no_orphans):
    out = tmp_path / "r"
    proc = start_run(out, "--quiet", "--no-plots", "--model", "logreg", "--n-proc", "2", "--servers", "2", "--steps", "100000",
                     "--checkpoint-every", "20", "--heartbeat", "0.2", "--timeout", "1")
    try:
        server = wait_for(lambda: next((e for e in read_events(out) if e["event"] == "server" and e.get("status") == "serving"), None),
                          90, what="the range server to serve")
        wait_for(lambda: (out / "checkpoint.json").exists() and any(e["event"] == "update" and e["updates"] >= 60 for e in read_events(out)),
                 90, what="a checkpoint after 60 updates")
        os.kill(server["pid"], signal.SIGKILL)
        _out, err = proc.communicate(timeout=60)
    finally:
        stop(proc, group=True)
    assert proc.returncode == 1, err[-2000:]
    assert "range server 1" in err and "died" in err and "Traceback" not in err
    done = summary_of(out)["updates"]
    resumed = run_zsgd("run", "--resume", str(out), "--steps", str(done + 60), "--quiet", "--no-plots", timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    s = summary_of(out)
    assert s["updates"] == done + 60 and s["servers"] == 2


# -- the simulator's model of K servers --------------------------------------------------------
def test_sim_times_one_range_per_server_and_widens_the_servers_nic(tmp_path, monkeypatch):
    """--servers K: the measured step is the largest range's (timed for real), and the K servers' NICs carry the bytes."""
    import zsgd.simulation.calibrate as calibrate

    sizes = []
    real = calibrate.time_server_step

    def recording(cfg, model, w0, *args, **kw):
        sizes.append((w0.size, kw.get("clip")))
        return real(cfg, model, w0, *args, **kw)

    monkeypatch.setattr(calibrate, "time_server_step", recording)
    monkeypatch.setenv("ZSGD_CALIBRATION_DIR", str(tmp_path / "calibration"))  # measured here, not found in the session's cache
    out = tmp_path / "sim"
    result = cli("sim", "--model", "logreg", "--workers", "4", "--servers", "1,3", "--compute", "1ms", "--steps", "60",
                 "--broker-bandwidth", "100Mbps", "--quiet", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(sizes) == [(2617, False), (7850, True)]
    arms = sorted(p for p in out.iterdir() if p.is_dir())
    s1, s3 = (summary_of(a) for a in arms)
    assert s1["servers"] == 1 and s3["servers"] == 3
    # the same bytes over three NICs instead of one: the NIC-bound run goes faster
    assert s3["updates_per_s"] > s1["updates_per_s"]


@pytest.mark.parametrize("args,match", [
    (["--servers", "0"], "--servers must be a whole number >= 1"),
    (["--servers", "x"], "bad --servers 'x'"),
    (["--servers", "2", "--algo", "dsgd"], "dsgd has no central model"),
])
def test_sim_bad_servers_is_one_line(tmp_path, args, match):
    result = cli("sim", "--model", "logreg", "--workers", "4", "--steps", "10", "--quiet", "--out", str(tmp_path / "s"), *args)
    assert result.exit_code == 2 and match in result.stderr and len(lines_of(result.stderr)) == 1, result.output


class _FakeServers:
    """A coordinator and range servers as bare ROUTER sockets, and a worker's links to them (real ZeroMQ on loopback)."""

    def __init__(self, n: int) -> None:
        import zmq

        from zsgd.runtime.worker.node_options import NodeOptions
        from zsgd.wire.link import BrokerLink

        self.ctx = zmq.Context()
        self.sockets = [self.ctx.socket(zmq.ROUTER) for _ in range(n)]
        ports = [sock.bind_to_random_port("tcp://127.0.0.1") for sock in self.sockets]
        self.run = "c" * 12
        self.links = [BrokerLink(self.ctx, f"tcp://127.0.0.1:{p}", b"w-5", run=self.run, worker=5, heartbeat=0.1, timeout=30).open()
                      for p in ports]
        self.opts = NodeOptions(connect=self.links[0].address, worker_id=5, join_timeout=60, heartbeat=0.1, timeout=30, quiet=True)
        self.identity: list = [None] * n

    def recv(self, i: int):
        """The next message the worker sent to socket ``i`` (heartbeats included), decoded."""
        from zsgd.wire.frames import decode

        assert self.sockets[i].poll(10_000), f"nothing reached socket {i}"
        frames = self.sockets[i].recv_multipart()
        self.identity[i] = frames[0]
        return decode(frames[1:])

    def recv_stage(self, i: int, stage: str) -> None:
        while (m := self.recv(i)).type != protocol.MsgType.HELLO or m.meta.get("stage") != stage:
            pass

    def send(self, i: int, msg) -> None:
        from zsgd.wire.frames import encode

        if self.identity[i] is None:
            self.recv(i)  # a heartbeat names the worker's socket
        self.sockets[i].send_multipart([self.identity[i], *encode(msg)])

    def close(self) -> None:
        for link in self.links:
            link.close()
        for sock in self.sockets:
            sock.close(0)
        self.ctx.term()


def test_a_worker_joining_range_servers_keeps_weights_that_come_meanwhile():
    """Weights from the coordinator, or from a server that has answered, while another server's ASSIGN is
    awaited, are kept for the training loop (dropping them left the worker waiting for ever)."""
    import threading

    from zsgd.runtime.worker.sharded_worker import _join_servers
    from zsgd.wire.protocol import MsgType

    fake = _FakeServers(3)
    early: list = []
    result: list = []
    worker = threading.Thread(target=lambda: result.append(_join_servers(fake.opts, fake.links, early)), daemon=True)
    try:
        for link in fake.links[1:]:
            link.send(protocol.hello(fake.run, 5, stage="join", role="worker"))
        worker.start()
        fake.send(0, protocol.weights_message(fake.run, 3, np.ones(4, np.float32)))
        fake.recv_stage(1, "join")
        fake.send(1, protocol.assign(fake.run, 5, {}))
        fake.recv_stage(1, "ready")
        fake.send(1, protocol.weights_message(fake.run, 7, np.ones(2, np.float32)))
        wait_for(lambda: len(early) == 2, 20, interval=0.01, what="both weights to be kept")
        fake.recv_stage(2, "join")
        fake.send(2, protocol.assign(fake.run, 5, {}))
        fake.recv_stage(2, "ready")
        worker.join(20)
        assert result == [None]
        assert sorted((i, m.type, m.version) for i, m in early) == [(0, MsgType.WEIGHTS, 3), (1, MsgType.WEIGHTS, 7)]
    finally:
        fake.close()


def test_a_worker_joining_range_servers_leaves_when_the_run_ends_meanwhile():
    """A late worker waits for a range server's ASSIGN; the coordinator's LEAVE (the run ended before it
    joined) ends the wait at once, not after --join-timeout."""
    from zsgd.runtime.worker.node_options import EXIT_OK
    from zsgd.runtime.worker.sharded_worker import _join_servers

    fake = _FakeServers(2)
    try:
        fake.send(0, protocol.leave(fake.run, 5, "reached 10 updates"))
        assert _join_servers(fake.opts, fake.links, []) == EXIT_OK  # waiting out the join timeout would be EXIT_BROKER_GONE
    finally:
        fake.close()


def test_a_sharded_worker_handed_unusable_shared_memory_weights_exits_with_one_line(monkeypatch, capsys):
    """As the single-broker worker: weights in shared memory that are not what the message says end it, no traceback."""
    from types import SimpleNamespace

    from zsgd.core.config import TrainConfig
    from zsgd.core.problem import Problem
    from zsgd.runtime.worker import sharded_worker
    from zsgd.runtime.worker.node_options import EXIT_BAD_REPLY, NodeOptions

    cfg = TrainConfig(model="logreg", data="embedded")
    problem = Problem.from_config(cfg)
    ds = problem.dataset

    def unusable(links, timeout):
        raise protocol.ProtocolError("bad-schema", "weights in shared memory this worker never offered")

    monkeypatch.setattr(sharded_worker, "recv_any", unusable)
    n = problem.model.n_params
    links = [SimpleNamespace(worker=0, address="tcp://127.0.0.1:1")]
    opts = NodeOptions(connect="tcp://127.0.0.1:1", shared_memory=False)
    code = sharded_worker._loop(opts, links, cfg, {"algo": "async"}, problem.model, ds.x_train[:64], ds.y_train[:64], [(0, n)])
    assert code == EXIT_BAD_REPLY
    err = capsys.readouterr()
    assert "unusable weights" in err.out + err.err and "Traceback" not in err.out + err.err


def test_a_range_server_answers_the_final_gather_once_it_has_taken_the_last_update(monkeypatch):
    """The coordinator's final gather names its version; a range server whose copy of the last gradient is still on
    its way answers once it has applied it (else one range of weights.npz missed the run's last step: found as a
    1e-5 difference in a third of the weights, under load), and gives up waiting well inside the coordinator's wait."""
    from types import SimpleNamespace

    from zsgd.runtime.server import range_server
    from zsgd.wire import protocol

    class Link:
        run = "ab" * 6

        def __init__(self):
            self.inbox = []

        def recv(self, timeout=0):
            return self.inbox.pop(0) if self.inbox else None

    control = range_server._Control(SimpleNamespace(timeout=4.0, connect="tcp://127.0.0.1:1"), Link(), None,
                                    SimpleNamespace(version=39), 1)
    answered = []
    monkeypatch.setattr(control, "answer", lambda tag, full: answered.append((tag, full)))
    control._last_stats = float("inf")  # no periodic stats in this test
    control.link.inbox.append(protocol.state_request(Link.run, 7, True, at=40))
    control.tick(None)
    assert answered == []  # one update behind: it waits
    control.service.version = 40
    control.tick(None)
    assert answered == [(7, True)]
    control.link.inbox.append(protocol.state_request(Link.run, 8, False))  # no version named (evaluations): at once
    control.tick(None)
    assert answered[-1] == (8, False)
    control.link.inbox.append(protocol.state_request(Link.run, 9, True, at=41))
    control.tick(None)
    now = range_server.time.monotonic()
    monkeypatch.setattr(range_server.time, "monotonic", lambda: now + 2.5)  # past max(1 s, timeout / 2): the gradient never came
    control.tick(None)
    assert answered[-1] == (9, True)
