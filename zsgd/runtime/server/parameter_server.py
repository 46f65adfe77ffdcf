"""The parameter-server service: the central model behind the broker's endpoint.

It drives a sans-IO server algorithm (``zsgd.algorithms``: async, sync,
ssp, local SGD) with the wall clock. Each UPDATE is validated (run, worker,
shape, finiteness) and decoded (``--compress``) before it touches the model;
the algorithm's replies go back as full weights or, with
``--compress-replies``, as coded deltas. A bad update is rejected and
counted, and the worker is re-admitted so that no round waits on it. A
worker reporting a non-finite loss is not a bad message but a diverging
run: the ledger ends it ("diverged at update N (...)"); a non-finite gradient that
comes with a finite loss is rejected like any bad message, so a hostile
peer cannot end the run by sending NaN.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from zsgd.algorithms import Applied, Cancel, Dropped, Notice, Reply, Update, algorithm_class, make_server_algorithm
from zsgd.algorithms.step_log import Gather, StepFollower, StepLeader
from zsgd.core.schedule import lr_factor
from zsgd.errors import ProtocolError
from zsgd.runtime.worker.replies import ABANDON
from zsgd.runtime.server.service import Service
from zsgd.wire import protocol
from zsgd.wire.membership import Peer
from zsgd.wire.protocol import Message

if TYPE_CHECKING:
    from zsgd.runtime.server.broker import Broker


class ParameterServer(Service):
    """Holds the central weights and optimizer; applies updates; replies with weights."""

    limits_factor = 2  # a gradient plus one more vector (or a sparse codec at full density) per message

    def __init__(self, broker: "Broker", w0: np.ndarray, optimizer: Any, opts: Any, opt_state: dict | None = None,
                 one_range: bool = False, follower: bool = False) -> None:
        """``one_range``: this server holds one range of a model split over K servers (--servers K). Then the
        workers clip (no range sees the whole gradient's norm), and sync rounds admit a joiner into the round
        in progress (``SyncSGD.admit_into_open_round``: the K servers' rounds must agree). A rule that picks
        its gradients by arrival order (``step_log``: ksync, kasync) runs at the coordinator only, which logs
        its decisions (``leader``); a range server (``follower``) replays them (``zsgd.algorithms.step_log``)."""
        self.b = broker
        self.opts = opts
        self.optimizer = optimizer
        if opt_state is not None:
            optimizer.load_state_arrays(opt_state)
        logged = one_range and algorithm_class(opts.algo).step_log
        if logged and follower:
            self.algo = StepFollower(w0, optimizer, give_up_s=2 * broker.opts.network.timeout)
        else:
            self.algo = make_server_algorithm(opts.algo, w0, optimizer, staleness_lr=opts.staleness_lr,
                                              clip_norm=None if one_range else broker.cfg.clip_norm)
        self.leader = StepLeader() if logged and not follower else None
        self.on_gather: Any = None  # a follower's answer to a gather its log reached (set by the range server)
        self._log_next = 0  # a follower: the index of the next log entry it expects
        self.algo.version = broker.ledger.updates
        if one_range and hasattr(self.algo, "admit_into_open_round"):
            self.algo.admit_into_open_round = True
        self.reply_codec = None
        if opts.compress_replies != "none":
            from zsgd.compression.delta import DeltaReplyEncoder

            self.reply_codec = DeltaReplyEncoder(opts.compress_replies, w0.size, seed=broker.cfg.seed)
        self.dropped: Counter = Counter()
        self.update_bytes = self.dense_update_bytes = 0  # accepted updates as sent, and uncompressed
        self.reply_bytes = self.dense_reply_bytes = 0  # weight replies as sent, and as full weights
        # The start barrier: ready workers wait here (no weights yet) until all the run's workers are
        # ready, or --start-wait seconds after the first (at _first_ready); then all start together.
        # None: started.
        self._waiting: set[int] | None = set() if opts.start_wait > 0 and broker.opts.n_workers > 1 and not (logged and follower) else None
        self._first_ready = 0.0

    def exchanged_size(self, n_params: int) -> int:
        return self.algo.w.size  # with --servers K, this server's range

    def share_replies(self) -> None:
        """Replies go out zero-copy as views of the live weights; the algorithm copies them away
        before an update only while a tracked send of that view is in flight (emulation parks
        messages before sending them, untracked, so it keeps copies)."""
        if hasattr(self.algo, "share_snapshots"):
            self.algo.share_snapshots = True
            self.algo.snapshot_busy = self.b.endpoint.weights_in_flight

    # -- what the broker asks of a service -------------------------------------------
    @property
    def version(self) -> int:
        return self.algo.version

    @property
    def weights(self) -> np.ndarray:
        return self.algo.w

    def snapshot(self) -> np.ndarray:
        return self.algo.snapshot()

    @property
    def current_lr(self) -> float:
        """The step size now, after --lr-schedule (for the live view)."""
        return self.optimizer.lr * getattr(self.algo, "lr_scale", 1.0)

    def worker_joined(self, peer: Peer) -> None:
        if self.reply_codec is not None:
            self.reply_codec.forget(peer.worker)  # a (re)joining worker holds no weights yet: full ones first

    def worker_ready(self, peer: Peer) -> None:
        if self._waiting is None:
            self._dispatch(self.algo.add_worker(peer.worker, self.b.elapsed))
            return
        if not self._waiting:
            self._first_ready = self.b.elapsed
        self._waiting.add(peer.worker)
        if len(self._waiting) >= self.b.opts.n_workers:
            self._start()

    def worker_gone(self, peer: Peer, status: str) -> None:
        if self.reply_codec is not None:
            self.reply_codec.forget(peer.worker)
        if self._waiting is not None:
            self._waiting.discard(peer.worker)
            return
        self._dispatch(self.algo.remove_worker(peer.worker, self.b.elapsed))

    def tick(self, now: float) -> None:
        if isinstance(self.algo, StepFollower):
            self._dispatch(self.algo.tick(self.b.elapsed))  # a step waiting for a gradient that will not come gives up
        if self._waiting and self.b.elapsed - self._first_ready > self.opts.start_wait:
            self._start()

    def _start(self) -> None:
        """Release the start barrier: every waiting worker gets the weights at once (a sync run's first
        round holds them all; an async run's throughput is measured with all of them from its first update)."""
        b, waiting = self.b, self._waiting or set()
        self._waiting = None
        b.metrics.write("barrier", b.elapsed, workers=len(waiting), expected=b.opts.n_workers,
                        waited_s=round(b.elapsed - self._first_ready, 3))
        for worker in sorted(waiting):
            peer = b.session.members.by_worker.get(worker)
            if peer is not None and peer.state == "ready":
                self._dispatch(self.algo.add_worker(worker, b.elapsed))

    def deliver_held(self, direction: str, peer: Peer, msg: Any) -> None:
        """One emulated message arrives: an update from a worker, or a reply to it."""
        if direction == "in":
            self.on_update(peer, msg)
        else:
            self._send_reply(peer, msg)

    def checkpoint_state(self) -> tuple[np.ndarray, dict] | None:
        return self.algo.w, self.optimizer.state_arrays()

    def summary(self) -> dict[str, Any]:
        return {"dropped_updates": dict(self.dropped + self.b.endpoint.dropped),
                "compression_ratio": self.dense_update_bytes / self.update_bytes if self.update_bytes else 1.0,
                "reply_compression_ratio": self.dense_reply_bytes / self.reply_bytes if self.reply_bytes else 1.0} | self.algo.report()

    # -- updates -----------------------------------------------------------------------
    def on_update(self, peer: Peer, msg: Message) -> None:
        b = self.b
        if peer.role != "worker" or peer.state != "ready":
            b.reject(peer.identity, "not-ready", "UPDATE before the worker was ready")
            return
        loss = msg.meta.get("loss")
        loss = float(loss) if isinstance(loss, (int, float)) and not isinstance(loss, bool) else math.nan
        if msg.meta.get("non_finite") is True and msg.worker == peer.worker:
            # The worker's own report that its loss blew up: the run diverged. (A non-finite
            # gradient with a finite loss is only a bad message: rejected below, the run goes on.)
            b.ledger.diverge(f"train loss is not finite on worker {peer.worker}")
            return
        try:
            # Finiteness is checked once, inside the fused server step (the algorithm drops such an update).
            protocol.validate_update(msg, run=b.run, known_workers={peer.worker}, n_params=self.algo.w.size, require_finite=False)
            grad = msg.arrays.get("g")
            meta: dict[str, Any] = {"kind": str(msg.meta.get("kind", "grad"))}
            if msg.codec != "none":
                from zsgd.compression import decode, touched_indices

                grad = decode(msg.codec, msg.arrays, self.algo.w.size)
                meta["indices"] = touched_indices(msg.codec, msg.arrays)
        except ProtocolError as exc:
            b.reject(peer.identity, exc.reason, str(exc))
            # Re-admit so the worker gets fresh weights and no sync round waits on it.
            self._dispatch(self.algo.remove_worker(peer.worker, b.elapsed))
            self._dispatch(self.algo.add_worker(peer.worker, b.elapsed))
            return
        self.update_bytes += protocol.message_nbytes(msg)
        self.dense_update_bytes += 4 * self.algo.w.size
        peer.last_loss = loss
        n = int(msg.meta.get("n_samples", b.cfg.batch_size))
        compute_s = msg.meta.get("compute_s")
        if isinstance(compute_s, (int, float)) and 0 <= compute_s < 3600:
            peer.compute_s_sum += float(compute_s)
        seq = msg.meta.get("seq")  # a sharded worker's number for this gradient, the same on every range
        if isinstance(seq, int) and not isinstance(seq, bool):
            meta["seq"] = seq
        self.algo.lr_scale = lr_factor(b.cfg.lr_schedule, b.ledger.progress(b.elapsed))
        update = Update(peer.worker, msg.version, grad, n, loss, meta)
        outputs = self.algo.on_update(update, b.elapsed)
        if self.leader is not None:
            self.leader.update(update, outputs)
        self._dispatch(outputs)

    def follow_log(self, meta: dict) -> bool:
        """A follower: the coordinator's next log entries (``zsgd.algorithms.step_log``); False on a gap (lost entries)."""
        entries, first = meta.get("log"), meta.get("first")
        if not isinstance(entries, list) or first != self._log_next:
            return False
        self._log_next += len(entries)
        self._dispatch(self.algo.follow(entries, self.b.elapsed))
        return True

    def publish_log(self) -> None:
        """The coordinator: send its rule's new decisions to the range servers (``ShardedParameterServer``)."""

    def _dispatch(self, outputs: list) -> None:
        b = self.b
        if self.leader is not None:
            self.leader.outputs(outputs)
        for out in outputs:
            if isinstance(out, Gather):
                if self.on_gather is not None:
                    self.on_gather(out.tag, out.full)
                continue
            if isinstance(out, Reply):
                peer = b.session.members.by_worker.get(out.worker)
                if peer is None or peer.state != "ready":
                    continue
                msg = self._reply_message(peer.worker, out.version, out.weights)
                if b.endpoint.held is None:
                    self._send_reply(peer, msg)
                    continue
                factor = b.opts.emulator.slowdown(peer.worker, b.elapsed)
                if factor != 1.0:
                    msg.meta["slowdown"] = factor
                target = b.opts.emulator.compute_target(peer.worker, self.algo.local_steps)  # --inject-compute
                if target is not None:
                    msg.meta["compute_target_s"] = target
                b.endpoint.hold(("out", peer, msg), b.opts.emulator.reply_delay(peer.worker, protocol.message_nbytes(msg), time.monotonic()))
            elif isinstance(out, Applied):
                self._on_applied(out)
            elif isinstance(out, Dropped) and out.reason == "non-finite":
                # A NaN/Inf gradient with a finite loss: a bad message (rejected, counted, the run goes on);
                # a round whose average is not finite: the run diverged.
                sender = b.session.members.by_worker.get(out.worker)
                if out.worker < 0 or sender is None:
                    b.ledger.diverge("the averaged gradient is not finite")
                else:
                    b.reject(sender.identity, "non-finite", f"worker {out.worker} sent a gradient holding NaN or Inf")
            elif isinstance(out, Dropped):
                self.dropped[out.reason] += 1
            elif isinstance(out, Notice):
                b.metrics.write(out.kind, b.elapsed, **out.fields)
            elif isinstance(out, Cancel):
                self._cancel(out)
        if self.leader is not None and self.leader.entries:
            self.publish_log()

    def _cancel(self, c: Cancel) -> None:
        """Tell a worker its step is no longer wanted (WAIT ``abandon``: no weights, so no reply slot or delta
        mirror is touched), over the emulated link like a reply."""
        b = self.b
        peer = b.session.members.by_worker.get(c.worker)
        if peer is None or peer.state != "ready":
            return
        msg = protocol.wait_message(b.run, c.worker, c.version, reason=ABANDON)
        if b.endpoint.held is None:
            b.session.send(peer, msg)
        else:
            b.endpoint.hold(("out", peer, msg), b.opts.emulator.delay(peer.worker, False, protocol.message_nbytes(msg)))

    def _on_applied(self, a: Applied) -> None:
        b = self.b
        members = b.session.members
        peer = members.by_worker.get(a.worker)
        if peer is not None:
            peer.steps += 1
            peer.samples += a.n_samples
            peer.staleness_sum += a.staleness
            peer.staleness_max = max(peer.staleness_max, a.staleness)
            b.ledger.loss(peer.last_loss, a.worker)
        elif a.worker == -1:
            # A round's step: every live worker contributed (sync), or the ones the rule names (ksync, kasync).
            contributors = [members.by_worker.get(w) for w in a.workers] if a.workers else members.live_workers()
            for p in (p for p in contributors if p is not None):
                p.steps += 1
                if math.isfinite(p.last_loss):  # NaN: joined mid-round, no gradient yet (updates are checked finite)
                    b.ledger.loss(p.last_loss, p.worker)
        b.ledger.applied(b.elapsed, version=a.version, n_samples=a.n_samples, worker=a.worker, staleness=a.staleness, lr=a.lr)
        b.after_update()

    # -- replies -----------------------------------------------------------------------
    def _reply_message(self, worker: int, version: int, weights: np.ndarray) -> Message:
        """WEIGHTS for a worker: the full snapshot, or with --compress-replies a coded delta from what it holds."""
        full = protocol.weights_message(self.b.run, version, weights)
        if self.reply_codec is None:
            return full  # every reply dense: the ratio is 1 (nothing to count on this hot path)
        dense = protocol.message_nbytes(full)
        self.dense_reply_bytes += dense
        arrays = self.reply_codec.reply(worker, weights)
        if arrays is None:
            self.reply_bytes += dense
            return full
        msg = protocol.weights_delta_message(self.b.run, version, arrays, self.reply_codec.name)
        self.reply_bytes += protocol.message_nbytes(msg)
        return msg

    def _send_reply(self, peer: Peer, msg: Message) -> None:
        if not self.b.session.send(peer, msg) and self.reply_codec is not None:
            self.reply_codec.forget(peer.worker)  # it never got this delta: its mirror is wrong now

    def __repr__(self) -> str:
        return f"ParameterServer({self.opts.algo}, version={self.version}, t={time.monotonic():.0f})"
