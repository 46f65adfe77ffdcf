"""The step census behind ``bench_broker.py --census`` (benchmarks/step_census.py): it must tell the server's three
step paths apart (in place, out of place from the pool, out of place into a fresh buffer) and a dropped update, and
leave the algorithm's results and the classes it wraps as they were. No timing is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import step_census  # noqa: E402
from zsgd.algorithms import Update, make_server_algorithm  # noqa: E402
from zsgd.algorithms.base import ServerAlgorithm  # noqa: E402
from zsgd.nn.optim import make_optimizer  # noqa: E402
from zsgd.output.metrics import MetricsWriter  # noqa: E402

N = 4099


def _server(shared: bool):
    w0 = np.random.default_rng(0).standard_normal(N).astype(np.float32)
    a = make_server_algorithm("async", w0, make_optimizer("momentum", N, 0.01))
    if shared:  # as the broker: replies are views of the live weights while a send may hold them
        a.share_snapshots, a.snapshot_busy = True, lambda: True
    a.add_worker(0, 0.0)
    return a


def _run(a, grads, hold: int) -> list:
    """Updates whose replies are kept ``hold`` updates long (a pipelined load keeps them in flight)."""
    held: list = []
    for g in grads:
        out = a.on_update(Update(0, a.version, g, 32), 0.0)
        held = (held + [out[-1].weights])[-hold:] if hold else []
        del out
    return held


def test_census_tells_the_step_paths_apart_and_changes_nothing(tmp_path):
    rng = np.random.default_rng(1)
    grads = [(rng.standard_normal(N) * 1e-2).astype(np.float32) for _ in range(12)]
    bad = grads[0].copy()
    bad[7] = np.nan
    originals = (ServerAlgorithm.apply, ServerAlgorithm._take_spare, MetricsWriter.write)
    census = step_census.Census(warmup_s=0.0)
    restore = step_census.install(census)
    try:
        free = _server(shared=True)
        _run(free, grads[:3], hold=0)  # replies released at once: every step in place
        assert census.steps["in place"] and not census.steps["out of place, pooled buffer"]
        busy = _server(shared=True)
        _run(busy, grads, hold=ServerAlgorithm._POOL + 2)  # more replies in flight than the pool holds: fresh buffers too
        steps = {k: len(v) for k, v in census.steps.items()}
        assert steps["out of place, fresh buffer"] >= 1 and steps["out of place, pooled buffer"] >= 1
        n_before = sum(steps.values())
        assert busy.on_update(Update(0, busy.version, bad, 32), 0.0)  # a non-finite gradient: dropped, replied to
        assert len(census.steps["dropped"]) == 1 and sum(len(v) for v in census.steps.values()) == n_before + 1
        with MetricsWriter(tmp_path / "metrics.jsonl") as m:
            m.write("update", 0.5, updates=1)
        assert len(census.metrics_us) == 1
        summary = census.summary()
        assert summary["updates"] == n_before + 1 and set(summary["per_update_us"]) >= {"main thread", "the step"}
        assert summary["metrics_lines"] == 1 and summary["metrics_line_median_us"] >= 0
        assert any(row.startswith("| out of place, fresh buffer | ") for row in step_census.table(json.loads(json.dumps(summary))))
    finally:
        restore()
    assert (ServerAlgorithm.apply, ServerAlgorithm._take_spare, MetricsWriter.write) == originals
    plain = _server(shared=False)  # copies, never a shared buffer: the reference
    _run(plain, grads, hold=0)
    assert np.array_equal(plain.w, busy.w)  # counted steps are the same steps


def test_census_counts_nothing_during_its_warm_up():
    census = step_census.Census(warmup_s=3600.0)
    restore = step_census.install(census)
    try:
        _run(_server(shared=True), [np.ones(N, np.float32)] * 3, hold=2)
    finally:
        restore()
    assert census.summary()["updates"] == 0 and "per_update_us" not in census.summary()
