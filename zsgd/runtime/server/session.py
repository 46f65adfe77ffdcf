"""The broker's session: who is in the run, how they join, and whether they are alive.

It runs the handshake (HELLO join -> ASSIGN -> HELLO ready), ties each
routing identity to the CURVE key it joined with, sends heartbeats and
declares silent peers dead (the Paranoid Pirate pattern: any traffic counts
as liveness). It knows nothing of what the run computes: joins, readiness
and departures are handed to the service (the parameter server or the
decentralized relay), which decides what a worker gets.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from zsgd.wire import protocol
from zsgd.wire.auth import check_proof
from zsgd.wire.membership import Membership, Peer
from zsgd.wire.protocol import Message, MsgType

if TYPE_CHECKING:
    from zsgd.runtime.server.broker import Broker

UNASSIGNED_RUN = "-"  # the run id of what is sent to a peer before it has joined: a refusal names no run
REFUSALS_ANSWERED = 100  # unauthenticated joins told why; later ones are only counted


class Session:
    """Membership, handshake and liveness for one broker."""

    def __init__(self, broker: "Broker", n_workers: int, heartbeat: float, timeout: float, wait_workers_s: float) -> None:
        self.broker = broker
        self.members = Membership(n_workers, timeout)
        self.heartbeat = heartbeat
        self.wait_workers_s = wait_workers_s
        self.deaths = self.rejoins = 0
        self.refused = 0  # joins without the run secret (with CURVE, the endpoint's guard counts refusals instead)
        self._joining_user: str | None = None  # the CURVE key of the HELLO being handled
        self._deferred: list[tuple[bytes, Message, str | None]] = []  # joins the service asked to hold
        self._inbox_busy_since: float | None = None  # messages have waited unread since then
        self._last_live = time.monotonic()

    # -- identity ------------------------------------------------------------------
    def key_matches(self, identity: bytes, peer: Peer | None, frame: Any, msg: Message) -> bool:
        """CURVE: a routing identity belongs to the key that joined with it.

        ROUTER_HANDOVER lets a new connection take over a routing identity;
        without this check a client holding *another* worker's valid key
        could speak as that worker. One key holds at most one live peer.
        """
        user = self.broker.endpoint.client_key(frame)
        live = peer is not None and peer.state != "gone"
        if live and peer.user is not None and user != peer.user:
            self.broker.reject(identity, "wrong-key", f"{msg.type.name} for {peer.role} {peer.worker} signed by another client key")
            return False
        if msg.type == MsgType.HELLO and msg.meta.get("stage", "join") == "join":
            if any(p.user == user and p.identity != identity and p.state != "gone" for p in self.members.peers.values()):
                self.broker.reject(identity, "key-in-use", f"client key {user!r} already holds a live peer")
                return False
            self._joining_user = user
        return True

    # -- the handshake -------------------------------------------------------------
    def on_hello(self, identity: bytes, peer: Peer | None, msg: Message, now: float) -> None:
        b = self.broker
        stage = msg.meta.get("stage", "join")
        role = msg.meta.get("role", "worker")
        if role not in ("worker", "evaluator", "server"):
            b.reject(identity, "bad-role", f"role {role!r}")
            return
        if stage == "join":
            if not self._admissible(identity, role, msg):
                return
            b.endpoint.forget_shared(identity)  # a new incarnation offers its own slots
            if b.service.defer_join(role):  # range servers not all up yet: replay_deferred() answers it
                if not any(ident == identity for ident, _m, _u in self._deferred):
                    self._deferred.append((identity, msg, self._joining_user))
                return
            refusal = b.service.refuse_join(role)
            if refusal is not None:
                b.endpoint.send(identity, protocol.error_message(b.run, -1, refusal[1], refusal[0], fatal=True))
                b.rejected[refusal[0]] += 1
                return
            if peer is not None and peer.state == "ready" and peer.role == "worker":
                b.service.worker_gone(peer, "rejoining")
            if role == "evaluator" and self.members.evaluator is not None and self.members.evaluator.state != "gone" \
                    and self.members.evaluator.identity != identity:
                b.endpoint.send(identity, protocol.error_message(UNASSIGNED_RUN, -1, "the run has its evaluator already", "evaluator-taken",
                                                                 fatal=True))
                b.rejected["evaluator-taken"] += 1
                return
            peer, rejoined = self.members.admit(identity, role, msg.worker, now)
            if peer is None and role == "server":
                b.endpoint.send(identity, protocol.error_message(b.run, -1, f"range server {msg.worker} is already in the run", "server-taken", fatal=True))
                b.rejected["server-taken"] += 1
                return
            if peer is None:
                b.endpoint.send(identity, protocol.error_message(b.run, -1, f"run is full ({self.members.n_workers} workers)", "run-full", fatal=True))
                b.rejected["run-full"] += 1
                return
            if role == "worker":
                b.service.worker_joined(peer)
            peer.host, peer.pid = str(msg.meta.get("host", "?"))[:64], msg.meta.get("pid", 0)
            peer.user = self._joining_user
            if rejoined:
                self.rejoins += 1
            meta = b.assign_meta() | b.service.assign_meta(peer)
            self.send(peer, protocol.assign(b.run, peer.worker, b.cfg.to_dict(), version=b.service.version, **meta))
            if role == "server":
                b.service.server_joined(peer)
            b.metrics.write("worker", b.elapsed, worker=peer.worker, role=role, status="rejoined" if rejoined else "joined", host=peer.host, pid=peer.pid)
        elif stage == "ready" and peer is not None and peer.state == "joining" and msg.run == b.run:
            if msg.meta.get("need_shard") and role == "worker":
                self._send_shard(peer)
            peer.state = "ready"
            if role == "worker":
                b.service.worker_ready(peer)
            elif role == "server":
                b.service.server_ready(peer, msg)
            else:
                b.maybe_send_eval()
        else:
            b.reject(identity, "bad-hello", f"HELLO stage {stage!r} out of order")

    def _admissible(self, identity: bytes, role: str, msg: Message) -> bool:
        """A join must be well formed, and (without CURVE, whose allow-list already vouched for the
        connection) prove the run secret; a refusal tells the peer why, and nothing about the run."""
        b = self.broker
        meta = msg.meta
        pid, host = meta.get("pid", 0), meta.get("host", "?")
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < 1 << 31 or not isinstance(host, str):
            b.reject(identity, "bad-hello", f"HELLO with pid {str(pid)[:20]!r} and host {str(host)[:20]!r}")
            return False
        token = b.opts.token
        if token is None or check_proof(token, role, msg.worker, meta.get("proof")):
            return True
        self.refused += 1
        b.reject(identity, "unauthenticated", f"HELLO {role} {msg.worker} without this run's secret")
        if self.refused <= REFUSALS_ANSWERED:  # a flood of them is counted, not answered
            b.endpoint.send(identity, protocol.error_message(
                UNASSIGNED_RUN, -1, "this run admits only the processes it started: give a worker started by hand the run's "
                "secret with --keys-file RUN_DIR/keys/run.json", "unauthenticated", fatal=True))
        return False

    def replay_deferred(self) -> None:
        """Answer the joins held by ``defer_join``, each with the CURVE key it arrived with."""
        deferred, self._deferred = self._deferred, []
        for identity, msg, user in deferred:
            self._joining_user = user
            self.on_hello(identity, self.members.peers.get(identity), msg, time.monotonic())

    def _send_shard(self, peer: Peer) -> None:
        from zsgd.data import make_shard

        b = self.broker
        ds = b.problem.dataset
        idx = make_shard(ds.y_train, b.cfg.split, b.cfg.seed, peer.worker, self.members.n_workers)
        meta = {"input_shape": list(ds.input_shape), "n_classes": ds.n_classes}
        self.send(peer, protocol.shard_message(b.run, peer.worker, ds.x_train[idx], ds.y_train[idx], **meta))

    # -- liveness ------------------------------------------------------------------
    def drop(self, peer: Peer, status: str) -> None:
        """``peer`` left, died or was replaced: tell the service, count it, log it."""
        b = self.broker
        peer.state = "gone"
        b.endpoint.forget_shared(peer.identity)
        if peer.role == "worker":
            b.service.worker_gone(peer, status)
        elif peer.role == "server":
            b.service.server_gone(peer, status)
        else:
            peer.busy = False
        if status == "dead":
            self.deaths += 1
        b.metrics.write("worker", b.elapsed, worker=peer.worker, role=peer.role, status=status, host=peer.host)

    def housekeeping(self, now: float) -> None:
        # Messages waiting unread may be the very heartbeats of the peers that look silent (after a long
        # step, or a busy machine starved this loop): read them first and judge on a later pass. Never
        # for longer than a timeout, so a peer flooding the socket cannot keep the dead alive.
        if not self.broker.endpoint.poll(0):
            self._inbox_busy_since = None
        elif self._inbox_busy_since is None:
            self._inbox_busy_since = now
        if self._inbox_busy_since is None or now - self._inbox_busy_since > self.members.timeout:
            for peer in self.members.expired(now):
                self.drop(peer, "dead")
        for peer in self.members.needing_heartbeat(now, self.heartbeat):
            self.send(peer, protocol.heartbeat(self.broker.run, -1))
        if self.members.live_workers():
            self._last_live = now
        elif now - self._last_live > self.wait_workers_s:
            self.broker.ledger.stop(f"no live worker for {self.wait_workers_s:g} s")

    def send(self, peer: Peer, msg: Message) -> bool:
        ok = self.broker.endpoint.send(peer.identity, msg)
        if ok:
            peer.last_sent = time.monotonic()
        return ok

    def leave_all(self, reason: str) -> None:
        b = self.broker
        for peer in list(self.members.peers.values()):
            if peer.state != "gone":
                b.endpoint.send(peer.identity, protocol.leave(b.run, peer.worker, reason))

    def workers_summary(self) -> dict[str, Any]:
        return {str(p.worker): p.row(p.host) | {"compute_s_mean": p.compute_s_sum / p.steps if p.steps else None,
                                                "emulated_stall_s": p.stall_s_sum}
                for p in self.members.by_worker.values()}

    def mean_compute(self) -> float | None:
        steps = sum(p.steps for p in self.members.by_worker.values())
        return sum(p.compute_s_sum for p in self.members.by_worker.values()) / steps if steps else None
