"""The twin's calibration from a real run's logs (``zsgd/experiments/twin.py``) and the node clock that feeds it.

Fast checks of the pieces the fidelity matrix (``tests/test_fidelity.py``, slow) relies on: the quantile
lines a worker or node logs are read back as its samples, a decentralized twin's latency is the emulated
one plus the relay's measured time, and a node's turnaround leaves out an emulated straggler's sleep.
"""

from __future__ import annotations

import json

import numpy as np
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


# -- the broker's hand-offs in a central run (protocol.REPLY_HOP, zsgd.runtime.worker.broker_hops) --------------------

BROKER_LINE = "broker hop ms (mean up, mean down; hops, ignored; loop wait; after the first quarter): "
OLD_BROKER_LINE = "broker hop ms (mean up, mean down; hops, ignored, after the first quarter): "  # a worker of before the wait


def test_broker_hop_lines_are_pooled_by_their_counts(tmp_path):
    run = _logs(tmp_path, {0: ["turnaround ms (20 quantiles, after the first 10 % of steps): 1.0", OLD_BROKER_LINE + "1.0,3.0,100,0"],
                           1: [BROKER_LINE + "3.5,1.0,50,2,0.5", "peer hop ms (20 quantiles, after the first 10 % of steps): 21.0"],
                           2: [BROKER_LINE + "oops"]})  # a line that does not parse is skipped
    up, down = twin.broker_overhead_s(run)
    # (1*100 + (3.5 + 0.5)*50)/150 ms: the loop wait after the hold joins the way up; (3*100 + 1*50)/150 ms
    assert up == pytest.approx(0.002) and down == pytest.approx(7 / 3 / 1e3)
    assert twin.turnaround_samples(run) == [1.0]  # the other lines are not a turnaround
    assert twin.central_latency(run, "50ms") == ("52.0000ms", f"{50 + 7 / 3:.4f}ms")
    assert twin.central_latency(run, "uniform:25ms,75ms") == ("uniform:27.0000ms,77.0000ms",
                                                               f"uniform:{25 + 7 / 3:.4f}ms,{75 + 7 / 3:.4f}ms")


def test_a_central_run_without_hops_keeps_its_latency(tmp_path):
    run = _logs(tmp_path, {0: ["turnaround ms (20 quantiles, after the first 10 % of steps): 1.0"]})
    assert twin.broker_overhead_s(run) is None and twin.central_latency(run, "50ms") is None


@pytest.mark.parametrize("spec", ["lognormal:50ms,0.5", "lognormal:20ms,1.5"])
def test_a_lognormal_latency_is_shifted_as_a_trace_of_its_quantiles(tmp_path, spec):
    from zsgd.network import parse_delay

    shifted = twin.shifted_latency(spec, 0.002, tmp_path, "up")
    assert shifted == f"trace:{tmp_path / 'latency-up.csv'}"
    mean = parse_delay(spec, "--latency").mean
    assert parse_delay(shifted, "--latency").mean == pytest.approx(mean + 0.002, rel=1e-4)  # the 4000 quantiles kept to its mean
    assert twin.shifted_latency(f"trace:{tmp_path / 'latency-up.csv'}", 0.001, tmp_path, "down").endswith("latency-down.csv")


def _hops(*replies):
    from zsgd.runtime.worker.broker_hops import BrokerHops

    hops = BrokerHops()
    for meta, forward, arrival in replies:
        hops.record(meta, forward, arrival)
    return hops


def test_a_worker_times_its_hops_from_the_brokers_stamps():
    # update to the socket at 10.000, at the engine (less its hold) at 10.002; reply due out at 10.100, here at 10.103
    hops = _hops(*[({"hop": [10.002, 10.100]}, 10.0, 10.103)] * 20)
    assert (hops.sums.count, hops.sums.sums[:2], hops.ignored) == (20, [pytest.approx(0.04), pytest.approx(0.06)], 0)
    up, down, n, wait = hops.means_ms()
    assert (up, down, n, wait) == (pytest.approx(2.0), pytest.approx(3.0), 15, 0.0)  # after the first quarter; no wait stamped
    assert hops.line() == BROKER_LINE + "2.0000,3.0000,15,0,0.0000"
    waited = _hops(*[({"hop": [10.002, 10.100, 0.0015]}, 10.0, 10.103)] * 20)  # and 1.5 ms for the broker's loop after its hold
    assert waited.means_ms() == (pytest.approx(2.0), pytest.approx(3.0), 15, pytest.approx(1.5))
    started = _hops(({"hop": [10.800, 10.1]}, 10.0, 10.103), *[({"hop": [10.002, 10.100]}, 10.0, 10.103)] * 20)
    assert started.sums.sums[0] == pytest.approx(0.8 + 0.04) and started.means_ms()[:2] == (pytest.approx(2.0), pytest.approx(3.0))  # start-up left out


