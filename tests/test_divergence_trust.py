"""Workers' losses only suggest a divergence: one admitted process reporting a NaN or a huge loss cannot stop a
run by itself. The ledger names the workers whose own losses crossed the threshold; the broker ends the run when
two of them agree (in a run of one worker, that one) or when its own evaluation of its model does."""

from __future__ import annotations

import math
import signal
import time

import numpy as np
import pytest
import zmq

from helpers import broker_address, join_proof, reap, read_events, start_worker, start_zsgd, stop, summary_of, wait_for, wait_for_updates
from zsgd.core.ledger import DIVERGE_PATIENCE, RunLedger
from zsgd.core.stopping import StopRule
from zsgd.wire import protocol
from zsgd.wire.protocol import Message, MsgType


def _ledger(quorum: int | None, own_model_diverged: bool = False, log_every: int = 4):
    """A ledger whose driver confirms a divergence when ``quorum`` workers agree or its own model says so
    (``quorum`` None: no check, the losses are trusted, as in the simulator)."""
    events: list[tuple] = []
    ledger = RunLedger(StopRule(n_train=10**6, batch_size=1), n_train=10**6, log_every=log_every,
                       emit=lambda event, t, **kw: events.append((event, kw)))
    asked: list[tuple[float, frozenset]] = []
    if quorum is not None:
        def confirm(limit: float, workers: frozenset) -> bool:
            asked.append((limit, workers))
            return len(workers) >= quorum or own_model_diverged
        ledger.confirm_divergence = confirm
    return ledger, events, asked


def _window(ledger: RunLedger, losses: dict[int, float], t: float = 1.0) -> None:
    """One logging window: each worker's loss, once per update, until the window is logged."""
    for w in range(ledger.log_every):
        worker = list(losses)[w % len(losses)]
        ledger.loss(losses[worker], worker)
        ledger.applied(t, version=ledger.updates + 1, n_samples=1, worker=worker)


def test_without_a_check_a_non_finite_loss_ends_the_run_as_before():
    ledger, _, _ = _ledger(None)
    assert ledger.loss(math.nan, 3) is False
    assert ledger.diverged and "on worker 3" in ledger.stop_reason


def test_one_workers_non_finite_loss_is_not_taken_and_two_workers_end_the_run():
    ledger, events, asked = _ledger(quorum=2)
    _window(ledger, {0: 2.0, 1: 2.1})
    assert ledger.loss(math.nan, 1) is False
    assert not ledger.diverged and ledger.unconfirmed_divergences == 1
    assert asked[-1] == (math.inf, frozenset({1}))
    assert [kw["workers"] for e, kw in events if e == "unconfirmed_divergence"] == [[1]]
    ledger.loss(math.inf, 0)  # a second worker agrees within the same window
    assert ledger.diverged and asked[-1] == (math.inf, frozenset({0, 1}))


def test_one_reporter_cannot_raise_the_reference_loss():
    ledger, _, _ = _ledger(quorum=2)
    ledger.loss(1e30, 1)  # a hostile first report
    ledger.loss(2.0, 0)
    ledger.loss(1e-3, 1)  # not its first: the reference stays the lowest *first* loss
    assert ledger.first_loss == 2.0


def test_the_drivers_own_check_can_confirm_what_one_worker_says():
    ledger, _, _ = _ledger(quorum=2, own_model_diverged=True)
    ledger.loss(math.nan, 1)
    assert ledger.diverged


def test_one_workers_exploded_loss_does_not_end_the_run_but_every_workers_does():
    ledger, events, asked = _ledger(quorum=2)
    _window(ledger, {0: 2.0, 1: 2.0})
    _window(ledger, {0: 2.0, 1: 1e30})  # the window's mean explodes past 100^2 x the start, on worker 1's word
    assert not ledger.diverged and ledger.unconfirmed_divergences == 1
    limit, workers = asked[-1]
    assert workers == {1} and limit == pytest.approx(1e4 * 2.0)
    _window(ledger, {0: 2.0, 1: 2.0})  # the next window is clean: the suspicion left nothing behind
    assert not ledger.diverged and ledger.unconfirmed_divergences == 1
    _window(ledger, {0: 1e6, 1: 1e7})
    assert ledger.diverged and asked[-1][1] == {0, 1}


def test_a_loss_that_stays_high_needs_two_workers_over_the_patience_windows():
    ledger, _, asked = _ledger(quorum=2)
    _window(ledger, {0: 2.0, 1: 2.0})
    for _ in range(DIVERGE_PATIENCE):
        _window(ledger, {0: 2.0, 1: 1000.0})  # 100x < mean ~500 < 10^4 x the start: only worker 1 is high
    assert not ledger.diverged and asked[-1][1] == {1}
    for i in range(DIVERGE_PATIENCE):
        _window(ledger, {0: 2.0 if i else 900.0, 1: 1000.0})  # worker 0 is high in one of the windows: both agree
    assert ledger.diverged and "stayed above" in ledger.stop_reason and asked[-1][1] == {0, 1}


