"""The one server engine (``zsgd.engine``): every driver runs it, and it settles what the drivers used to disagree on.

In-process: a recording port stands in for the broker's socket, so each
rule of the dispatch is checked on what leaves the engine, and the
simulator, the trainer and the calibration are checked to drive this very
object rather than a copy of its logic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from zsgd.algorithms import Applied, Update, make_server_algorithm
from zsgd.core.ledger import RunLedger
from zsgd.core.stopping import StopRule
from zsgd.core.tally import WorkerTally
from zsgd.engine import ServerEngine
from zsgd.nn.optim import make_optimizer
from zsgd.wire import protocol

RUN = "ab" * 6
N = 8


class Port:
    """The engine's port, recording every effect (what a driver would send or count)."""

    def __init__(self, workers: int) -> None:
        self.tallies = {w: WorkerTally() for w in range(workers)}
        self.sent: list[tuple[int, int, object]] = []  # (worker, version, coded message or None)
        self.abandoned: list[tuple[int, int]] = []
        self.rejected: list[tuple[int, str]] = []
        self.applied: list[Applied] = []

    def tally(self, worker):
        return self.tallies.get(worker)

    def live_workers(self):
        return list(self.tallies)

    def send_weights(self, worker, version, weights, coded):
        self.sent.append((worker, version, coded))

    def send_abandon(self, worker, version):
        self.abandoned.append((worker, version))

    def reject(self, worker, reason, text):
        self.rejected.append((worker, reason))

    def booked(self, a):
        self.applied.append(a)


def make_engine(algo: str = "async", workers: int = 2, compress_replies: str = "none", schedule: str = "constant",
                steps: int = 1000) -> tuple[ServerEngine, Port, RunLedger]:
    opt = make_optimizer("sgd", N, lr=0.1)
    server = make_server_algorithm(algo, np.zeros(N, np.float32), opt)
    ledger = RunLedger(StopRule(n_train=1000, batch_size=10, steps=steps), n_train=1000, log_every=1)
    codec = None
    if compress_replies != "none":
        from zsgd.compression.delta import DeltaReplyEncoder

        codec = DeltaReplyEncoder(compress_replies, N, seed=0)
    port = Port(workers)
    engine = ServerEngine(server, opt, ledger, port, run=RUN, lr_schedule=schedule, reply_codec=codec, default_batch=10)
    for w in range(workers):
        engine.add_worker(w, 0.0)
    return engine, port, ledger


def update_msg(worker: int, version: int, grad: np.ndarray | None = None, loss: float = 0.5, **meta) -> protocol.Message:
    g = np.full(N, 0.1, np.float32) if grad is None else grad
    msg = protocol.update_message(RUN, worker, version, g, 10, loss)
    msg.meta.update(meta)
    return msg


def test_async_update_is_applied_booked_and_answered():
    engine, port, ledger = make_engine("async")
    assert [s[:2] for s in port.sent] == [(0, 0), (1, 0)]  # each joiner gets the weights
    engine.receive(0, update_msg(0, 0, loss=0.7), 1.0)
    assert engine.version == 1 and ledger.updates == 1 and ledger.samples == 10
    assert port.sent[-1][:2] == (0, 1) and port.applied[-1].worker == 0
    t = port.tallies[0]
    assert (t.steps, t.samples, t.last_loss) == (1, 10, 0.7)
    assert ledger.last_loss == pytest.approx(0.7)  # log_every=1: the window is the one applied loss
    np.testing.assert_allclose(engine.weights, -0.01)  # lr 0.1 x gradient 0.1


def drive(engine: ServerEngine, port: Port, rounds: int, t: float = 2.0) -> None:
    """Answer every reply not yet answered with a good update, ``rounds`` times (a worker's loop)."""
    done = 0
    for _ in range(rounds):
        todo, done = port.sent[done:], len(port.sent)
        for worker, version, _coded in todo:
            engine.receive(worker, update_msg(worker, version), t)


def test_a_bad_update_is_rejected_and_its_sender_readmitted():
    engine, port, ledger = make_engine("async")
    engine.receive(0, update_msg(0, 0, grad=np.zeros(N + 1, np.float32)), 1.0)  # wrong shape
    assert port.rejected == [(0, "wrong-shape")] and ledger.updates == 0
    assert port.sent[-1][:2] == (0, 0)  # fresh weights: it goes on, and no round waits on it
    assert ledger.stop_reason is None


@pytest.mark.parametrize("algo", ["async", "sync", "ssp:1", "ksync:1", "kasync:1"])
def test_a_non_finite_gradient_with_a_finite_loss_is_rejected_not_a_divergence(algo):
    engine, port, ledger = make_engine(algo)
    worker, version, _ = port.sent[0]
    g = np.full(N, 0.1, np.float32)
    g[3] = np.nan
    engine.receive(worker, update_msg(worker, version, grad=g), 1.0)
    assert port.rejected == [(worker, "non-finite")]
    assert ledger.stop_reason is None and engine.version == 0
    drive(engine, port, 4)  # the run goes on: every worker is answered again, and steps are taken
    assert engine.version >= 2 and np.isfinite(engine.weights).all() and ledger.stop_reason is None


def test_a_workers_report_of_a_non_finite_loss_ends_the_run():
    engine, port, ledger = make_engine("async")
    engine.receive(1, update_msg(1, 0, non_finite=True), 1.0)
    assert ledger.stop_reason.startswith("diverged") and "worker 1" in ledger.stop_reason


