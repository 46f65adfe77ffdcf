"""The worker side of a decentralized run: one node's rounds over the broker's relay.

``zsgd.node`` hands over here when ASSIGN carries a ``decentralized``
section (the broker is a ``RelayBroker``). The node is the same
``PeerEndpoint`` the simulator drives, so the runtime and ``zsgd sim``
execute identical rules, encodings and delivery checks::

    wait for WAIT(reason=start)                 # every worker is connected
    loop:
        send outgoing() as PEER messages        # to each neighbour, via the broker
        receive PEER until ready()              # a neighbour may already be one round ahead
        advance()                               # the rule's step (Jacobi)
        UPDATE(kind=round, round, loss, n_samples[, w at evaluation rounds])

It starts from ``model.init(seed)`` on the shard ``make_shard(..., worker, n)``,
exactly like a centralized worker, so arms of an experiment stay comparable.

It ends on LEAVE (exit 0), when the broker falls silent (exit 3, as any
worker), or on a PEER message it cannot accept: then its neighbours could
never finish the round, so it leaves (exit 1) and the broker stops the run,
rather than everyone waiting forever.
"""

from __future__ import annotations

import time
from dataclasses import fields, replace
from typing import Any, Callable

import numpy as np

from zsgd.wire import protocol
from zsgd.core.config import TrainConfig
from zsgd.decentralized.peer import FULL, PeerEndpoint, PeerPayload
from zsgd.decentralized.rules import DECENTRALIZED, DecentralizedParams, GradFn, make_rule, node_gradient, rule_class
from zsgd.decentralized.topology import MixingRow
from zsgd.errors import ZsgdError
from zsgd.wire.link import BROKER_DEAD, BrokerLink
from zsgd.errors import ProtocolError
from zsgd.wire.protocol import Message, MsgType

EXIT_OK, EXIT_PEER_ERROR, EXIT_BROKER_GONE = 0, 1, 3


