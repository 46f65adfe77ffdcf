"""The round driver: all nodes of a decentralized run advance one round together.

Given every node's outgoing payloads of round r, ``DecentralizedRound.run_round``
delivers them and computes round r+1 for all nodes. It is what the simulator
drives (the virtual clock is layered on top in ``sim.py``) and the reference a
runtime implementation is tested against. Everything goes through the same
``PeerEndpoint`` a real worker would use, so the encoding, the delivery checks
and the Jacobi ordering are exercised here too: all payloads of round r are
produced before any node steps, and a node's step only ever sees round-r
values.

The broker-side view of a decentralized run is the *average* of the nodes'
models (what one would deploy after averaging once) and the consensus error
``mean_i ||x_i - x_bar||`` (how far the nodes are from agreeing).

The size of a message is the caller's (``sizer``): this package does not know
the wire format; the simulator passes the exact size of the PEER message that
would carry each payload (``zsgd.simulation.decentralized.PeerMessageSizes``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from zsgd.decentralized.peer import PeerDecoder, PeerEndpoint, PeerPayload
from zsgd.decentralized.rules import DecentralizedParams, GradFn, NodeRule, StepStats, make_rule, rule_class
from zsgd.decentralized.topology import Topology


@dataclass(frozen=True)
class Sent:
    """One peer message of a round: sender -> receiver, and its size (the round's ``sizer``: on the wire, in the simulator)."""

    sender: int
    to: int
    nbytes: int


@dataclass
class RoundResult:
    round: int  # the round that was computed (nodes are now in round + 1)
    stats: list[StepStats]
    sent: list[Sent]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.sent)


def average(models: Sequence[np.ndarray]) -> np.ndarray:
    """x_bar, accumulated in float64 so 1000 nodes do not lose float32 precision."""
    acc = np.zeros(models[0].shape, np.float64)
    for x in models:
        acc += x
    acc /= len(models)
    return acc.astype(np.float32)


def consensus_error(models: Sequence[np.ndarray], mean: np.ndarray | None = None) -> float:
    """mean_i ||x_i - x_bar||_2: 0 when every node holds the same model."""
    xbar = average(models) if mean is None else mean
    return float(np.mean([np.linalg.norm(x - xbar) for x in models]))


#: ``(payload, receiver) -> bytes`` of the message that carries ``payload`` to ``receiver``.
Sizer = Callable[[PeerPayload, int], int]


def payload_nbytes(p: PeerPayload, _to: int) -> int:
    """The default ``Sizer``: the payload's arrays alone (no transport's envelope)."""
    return p.nbytes


class DecentralizedRound:
    """Synchronous rounds over every node's endpoint."""

    def __init__(self, endpoints: list[PeerEndpoint], sizer: Sizer = payload_nbytes) -> None:
        if [e.node for e in endpoints] != list(range(len(endpoints))):
            raise ValueError("endpoints must be nodes 0..n-1 in order")
        self.endpoints = endpoints
        self.sizer = sizer
        self.round = 0

    @classmethod
    def build(cls, algo: str, topology: Topology, x0: np.ndarray, grad_fns: Sequence[GradFn], params: DecentralizedParams,
              *, lr: float, compress: str = "none", seed: int = 0,
              optimizer_factory: Callable[[int], Any] | None = None, sizer: Sizer = payload_nbytes) -> "DecentralizedRound":
        """Every node starts from the same ``x0``; ``grad_fns[i]`` is node i's gradient on its own shard.

        One decoder per sender is shared by all its receivers (see ``PeerDecoder``).
        """
        params = replace(params, gamma=params.resolved_gamma(compress))
        decoders: dict[int, PeerDecoder] = {}
        eps = []
        for i in range(topology.n):
            opt = optimizer_factory(i) if optimizer_factory is not None else None
            rule = make_rule(algo, topology.row(i), x0, grad_fns[i], params, lr=lr, optimizer=opt)
            eps.append(PeerEndpoint(rule, compress, seed=seed, decoders=decoders))
        return cls(eps, sizer)

    @property
    def rules(self) -> list[NodeRule]:
        return [e.rule for e in self.endpoints]

    def models(self) -> list[np.ndarray]:
        return [e.rule.x for e in self.endpoints]

    def average(self) -> np.ndarray:
        return average(self.models())

    def consensus_error(self, mean: np.ndarray | None = None) -> float:
        return consensus_error(self.models(), mean)

    def run_round(self) -> RoundResult:
        """Deliver every node's round-r payloads, then step every node (Jacobi)."""
        sent: list[Sent] = []
        outgoing = [e.outgoing() for e in self.endpoints]  # all of round r, before anyone steps
        for msgs in outgoing:
            for to, p in msgs:
                self.endpoints[to].deliver(p)
                sent.append(Sent(p.sender, to, self.sizer(p, to)))
        stats = [e.advance() for e in self.endpoints]
        r = self.round
        self.round += 1
        return RoundResult(r, stats, sent)


def eval_every_rounds(cfg: Any, rule: Any, algo: str, params: DecentralizedParams, n_workers: int, n_train: int) -> int:
    """Rounds between model uploads (evaluations), fixed before the run starts.

    Nodes upload their models only on evaluation rounds (an upload is a whole
    model per node), so the cadence must be known up front: ``--eval-every``,
    else the ledger's automatic cadence (about ten points per run, at least
    one per epoch) in rounds. Each node takes one mini-batch per round
    (cadmm: ``primal_steps``), so a round uses n x batch x steps samples
    (``rule.batch_size``: the samples of one mini-batch, tokens x rows for a
    language model).
    The relay and the simulator both take it from here, so they evaluate
    the same rounds.
    """
    from zsgd.core.ledger import RunLedger

    steps = rule_class(algo).batches_per_round(params)
    ledger = RunLedger(rule, n_train=n_train, eval_every=cfg.eval_every)
    return ledger.eval_interval_updates(n_workers * rule.batch_size * steps)
