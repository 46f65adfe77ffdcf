"""Study (a): Dutta et al., AISTATS 2018, "Slow and Stale Gradients Can Win the Race" (docs/reproductions.md).

The two experiment files in examples/repro/ run in the simulator with no network and no server cost, seeded, so
the figures are exact and repeatable: an iteration takes what the rule waits for.

* Runtime per iteration: K-sync's is the K-th fastest of N draws, E[X(K:N)] = shift + mean (H_N - H_{N-K});
  K-async's is the same for memoryless (exp) compute times and shorter for new-longer-than-used (shifted exp) ones.
* The race (shifted-exp times, 4 s each): waiting for all N (sync) is the slowest way to a given loss; K-async
  gets there before K-sync of the same K; fully async (K = 1) pays for its staleness with the highest late loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import cli

REPRO = Path(__file__).resolve().parent.parent / "examples" / "repro"
N, SHIFT, MEAN = 8, 10.0, 10.0  # ms, as in the files


def order_statistic_ms(k: int, shift: float) -> float:
    """E[X(K:N)] for X = shift + exp(MEAN): the K-th fastest of N draws."""
    return shift + MEAN * sum(1.0 / i for i in range(N - k + 1, N + 1))


def arms(out: Path) -> dict[str, dict]:
    """Arm name (its folder, less the index) -> summary.json."""
    return {p.name.split("-", 1)[1]: json.loads((p / "summary.json").read_text())
            for p in sorted(out.iterdir()) if (p / "summary.json").exists()}


def events(out: Path, arm: str, kind: str) -> list[dict]:
    (path,) = out.glob(f"*-{arm}/metrics.jsonl")
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]


@pytest.mark.slow
def test_runtime_per_iteration_is_the_kth_order_statistic(tmp_path):
    out = tmp_path / "runtime"
    result = cli("experiment", str(REPRO / "dutta2018_runtime.yaml"), "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.stderr[-2000:]
    got = {name: s["virtual_s"] / s["updates"] * 1000 for name, s in arms(out).items()}
    for dist, shift in (("exp", 0.0), ("sexp", SHIFT)):
        for k in (1, 2, 4, 8):
            theory = order_statistic_ms(k, shift)
            assert abs(got[f"ksync-{k}-{dist}"] - theory) / theory < 0.10, (dist, k, got[f"ksync-{k}-{dist}"], theory)
    for k in (1, 2, 4):
        sync_exp, async_exp = got[f"ksync-{k}-exp"], got[f"kasync-{k}-exp"]
        assert abs(async_exp - sync_exp) / sync_exp < 0.10, ("memoryless: the same", k, sync_exp, async_exp)
        assert got[f"kasync-{k}-sexp"] < 0.9 * got[f"ksync-{k}-sexp"], ("shifted: K-async faster", k, got)


@pytest.mark.slow
def test_slow_and_stale_gradients_win_the_race(tmp_path):
    out = tmp_path / "race"
    result = cli("experiment", str(REPRO / "dutta2018_race.yaml"), "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.stderr[-2000:]
    names = sorted(arms(out))
    assert len(names) == 7
    first_below = {}  # virtual seconds to the first logged train loss <= 1.0
    late = {}  # mean logged train loss over the last second
    for name in names:
        train = events(out, name, "train")
        first_below[name] = next(e["t"] for e in train if e["loss"] <= 1.0)
        tail = [e["loss"] for e in train if e["t"] >= 3.0]
        late[name] = sum(tail) / len(tail)
    assert max(first_below, key=first_below.get) == "ksync-8", first_below  # waiting for all 8 is the slowest
    for k in (2, 4):
        assert first_below[f"kasync-{k}"] < first_below[f"ksync-{k}"], (k, first_below)  # stale, and yet first
    others = {n: v for n, v in late.items() if n not in ("kasync-1", "ksync-8")}  # sync is still converging at 4 s
    assert late["kasync-1"] > max(others.values()), late  # fully async: the highest late loss (its staleness)
