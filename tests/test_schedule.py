"""Learning-rate schedules: the factor curve, run progress, and what each driver applies."""

from __future__ import annotations

import json
import math

import pytest

from helpers import cli
from zsgd.core.config import TrainConfig
from zsgd.errors import ZsgdError
from zsgd.network import Constant
from zsgd.algorithms.schedules import check_schedule_applies, resolve_lr_schedule
from zsgd.core.schedule import lr_factor
from zsgd.sim import SimOptions, Workload, run_arm
from zsgd.core.stopping import StopRule
from zsgd.core.problem import Problem


def test_factor_curves():
    assert [lr_factor("constant", p) for p in (0, 0.5, 1)] == [1.0, 1.0, 1.0]
    assert lr_factor("cosine", 0) == 1.0 and lr_factor("cosine", 0.5) == pytest.approx(0.5) and lr_factor("cosine", 1) == pytest.approx(0.0)
    assert lr_factor("linear", 0.25) == 0.75 and lr_factor("linear", 2.0) == 0.0 and lr_factor("linear", -1) == 1.0
    with pytest.raises(ZsgdError, match="lr-schedule"):
        lr_factor("step", 0.5)


def test_progress_is_the_first_budget_to_run_out():
    rule = StopRule(n_train=1000, batch_size=10, epochs=2, steps=400, time_limit=100)
    assert rule.progress(0, 0, 0) == 0
    assert rule.progress(100, 1000, 10) == pytest.approx(0.5)  # epochs: 1000 of 2000 samples
    assert rule.progress(300, 1000, 10) == pytest.approx(0.75)  # steps lead
    assert rule.progress(10, 10, 90) == pytest.approx(0.9)  # time leads
    assert rule.progress(10_000, 10, 0) == 1.0
    assert StopRule(n_train=1000, batch_size=10, target_acc=0.9).progress(500, 5000, 50) == 0.0


def test_a_decaying_schedule_needs_a_length_and_a_central_optimizer():
    with pytest.raises(ZsgdError, match="needs a run length"):
        TrainConfig(lr_schedule="cosine", target_acc=0.9).validate()
    TrainConfig(lr_schedule="cosine", target_acc=0.9, epochs=3).validate()
    with pytest.raises(ZsgdError, match="unknown --lr-schedule"):
        TrainConfig(lr_schedule="exp").validate()
    for algo in ("localsgd:4", "dsgd", "cadmm"):
        with pytest.raises(ZsgdError, match="central optimizer"):
            check_schedule_applies("cosine", algo)
        check_schedule_applies("constant", algo)
    for algo in ("async", "sync", "ssp:2"):
        check_schedule_applies("linear", algo)


def test_auto_is_cosine_for_a_central_optimizer_with_a_budget():
    for algo in ("train", "async", "sync", "ssp:3"):
        assert resolve_lr_schedule(TrainConfig(epochs=2), algo).lr_schedule == "cosine"
        assert resolve_lr_schedule(TrainConfig(), algo).lr_schedule == "cosine"  # no stop flag: one epoch
        assert resolve_lr_schedule(TrainConfig(target_acc=0.8), algo).lr_schedule == "constant"
        assert resolve_lr_schedule(TrainConfig(target_acc=0.8, time_limit=60), algo).lr_schedule == "cosine"
    for algo in ("localsgd:4", "dsgd", "dsgt", "cadmm"):
        assert resolve_lr_schedule(TrainConfig(epochs=2), algo).lr_schedule == "constant"
    given = TrainConfig(epochs=2, lr_schedule="linear")
    assert resolve_lr_schedule(given, "async") is given
    with pytest.raises(ZsgdError, match="not resolved"):
        lr_factor("auto", 0.3)


def test_run_directory_records_the_resolved_schedule(tmp_path):
    import yaml

    out = tmp_path / "t"
    assert cli("train", "--model", "logreg", "--data", "embedded", "--steps", "5", "--quiet", "--out", str(out)).exit_code == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["lr_schedule"] == "cosine"


@pytest.mark.parametrize("algo", ["async", "sync"])
def test_simulated_updates_follow_the_schedule(tmp_path, algo):
    cfg = TrainConfig(model="logreg", data="embedded", steps=100, lr=0.04, lr_schedule="cosine", eval_every=50).validate()
    run_arm(cfg, SimOptions(algo=algo, n_workers=4, compute=Constant(0.01)), Workload(cfg, Problem.from_config(cfg)), tmp_path / "a")
    updates = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    updates = [e for e in updates if e["event"] == "update"]
    assert len(updates) == 100
    for e in updates:  # the factor comes from the counters before the update: version - 1
        assert e["lr"] == pytest.approx(0.04 * 0.5 * (1 + math.cos(math.pi * (e["updates"] - 1) / 100)))


def test_cli_rejects_a_schedule_for_local_sgd(tmp_path):
    r = cli("sim", "--algo", "localsgd:2", "--lr-schedule", "cosine", "--model", "logreg", "--data", "embedded",
            "--steps", "10", "--out", str(tmp_path / "s"))
    assert r.exit_code == 2 and "central optimizer" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adagrad", "adam"])
def test_a_schedule_at_its_end_steps_with_zero_rate(name):
    """A time budget can be used up before the run notices: the last updates see lr 0, which must not be an error."""
    import numpy as np

    from zsgd.nn.optim import make_optimizer

    opt = make_optimizer(name, 8, lr=0.1, momentum=0.9)
    w = np.ones(8, np.float32)
    opt.step(w, np.full(8, 0.5, np.float32), 0.0)
    np.testing.assert_array_equal(w, np.ones(8, np.float32))
    with pytest.raises(ZsgdError):
        opt.step(w, np.zeros(8, np.float32), -0.1)
    with pytest.raises(ZsgdError):
        make_optimizer(name, 8, lr=0.0)


def test_a_time_budget_decays_to_the_end_in_virtual_time(tmp_path):
    cfg = TrainConfig(model="logreg", data="embedded", time_limit=1.0, lr=0.05, eval_every=1000).validate()
    r = run_arm(cfg, SimOptions(algo="async", n_workers=1, compute=Constant(0.25)), Workload(cfg, Problem.from_config(cfg)), tmp_path / "t")
    assert r.summary["stop_reason"].startswith("reached the time limit")
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines() if '"event":"update"' in line]
    # updates arrive at 0.25, 0.5, 0.75 and 1.0 virtual seconds: the last one exactly at the end of the budget
    assert lrs == pytest.approx([0.05 * lr_factor("cosine", p) for p in (0.25, 0.5, 0.75, 1.0)], abs=1e-12) and lrs[-1] == 0
