"""The parameter-server service: the central model behind the broker's endpoint.

It drives the server engine (``zsgd.engine``: the sans-IO dispatch the
simulator and the trainer drive too) with the wall clock, and is its port:
replies leave through the context's port (or are held in the emulated
network), rejections are counted by the context, applied steps trigger the
broker's evaluation and checkpoint cadences (``ctx.after_update``). What
stays here is what only a real run has: the start barrier, the peers'
states, emulation of replies, zero-copy reply views.
Each UPDATE is validated and decoded by the engine before it touches the
model; a bad one is rejected and counted, and the worker is re-admitted so
that no round waits on it (see ``zsgd.engine.server_engine`` for the rules
on non-finite losses and gradients).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Iterable

import numpy as np

from zsgd.algorithms import algorithm_class, make_server_algorithm
from zsgd.algorithms.step_log import StepFollower, StepLeader
from zsgd.engine import ServerEngine
from zsgd.runtime.emulation import SteadyMeans, loop_wait
from zsgd.runtime.server.context import ServiceContext
from zsgd.runtime.server.service import ServiceBase
from zsgd.wire import protocol
from zsgd.wire.membership import Peer
from zsgd.wire.protocol import Message



def engine_step_means(means: list[float]) -> dict[str, float]:
    """The summary's steady engine steps: ``engine_s_mean`` over all, and where only some steps applied a version (a
    round rule: the step that closes a round applies it and sends every reply, the others add an update to it)
    ``engine_close_s_mean`` (from the close's start to its replies' stamps, on average: the rest of the step is in
    each reply's hop down) and ``engine_gather_s_mean`` apart. A twin takes the gather step as its server's step and
    puts the close's extra on each reply's way (``zsgd.experiments.twin``): only the close holds a round's replies,
    and charged the mean of all steps instead, sync at 0 ms ran 6-23 % fast (a close of cnn took 4.9 ms, the others 0.6)."""
    out = {"engine_s_mean": means[0]}
    if 0.0 < means[2] < 1.0:
        out |= {"engine_close_s_mean": means[1] / means[2], "engine_gather_s_mean": (means[0] - means[1]) / (1.0 - means[2])}
    return out

class ParameterServer(ServiceBase):
    """Holds the central weights and optimizer (in its engine); applies updates; replies with weights."""

    limits_factor = 2  # a gradient plus one more vector (or a sparse codec at full density) per message

    def __init__(self, ctx: ServiceContext, w0: np.ndarray, optimizer: Any, opts: Any, opt_state: dict | None = None,
                 one_range: bool = False, follower: bool = False) -> None:
        """``one_range``: this server holds one range of a model split over K servers (--servers K). Then the
        workers clip (no range sees the whole gradient's norm), and sync rounds admit a joiner into the round
        in progress (``SyncSGD.admit_into_open_round``: the K servers' rounds must agree). A rule that picks
        its gradients by arrival order (``step_log``: ksync, kasync) runs at the coordinator only, which logs
        its decisions (``leader``); a range server (``follower``) replays them (``zsgd.algorithms.step_log``)."""
        self.ctx = ctx
        self.opts = opts
        self.optimizer = optimizer
        if opt_state is not None:
            optimizer.load_state_arrays(opt_state)
        logged = one_range and algorithm_class(opts.algo).step_log
        if logged and follower:
            algo = StepFollower(w0, optimizer, give_up_s=2 * ctx.opts.network.timeout)
        else:
            algo = make_server_algorithm(opts.algo, w0, optimizer, staleness_lr=opts.staleness_lr,
                                         clip_norm=None if one_range else ctx.cfg.clip_norm)
        self.algo = algo
        self.leader = StepLeader() if logged and not follower else None
        self._log_next = 0  # a follower: the index of the next log entry it expects
        algo.version = ctx.ledger.updates
        if one_range and hasattr(algo, "admit_into_open_round"):
            algo.admit_into_open_round = True
        reply_codec = None
        if opts.compress_replies != "none":
            from zsgd.compression.delta import DeltaReplyEncoder

            reply_codec = DeltaReplyEncoder(opts.compress_replies, w0.size, seed=ctx.cfg.seed)
        self.engine = ServerEngine(algo, optimizer, ctx.ledger, self, run=ctx.run, lr_schedule=ctx.cfg.lr_schedule,
                                   reply_codec=reply_codec, leader=self.leader, default_batch=ctx.cfg.batch_size)
        self.engine.on_log = self.publish_log
        # The start barrier: ready workers wait here (no weights yet) until all the run's workers are
        # ready, or --start-wait seconds after the first (at _first_ready); then all start together.
        # None: started.
        self._waiting: set[int] | None = set() if opts.start_wait > 0 and ctx.opts.n_workers > 1 and not (logged and follower) else None
        self._first_ready = 0.0
        # Emulated runs: when the broker took each worker's latest update off its socket (before its emulated hold);
        # its reply carries it (protocol.REPLY_HOP), so the worker can log the hand-offs beyond the emulated delays.
        self._reached: dict[int, float] = {}
        # ... each one's wait for the loop after its hold (emulation.loop_wait), and the engine's latest steps and their
        # steady mean (the summary's engine_s_mean: a twin's --broker-time, the step as this run's broker took it).
        self._waited: dict[int, float] = {}
        self._steps: deque[tuple[float, float]] = deque(maxlen=64)
        self._step_means = SteadyMeans(3)  # each step; a step that applied a version, to its replies' stamps; how many did
        self._stamped: list | None = None  # within a step: [its start, its replies' stamps summed, how many]

    @property
    def on_gather(self) -> Any:
        return self.engine.on_gather

    @on_gather.setter
    def on_gather(self, fn: Any) -> None:
        self.engine.on_gather = fn

    def exchanged_size(self, n_params: int) -> int:
        return self.algo.w.size  # with --servers K, this server's range

    def share_replies(self) -> None:
        """Replies go out zero-copy as views of the live weights; the algorithm copies them away
        before an update only while a tracked send of that view is in flight (emulation parks
        messages before sending them, untracked, so it keeps copies)."""
        if hasattr(self.algo, "share_snapshots"):
            self.algo.share_snapshots = True
            self.algo.snapshot_busy = self.ctx.port.weights_in_flight

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
        return self.engine.current_lr

    def worker_joined(self, peer: Peer) -> None:
        self.engine.forget_replies(peer.worker)  # a (re)joining worker holds no weights yet: full ones first
        self._reached.pop(peer.worker, None)

    def worker_ready(self, peer: Peer) -> None:
        if self._waiting is None:
            self.engine.add_worker(peer.worker, self.ctx.elapsed())
            return
        if not self._waiting:
            self._first_ready = self.ctx.elapsed()
        self._waiting.add(peer.worker)
        if len(self._waiting) >= self.ctx.opts.n_workers:
            self._start()

    def worker_gone(self, peer: Peer, status: str) -> None:
        if self._waiting is not None:
            self.engine.forget_replies(peer.worker)
            self._waiting.discard(peer.worker)
            return
        self.engine.remove_worker(peer.worker, self.ctx.elapsed())

    def tick(self, now: float) -> None:
        t = self.ctx.elapsed()
        self.engine.tick(t)
        if self._waiting and t - self._first_ready > self.opts.start_wait:
            self._start()

    def _start(self) -> None:
        """Release the start barrier: every waiting worker gets the weights at once (a sync run's first
        round holds them all; an async run's throughput is measured with all of them from its first update)."""
        ctx, waiting = self.ctx, self._waiting or set()
        self._waiting = None
        t = ctx.elapsed()
        ctx.metrics.write("barrier", t, workers=len(waiting), expected=ctx.opts.n_workers, waited_s=round(t - self._first_ready, 3))
        for worker in sorted(waiting):
            if self.tally(worker) is not None:
                self.engine.add_worker(worker, ctx.elapsed())

    def deliver_held(self, direction: str, peer: Peer, msg: Any) -> None:
        """One emulated message arrives: an update from a worker, or a reply to it."""
        if direction == "in":
            # The hop ends where the broker took the update off its socket. Its wait after its emulated hold is stamped
            # apart (loop_wait): the part spent behind other updates' engine steps is the server's queue, which the
            # simulator models itself; the rest (the loop receiving and sending other messages, waking) it does not.
            emulator, start = self.ctx.port.emulator, time.monotonic()
            received, due = emulator.update_received.get(peer.worker), emulator.update_due.get(peer.worker)
            if received is not None:
                self._reached[peer.worker] = received
            if due is not None:
                self._waited[peer.worker] = loop_wait(due, start, self._steps)
            version, self._stamped = self.engine.version, [start, 0.0, 0]  # the step's start; its replies' stamps, summed
            self.on_update(peer, msg)
            end = time.monotonic()
            self._steps.append((start, end))
            # A step that applied (a round's close under sync, ksync, localsgd; any async step): until its replies'
            # stamps, after which their way down is each reply's hop (the rest of the step held it).
            closed, (_, stamps, replies) = self.engine.version != version, self._stamped
            self._stamped = None
            to_stamp = stamps / replies if replies else end - start
            self._step_means.add(end - start, to_stamp if closed else 0.0, float(closed))
        else:
            self._send(peer, msg)

    def checkpoint_state(self) -> tuple[np.ndarray, dict] | None:
        return self.algo.w, self.optimizer.state_arrays()

    def summary(self) -> dict[str, Any]:
        engine = self.engine.summary()
        steps = engine_step_means(self._step_means.steady()[0]) if self._step_means.count >= 10 else {}  # emulated runs
        return engine | {"dropped_updates": dict(self.engine.dropped + self.ctx.port.dropped)} | steps

    # -- updates -----------------------------------------------------------------------
    def on_update(self, peer: Peer, msg: Message) -> None:
        if peer.role != "worker" or peer.state != "ready":
            self.ctx.reject(peer.identity, "not-ready", "UPDATE before the worker was ready")
            return
        self.engine.receive(peer.worker, msg, self.ctx.elapsed())

    def follow_log(self, meta: dict) -> bool:
        """A follower: the coordinator's next log entries (``zsgd.algorithms.step_log``); False on a gap (lost entries)."""
        entries, first = meta.get("log"), meta.get("first")
        if not isinstance(entries, list) or first != self._log_next:
            return False
        self._log_next += len(entries)
        self.engine.follow(entries, self.ctx.elapsed())
        return True

    def publish_log(self) -> None:
        """The coordinator: send its rule's new decisions to the range servers (``ShardedParameterServer``)."""

    # -- the engine's port ---------------------------------------------------------------
    def tally(self, worker: int) -> Peer | None:
        peer = self.ctx.members.by_worker.get(worker)
        return peer if peer is not None and peer.state == "ready" else None

    def live_workers(self) -> Iterable[int]:
        return [p.worker for p in self.ctx.members.live_workers()]

    def reject(self, worker: int, reason: str, text: str) -> None:
        peer = self.ctx.members.by_worker.get(worker)
        self.ctx.reject(peer.identity if peer is not None else b"", reason, text)

    def booked(self, applied: Any) -> None:
        self.ctx.after_update()

    def send_weights(self, worker: int, version: int, weights: np.ndarray, coded: Message | None) -> None:
        ctx = self.ctx
        peer = ctx.members.by_worker[worker]
        msg = coded if coded is not None else protocol.weights_message(ctx.run, version, weights)
        port = ctx.port
        if not port.emulated:
            self._send(peer, msg)
            return
        emulator = port.emulator
        factor = emulator.slowdown(worker, ctx.elapsed())
        if factor != 1.0:
            msg.meta["slowdown"] = factor
        target = emulator.compute_target(worker, self.algo.local_steps)  # --inject-compute
        if target is not None:
            msg.meta["compute_target_s"] = target
        now = time.monotonic()
        delay = emulator.reply_delay(worker, protocol.message_nbytes(msg), now)
        if self._stamped is not None:
            self._stamped[1] += now - self._stamped[0]
            self._stamped[2] += 1
        reached = self._reached.pop(worker, None)
        if reached is not None:  # [the update's arrival, the reply's departure], both without the emulated link; its loop wait
            waited = self._waited.pop(worker, None)
            msg.meta[protocol.REPLY_HOP] = [reached, now + delay] + ([waited] if waited is not None else [])
        port.hold(("out", peer, msg), delay)

    def send_abandon(self, worker: int, version: int) -> None:
        """A WAIT ``abandon`` (no weights, so no reply slot or delta mirror is touched), over the emulated link like a reply."""
        ctx = self.ctx
        peer = ctx.members.by_worker[worker]
        msg = protocol.wait_message(ctx.run, worker, version, reason=protocol.ABANDON)
        port = ctx.port
        if not port.emulated:
            port.send(peer, msg)
        else:
            port.hold(("out", peer, msg), port.emulator.delay(worker, False, protocol.message_nbytes(msg)))

    def _send(self, peer: Peer, msg: Message) -> None:
        if not self.ctx.port.send(peer, msg):
            self.engine.forget_replies(peer.worker)  # it never got this delta: its mirror is wrong now

    def __repr__(self) -> str:
        return f"ParameterServer({self.opts.algo}, version={self.version}, t={time.monotonic():.0f})"
