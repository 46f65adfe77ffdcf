"""The simulator predicts a real emulated run: same algorithm code, same network specs.

A matrix of real runs (``zsgd run`` with injected latency, bandwidth and
stragglers) against ``zsgd sim`` with the same flags, their "twins". The
cells: async, sync, ``ssp:S`` (with stragglers, 3 and 4 workers),
``ksync:K`` and ``kasync:K`` (with random compute times: ``--inject-compute``,
the simulator's ``--compute``), ``localsgd:K``; constant, uniform and
lognormal latency; a bandwidth-limited link; top-k and qsgd compression;
``--servers 2``; and the decentralized rules dsgd, dsgt and cadmm on a ring.
For each, the time per steady-state update and the mean staleness must
agree within ``TOL`` (5 %), and over the cells that ran the mean signed
error of the time stays within ``BIAS`` (2 %): the simulator is neither
systematically fast nor slow. A cell that does not meet 5 % reliably says
so in ``Cell.why`` with its own tolerance and its measured error; it is not
loosened silently. The errors measured are in ``docs/simulation.md``
("The fidelity matrix"); ``ZSGD_FIDELITY_REPORT=FILE`` writes this run's.

The twin is calibrated on the real run itself, not on a separate
measurement. Each worker measures its turnaround per step
(from its weights reaching its socket to its update going back, which
includes its own message handling and any wait for a CPU; a decentralized
node, from the last neighbour message it needed to its next round's
messages handed to its socket) and logs its distribution when it leaves
(20 quantiles); the pooled quantiles are the twin's ``--compute
trace:FILE`` (``zsgd/experiments/twin.py``), so a sync round waits for the
slowest of its workers' draws, as the real round does.
The broker's hand-offs around its step (its receive, emulation queue and
reply send, ZeroMQ's and the link's threads) are measured in the run too:
each emulated reply carries the broker's stamps, each worker logs its mean
hop each way beyond the emulated delays, and the twin adds them to its
latency (``--latency-up``, ``--latency-down``; ``central_latency``), as a
decentralized twin adds the relay's hop; the up hop also holds the update's
wait for the broker's loop after its hold (beyond other updates' steps,
which the simulator queues itself), and the twin's server step is the
engine's mean step in the run, with no NIC charged again for the transfers
the hops hold (``central_server``). They grow with the load (1-4.5 ms
each way at load 5, 10-14 ms in a burst of load 7-9), which left the central
cells 0-5 % fast on a quiet machine and 6-20 % fast at load 7 before they
were measured (docs/simulation.md, "The fidelity matrix").

The real runs spend most of their time waiting out the injected latency
(about 40 % of one core each), so they run two at a time: a test starts its
own run and its partner's in the matrix, and the partner's test finds its
run done. Each is short (5-8 s of real run).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import pytest

from helpers import cli, start_zsgd, stop
from zsgd.experiments.twin import central_latency, central_server, compute_trace, decentralized_latency, steady, steps_per_turnaround  # --validate's too

SPEC = ["--data", "embedded", "--batch-size", "32", "--lr", "0.02", "--eval-every", "1000000", "--quiet"]
TOL = 0.05  # every cell's time per update and mean staleness
BIAS = 0.02  # the mean signed error of the time per update over the cells that ran
RANDOM_COMPUTE = "shifted-exp:10ms,20ms"  # above the real gradient (1-3 ms), so the real step is the draw, as the simulated one is


@dataclass(frozen=True)
class Cell:
    """One real run and its twin. ``both``: flags of both; ``real``/``sim``: the flag each side spells its own way."""

    name: str
    algo: str
    workers: int
    latency: str
    steps: int
    skip: int  # updates before the steady state
    stragglers: str | None = None
    model: str = "mlp"
    both: tuple[str, ...] = ()
    real: tuple[str, ...] = ()
    sim: tuple[str, ...] = ()
    compute: str | None = None  # injected in the real run and drawn the same in the twin; None: the real turnarounds
    tol: float = TOL
    why: str = ""  # why a cell's tolerance is not TOL: its measured error and what is not modelled

    def spec(self) -> list[str]:
        return (["--algo", self.algo, "--model", self.model, *SPEC, "--steps", str(self.steps), *self.both]
                + (["--stragglers", self.stragglers] if self.stragglers else []))


BANDWIDTH = "100Mbps"  # 940 kB of mlp weights: 75 ms a message, more than the latency
MATRIX = [  # in pairs whose real runs go together
    Cell("async-4w-const-straggler", "async", 4, "50ms", 240, 60, stragglers="0.25:3x"),
    Cell("async-2w-uniform", "async", 2, "uniform:25ms,75ms", 140, 30),
    Cell("sync-4w-const", "sync", 4, "50ms", 50, 10),
    Cell("sync-2w-uniform-straggler", "sync", 2, "uniform:25ms,75ms", 50, 10, stragglers="0.5:3x"),
    # The straggler's extra 2 ms is lost in 50-150 ms of round trip, so the ssp:1 bound binds through the latencies'
    # jitter: with one generator for every link its mean staleness moved by +-5 % between quiet runs (real 2.58-2.84)
    # and the cell was held to 10 %. Each link now draws its own seeded stream, the same in the real run and its twin
    # (zsgd.network.link_draws): real 2.69-2.71, errors +0.1 to +0.6 % in six runs at load 1-3 (+0.4 to +7.1 % at
    # load 6-13, where the real workers' turnarounds slow together). 420 measured updates.
    Cell("ssp1-4w-uniform-straggler", "ssp:1", 4, "uniform:25ms,75ms", 480, 60, stragglers="0.25:3x"),
    Cell("ssp2-4w-const", "ssp:2", 4, "50ms", 240, 60),
    Cell("ksync3-4w-const-random-compute", "ksync:3", 4, "50ms", 60, 10, compute=RANDOM_COMPUTE),
    Cell("kasync2-4w-uniform-random-compute", "kasync:2", 4, "uniform:25ms,75ms", 120, 30, compute=RANDOM_COMPUTE),
    # SSP with stragglers whose steps matter (injected, well above the 20 ms latency), so the bound holds workers back:
    Cell("ssp1-3w-straggler-random-compute", "ssp:1", 3, "20ms", 150, 40, stragglers="0.34:2x", compute=RANDOM_COMPUTE),
    Cell("ssp2-4w-2-stragglers-random-compute", "ssp:2", 4, "20ms", 200, 50, stragglers="0.5:2x", compute=RANDOM_COMPUTE),
    Cell("async-4w-lognormal", "async", 4, "lognormal:50ms,0.5", 200, 50),  # +0.8 % (was +12 % with the NIC in sending order)
    Cell("async-4w-bandwidth", "async", 4, "20ms", 160, 40, real=("--inject-bandwidth", BANDWIDTH), sim=("--bandwidth", BANDWIDTH)),
    Cell("async-4w-topk", "async", 4, "50ms", 200, 50, both=("--compress", "topk:0.1")),
    Cell("sync-4w-qsgd", "sync", 4, "50ms", 50, 10, both=("--compress", "qsgd:8")),
    # Held to 10 % until the broker's hops were measured (-4.9 to -5.5 % at load 1.2-1.9: about 6 ms of a 114 ms round
    # was their hand-offs); +1.0 to +1.9 % in three runs at load 5-7 since:
    Cell("localsgd4-4w-const", "localsgd:4", 4, "50ms", 40, 8),
    Cell("async-4w-servers2", "async", 4, "50ms", 200, 50, both=("--servers", "2")),
    Cell("dsgd-ring-straggler", "dsgd", 4, "20ms", 160, 30, stragglers="0.25:3x", model="logreg", both=("--topology", "ring")),
    Cell("dsgt-ring", "dsgt", 4, "20ms", 160, 30, model="logreg", both=("--topology", "ring")),
    Cell("cadmm-ring", "cadmm", 4, "20ms", 100, 20, model="logreg", both=("--topology", "ring")),
    Cell("dsgd-ring-mlp", "dsgd", 4, "20ms", 120, 30, both=("--topology", "ring")),
]
RESULTS: dict[str, tuple[float, float]] = {}  # cell -> (signed error of the time per update, of the mean staleness)


def _record(name: str, real: tuple[float, float], sim: tuple[float, float], **extra: str) -> None:
    """Keep a cell's errors for the bias check; with ``ZSGD_FIDELITY_REPORT=FILE``, also its figures in FILE (JSON)."""
    RESULTS[name] = (_error(sim[0], real[0]), _error(sim[1], real[1]))
    report = os.environ.get("ZSGD_FIDELITY_REPORT")
    if report:
        rows = json.loads(open(report).read()) if os.path.exists(report) and os.path.getsize(report) else {}
        rows[name] = {"ms_real": real[0] * 1e3, "ms_sim": sim[0] * 1e3, "staleness_real": real[1], "staleness_sim": sim[1],
                      "time": RESULTS[name][0], "staleness": RESULTS[name][1], **extra}
        with open(report, "w") as f:
            json.dump(rows, f, indent=1)


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """``real_runs(i)``: the run directory, exit code and stderr of cell ``i``'s real run, started with its pair's."""
    done: dict[int, tuple] = {}

    def get(i: int):
        if i not in done:
            rows = [j for j in (i - i % 2, i - i % 2 + 1) if j < len(MATRIX) and j not in done]
            procs = {}
            try:
                for j in rows:
                    c = MATRIX[j]
                    out = tmp_path_factory.mktemp(f"real{j}") / "real"
                    inject = ["--inject-compute", c.compute] if c.compute else []
                    procs[j] = (out, start_zsgd("run", "--n-proc", str(c.workers), "--inject-latency", c.latency, *inject, *c.real,
                                                *c.spec(), "--checkpoint-every", "0", "--heartbeat", "0.5", "--timeout", "5",
                                                "--no-plots", "--out", str(out)))
                for j, (out, proc) in procs.items():
                    _, err = proc.communicate(timeout=240)
                    done[j] = (out, proc.returncode, err)
            finally:
                stop(*(proc for _out, proc in procs.values()), group=True)
        return done[i]

    return get


