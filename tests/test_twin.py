"""The twin's calibration from a real run's logs (``zsgd/experiments/twin.py``) and the node clock that feeds it.

Fast checks of the pieces the fidelity matrix (``tests/test_fidelity.py``, slow) relies on: the quantile
lines a worker or node logs are read back as its samples, a decentralized twin's latency is the emulated
one plus the relay's measured time, and a node's turnaround leaves out an emulated straggler's sleep.
"""

from __future__ import annotations

import pytest

from zsgd.errors import ZsgdError
from zsgd.experiments import twin


def _logs(tmp_path, lines_by_worker: dict[int, list[str]]):
    (tmp_path / "logs").mkdir()
    for w, lines in lines_by_worker.items():
        (tmp_path / "logs" / f"worker-{w}.log").write_text("".join(f"zsgd worker {w}: {line}\n" for line in lines))
    return tmp_path


def test_turnaround_and_hop_lines_are_read_apart(tmp_path):
    run = _logs(tmp_path, {0: ["done", "turnaround ms (20 quantiles, after the first 10 % of steps): 1.0,3.0",
                               "peer hop ms (20 quantiles, after the first 10 % of steps): 21.0,23.0"],
                           1: ["turnaround ms (20 quantiles, after the first 10 % of steps): 2.0"]})
    assert twin.turnaround_samples(run) == [1.0, 3.0, 2.0]
    assert twin.turnaround_samples(run, twin.HOP) == [21.0, 23.0]
    assert twin.relay_overhead_s(run, "20ms") == pytest.approx(0.002)  # mean hop 22 ms over an emulated 20 ms
    assert twin.decentralized_latency(run, "20ms") == "22.0000ms"
    assert twin.decentralized_latency(run, "20ms", "100Mbps") == "20ms"  # the hops hold the link's own time: not added again
    assert twin.decentralized_latency(run, "20ms", "inf") == "22.0000ms"


def test_a_run_without_hops_keeps_its_latency(tmp_path):
    run = _logs(tmp_path, {0: ["turnaround ms (20 quantiles, after the first 10 % of steps): 1.0"]})
    assert twin.relay_overhead_s(run, "20ms") is None
    assert twin.decentralized_latency(run, "uniform:10ms,30ms") == "uniform:10ms,30ms"


@pytest.mark.parametrize("spec, shifted", [
    ("20ms", "21.0000ms"),
    ("0", "1.0000ms"),
    ("uniform:10ms,30ms", "uniform:11.0000ms,31.0000ms"),
    ("normal:20ms,2ms", "normal:21.0000ms,2.0000ms"),
    ("exp:10ms", "shifted-exp:1.0000ms,10.0000ms"),
    ("shifted-exp:5ms,10ms", "shifted-exp:6.0000ms,10.0000ms"),
])
def test_a_latency_spec_shifted_moves_every_draw(spec, shifted):
    from zsgd.network import parse_delay

    assert twin.shifted_latency(spec, 0.001) == shifted
    assert parse_delay(shifted, "--latency").mean == pytest.approx(parse_delay(spec, "--latency").mean + 0.001)


def test_a_latency_that_cannot_be_shifted_is_one_error():
    with pytest.raises(ZsgdError, match="lognormal|cannot add"):
        twin.shifted_latency("lognormal:20ms,0.5", 0.001)


@pytest.mark.parametrize("algo, steps", [("async", 1), ("sync", 1), ("localsgd:4", 4), ("dsgd", 1), ("dsgt", 1), ("cadmm", 5)])
def test_steps_per_turnaround_are_the_draws_the_simulator_charges(algo, steps):
    assert twin.steps_per_turnaround(algo) == steps
    assert twin.steps_per_turnaround("cadmm", primal_steps=3) == 3


def test_a_node_turnaround_leaves_out_the_straggler_sleep_and_times_only_peer_hops(monkeypatch):
    from zsgd.runtime.worker import decentralized_node as node
    from zsgd.wire import protocol

    now = [100.0]
    monkeypatch.setattr(node.time, "monotonic", lambda: now[0])
    clock = node._Turnaround()
    clock.sent()  # the first round's messages: no round was timed before them
    assert clock.samples == []
    clock.ready(last_arrival=100.004, idle_since=100.001)  # its last neighbour message came at +4 ms
    clock.stalled = 0.010  # an emulated straggler slept 10 ms of it
    now[0] = 100.020
    clock.sent()
    assert clock.samples == [pytest.approx(0.006)]
    peer = protocol.peer_message("r" * 12, 1, 0, 3, {}, sent=99.990)
    clock.hop(peer, arrival=100.015)
    clock.hop(protocol.wait_message("r" * 12, 0, 0, reason="start"), arrival=100.015)  # not a peer message
    clock.hop(protocol.peer_message("r" * 12, 1, 0, 3, {}), arrival=100.015)  # no stamp (another host's clock)
    assert clock.hops == [pytest.approx(0.025)]
