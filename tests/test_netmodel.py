"""The world models and their parsers: sampling statistics, spec syntax, and
one-line errors that name the bad value."""

from __future__ import annotations

import math

import numpy as np
import pytest

from zsgd.runtime.emulation import DelayQueue, LinkEmulator
from zsgd.errors import ZsgdError
from zsgd.network import (Constant, Exponential, LinkDraws, LogNormal, Measured, Network, Normal, Trace, Uniform, parse_bandwidth,
                           parse_compute, parse_delay, parse_duration, parse_failures, parse_loss, parse_stragglers,
                           parse_worker_latency, propagate_units, split_specs)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("text,seconds", [("0", 0.0), ("10ms", 0.01), ("0.5s", 0.5), ("250us", 250e-6), ("2min", 120.0),
                                          (" 1.5 s ", 1.5), ("1e3ms", 1.0)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["10parsecs", "-5ms", "", "10", "ms", "nanms", "1..2ms", "infs"])
def test_bad_durations_name_the_value(bad):
    with pytest.raises(ZsgdError) as exc:
        parse_delay(bad)
    msg = str(exc.value)
    assert "\n" not in msg and "latency" in msg
    assert repr(bad) in msg or bad.strip() in msg


def test_delay_specs_parse_to_models():
    assert parse_delay("10ms") == Constant(0.01)
    assert parse_delay("uniform:5ms,20ms") == Uniform(0.005, 0.02)
    assert parse_delay("uniform:5,20ms") == Uniform(0.005, 0.02)  # the unit on the right applies
    assert parse_delay("normal:10ms,2ms") == Normal(0.01, 0.002)
    assert parse_delay("normal:10ms,2") == Normal(0.01, 0.002)  # ... or the one on the left
    assert parse_delay("lognormal:10ms,0.5") == LogNormal(0.01, 0.5)
    assert parse_delay("exp:10ms") == Exponential(0.01)
    for spec in ("10ms", "uniform:5ms,20ms", "normal:10ms,2ms", "lognormal:10ms,0.5", "exp:10ms"):
        assert str(parse_delay(spec)) == spec  # canonical form round-trips


@pytest.mark.parametrize("bad", ["uniform:20ms,5ms", "normal:1ms", "exp:1ms,2ms", "lognormal:10ms,-1", "lognormal:10ms,x",
                                 "gamma:1ms", "uniform:", "trace:"])
def test_bad_distributions(bad):
    with pytest.raises(ZsgdError, match="bad latency"):
        parse_delay(bad)


@pytest.mark.parametrize("model", [Uniform(0.005, 0.02), Normal(0.01, 0.002), Normal(0.001, 0.002), LogNormal(0.01, 0.5),
                                   Exponential(0.01)])
def test_sample_means_match_the_model(model):
    r = rng(1)
    xs = np.array([model.sample(r) for _ in range(40_000)])
    assert xs.min() >= 0
    assert xs.mean() == pytest.approx(model.mean, rel=0.03)


def test_lognormal_median_and_normal_clipping():
    r = rng(2)
    xs = np.array([LogNormal(0.01, 0.5).sample(r) for _ in range(20_000)])
    assert np.median(xs) == pytest.approx(0.01, rel=0.03)
    clipped = np.array([Normal(0.0, 0.01).sample(r) for _ in range(10_000)])
    assert clipped.min() == 0.0 and 0.4 < (clipped == 0).mean() < 0.6


def test_trace_resamples_ms_column(tmp_path):
    f = tmp_path / "pings.csv"
    f.write_text("rtt_ms,host\n10,a\n20,b\n# a comment\n30,c\n")
    t = parse_delay(f"trace:{f}")
    assert isinstance(t, Trace) and t.mean == pytest.approx(0.02)
    r = rng(3)
    assert {t.sample(r) for _ in range(200)} == {0.01, 0.02, 0.03}


def test_bad_traces(tmp_path):
    with pytest.raises(ZsgdError, match="file not found"):
        parse_delay(f"trace:{tmp_path / 'nope.csv'}")
    for name, text, match in [("words.csv", "hello\nworld\n", "no numbers"), ("empty.csv", "", "no numbers"),
                              ("neg.csv", "10\n-3\n", "neg.csv:2"), ("mid.csv", "10\nabc\n", "mid.csv:2")]:
        trace = tmp_path / name
        trace.write_text(text)
        with pytest.raises(ZsgdError, match=match):
            parse_delay(f"trace:{trace}")


def test_lists_split_into_arms_with_shared_units():
    assert split_specs("0,10,50,200ms", "--latency") == ["0ms", "10ms", "50ms", "200ms"]
    assert [parse_delay(s).mean for s in split_specs("0,10,50,200ms", "--latency")] == pytest.approx([0, 0.01, 0.05, 0.2])
    assert split_specs("0,uniform:5ms,20ms,normal:10ms,2ms,exp:3ms", "--latency") == ["0", "uniform:5ms,20ms", "normal:10ms,2ms", "exp:3ms"]
    assert split_specs("10,100Mbps,inf", "--bandwidth") == ["10Mbps", "100Mbps", "inf"]
    assert split_specs("none,0.1:4x,0.2:2x,transient:30:5", "--stragglers", units=False) == ["none", "0.1:4x", "0.2:2x,transient:30:5"]
    assert split_specs("3@1s,4@2s;rate:0.1", "--failures", units=False) == ["3@1s,4@2s", "rate:0.1"]
    assert propagate_units(["1", "2s", "3", "4ms"]) == ["1s", "2s", "3ms", "4ms"]
    with pytest.raises(ZsgdError, match="empty item"):
        split_specs("10ms,,20ms", "--latency")
    with pytest.raises(ZsgdError, match="empty"):
        split_specs("", "--latency")


def test_bandwidth_and_loss():
    assert parse_bandwidth("100Mbps") == pytest.approx(12.5e6)
    assert parse_bandwidth("1Gbps") == pytest.approx(125e6)
    assert parse_bandwidth("10MB/s") == pytest.approx(10e6)
    assert parse_bandwidth("1GiB/s") == pytest.approx(2**30)
    assert parse_bandwidth("inf") == math.inf
    for bad in ("100", "0Mbps", "-1Gbps", "fast", "", "10parsecs"):
        with pytest.raises(ZsgdError, match="bad bandwidth"):
            parse_bandwidth(bad)
    assert parse_loss("0.01") == 0.01 and parse_loss("5%") == pytest.approx(0.05)
    for bad in ("1", "-0.1", "x", "", "150%"):
        with pytest.raises(ZsgdError, match="bad loss"):
            parse_loss(bad)


def test_network_delay_adds_transfer_and_retransmits():
    net = Network(latency_up=Constant(0.01), latency_down=Constant(0.02), bandwidth=1e6)
    links = LinkDraws(0)
    assert net.delay(0, True, 500_000, links) == pytest.approx(0.51)
    assert net.delay(0, False, 0, links) == pytest.approx(0.02)
    net.worker_latency = parse_worker_latency(["3=50ms", "5-6=0"])
    assert net.delay(3, True, 0, links) == pytest.approx(0.05) and net.delay(6, False, 0, links) == 0
    lossy = Network(loss=0.5, retransmit=Constant(0.1))
    r = LinkDraws(4)
    mean = np.mean([lossy.delay(0, True, 0, r) for _ in range(20_000)])
    assert mean == pytest.approx(0.1, rel=0.05)  # geometric: p/(1-p) resends of 100 ms
    for bad in ("3", "x=1ms", "5-2=1ms", "3=10parsecs"):
        with pytest.raises(ZsgdError):
            parse_worker_latency([bad])


def test_compute_specs():
    assert isinstance(parse_compute("measured"), Measured)
    assert parse_compute("5ms") == Constant(0.005)
    assert parse_compute("normal:5ms,1ms") == Normal(0.005, 0.001)
    with pytest.raises(ZsgdError, match="compute time"):
        parse_compute("fast")


def test_stragglers_are_seeded_and_persistent():
    spec = parse_stragglers("0.1:4x")
    assert (spec.fraction, spec.factor, spec.transient) == (0.1, 4.0, False)
    a, b = spec.assign(100, seed=7), spec.assign(100, seed=7)
    assert a.workers == b.workers and len(a.workers) == 10
    assert spec.assign(100, seed=8).workers != a.workers
    slow = min(a.workers)
    fast = min(set(range(100)) - a.workers)
    assert a.factor(slow, 0.0) == 4.0 == a.factor(slow, 1e6) and a.factor(fast, 5.0) == 1.0
    assert a.persistent_factors() == {w: 4.0 for w in sorted(a.workers)}
    assert parse_stragglers("none") is None and parse_stragglers("0") is None
    assert len(parse_stragglers("0.01:2x").assign(10, 0).workers) == 1  # a positive fraction slows at least one


def test_transient_stragglers_are_slow_for_the_expected_share_of_time():
    spec = parse_stragglers("1:3x,transient:4:1")
    assert spec.transient and str(spec) == "1:3x,transient:4:1"
    s = spec.assign(4, seed=0)
    ts = np.arange(0, 20_000, 0.5)
    slow_share = np.mean([s.factor(0, t) == 3.0 for t in ts])
    assert slow_share == pytest.approx(1 / 5, abs=0.03)  # duration / (period + duration)
    assert s.persistent_factors() == {}


@pytest.mark.parametrize("bad", ["", "0.1", "1.5:2x", "0:2x", "0.1:0.5x", "0.1:4x,transient:10", "0.1:4x,sometimes:1:2",
                                 "0.1:4x,transient:0:1", "10parsecs"])
def test_bad_stragglers(bad):
    with pytest.raises(ZsgdError, match="stragglers"):
        parse_stragglers(bad)


def test_failures():
    f = parse_failures("3@10s+5s,0-1@1min")
    assert f.events == ((3, 10.0, 5.0), (0, 60.0, None), (1, 60.0, None))
    f.check(4)
    with pytest.raises(ZsgdError, match="worker 3 does not exist"):
        f.check(3)
    r = parse_failures("rate:0.01+30s")
    assert (r.rate, r.recover_s) == (0.01, 30.0)
    assert parse_failures("none") is None
    for bad in ("", "3", "3@", "x@1s", "3@-1s", "3@10parsecs", "rate:0", "rate:x", "2-1@1s"):
        with pytest.raises(ZsgdError, match="failure"):
            parse_failures(bad)


def test_delay_queue_orders_by_due_time_then_push_order():
    q = DelayQueue()
    assert q.next_due() is None and q.pop_due(100.0) == []
    q.push("c", now=0.0, delay=2.0)
    q.push("a", now=0.0, delay=1.0)
    q.push("b", now=0.5, delay=0.5)
    assert q.next_due() == 1.0 and len(q) == 3
    assert q.pop_due(0.99) == []
    assert q.pop_due(1.0) == ["a", "b"]
    assert q.pop_due(10.0) == ["c"] and len(q) == 0
    with pytest.raises(ValueError):
        q.push("x", 0.0, -1.0)


def test_link_emulator_uses_the_same_models():
    emu = LinkEmulator(Network(latency_down=Constant(0.03)), parse_stragglers("0.5:2x"), n_workers=4, seed=1)
    assert emu.delay(0, up=False, nbytes=10) == pytest.approx(0.03)
    assert sorted(emu.slowdown(w, 0.0) for w in range(4)) == [1.0, 1.0, 2.0, 2.0]


def test_the_servers_nic_takes_one_message_at_a_time_each_way():
    """--inject-broker-bandwidth: updates queue on the server's NIC after their uplink, replies before their
    downlink, each direction a FIFO of its own (zsgd sim's two FIFOs); without it a message takes its link alone."""
    from zsgd.runtime.emulation import emulator_from_specs

    emu = LinkEmulator(Network(latency_up=Constant(0.01), latency_down=Constant(0.01), bandwidth=1000.0), n_workers=3,
                       nic_bandwidth=1000.0)
    assert emu.update_delay(0, 100, now=2.0) == pytest.approx(0.11 + 0.1)  # uplink, then the NIC
    assert emu.update_delay(1, 100, now=2.0) == pytest.approx(0.11 + 0.2)  # behind worker 0's on the NIC
    assert emu.reply_delay(2, 100, now=2.0) == pytest.approx(0.1 + 0.11)  # sending: its own FIFO, free
    assert emu.reply_delay(0, 100, now=2.05) == pytest.approx(0.15 + 0.11)  # behind the first reply until 2.2
    assert emu.update_delay(2, 100, now=9.0) == pytest.approx(0.21)  # idle again
    plain = LinkEmulator(Network(latency_up=Constant(0.01), bandwidth=1000.0), n_workers=2)
    assert [plain.update_delay(w, 100, now=0.0) for w in (0, 1)] == [pytest.approx(0.11)] * 2
    assert emulator_from_specs(None, None, None, None, 2, 0, broker_bandwidth="100Mbps").nic_bandwidth == 12.5e6
    with pytest.raises(ZsgdError, match="^--inject-broker-bandwidth: bad bandwidth 'fast'"):
        emulator_from_specs(None, None, None, None, 2, 0, broker_bandwidth="fast")


def test_peer_messages_queue_on_the_senders_link_as_the_simulator_sends_them():
    """A node's copies to its neighbours leave its link one after another: the k-th of a round arrives after
    k + 1 message times plus the latency (zsgd sim's decentralized model); another node's link is its own,
    and a link that has sent everything is free again."""
    emu = LinkEmulator(Network(latency_up=Constant(0.01), bandwidth=1000.0), n_workers=3, seed=0)
    assert emu.peer_delay(0, 100, now=5.0) == pytest.approx(0.01 + 0.1)
    assert emu.peer_delay(0, 100, now=5.0) == pytest.approx(0.01 + 0.2)  # behind the first on worker 0's link
    assert emu.peer_delay(1, 100, now=5.05) == pytest.approx(0.01 + 0.1)  # worker 1's own link
    assert emu.peer_delay(0, 100, now=5.15) == pytest.approx(0.05 + 0.01 + 0.1)  # worker 0's link busy until 5.2
    assert emu.peer_delay(0, 100, now=9.0) == pytest.approx(0.01 + 0.1)  # idle again


# -- properties ----------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e3, allow_nan=False), st.floats(0, 1e3, allow_nan=False)), max_size=50),
       st.floats(0, 3e3, allow_nan=False))
