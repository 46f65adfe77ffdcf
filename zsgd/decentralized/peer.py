"""The per-node message interface: what node i sends to node j in round r, and
how it consumes what it receives. Sans-IO, like the rules it wraps.

A ``PeerEndpoint`` wraps one ``NodeRule``::

    for to, payload in ep.outgoing():          # once per round, one payload per neighbour
        send(to, payload)                      # the caller's transport
    ...
    ep.deliver(payload)                        # any order; a neighbour may be one round ahead
    if ep.ready():                             # every neighbour's message of this round is in
        stats = ep.advance()                   # decode, rule.step(...), next round

The simulator's round driver and a runtime worker (relaying PEER messages
through the broker's ROUTER by worker identity) run this same object, so a
decentralized simulation exercises the real encoding and ordering rules.
A payload is plain values (sender, round, codec, named arrays); this package
does not know the wire format: the runtime puts a payload in a PEER message
and takes it out again (``zsgd.runtime.worker.decentralized_node``), and the
simulator sizes that message (``zsgd.simulation.decentralized``).

Compression (``compress`` a codec spec, e.g. ``topk:0.05``): a node does not
send its model, it sends ``codec(state - public)`` where ``public`` is the copy
of its state every neighbour holds; both ends add the *decoded* delta to
their copy with the same float32 operation, so they stay bit-identical
without acknowledgements (the scheme of ``zsgd.compression.delta``, and of
CHOCO-SGD). The first message of a node is its full state (codec ``none``),
since per-node states (e.g. dsgt's y) differ from the start. The rules mix
with the public copies in the CHOCO form, which keeps the network average
exact. The codec runs without its own error feedback: whatever a lossy codec
left out is still in ``state - public`` next round (the public copy *is* the
error feedback).

Delivery checks (each failure a ``ProtocolError`` the runtime counts, never
fatal): the sender is a neighbour, the round is the current one or the next,
no duplicate, arrays of the right names, dtype, length, finite values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from zsgd.compression import decode, make_codec
from zsgd.compression.base import check_finite
from zsgd.decentralized.rules import NodeRule, StepStats
from zsgd.errors import ProtocolError

FULL = "none"  # codec of a payload that carries the full state arrays


@dataclass(frozen=True)
class PeerPayload:
    """One node's broadcast of one round (the same for every neighbour)."""

    sender: int
    round: int
    codec: str
    arrays: Mapping[str, np.ndarray] = field(repr=False)

    @property
    def nbytes(self) -> int:
        """The arrays' bytes: the payload without the envelope a transport adds."""
        return sum(int(a.nbytes) for a in self.arrays.values())


class PeerEncoder:
    """Sender side: full state, or codec(state - public copy) once the neighbours hold a copy."""

    def __init__(self, names: tuple[str, ...], n_params: int, compress: str = "none", seed: int = 0) -> None:
        self.names = names
        self.n_params = int(n_params)
        self.compressed = compress != "none"
        self.codecs = {k: make_codec(compress, n_params, seed=seed * 31 + i, error_feedback=False) for i, k in enumerate(names)} \
            if self.compressed else {}
        self.public: dict[str, np.ndarray] | None = None

    def encode(self, state: Mapping[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray], Mapping[str, np.ndarray]]:
        """(codec, arrays to send, this node's public copy after the neighbours decode them)."""
        if not self.compressed:
            return FULL, dict(state), state
        if self.public is None:
            self.public = {k: np.array(state[k], dtype=np.float32, copy=True) for k in self.names}
            return FULL, {k: state[k] for k in self.names}, self.public
        arrays: dict[str, np.ndarray] = {}
        for k in self.names:
            codec = self.codecs[k]
            part = codec.encode(np.subtract(state[k], self.public[k], dtype=np.float32))
            self.public[k] += decode(codec.name, part, self.n_params)
            arrays.update({f"{k}.{a}": v for a, v in part.items()})
        return next(iter(self.codecs.values())).name, arrays, self.public


