"""The simulator's speed benchmark measures what it names (a smoke test: no timing is asserted).

``benchmarks/bench_sim.py --speed`` is how issue 22's targets are reported; a case that stopped
early (the plain async rule diverged at update 2,100 under 1,024 workers' staleness) or that ran
another tree's package than it says would report a wrong figure, not fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_sim.py"


def _bench(*args: str) -> str:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(BENCH), *args], env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_one_case_runs_its_updates_from_the_named_package():
    row = json.loads(_bench("--one-case", "40,300").strip().splitlines()[-1])
    assert row["updates"] == 300 and row["stop_reason"] == "reached 300 updates" and row["workers"] == 40
    assert Path(row["package"]) == ROOT and row["cpu_s"] > 0 and row["total_s"] > 0


@pytest.mark.slow
def test_speed_table_side_by_side(tmp_path):
    out = _bench("--speed", "--speed-cases", "20:200:60", "--rounds", "1", "--baseline", str(ROOT))
    rows = [line for line in out.splitlines() if line.startswith("20 x 200")]
    assert [r.split()[3] for r in rows] == ["this", "baseline"], out
    assert all("reached 200 updates" in r for r in rows) and "this/base" in out and "load average" in out


@pytest.mark.slow
def test_phases_time_every_process_of_a_sweep_and_draw_the_figures_in_the_helpers():
    out = _bench("--phases", "--phase-steps", "150", "--rounds", "1")  # the tables checked are the first round's
    for jobs in (1, 2):
        assert f"4 arms of 150 updates, --jobs {jobs}:" in out, out
    table = out.split("--jobs 2:")[1]
    arms = [line for line in table.splitlines() if line.startswith("arm process") and "_simulate" in line]
    assert len(arms) == 4 and len({line.split()[2] for line in arms}) == 2, table  # 4 arms in 2 forked processes
    helpers = [line for line in table.splitlines() if line.startswith("plot helper")]
    assert any("sweep_figures" in h for h in helpers) and any("curves_quietly" in h for h in helpers), table  # not drawn in the parent
    assert any("_warm_up" in h for h in helpers) and "quick_exit" in table
