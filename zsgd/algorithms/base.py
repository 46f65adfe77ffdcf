"""The sans-IO contract between training logic and its drivers.

A server algorithm is a plain object: the driver (the ZeroMQ broker, or the
simulator's event loop) tells it that a worker joined, left, or sent an
update, passing the current time; it answers with a list of outputs:
``Reply`` (send these weights, or "wait", to that worker), ``Applied``
(an update changed the central model: for metrics), ``Dropped`` (an
update was discarded, e.g. a sync gradient for a round that already ended),
``Cancel`` (a worker's step is no longer wanted: K-sync's backup workers) and
``Notice`` (something to log, e.g. K-sync's K shrinking).
No sockets, no clocks, no threads inside, which is why the runtime and the
simulator run exactly the same rules.

Replies carry a weights snapshot that nobody mutates afterwards, because the
runtime sends it zero-copy while the model keeps training. One snapshot per
model version is shared by every reply of that version. By default a
snapshot is a copy. A driver that can tell when its sends are done (the
broker, through ZeroMQ message trackers) sets ``share_snapshots`` and
``snapshot_busy`` instead: a snapshot is then a read-only view of the live
weights. The next update steps in place when nothing outside still holds
that view (reference counts say which buffer a pending send still holds:
ZeroMQ keeps a reference until its I/O thread is done), and otherwise
steps out of place into a pooled second buffer (``zsgd.nn.server_step``:
one fused pass that also checks the gradient is finite), which becomes the
live weights and the next reply's buffer. No snapshot is ever copied.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from zsgd.nn.server_step import add_scaled, is_finite


@dataclass(frozen=True)
class Reply:
    """Send to ``worker``: weights of ``version`` (``weights`` not None) or a wait."""

    worker: int
    version: int
    weights: np.ndarray | None


@dataclass(frozen=True)
class Applied:
    """One worker's update (or a round's average) changed the central model."""

    worker: int  # -1 for a synchronous round's average
    version: int  # model version after the update
    staleness: int  # central updates between the worker's weights and this one
    n_samples: int
    lr: float
    contributors: int = 1
    workers: tuple[int, ...] = ()  # a step of several gradients: who contributed (empty: every live worker, as in sync)


@dataclass(frozen=True)
class Dropped:
    worker: int
    reason: str


@dataclass(frozen=True)
class Cancel:
    """``worker``'s step at a version older than ``version`` is no longer wanted (K-sync's backup workers):
    a driver tells the worker, which may stop stretching it and send what it has (it will be dropped as late,
    and the reply brings the current weights). Advice only: a worker that finishes its step anyway is answered the same way."""

    worker: int
    version: int


@dataclass(frozen=True)
class Notice:
    """Something about the run a driver should log (an event ``kind`` with ``fields`` in metrics.jsonl),
    e.g. K-sync's K shrinking to the live workers. Changes nothing; a driver that does not know it may ignore it."""

    kind: str
    fields: dict[str, Any]


Output = Reply | Applied | Dropped | Cancel | Notice


@dataclass
class Update:
    """A worker's contribution: a gradient computed at weights of ``base_version``."""

    worker: int
    base_version: int
    grad: np.ndarray
    n_samples: int
    loss: float = float("nan")
    meta: dict[str, Any] = field(default_factory=dict)


class Optimizer(Protocol):
    lr: float

    def step(self, w: np.ndarray, g: np.ndarray, lr: float | None = None) -> None: ...


