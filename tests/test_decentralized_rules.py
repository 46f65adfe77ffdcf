"""DSGD, DSGT and consensus ADMM as sans-IO rules: hand-computed Jacobi rounds,
consensus, exactness on distributed least squares, and the peer message layer."""

from __future__ import annotations

import numpy as np
import pytest

from zsgd.wire import protocol
from zsgd.decentralized import (DecentralizedParams, DecentralizedRound, PeerEndpoint, PeerPayload, Topology, make_rule,
                                parse_topology)
from zsgd.nn.optim import SGD
from zsgd.runtime.worker.decentralized_node import payload_from_message
from zsgd.simulation.decentralized import PeerMessageSizes
from zsgd.wire.protocol import ProtocolError

PATH3 = Topology("path", 3, ((1,), (0, 2), (1,)))  # degrees 1, 2, 1: W = [[2/3,1/3,0],[1/3,1/3,1/3],[0,1/3,2/3]]


def identity_grad(x):
    """g_i(x) = x (the loss 0.5 ||x||^2): gradients we can compute by hand."""
    return 0.5 * float(x @ x), np.array(x, dtype=np.float32), 1


def vec(v: float) -> np.ndarray:
    return np.array([v, -2 * v], np.float32)


def driver(algo: str, top: Topology, x0s, grads, params: DecentralizedParams, lr: float = 0.5, **kw) -> DecentralizedRound:
    kw.setdefault("sizer", PeerMessageSizes())  # messages sized as the simulator sizes them: on the wire
    d = DecentralizedRound.build(algo, top, np.zeros_like(x0s[0]), grads, params, lr=lr, **kw)
    for rule, x in zip(d.rules, x0s):  # distinct starting points, for hand-computed rounds
        rule.x = np.array(x, np.float32)
        rule.x.flags.writeable = False
    return d


def test_metropolis_row_of_the_path_by_hand():
    assert PATH3.mixing_matrix() == pytest.approx(np.array([[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]]))


def test_dsgd_rounds_are_jacobi_by_hand():
    # x = (3, 6, 9), alpha = 0.5, g(x) = x.  Mix: (2/3*3 + 1/3*6, (3+6+9)/3, 1/3*6 + 2/3*9) = (4, 6, 8);
    # minus 0.5 * (3, 6, 9) -> (2.5, 3, 3.5).  (Gauss-Seidel would give node 1: (2.5+6+9)/3 - 3 = 2.833.)
    d = driver("dsgd", PATH3, [vec(3), vec(6), vec(9)], [identity_grad] * 3, DecentralizedParams(alpha0=0.5))
    d.run_round()
    np.testing.assert_allclose(d.models(), [vec(2.5), vec(3), vec(3.5)], rtol=1e-6)
    # Round 2: mix (2.5, 3, 3.5) -> (8/3, 3, 10/3); minus 0.5 x -> (17/12, 1.5, 19/12).
    d.run_round()
    np.testing.assert_allclose(d.models(), [vec(17 / 12), vec(1.5), vec(19 / 12)], rtol=1e-6)


def test_the_result_does_not_depend_on_the_order_nodes_step_in():
    grads = [identity_grad] * 3
    a = driver("dsgd", PATH3, [vec(3), vec(6), vec(9)], grads, DecentralizedParams(alpha0=0.5))
    b = driver("dsgd", PATH3, [vec(3), vec(6), vec(9)], grads, DecentralizedParams(alpha0=0.5))
    a.run_round()
    outgoing = [e.outgoing() for e in b.endpoints]
    for msgs in outgoing:
        for to, p in msgs:
            b.endpoints[to].deliver(p)
    for e in reversed(b.endpoints):  # node 2 first: its new value must not leak into node 1's round
        e.advance()
    np.testing.assert_array_equal(a.models(), b.models())


