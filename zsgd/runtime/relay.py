"""The broker of a decentralized run: a relay and a referee, not a parameter server.

In ``zsgd run --algo dsgd|dsgt|cadmm`` no central model is trained. Workers
run their node rule (``node_loop.py``) and exchange PEER messages; the
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

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from zsgd.wire import protocol
from zsgd.broker import Broker, BrokerOptions
from zsgd.core.config import TrainConfig
from zsgd.decentralized.driver import average, consensus_error
from zsgd.decentralized.rules import DecentralizedParams
from zsgd.decentralized.topology import Topology
from zsgd.errors import ZsgdError
from zsgd.wire.membership import Peer
from zsgd.output.metrics import MetricsWriter
from zsgd.wire.protocol import Message, MsgType, ProtocolError


class RunStopped(ZsgdError):
    """A decentralized run ended early because a worker failed; the summary is written."""

    exit_code = 1


class AverageModel:
    """Stands in for the server algorithm: holds the last average model, never trains.

    The base broker asks its algorithm for ``version``, ``w``, ``snapshot()``
    and membership changes; here membership changes produce nothing (the
    relay's own failure policy applies) and ``w`` is x_bar of the latest
    evaluation round.
    """

    def __init__(self, w0: np.ndarray) -> None:
        self.w = np.array(w0, dtype=np.float32, copy=True)
        self.version = 0

    def set(self, w: np.ndarray, version: int) -> None:
        self.w, self.version = w, version

    def snapshot(self) -> np.ndarray:
        return self.w.copy()

    def add_worker(self, worker: int, now: float) -> list:
        return []

    def remove_worker(self, worker: int, now: float) -> list:
        return []


def eval_every_rounds(cfg: TrainConfig, algo: str, params: DecentralizedParams, n_workers: int, n_train: int) -> int:
    """Rounds between model uploads: ``--eval-every``, else about one epoch of samples.

    Each node takes one mini-batch per round (cadmm: ``primal_steps``), so an
    epoch of the whole training set is n_train / (n x batch x steps) rounds.
    """
    if cfg.eval_every:
        return cfg.eval_every
    steps = params.primal_steps if algo == "cadmm" else 1
    return max(1, math.ceil(n_train / (n_workers * cfg.batch_size * steps)))


class RelayBroker(Broker):
    """``Broker`` with the decentralized hooks: relay PEER, count rounds, evaluate x_bar."""

    def __init__(self, cfg: TrainConfig, problem, opts: BrokerOptions, run_dir: Path, metrics: MetricsWriter, *,
                 algo: str, topology: Topology, params: DecentralizedParams, run_id: str | None = None) -> None:
        if topology.n != opts.n_workers:
            raise ZsgdError(f"topology has {topology.n} nodes but the run has {opts.n_workers} workers")
        self.dec_algo, self.topology, self.params = algo, topology, params
        self._neighbours = [frozenset(nb) for nb in topology.neighbours]
        self.eval_rounds = eval_every_rounds(cfg, algo, params, opts.n_workers, len(problem.dataset.y_train))
        super().__init__(cfg, problem, opts, run_dir, metrics, run_id=run_id)
        # dsgt sends two vectors, a compressed message an index per value: room for both.
        self.limits = protocol.Limits.for_model(self.n_params, factor=4)
        self.started = False
        self.failed = False
        self._next_round: dict[int, int] = {}
        self._reports: dict[int, dict[int, tuple[float, int, np.ndarray | None]]] = {}
        self._round_lr = float("nan")
        self.consensus = float("nan")
        self._consensus_at: dict[int, float] = {}
        self.relayed = 0

    # -- hooks of the base broker --------------------------------------------------
    def _make_algorithm(self, w0: np.ndarray) -> AverageModel:
        return AverageModel(w0)

    def _assign_meta(self, peer: Peer) -> dict[str, Any]:
        row = self.topology.row(peer.worker) if 0 <= peer.worker < self.topology.n else None
        if row is None:
            return {}
        return {"decentralized": {"algo": self.dec_algo, "topology": self.topology.spec, "n_nodes": self.topology.n,
                                  "neighbours": list(row.neighbours), "weights": list(row.weights), "self_weight": row.self_weight,
                                  "params": asdict(self.params), "eval_every_rounds": self.eval_rounds,
                                  "stragglers": self._straggler_spec()}}

    @property
    def current_lr(self) -> float:
        return self._round_lr  # the nodes' own step size, from their round reports

    def _straggler_spec(self) -> str | None:
        """Emulated stragglers slow themselves: each node rebuilds the run's seeded choice from this spec."""
        em = self.opts.emulator
        return None if em is None or em.stragglers is None else str(em.stragglers.spec)

    def _on_hello(self, identity: bytes, peer: Peer | None, msg: Message, now: float) -> None:
        if self.started and msg.meta.get("stage", "join") == "join" and msg.meta.get("role", "worker") == "worker":
            # A node restarted from round 0 cannot rejoin rounds its neighbours are past.
            self._send(identity, Message(MsgType.ERROR, self.run, -1, 0, {}, meta={
                "message": "this decentralized run has started; a worker cannot join or rejoin it", "fatal": True}))
            self.state.rejected["late-join"] += 1
            return
        super()._on_hello(identity, peer, msg, now)

    def _on_worker_ready(self, peer: Peer) -> None:
        self._next_round[peer.worker] = 0
        ready = [p for p in self.members.by_worker.values() if p.state == "ready"]
        if not self.started and len(ready) == self.opts.n_workers:
            self.started = True
            for p in ready:
                self._send_peer(p, Message(MsgType.WAIT, self.run, p.worker, 0, {}, meta={"reason": "start"}))
            self.metrics.write("rounds", self.elapsed, status="started", topology=self.topology.spec, eval_every_rounds=self.eval_rounds)

    def _drop_peer(self, peer: Peer, status: str, now: float) -> None:
        super()._drop_peer(peer, status, now)
        if peer.role == "worker" and self.state.stop_reason is None:
            self._fail(f"worker {peer.worker} {'died' if status == 'dead' else status}; decentralized rounds are synchronous, so the run stops")

    def _housekeeping(self, now: float) -> None:
        super()._housekeeping(now)
        if not self.started and self.state.stop_reason is None and self.elapsed > self.opts.wait_workers_s:
            ready = sum(p.state == "ready" for p in self.members.by_worker.values())
            self._fail(f"only {ready} of {self.opts.n_workers} workers were ready after {self.opts.wait_workers_s:g} s")

    def _fail(self, reason: str) -> None:
        self.failed = True
        self.state.stop_reason = reason

    def checkpoint(self) -> None:
        """No checkpoint: the state lives in the nodes (see the module docstring)."""

    # -- relay ---------------------------------------------------------------------
    def _on_peer(self, peer: Peer, frames: list, msg: Message) -> None:
        if peer.role != "worker" or peer.state != "ready" or not self.started:
            self._reject(peer.identity, "not-ready", "PEER before the rounds started")
            return
        to = msg.meta.get("to")
        if msg.worker != peer.worker:
            self._reject(peer.identity, "wrong-identity", f"worker {peer.worker} sent PEER as worker {msg.worker}")
            return
        if isinstance(to, bool) or not isinstance(to, int) or not 0 <= to < self.opts.n_workers:
            self._reject(peer.identity, "unknown-worker", f"PEER to {str(to)[:32]}")
            return
        if to not in self._neighbours[peer.worker]:
            self._reject(peer.identity, "not-neighbour", f"worker {peer.worker} -> {to}: not neighbours in {self.topology.spec}")
            return
        target = self.members.by_worker.get(to)
        if target is None or target.state != "ready":
            self._fail(f"cannot relay to worker {to}: it is not in the run")
            return
        if self._held is not None:
            # Emulated network: one hop from the sender to its neighbour, with the sender's
            # link (as zsgd sim models a peer message); held, then relayed when due.
            delay = self.opts.emulator.delay(peer.worker, True, sum(len(f.buffer) for f in frames[1:]))
            self._held.push(("relay", target, frames[1:]), time.monotonic(), delay)
            return
        self._relay_now(target, frames[1:])

    def _deliver_held(self, direction: str, peer: Peer, msg: Any) -> None:
        if direction == "relay":
            self._relay_now(peer, msg)
        else:
            super()._deliver_held(direction, peer, msg)

    def _relay_now(self, target: Peer, frames: list) -> None:
        to = target.worker
        try:
            self.sock.send_multipart([target.identity, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._fail(f"relay queue to worker {to} is full (it stopped reading); the run stops")
            return
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self._fail(f"worker {to} is unreachable; the run stops")
            return
        target.last_sent = time.monotonic()
        self.relayed += 1
        self.state.bytes_out += sum(len(f.buffer) for f in frames)

    # -- rounds --------------------------------------------------------------------
    def _on_update(self, peer: Peer, msg: Message) -> None:
        if peer.role != "worker" or peer.state != "ready" or not self.started:
            self._reject(peer.identity, "not-ready", "UPDATE before the rounds started")
            return
        try:
            r, loss, n, w = self._check_report(peer, msg)
        except ProtocolError as exc:
            # A node that reports nonsense cannot be trusted for the round; its neighbours
            # would wait on it, so the run stops rather than hang.
            self._reject(peer.identity, exc.reason, str(exc))
            self._fail(f"worker {peer.worker} sent a bad round report ({exc.reason}); the run stops")
            return
        self._next_round[peer.worker] = r + 1
        peer.steps += 1
        peer.samples += n
        peer.last_loss = loss
        lr = msg.meta.get("lr")
        if isinstance(lr, (int, float)) and not isinstance(lr, bool):
            self._round_lr = float(lr)
        compute_s = msg.meta.get("compute_s")
        if isinstance(compute_s, (int, float)) and 0 <= compute_s < 3600:
            peer.compute_s_sum += float(compute_s)
        stall_s = msg.meta.get("stall_s")
        if isinstance(stall_s, (int, float)) and 0 <= stall_s < 3600:
            peer.stall_s_sum += float(stall_s)
        self._reports.setdefault(r, {})[peer.worker] = (loss, n, w)
        while len(self._reports.get(self.state.updates, ())) == self.opts.n_workers and self.state.stop_reason is None:
            self._complete_round(self.state.updates)

    def _check_report(self, peer: Peer, msg: Message) -> tuple[int, float, int, np.ndarray | None]:
        m = msg.meta
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
        if w is not None:
            if w.dtype != np.float32 or w.shape != (self.n_params,):
                raise ProtocolError("wrong-shape", f"'w' must be float32 ({self.n_params},)")
            if not np.isfinite(w).all():
                raise ProtocolError("non-finite", "'w' holds NaN or Inf")
        return r, float("nan") if loss is None else float(loss), n, w

    def _complete_round(self, r: int) -> None:
        st = self.state
        reports = self._reports.pop(r)
        st.updates = r + 1
        st.samples += sum(n for _l, n, _w in reports.values())
        st.staleness.append(0)
        self._loss_window.extend(loss for loss, _n, _w in reports.values())
        self.metrics.write("update", self.elapsed, updates=st.updates, samples=st.samples, worker=-1, staleness=0, lr=self._round_lr)
        models = [w for _l, _n, w in (reports[i] for i in range(self.opts.n_workers)) if w is not None]
        if len(models) == self.opts.n_workers:
            xbar = average(models)
            self.consensus = consensus_error(models, xbar)
            self._consensus_at[st.updates] = self.consensus
            self.algo.set(xbar, st.updates)
            self._eval_pending = True
            self._maybe_send_eval()
        if st.updates % self.cfg.log_every == 0 and self._loss_window:
            finite = [x for x in self._loss_window if np.isfinite(x)]
            st.last_loss = float(np.mean(finite)) if finite else float("nan")
            self.metrics.write("train", self.elapsed, updates=st.updates, samples=st.samples, epoch=st.samples / len(self.problem.dataset.y_train),
                               loss=st.last_loss, consensus_error=self.consensus, bytes_total=st.bytes_in + st.bytes_out)
            self._loss_window.clear()
        reason = self.rule.reason(st.updates, st.samples, self.elapsed)
        if reason:
            st.stop_reason = reason

    # -- evaluation and summary ---------------------------------------------------
    def _record_eval(self, rec: dict[str, Any]) -> None:
        st = self.state
        st.test_loss, st.test_acc = rec["test_loss"], rec["test_acc"]
        ce = self._consensus_at.get(rec["updates"], self.consensus)
        st.evals.append(rec | {"consensus_error": ce})
        n_train = len(self.problem.dataset.y_train)
        self.metrics.write("eval", rec["t"], updates=rec["updates"], samples=rec["samples"], epoch=rec["samples"] / n_train,
                           test_loss=rec["test_loss"], test_acc=rec["test_acc"], consensus_error=ce,
                           bytes_total=st.bytes_in + st.bytes_out)
        reason = self.rule.reason(st.updates, st.samples, self.elapsed, rec["test_acc"])
        if reason and st.stop_reason is None:
            st.stop_reason = reason

    def final_evaluation(self) -> None:
        """Evaluate the last average model (of round ``algo.version``, the last upload)."""
        loss, acc = self.problem.evaluate(self.algo.w)
        self._record_eval({"test_loss": loss, "test_acc": acc, "t": self.elapsed, "updates": self.algo.version, "samples": self.state.samples})

    def summary(self) -> dict[str, Any]:
        return super().summary() | {
            "consensus_error": self.consensus, "topology": self.topology.spec, "relayed_messages": self.relayed,
            "eval_every_rounds": self.eval_rounds, "model_round": self.algo.version, "failed": self.failed,
            "params": self.params.for_algo(self.dec_algo),
        }
