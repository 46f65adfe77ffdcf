"""A sweep's figures from plain numbers (``zsgd.output.sweep_plots``): what ``zsgd sim`` sends its plotting
helpers, which it forks before it imports the simulator, must unpickle there without importing it."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zsgd.output.sweep_plots import ArmFigure, log_time_axis, sweep_figures
from zsgd.simulation.simulator import SimResult
from zsgd.simulation.sweep import ArmOutcome, SweepSpec, arm_figure, build_arms


def _outcomes(tmp_path: Path) -> list[ArmOutcome]:
    arms = build_arms(SweepSpec(grid={"algo": "async,sync", "workers": "4", "latency": "0,10ms"}))
    out = []
    for arm in arms:
        evals = [(0.01 * (arm.index + 1) * k, 10 * k, 0.5 + 0.1 * k) for k in range(1, 4)]
        summary = {"time_to_target_s": None if arm.index == 3 else 0.02 * (arm.index + 1)}
        result = SimResult(summary, np.arange(5 + arm.index) % 3, evals, np.ones(10, np.float32))
        out.append(ArmOutcome(arm, result, tmp_path / arm.dirname))
    return out


def test_an_arms_figure_is_its_label_group_latency_and_results(tmp_path):
    figs = [arm_figure(o) for o in _outcomes(tmp_path)]
    assert [f.label for f in figs] == ["async lat=0ms", "async lat=10ms", "sync lat=0ms", "sync lat=10ms"]
    assert [f.group for f in figs] == ["async", "async", "sync", "sync"]  # one line per algorithm, latency on the x axis
    assert [f.latency_ms for f in figs] == [0.0, 10.0, 0.0, 10.0]
    assert [f.time_to_target_s for f in figs] == [0.02, 0.04, 0.06, None]
    assert figs[2].evals[-1] == pytest.approx((0.09, 30, 0.8)) and list(figs[1].staleness) == [0, 1, 2, 0, 1, 2]


def test_the_three_figures_are_written(tmp_path):
    written = sweep_figures([arm_figure(o) for o in _outcomes(tmp_path)], tmp_path, 0.75)
    assert [p.name for p in written] == ["accuracy_vs_time.png", "time_to_target.png", "staleness.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_a_log_time_axis_only_when_arms_lengths_span_more_than_20x():
    assert log_time_axis([[(0.1, 1, 0.5), (1.0, 2, 0.6)], [(1.0, 1, 0.5), (30.0, 2, 0.6)]])
    assert not log_time_axis([[(0.1, 1, 0.5), (1.0, 2, 0.6)], [(1.0, 1, 0.5), (19.0, 2, 0.6)]])
    assert not log_time_axis([[], []])


@pytest.mark.slow
def test_the_figure_job_unpickles_and_draws_without_the_simulator_or_numba(tmp_path):
    """What a helper forked at the start of ``zsgd sim`` receives: it draws from it, and neither the simulator
    nor numba nor the network models are imported (which would cost it most of a second after the arms ended)."""
    job = pickle.dumps((sweep_figures, ([arm_figure(o) for o in _outcomes(tmp_path)], tmp_path / "figs", 0.75), {}))
    (tmp_path / "figs").mkdir()
    code = ("import pickle, sys\n"
            "fn, args, kwargs = pickle.loads(sys.stdin.buffer.read())\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'numba' or m.startswith(('zsgd.simulation', 'zsgd.network')))\n"
            "assert not heavy, heavy\n"
            "print(len(fn(*args, **kwargs)))\n")
    proc = subprocess.run([sys.executable, "-c", code], input=job, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().strip() == "3" and (tmp_path / "figs" / "staleness.png").stat().st_size > 1000
    assert isinstance(pickle.loads(job)[1][0][0], ArmFigure)