def _error(sim: float, real: float) -> float:
    return 0.0 if sim == real else (sim - real) / max(abs(real), 1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("row", range(len(MATRIX)), ids=[c.name for c in MATRIX])
def test_simulator_matches_emulated_run(tmp_path, no_orphans, real_runs, row):
    c = MATRIX[row]
    real, returncode, err = real_runs(row)
    assert returncode == 0, err[-2000:]
    summary = json.loads((real / "summary.json").read_text())
    assert summary["worker_deaths"] == 0
    compute = c.compute or compute_trace(real, tmp_path / "turnaround.csv", steps=steps_per_turnaround(c.algo),
                                         per_round=not c.algo.startswith(("dsgd", "dsgt", "cadmm")))
    hops = None if c.algo in ("dsgd", "dsgt", "cadmm") else central_latency(real, c.latency, tmp_path)
    latency = decentralized_latency(real, c.latency) if c.algo in ("dsgd", "dsgt", "cadmm") else c.latency
    each_way = ["--latency-up", hops[0], "--latency-down", hops[1]] if hops else []  # with the broker's measured hand-offs,
    if hops:  # which hold the messages' transfers, beside the engine's step as this run's broker took it
        each_way += [f"--{k.replace('_', '-')}={v}" for k, v in central_server(real).items()]
    sim = tmp_path / "sim"
    result = cli("sim", "--workers", str(c.workers), "--latency", latency, *each_way, "--compute", compute, *c.sim, *c.spec(),
                 "--out", str(sim))  # one process: this one
    assert result.exit_code == 0, result.stderr[-2000:]
    (t_real, s_real), (t_sim, s_sim) = steady(real, c.skip), steady(sim, c.skip)
    _record(c.name, (t_real, s_real), (t_sim, s_sim), twin_latency=" ".join(each_way) or latency, twin_compute=compute)
    assert abs(t_sim - t_real) / t_real < c.tol, ("time per update", t_real, t_sim, c.why)
    assert abs(s_sim - s_real) <= c.tol * max(s_real, 1e-9), ("mean staleness", s_real, s_sim, c.why)
    if c.algo.startswith("ksync"):  # the backup worker's late gradients: dropped and counted, as often in both
        late = [json.loads(open(glob.glob(f"{d}/**/summary.json", recursive=True)[0]).read())["dropped_updates"].get("stale-round", 0)
                for d in (real, sim)]
        assert late[0] > 0 and abs(late[1] - late[0]) / late[0] < 0.3, ("late gradients", *late)  # a count: 30 %, as before


@pytest.mark.slow
def test_simulator_has_no_systematic_bias():
    """After the matrix (tests run in file order): the signed errors of the time per update average out.

    A model that leaves a cost out is fast in every cell by a little; this catches that where each cell's
    own 5 % does not. Over the cells held to ``TOL`` (a marked cell's known error is its own, reported
    beside it); needs most of the matrix to mean anything, so a ``-k`` selection skips it."""
    if len(RESULTS) < len(MATRIX) // 2:
        pytest.skip(f"{len(RESULTS)} of {len(MATRIX)} cells ran: too few for a mean")
    errors = [t for name, (t, _s) in RESULTS.items() if next(c for c in MATRIX if c.name == name).tol == TOL]
    mean = sum(errors) / len(errors)
    assert abs(mean) <= BIAS, (f"mean signed error of the time per update {mean:+.1%} over {len(errors)} cells",
                               {k: f"{t:+.1%}" for k, (t, _s) in RESULTS.items()})
