"""The broker of a decentralized run: a relay and a referee, not a parameter server.

In ``zsgd run --algo dsgd|dsgt|cadmm`` no central model is trained. Workers
run their node rule (``zsgd/runtime/worker/decentralized_node.py``) and exchange PEER messages; the
broker's ROUTER is the only address every worker can reach, so it relays
them. Why relay rather than connect workers directly: one listening port,
one CURVE key, one place that knows who is alive, and the graph can be
enforced where the bytes pass (a worker cannot talk to a non-neighbour).

What the relay does per message kind:

- PEER from worker i: the header is decoded and checked (``m.worker`` is i,
  ``m.to`` is one of i's neighbours in the run's topology and is ready),
  then the *original frames* are forwarded to worker ``m.to``'s ROUTER
  identity, never re-encoded (the receiver decodes and checks the arrays).
  Anything else is rejected and counted (``not-neighbour``, ``unknown-worker``,
  ``wrong-identity``); the run goes on.
- UPDATE with ``meta.kind = "round"``: worker i finished round r (its mean
  loss and samples; at evaluation rounds the array ``w``, its model after
  the round). When every worker has reported round r, the broker logs one
  ``update`` event (one "update" is one round of all nodes) and every
  ``log_every`` rounds a ``train`` event with the mean loss and the
  consensus error. At evaluation rounds it averages the models, measures
  the consensus error ``mean_i ||x_i - x_bar||`` and hands ``x_bar`` to the
  evaluator process (``eval`` events carry ``consensus_error``).

Start barrier: workers start round 0 only after the broker's
``WAIT(reason="start")``, sent once all n workers are ready, so no PEER
message is routed to a worker that has not connected yet.

Failure policy (documented in ``docs/algorithms.md``): rounds are
synchronous and a node's neighbours cannot finish a round without it, so
when a worker dies, leaves, or a relay to it fails, the run **stops** with a
stop reason naming the worker (``zsgd run`` then exits with status 1 after
writing the summary of what was done). A worker that does not join within
``wait_workers_s`` also stops the run. The run never waits forever.

Decentralized runs keep no checkpoint (every node holds its own state; the
broker only ever sees averages), so they cannot be resumed.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Callable

import numpy as np
from zsgd.decentralized.driver import average, consensus_error, eval_every_rounds
from zsgd.decentralized.rules import DecentralizedParams, rule_class
from zsgd.decentralized.topology import Topology
from zsgd.errors import ProtocolError, ZsgdError
from zsgd.runtime.server.context import ServiceContext
from zsgd.runtime.server.service import ServiceBase
from zsgd.wire import protocol
from zsgd.wire.membership import Peer
from zsgd.wire.protocol import Message


class RunStopped(ZsgdError):
    """A decentralized run ended early because a worker failed; the summary is written."""

    exit_code = 1


def relay_service(algo: str, topology: Topology, params: DecentralizedParams) -> Callable[[ServiceContext, np.ndarray, dict | None], "RelayService"]:
    """A broker service factory for a decentralized run of ``algo`` on ``topology``."""

    def make(ctx: ServiceContext, w0: np.ndarray, opt_state: dict | None) -> RelayService:
        if opt_state is not None:
            raise ZsgdError(f"--resume: {algo} runs keep no checkpoint (each node holds its own state); start a new run")
        return RelayService(ctx, w0, algo, topology, params)

    return make


class RelayService(ServiceBase):
    """The decentralized broker's service: relay PEER, count rounds, evaluate x_bar."""

    limits_factor = 4  # dsgt sends two vectors, a compressed message an index per value: room for both
    evaluates_on_cadence = False  # x_bar exists only at upload rounds: the relay asks for evaluation itself

    def __init__(self, ctx: ServiceContext, w0: np.ndarray, algo: str, topology: Topology, params: DecentralizedParams) -> None:
        n = ctx.opts.n_workers
        if topology.n != n:
            raise ZsgdError(f"topology has {topology.n} nodes but the run has {n} workers")
        self.ctx = ctx
        self.dec_algo, self.topology, self.params = algo, topology, params
        self._neighbours = [frozenset(nb) for nb in topology.neighbours]
        ds = ctx.problem.dataset
        self.eval_rounds = eval_every_rounds(ctx.cfg, ctx.ledger.rule, algo, params, n, len(ds.y_train))
        ctx.ledger.set_eval_every(self.eval_rounds)  # the upload rounds: its cadence in samples would miss them
        ctx.ledger.diverge_hint = rule_class(algo).diverge_hint
        self.w = np.array(w0, dtype=np.float32, copy=True)  # x_bar of the latest upload round
        self.version = 0
        self.started = False
        self.failed = False
        self._next_round: dict[int, int] = {}
        self._reports: dict[int, dict[int, tuple[float, int, np.ndarray | None]]] = {}
        self._round_lr = float("nan")
        self.consensus = float("nan")
        self._consensus_at: dict[int, float] = {}
        self.relayed = 0
        self.relayed_bytes = 0  # the peer messages' frames, each counted once (zsgd sim's decentralized bytes)

    # -- what the broker asks of a service -------------------------------------------
    @property
    def weights(self) -> np.ndarray:
        return self.w

    def snapshot(self) -> np.ndarray:
        return self.w.copy()

    @property
    def current_lr(self) -> float:
        return self._round_lr  # the nodes' own step size, from their round reports

    def assign_meta(self, peer: Peer) -> dict[str, Any]:
        row = self.topology.row(peer.worker) if 0 <= peer.worker < self.topology.n else None
        if row is None:
            return {}
        return {"decentralized": {"algo": self.dec_algo, "topology": self.topology.spec, "n_nodes": self.topology.n,
                                  "neighbours": list(row.neighbours), "weights": list(row.weights), "self_weight": row.self_weight,
                                  "params": asdict(self.params), "eval_every_rounds": self.eval_rounds,
                                  "stragglers": self._straggler_spec()}}

    def _straggler_spec(self) -> str | None:
        """Emulated stragglers slow themselves: each node rebuilds the run's seeded choice from this spec."""
        em = self.ctx.port.emulator
        return None if em is None or em.stragglers is None else str(em.stragglers.spec)

    def refuse_join(self, role: str) -> tuple[str, str] | None:
        if self.started and role == "worker":
            # A node restarted from round 0 cannot rejoin rounds its neighbours are past.
            return "late-join", "this decentralized run has started; a worker cannot join or rejoin it"
        return None

    def worker_ready(self, peer: Peer) -> None:
        ctx = self.ctx
        self._next_round[peer.worker] = 0
        ready = [p for p in ctx.members.by_worker.values() if p.state == "ready"]
        if not self.started and len(ready) == ctx.opts.n_workers:
            self.started = True
            for p in ready:
                ctx.port.send(p, protocol.wait_message(ctx.run, p.worker, 0, reason="start"))
            ctx.metrics.write("rounds", ctx.elapsed(), status="started", topology=self.topology.spec, eval_every_rounds=self.eval_rounds)

    def worker_gone(self, peer: Peer, status: str) -> None:
        if self.ctx.ledger.stop_reason is None:
            self._fail(f"worker {peer.worker} {'died' if status == 'dead' else status}; decentralized rounds are synchronous, so the run stops")

    def tick(self, now: float) -> None:
        ctx = self.ctx
        if not self.started and ctx.ledger.stop_reason is None and ctx.elapsed() > ctx.opts.wait_workers_s:
            ready = sum(p.state == "ready" for p in ctx.members.by_worker.values())
            self._fail(f"only {ready} of {ctx.opts.n_workers} workers were ready after {ctx.opts.wait_workers_s:g} s")

    def _fail(self, reason: str) -> None:
        self.failed = True
        self.ctx.ledger.stop(reason)

    def checkpoint_state(self) -> None:
        """No checkpoint: the state lives in the nodes (see the module docstring)."""
        return None

    def eval_fields(self, updates: int) -> dict[str, Any]:
        port = self.ctx.port
        return {"consensus_error": self._consensus_at.get(updates, self.consensus), "bytes_total": port.bytes_in + port.bytes_out}

    def summary(self) -> dict[str, Any]:
        return {"dropped_updates": dict(self.ctx.port.dropped), "compression_ratio": 1.0, "reply_compression_ratio": 1.0,
                "consensus_error": self.consensus, "topology": self.topology.spec, "relayed_messages": self.relayed, "relayed_bytes": self.relayed_bytes,
                "eval_every_rounds": self.eval_rounds, "model_round": self.version, "failed": self.failed,
                "params": self.params.for_algo(self.dec_algo)}

    # -- relay ---------------------------------------------------------------------
    def on_peer(self, peer: Peer, frames: list, msg: Message) -> None:
        ctx = self.ctx
        if peer.role != "worker" or peer.state != "ready" or not self.started:
            ctx.reject(peer.identity, "not-ready", "PEER before the rounds started")
            return
        to = msg.meta.get("to")
        if msg.worker != peer.worker:
            ctx.reject(peer.identity, "wrong-identity", f"worker {peer.worker} sent PEER as worker {msg.worker}")
            return
        if isinstance(to, bool) or not isinstance(to, int) or not 0 <= to < ctx.opts.n_workers:
            ctx.reject(peer.identity, "unknown-worker", f"PEER to {str(to)[:32]}")
            return
        if to not in self._neighbours[peer.worker]:
            ctx.reject(peer.identity, "not-neighbour", f"worker {peer.worker} -> {to}: not neighbours in {self.topology.spec}")
            return
        target = ctx.members.by_worker.get(to)
        if target is None or target.state != "ready":
            self._fail(f"cannot relay to worker {to}: it is not in the run")
            return
        port = ctx.port
        if port.emulated:
            # Emulated network: one hop from the sender to its neighbour, over the sender's link,
            # which sends one message at a time (as zsgd sim models a node); held, then relayed when due.
            nbytes = sum(len(f.buffer) for f in frames[1:])
            port.hold(("relay", target, frames[1:]), port.emulator.peer_delay(peer.worker, nbytes, time.monotonic()))
            return
        self._relay_now(target, frames[1:])

    def deliver_held(self, direction: str, peer: Peer, payload: Any) -> None:
        if direction == "relay":
            self._relay_now(peer, payload)
        elif direction == "in":
            self.on_update(peer, payload)

    def _relay_now(self, target: Peer, frames: list) -> None:
        failure = self.ctx.port.forward(target.identity, frames)
        if failure == "send-queue-full":
            self._fail(f"relay queue to worker {target.worker} is full (it stopped reading); the run stops")
        elif failure is not None:
            self._fail(f"worker {target.worker} is unreachable; the run stops")
        else:
            target.last_sent = time.monotonic()
            self.relayed += 1
            self.relayed_bytes += sum(len(f.buffer) if hasattr(f, "buffer") else len(f) for f in frames)

    # -- rounds --------------------------------------------------------------------
    def on_update(self, peer: Peer, msg: Message) -> None:
        ctx = self.ctx
        if peer.role != "worker" or peer.state != "ready" or not self.started:
            ctx.reject(peer.identity, "not-ready", "UPDATE before the rounds started")
            return
        try:
            r, loss, n, w = self._check_report(peer, msg)
        except ProtocolError as exc:
            # A node that reports nonsense cannot be trusted for the round; its neighbours
            # would wait on it, so the run stops rather than hang.
            ctx.reject(peer.identity, exc.reason, str(exc))
            self._fail(f"worker {peer.worker} sent a bad round report ({exc.reason}); the run stops")
            return
        self._next_round[peer.worker] = r + 1
        peer.steps += 1
        peer.samples += n
        peer.last_loss = loss
        lr = msg.meta.get("lr")
        if isinstance(lr, (int, float)) and not isinstance(lr, bool):
            self._round_lr = float(lr)
        for key, attr in (("compute_s", "compute_s_sum"), ("stall_s", "stall_s_sum")):
            value = msg.meta.get(key)
            if isinstance(value, (int, float)) and 0 <= value < 3600:
                setattr(peer, attr, getattr(peer, attr) + float(value))
        self._reports.setdefault(r, {})[peer.worker] = (loss, n, w)
        ledger = ctx.ledger
        while len(self._reports.get(ledger.updates, ())) == ctx.opts.n_workers and ledger.stop_reason is None:
            self._complete_round(ledger.updates)

    def _check_report(self, peer: Peer, msg: Message) -> tuple[int, float, int, np.ndarray | None]:
        m = msg.meta
        n_params = self.w.size
        if msg.worker != peer.worker:
            raise ProtocolError("wrong-identity", f"worker {peer.worker} reported as worker {msg.worker}")
        if m.get("kind") != "round":
            raise ProtocolError("bad-meta", "a decentralized worker reports rounds (meta kind 'round')")
        r, n, loss = m.get("round"), m.get("n_samples"), m.get("loss")
        if isinstance(r, bool) or not isinstance(r, int) or r != self._next_round.get(peer.worker):
            raise ProtocolError("bad-meta", f"round {str(r)[:32]}, expected {self._next_round.get(peer.worker)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ProtocolError("bad-meta", "n_samples must be an int >= 0")
        if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
            raise ProtocolError("bad-meta", "loss must be a number or null")
        if set(msg.arrays) - {"w"} or msg.codec != "none":
            raise ProtocolError("bad-schema", f"arrays {sorted(msg.arrays)[:4]}, expected none or 'w'")
        w = msg.arrays.get("w")
        if w is not None and (w.dtype != np.float32 or w.shape != (n_params,)):
            raise ProtocolError("wrong-shape", f"'w' must be float32 ({n_params},)")
        return r, float("nan") if loss is None else float(loss), n, w

    def _complete_round(self, r: int) -> None:
        ctx, ledger = self.ctx, self.ctx.ledger
        reports = self._reports.pop(r)
        n = ctx.opts.n_workers
        losses = [loss for loss, _n, _w in reports.values()]
        uploaded = {i: reports[i][2] for i in range(n) if reports[i][2] is not None}
        broken = frozenset(i for i, w in uploaded.items() if not np.isfinite(w).all())
        if broken and ledger.suspect("a node's model is not finite", update=r + 1, workers=broken):
            return
        models = [w for i, w in uploaded.items() if i not in broken]  # an unconfirmed broken model sits this round out
        ledger.loss(float(np.mean(losses)), by={i: reports[i][0] for i in reports})
        if len(models) == n:
            xbar = average(models)
            self.consensus = consensus_error(models, xbar)
            self._consensus_at[r + 1] = self.consensus
            self.w, self.version = xbar, r + 1
            ctx.request_eval()

        def train_extra() -> dict[str, Any]:
            return {"consensus_error": self.consensus, "bytes_total": ctx.port.bytes_in + ctx.port.bytes_out}

        ledger.applied(ctx.elapsed(), version=r + 1, n_samples=sum(n_ for _l, n_, _w in reports.values()), worker=-1, staleness=0,
                         lr=self._round_lr, train_extra=train_extra)
        ctx.after_update()
