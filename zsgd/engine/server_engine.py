"""The server engine: what a central server does with an update, written once for every driver.

A server algorithm (``zsgd.algorithms``) answers an update with outputs --
replies, applied steps, drops, cancels, notices. Turning those into effects
is the same work wherever the algorithm runs: set the step size from the
``--lr-schedule``, decode and check what a worker sent, encode the replies
(``--compress-replies`` deltas and their byte counts), book applied steps
into the ledger and the workers' tallies, reject a bad gradient and
re-admit its sender. Before this engine the broker, the simulator, the
trainer and the simulator's calibration each wrote that dispatch, and they
had drifted: a non-finite gradient was a rejected message at the broker and
a divergence in the simulator; train losses entered the ledger when applied
at the broker and when they arrived in the simulator. Now there is one
dispatch, and the simulator's measured per-update server time
(``zsgd.simulation.calibrate``) is the time of this very code.

The engine does no I/O and keeps no clock: each call carries the time, and
what must leave the process goes through a ``ServerPort`` -- the broker's
sends a ZeroMQ message (or holds it in the emulated network), the
simulator's schedules an arrival in virtual time, the trainer's hands the
weights to the next step.

The rules that used to differ, as they are now everywhere:

* a worker's own report that its loss is not finite ends the run as
  diverged (the runtime's worker says so in the UPDATE's ``non_finite``; the
  simulator's worker step reports the loss itself) -- once the driver's own
  check of its model agrees, where it has one (``RunLedger.suspect``: the
  broker evaluates its model; a report it does not confirm is a rejected
  message, and its sender gets fresh weights);
* a non-finite *gradient* with a finite loss is a bad message: rejected and
  counted, its sender re-admitted, the run goes on (a hostile peer cannot end
  a run by sending NaN); a step whose *average* is not finite diverges;
* a worker's loss enters the ledger when its gradient is applied (for a
  round, when the round's step is), and the per-worker tallies count applied
  steps.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable, Iterable, Protocol

import numpy as np

from zsgd.algorithms import Applied, Cancel, Dropped, Notice, Reply, Update
from zsgd.algorithms.step_log import Gather, StepFollower
from zsgd.core.ledger import RunLedger
from zsgd.core.schedule import lr_factor
from zsgd.core.tally import WorkerTally
from zsgd.errors import ProtocolError
from zsgd.wire import protocol
from zsgd.wire.protocol import Message


class ServerPort(Protocol):
    """What the engine asks of the driver that runs it (the broker, the simulator, the trainer, a calibration)."""

    def tally(self, worker: int) -> WorkerTally | None:
        """The counters of ``worker`` if it is a ready member now (None: gone, or not yet ready)."""

    def live_workers(self) -> Iterable[int]:
        """Every ready worker (a sync round's contributors)."""

    def send_weights(self, worker: int, version: int, weights: np.ndarray, coded: Message | None) -> None:
        """Send ``worker`` the weights of ``version``: as they are, or as the coded delta ``coded`` (--compress-replies)."""

    def send_abandon(self, worker: int, version: int) -> None:
        """Tell ``worker`` its step at a version older than ``version`` is no longer wanted (K-sync's backup workers)."""

    def reject(self, worker: int, reason: str, text: str) -> None:
        """``worker`` sent a bad update: count it as a rejected message."""

    def booked(self, applied: Applied) -> None:
        """An applied step is in the ledger: evaluation and checkpoint cadences, progress views."""


class ServerEngine:
    """Drives one server algorithm for one driver; see the module docstring."""

    def __init__(self, algo: Any, optimizer: Any, ledger: RunLedger, port: ServerPort, *, run: str, lr_schedule: str = "constant",
                 reply_codec: Any = None, leader: Any = None, default_batch: int = 1) -> None:
        self.algo, self.optimizer, self.ledger, self.port = algo, optimizer, ledger, port
        self.run, self.lr_schedule, self.reply_codec, self.leader = run, lr_schedule, reply_codec, leader
        self.default_batch = default_batch
        self.n = int(algo.w.size)
        self.on_gather: Callable[[Any, bool], None] | None = None  # a follower's answer to a gather its log reached
        self.on_log: Callable[[], None] | None = None  # the coordinator: send its rule's new decisions (step_log)
        self.dropped: Counter = Counter()
        self.update_bytes = self.dense_update_bytes = 0  # accepted updates as sent, and uncompressed
        self.reply_bytes = self.dense_reply_bytes = 0  # weight replies as sent, and as full weights (counted with a codec)
        self.last_update_bytes = 4 * self.n

    # -- what drivers read ---------------------------------------------------------
    @property
    def version(self) -> int:
        return self.algo.version

    @property
    def weights(self) -> np.ndarray:
        return self.algo.w

    @property
    def current_lr(self) -> float:
        """The step size now, after --lr-schedule."""
        return self.optimizer.lr * getattr(self.algo, "lr_scale", 1.0)

    # -- membership ------------------------------------------------------------------
    def add_worker(self, worker: int, now: float) -> None:
        self.dispatch(self.algo.add_worker(worker, now), now)

    def remove_worker(self, worker: int, now: float) -> None:
        self.forget_replies(worker)  # whatever it held, it holds nothing now
        self.dispatch(self.algo.remove_worker(worker, now), now)

    def readmit(self, worker: int, now: float) -> None:
        """After a bad update: fresh weights for its sender, and no round waits on it."""
        self.dispatch(self.algo.remove_worker(worker, now), now)
        self.dispatch(self.algo.add_worker(worker, now), now)

    def forget_replies(self, worker: int) -> None:
        """``worker`` holds no weights from us (it (re)joined, or a delta never reached it): full weights next."""
        if self.reply_codec is not None:
            self.reply_codec.forget(worker)

    # -- updates ---------------------------------------------------------------------
    def receive(self, worker: int, msg: Message, now: float) -> None:
        """An UPDATE from ready worker ``worker``, as it came off the wire (shared memory already read)."""
        if msg.meta.get("non_finite") is True and msg.worker == worker:
            # The worker's report that its loss blew up: the run diverged if the driver's own check agrees.
            self.ledger.loss(math.nan, worker)
            if not self.ledger.diverged:
                self.port.reject(worker, "unconfirmed-divergence",
                                 f"worker {worker} reported a non-finite loss, but the server's own model is sound")
                self.readmit(worker, now)
            return
        loss = msg.meta.get("loss")
        loss = float(loss) if isinstance(loss, (int, float)) and not isinstance(loss, bool) else math.nan
        try:
            # Finiteness is checked once, inside the fused server step (the algorithm drops such an update).
            protocol.validate_update(msg, run=self.run, known_workers={worker}, n_params=self.n, require_finite=False)
            grad = msg.arrays.get("g")
            meta: dict[str, Any] = {"kind": str(msg.meta.get("kind", "grad"))}
            if msg.codec != "none":
                from zsgd.compression import decode, touched_indices

                grad = decode(msg.codec, msg.arrays, self.n)
                meta["indices"] = touched_indices(msg.codec, msg.arrays)
        except ProtocolError as exc:
            self.port.reject(worker, exc.reason, str(exc))
            self.readmit(worker, now)
            return
        seq = msg.meta.get("seq")  # a sharded worker's number for this gradient, the same on every range
        if isinstance(seq, int) and not isinstance(seq, bool):
            meta["seq"] = seq
        n = msg.meta.get("n_samples")
        compute_s = msg.meta.get("compute_s")
        if isinstance(compute_s, (int, float)) and 0 <= compute_s < 3600:
            tally = self.port.tally(worker)
            if tally is not None:
                tally.compute_s_sum += float(compute_s)
        self.apply(Update(worker, msg.version, grad, int(n) if n is not None else self.default_batch, loss, meta), now,
                   protocol.message_nbytes(msg))

    def apply(self, update: Update, now: float, nbytes: int) -> None:
        """A decoded update (``nbytes`` on the wire) reaches the algorithm; its outputs are dispatched."""
        self.update_bytes += nbytes
        self.dense_update_bytes += 4 * self.n
        self.last_update_bytes = nbytes
        tally = self.port.tally(update.worker)
        if tally is not None:
            tally.last_loss, tally.last_samples = update.loss, update.n_samples
        self.algo.lr_scale = 1.0 if self.lr_schedule == "constant" else lr_factor(self.lr_schedule, self.ledger.progress(now))
        outputs = self.algo.on_update(update, now)
        if self.leader is not None:
            self.leader.update(update, outputs)
        self.dispatch(outputs, now)

    def follow(self, entries: list, now: float) -> None:
        """A range server: replay the coordinator's logged decisions (``zsgd.algorithms.step_log``)."""
        self.dispatch(self.algo.follow(entries, now), now)

    def tick(self, now: float) -> None:
        if isinstance(self.algo, StepFollower):
            self.dispatch(self.algo.tick(now), now)  # a step waiting for a gradient that will not come gives up

    # -- outputs -----------------------------------------------------------------------
    def dispatch(self, outputs: list, now: float) -> None:
        """Every output of the algorithm becomes its effect: the one dispatch of every driver."""
        if self.leader is not None:
            self.leader.outputs(outputs)
        for out in outputs:
            if isinstance(out, Reply):
                if out.weights is not None and self.port.tally(out.worker) is not None:
                    self._reply(out.worker, out.version, out.weights)
            elif isinstance(out, Applied):
                self._book(out, now)
            elif isinstance(out, Dropped) and out.reason == "non-finite":
                self._non_finite(out, outputs, now)
            elif isinstance(out, Dropped):
                self.dropped[out.reason] += 1
            elif isinstance(out, Notice):
                self.ledger.emit(out.kind, now, **out.fields)
            elif isinstance(out, Cancel):
                if self.port.tally(out.worker) is not None:
                    self.port.send_abandon(out.worker, out.version)
            elif isinstance(out, Gather):
                if self.on_gather is not None:
                    self.on_gather(out.tag, out.full)
        if self.leader is not None and self.leader.entries and self.on_log is not None:
            self.on_log()

    def _non_finite(self, out: Dropped, outputs: list, now: float) -> None:
        """A NaN/Inf gradient with a finite loss is a bad message (rejected, counted, the run goes on);
        a step whose average is not finite means the run diverged."""
        if out.worker < 0 or self.port.tally(out.worker) is None:
            self.ledger.diverge("the averaged gradient is not finite")
            return
        self.port.reject(out.worker, "non-finite", f"worker {out.worker} sent a gradient holding NaN or Inf")
        if not any(isinstance(o, Reply) and o.worker == out.worker for o in outputs):
            self.readmit(out.worker, now)  # a round's rule (sync) does not answer it: fresh weights, and no round waits on it

    def _book(self, a: Applied, now: float) -> None:
        ledger = self.ledger
        tally = self.port.tally(a.worker) if a.worker >= 0 else None
        if tally is not None:
            tally.steps += 1
            tally.samples += a.n_samples
            tally.staleness_sum += a.staleness
            tally.staleness_max = max(tally.staleness_max, a.staleness)
            ledger.loss(tally.last_loss, a.worker)
        elif a.worker == -1:
            # A round's step: every live worker contributed (sync), or the ones the rule names (ksync, kasync).
            for w in a.workers or list(self.port.live_workers()):
                t = self.port.tally(w)
                if t is None:
                    continue
                t.steps += 1
                t.samples += t.last_samples
                t.last_samples = 0
                if math.isfinite(t.last_loss):  # NaN: joined mid-round, no gradient yet (updates are checked finite)
                    ledger.loss(t.last_loss, w)
        ledger.applied(now, version=a.version, n_samples=a.n_samples, worker=a.worker, staleness=a.staleness, lr=a.lr,
                       bytes=self.last_update_bytes * a.contributors)
        self.port.booked(a)

    def _reply(self, worker: int, version: int, weights: np.ndarray) -> None:
        """WEIGHTS for a worker: the full snapshot, or with --compress-replies a coded delta from what it holds."""
        codec = self.reply_codec
        if codec is None:
            self.port.send_weights(worker, version, weights, None)  # every reply dense: nothing to count on this hot path
            return
        dense = protocol.message_nbytes(protocol.weights_message(self.run, version, weights))
        self.dense_reply_bytes += dense
        arrays = codec.reply(worker, weights)
        if arrays is None:
            self.reply_bytes += dense
            self.port.send_weights(worker, version, weights, None)
            return
        msg = protocol.weights_delta_message(self.run, version, arrays, codec.name)
        self.reply_bytes += protocol.message_nbytes(msg)
        self.port.send_weights(worker, version, weights, msg)

    # -- the summary -------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The engine's keys in summary.json (a driver adds its own drops, e.g. the endpoint's)."""
        return {"dropped_updates": dict(self.dropped),
                "compression_ratio": self.dense_update_bytes / self.update_bytes if self.update_bytes else 1.0,
                "reply_compression_ratio": self.dense_reply_bytes / self.reply_bytes if self.reply_bytes else 1.0} | self.algo.report()
