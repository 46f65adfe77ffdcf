"""The sans-IO server rules, driven by hand: exact, fast, no sockets."""

import numpy as np
import pytest

from helpers import PlainSGD, ups
from zsgd.algorithms import Applied, AsyncSGD, Dropped, Reply, StaleSynchronousSGD, SyncSGD, Update, make_server_algorithm, parse_algo
from zsgd.errors import ZsgdError


def grad(v, n=4):
    return np.full(n, v, dtype=np.float32)


def test_async_applies_each_update_and_replies_current_weights():
    algo = AsyncSGD(np.zeros(4, np.float32), PlainSGD(0.5))
    r0 = algo.add_worker(0, 0.0)
    r1 = algo.add_worker(1, 0.0)
    assert [r.version for r in r0 + r1] == [0, 0]
    out = algo.on_update(Update(0, 0, grad(1.0), 8), 1.0)
    (applied,) = ups(out, Applied)
    assert applied.staleness == 0 and algo.version == 1
    np.testing.assert_allclose(algo.w, -0.5)
    out = algo.on_update(Update(1, 0, grad(1.0), 8), 2.0)
    (applied,) = ups(out, Applied)
    (reply,) = ups(out, Reply)
    assert applied.staleness == 1 and reply.worker == 1 and reply.version == 2
    np.testing.assert_allclose(reply.weights, -1.0)


def test_async_snapshot_is_immutable_and_shared_per_version():
    algo = AsyncSGD(np.zeros(4, np.float32), PlainSGD(0.5))
    (a,) = algo.add_worker(0, 0)
    (b,) = algo.add_worker(1, 0)
    assert a.weights is b.weights
    with pytest.raises(ValueError):
        a.weights[0] = 1
    algo.on_update(Update(0, 0, grad(1.0), 1), 1)
    np.testing.assert_allclose(a.weights, 0.0)  # what was sent is untouched by training


def test_async_staleness_lr_divides_step():
    opt = PlainSGD(0.4)
    algo = AsyncSGD(np.zeros(2, np.float32), opt, staleness_lr=True)
    for w in range(3):
        algo.add_worker(w, 0)
    for w in range(3):
        algo.on_update(Update(w, 0, grad(1.0, 2), 1), 1)
    assert opt.calls == [0.4, 0.4 / 1, 0.4 / 2]


def test_async_rejects_unknown_worker_and_future_version():
    algo = AsyncSGD(np.zeros(2, np.float32), PlainSGD())
    assert isinstance(algo.on_update(Update(9, 0, grad(1, 2), 1), 0)[0], Dropped)
    algo.add_worker(0, 0)
    out = algo.on_update(Update(0, 5, grad(1, 2), 1), 0)
    assert ups(out, Dropped)[0].reason == "bad-version" and algo.version == 0


def test_sync_waits_for_all_then_averages_by_samples():
    algo = SyncSGD(np.zeros(2, np.float32), PlainSGD(1.0))
    assert len(algo.add_worker(0, 0)) == 1  # first worker starts a round alone
    assert algo.add_worker(1, 0) == []  # joins next round
    out = algo.on_update(Update(0, 0, grad(3.0, 2), 10), 1)
    assert ups(out, Applied)  # round of one completes
    replies = ups(out, Reply)
    assert sorted(r.worker for r in replies) == [0, 1] and all(r.version == 1 for r in replies)
    assert algo.on_update(Update(0, 1, grad(1.0, 2), 30), 2) == []  # waits for worker 1
    out = algo.on_update(Update(1, 1, grad(5.0, 2), 10), 3)
    (applied,) = ups(out, Applied)
    assert applied.contributors == 2 and applied.n_samples == 40 and applied.staleness == 0
    np.testing.assert_allclose(algo.w, -3.0 - (1.0 * 30 + 5.0 * 10) / 40)


def test_sharded_sync_admits_a_joiner_into_the_round_in_progress():
    """--servers K: each server admits a joiner into its current round, so no worker is ever held at one
    server while it is in another's round (both would wait for ever)."""
    algo = SyncSGD(np.zeros(2, np.float32), PlainSGD(1.0))
    algo.admit_into_open_round = True
    algo.add_worker(0, 0)
    algo.add_worker(1, 0)
    assert algo.on_update(Update(0, 0, grad(1.0, 2), 10), 1) == []  # worker 1 is in this round: it waits for it
    (reply,) = ups(algo.add_worker(2, 1), Reply)  # joins after a gradient arrived: still in this round
    assert reply.worker == 2 and reply.version == 0 and algo.expected == {0, 1, 2}
    assert algo.on_update(Update(1, 0, grad(2.0, 2), 10), 2) == []
    out = algo.on_update(Update(2, 0, grad(3.0, 2), 20), 3)
    (applied,) = ups(out, Applied)
    assert applied.contributors == 3 and applied.n_samples == 40
    assert sorted(r.worker for r in ups(out, Reply)) == [0, 1, 2]


