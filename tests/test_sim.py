"""Fidelity of the simulator: staleness, throughput and timing match what
queueing arithmetic predicts, runs are bit-identical, and the metrics have
the runtime's schema. Scaled down (logreg on the embedded set) to run fast."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import events
from zsgd.wire import protocol
from zsgd.core.config import TrainConfig
from zsgd.network import Constant, Network, Normal, parse_compute, parse_delay, parse_failures, parse_stragglers
from zsgd.sim import SimOptions, SimResult, Workload, run_arm
from zsgd.core.problem import Problem

C = 0.005  # seconds per gradient step in most tests


def make_cfg(**kw) -> TrainConfig:
    base = dict(model="logreg", data="embedded", steps=200, lr=0.02, log_every=20, eval_every=100)
    return TrainConfig(**(base | kw)).validate()


@pytest.fixture(scope="module")
def workload() -> Workload:
    cfg = make_cfg()
    return Workload(cfg, Problem.from_config(cfg))


def sim(workload: Workload, out: Path, cfg: TrainConfig | None = None, **opts) -> SimResult:
    opts.setdefault("compute", Constant(C))
    return run_arm(cfg or make_cfg(), SimOptions(**opts), workload, out)


def test_async_staleness_is_n_minus_1_and_throughput_n_over_c(workload, tmp_path):
    n = 8
    r = sim(workload, tmp_path, cfg=make_cfg(steps=400), algo="async", n_workers=n)
    s = r.summary
    assert s["updates"] == 400 and s["stop_reason"] == "reached 400 updates"
    assert abs(s["staleness_mean"] - (n - 1)) < 0.2
    assert s["staleness_p50"] == n - 1
    assert s["updates_per_s"] == pytest.approx(n / C, rel=0.02)
    assert sum(w["steps"] for w in s["workers"].values()) == 400  # one real gradient per central update


def test_sync_has_no_staleness_and_one_round_per_compute_time(workload, tmp_path):
    n = 6
    r = sim(workload, tmp_path, algo="sync", n_workers=n)
    s = r.summary
    assert s["staleness_max"] == 0 and s["updates"] == 200
    assert s["virtual_s"] == pytest.approx(200 * C)
    ups = events(tmp_path, "update")
    assert all(e["worker"] == -1 for e in ups)
    # The first round holds whoever joined first (as in the runtime); then every round has all n.
    assert [e["bytes"] // workload.update_bytes for e in ups[1:]] == [n] * 199
    assert s["samples"] == (1 + 199 * n) * 64


def test_ssp_bound_is_respected_even_with_a_straggler(workload, tmp_path):
    bound = 2
    clocks_gap = {}
    for algo in ("ssp:2", "async"):
        d = tmp_path / algo.replace(":", "")
        sim(workload, d, cfg=make_cfg(steps=300), algo=algo, n_workers=5, stragglers=parse_stragglers("0.2:5x"))
        clock = dict.fromkeys(range(5), 0)
        worst = 0
        for e in events(d, "update"):
            clock[e["worker"]] += 1
            worst = max(worst, max(clock.values()) - min(clock.values()))
        clocks_gap[algo] = worst
    assert clocks_gap["ssp:2"] <= bound + 1  # a worker is held once it is more than `bound` ahead
    assert clocks_gap["async"] > 10  # ...which async does not do: the test can tell them apart


def test_same_seed_same_world_gives_bit_identical_metrics(workload, tmp_path):
    world = dict(algo="async", n_workers=7, compute=Normal(C, 0.001),
                 network=Network(latency_up=parse_delay("lognormal:5ms,0.5"), latency_down=parse_delay("uniform:1ms,9ms"),
                                 bandwidth=1e8, loss=0.05),
                 stragglers=parse_stragglers("0.3:3x,transient:0.2:0.1"), failures=parse_failures("2@0.1s+0.05s"))
    a = sim(workload, tmp_path / "a", **world)
    b = sim(workload, tmp_path / "b", **world)
    assert (tmp_path / "a" / "metrics.jsonl").read_bytes() == (tmp_path / "b" / "metrics.jsonl").read_bytes()
    wall = {"real_s", "gradient_real_s", "eval_real_s"}
    sa, sb = ({k: v for k, v in r.summary.items() if k not in wall} for r in (a, b))
    assert sa == sb
    assert np.array_equal(a.weights, b.weights)
    c = run_arm(make_cfg(seed=1), SimOptions(**world), workload, tmp_path / "c")
    assert c.summary["virtual_s"] != a.summary["virtual_s"]  # the seed does matter


def test_bandwidth_adds_bytes_over_bandwidth_to_every_cycle(workload, tmp_path):
    bw = 10e6  # 10 MB/s
    r = sim(workload, tmp_path, algo="async", n_workers=1, network=Network(bandwidth=bw))
    per_cycle = C + (workload.weights_bytes + workload.update_bytes) / bw
    assert r.summary["virtual_s"] == pytest.approx(200 * per_cycle, rel=1e-9)


def test_message_sizes_come_from_the_real_encoding(workload, tmp_path):
    n_params = workload.model.n_params
    g = np.zeros(n_params, np.float32)
    real_update = protocol.message_nbytes(protocol.update_message("a1b2c3d4e5f6", 3, 123, g, 64, 0.5))
    real_weights = protocol.message_nbytes(protocol.weights_message("a1b2c3d4e5f6", 123, g))
    assert abs(workload.update_bytes - real_update) < 32 and abs(workload.weights_bytes - real_weights) < 32
    assert workload.update_bytes > 4 * n_params
    n = 4
    s = sim(workload, tmp_path, algo="async", n_workers=n).summary
    assert s["bytes_sent"] == s["updates"] * workload.update_bytes
    assert s["bytes_received"] == (s["updates"] + n) * workload.weights_bytes  # n first replies, one per update


def test_persistent_stragglers_slow_throughput_as_predicted(workload, tmp_path):
    n, factor = 10, 4.0
    stragglers = parse_stragglers("0.2:4x")
    a = sim(workload, tmp_path / "async", cfg=make_cfg(steps=600), algo="async", n_workers=n, stragglers=stragglers).summary
    predicted = (n * 0.8) / C + (n * 0.2) / (factor * C)
    assert a["updates_per_s"] == pytest.approx(predicted, rel=0.03)
    assert len(a["sim"]["straggler_workers"]) == 2
    slow = set(a["sim"]["straggler_workers"])
    steps = {int(w): v["steps"] for w, v in a["workers"].items()}
    assert max(steps[w] for w in slow) < min(steps[w] for w in set(steps) - slow) / 3
    s = sim(workload, tmp_path / "sync", algo="sync", n_workers=n, stragglers=stragglers).summary
    first_round = factor * C if 0 in slow else C  # the first round holds worker 0 alone
    assert s["virtual_s"] == pytest.approx(first_round + 199 * factor * C, rel=1e-9)  # every round waits for the slowest


def test_latency_and_loss_lengthen_each_cycle(workload, tmp_path):
    lat = Network(latency_up=Constant(0.003), latency_down=Constant(0.002))
    r = sim(workload, tmp_path / "lat", algo="async", n_workers=1, network=lat)
    assert r.summary["virtual_s"] == pytest.approx(200 * (C + 0.005))
    lossy = Network(loss=0.5, retransmit=Constant(0.02))
    r = sim(workload, tmp_path / "loss", cfg=make_cfg(steps=1000, eval_every=1000), algo="async", n_workers=1, network=lossy)
    assert r.summary["virtual_s"] == pytest.approx(1000 * (C + 2 * 0.02), rel=0.06)  # one resend per message on average


def test_a_failed_worker_stops_contributing_and_is_detected(workload, tmp_path):
    cfg = make_cfg(steps=600)
    r = sim(workload, tmp_path, cfg=cfg, algo="async", n_workers=4, failures=parse_failures("1@0.2s"), detect_s=0.3)
    ups = events(tmp_path, "update")
    assert not [e for e in ups if e["worker"] == 1 and e["t"] > 0.2]
    dead = [e for e in events(tmp_path, "worker") if e["status"] == "dead"]
    assert len(dead) == 1 and dead[0]["worker"] == 1 and dead[0]["t"] == pytest.approx(0.5)
    assert r.summary["worker_deaths"] == 1 and r.summary["workers"]["1"]["incarnations"] == 1


def test_a_worker_that_recovers_rejoins_and_contributes_again(workload, tmp_path):
    r = sim(workload, tmp_path, cfg=make_cfg(steps=600), algo="async", n_workers=4,
            failures=parse_failures("1@0.2s+0.1s"), detect_s=1.0)
    statuses = [(e["worker"], e["status"], e["t"]) for e in events(tmp_path, "worker") if e["status"] != "joined"]
    assert statuses == [(1, "rejoined", pytest.approx(0.3))]  # back before the broker noticed: no "dead"
    assert [e for e in events(tmp_path, "update") if e["worker"] == 1 and e["t"] > 0.3]
    assert r.summary["worker_rejoins"] == 1 and r.summary["workers"]["1"]["incarnations"] == 2


def test_sync_round_waits_for_failure_detection(workload, tmp_path):
    detect = 0.4
    sim(workload, tmp_path, algo="sync", n_workers=3, failures=parse_failures("2@0.0525s"), detect_s=detect)
    ts = [e["t"] for e in events(tmp_path, "update")]
    gaps = np.diff(ts)
    # Worker 2 dies 2.5 ms into the round that started at 0.05 s: the round stalls until the broker gives up on it.
    assert ts[9] == pytest.approx(0.05) and gaps.max() == pytest.approx(detect + 0.0025, abs=1e-6)
    assert sorted(gaps)[-2] == pytest.approx(C)


def test_rate_failures_without_recovery_end_the_run(workload, tmp_path):
    r = sim(workload, tmp_path, cfg=make_cfg(steps=100_000, eval_every=5000), algo="async", n_workers=3,
            failures=parse_failures("rate:2"), detect_s=0.1)
    assert r.summary["stop_reason"].startswith("no events left")
    assert r.summary["worker_deaths"] == 3


def test_idle_workers_cost_memory_not_time(workload, tmp_path):
    t0 = time.perf_counter()
    r = sim(workload, tmp_path, cfg=make_cfg(steps=300, eval_every=300), algo="async", n_workers=1000)
    real = time.perf_counter() - t0
    s = r.summary
    assert s["updates"] == 300 and sum(w["steps"] for w in s["workers"].values()) == 300
    assert real < 15  # 300 gradients, not 1000 x anything
    # Events: each worker's first "done" (cheap, no gradient) plus a "done" and an "arrive" per central update.
    assert s["events"] <= 1000 + 2 * 300


def test_measured_compute_is_timed_once_and_shared_by_arms(workload, tmp_path):
    cfg = make_cfg(steps=40, eval_every=40)
    a = sim(workload, tmp_path / "a", cfg=cfg, algo="async", n_workers=2, compute=parse_compute("measured")).summary
    b = sim(workload, tmp_path / "b", cfg=cfg, algo="sync", n_workers=2, compute=parse_compute("measured")).summary
    assert a["compute_measured"] and 0 < a["compute_s"] < 1
    assert b["compute_s"] == a["compute_s"]  # arms differ only in what the grid varies, not in machine noise
    assert a["compute_s"] == pytest.approx(float(np.median(a["compute_calibration_s"])))
    assert a["virtual_s"] == pytest.approx(20 * a["compute_s"], rel=1e-6)
    assert events(tmp_path / "a", "start")[0]["compute_s"] == a["compute_s"]


def test_time_limit_is_virtual(workload, tmp_path):
    r = sim(workload, tmp_path, cfg=TrainConfig(model="logreg", data="embedded", time_limit=0.25, eval_every=50).validate(),
            algo="async", n_workers=2)
    s = r.summary
    assert s["virtual_s"] == pytest.approx(0.25) and "time limit" in s["stop_reason"]
    assert s["updates"] == pytest.approx(0.25 * 2 / C, abs=2)
    assert events(tmp_path, "end")[0]["t"] == pytest.approx(0.25)


def test_target_accuracy_stops_and_is_timed(workload, tmp_path):
    cfg = make_cfg(steps=5000, eval_every=25, target_acc=0.6, lr=0.05)
    r = sim(workload, tmp_path, cfg=cfg, algo="async", n_workers=4, target=0.6)
    s = r.summary
    assert s["test_accuracy"] >= 0.6 and s["updates"] < 5000 and "target" in s["stop_reason"]
    first = next(e for e in events(tmp_path, "eval") if e["test_acc"] >= 0.6)
    assert s["time_to_target_s"] == pytest.approx(first["t"], abs=1e-6)


def test_metrics_and_summary_have_the_runtime_schema(workload, tmp_path):
    sim(workload, tmp_path, algo="ssp:3", n_workers=3)
    evs = events(tmp_path)
    kinds = [e["event"] for e in evs]
    assert kinds[0] == "start" and kinds[-1] == "end" and {"worker", "update", "train", "eval"} <= set(kinds)
    assert all("t" in e and e["t"] >= 0 for e in evs)
    ts = [e["t"] for e in evs]
    assert ts == sorted(ts)  # one clock, moving forward
    up = next(e for e in evs if e["event"] == "update")
    assert {"worker", "staleness", "updates", "samples", "bytes", "lr"} <= set(up)
    tr = next(e for e in evs if e["event"] == "train")
    assert {"updates", "samples", "epoch", "loss"} <= set(tr) and tr["updates"] % 20 == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    runtime_keys = {"test_accuracy", "test_loss", "train_loss", "updates", "samples", "epochs", "wall_s", "rejected_messages",
                    "rejected_by_reason", "dropped_updates", "staleness_mean", "staleness_p50", "staleness_p99", "staleness_max",
                    "bytes_sent", "bytes_received", "worker_deaths", "worker_rejoins", "stop_reason", "workers", "mode", "algo",
                    "n_workers", "model", "data", "data_source", "n_params", "samples_per_s"}
    assert runtime_keys <= set(summary)
    assert summary["mode"] == "sim" and summary["wall_s"] == summary["virtual_s"] and summary["real_s"] > 0
    assert summary["rejected_messages"] == 0
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "weights.npz").is_file()


def test_every_arm_starts_from_the_same_weights_and_shards(workload, tmp_path):
    # Same world, different algorithm names for the same rule: async == ssp with a bound it never reaches.
    a = sim(workload, tmp_path / "a", algo="async", n_workers=4)
    b = sim(workload, tmp_path / "b", algo="ssp:1000", n_workers=4)
    assert np.array_equal(a.weights, b.weights)
    assert not workload.w0.flags.writeable and math.isfinite(float(workload.w0.sum()))


def test_broker_time_and_broker_nic_cap_throughput(workload, tmp_path):
    n = 8  # unconstrained: n / C = 1600 updates/s
    r = sim(workload, tmp_path / "cpu", algo="async", n_workers=n, broker_s=0.001)
    assert r.summary["updates_per_s"] == pytest.approx(1000, rel=0.03)  # one update per ms at most
    bw = 500 * max(workload.weights_bytes, workload.update_bytes)  # the NIC moves 500 messages/s each way
    r = sim(workload, tmp_path / "nic", algo="async", n_workers=n, broker_bandwidth=float(bw))
    assert r.summary["updates_per_s"] == pytest.approx(500, rel=0.03)


def test_compressed_replies_use_the_real_delta_sizes(workload, tmp_path):
    dense = sim(workload, tmp_path / "dense", algo="async", n_workers=4)
    a = sim(workload, tmp_path / "a", algo="async", n_workers=4, compress_replies="topk:0.1")
    b = sim(workload, tmp_path / "b", algo="async", n_workers=4, compress_replies="topk:0.1")
    sa, sd = a.summary, dense.summary
    assert sd["reply_compression_ratio"] == 1.0
    assert 4.0 < sa["reply_compression_ratio"] < 5.0  # top-10 % as int32 index + float32 value, 4 full first replies
    assert sa["bytes_received"] < sd["bytes_received"] / 4 and sa["bytes_sent"] == sd["bytes_sent"]
    assert sa == b.summary | {"real_s": sa["real_s"], "gradient_real_s": sa["gradient_real_s"], "eval_real_s": sa["eval_real_s"]}
    assert sa["test_accuracy"] > 0.6 and sa["test_accuracy"] != sd["test_accuracy"]  # workers step from their decoded copies
