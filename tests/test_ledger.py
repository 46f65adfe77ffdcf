"""The run ledger: one set of counting, cadence, stop and divergence rules for every driver."""

from __future__ import annotations

import json
import math

import pytest

from zsgd.core.ledger import CORE_SUMMARY_KEYS, DIVERGE_PATIENCE, EVALS_PER_RUN, RunLedger
from zsgd.core.stopping import StopRule


def ledger(**kw) -> tuple[RunLedger, list]:
    events: list = []
    rule = StopRule(n_train=kw.pop("n_train", 1000), batch_size=kw.pop("batch_size", 10), epochs=kw.pop("epochs", None),
                    steps=kw.pop("steps", None), time_limit=kw.pop("time_limit", None), target_acc=kw.pop("target_acc", None))
    led = RunLedger(rule, n_train=rule.n_train, emit=lambda e, t, **f: events.append((e, t, f)), **kw)
    return led, events


def step(led: RunLedger, n: int = 10, loss: float = 1.0, t: float = 0.0) -> None:
    led.loss(loss)
    led.applied(t, version=led.updates + 1, n_samples=n)


def test_counts_and_logs_the_mean_loss_every_log_every_updates():
    led, events = ledger(steps=100, log_every=5)
    for i in range(10):
        step(led, loss=float(i + 1))
    train = [f for e, _t, f in events if e == "train"]
    assert [f["updates"] for f in train] == [5, 10]
    assert train[0]["loss"] == pytest.approx(3.0) and train[1]["loss"] == pytest.approx(8.0)
    assert led.updates == 10 and led.samples == 100 and led.stop_reason is None


def test_stops_at_the_first_budget_and_the_first_reason_wins():
    led, _ = ledger(steps=3)
    for _ in range(3):
        step(led)
    assert led.stop_reason == "reached 3 updates"
    led.stop("something else")
    assert led.stop_reason == "reached 3 updates"


def test_automatic_cadence_gives_about_ten_points_per_run_and_one_per_epoch():
    led, _ = ledger(steps=200)  # 200 updates x 10 samples = 2 epochs of 1000
    due = []
    for _ in range(200):
        step(led)
        if led.take_eval():
            due.append(led.updates)
    assert len(due) == EVALS_PER_RUN  # the last one at the end of the run (the second epoch)
    assert due[0] == 20 and all(b - a == 20 for a, b in zip(due, due[1:]))
    led2, _ = ledger(target_acc=0.99)  # no length: once per epoch
    marks = []
    for _ in range(250):
        step(led2)
        if led2.take_eval():
            marks.append(led2.samples)
    assert marks == [1000, 2000]


def test_eval_every_is_exact_and_can_be_reset():
    led, _ = ledger(steps=100, eval_every=7)
    due = [led.updates for _ in range(30) if (step(led), led.take_eval())[1]]
    assert due == [7, 14, 21, 28]
    led.set_eval_every(5)
    due = [led.updates for _ in range(10) if (step(led), led.take_eval())[1]]
    assert due == [35, 40]


def test_a_time_budget_sets_eval_marks_on_ticks():
    led, _ = ledger(time_limit=10.0)
    led.check(0.5)
    assert not led.take_eval()
    led.check(1.01)
    assert led.take_eval() and not led.take_eval()
    led.check(10.0)
    assert led.stop_reason == "reached the time limit of 10 s"


def test_target_accuracy_stops_on_an_evaluation():
    led, events = ledger(target_acc=0.5)
    step(led)
    led.evaluated(1.0, 0.7, 0.4)
    assert led.stop_reason is None
    led.evaluated(2.0, 0.6, 0.55, consensus_error=0.1)
    assert led.stop_reason == "reached the target accuracy 50.00%"
    assert [f.get("consensus_error") for e, _t, f in events if e == "eval"] == [None, 0.1]


def test_a_non_finite_loss_diverges_at_once():
    led, _ = ledger(steps=100)
    step(led)
    led.loss(float("nan"), worker=3)
    assert led.diverged and led.stop_reason.startswith("diverged at update 2 (train loss is not finite on worker 3)")


def test_a_loss_that_stays_far_above_its_start_diverges_after_the_patience():
    led, _ = ledger(steps=1000, log_every=5, diverge_factor=10.0)
    step(led, loss=2.0)  # the start
    for _ in range(4):
        step(led, loss=2.0)
    for _ in range(5 * (DIVERGE_PATIENCE - 1)):
        step(led, loss=50.0)
    assert not led.diverged  # high for DIVERGE_PATIENCE - 1 windows only
    for _ in range(5):
        step(led, loss=50.0)
    assert led.diverged and "stayed above 10 x its start 2" in led.stop_reason


def test_a_spike_is_not_divergence_and_the_factor_can_be_turned_off():
    led, _ = ledger(steps=1000, log_every=5, diverge_factor=10.0)
    for loss in [2.0] * 5 + [50.0] * 5 + [2.0] * 5 + [50.0] * 5:
        step(led, loss=loss)
    assert not led.diverged
    off, _ = ledger(steps=1000, log_every=5, diverge_factor=0.0)
    for loss in [2.0] + [1e9] * 50:
        step(off, loss=loss)
    assert not off.diverged


def test_a_nan_test_loss_means_a_non_finite_model_even_after_the_budget_ran_out():
    led, _ = ledger(steps=1)
    step(led)
    assert led.stop_reason == "reached 1 updates"
    led.evaluated(1.0, float("nan"), 0.1)
    assert led.diverged and "model is not finite" in led.stop_reason


