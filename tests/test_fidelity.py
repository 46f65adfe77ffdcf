"""The simulator predicts a real emulated run: same algorithm code, same network specs.

A small matrix of real runs (``zsgd run`` with injected latency and emulated
stragglers) against ``zsgd sim`` with the same flags: async, sync,
``ssp:S``, ``ksync:K`` and ``kasync:K``; 2 and 4 workers; constant and random
latency; with and without a 3x straggler; the K rules with random compute
times (``--inject-compute``, the simulator's ``--compute``). For each, the time per steady-state update and the mean
staleness must agree within 15 %.

Robust to a loaded machine: the simulator is calibrated on the real run
itself, not on a separate measurement. Each worker measures its turnaround
per step (``compute_s``: from its weights reaching its socket to its update
going back, which includes its own message handling and any wait for a CPU)
and logs its distribution when it leaves (20 quantiles); the pooled
quantiles are the simulator's ``--compute trace:FILE``, so a sync round
waits for the slowest of its workers' draws, as the real round does. What
the simulator cannot see is the runtime's overhead outside the workers (the broker's
thread hand-offs and emulation queue): 5-17 ms per cycle on the 2-core
development VM at a load average of 9, which leaves the simulator 9-14 % fast.
The latencies here (50 ms each way) keep that inside the tolerance.

The real runs spend most of their time waiting out the injected latency
(about 40 % of one core each), so they run two at a time: a test starts its
own run and its partner's in the matrix, and the partner's test finds its
run done.
"""

from __future__ import annotations

import glob
import json

import pytest

from helpers import cli, run_zsgd, start_zsgd, stop
from zsgd.experiments.twin import compute_trace, steady  # what 'zsgd sim --validate' compares with, too

SPEC = ["--model", "mlp", "--data", "embedded", "--batch-size", "32", "--lr", "0.02", "--eval-every", "1000000", "--quiet"]
NET = ["--stragglers", "0.25:3x"]  # the decentralized test's straggler
TOL = 0.15

# (algo, workers, latency, stragglers, steps, steady updates skipped)
MATRIX = [  # in pairs whose real runs go together
    ("async", 4, "50ms", "0.25:3x", 240, 60),
    ("async", 2, "uniform:25ms,75ms", None, 140, 30),
    ("sync", 4, "50ms", None, 50, 10),
    ("sync", 2, "uniform:25ms,75ms", "0.5:3x", 50, 10),
    ("ssp:1", 4, "uniform:25ms,75ms", "0.25:3x", 240, 60),
    ("ssp:2", 4, "50ms", None, 240, 60),
    ("ksync:3", 4, "50ms", None, 60, 10),
    ("kasync:2", 4, "uniform:25ms,75ms", None, 120, 30),
]
# Rows whose steps take a seeded random time (--inject-compute in the real run, the same --compute in the simulator:
# the same draw per worker and step). The floor keeps every draw above the real gradient (1-3 ms here), so the
# real step is the draw, as the simulated one is. K-sync is the case that needs it: which 3 of 4 make a round.
INJECT = {"ksync:3": "shifted-exp:10ms,20ms", "kasync:2": "shifted-exp:10ms,20ms"}


def _spec(algo: str, stragglers: str | None, steps: int) -> list[str]:
    return ["--algo", algo, *SPEC, "--steps", str(steps)] + (["--stragglers", stragglers] if stragglers else [])


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """``real_runs(i)``: the run directory and stderr of matrix row ``i``'s real run, started together with its pair's."""
    done: dict[int, tuple] = {}

    def get(i: int):
        if i not in done:
            rows = [j for j in (i - i % 2, i - i % 2 + 1) if j < len(MATRIX) and j not in done]
            procs = {}
            try:
                for j in rows:
                    algo, n, latency, stragglers, steps, _skip = MATRIX[j]
                    out = tmp_path_factory.mktemp(f"real{j}") / "real"
                    inject = ["--inject-compute", INJECT[algo]] if algo in INJECT else []
                    procs[j] = (out, start_zsgd("run", "--n-proc", str(n), "--inject-latency", latency, *inject, *_spec(algo, stragglers, steps),
                                                "--checkpoint-every", "0", "--heartbeat", "0.5", "--timeout", "5", "--no-plots",
                                                "--out", str(out)))
                for j, (out, proc) in procs.items():
                    _, err = proc.communicate(timeout=240)
                    done[j] = (out, proc.returncode, err)
            finally:
                stop(*(proc for _out, proc in procs.values()), group=True)
        return done[i]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("row", range(len(MATRIX)),
                         ids=[f"{a}-{n}w-{'const' if 'uniform' not in lat else 'random'}-{'straggler' if s else 'none'}"
                              for a, n, lat, s, _, _ in MATRIX])
