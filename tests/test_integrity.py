"""A default run (no --secure, loopback) admits only the processes it started, and nothing a peer
reports can crash it, stop it or change its results. Each test starts a real run and attacks it over
loopback, as another local process would."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import zmq

from helpers import broker_address, join_proof, read_events, reap, start_run, start_worker, start_zsgd, stop, summary_of, wait_for, \
    wait_for_updates, wait_for_workers
from zsgd.wire import protocol
from zsgd.wire.protocol import Message, MsgType

NET = ["--heartbeat", "0.2", "--timeout", "1.5"]
TINY = ["--model", "logreg", "--data", "embedded", "--batch-size", "32", "--quiet", "--no-plots", *NET]


def _dealer(ctx: zmq.Context, address: str, identity: bytes | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.connect(address)
    return sock


def _replies(socks: list[zmq.Socket], seconds: float) -> list[list[Message]]:
    """Every message each of ``socks`` receives within one window of ``seconds``, listened to at once (a rogue that
    must get nothing of the run, or only its one refusal)."""
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    got: dict[zmq.Socket, list[Message]] = {sock: [] for sock in socks}
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        for sock, _ in poller.poll(max(1, int(left * 1000))):
            got[sock].append(protocol.recv(sock)[1])
    return [got[sock] for sock in socks]


def _next(sock: zmq.Socket, mtype: MsgType, timeout: float = 30.0) -> Message:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.poll(100):
            msg = protocol.recv(sock)[1]
            if msg.type == mtype:
                return msg
    raise AssertionError(f"no {mtype.name} within {timeout} s")


@pytest.mark.slow
def test_a_default_run_refuses_processes_it_did_not_start(tmp_path, no_orphans):
    """Forged joins (a bad pid, no secret, a flood), a forged EVAL claiming the target, and a peer that takes the
    routing identity a worker had before identities were secret: none joins, none is told the run id, and the
    run trains on to its own end with its own numbers."""
    out = tmp_path / "run"
    proc = start_run(out, *TINY, "--n-proc", "1", "--time", "5", "--target-acc", "0.95")
    ctx = zmq.Context()
    try:
        address = broker_address(out)
        wait_for_workers(out, 1)
        wait_for_updates(out, 1)
        # 1. An evaluator HELLO with a pid that is not a number (this crashed the broker) and no proof.
        crash = _dealer(ctx, address)
        protocol.send(crash, Message(MsgType.HELLO, "any-run", -1, 0, {}, meta={"stage": "join", "role": "evaluator", "pid": "abc"}))
        # 2. Well-formed joins without the run's secret, as evaluator and as worker: an ERROR that names no run, never an ASSIGN.
        strangers = []
        for role, wid in (("evaluator", -1), ("worker", 0), ("server", 1)):
            sock = _dealer(ctx, address)
            protocol.send(sock, protocol.hello("-", wid, stage="join", role=role, proof="0" * 64))
            strangers.append(sock)
        # 3. The identities workers and evaluators used to take (predictable from their id), to hijack their routes.
        hijackers = [_dealer(ctx, address, protocol.worker_identity("", 0)), _dealer(ctx, address, b"zsgd-eval-0")]
        for sock in hijackers:
            protocol.send(sock, protocol.eval_message("-", -1, 1, 0.1, 0.999, updates=1, samples=32, t=1.0))
            protocol.send(sock, protocol.update_message("-", 0, 0, np.full(7850, 1e3, np.float32), 32, 0.1))
        # 4. A stranger's EVAL claiming the target, and one saying the model diverged.
        forger = _dealer(ctx, address)
        protocol.send(forger, protocol.eval_message("-", -1, 10, 0.01, 0.999, updates=10**12, samples=32, t=-5.0))
        protocol.send(forger, Message(MsgType.EVAL, "-", -1, 10, {}, meta={"test_loss": None, "test_acc": 0.5, "updates": 1, "samples": 1, "t": 1}))
        # 5. A flood of joins without the secret: counted, and only the first hundred answered.
        flood = _dealer(ctx, address)
        for _ in range(300):
            protocol.send(flood, protocol.hello("-", 0, stage="join", role="worker"))
        # Every rogue listened to at once, for one window (they were answered, if at all, as their messages arrived).
        *answers, crash_got, forger_got, flood_answers = _replies([*strangers, *hijackers, crash, forger, flood], 2.0)
        answers, hijacker_answers = answers[:len(strangers)], answers[len(strangers):]
        for got in answers:
            assert [m.type for m in got] == [MsgType.ERROR], got
            assert got[0].run == "-" and got[0].meta["reason"] == "unauthenticated" and got[0].meta.get("fatal")
        assert not any(m.type in (MsgType.ASSIGN, MsgType.WEIGHTS) for m in crash_got + forger_got)
        for got in hijacker_answers:
            assert not any(m.type in (MsgType.ASSIGN, MsgType.WEIGHTS) for m in got)
        assert 0 < len(flood_answers) <= 100 and all(m.type == MsgType.ERROR for m in flood_answers)
        _, err = proc.communicate(timeout=120)
    finally:
        stop(proc, group=True)
        ctx.destroy(linger=0)
    assert proc.returncode == 0, err[-2000:]
    summary = summary_of(out)
    assert "time limit" in summary["stop_reason"], summary["stop_reason"]
    assert 0.5 < summary["test_accuracy"] < 0.95
    reasons = summary["rejected_by_reason"]
    assert reasons.get("unauthenticated", 0) >= 303 and reasons.get("bad-hello", 0) >= 1, reasons
    assert reasons.get("unknown-peer", 0) >= 4, reasons  # the hijackers' messages (the forger's too, or they fail validation first)
    assert summary["refused_clients"] >= 303
    events = read_events(out)
    evals = [e for e in events if e["event"] == "eval"]
    assert evals and all(e["t"] >= 0 and e["updates"] <= summary["updates"] and e["test_acc"] < 0.95 for e in evals)
    joined = [e for e in events if e["event"] == "worker" and e.get("status") in ("joined", "rejoined")]
    assert sorted(e["role"] for e in joined) == ["evaluator", "worker"]  # the run's own two processes, no one else


@pytest.mark.slow
def test_an_admitted_evaluator_cannot_fake_results_or_stop_the_run(tmp_path, no_orphans):
    """Even a process holding the run's secret (here: the test, reading RUN_DIR/keys) is held to what it was
    asked: EVALs with out-of-range numbers, or counts that do not answer the weights sent, are rejected; one that
    claims the target, or says the model diverged, is checked by the broker's own evaluation, which decides."""
    out = tmp_path / "run"
    broker = start_zsgd("broker", "--workers", "1", "--no-evaluator", *TINY, "--time", "5", "--target-acc", "0.95", "--out", str(out))
    worker = None
    ctx = zmq.Context()
    try:
        address = broker_address(out)
        worker = start_worker(address, "--id", "0", *NET, "--quiet", keys=out / "keys")
        wait_for_updates(out, 1)
        insider = _dealer(ctx, address)
        protocol.send(insider, protocol.hello("-", -1, stage="join", role="evaluator", **join_proof(out, "evaluator", -1)))
        run = _next(insider, MsgType.ASSIGN).run
        protocol.send(insider, protocol.hello(run, -1, stage="ready", role="evaluator"))
        second = _dealer(ctx, address)  # one evaluator at a time, even with the secret
        protocol.send(second, protocol.hello("-", -1, stage="join", role="evaluator", **join_proof(out, "evaluator", -1)))
        taken = _next(second, MsgType.ERROR)
        assert taken.meta["reason"] == "evaluator-taken"
        asked = _next(insider, MsgType.WEIGHTS)
        echo = {k: asked.meta[k] for k in ("updates", "samples", "t")}
        bad = [
            protocol.eval_message(run, -1, asked.version, 0.3, 1.5, **echo),  # accuracy outside [0, 1]
            protocol.eval_message(run, -1, asked.version, 0.3, 0.5, **(echo | {"updates": 10**12})),  # counts ahead of the server
            protocol.eval_message(run, -1, asked.version, 0.3, 0.5, **(echo | {"t": -5.0})),  # a time before the run
            protocol.eval_message(run, -1, asked.version + 7, 0.3, 0.5, **echo),  # another version than the one sent
            protocol.eval_message(run, -1, asked.version, -1.0, 0.5, **echo),  # a negative loss
        ]
        for msg in bad:
            protocol.send(insider, msg)
        wait_for(lambda: sum(e["event"] == "rejected" and e["reason"] == "bad-eval" for e in read_events(out)) >= len(bad), 20,
                 what="the bad EVALs to be rejected")
        # The target "reached", in an answer that matches the request: the broker evaluates itself and goes on.
        protocol.send(insider, protocol.eval_message(run, -1, asked.version, 0.01, 0.999, **echo))
        asked = _next(insider, MsgType.WEIGHTS)
        echo = {k: asked.meta[k] for k in ("updates", "samples", "t")}
        protocol.send(insider, Message(MsgType.EVAL, run, -1, asked.version, {}, meta={"test_loss": None, "test_acc": 0.1, **echo}))
        _, err = broker.communicate(timeout=120)
        reap(worker, timeout=30)
    finally:
        stop(broker, worker, group=False)
        ctx.destroy(linger=0)
    assert broker.returncode == 0, err[-2000:]
    summary = summary_of(out)
    assert "time limit" in summary["stop_reason"], summary["stop_reason"]  # neither the fake target nor the fake divergence ended it
    assert 0.5 < summary["test_accuracy"] < 0.95
    assert summary["rejected_by_reason"].get("bad-eval") == len(bad)
    assert summary["rejected_by_reason"].get("evaluator-taken") == 1
    evals = [e for e in read_events(out) if e["event"] == "eval"]
    assert evals and all(0.5 < e["test_acc"] < 0.95 and np.isfinite(e["test_loss"]) and e["t"] >= 0 for e in evals), evals


