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
