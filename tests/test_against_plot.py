"""``zsgd plot EXPERIMENT --against KEY``: an experiment's accuracy and time against one arm setting.

A real (small, simulated) experiment is run, then plotted against ``workers`` and ``bandwidth``: the
series are the arms that agree on every other setting, a setting that follows the x key (the server's
bandwidth set with the links') is no series of its own, and bad input is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import cli
from zsgd.experiments.against import load_arms, table

EXP = """\
name: against
problem: {model: logreg, data: embedded, split: iid, seed: 0, batch_size: 16, lr: 0.05, optimizer: sgd, steps: 12, eval_every: 1000}
defaults: {compute: 5ms, latency: 0, broker_time: 0}
arms:
  - {name: sync-2, algo: sync, workers: 2, bandwidth: 1Gbps, broker_bandwidth: 1Gbps}
  - {name: async-2, algo: async, workers: 2, bandwidth: 1Gbps, broker_bandwidth: 1Gbps}
  - {name: slr-2, algo: async, workers: 2, staleness_lr: scalar, bandwidth: 1Gbps, broker_bandwidth: 1Gbps}
  - {name: sync-4, algo: sync, workers: 4, bandwidth: 100Mbps, broker_bandwidth: 100Mbps}
  - {name: async-4, algo: async, workers: 4, bandwidth: 100Mbps, broker_bandwidth: 100Mbps}
  - {name: slr-4, algo: async, workers: 4, staleness_lr: scalar, bandwidth: 100Mbps, broker_bandwidth: 100Mbps}
"""


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("against")
    (root / "exp.yaml").write_text(EXP)
    result = cli("experiment", str(root / "exp.yaml"), "--out", str(root / "out"), "--quiet", "--jobs", "1")
    assert result.exit_code == 0, result.stderr[-2000:]
    return root / "out"


def test_series_are_the_arms_that_agree_on_the_rest(experiment):
    xs, lines = table(load_arms(experiment), "workers")
    assert xs == ["2", "4"]
    # bandwidth and broker_bandwidth follow workers here: part of the x value, not series
    assert sorted(lines) == ["async", "async, staleness_lr=scalar", "sync"]
    assert all(len(points) == 2 for points in lines.values())
    assert [x for x, _s in lines["sync"]] == ["2", "4"]
    xs, lines = table(load_arms(experiment), "bandwidth")
    assert xs == ["1Gbps", "100Mbps"]  # the file's order
    assert sorted(lines) == ["async", "async, staleness_lr=scalar", "sync"]


def test_plot_against_writes_the_figure(experiment, tmp_path):
    result = cli("plot", str(experiment), "--against", "workers", "--out", str(tmp_path))
    assert result.exit_code == 0, result.stderr
    png = tmp_path / "against_workers.png"
    assert result.stdout.strip() == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (("--against", "colour"), "has no setting 'colour'"),
    (("--against", "compute"), "every arm has compute = 5ms"),
])
def test_bad_against_is_one_line(experiment, tmp_path, args, message):
    result = cli("plot", str(experiment), *args, "--out", str(tmp_path))
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_against_needs_one_experiment_directory(experiment, tmp_path):
    arm = next(d for d in sorted(experiment.iterdir()) if d.is_dir())
    result = cli("plot", str(arm), "--against", "workers", "--out", str(tmp_path))
    assert result.exit_code == 2 and "needs an experiment directory" in result.stderr, result.stderr
    result = cli("plot", str(experiment), str(experiment), "--against", "workers", "--out", str(tmp_path))
    assert result.exit_code == 2 and "takes one experiment directory" in result.stderr, result.stderr