def test_simulator_matches_emulated_run_within_15_percent(tmp_path, no_orphans, real_runs, row):
    algo, n, latency, stragglers, steps, skip = MATRIX[row]
    real, returncode, err = real_runs(row)
    assert returncode == 0, err[-2000:]
    summary = json.loads((real / "summary.json").read_text())
    assert summary["worker_deaths"] == 0
    compute = INJECT.get(algo) or compute_trace(real, tmp_path / "turnaround.csv")
    sim = tmp_path / "sim"
    result = cli("sim", "--workers", str(n), "--latency", latency, "--compute", compute, *_spec(algo, stragglers, steps),
                 "--out", str(sim))  # one process: this one
    assert result.exit_code == 0, result.stderr[-2000:]
    (t_real, s_real), (t_sim, s_sim) = steady(real, skip), steady(sim, skip)
    assert abs(t_sim - t_real) / t_real < TOL, ("time per update", t_real, t_sim, summary["compute_s_mean"])
    if s_real > 0 or s_sim > 0:
        assert abs(s_sim - s_real) / max(s_real, 1e-9) < TOL, ("mean staleness", s_real, s_sim)
    if algo.startswith("ksync"):  # the backup worker's late gradients: dropped and counted, as often in both
        late = [json.loads(open(glob.glob(f"{d}/**/summary.json", recursive=True)[0]).read())["dropped_updates"].get("stale-round", 0)
                for d in (real, sim)]
        assert late[0] > 0 and abs(late[1] - late[0]) / late[0] < 2 * TOL, ("late gradients", *late)


@pytest.mark.slow
def test_simulator_matches_an_emulated_decentralized_run(tmp_path, no_orphans):
    """dsgd on a ring of 4 processes, 20 ms per peer message, one 3x straggler: the relay holds each message,
    the straggler stretches its rounds, and the simulator's neighbour-wait model predicts the round time.

    logreg (31 kB messages), not mlp (940 kB): what a node and the relay spend handling a message is not in the
    simulator's model yet (issue 22), and with mlp's messages it made the real rounds 14-17 % slower than the
    twin's (26.4-27.9 against 22.7-23.1 ms on a quiet machine), failing this 15 % check about one run in three.
    With logreg the cell checks the neighbour-wait model it names (measured: 22.3-22.7 against 20.6 ms)."""
    spec = ["--algo", "dsgd", "--topology", "ring", "--model", "logreg", "--data", "embedded", "--batch-size", "32", "--lr", "0.02",
            "--steps", "200", "--eval-every", "1000000", "--quiet"]
    real = tmp_path / "real"
    proc = run_zsgd("run", "--n-proc", "4", "--inject-latency", "20ms", *NET, *spec, "--heartbeat", "0.5", "--timeout", "5",
                    "--no-plots", "--out", str(real))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((real / "summary.json").read_text())
    compute_ms = summary["compute_s_mean"] * 1000
    sim = tmp_path / "sim"
    result = cli("sim", "--workers", "4", "--latency", "20ms", *NET, "--compute", f"{compute_ms:.3f}ms", *spec, "--out", str(sim))
    assert result.exit_code == 0, result.stderr[-2000:]
    (t_real, _), (t_sim, _) = steady(real, skip=30), steady(sim, skip=30)
    assert abs(t_sim - t_real) / t_real < TOL, (t_real, t_sim, compute_ms)