# -- a worker trusts its broker no more than the broker trusts it --------------------------------------------------------
class FakeBroker:
    """A ROUTER on loopback that answers one HELLO join with the ASSIGN a test gives it (a hostile broker)."""

    def __init__(self, assign_meta: dict, run: str = "fake-run", worker: int = 0) -> None:
        import threading

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.hello: Message | None = None
        self._meta, self._run, self._worker = assign_meta, run, worker
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not self.sock.poll(100):
                continue
            identity, msg = protocol.recv(self.sock, router=True)
            if msg.type == MsgType.HELLO and self.hello is None:
                self.hello = msg
                assign = Message(MsgType.ASSIGN, self._run, self._worker, 0, {}, meta=dict(self._meta))
                protocol.send(self.sock, assign, identity=identity)
                return

    def close(self) -> None:
        self._thread.join(timeout=35)
        self.sock.close()
        self.ctx.term()


def _node(address: str, **kw):
    from zsgd.runtime.worker.node_options import NodeOptions

    return NodeOptions(connect=address, worker_id=0, heartbeat=0.2, timeout=3.0, join_timeout=10.0, quiet=True, shared_memory=False, **kw)


@pytest.fixture
def canary(tmp_path, monkeypatch):
    """A user-model module whose import leaves a file behind: proof that a worker ran a broker's choice."""
    (tmp_path / "zsgd_canary_model.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('imported').write_text('x')\n"
        "def make(input_shape, n_classes):\n    raise SystemExit('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "imported"


@pytest.mark.parametrize("meta, match", [
    ({}, "carries no run configuration"),
    ({"config": "not a mapping"}, "carries no run configuration"),
    ({"config": {"model": "logreg", "no_such_key": 1}}, "unusable configuration: unknown configuration key"),
    ({"config": {"model": "logreg", "batch_size": -3}}, "unusable configuration"),
    ({"config": {"model": "logreg"}}, "lacks n_workers"),
])
def test_a_worker_refuses_an_unusable_assign_with_one_line(meta, match):
    from zsgd.errors import ZsgdError
    from zsgd.node import run_node

    fake = FakeBroker(meta)
    try:
        with pytest.raises(ZsgdError, match=match) as info:
            run_node(_node(fake.address))
    finally:
        fake.close()
    assert "\n" not in str(info.value)


def test_a_worker_runs_a_user_model_only_when_started_for_it(canary):
    from zsgd.errors import ZsgdError
    from zsgd.node import run_node

    fake = FakeBroker({"config": {"model": "zsgd_canary_model:make", "data": "embedded"}, "n_workers": 1})
    try:
        with pytest.raises(ZsgdError, match="not started for; start it with --model zsgd_canary_model:make"):
            run_node(_node(fake.address))
    finally:
        fake.close()
    assert not canary.exists()  # the module was never imported
    fake = FakeBroker({"config": {"model": "zsgd_canary_model:make", "data": "embedded"}, "n_workers": 1})
    try:
        with pytest.raises(ZsgdError, match="not started for"):  # started for another user model: refused too
            run_node(_node(fake.address, model="zsgd_canary_model:other"))
    finally:
        fake.close()
    assert not canary.exists()