class ServerAlgorithm:
    """Holds the central weights and version; subclasses decide when to apply and reply."""

    name = "base"
    #: Works with --servers K (each range server runs its own copy of the rule over its range).
    shardable = True
    #: With --servers K the rule runs at the coordinator only, and the range servers replay its decisions
    #: (zsgd.algorithms.step_log): for rules that pick gradients by arrival order, which each server sees differently.
    step_log = False
    #: Gradient steps a worker takes per reply (local SGD: K): an injected compute time draws this many.
    local_steps = 1
    #: An update (one version) takes a round of every worker's gradients (sync, K-sync, local SGD), not one.
    round_based = False
    #: What a worker's update carries: a gradient, or (local SGD) the change of its model over its local steps.
    update_kind = "grad"
    #: --lr-schedule auto decays this rule's central optimizer (False: the workers step at a constant --lr).
    central_schedule = True
    #: How a learning rate and batch the user left alone follow N workers (zsgd.algorithms.scaling): "sqrt" (every
    #: stale batch applied on its own), "linear" (N batches averaged a step), or None (the values stay as given).
    worker_scaling: str | None = "sqrt"

    @classmethod
    def steps_per_reply(cls, opts: dict) -> int:
        """``local_steps`` of the rule ``opts`` (parse_algo's) would build, without building it."""
        return cls.local_steps

    def __init__(self, w0: np.ndarray, optimizer: Optimizer, staleness_lr: bool = False, clip_norm: float | None = None) -> None:
        self.w = np.array(w0, dtype=np.float32, copy=True)
        self.optimizer = optimizer
        self.staleness_lr = staleness_lr
        self.clip_norm = clip_norm
        self.version = 0
        self.lr_scale = 1.0  # set by the driver from --lr-schedule before each update
        self.share_snapshots = False  # set by a driver that sets snapshot_busy (see the module docstring)
        self.snapshot_busy: Callable[[], bool] | None = None
        self._shared = False  # a view of self.w has been handed out since the last write
        self._pool: list[np.ndarray] = []  # spare weight buffers for out-of-place steps
        self.live: set[int] = set()
        self._snapshot: tuple[int, np.ndarray] | None = None

    # -- driver API ---------------------------------------------------------
    def add_worker(self, worker: int, now: float) -> list[Output]:
        raise NotImplementedError

    def remove_worker(self, worker: int, now: float) -> list[Output]:
        raise NotImplementedError

    def on_update(self, update: Update, now: float) -> list[Output]:
        raise NotImplementedError

    # -- shared helpers -----------------------------------------------------
    def snapshot(self) -> np.ndarray:
        """Read-only weights of the current version: a copy, or with ``share_snapshots`` a view (copy-on-write)."""
        if self._snapshot is None or self._snapshot[0] != self.version:
            snap = self.w.view() if self.share_snapshots else self.w.copy()
            snap.flags.writeable = False
            self._snapshot = (self.version, snap)
        if self.share_snapshots:
            self._shared = True
        return self._snapshot[1]

    def writable_weights(self) -> np.ndarray:
        """``self.w``, safe to change in place: moved to a fresh buffer if a shared view may still be read."""
        if self._shared:
            busy = self.snapshot_busy() if self.snapshot_busy is not None else True
            if busy:
                self.w = self.w.copy()  # the old buffer stays with whoever still reads it
            self._shared = False
        return self.w

    def reply(self, worker: int) -> Reply:
        return Reply(worker, self.version, self.snapshot())

    def apply(self, grad: np.ndarray, staleness: int, lr: float | None = None) -> float | None:
        """One optimizer step on the central model; returns the lr used, or None when ``grad``
        holds NaN or Inf (then nothing changed: the caller drops the update).

        The step is one fused numba pass (``zsgd.nn.server_step``). In place
        when nobody may still be reading the live weights (after a separate
        finite check: an in-place pass cannot take back what it wrote); out of place into
        a second buffer, with the finite check and clipping inside the pass,
        when a reply of the live weights may still be in flight or
        ``clip_norm`` is set: the new buffer becomes the live weights and the
        next reply's buffer, so no snapshot copy is ever made. ``lr``: this step size, as given (a range server
        replaying its coordinator's step, ``zsgd.algorithms.step_log``), instead of the schedule's.
        """
        if lr is None:
            lr = self.optimizer.lr * self.lr_scale
            if self.staleness_lr and staleness > 0:
                lr = lr / staleness
        if not hasattr(self.optimizer, "step_into"):
            return self._apply_unfused(grad, lr)
        in_flight = False
        if self._shared:
            busy = self.snapshot_busy() if self.snapshot_busy is not None else True
            in_flight = busy and self._held_outside(self.w)
            self._shared = in_flight  # not in flight: the view may be overwritten in place
        if in_flight or self.clip_norm is not None:
            out = self._take_spare()
            if not self.optimizer.step_into(self.w, grad, out, lr, clip_norm=self.clip_norm):
                self._pool.append(out)
                return None
            old, self.w, self._shared = self.w, out, False
            self._snapshot = None  # it viewed the old buffer
            if len(self._pool) < self._POOL:
                self._pool.append(old)  # reused once nobody outside holds it any more
        else:
            if not is_finite(grad):
                return None
            self.optimizer.step(self.w, grad, lr)
        self.version += 1
        return lr

    _POOL = 3  # spare weight buffers kept for out-of-place steps

    def _held_outside(self, buf: np.ndarray) -> bool:
        """Whether anything besides this object still references the live ``buf`` or our view of it.

        ZeroMQ's zero-copy sends keep a Python reference to the buffer until
        the I/O thread is done with it, and numpy views hold their base, so
        reference counts tell exactly which buffer may still be read. The
        counts below are this object's own references (checked by
        tests/test_server_step.py, which fails if a Python version counts
        differently).
        """
        snap = self._snapshot[1] if self._snapshot is not None else None
        ours = snap is not None and snap.base is buf
        # self.w, the argument, getrefcount's argument (+ our cached view's base reference)
        if sys.getrefcount(buf) > 3 + ours:
            return True
        # self._snapshot's tuple, the local, getrefcount's argument
        return ours and sys.getrefcount(snap) > 3

    def _take_spare(self) -> np.ndarray:
        """A buffer for an out-of-place step: a pooled one nobody outside holds, else a new one."""
        pool = self._pool
        for i in range(len(pool)):
            if sys.getrefcount(pool[i]) <= 2:  # the pool's slot, getrefcount's argument
                return pool.pop(i)
        return np.empty_like(self.w)

    def _apply_unfused(self, grad: np.ndarray, lr: float) -> float | None:
        """The step for an optimizer without ``step_into``: check, clip a copy, step in place."""
        if not is_finite(grad):
            return None
        if self.clip_norm is not None:
            from zsgd.nn.optim import clip_grad_norm

            grad = np.array(grad, dtype=np.float32, copy=True)
            clip_grad_norm(grad, self.clip_norm)
        self.optimizer.step(self.writable_weights(), grad, lr)
        self.version += 1
        return lr

    def report(self) -> dict[str, Any]:
        """What the rule adds to ``summary.json`` (nothing by default)."""
        return {}

    def state(self) -> dict[str, Any]:
        """Counters for checkpoints and live views."""
        return {"version": self.version, "live": sorted(self.live)}


class SampleWeightedSum:
    """The gradients of one step, weighted by their samples (sync rounds, K-sync and K-async steps).

    The first gradient is kept as it is and never written (it may be a receive buffer): a step of one
    contributor applies it exactly, so a single-worker sync run reproduces the single-process trainer bit for
    bit. A second one turns it into a scaled copy, and every later one is added scaled in place."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._sum: np.ndarray | None = None
        self._first_n: int | None = None
        self.samples = 0

    @property
    def empty(self) -> bool:
        return self._sum is None

    def add(self, grad: np.ndarray, n_samples: int) -> None:
        if self._sum is None:
            self._sum, self._first_n = grad, n_samples
        else:
            if self._first_n is not None:
                self._sum = self._sum * np.float32(self._first_n)
                self._first_n = None
            add_scaled(self._sum, grad, np.float32(n_samples))
        self.samples += n_samples

    def mean(self) -> np.ndarray:
        """The sample-weighted mean (the first gradient itself when it is the only one)."""
        return self._sum if self._first_n is not None else self._sum / np.float32(self.samples)