@pytest.mark.parametrize("n", [10, 37, 128, 129, 1000, 5003])
def test_the_hops_are_running_sums_whose_first_quarter_is_left_out(n):
    """A long run's worker keeps a bounded record of its hops, not one per reply; the first quarter is still left
    out: exactly up to 2 * CHECKPOINTS replies, within 1 / CHECKPOINTS of them beyond."""
    from zsgd.runtime.emulation import SteadyMeans
    from zsgd.runtime.worker.broker_hops import BrokerHops

    ups = [0.001 * (1 + i % 7) + (0.5 if i < n // 5 else 0.0) for i in range(n)]  # a slow start-up, then 1-7 ms
    hops = BrokerHops()
    for i, up in enumerate(ups):
        hops.record({"hop": [10.0 + up, 10.1]}, 10.0, 10.1 + up / 2)
    assert hops.sums.count == n and len(hops.sums._marks) <= 2 * SteadyMeans.CHECKPOINTS + 1
    up_ms, down_ms, counted, _wait = hops.means_ms()
    skip = n - counted
    assert n // 4 - n / SteadyMeans.CHECKPOINTS <= skip <= n // 4 and (skip == n // 4 or n > 2 * SteadyMeans.CHECKPOINTS)
    assert up_ms == pytest.approx(1e3 * np.mean(ups[skip:])) and down_ms == pytest.approx(up_ms / 2)
    assert up_ms < 5.0  # the start-up's 0.5 s hops are left out


def test_the_workers_own_hand_off_starts_the_up_hop_of_the_next_stamped_reply():
    from zsgd.runtime.worker.broker_hops import BrokerHops

    hops = BrokerHops()
    hops.handed(0.0005)  # its update took 0.5 ms to reach the link thread (shared memory, frames)
    hops.record({"hop": [10.002, 10.1]}, 10.0, 10.103)
    hops.record({"hop": [20.002, 20.1]}, 20.0, 20.103)  # a reply with no hand-off before it: not counted again
    assert (hops.sums.count, hops.sums.sums[0]) == (2, pytest.approx(0.0045))  # 2.5 ms, then 2 ms


@pytest.mark.parametrize("t0, computed, ended, target, slowdown, late", [
    (10.0, 10.003, 10.0215, 0.020, 1.0, 0.0015),  # held to a 20 ms draw, woke 1.5 ms late
    (10.0, 10.025, 10.0262, 0.020, 1.0, 0.0062),  # a gradient slower than its draw: the simulator's step is the draw
    (10.0, 10.003, 10.0415, 0.020, 2.0, 0.0015),  # a 2x straggler of a 20 ms draw
    (10.0, 10.004, 10.0125, 0.0, 3.0, 0.0005),  # a 3x straggler of its own 4 ms step
    (10.0, 10.003, 10.0100, 0.020, 1.0, 0.0),  # cut short (an abandon): no measure
    (10.0, 10.003, 10.0050, 0.0, 1.0, 0.0),  # no stretch
])
def test_a_stretch_held_past_the_simulators_step_is_late_by_the_difference(t0, computed, ended, target, slowdown, late):
    from zsgd.runtime.worker.broker_hops import overrun

    assert overrun(t0, computed, ended, target, slowdown) == pytest.approx(late, abs=1e-9)


@pytest.mark.parametrize("meta, forward, arrival", [
    ({"hop": [10.002]}, 10.0, 10.1),  # one stamp
    ({"hop": "10.002,10.1"}, 10.0, 10.1),  # not a list
    ({"hop": [True, 10.1]}, 10.0, 10.1),  # a bool is no time
    ({"hop": [10.002, None]}, 10.0, 10.1),
    ({"hop": [1e308, 10.1]}, 10.0, 10.1),  # implausible: an up hop of 1e308 s
    ({"hop": [9.0, 10.1]}, 10.0, 10.1),  # reached the broker 1 s before it was sent
    ({"hop": [10.002, 10.1]}, 0.0, 10.1),  # this worker never sent an update
    ({"hop": [10.002, 10.1 - 3600]}, 10.0, 10.1),  # left an hour before it came
    ({"hop": [10.002, 10.1, -0.5]}, 10.0, 10.1),  # a negative wait
])
def test_odd_stamps_are_ignored_and_counted(meta, forward, arrival):
    hops = _hops((meta, forward, arrival))
    assert hops.sums.count == 0 and hops.sums.sums == [0.0] * 3 and hops.ignored == 1


def test_a_reply_without_stamps_is_not_counted():
    hops = _hops(({}, 10.0, 10.1), ({"slowdown": 2.0}, 10.0, 10.1))
    assert hops.sums.count == 0 and hops.ignored == 0 and hops.line() is None  # and too few for a line


def test_the_stamps_cross_the_wire_and_are_checked():
    import math

    from zsgd.wire import protocol

    msg = protocol.weights_message("r" * 12, 3, np.zeros(4, np.float32), hop=[1234.5, 1234.625])
    back = protocol.decode(protocol.encode(msg))
    assert protocol.reply_hop(back.meta) == (1234.5, 1234.625)
    assert protocol.reply_hop({}) is None
    assert protocol.reply_hop({"hop": [1.0, 2.0, 0.25]}) == (1.0, 2.0, 0.25)  # with the update's loop wait
    for bad in ([1.0, math.inf], [1.0, "2"], [1.0, 2.0, 3.0, 4.0], [1.0], {"up": 1.0}, [False, 1.0], [1.0, 2.0, math.nan]):
        with pytest.raises(protocol.ProtocolError, match="hop must be two or three finite numbers") as exc:
            protocol.reply_hop({"hop": bad})
        assert exc.value.reason == "bad-meta"


def test_an_emulated_parameter_server_stamps_each_reply_with_its_update(tmp_path, monkeypatch):
    """The stamps: the update taken off the broker's socket (not its late delivery to the engine: that wait is the
    server's queue, which the simulator models), the reply's hold due to end; none on a first reply."""
    from test_services import RecordingPort, _context

    from zsgd.broker import parameter_server
    from zsgd.network import Constant, Network
    from zsgd.output.metrics import MetricsWriter
    from zsgd.runtime.emulation import LinkEmulator
    from zsgd.runtime.server import parameter_server as ps
    from zsgd.wire import protocol

    class HoldingPort(RecordingPort):
        emulated = True

        def __init__(self) -> None:
            super().__init__()
            self.emulator = LinkEmulator(Network(latency_up=Constant(0.05), latency_down=Constant(0.03)))
            self.held: list = []

        def hold(self, item, delay: float) -> None:
            self.held.append((item[2], delay))

    clock = [100.0]
    monkeypatch.setattr(ps.time, "monotonic", lambda: clock[0])
    with MetricsWriter(tmp_path / "metrics.jsonl") as metrics:
        ctx, members, w0 = _context(tmp_path, metrics)
        ctx.bind(HoldingPort(), ctx.members)
        service = parameter_server(ctx, w0, None)
        peer, _ = members.admit(b"w0", "worker", 0, 0.0)
        service.worker_joined(peer)
        peer.state = "ready"
        service.worker_ready(peer)
        first, delay = ctx.port.held[0]
        assert protocol.REPLY_HOP not in first.meta and delay == pytest.approx(0.03)  # it answers no update
        update = protocol.update_message("r1", 0, 0, np.zeros(w0.size, np.float32), n_samples=32, loss=2.3)
        assert ctx.port.emulator.update_delay(0, 1000, 99.0) == pytest.approx(0.05)  # the broker draws its hold
        clock[0] = 100.25  # ... and delivers it when due (here late), to the engine, which replies at once
        service.deliver_held("in", peer, update)
        reply, delay = ctx.port.held[1]
        # due at 99.05, taken at 100.25 by a loop that ran no other step meanwhile: 1.2 s of loop wait
        assert reply.meta[protocol.REPLY_HOP] == [pytest.approx(99.0), pytest.approx(100.28), pytest.approx(1.2)] and delay == pytest.approx(0.03)
        assert protocol.reply_hop(protocol.decode(protocol.encode(reply)).meta) == (pytest.approx(99.0), pytest.approx(100.28),
                                                                                   pytest.approx(1.2))


@pytest.mark.parametrize("due, start, steps, wait", [
    (10.0, 10.003, [], 0.003),  # the loop took it 3 ms late, busy with no other step: all of it is the loop's
    (10.0, 10.003, [(9.999, 10.001), (10.001, 10.002)], 0.001),  # 2 ms of it behind other updates' steps: the queue
    (10.0, 10.003, [(9.0, 9.5), (10.004, 10.005)], 0.003),  # steps before it was due, or after it was taken, do not count
    (10.0, 9.999, [(9.9, 9.95)], 0.0),  # taken before its hold was due: no wait
    (10.0, 10.002, [(9.999, 10.0025)], 0.0),  # one step covering the whole wait: none of it the loop's own
])
def test_the_loop_wait_leaves_out_the_other_updates_steps(due, start, steps, wait):
    from zsgd.runtime.emulation import loop_wait

    assert loop_wait(due, start, steps) == pytest.approx(wait, abs=1e-12)


def test_steady_means_leave_out_the_first_quarter():
    from zsgd.runtime.emulation import SteadyMeans

    means = SteadyMeans(2)
    for i in range(40):
        means.add(100.0 if i < 10 else 1.0, float(i))
    (first, second), n = means.steady()
    assert n == 30 and first == pytest.approx(1.0) and second == pytest.approx(sum(range(10, 40)) / 30)


def test_a_central_twin_takes_the_runs_engine_step_and_charges_no_nic_the_hops_hold(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "summary.json").write_text(json.dumps({"engine_s_mean": 0.00025}))
    assert twin.central_server(tmp_path) == {"broker_time": "0.2500ms", "broker_bandwidth": "inf"}
    # figures given by hand are the user's: a step the real run does not have, a NIC it emulates in its holds
    assert twin.central_server(tmp_path, "40ms", "100Mbps") == {"broker_time": "40ms", "broker_bandwidth": "100Mbps"}
    (tmp_path / "summary.json").write_text(json.dumps({}))  # a run of before the engine's step was kept
    assert twin.central_server(tmp_path) == {"broker_time": "measured", "broker_bandwidth": "inf"}


def test_a_round_rules_twin_takes_the_gather_step_and_puts_the_closes_extra_on_the_replies_way(tmp_path):
    """Sync at 0 ms: a round's replies leave only after the step that closes it (4.9 ms for cnn against 0.6 ms for
    the others); a twin charged the mean of all steps per update ran 6-23 % fast. Now its server step is the gather
    step and each reply's way down holds the close's extra: N gathers and the extra are the run's N - 1 and the close."""
    from zsgd.runtime.server.parameter_server import engine_step_means

    assert engine_step_means([0.002, 0.0, 0.0]) == {"engine_s_mean": 0.002}  # nothing applied yet
    assert engine_step_means([0.002, 0.002, 1.0]) == {"engine_s_mean": 0.002}  # async: every step applies
    means = engine_step_means([(3 * 0.0006 + 0.0049) / 4, 0.0049 / 4, 0.25])  # sync, 4 workers: one close in four
    assert means["engine_close_s_mean"] == pytest.approx(0.0049) and means["engine_gather_s_mean"] == pytest.approx(0.0006)
    (tmp_path / "summary.json").write_text(json.dumps(means))
    (tmp_path / "metrics.jsonl").write_text("")
    assert twin.round_close_s(tmp_path) == pytest.approx(0.0043)
    assert twin.central_server(tmp_path)["broker_time"] == "0.6000ms"
    _logs(tmp_path, {0: [BROKER_LINE + "1.0,2.0,100,0,0.5"]})  # up 1 ms (+0.5 loop wait), down 2 ms, 100 replies
    assert twin.central_latency(tmp_path, "10ms") == ("11.5000ms", "16.3000ms")  # down: 10 + 2 + the close's 4.3
    (tmp_path / "summary.json").write_text(json.dumps({"engine_s_mean": 0.0006}))  # async: no close apart
    assert twin.round_close_s(tmp_path) == 0.0 and twin.central_latency(tmp_path, "10ms") == ("11.5000ms", "12.0000ms")