def test_dsgt_round_by_hand():
    # y0 = g(x0) = (3, 6, 9).  x1 = mix(x0) - 0.5 y0 = (2.5, 3, 3.5);
    # y1 = mix(y0) + g(x1) - g(x0) = (4, 6, 8) + (2.5, 3, 3.5) - (3, 6, 9) = (3.5, 3, 2.5).
    d = driver("dsgt", PATH3, [vec(3), vec(6), vec(9)], [identity_grad] * 3, DecentralizedParams(alpha0=0.5))
    res = d.run_round()
    np.testing.assert_allclose(d.models(), [vec(2.5), vec(3), vec(3.5)], rtol=1e-6)
    np.testing.assert_allclose([r.y for r in d.rules], [vec(3.5), vec(3), vec(2.5)], rtol=1e-6)
    assert [s.grad_steps for s in res.stats] == [2, 2, 2]  # y0's gradient is charged to round 0


def test_step_size_schedule():
    rule = make_rule("dsgd", PATH3.row(0), vec(1), identity_grad, DecentralizedParams(alpha0=0.2, mu=0.5), lr=9.0)
    assert [rule.alpha(k) for k in (0, 1, 2, 6)] == pytest.approx([0.2, 0.2 / 1.5, 0.1, 0.05])
    assert make_rule("dsgt", PATH3.row(0), vec(1), identity_grad, DecentralizedParams(), lr=0.3).alpha(5) == 0.3


# ---------------------------------------------------------------- distributed least squares


def least_squares(n: int, p: int = 4, m: int = 12, common: bool = False, seed: int = 0):
    """Node i holds (A_i, b_i); with ``common`` every local optimum is the same x*."""
    rng = np.random.default_rng(seed)
    x_true = rng.normal(size=p)
    a = [rng.normal(size=(m, p)).astype(np.float32) for _ in range(n)]
    b = [(ai @ x_true + (0 if common else rng.normal(size=m) + i)).astype(np.float32) for i, ai in enumerate(a)]

    def grad(i):
        def g(x):
            r = a[i] @ x - b[i]
            return float(0.5 * np.mean(r * r)), (a[i].T @ r / m).astype(np.float32), m
        return g

    x_star = np.linalg.lstsq(np.vstack(a).astype(np.float64), np.concatenate(b).astype(np.float64), rcond=None)[0]
    return [grad(i) for i in range(n)], x_star


def run(algo: str, grads, rounds: int, params: DecentralizedParams, top: Topology, lr: float = 0.1) -> DecentralizedRound:
    p = 4
    d = DecentralizedRound.build(algo, top, np.zeros(p, np.float32), grads, params, lr=lr,
                                 optimizer_factory=lambda i: SGD(p, lr))
    for _ in range(rounds):
        d.run_round()
    return d


@pytest.mark.parametrize("algo", ["dsgd", "dsgt"])
def test_consensus_on_a_ring_when_the_nodes_share_an_optimum(algo):
    grads, x_star = least_squares(8, common=True)
    d = run(algo, grads, 1500, DecentralizedParams(alpha0=0.05), parse_topology("ring", 8))
    assert d.consensus_error() < 1e-4
    np.testing.assert_allclose(d.average(), x_star, atol=1e-3)


def test_dsgt_is_exact_where_constant_step_dsgd_is_biased():
    grads, x_star = least_squares(8, common=False)
    ring = parse_topology("ring", 8)
    dsgd = run("dsgd", grads, 2000, DecentralizedParams(alpha0=0.05), ring)
    dsgt = run("dsgt", grads, 2000, DecentralizedParams(alpha0=0.05), ring)
    err = {name: np.linalg.norm(d.average() - x_star) / np.linalg.norm(x_star) for name, d in (("dsgd", dsgd), ("dsgt", dsgt))}
    assert err["dsgt"] < 1e-4 and dsgt.consensus_error() < 1e-4
    assert err["dsgd"] > 1e-2 and dsgd.consensus_error() > 1e-2  # the heterogeneity bias of a constant step
    assert err["dsgd"] > 100 * err["dsgt"]


@pytest.mark.parametrize("spec, rho", [("ring", 1.0), ("complete", 0.3)])  # the primal step needs lr (L + 2 rho d) < 2
def test_cadmm_converges_to_the_centralized_least_squares_solution(spec, rho):
    grads, x_star = least_squares(6, common=False)
    d = run("cadmm", grads, 300, DecentralizedParams(rho=rho, primal_steps=10), parse_topology(spec, 6), lr=0.2)
    np.testing.assert_allclose(d.average(), x_star, rtol=1e-4, atol=1e-4)
    assert d.consensus_error() < 1e-4
    assert np.abs(sum(r.p for r in d.rules)).max() < 1e-4  # the duals sum to zero over the graph