def test_sync_dead_worker_is_dropped_from_round():
    algo = SyncSGD(np.zeros(2, np.float32), PlainSGD(1.0))
    algo.add_worker(0, 0)
    algo.add_worker(1, 0)
    algo.on_update(Update(0, 0, grad(1, 2), 1), 0)  # round 0 had only worker 0
    assert algo.version == 1 and algo.expected == {0, 1}
    assert algo.on_update(Update(0, 1, grad(1, 2), 1), 1) == []
    out = algo.remove_worker(1, 2)  # heartbeat timeout: round completes without it
    assert ups(out, Applied) and algo.version == 2
    assert [r.worker for r in ups(out, Reply)] == [0]


def test_sync_rejoining_worker_enters_next_round_and_stale_gradient_is_dropped():
    algo = SyncSGD(np.zeros(2, np.float32), PlainSGD(1.0))
    algo.add_worker(0, 0)
    algo.add_worker(1, 0)
    algo.on_update(Update(0, 0, grad(1, 2), 1), 0)
    out = algo.on_update(Update(1, 0, grad(1, 2), 1), 1)  # computed at round 0, arrives in round 1
    assert ups(out, Dropped)[0].reason == "stale-round"


def test_ssp_holds_fast_worker_until_slowest_catches_up():
    algo = StaleSynchronousSGD(np.zeros(2, np.float32), PlainSGD(0.1), bound=1)
    algo.add_worker(0, 0)
    algo.add_worker(1, 0)
    out = algo.on_update(Update(0, 0, grad(1, 2), 1), 0)
    assert ups(out, Reply)  # clock 1 vs 0: within bound
    out = algo.on_update(Update(0, 1, grad(1, 2), 1), 1)
    assert not ups(out, Reply) and algo.held == {0}  # clock 2 vs 0: held
    out = algo.on_update(Update(1, 0, grad(1, 2), 1), 2)
    assert sorted(r.worker for r in ups(out, Reply)) == [0, 1]
    (applied,) = ups(out, Applied)
    assert applied.staleness == 2


def test_ssp_dead_slow_worker_releases_others():
    algo = StaleSynchronousSGD(np.zeros(2, np.float32), PlainSGD(0.1), bound=0)
    algo.add_worker(0, 0)
    algo.add_worker(1, 0)
    algo.on_update(Update(0, 0, grad(1, 2), 1), 0)
    assert algo.held == {0}
    out = algo.remove_worker(1, 1)
    assert [r.worker for r in ups(out, Reply)] == [0]


@pytest.mark.parametrize("spec,name", [("async", "async"), ("sync", "sync"), ("ssp:3", "ssp")])
def test_factory(spec, name):
    algo = make_server_algorithm(spec, np.zeros(3, np.float32), PlainSGD())
    assert algo.name == name


@pytest.mark.parametrize("bad", ["asink", "ssp", "ssp:-1", "ssp:x", "sync:2", ""])
def test_bad_specs_name_the_value(bad):
    with pytest.raises(ZsgdError, match="algorithm"):
        parse_algo(bad)


def test_async_random_interleaving_keeps_invariants():
    rng = np.random.default_rng(0)
    algo = AsyncSGD(np.zeros(3, np.float32), PlainSGD(0.01))
    held = {}
    for w in range(5):
        (r,) = algo.add_worker(w, 0)
        held[w] = r.version
    stale = []
    for t in range(200):
        w = int(rng.integers(5))
        out = algo.on_update(Update(w, held[w], grad(1, 3), 1), t)
        (a,) = ups(out, Applied)
        (r,) = ups(out, Reply)
        stale.append(a.staleness)
        held[w] = r.version
        assert a.staleness >= 0 and r.version == algo.version
    assert algo.version == 200
    assert 2.0 < np.mean(stale) < 6.0  # uniform random order with 5 workers: mean staleness ~ 4


def test_shared_snapshots_are_copied_away_only_while_in_flight():
    """Copy-on-write replies: a view of the live weights goes out; an update moves the weights to a
    fresh buffer first if that view may still be read, and reuses the buffer once it is not."""
    from zsgd.algorithms import AsyncSGD, Update
    from zsgd.nn.optim import make_optimizer

    n = 64
    algo = AsyncSGD(np.zeros(n, np.float32), make_optimizer("momentum", n, lr=0.1, momentum=0.9))
    busy = [True]
    algo.share_snapshots, algo.snapshot_busy = True, lambda: busy[0]
    reply = algo.add_worker(0, 0.0)[0]
    assert np.shares_memory(reply.weights, algo.w) and not reply.weights.flags.writeable
    before = reply.weights.copy()
    out = algo.on_update(Update(0, 0, np.ones(n, np.float32), 1), 0.1)  # the first reply is still "in flight"
    np.testing.assert_array_equal(reply.weights, before)  # untouched: the update wrote to a fresh buffer
    assert not np.shares_memory(reply.weights, algo.w) and algo.w[0] != before[0]
    second = out[-1].weights
    busy[0] = False
    buffer = algo.w
    algo.on_update(Update(0, 1, np.ones(n, np.float32), 1), 0.2)  # nothing in flight: no copy
    assert algo.w is buffer and np.shares_memory(second, algo.w)
    plain = AsyncSGD(np.zeros(n, np.float32), make_optimizer("sgd", n, lr=0.1))
    assert not np.shares_memory(plain.add_worker(0, 0.0)[0].weights, plain.w)  # the default still copies
