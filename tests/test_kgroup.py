"""K-sync and K-async SGD (``ksync:K``, ``kasync:K``), driven by hand: exact, fast, no sockets."""

import numpy as np
import pytest

from helpers import PlainSGD, ups
from zsgd.algorithms import (Applied, AsyncSGD, Cancel, Dropped, KAsyncSGD, KSyncSGD, Notice, Reply, Update, algorithm_class,
                             check_servers_support, make_server_algorithm, parse_algo)
from zsgd.errors import ZsgdError


def grad(v, n=2):
    return np.full(n, v, dtype=np.float32)


def started(cls, n, k, lr=0.5):
    algo = cls(np.zeros(2, np.float32), PlainSGD(lr), k=k)
    replies = [r for w in range(n) for r in algo.add_worker(w, 0.0)]
    assert [(r.worker, r.version) for r in replies] == [(w, 0) for w in range(n)]
    return algo


def test_ksync_steps_on_the_first_k_and_drops_the_late_gradient():
    algo = started(KSyncSGD, 4, 2)
    assert algo.on_update(Update(2, 0, grad(1.0), 1), 1) == []  # one of two: nothing yet
    out = algo.on_update(Update(0, 0, grad(3.0), 3), 2)
    (a,) = ups(out, Applied)
    assert (a.version, a.staleness, a.n_samples, a.contributors, a.workers) == (1, 0, 4, 2, (2, 0))
    np.testing.assert_allclose(algo.w, -0.5 * (1.0 * 1 + 3.0 * 3) / 4)  # sample-weighted mean
    assert sorted(r.worker for r in ups(out, Reply)) == [0, 2]  # only the contributors were waiting
    assert ups(out, Cancel) == [Cancel(1, 1), Cancel(3, 1)]  # the others abandon their step
    # Workers 1 and 3 computed at version 0: too late, dropped, and they get version 1 at once.
    out = algo.on_update(Update(1, 0, grad(100.0), 1), 3)
    assert [d.reason for d in ups(out, Dropped)] == ["stale-round"]
    assert [(r.worker, r.version) for r in ups(out, Reply)] == [(1, 1)]
    assert algo.version == 1 and ups(out, Applied) == []


def test_ksync_k_equal_n_is_sync_and_k_one_steps_on_every_fresh_gradient():
    algo = started(KSyncSGD, 3, 3)
    assert algo.on_update(Update(0, 0, grad(1.0), 1), 1) == []
    assert algo.on_update(Update(1, 0, grad(1.0), 1), 1) == []
    out = algo.on_update(Update(2, 0, grad(4.0), 1), 1)
    assert ups(out, Applied)[0].contributors == 3
    np.testing.assert_allclose(algo.w, -1.0)
    one = started(KSyncSGD, 2, 1)
    out = one.on_update(Update(0, 0, grad(1.0), 1), 1)
    assert ups(out, Applied)[0].version == 1 and [r.worker for r in ups(out, Reply)] == [0]
    np.testing.assert_allclose(one.w, -0.5)  # one gradient: applied exactly as it came


def test_ksync_shrinks_k_to_the_live_workers_and_says_so():
    algo = started(KSyncSGD, 3, 3)
    algo.on_update(Update(0, 0, grad(1.0), 1), 1)
    algo.on_update(Update(1, 0, grad(1.0), 1), 1)
    out = algo.remove_worker(2, 2)  # the round no longer waits for the dead worker
    (n,) = ups(out, Notice)
    assert n.kind == "k" and n.fields == {"k": 2, "requested": 3, "live": 2}
    assert ups(out, Applied)[0].contributors == 2 and algo.version == 1
    assert algo.report() == {"k": 3, "k_min": 2, "short_steps": 1}
    algo.add_worker(2, 3)  # back: the next step takes three again, and says so
    for w in range(3):
        out = algo.on_update(Update(w, 1, grad(1.0), 1), 4)
    assert ups(out, Applied)[0].contributors == 3 and ups(out, Notice)[0].fields["k"] == 3
    assert algo.report()["short_steps"] == 1


def test_ksync_keeps_a_dead_contributors_gradient_and_never_waits_forever():
    algo = started(KSyncSGD, 2, 2)
    algo.on_update(Update(0, 0, grad(2.0), 1), 1)
    out = algo.remove_worker(0, 2)  # K shrinks to 1, and worker 0's gradient is already in: the step happens
    (a,) = ups(out, Applied)
    assert a.workers == (0,) and ups(out, Reply) == []  # nobody to reply to
    np.testing.assert_allclose(algo.w, -1.0)
    out = algo.on_update(Update(1, 0, grad(1.0), 1), 3)  # worker 1's gradient is now a round late
    assert ups(out, Dropped)[0].reason == "stale-round" and ups(out, Reply)[0].version == 1