class PeerDecoder:
    """Receiver side: what the neighbours know of one sender's shared state.

    ``apply`` is idempotent per round, so the simulator can share one decoder
    per sender among all its neighbours (their copies are identical by
    construction) instead of keeping degree-many copies of every model.
    """

    def __init__(self, sender: int, names: tuple[str, ...], n_params: int) -> None:
        self.sender, self.names, self.n_params = sender, names, int(n_params)
        self.round = -1
        self.values: dict[str, np.ndarray] = {}

    def apply(self, p: PeerPayload) -> dict[str, np.ndarray]:
        if p.round == self.round:
            return self.values
        if p.round != self.round + 1:
            raise ProtocolError("bad-meta", f"node {self.sender}: round {p.round} after round {self.round}")
        if p.codec == FULL:
            values = {}
            for k in self.names:
                a = p.arrays.get(k)
                if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != (self.n_params,):
                    raise ProtocolError("bad-array", f"node {self.sender}: {k!r} must be float32 ({self.n_params},)")
                check_finite("peer", k, a)
                values[k] = a
            if set(p.arrays) != set(self.names):
                raise ProtocolError("bad-schema", f"node {self.sender}: arrays {sorted(p.arrays)}, expected {list(self.names)}")
            # A full state replaces the copy; keep a private one only if deltas will follow.
            self.values = values
        else:
            if not self.values:
                raise ProtocolError("bad-meta", f"node {self.sender}: a delta before any full state")
            parts: dict[str, dict[str, np.ndarray]] = {k: {} for k in self.names}
            for key, a in p.arrays.items():
                name, _, sub = key.partition(".")
                if name not in parts or not sub:
                    raise ProtocolError("bad-schema", f"node {self.sender}: unexpected array {key!r}")
                parts[name][sub] = a
            deltas = {k: decode(p.codec, parts[k], self.n_params) for k in self.names}  # all checked before any is applied
            for k in self.names:
                v = self.values[k]
                if not v.flags.writeable:
                    v = self.values[k] = np.array(v, dtype=np.float32, copy=True)
                v += deltas[k]
        self.round = p.round
        return self.values


class PeerEndpoint:
    """One node's side of the peer protocol around its rule (see the module docstring)."""

    def __init__(self, rule: NodeRule, compress: str = "none", seed: int = 0,
                 decoders: dict[int, PeerDecoder] | None = None) -> None:
        self.rule = rule
        self.node = rule.node
        self.neighbours = rule.row.neighbours
        self._neighbour_set = frozenset(self.neighbours)
        n_params = int(rule.x.size)
        self.encoder = PeerEncoder(rule.shared, n_params, compress, seed=seed * 1_000_003 + rule.node)
        self.decoders = decoders if decoders is not None else {}
        for j in self.neighbours:
            self.decoders.setdefault(j, PeerDecoder(j, rule.shared, n_params))
        self._buffer: dict[int, dict[int, PeerPayload]] = {}
        self._sent: tuple[int, PeerPayload, Mapping[str, np.ndarray]] | None = None

    @property
    def round(self) -> int:
        return self.rule.round

    def outgoing(self) -> list[tuple[int, PeerPayload]]:
        """This round's payload for each neighbour (encoded once; calling again returns the same)."""
        r = self.rule.round
        if self._sent is None or self._sent[0] != r:
            codec, arrays, own = self.encoder.encode(self.rule.public())
            self._sent = (r, PeerPayload(self.node, r, codec, arrays), own)
        payload = self._sent[1]
        return [(j, payload) for j in self.neighbours]

    def deliver(self, p: PeerPayload) -> None:
        """Buffer a neighbour's payload; ProtocolError if it cannot belong here."""
        if p.sender not in self._neighbour_set:
            raise ProtocolError("unknown-worker", f"node {self.node}: {p.sender} is not a neighbour")
        if not self.rule.round <= p.round <= self.rule.round + 1:
            raise ProtocolError("bad-meta", f"node {self.node} is in round {self.rule.round}: a message of round {p.round} from {p.sender}")
        slot = self._buffer.setdefault(p.round, {})
        if p.sender in slot:
            raise ProtocolError("bad-meta", f"node {self.node}: duplicate round-{p.round} message from {p.sender}")
        slot[p.sender] = p

    def ready(self) -> bool:
        return len(self._buffer.get(self.rule.round, ())) == len(self.neighbours)

    def advance(self) -> StepStats:
        """Decode this round's messages and run the rule's step (call when ``ready()``)."""
        if not self.ready():
            missing = sorted(set(self.neighbours) - set(self._buffer.get(self.rule.round, {})))
            raise RuntimeError(f"node {self.node} round {self.rule.round}: still waiting for {missing}")
        self.outgoing()  # the own public copy of this round must exist (it is what the neighbours mix with)
        assert self._sent is not None
        msgs = self._buffer.pop(self.rule.round, {})
        received = {j: self.decoders[j].apply(msgs[j]) for j in self.neighbours}
        return self.rule.step(received, self._sent[2])
