"""Defaulted hyper-parameters scaled to the number of workers (zsgd.algorithms.scaling)."""

from __future__ import annotations

import pytest
import yaml

from helpers import cli, run_zsgd
from zsgd.core.config import TrainConfig
from zsgd.algorithms.scaling import SCALED_FIELDS, scale_for_workers

ALL = set(SCALED_FIELDS)


@pytest.mark.parametrize("algo", ["async", "ssp:3"])
@pytest.mark.parametrize("n, batch, lr", [(2, 32, 0.025 / 2**0.5), (4, 16, 0.00625), (9, 16, 0.0125 / 3), (16, 16, 0.003125)])
def test_async_keeps_the_rate_per_sample_over_sqrt_n(algo, n, batch, lr):
    cfg, line = scale_for_workers(TrainConfig(), algo, n, ALL)
    assert (cfg.batch_size, cfg.momentum) == (batch, 0.9) and cfg.lr == pytest.approx(lr)
    assert line and f"{n} {algo.partition(':')[0]} workers" in line and "--batch-size" in line


@pytest.mark.parametrize("n, batch, lr", [(2, 32, 0.05), (4, 16, 0.05), (8, 16, 0.1)])
def test_sync_follows_the_linear_scaling_rule(n, batch, lr):
    cfg, _ = scale_for_workers(TrainConfig(), "sync", n, ALL)
    assert (cfg.batch_size, cfg.momentum) == (batch, 0.9) and cfg.lr == pytest.approx(lr)
    assert cfg.batch_size * n * 0.05 / 64 == pytest.approx(cfg.lr)


def test_given_values_are_never_touched():
    cfg = TrainConfig(batch_size=50, lr=0.3, momentum=0.95)
    assert scale_for_workers(cfg, "async", 4, set()) == (cfg, None)
    assert scale_for_workers(cfg, "async", 4, {"momentum"}) == (cfg, None)  # momentum is never scaled
    kept, _ = scale_for_workers(cfg, "async", 4, {"lr"})  # batch given: only the sqrt(N)
    assert (kept.batch_size, kept.lr, kept.momentum) == (50, pytest.approx(0.15), 0.95)
    sync, _ = scale_for_workers(TrainConfig(batch_size=64), "sync", 4, {"lr"})  # batch given: lr x N
    assert (sync.batch_size, sync.lr) == (64, pytest.approx(0.2))


@pytest.mark.parametrize("algo", ["localsgd:4", "dsgd", "cadmm"])
def test_per_worker_algorithms_and_single_workers_keep_the_defaults(algo):
    assert scale_for_workers(TrainConfig(), algo, 8, ALL) == (TrainConfig(), None)
    assert scale_for_workers(TrainConfig(), "async", 1, ALL) == (TrainConfig(), None)


@pytest.mark.slow
def test_run_scales_defaults_says_so_and_records_them(tmp_path, no_orphans):
    common = ["--n-proc", "2", "--algo", "async", "--model", "logreg", "--data", "embedded", "--steps", "30",
              "--heartbeat", "0.5", "--timeout", "3"]
    out = tmp_path / "auto"
    proc = run_zsgd("run", *common, "--no-plots", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "scaled for 2 async workers" in proc.stderr
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert (stored["batch_size"], stored["momentum"]) == (32, 0.9) and stored["lr"] == pytest.approx(0.025 / 2**0.5)
    conf = tmp_path / "c.yaml"
    conf.write_text("batch_size: 64\nlr: 0.05\n")  # values in a file count as given
    out2 = tmp_path / "given"
    proc = run_zsgd("run", *common, "--no-plots", "--config", str(conf), "--out", str(out2))
    assert proc.returncode == 0, proc.stderr
    assert "scaled" not in proc.stderr
    stored = yaml.safe_load((out2 / "config.yaml").read_text())
    assert (stored["batch_size"], stored["lr"], stored["momentum"]) == (64, 0.05, 0.9)


@pytest.mark.slow
@pytest.mark.parametrize("algo, extra", [("sync", []), ("async", ["--batch-size", "40"])])
def test_sim_trains_with_the_values_run_uses_for_the_same_flags(tmp_path, no_orphans, algo, extra):
    """The simulator predicts the run of the same flags: both resolve the same batch size, rate and schedule."""
    common = ["--algo", algo, "--model", "logreg", "--data", "embedded", "--steps", "20", *extra]
    real = tmp_path / "run"
    proc = run_zsgd("run", "--n-proc", "3", *common, "--heartbeat", "0.5", "--timeout", "3", "--quiet", "--no-plots", "--out", str(real))
    assert proc.returncode == 0, proc.stderr
    sim = tmp_path / "sim"
    proc = cli("sim", "--workers", "3", *common, "--compute", "2ms", "--out", str(sim))  # one process: this one
    assert proc.exit_code == 0, proc.stderr
    ran = yaml.safe_load((real / "config.yaml").read_text())
    (arm,) = [p for p in sim.iterdir() if p.is_dir()]
    simulated = yaml.safe_load((arm / "config.yaml").read_text())
    keys = ("batch_size", "lr", "momentum", "optimizer", "lr_schedule", "weight_decay", "steps", "epochs")
    assert {k: simulated[k] for k in keys} == {k: ran[k] for k in keys}
    assert ran["batch_size"] == (40 if extra else 22) and ran["lr"] != 0.05  # scaled, so the check above means something
    assert f"scaled for 3 {algo} workers" in proc.stderr