def test_one_exploding_window_is_enough():
    led, _ = ledger(steps=1000, log_every=5, diverge_factor=100.0)
    for loss in [2.3] * 4 + [1e28]:
        step(led, loss=loss)
    assert led.diverged and "exploded past 10000 x its start 2.3" in led.stop_reason


def test_summary_has_the_core_keys_and_is_strict_json():
    led, _ = ledger(steps=10)
    summary = led.summary(0.0)
    assert set(CORE_SUMMARY_KEYS) <= set(summary)
    assert summary["test_accuracy"] is None and summary["train_loss"] is None  # NaN becomes null
    json.dumps(summary, allow_nan=False)
    step(led, loss=1.5)
    led.applied(1.0, version=2, n_samples=10, staleness=3)
    s = led.summary(2.0)
    assert s["samples_per_s"] == pytest.approx(10.0) and s["staleness_max"] == 3 and not s["diverged"]


def test_eval_interval_in_updates_follows_the_automatic_cadence():
    led, _ = ledger(epochs=2.0)
    assert led.eval_interval_updates(samples_per_update=10) == 20  # 2000 samples / 10 per update / 10 points
    led2, _ = ledger(target_acc=0.9)
    assert led2.eval_interval_updates(samples_per_update=10) == 100  # one epoch
    assert math.isfinite(led2.progress(0.0))


@pytest.mark.parametrize("algo,n", [("async", 3), ("sync", 4), ("sync", 2), ("ssp:2", 3), ("localsgd:4", 3), ("localsgd:1", 2),
                                    ("ksync:2", 3), ("kasync:2", 3)])
def test_the_live_total_is_the_update_count_the_run_stops_at(algo, n):
    """What a live view shows as its total (``expected_updates``) is, from the second update on, the number of
    updates the run makes: each real server rule driven as the broker drives it (workers step on the weights
    they were sent, the ledger counts what is applied) until the epoch budget stops it."""
    import numpy as np

    from zsgd.algorithms import Applied, Reply, Update, make_server_algorithm
    from zsgd.nn.optim import make_optimizer

    batch, n_train = 16, 1000
    ledger = RunLedger(StopRule(n_train=n_train, batch_size=batch, epochs=2.0), n_train=n_train)
    server = make_server_algorithm(algo, np.zeros(4, np.float32), make_optimizer("sgd", 4, lr=0.01))
    version: dict[int, int] = {}
    ready: list[int] = []  # workers holding weights to step on, in the order they got them

    def handle(outputs) -> None:
        for o in outputs:
            if isinstance(o, Reply) and o.weights is not None:
                version[o.worker] = o.version
                ready.append(o.worker)
            elif isinstance(o, Applied):
                ledger.applied(0.0, version=o.version, n_samples=o.n_samples)

    for w in range(n):
        handle(server.add_worker(w, 0.0))
    assert ledger.expected_updates() is None  # unknown until an update shows what one is worth
    totals, first = set(), 0
    while ledger.stop_reason is None and ready:
        w = ready.pop(0)
        meta = {"kind": "delta"} if algo.startswith("localsgd") else {}
        handle(server.on_update(Update(w, version[w], np.zeros(4, np.float32), batch * server.local_steps, 1.0, meta), 0.0))
        if ledger.updates == 1:
            assert ledger.expected_updates() is not None
            first = ledger.samples
        elif ledger.updates > 1:  # a sync round's first holds the workers that had joined: from the second on
            totals.add(ledger.expected_updates())
    assert ledger.stop_reason == "reached 2 epochs", (ledger.stop_reason, ledger.updates)
    assert totals == {ledger.updates}, (totals, ledger.updates)
    per_update = {"sync": n, "localsgd:4": 4 * n, "localsgd:1": n, "ksync:2": 2, "kasync:2": 2}.get(algo, 1) * batch
    assert ledger.updates == 1 + math.ceil((2 * n_train - first) / per_update), (ledger.updates, first, per_update)


def test_expected_updates_follows_steps_and_the_samples_per_update():
    rule = StopRule(n_train=1000, batch_size=10, epochs=1.0, steps=40)
    assert rule.expected_updates(0, 0, None) is None
    assert rule.expected_updates(1, 10, 10) == 40  # 100 batches of 10, but --steps 40 comes first
    assert rule.expected_updates(1, 40, 40) == 25  # rounds of 4 batches
    assert rule.expected_updates(2, 50, 40) == 26  # a first round of one batch, then rounds of 4
    assert rule.expected_updates(30, 990, 30) == 31  # a round shrunk to 3 batches: the last one's size counts
    assert StopRule(n_train=1000, batch_size=10, steps=7).expected_updates(0, 0, None) == 7
    assert StopRule(n_train=1000, batch_size=10, time_limit=5.0).expected_updates(3, 30, 10) is None


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["sync", "localsgd:2", "ssp:1", "dsgd"])
def test_a_real_runs_live_total_is_the_updates_it_makes(tmp_path, no_orphans, monkeypatch, algo):
    """zsgd run's live view ends with its total equal to the rounds the run made (it showed the worker count times more)."""
    from helpers import cli, summary_of
    from zsgd.output.live_run import RunView

    totals = []
    leave = RunView.__exit__

    def record(self, *exc):
        totals.append(self.progress.tasks[0].total)
        return leave(self, *exc)

    monkeypatch.setattr(RunView, "__exit__", record)
    monkeypatch.setenv("COLUMNS", "200")
    result = cli("run", "--model", "logreg", "--data", "embedded", "--n-proc", "2", "--algo", algo, "--epochs", "1", "--no-plots",
                 "--out", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    made = summary_of(tmp_path / "r")["updates"]
    assert totals == [made], (totals, made)
