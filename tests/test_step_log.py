"""``ksync:K``/``kasync:K`` split over range servers (``zsgd.algorithms.step_log``), in-process.

The coordinator's rule decides each step on its range and logs it; a range server replays the log with the
gradients arriving in another order, interleaved with the log at random. Both together must be, bit for bit,
the rule on the whole vector: the same workers' gradients, summed in the same order, at the same versions.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from zsgd.algorithms import Applied, Reply, Update, make_server_algorithm
from zsgd.algorithms.step_log import Gather, StepFollower, StepLeader
from zsgd.nn.optim import make_optimizer

N_PARAMS, SPLIT = 40, 17


def _grad(worker: int, count: int, w: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(1000 * worker + count)
    return (rng.standard_normal(w.size).astype(np.float32) + np.float32(0.1) * w).astype(np.float32)


def _replies(outputs) -> list[Reply]:
    return [o for o in outputs if isinstance(o, Reply)]


@pytest.mark.parametrize("spec", ["ksync:2", "kasync:2", "ksync:3"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_range_server_replaying_the_log_is_bit_identical_to_one_server(spec, seed):
    rnd = random.Random(seed)
    w0 = np.random.default_rng(seed).standard_normal(N_PARAMS).astype(np.float32)
    opt = lambda n: make_optimizer("sgd", n, lr=0.05, momentum=0.9)  # noqa: E731
    ref = make_server_algorithm(spec, w0, opt(N_PARAMS))
    lead = make_server_algorithm(spec, w0[:SPLIT], opt(SPLIT))
    log = StepLeader()
    follow = StepFollower(w0[SPLIT:], opt(N_PARAMS - SPLIT))
    n_workers, counts = 4, [0] * 4
    held: dict[int, dict[str, tuple[int, np.ndarray]]] = {w: {} for w in range(n_workers)}  # worker -> part -> (version, weights)
    inbox: list = []  # what the range server has not received yet: ("log", entries) in order, ("grad", update) in any order
    applied_ref, applied_follow = [], []

    def lead_out(outputs):
        log.outputs(outputs)
        for r in _replies(outputs):
            held[r.worker]["lead"] = (r.version, np.array(r.weights))
        if log.entries:
            inbox.append(("log", log.take()))

    def follower_out(outputs):
        for o in outputs:
            if isinstance(o, Reply):
                held[o.worker]["follow"] = (o.version, np.array(o.weights))
            elif isinstance(o, Applied):
                applied_follow.append(o.workers)

    def ref_out(outputs):
        for o in outputs:
            if isinstance(o, Reply):
                held[o.worker]["ref"] = (o.version, np.array(o.weights))
            elif isinstance(o, Applied):
                applied_ref.append(o.workers)

    def deliver_one():
        logs = [i for i, m in enumerate(inbox) if m[0] == "log"]
        i = rnd.choice(([logs[0]] if logs else []) + [i for i, m in enumerate(inbox) if m[0] == "grad"])
        kind, item = inbox.pop(i)
        follower_out(follow.follow(item, 0.0) if kind == "log" else follow.on_update(item, 0.0))

    for w in range(n_workers):
        ref_out(ref.add_worker(w, 0.0))
        lead_out(lead.add_worker(w, 0.0))
        if w != 3:  # worker 3 reaches the range server late: its first weights are owed until it joins
            follower_out(follow.add_worker(w, 0.0))
    for step in range(1500):
        if step == 40:
            follower_out(follow.add_worker(3, 0.0))
        ready = [w for w in range(n_workers) if {"lead", "follow", "ref"} <= set(held[w])]
        if not ready or (inbox and rnd.random() < 0.5):
            if inbox:
                deliver_one()
            continue
        w = rnd.choice(ready)
        (vl, wl), (vf, wf), (vr, wr) = held[w].pop("lead"), held[w].pop("follow"), held[w].pop("ref")
        assert vl == vf == vr  # the worker holds every range at the version one server would have given it
        np.testing.assert_array_equal(np.concatenate([wl, wf]), wr)
        g = _grad(w, counts[w], wr)
        counts[w] += 1
        seq = 7_000 + counts[w]
        ref_out(ref.on_update(Update(w, vr, g, 32), 0.0))
        up = Update(w, vl, g[:SPLIT].copy(), 32, meta={"seq": seq})
        outputs = lead.on_update(up, 0.0)
        log.update(up, outputs)
        lead_out(outputs)
        inbox.append(("grad", Update(w, vf, g[SPLIT:].copy(), 32, meta={"seq": seq})))
    log.gather(5, True)
    inbox.append(("log", log.take()))
    while inbox:
        deliver_one()
    assert ref.version > 50 and follow.version == lead.version == ref.version
    np.testing.assert_array_equal(np.concatenate([lead.w, follow.w]), ref.w)
    assert applied_follow == applied_ref and follow.missing == follow.version_mismatch == 0
    assert follow.report()["step_digest"] == log.digest.hex()


def test_a_gradient_that_never_comes_is_left_out_after_the_give_up_time_and_counted():
    follow = StepFollower(np.zeros(3, np.float32), make_optimizer("sgd", 3, lr=1.0), give_up_s=5.0)
    follow.add_worker(0, 0.0)
    follow.on_update(Update(0, 0, np.ones(3, np.float32), 1, meta={"seq": 1}), 0.0)
    entries = [["step", 1, 1.0, True, [[0, 1, 1], [1, 9, 1]]], ["reply", 0, 1], ["state", 3, False]]
    assert follow.follow(entries, 1.0) == []  # worker 1's gradient is not here: the step waits
    assert follow.tick(5.9) == []
    out = follow.tick(6.1)
    assert [type(o) for o in out] == [Applied, Reply, Gather] and follow.missing == 1
    np.testing.assert_array_equal(follow.w, -np.ones(3, np.float32))  # worker 0's gradient alone
    assert follow.version == 1 and follow.version_mismatch == 0