def test_delay_queue_releases_exactly_the_due_items_in_order(items, now):
    q = DelayQueue()
    for i, (t, d) in enumerate(items):
        q.push(i, t, d)
    due = q.pop_due(now)
    expected = sorted((t + d, i) for i, (t, d) in enumerate(items) if t + d <= now)
    assert due == [i for _due, i in expected]
    assert len(q) == len(items) - len(due)
    assert q.next_due() is None or q.next_due() > now


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1e4, allow_nan=False), st.sampled_from(["us", "ms", "s", "min"]))
def test_any_duration_with_a_unit_parses(value, unit):
    from zsgd.network import TIME_UNITS

    assert parse_duration(f"{value!r}{unit}") == pytest.approx(value * TIME_UNITS[unit])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 500), min_size=1, max_size=6), st.sampled_from(["ms", "s", "us"]))
def test_a_trailing_unit_applies_to_the_whole_list(values, unit):
    text = ",".join(map(str, values)) + unit
    assert split_specs(text, "--latency") == [f"{v}{unit}" for v in values]


def test_each_link_draws_its_own_stream_whatever_the_others_draw():
    """The n-th message on a link gets that link's n-th draw (common random numbers between a real emulated run and
    its twin): interleaving other links' messages differently, as a real broker and the simulator do, changes none."""
    net = Network(latency_up=Uniform(0.01, 0.09), latency_down=parse_delay("lognormal:30ms,0.5"))
    a, b = LinkDraws(7), LinkDraws(7)
    first = [net.delay(w, up, 100, a) for w in range(3) for up in (True, False) for _ in range(5)]  # link by link
    by_link = {}
    for _ in range(5):  # round-robin over the links: the other order
        for w in reversed(range(3)):
            for up in (False, True):
                by_link.setdefault((w, up), []).append(net.delay(w, up, 100, b))
    assert first == [x for w in range(3) for up in (True, False) for x in by_link[(w, up)]]
    assert len(set(first)) == len(first)  # and the links' streams differ from one another
    assert [net.delay(0, True, 100, LinkDraws(8)) for _ in range(3)] != first[:3]  # another seed, other draws