def test_cadmm_rho_scaling_and_stats():
    grads, _ = least_squares(3)
    d = run("cadmm", grads, 3, DecentralizedParams(rho=0.5, rho_scaling=2.0, primal_steps=4), PATH3)
    assert d.rules[0].rho == pytest.approx(4.0)
    res = d.run_round()
    assert [s.grad_steps for s in res.stats] == [4, 4, 4] and res.stats[0].lr == pytest.approx(4.0)


# ---------------------------------------------------------------- peer layer and compression


def test_shared_arrays_are_read_only_and_never_change_after_they_are_sent():
    d = driver("dsgt", PATH3, [vec(3), vec(6), vec(9)], [identity_grad] * 3, DecentralizedParams(alpha0=0.5))
    sent = d.endpoints[1].outgoing()[0][1].arrays
    snapshot = {k: v.copy() for k, v in sent.items()}
    d.run_round()
    d.run_round()
    for k, v in sent.items():
        assert not v.flags.writeable
        np.testing.assert_array_equal(v, snapshot[k])


def test_delivery_checks():
    d = driver("dsgd", PATH3, [vec(3), vec(6), vec(9)], [identity_grad] * 3, DecentralizedParams(alpha0=0.5))
    e0, e1, e2 = d.endpoints
    (_, p1), = e1.outgoing()[:1]
    with pytest.raises(ProtocolError) as info:
        e0.deliver(e2.outgoing()[0][1])  # node 2 is not node 0's neighbour
    assert info.value.reason == "unknown-worker"
    e0.deliver(p1)
    with pytest.raises(ProtocolError, match="duplicate"):
        e0.deliver(p1)
    with pytest.raises(ProtocolError, match="round 5"):
        e0.deliver(PeerPayload(1, 5, "none", p1.arrays))
    assert e0.ready() and not e1.ready()
    with pytest.raises(RuntimeError, match="waiting for"):
        e1.advance()
    bad = PeerPayload(0, 0, "none", {"x": np.array([np.nan, 1], np.float32)})
    e1.deliver(bad)
    e1.deliver(e2.outgoing()[0][1])
    with pytest.raises(ProtocolError) as info:
        e1.advance()
    assert info.value.reason == "non-finite"


def test_a_payload_survives_the_wire_format():
    d = driver("dsgt", PATH3, [vec(3), vec(6), vec(9)], [identity_grad] * 3, DecentralizedParams(alpha0=0.5), compress="topk:0.5")
    ref = driver("dsgt", PATH3, [vec(3), vec(6), vec(9)], [identity_grad] * 3, DecentralizedParams(alpha0=0.5), compress="topk:0.5")
    for _ in range(3):  # round 0 is full state, later rounds are compressed deltas
        msgs = [(to, p) for e in d.endpoints for to, p in e.outgoing()]
        for to, p in msgs:
            wire = protocol.encode(protocol.peer_message("run1", p.sender, to, p.round, p.arrays, codec=p.codec))
            d.endpoints[to].deliver(payload_from_message(protocol.decode([bytes(f) for f in wire])))
        for e in d.endpoints:
            e.advance()
        ref.run_round()
    np.testing.assert_array_equal(d.models(), ref.models())


@pytest.mark.parametrize("compress", ["topk:0.25", "qsgd:8"])
def test_compressed_mixing_keeps_the_average_and_still_reaches_consensus(compress):
    rng = np.random.default_rng(1)
    x0s = [rng.normal(size=64).astype(np.float32) for _ in range(8)]

    def zero(x):
        return 0.0, np.zeros_like(x), 1

    d = driver("dsgd", parse_topology("ring", 8), x0s, [zero] * 8, DecentralizedParams(alpha0=0.1, gamma=0.5), compress=compress)
    mean0, err0 = d.average(), d.consensus_error()
    full = min(s.nbytes for s in d.run_round().sent)  # round 0 sends the full state
    for _ in range(200):
        res = d.run_round()
    np.testing.assert_allclose(d.average(), mean0, atol=1e-5)  # CHOCO mixing: the average is exact
    assert d.consensus_error() < 1e-2 * err0
    assert all(s.nbytes < full for s in res.sent)  # deltas are smaller than the state they replace
    # Every receiver's copy of a sender equals the sender's own public copy, bit for bit.
    for e in d.endpoints:
        for j in e.neighbours:
            np.testing.assert_array_equal(d.endpoints[0].decoders[j].values["x"], d.endpoints[j].encoder.public["x"])


