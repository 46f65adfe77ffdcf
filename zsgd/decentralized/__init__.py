"""Decentralized training: nodes that average with their neighbours, no central model.

Layers, top to bottom (all sans-IO):

- ``topology``: graphs (ring, torus, wheel, complete, random-regular:D,
  erdos-renyi:P) and their Metropolis mixing weights;
- ``rules``: one object per node for ``dsgd``, ``dsgt`` (gradient tracking)
  and ``cadmm`` (consensus ADMM, DiNNO) with Jacobi rounds;
- ``peer``: the per-node message interface (what node i sends to node j in
  round r, how it consumes what it receives), with optional compression;
- ``driver``: the round driver that advances all nodes together, the
  average model and the consensus error;
Their drivers live above this package: the virtual-time one in
``zsgd/simulation/decentralized.py`` (metrics in the runtime's schema), and
``zsgd run`` with real processes in ``zsgd/runtime/server/relay.py`` (the broker
relaying PEER messages between neighbours) and
``zsgd/runtime/worker/decentralized_node.py`` (a node's loop); see
``docs/algorithms.md``.
"""

from __future__ import annotations

from zsgd.decentralized.driver import DecentralizedRound, RoundResult, average, consensus_error
from zsgd.decentralized.peer import PeerDecoder, PeerEncoder, PeerEndpoint, PeerPayload
from zsgd.decentralized.rules import (CADMM, DECENTRALIZED, DSGD, DSGT, PARAMS_OF, DecentralizedParams, NodeRule, StepStats,
                                      is_decentralized, make_rule, mix)
from zsgd.decentralized.topology import TOPOLOGY_HELP, MixingRow, Topology, parse_topology

__all__ = [
    "CADMM", "DECENTRALIZED", "DSGD", "DSGT", "PARAMS_OF", "TOPOLOGY_HELP", "DecentralizedParams", "DecentralizedRound",
    "MixingRow", "NodeRule", "PeerDecoder", "PeerEncoder", "PeerEndpoint", "PeerPayload", "RoundResult", "StepStats",
    "Topology", "average", "consensus_error", "is_decentralized", "make_rule", "mix", "parse_topology",
]
