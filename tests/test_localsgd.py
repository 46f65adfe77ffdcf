"""Local SGD / model averaging: the server rule by hand, the worker step on a real model."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from helpers import ups
from zsgd.algorithms import Applied, Dropped, Reply, SyncSGD, Update
from zsgd.algorithms.localsgd import LocalSGD, LocalSGDWorkerStep, parse_localsgd
from zsgd.algorithms.worker import WorkerStep
from zsgd.errors import ZsgdError
from zsgd.nn.models import get_model
from zsgd.nn.optim import SGD, make_optimizer

N_PARAMS = 4


def delta(v, n_samples, worker, version, n=N_PARAMS):
    return Update(worker, version, np.full(n, v, np.float32), n_samples, meta={"kind": "delta"})


def server(**kw):
    return LocalSGD(np.zeros(N_PARAMS, np.float32), SGD(N_PARAMS, 0.1), **kw)


# ---------------------------------------------------------------- spec


@pytest.mark.parametrize("arg, k, mom", [("1", 1, 0.0), ("8", 8, 0.0), ("4,momentum=0.9", 4, 0.9)])
def test_parse(arg, k, mom):
    assert parse_localsgd(arg) == {"k": k, "server_momentum": mom}


@pytest.mark.parametrize("bad", ["", "0", "-2", "x", "1.5", "4,momentum=1", "4,momentum=-0.1", "4,mom=0.5", "4,"])
def test_parse_rejects_bad_specs_in_one_line(bad):
    with pytest.raises(ZsgdError) as info:
        parse_localsgd(bad)
    assert f"localsgd:{bad}" in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- server rule


def test_round_average_is_weighted_by_samples_exactly():
    algo = server(k=4)
    algo.add_worker(0, 0)  # starts round 0 alone
    algo.on_update(delta(1.0, 8, 0, 0), 1)
    algo.add_worker(1, 1)
    algo.add_worker(2, 1)
    assert algo.version == 1
    w1 = algo.w.copy()
    # Round 1 begins when worker 0 reports again (1 and 2 joined mid-round... they wait for it).
    out = algo.on_update(delta(2.0, 10, 0, 1), 2)
    assert ups(out, Applied) and sorted(r.worker for r in ups(out, Reply)) == [0, 1, 2]
    w2 = algo.w.copy()
    np.testing.assert_array_equal(w2, w1 + 2.0)
    assert algo.on_update(delta(1.0, 10, 0, 2), 3) == []
    assert algo.on_update(delta(-2.0, 30, 1, 2), 3) == []
    out = algo.on_update(delta(4.0, 24, 2, 2), 4)
    (applied,) = ups(out, Applied)
    assert applied.contributors == 3 and applied.n_samples == 64 and applied.lr == 1.0
    expected = (1.0 * 10 - 2.0 * 30 + 4.0 * 24) / 64  # = 0.71875, exact in float32
    np.testing.assert_array_equal(algo.w, w2 + np.float32(expected))


def test_dead_worker_is_dropped_from_the_round():
    algo = server()
    for w in range(3):
        algo.add_worker(w, 0)
    algo.on_update(delta(1.0, 1, 0, 0), 0)  # round 0 had worker 0 only
    assert algo.expected == {0, 1, 2}
    algo.on_update(delta(1.0, 10, 0, 1), 1)
    algo.on_update(delta(3.0, 30, 1, 1), 1)
    out = algo.remove_worker(2, 2)  # heartbeat timeout: round completes without it
    (applied,) = ups(out, Applied)
    assert applied.contributors == 2 and algo.version == 2
    np.testing.assert_array_equal(algo.w, 1.0 + (10 + 90) / 40)
    assert sorted(r.worker for r in ups(out, Reply)) == [0, 1]
    # Its late delta for the finished round is dropped, not applied.
    out = algo.on_update(delta(100.0, 1, 2, 1), 3)
    assert ups(out, Dropped)[0].reason == "not-a-member"


def test_a_gradient_is_not_a_delta_and_does_not_stall_the_round():
    algo = server()
    algo.add_worker(0, 0)
    algo.add_worker(1, 0)
    algo.on_update(delta(1.0, 1, 0, 0), 0)
    grad = Update(1, 1, np.ones(N_PARAMS, np.float32), 5, meta={"kind": "grad"})
    out = algo.on_update(delta(2.0, 4, 0, 1), 1) + algo.on_update(grad, 1)
    assert ups(out, Dropped)[0].reason == "not-a-delta"
    assert ups(out, Applied)  # the round finished with worker 0's delta alone
    np.testing.assert_array_equal(algo.w, 3.0)


def test_server_momentum():
    algo = server(server_momentum=0.5)
    algo.add_worker(0, 0)
    algo.on_update(delta(1.0, 1, 0, 0), 0)  # buf = 1, w = 1
    algo.on_update(delta(1.0, 1, 0, 1), 1)  # buf = 1.5, w = 2.5
    algo.on_update(delta(-1.0, 1, 0, 2), 2)  # buf = -0.25, w = 2.25
    np.testing.assert_array_equal(algo.w, 2.25)
    assert algo.state()["k"] == 1 and algo.state()["server_momentum"] == 0.5


# ---------------------------------------------------------------- worker step, real model


def problem(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 1, 6, 6), dtype=np.uint8)
    y = rng.integers(0, 3, n).astype(np.int64)
    model = get_model("mlp", (1, 6, 6), 3)
    return model, x, y, model.init(seed=1)


def drive(algo, steps, n_updates):
    """Play the driver: deliver each Reply's weights to that worker's step, in order."""
    queue = deque()
    for i in range(len(steps)):
        queue.extend(ups(algo.add_worker(i, 0.0), Reply))
    for t in range(n_updates):
        reply = queue.popleft()
        up = steps[reply.worker].compute(reply.weights, reply.version)
        queue.extend(ups(algo.on_update(up, float(t)), Reply))
    return algo.w


def test_worker_step_sends_the_delta_of_k_local_sgd_steps():
    model, x, y, w0 = problem()
    step = LocalSGDWorkerStep(model, x, y, 8, seed=3, worker=0, k=3, lr=0.05)
    ref = WorkerStep(model, x, y, 8, seed=3, worker=0)  # the same batches and dropout seeds
    up = step.compute(w0, 7)
    w = w0.copy()
    losses = []
    for _ in range(3):
        r = ref.compute(w, 7)
        w -= np.float32(0.05) * r.grad
        losses.append(r.loss)
    assert up.meta == {"kind": "delta", "local_steps": 3} and up.base_version == 7 and up.n_samples == 24
    np.testing.assert_allclose(up.grad, w - w0, rtol=1e-5, atol=1e-7)
    assert up.loss == pytest.approx(np.mean(losses))
    assert not np.shares_memory(up.grad, w0)


def test_k1_one_worker_equals_plain_sgd():
    model, x, y, w0 = problem()
    local = LocalSGD(w0, SGD(w0.size, 0.05))
    plain = SyncSGD(w0, SGD(w0.size, 0.05))
    wl = drive(local, [LocalSGDWorkerStep(model, x, y, 8, 0, 0, k=1, lr=0.05)], 12)
    wp = drive(plain, [WorkerStep(model, x, y, 8, 0, 0)], 12)
    assert local.version == plain.version == 12
    np.testing.assert_allclose(wl, wp, rtol=1e-5, atol=1e-6)


def test_identical_shards_average_to_one_workers_trajectory():
    model, x, y, w0 = problem(n=16)
    # Full-batch steps: every worker computes the same gradients whatever its batch order.
    many = LocalSGD(w0, SGD(w0.size, 0.1), k=4)
    steps = [LocalSGDWorkerStep(model, x, y, 16, 0, i, k=4, lr=0.1) for i in range(3)]
    w_many = drive(many, steps, 1 + 3 * 5)  # round 0 (worker 0 alone), then 5 rounds of 3
    one = LocalSGD(w0, SGD(w0.size, 0.1), k=4)
    w_one = drive(one, [LocalSGDWorkerStep(model, x, y, 16, 0, 0, k=4, lr=0.1)], 6)
    assert many.version == one.version == 6
    np.testing.assert_allclose(w_many, w_one, rtol=1e-5, atol=1e-6)


def test_local_optimizer_keeps_its_state_across_rounds():
    model, x, y, w0 = problem()
    opt = make_optimizer("momentum", w0.size, 0.05, momentum=0.9)
    step = LocalSGDWorkerStep(model, x, y, 8, 0, 0, k=2, lr=0.05, local_optimizer=opt, clip_norm=1.0)
    step.compute(w0, 0)
    step.compute(w0, 1)
    assert opt.steps == 4 and opt.state_arrays()["momentum_buffer"].any()