# -- against a real broker ------------------------------------------------------------------------------------------------
NET = ["--heartbeat", "0.2", "--timeout", "5"]  # the insider sends no heartbeats: its messages keep it alive


def _next(sock: zmq.Socket, types: tuple[MsgType, ...], timeout: float = 30.0) -> Message:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.poll(100):
            msg = protocol.recv(sock)[1]
            if msg.type in types:
                return msg
    raise AssertionError(f"none of {[t.name for t in types]} within {timeout} s")


@pytest.mark.slow
def test_an_admitted_worker_reporting_nan_and_huge_losses_cannot_stop_the_run(tmp_path, no_orphans):
    """A process holding the run's secret joins as worker 1 beside an honest worker 0 and reports a NaN loss,
    then a window of finite gradients with a loss of 1e30: the broker's own evaluation finds its model sound, the
    NaN report is rejected (its sender re-admitted) and the run trains on (until the test interrupts it)."""
    out = tmp_path / "run"
    broker = start_zsgd("broker", "--workers", "2", "--no-evaluator", "--model", "logreg", "--data", "embedded",
                        "--batch-size", "32", "--log-every", "10", "--time", "120", "--quiet", "--no-plots", *NET, "--out", str(out))
    worker, ctx = None, zmq.Context()
    try:
        address = broker_address(out)
        worker = start_worker(address, "--id", "0", *NET, "--quiet", keys=out / "keys")
        insider = ctx.socket(zmq.DEALER)
        insider.linger = 0
        insider.connect(address)
        protocol.send(insider, protocol.hello("-", 1, stage="join", role="worker", **join_proof(out, "worker", 1)))
        assign = _next(insider, (MsgType.ASSIGN,))
        run = assign.run
        protocol.send(insider, protocol.hello(run, 1, stage="ready"))
        weights = _next(insider, (MsgType.WEIGHTS,))
        n = weights.arrays["w"].size
        protocol.send(insider, protocol.update_message(run, 1, weights.version, None, 32, math.nan))
        weights = _next(insider, (MsgType.WEIGHTS,))  # re-admitted: fresh weights
        wait_for_updates(out, 20)  # worker 0's losses have set the reference by now
        for _ in range(30):  # finite (zero) gradients, each with a loss of 1e30: three windows' worth
            protocol.send(insider, protocol.update_message(run, 1, weights.version, np.zeros(n, np.float32), 32, 1e30))
            weights = _next(insider, (MsgType.WEIGHTS,))
        insider.close()
        wait_for(lambda: sum(e["event"] == "unconfirmed_divergence" for e in read_events(out)) >= 2, 60,
                 what="the NaN report and an exploded window to be logged as unconfirmed")
        wait_for_updates(out, 200)  # and the honest worker trains on
        broker.send_signal(signal.SIGINT)  # the run would go on to its time limit: end it now, as Ctrl-C does
        _, err = broker.communicate(timeout=120)
        reap(worker, timeout=30)
    finally:
        stop(broker, worker, group=False)
        ctx.destroy(linger=0)
    assert broker.returncode == 130, err[-2000:]
    summary = summary_of(out)
    assert summary["diverged"] is False and summary["stop_reason"] == "interrupted", summary["stop_reason"]
    assert summary["rejected_by_reason"].get("unconfirmed-divergence") == 1, summary["rejected_by_reason"]
    assert summary["unconfirmed_divergences"] >= 2  # the NaN, and at least one window the 1e30s exploded
    assert summary["test_accuracy"] > 0.5
    unconfirmed = [e for e in read_events(out) if e["event"] == "unconfirmed_divergence"]
    assert unconfirmed and all(e["workers"] == [1] for e in unconfirmed), unconfirmed


def test_a_diverged_cadmm_names_its_own_knob_and_a_rho_past_float32_is_bad_input():
    from zsgd.decentralized.rules import DecentralizedParams, rule_class
    from zsgd.errors import ZsgdError

    assert "--rho" in rule_class("cadmm").diverge_hint and "--rho" not in rule_class("dsgd").diverge_hint
    ledger, _, _ = _ledger(None)
    ledger.diverge_hint = rule_class("cadmm").diverge_hint
    ledger.loss(math.nan)
    assert ledger.stop_reason.endswith("lower --lr or --rho (or --rho-scaling)")
    with pytest.raises(ZsgdError, match="at most 3.403e"):
        DecentralizedParams(rho=1e308).validate()