def test_a_real_runs_emulator_draws_what_the_simulator_draws_on_each_link():
    """``zsgd run --inject-latency`` and ``zsgd sim`` of the same seed give a worker's n-th update the same latency."""
    net = Network(latency_up=Uniform(0.025, 0.075), latency_down=Uniform(0.025, 0.075))
    emu, sim = LinkEmulator(net, n_workers=4, seed=3), LinkDraws(3)
    real = [emu.delay(w, up, 0) for w in (2, 0, 3) for up in (True, False)]
    assert real == [net.delay(w, up, 0, sim) for w in (2, 0, 3) for up in (True, False)]


def test_a_lognormal_and_its_twins_trace_of_quantiles_draw_the_same_for_the_same_message(tmp_path):
    """A twin's shifted lognormal is a trace of its quantiles (zsgd.experiments.twin.shifted_latency): drawn from the
    same link's stream, the n-th message gets the same quantile on both sides, 2 ms later in the twin. Drawn by
    different transforms of the stream (standard_normal against an index), the two were unrelated, and the fidelity
    matrix's lognormal cell came out 10-13 % off whatever the run, its seed's two samples of 200 messages apart."""
    from zsgd.experiments.twin import shifted_latency

    real = parse_delay("lognormal:50ms,0.5", "--latency")
    twin = parse_delay(shifted_latency("lognormal:50ms,0.5", 0.002, tmp_path, "up"), "--latency")
    assert isinstance(twin, Trace)
    a, b = LinkDraws(0), LinkDraws(0)
    r = np.array([real.sample(a.rng(w, True)) for w in range(4) for _ in range(50)])
    t = np.array([twin.sample(b.rng(w, True)) for w in range(4) for _ in range(50)])
    assert np.corrcoef(r, t)[0, 1] > 0.99
    assert np.median(t - r) == pytest.approx(0.002, abs=2e-4)