def test_ksync_rejoined_contributor_waits_for_the_step_and_rejects_bad_input():
    algo = started(KSyncSGD, 3, 2)
    algo.on_update(Update(0, 0, grad(1.0), 1), 1)
    algo.remove_worker(0, 2)
    assert [r.version for r in ups(algo.add_worker(0, 3), Reply)] == [0]
    out = algo.on_update(Update(0, 0, grad(1.0), 1), 4)  # its old gradient is in: a second one is a duplicate
    assert [d.reason for d in ups(out, Dropped)] == ["duplicate"] and ups(out, Reply) == []
    out = algo.on_update(Update(1, 0, grad(1.0), 1), 5)
    assert sorted(r.worker for r in ups(out, Reply)) == [0, 1]  # the rejoined worker is answered with the step
    assert ups(algo.on_update(Update(9, 0, grad(1.0), 1), 6), Dropped)[0].reason == "not-a-member"
    assert ups(algo.on_update(Update(2, 7, grad(1.0), 1), 6), Dropped)[0].reason == "bad-version"
    out = algo.on_update(Update(2, 1, grad(np.nan), 1), 7)
    assert ups(out, Dropped)[0].reason == "non-finite" and ups(out, Reply)[0].worker == 2 and algo.version == 1


def test_kasync_takes_stale_gradients_and_replies_to_the_k_only():
    algo = started(KAsyncSGD, 3, 2)
    algo.on_update(Update(0, 0, grad(1.0), 1), 1)
    out = algo.on_update(Update(1, 0, grad(1.0), 1), 2)
    assert ups(out, Applied)[0].staleness == 0 and sorted(r.worker for r in ups(out, Reply)) == [0, 1]
    # Worker 2 still holds version 0: its gradient counts, one version stale.
    assert algo.on_update(Update(2, 0, grad(1.0), 1), 3) == []
    out = algo.on_update(Update(0, 1, grad(1.0), 1), 4)
    (a,) = ups(out, Applied)
    assert (a.version, a.workers, a.staleness) == (2, (2, 0), 0)  # staleness 1 and 0: the mean, rounded to even
    assert sorted(r.worker for r in ups(out, Reply)) == [0, 2]
    assert ups(out, Cancel) == []  # K-async: the others keep computing on their older weights


def test_kasync_one_is_async():
    """``kasync:1`` takes the very steps of async SGD, with the same staleness-scaled rates."""
    rng = np.random.default_rng(3)
    a, b = (cls(np.zeros(3, np.float32), PlainSGD(0.1), staleness_lr=True, **kw) for cls, kw in ((AsyncSGD, {}), (KAsyncSGD, {"k": 1})))
    held = {}
    for w in range(4):
        a.add_worker(w, 0)
        (r,) = ups(b.add_worker(w, 0), Reply)
        held[w] = r.version
    for t in range(60):
        w = int(rng.integers(4))
        g = rng.standard_normal(3).astype(np.float32)
        ra, rb = a.on_update(Update(w, held[w], g, 1), t), b.on_update(Update(w, held[w], g, 1), t)
        assert ups(ra, Applied)[0].staleness == ups(rb, Applied)[0].staleness
        held[w] = ups(rb, Reply)[0].version
    np.testing.assert_allclose(a.w, b.w, rtol=1e-6)
    assert a.optimizer.calls == b.optimizer.calls


@pytest.mark.parametrize("cls", [KSyncSGD, KAsyncSGD])
def test_random_interleavings_never_stall(cls):
    """Workers that finish in random order, die and rejoin: every live worker is always computing or
    waiting for a step that its peers can complete (no state where all wait)."""
    rng = np.random.default_rng(7)
    algo = started(cls, 5, 3, lr=0.01)
    computing = {w: 0 for w in range(5)}  # worker -> version it computes at
    for t in range(400):
        if rng.random() < 0.05 and len(algo.live) > 1:
            w = int(rng.choice(sorted(algo.live)))
            out = algo.remove_worker(w, t)
            computing.pop(w, None)
        elif rng.random() < 0.05 and len(algo.live) < 5:
            w = min(set(range(5)) - algo.live)
            out = algo.add_worker(w, t)
        else:
            assert computing, f"every live worker waits: {algo.state()}"
            w = int(rng.choice(sorted(computing)))
            out = algo.on_update(Update(w, computing.pop(w), grad(1.0), 1), t)
        for r in ups(out, Reply):
            computing[r.worker] = r.version
        for a in ups(out, Applied):
            assert 1 <= a.contributors <= 3 and a.contributors == len(a.workers)
    assert algo.version > 50


@pytest.mark.parametrize("spec,name,k", [("ksync:3", "ksync", 3), ("kasync:1", "kasync", 1)])
def test_factory_and_capabilities(spec, name, k):
    algo = make_server_algorithm(spec, np.zeros(3, np.float32), PlainSGD())
    assert algo.name == name and algo.k == k and algorithm_class(spec).shardable and algorithm_class(spec).step_log
    assert algorithm_class("sync").shardable and not algorithm_class("sync").step_log
    check_servers_support(spec, 1)
    check_servers_support(spec, 2)  # the coordinator decides each step, the range servers replay it


@pytest.mark.parametrize("bad", ["ksync", "ksync:", "ksync:0", "kasync:-1", "kasync:x", "ksync:2.5", "kasync:١"])
def test_bad_k_specs_name_the_value(bad):
    with pytest.raises(ZsgdError, match="algorithm"):
        parse_algo(bad)
