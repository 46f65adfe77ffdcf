"""Who is in the run: worker ids, identities, liveness.

The broker keys peers by their ZeroMQ identity, which each worker sets
from its worker id before connecting; a restarted worker therefore comes
back under the same identity and id, and is treated as a rejoin. Liveness
follows the Paranoid Pirate pattern: any message counts, and a peer silent
for ``timeout`` seconds is dead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zsgd.core.tally import WorkerTally


@dataclass
class Peer(WorkerTally):
    """A connected process (its counters, as a worker, are the ``WorkerTally`` the server engine books into)."""

    identity: bytes
    worker: int
    role: str  # "worker" | "evaluator" | "server" (a range server of --servers K)
    host: str = "?"
    pid: int = 0
    state: str = "joining"  # joining -> ready -> gone
    last_seen: float = 0.0
    last_sent: float = 0.0
    stall_s_sum: float = 0.0  # decentralized emulation: time a straggler node slowed itself by
    busy: bool = False  # evaluator: evaluating a snapshot
    user: str | None = None  # CURVE: the client key (ZAP User-Id) this peer joined with


@dataclass
class Membership:
    n_workers: int
    timeout: float
    peers: dict[bytes, Peer] = field(default_factory=dict)
    by_worker: dict[int, Peer] = field(default_factory=dict)
    evaluator: Peer | None = None
    servers: dict[int, Peer] = field(default_factory=dict)  # --servers K: range servers 1..K-1, by index

    def admit(self, identity: bytes, role: str, requested: int, now: float) -> tuple[Peer | None, bool]:
        """Return (peer, rejoined) or (None, False) when the run is full."""
        peer = self.peers.get(identity)
        if peer is not None:
            peer.incarnations += 1
            peer.state, peer.last_seen, peer.busy = "joining", now, False
            return peer, True
        if role == "evaluator":
            peer = Peer(identity, -1, role, last_seen=now)
            self.evaluator = peer
            self.peers[identity] = peer
            return peer, False
        if role == "server":  # its index is its place in the range split, asked for by whoever started it
            if requested in self.servers and self.servers[requested].state != "gone":
                return None, False
            peer = Peer(identity, requested, role, last_seen=now)
            self.servers[requested] = peer
            self.peers[identity] = peer
            return peer, False
        if 0 <= requested < self.n_workers and requested not in self.by_worker:
            worker = requested
        else:
            free = [w for w in range(self.n_workers) if w not in self.by_worker]
            if not free:
                return None, False
            worker = free[0]
        peer = Peer(identity, worker, role, last_seen=now)
        self.peers[identity] = peer
        self.by_worker[worker] = peer
        return peer, False

    def live_workers(self) -> list[Peer]:
        return [p for p in self.by_worker.values() if p.state == "ready"]

    def expired(self, now: float) -> list[Peer]:
        return [p for p in self.peers.values() if p.state != "gone" and now - p.last_seen > self.timeout]

    def needing_heartbeat(self, now: float, interval: float) -> list[Peer]:
        return [p for p in self.peers.values() if p.state != "gone" and now - p.last_sent >= interval]
