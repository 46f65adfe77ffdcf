"""The server's fused step (``Optimizer.step_into``, ``zsgd.nn.server_step``) against the unfused path.

Without clipping the fused, out-of-place pass must be bit-identical to
``Optimizer.step`` (weights and optimizer state); with clipping it folds the
scale into the pass and may round differently: within 4 ulp of float32 here.
A gradient holding NaN or Inf anywhere (first element, the middle, the
vector loop's scalar tail) must change nothing. The server algorithms must
give the same weights whichever path (in place, out of place) each update
takes, and never write into a snapshot that may still be in flight.
"""

from __future__ import annotations

import numpy as np
import pytest

from zsgd.algorithms import AsyncSGD, Dropped, SyncSGD, Update, make_server_algorithm
from zsgd.nn import server_step
from zsgd.nn.optim import OPTIMIZER_NAMES, clip_grad_norm, make_optimizer

N = 10_007  # not a multiple of any vector width: the loops' scalar tails run too


def _vectors(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(N).astype(np.float32)
    grads = [(rng.standard_normal(N) * (0.1 + k)).astype(np.float32) for k in range(5)]
    return w, grads


def _ulp_diff(a: np.ndarray, b: np.ndarray) -> int:
    ia, ib = a.view(np.int32).astype(np.int64), b.view(np.int32).astype(np.int64)
    return int(np.abs(ia - ib).max())


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("wd", [0.0, 5e-4])
def test_step_into_is_bit_identical_to_step(name, wd):
    w0, grads = _vectors()
    ref, fused = make_optimizer(name, N, 0.01, weight_decay=wd), make_optimizer(name, N, 0.01, weight_decay=wd)
    w_ref, w, out = w0.copy(), w0.copy(), np.empty_like(w0)
    for k, g in enumerate(grads):
        lr = 0.01 / (k + 1)  # per-step rates, as the broker's schedules and staleness rule give
        ref.step(w_ref, g, lr)
        assert fused.step_into(w, g, out, lr)
        w, out = out, w
        assert np.array_equal(w, w_ref), (name, k)
        for key, arr in ref.state_arrays().items():
            assert np.array_equal(arr, fused.state_arrays()[key]), (name, key, k)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_step_into_with_clipping_matches_clip_then_step(name):
    w0, grads = _vectors(1)
    ref, fused = make_optimizer(name, N, 0.01, weight_decay=1e-4), make_optimizer(name, N, 0.01, weight_decay=1e-4)
    w_ref, w, out = w0.copy(), w0.copy(), np.empty_like(w0)
    for g in grads:
        gc = g.copy()
        clip_grad_norm(gc, 5.0)  # every gradient but the first is above the bound
        ref.step(w_ref, gc)
        assert fused.step_into(w, g, out, clip_norm=5.0)
        w, out = out, w
    assert _ulp_diff(w, w_ref) <= 4
    # below the bound clipping changes nothing, bit for bit
    ref, fused = make_optimizer(name, N, 0.01), make_optimizer(name, N, 0.01)
    w_ref, w = w0.copy(), w0.copy()
    ref.step(w_ref, grads[0])
    assert fused.step_into(w, grads[0], out, clip_norm=1e9)
    assert np.array_equal(out, w_ref) and not np.array_equal(out, w0)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("where", [0, N // 2, N - 1])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_non_finite_gradient_changes_nothing(name, where, bad, clip):
    w0, grads = _vectors(2)
    ref, fused = make_optimizer(name, N, 0.01, weight_decay=1e-4), make_optimizer(name, N, 0.01, weight_decay=1e-4)
    w_ref, w, out = w0.copy(), w0.copy(), np.empty_like(w0)
    for opt, ww in ((ref, w_ref), (fused, w)):
        opt.step(ww, grads[0])
    poisoned = grads[1].copy()
    poisoned[where] = bad
    w_keep = w.copy()
    assert not fused.step_into(w, poisoned, out, clip_norm=clip)
    assert np.array_equal(w, w_keep) and fused.steps == ref.steps
    # the state is untouched: the next good step still equals the reference's
    ref.step(w_ref, grads[2])
    assert fused.step_into(w, grads[2], out)
    assert np.array_equal(out, w_ref)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_all_finite_sees_every_position(bad):
    g = np.ones(N, np.float32)
    assert server_step.all_finite(g)
    for i in (0, 1, 15, 16, N // 2, N - 2, N - 1):
        h = g.copy()
        h[i] = bad
        assert not server_step.all_finite(h) and not server_step.is_finite(h)


def _algo(spec, opt="momentum", clip=None, share=False, busy=None):
    w0, _ = _vectors(3)
    a = make_server_algorithm(spec, w0, make_optimizer(opt, N, 0.01, weight_decay=1e-4), clip_norm=clip)
    if share:
        a.share_snapshots = True
        a.snapshot_busy = busy
    return a


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("clip", [None, 50.0])
def test_async_weights_do_not_depend_on_the_path(opt, clip):
    """Copies (the simulator), in-place views (nothing in flight) and out-of-place steps (a send in flight)
    give bit-identical models; a snapshot handed out while busy never changes afterwards."""
    _, grads = _vectors(4)
    pattern = [False, True, True, False, True, False, False, True, True, True]
    busy_now = {"v": False}
    plain, shared = _algo("async", opt, clip), _algo("async", opt, clip, share=True, busy=lambda: busy_now["v"])
    for a in (plain, shared):
        a.add_worker(0, 0.0)
    held: list[tuple[np.ndarray, np.ndarray]] = []
    for k, busy in enumerate(pattern):
        g = grads[k % len(grads)]
        busy_now["v"] = busy
        out_p = plain.on_update(Update(0, plain.version, g, 32), 0.0)
        live_before = shared.w
        out_s = shared.on_update(Update(0, shared.version, g, 32), 0.0)
        assert np.array_equal(plain.w, shared.w), k
        assert (shared.w is not live_before) == (busy or clip is not None), k  # out of place when a reply may be in flight, or clipping
        reply = out_s[-1].weights
        assert np.array_equal(reply, out_p[-1].weights)
        held.append((reply, reply.copy()))
        for snap, value in held[-2:]:  # what may still be in flight is intact
            if busy_now["v"]:
                assert np.array_equal(snap, value)


def test_async_rejects_a_non_finite_update_and_replies():
    a = _algo("async", share=True, busy=lambda: True)
    a.add_worker(0, 0.0)
    _, grads = _vectors(5)
    a.on_update(Update(0, 0, grads[0], 32), 0.0)
    w, v = a.w.copy(), a.version
    g = grads[1].copy()
    g[7] = np.nan
    out = a.on_update(Update(0, v, g, 32), 0.0)
    assert isinstance(out[0], Dropped) and out[0].reason == "non-finite"
    assert out[1].version == v and np.array_equal(out[1].weights, w) and np.array_equal(a.w, w) and a.version == v


def test_sync_round_drops_a_non_finite_gradient_and_finishes():
    a = _algo("sync")
    for wk in (0, 1):
        a.add_worker(wk, 0.0)
    _, grads = _vectors(6)
    a.on_update(Update(0, 0, grads[0], 32), 0.0)  # the first round had worker 0 only; now both compute
    assert a.version == 1 and a.expected == {0, 1}
    w1 = a.w.copy()
    g = grads[1].copy()
    g[-1] = np.inf
    out = a.on_update(Update(0, 1, g, 32), 0.0)
    assert [o.reason for o in out if isinstance(o, Dropped)] == ["non-finite"] and a.version == 1
    out = a.on_update(Update(1, 1, grads[2], 32), 0.0)
    applied = [o for o in out if hasattr(o, "contributors")]
    assert a.version == 2 and len(applied) == 1 and applied[0].contributors == 1 and applied[0].n_samples == 32
    # the round applied worker 1's gradient alone: as one momentum step from w1 with the same state
    opt = make_optimizer("momentum", N, 0.01, weight_decay=1e-4)
    w_ref = _vectors(3)[0].copy()
    opt.step(w_ref, grads[0])
    assert np.array_equal(w_ref, w1)
    opt.step(w_ref, grads[2])
    assert np.array_equal(a.w, w_ref)
    assert sorted(o.worker for o in out if hasattr(o, "weights")) == [0, 1]  # worker 0 is back in the next round


def test_algorithm_with_a_foreign_optimizer_still_rejects_non_finite():
    class Plain:  # an optimizer without step_into: the unfused path
        lr = 0.1

        def step(self, w, g, lr=None):
            w -= np.float32(lr) * g

    a = AsyncSGD(np.zeros(N, np.float32), Plain())
    a.add_worker(0, 0.0)
    g = np.ones(N, np.float32)
    g[3] = np.nan
    assert a.on_update(Update(0, 0, g, 1), 0.0)[0].reason == "non-finite"
    a.on_update(Update(0, 0, np.ones(N, np.float32), 1), 0.0)
    assert a.version == 1 and np.allclose(a.w, -0.1)


def test_reference_counts_tell_which_buffer_is_in_flight():
    """The broker's trackers only say "some send is in flight"; the algorithm tells which buffer.
    A held reply (or a memoryview of a reshaped view of it, as the wire's encode makes) keeps its
    buffer from being written; a released one is overwritten in place or reused from the pool."""
    a = _algo("async", share=True, busy=lambda: True)
    _, grads = _vectors(7)
    reply = a.add_worker(0, 0.0)[0].weights
    frame = memoryview(reply.reshape(-1)).cast("B")
    keep = reply.copy()
    del reply
    live = a.w
    a.on_update(Update(0, 0, grads[0], 32), 0.0)
    assert a.w is not live and np.array_equal(np.frombuffer(frame, np.float32), keep)  # out of place: the frame is intact
    del frame, live
    buffers = set()
    for k in range(6):  # replies dropped at once: every step is in place, on one buffer
        out = a.on_update(Update(0, a.version, grads[k % 5], 32), 0.0)
        del out
        buffers.add(id(a.w))
    assert len(buffers) == 1
    held = []
    for k in range(8):  # every reply held for two updates: out of place, cycling through a bounded pool
        held.append(a.on_update(Update(0, a.version, grads[k % 5], 32), 0.0)[-1].weights)
        held = held[-2:]
        buffers.add(id(a.w))
    assert len(buffers) <= 5 and all(not np.shares_memory(held[0], held[1]) for _ in [0])