class _Stop(Exception):
    """Leave the round loop with an exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def parse_assignment(meta: dict[str, Any], worker: int) -> tuple[str, MixingRow, DecentralizedParams, int]:
    """(algo, this node's mixing row, parameters, rounds between model uploads) from ASSIGN."""
    try:
        d = meta["decentralized"]
        algo = str(d["algo"])
        neighbours = tuple(int(j) for j in d["neighbours"])
        weights = tuple(float(w) for w in d["weights"])
        known = {f.name for f in fields(DecentralizedParams)}
        params = DecentralizedParams(**{k: v for k, v in dict(d["params"]).items() if k in known}).validate()
        every = int(d["eval_every_rounds"])
        row = MixingRow(worker, float(d["self_weight"]), neighbours, weights)
    except (KeyError, TypeError, ValueError) as exc:
        raise ZsgdError(f"broker sent an unusable decentralized assignment ({exc})") from None
    if algo not in DECENTRALIZED or len(neighbours) != len(weights) or every < 1 or worker in neighbours:
        raise ZsgdError("broker sent an unusable decentralized assignment")
    return algo, row, params, every


def payload_from_message(msg: Message) -> PeerPayload:
    """A neighbour's payload out of a decoded PEER message (``peer_message``); ProtocolError if its meta is bad.
    Here, not in ``zsgd.decentralized``: the sans-IO endpoint takes plain values and never sees the wire."""
    meta = msg.meta or {}
    rnd, codec = meta.get("round"), meta.get("codec", FULL)
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0 or not isinstance(codec, str):
        raise ProtocolError("bad-meta", "PEER message needs an integer 'round' >= 0 and a codec string")
    return PeerPayload(int(msg.worker), rnd, codec, msg.arrays)


def peer_message(run: str, to: int, p: PeerPayload) -> Message:
    """The PEER message that carries ``p`` to neighbour ``to`` through the broker's relay; ``sent`` (this host's
    monotonic clock) lets a receiver on the same host time the hop (``_Turnaround.hop``)."""
    return protocol.peer_message(run, p.sender, to, p.round, p.arrays, codec=p.codec, sent=time.monotonic())


def make_grad_fn(model: Any, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, worker: int, add_weight_decay: bool) -> GradFn:
    """Node i's gradient on its shard, exactly as ``zsgd sim``'s node i computes it."""
    from zsgd.algorithms.worker import WorkerStep

    step = WorkerStep(model, x, y, cfg.batch_size, cfg.seed, worker)
    return node_gradient(step, cfg.clip_norm, cfg.weight_decay, add_weight_decay)


def build_endpoint(cfg: TrainConfig, assign: dict[str, Any], worker: int, model: Any, x: np.ndarray, y: np.ndarray) -> tuple[PeerEndpoint, int]:
    """This node's endpoint (rule on w0 = ``model.init(seed)``) and its upload period."""
    from zsgd.nn.optim import make_optimizer

    algo, row, params, every = parse_assignment(assign, worker)
    compress = str(assign.get("compress", "none"))
    params = replace(params, gamma=params.resolved_gamma(compress))
    own_decay = rule_class(algo).applies_weight_decay  # cadmm's local solver applies the weight decay itself
    grad = make_grad_fn(model, x, y, cfg, worker, add_weight_decay=not own_decay)
    opt = make_optimizer(cfg.optimizer, model.n_params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay) \
        if own_decay else None
    rule = make_rule(algo, row, model.init(seed=cfg.seed), grad, params, lr=cfg.lr, optimizer=opt)
    return PeerEndpoint(rule, compress, seed=cfg.seed), every


def straggler_delay(assign: dict[str, Any], worker: int, seed: int) -> Callable[[float, float], float]:
    """``(t, compute_s) -> extra seconds`` this node sleeps per round under ``--stragglers``.

    The broker sends the spec; every node rebuilds the same seeded choice of slow
    nodes (``StragglerSpec.assign``, as ``zsgd sim`` does) and stretches its own
    round's computation, transient episodes included, on its own clock.
    """
    from zsgd.network import parse_stragglers

    d = assign.get("decentralized", {})
    spec = parse_stragglers(d["stragglers"]) if isinstance(d.get("stragglers"), str) else None
    if spec is None:
        return lambda _t, _c: 0.0
    chosen = spec.assign(int(d["n_nodes"]), seed)
    return lambda t, c: (chosen.factor(worker, t) - 1.0) * c


def run_rounds(opts: Any, link: BrokerLink, cfg: TrainConfig, assign: dict[str, Any], model: Any, x: np.ndarray, y: np.ndarray) -> int:
    """Run rounds until the broker says LEAVE; return the process exit code."""
    from zsgd.runtime.worker.node_options import log

    ep, every = build_endpoint(cfg, assign, link.worker, model, x, y)
    stall = straggler_delay(assign, link.worker, cfg.seed)
    clock = _Turnaround()
    try:
        _wait_for_start(opts, link, ep)
        t_start = time.monotonic()
        while True:
            _round(opts, link, ep, every, cfg.steps, lambda c: stall(time.monotonic() - t_start, c), clock)
    except _Stop as stop:
        if stop.code == EXIT_OK:
            from zsgd.runtime.worker.node_options import log_turnarounds

            log_turnarounds(opts, clock.samples)
            log_turnarounds(opts, clock.hops, what="peer hop")
        return stop.code
    except ProtocolError as exc:
        log(opts, f"rejected a peer message ({exc}); leaving, the run cannot continue without it")
        try:
            link.send(protocol.leave(link.run, link.worker, f"bad peer message: {exc.reason}", version=ep.round))
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        return EXIT_PEER_ERROR


def _handle(opts: Any, link: BrokerLink, ep: PeerEndpoint, msg: Message | bytes | None) -> bool:
    """Act on one broker message; True if it was the start signal. Raises _Stop to end."""
    from zsgd.runtime.worker.node_options import log

    if msg is None:
        return False
    if msg is BROKER_DEAD:
        log(opts, f"broker at {opts.connect} silent for {opts.timeout:g} s; exiting")
        raise _Stop(EXIT_BROKER_GONE)
    assert isinstance(msg, Message)
    if msg.type == MsgType.LEAVE:
        log(opts, f"done at round {ep.round} ({msg.meta.get('reason', 'broker finished')})")
        raise _Stop(EXIT_OK)
    if msg.type == MsgType.PEER:
        ep.deliver(payload_from_message(msg))
    elif msg.type == MsgType.ERROR:
        log(opts, f"broker reported an error: {msg.meta.get('message', '?')}")
        if msg.meta.get("fatal"):
            raise _Stop(2)
    elif msg.type == MsgType.WAIT and msg.meta.get("reason") == "start":
        return True
    return False


def _wait_for_start(opts: Any, link: BrokerLink, ep: PeerEndpoint) -> None:
    while not _handle(opts, link, ep, link.recv(timeout=opts.timeout)):
        pass


class _Turnaround:
    """A node's turnaround per round, what ``zsgd sim`` calls its compute time: from the last neighbour message
    it needed reaching its socket (or from when it could take it) to its next round's messages handed on.
    It holds the node's own message handling (decode, deliver, encode) and any wait for a CPU beside the rule's
    step, so a twin calibrated on it (``zsgd.experiments.twin``) sees them; an emulated straggler's sleep is
    left out (the simulator applies the factor itself)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.hops: list[float] = []  # seconds from a neighbour's send to its message reaching this socket
        self.start: float | None = None  # this round's start: None until its messages were all there
        self.stalled = 0.0

    def ready(self, last_arrival: float, idle_since: float) -> None:
        self.start = max(last_arrival, idle_since)

    def hop(self, msg: Any, arrival: float) -> None:
        """A PEER message's hop, from its sender handing it on (``sent``) to this node's socket: the emulated
        delay plus the relay's handling and the hand-offs on the way, which the twin takes as its hop time.
        Only on one host (a monotonic clock is per host), as the fidelity checks run."""
        sent = msg.meta.get("sent") if isinstance(msg, Message) and msg.type == MsgType.PEER else None
        if isinstance(sent, float) and 0 <= arrival - sent < 3600:
            self.hops.append(arrival - sent)

    def sent(self) -> None:
        if self.start is not None:
            self.samples.append(time.monotonic() - self.start - self.stalled)
        self.start, self.stalled = None, 0.0


def _round(opts: Any, link: BrokerLink, ep: PeerEndpoint, every: int, steps: int | None, stall: Callable[[float], float],
           clock: _Turnaround) -> None:
    r = ep.round
    for to, p in ep.outgoing():
        link.send(peer_message(link.run, to, p))
    clock.sent()
    idle_since = time.monotonic()
    while not ep.ready():
        msg = link.recv(timeout=opts.timeout)
        clock.hop(msg, link.last_arrival)
        _handle(opts, link, ep, msg)
    clock.ready(link.last_arrival, idle_since)
    t0 = time.perf_counter()
    stats = ep.advance()
    compute_s = time.perf_counter() - t0
    # An emulated straggler is slowed by its factor over the whole turnaround so far, as the simulator
    # stretches a node's compute time (and as a centralized worker's step is stretched).
    stall_s = stall(time.monotonic() - clock.start)
    if stall_s > 0:
        time.sleep(stall_s)  # an emulated straggler: its neighbours wait for this round's messages
        clock.stalled = stall_s
    done = r + 1
    arrays = {"w": ep.rule.x} if done % every == 0 or (steps is not None and done == steps) else {}
    link.send(protocol.round_report(link.run, link.worker, r, stats.loss, int(stats.samples), arrays, lr=float(stats.lr),
                                    compute_s=compute_s, stall_s=stall_s))
    while True:  # a LEAVE that came while computing ends the loop now, not after the next round
        msg = link.recv(timeout=0)
        if msg is None:
            break
        clock.hop(msg, link.last_arrival)
        _handle(opts, link, ep, msg)