def test_uncompressed_messages_have_the_exact_wire_size():
    d = driver("dsgt", PATH3, [vec(3), vec(6), vec(9)], [identity_grad] * 3, DecentralizedParams(alpha0=0.5))
    res = d.run_round()
    assert len(res.sent) == 4  # the path has 2 edges, a message each way
    for s in res.sent:
        p = d.endpoints[s.sender]._sent[1]
        assert s.nbytes == protocol.message_nbytes(protocol.peer_message(d.sizer.run, s.sender, s.to, 0, p.arrays, codec="none"))
        assert s.nbytes > 2 * 2 * 4  # x and y of 2 floats each, plus the header


def test_without_a_sizer_a_message_counts_its_arrays_only():
    """The decentralized package does not know the wire: its own size of a message is the payload's bytes."""
    d = DecentralizedRound.build("dsgt", PATH3, vec(1), [identity_grad] * 3, DecentralizedParams(alpha0=0.5), lr=0.5)
    assert {s.nbytes for s in d.run_round().sent} == {2 * 2 * 4}  # x and y, 2 float32 each
    wire = driver("dsgt", PATH3, [vec(1)] * 3, [identity_grad] * 3, DecentralizedParams(alpha0=0.5))
    assert min(s.nbytes for s in wire.run_round().sent) > 2 * 2 * 4  # the simulator's size adds the header


@pytest.mark.parametrize("meta", [{"round": -1}, {"round": True}, {"round": "0"}, {}, {"round": 0, "codec": 5}])
def test_a_peer_message_with_bad_meta_is_refused_by_the_runtime(meta):
    msg = protocol.Message(protocol.MsgType.PEER, "run1", 1, 0, {"x": vec(1)}, meta={"to": 0, **meta})
    with pytest.raises(ProtocolError) as info:
        payload_from_message(msg)
    assert info.value.reason == "bad-meta"


def test_endpoint_of_a_rule_and_unknown_algorithms():
    from zsgd.errors import ZsgdError

    rule = make_rule("cadmm", PATH3.row(1), vec(1), identity_grad, DecentralizedParams(), lr=0.1)
    assert PeerEndpoint(rule).neighbours == (0, 2)
    with pytest.raises(ZsgdError, match="unknown decentralized algorithm"):
        make_rule("gossip", PATH3.row(1), vec(1), identity_grad, DecentralizedParams(), lr=0.1)


def test_gamma_defaults_to_plain_mixing_and_to_a_damped_step_with_compression():
    p = DecentralizedParams()
    assert p.resolved_gamma() == 1.0 and p.resolved_gamma("topk:0.1") == 0.2
    assert DecentralizedParams(gamma=0.7).resolved_gamma("qsgd:8") == 0.7
    d = DecentralizedRound.build("dsgd", PATH3, vec(1), [identity_grad] * 3, p, lr=0.1, compress="topk:0.5")
    assert {r.gamma for r in d.rules} == {0.2}


@pytest.mark.parametrize("kw, words", [({"alpha0": 0}, "alpha0"), ({"mu": -1}, "mu"), ({"rho": 0}, "rho"),
                                       ({"primal_steps": 0}, "primal_steps"), ({"primal_steps": 2.5}, "primal_steps"),
                                       ({"gamma": 1.5}, "gamma"), ({"rho_scaling": float("nan")}, "rho_scaling")])
def test_bad_hyper_parameters(kw, words):
    from zsgd.errors import ZsgdError

    with pytest.raises(ZsgdError, match=words):
        DecentralizedParams(**kw).validate()