def test_round_losses_enter_the_ledger_when_the_round_is_applied():
    engine, port, ledger = make_engine("sync", workers=2)
    drive(engine, port, 1)  # the first round (the first joiner alone) ends; both are in the next one
    assert ledger.updates == 1 and {w for w, v, _ in port.sent if v == 1} == {0, 1}
    steps = [t.steps for t in port.tallies.values()]
    engine.receive(0, update_msg(0, 1, loss=1.0), 3.0)
    assert ledger.updates == 1 and [t.steps for t in port.tallies.values()] == steps  # the round waits: nothing booked
    engine.receive(1, update_msg(1, 1, loss=3.0), 3.5)
    assert ledger.updates == 2
    assert ledger.last_loss == pytest.approx(2.0)  # both losses, booked with the round's step (log_every=1)
    assert [t.steps - s for t, s in zip(port.tallies.values(), steps)] == [1, 1]
    assert port.tallies[1].samples == 10


def test_reply_deltas_are_coded_and_counted_once():
    engine, port, _ledger = make_engine("async", workers=1, compress_replies="topk:0.25")
    assert port.sent[0][2] is None  # a joiner holds nothing: full weights
    engine.receive(0, update_msg(0, 0), 1.0)
    coded = port.sent[-1][2]
    assert coded is not None and "topk" in coded.codec
    dense = protocol.message_nbytes(protocol.weights_message(RUN, 1, engine.weights))
    assert engine.dense_reply_bytes == 2 * dense  # both replies, as full weights
    assert engine.reply_bytes == dense + protocol.message_nbytes(coded)  # as sent: the joiner's full weights, then the delta
    assert engine.summary()["reply_compression_ratio"] == pytest.approx(engine.dense_reply_bytes / engine.reply_bytes)
    engine.forget_replies(0)
    engine.receive(0, update_msg(0, 1), 2.0)
    assert port.sent[-1][2] is None  # forgotten (a lost delta, a rejoin): full weights again


def test_the_lr_schedule_follows_the_ledger():
    engine, _port, ledger = make_engine("async", workers=1, schedule="linear", steps=4)
    lrs = []
    for v in range(3):
        engine.receive(0, update_msg(0, v), float(v))
        lrs.append(engine.current_lr)
    assert lrs[0] == pytest.approx(0.1) and lrs[1] == pytest.approx(0.075) and lrs[2] == pytest.approx(0.05)


def test_an_update_from_a_worker_that_is_not_ready_is_not_booked():
    engine, port, ledger = make_engine("async", workers=2)
    del port.tallies[1]  # left, as far as the driver knows
    engine.apply(Update(1, 0, np.full(N, 0.1, np.float32), 10, 0.5), 1.0, 100)
    assert not any(s[0] == 1 for s in port.sent[2:])  # no reply to a gone worker
    assert ledger.updates == 1  # the algorithm applied it; the driver's membership only decides who is answered


# -- every driver runs this engine ---------------------------------------------------------------------


def _count_engine_calls(monkeypatch) -> dict[str, int]:
    calls = {"apply": 0}
    original = ServerEngine.apply

    def counted(self, *a, **k):
        calls["apply"] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(ServerEngine, "apply", counted)
    return calls


def test_the_simulator_the_trainer_and_the_calibration_drive_the_engine(tmp_path, monkeypatch):
    from zsgd.core.config import TrainConfig
    from zsgd.core.problem import Problem
    from zsgd.network import Constant
    from zsgd.runtime.trainer import train
    from zsgd.sim import SimOptions, Workload, run_arm
    from zsgd.simulation.calibrate import time_server_step

    calls = _count_engine_calls(monkeypatch)
    cfg = TrainConfig(model="logreg", data="embedded", steps=30, lr=0.02, eval_every=1000).validate()
    wl = Workload(cfg, Problem.from_config(cfg))
    s = run_arm(cfg, SimOptions(algo="async", n_workers=3, compute=Constant(0.01)), wl, tmp_path / "sim").summary
    assert calls["apply"] == s["updates"] == 30
    calls["apply"] = 0
    train(cfg, out=tmp_path / "train", show_progress=False)
    assert calls["apply"] == 30
    calls["apply"] = 0
    per_update = time_server_step(cfg, wl.model, wl.w0, "sync", workers=2, cycles=2, warmup=1)
    assert len(per_update) == 2 and calls["apply"] == 6 and all(t > 0 for t in per_update)


@pytest.mark.parametrize("algo,compress,replies", [("async", "none", "none"), ("sync", "topk:0.1", "none"), ("ssp:2", "qsgd:4", "topk:0.1"),
                                                   ("localsgd:4", "none", "none"), ("ksync:2", "none", "none"), ("kasync:2", "none", "none")])
def test_the_calibration_times_every_rule_without_a_rejection(algo, compress, replies):
    """The calibration's synthetic updates pass the very checks the broker makes (a rejection raises)."""
    from zsgd.core.config import TrainConfig
    from zsgd.core.problem import Problem
    from zsgd.simulation.calibrate import time_server_step

    cfg = TrainConfig(model="logreg", data="embedded", steps=10).validate()
    problem = Problem.from_config(cfg)
    per_update = time_server_step(cfg, problem.model, problem.model.init(0), algo, compress=compress, compress_replies=replies,
                                  workers=4, cycles=2, warmup=1)
    assert len(per_update) == 2 and all(0 < t < 1 for t in per_update) and not any(math.isnan(t) for t in per_update)
