"""The simulator predicts a real emulated run: same algorithm code, same network specs.

4 workers, async, 20 ms injected latency each way, one 3x straggler. The real
run reports each worker's measured gradient time; the simulator is given that
compute time and must predict the wall time of the steady-state updates and
the mean staleness within 15 %.
"""

from __future__ import annotations

import glob
import json

import pytest

from helpers import run_zsgd

SPEC = ["--model", "mlp", "--data", "embedded", "--batch-size", "32", "--lr", "0.02", "--steps", "700", "--eval-every", "1000000", "--quiet"]
NET = ["--stragglers", "0.25:3x"]


def steady(run_dir, skip=200):
    path = glob.glob(f"{run_dir}/**/metrics.jsonl", recursive=True)[0]
    ups = [json.loads(line) for line in open(path) if '"event":"update"' in line][skip:]
    return ups[-1]["t"] - ups[0]["t"], sum(u["staleness"] for u in ups) / len(ups)


@pytest.mark.slow
def test_simulator_matches_emulated_run_within_15_percent(tmp_path, no_orphans):
    real = tmp_path / "real"
    proc = run_zsgd("run", "--n-proc", "4", "--algo", "async", "--inject-latency", "20ms", *NET, *SPEC, "--checkpoint-every", "0",
                    "--heartbeat", "0.5", "--timeout", "5", "--out", str(real))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((real / "summary.json").read_text())
    assert summary["worker_deaths"] == 0
    compute_ms = summary["compute_s_mean"] * 1000
    sim = tmp_path / "sim"
    proc = run_zsgd("sim", "--workers", "4", "--algo", "async", "--latency", "20ms", *NET, "--compute", f"{compute_ms:.3f}ms", *SPEC, "--out", str(sim))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (t_real, s_real), (t_sim, s_sim) = steady(real), steady(sim)
    assert abs(t_sim - t_real) / t_real < 0.15, (t_real, t_sim, compute_ms)
    assert abs(s_sim - s_real) / s_real < 0.15, (s_real, s_sim)


@pytest.mark.slow
def test_simulator_matches_an_emulated_decentralized_run(tmp_path, no_orphans):
    """dsgd on a ring of 4 processes, 20 ms per peer message, one 3x straggler: the relay holds each message,
    the straggler stretches its rounds, and the simulator's neighbour-wait model predicts the round time."""
    spec = ["--algo", "dsgd", "--topology", "ring", "--model", "mlp", "--data", "embedded", "--batch-size", "32", "--lr", "0.02",
            "--steps", "200", "--eval-every", "1000000", "--quiet"]
    real = tmp_path / "real"
    proc = run_zsgd("run", "--n-proc", "4", "--inject-latency", "20ms", *NET, *spec, "--heartbeat", "0.5", "--timeout", "5",
                    "--out", str(real))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((real / "summary.json").read_text())
    compute_ms = summary["compute_s_mean"] * 1000
    sim = tmp_path / "sim"
    proc = run_zsgd("sim", "--workers", "4", "--latency", "20ms", *NET, "--compute", f"{compute_ms:.3f}ms", *spec, "--out", str(sim))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (t_real, _), (t_sim, _) = steady(real, skip=30), steady(sim, skip=30)
    assert abs(t_sim - t_real) / t_real < 0.15, (t_real, t_sim, compute_ms)
