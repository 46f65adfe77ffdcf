"""The decentralized simulator: round times follow the model, bytes are the real
encoding, metrics have the runtime's schema, runs are deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import events
from zsgd.wire import protocol
from zsgd.core.config import TrainConfig
from zsgd.decentralized.rules import DecentralizedParams
from zsgd.simulation.decentralized import DecentralizedOptions, run_decentralized_arm
from zsgd.network import Constant, Network, parse_stragglers
from zsgd.sim import Workload
from zsgd.core.problem import Problem

C, LAT = 0.004, 0.010


def make_cfg(**kw) -> TrainConfig:
    return TrainConfig(**(dict(model="logreg", data="embedded", steps=30, lr=0.05, optimizer="sgd", batch_size=32,
                               log_every=10, eval_every=10) | kw)).validate()


@pytest.fixture(scope="module")
def workload() -> Workload:
    cfg = make_cfg()
    return Workload(cfg, Problem.from_config(cfg))


def opts(**kw) -> DecentralizedOptions:
    base = dict(algo="dsgd", n_workers=4, compute=Constant(C), network=Network(latency_up=Constant(LAT)))
    return DecentralizedOptions(**(base | kw))


def peer_bytes(workload: Workload, names: tuple[str, ...], rnd: int = 0) -> int:
    x = np.zeros(workload.model.n_params, np.float32)
    return protocol.message_nbytes(protocol.peer_message("0" * 12, 0, 1, rnd, {k: x for k in names}, codec="none"))


def test_round_time_bytes_and_schema(workload, tmp_path):
    bw = 1e7  # bytes/s: a ring node's two messages queue on its link
    r = run_decentralized_arm(make_cfg(), opts(network=Network(latency_up=Constant(LAT), bandwidth=bw)), workload, tmp_path)
    s = r.summary
    msg = peer_bytes(workload, ("x",))
    assert s["updates"] == s["rounds"] == 30 and s["stop_reason"] == "reached 30 updates"
    assert s["virtual_s"] == pytest.approx(30 * (C + LAT + 2 * msg / bw), rel=1e-3)
    assert s["bytes_total"] == pytest.approx(30 * 8 * msg, rel=1e-3)  # 4 nodes x 2 neighbours per round
    assert s["staleness_max"] == 0 and s["samples"] == 30 * 4 * 32
    assert 0 <= s["consensus_error"] and 0 < s["test_accuracy"] <= 1
    kinds = [e["event"] for e in events(tmp_path)]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("update") == 30 and kinds.count("worker") == 4
    ev = events(tmp_path, "eval")
    assert [e["updates"] for e in ev] == [10, 20, 30]
    assert all({"t", "test_acc", "test_loss", "consensus_error", "bytes_total", "samples"} <= set(e) for e in ev)
    ups = events(tmp_path, "update")
    assert all(u["worker"] == -1 and u["staleness"] == 0 for u in ups)
    assert sum(u["bytes"] for u in ups) == s["bytes_total"]
    assert {"config.yaml", "metrics.jsonl", "summary.json", "weights.npz"} <= {p.name for p in tmp_path.iterdir()}
    assert "alpha0: 0.05" in (tmp_path / "config.yaml").read_text()  # the default step is the problem's lr, and says so
    from zsgd.output.plots import plot_curves

    assert len(plot_curves([tmp_path], tmp_path)) == 2  # zsgd plot reads it like any run


def test_cadmm_pays_primal_steps_of_compute_and_dsgt_two_arrays(workload, tmp_path):
    a = run_decentralized_arm(make_cfg(steps=10), opts(algo="cadmm", params=DecentralizedParams(primal_steps=3)), workload, tmp_path / "a")
    assert a.summary["virtual_s"] == pytest.approx(10 * (3 * C + LAT))
    assert a.summary["samples"] == 10 * 4 * 3 * 32
    b = run_decentralized_arm(make_cfg(steps=10), opts(algo="dsgt"), workload, tmp_path / "b")
    assert b.summary["virtual_s"] == pytest.approx(10 * (C + LAT) + C)  # round 0 also computes y0's gradient
    assert b.summary["bytes_total"] == pytest.approx(10 * 8 * peer_bytes(workload, ("x", "y")), rel=1e-3)


def test_a_straggler_holds_back_its_neighbours_not_a_barrier(workload, tmp_path):
    """Ring of 4, one node 5x slower (20 ms), others 4 ms, 10 ms links. Each node waits for its neighbours only:
    worked by hand, the rounds end at 30, 50, 74, 94, 118, 138, 162, 182, 206, 226 ms; after the first, a pair of
    rounds takes 44 ms, the cycle straggler -> neighbour -> straggler (10 + 4 + 10 + 20). A global barrier would
    take 30 ms every round (300 ms)."""
    r = run_decentralized_arm(make_cfg(steps=10), opts(stragglers=parse_stragglers("0.25:5x")), workload, tmp_path)
    ends = [e["t"] for e in events(tmp_path, "update")]
    assert ends == pytest.approx([0.030, 0.050, 0.074, 0.094, 0.118, 0.138, 0.162, 0.182, 0.206, 0.226])
    assert r.summary["virtual_s"] == pytest.approx(0.226)


def test_runs_are_deterministic_and_start_from_the_workload_weights(workload, tmp_path):
    o = opts(algo="dsgt", topology="random-regular:3", n_workers=6, compress="topk:0.2", params=DecentralizedParams(gamma=0.5))
    run_decentralized_arm(make_cfg(steps=12), o, workload, tmp_path / "a")
    run_decentralized_arm(make_cfg(steps=12), o, workload, tmp_path / "b")
    assert (tmp_path / "a" / "metrics.jsonl").read_bytes() == (tmp_path / "b" / "metrics.jsonl").read_bytes()
    from zsgd.simulation.decentralized import DecentralizedSimulation

    class Null:
        def write(self, *a, **k):
            return {}

    sim = DecentralizedSimulation(make_cfg(steps=1), opts(n_workers=3), workload, Null())
    for m in sim.driver.models():
        np.testing.assert_array_equal(m, workload.w0)


def test_compression_shrinks_the_bytes(workload, tmp_path):
    full = run_decentralized_arm(make_cfg(steps=20), opts(), workload, tmp_path / "full").summary
    topk = run_decentralized_arm(make_cfg(steps=20), opts(compress="topk:0.05"), workload, tmp_path / "topk").summary
    assert topk["bytes_total"] < 0.2 * full["bytes_total"]
    assert topk["test_accuracy"] > 0.3


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow is the point
def test_divergence_stops_the_run(workload, tmp_path):
    r = run_decentralized_arm(make_cfg(steps=200, lr=1e37), opts(), workload, tmp_path)
    assert r.summary["stop_reason"].startswith("diverged") and r.summary["updates"] < 200
