"""K-sync and K-async SGD: one central step from the first K gradients.

Both rules wait for K gradients, average them (weighted by sample counts,
as ``SyncSGD`` does) and take one step; they differ in which gradients
count (Dutta et al., AISTATS 2018, "Slow and Stale Gradients Can Win the
Race"):

* ``ksync:K`` -- K-sync SGD with N - K backup workers (Chen et al. 2016;
  TensorFlow's ``SyncReplicasOptimizer(replicas_to_aggregate=K)``). A round
  takes the first K gradients computed at the round's weights; the N - K
  others abandon their step. How, without breaking the one-reply-per-update
  exchange that shared memory, reply deltas and emulation rely on (the
  server never has two weights messages in flight to one worker): the step
  ends with ``Cancel`` for each of them; the driver tells the worker (a
  WAIT ``abandon``), which stops at once where it can (an injected compute
  time or straggler stretch; a real gradient runs to its end) and sends what
  it has; that late gradient is dropped and counted (``stale-round``) and
  the reply to it is the new weights. A gradient that was already on its
  way is answered the same way. Every applied gradient is fresh: staleness
  is 0.
* ``kasync:K`` -- K-async SGD. Gradients are taken whatever their
  staleness; the K-th one to arrive triggers the step, and the K senders
  get the new weights. The other workers keep computing on the weights
  they hold. The step's staleness is the mean of the K gradients'
  (rounded), which ``--staleness-lr scalar`` divides the step by.

``kasync:1`` is async SGD and ``ksync:N`` with N workers is sync SGD.

If fewer than K workers are alive, K shrinks to the live count (a round
never waits for a worker that does not exist) and grows back when they
return. A step that uses another K than the step before says so with a
``Notice`` (the drivers write it to ``metrics.jsonl`` as a ``k`` event), and
``report()`` (in ``summary.json``) gives the smallest K used and how many
steps used less than K.

A gradient of a worker that dies after sending it stays in the sum: it was
computed at valid weights. Only contributors wait for a reply, and K never
exceeds the live workers, so a step is always reachable: every live worker
is either computing (its gradient will come) or waiting in the sum.

With ``--servers K`` each range server would pick its own first K by arrival
order, and with orders that differ two servers could each wait for a gradient
whose sender waits on the other. So the rule runs at the coordinator alone
(``step_log = True``) and the range servers replay its decisions: the same
workers' gradients, summed in the same order, at every range
(``zsgd.algorithms.step_log``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zsgd.algorithms.base import Applied, Cancel, Dropped, Notice, Output, SampleWeightedSum, ServerAlgorithm, Update
from zsgd.errors import ZsgdError
from zsgd.nn.server_step import is_finite


def parse_k(name: str, arg: str) -> dict[str, int]:
    """The part after ``ksync:`` or ``kasync:`` -> ``{"k": K}``; ZsgdError if it is not a whole number >= 1."""
    text = arg.strip()
    k = int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else 0
    if k < 1:
        raise ZsgdError(f"bad algorithm '{name}:{arg}': {name} needs K >= 1 gradients per step, e.g. {name}:4")
    return {"k": k}


class FirstKSGD(ServerAlgorithm):
    """What both rules share: K, its shrinking with the live count, the sample-weighted sum of up to K gradients."""

    step_log = True  # with --servers K: decided at the coordinator, replayed by the range servers (module docstring)
    worker_scaling = None  # the step depends on K as much as on N: a study of K sets its own values

    def __init__(self, *args, k: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if k < 1:
            raise ValueError(f"K must be >= 1, got {k}")
        self.k = int(k)
        self._sum = SampleWeightedSum()
        self._from: list[int] = []  # contributors of the pending step, in arrival order
        self._stale: list[int] = []
        self._k_said = self.k  # the K last announced
        self.k_min = self.k
        self.short_steps = 0  # steps taken with fewer than K gradients (K shrunk)

    # -- K ----------------------------------------------------------------------------
    def k_now(self) -> int:
        """K, or the live count when fewer are alive (at least 1)."""
        return max(1, min(self.k, len(self.live)))

    def _k_notice(self, used: int) -> list[Output]:
        """A ``k`` notice when a step uses another K than the step before (it shrank, or grew back)."""
        if used == self._k_said:
            return []
        self._k_said = used
        return [Notice("k", {"k": used, "requested": self.k, "live": len(self.live)})]

    # -- the sum --------------------------------------------------------------------------
    def _take(self, update: Update, staleness: int) -> list[Output] | None:
        """Add the gradient to the pending sum; the outputs of a rejection instead (non-finite)."""
        grad = np.asarray(update.grad, dtype=np.float32)
        if not is_finite(grad):  # rejected; the sender gets the current weights and tries again
            return [Dropped(update.worker, "non-finite"), self.reply(update.worker)]
        self._sum.add(grad, update.n_samples)
        self._from.append(update.worker)
        self._stale.append(staleness)
        return None

    def _maybe_step(self, now: float) -> list[Output]:
        """The step, once K (as it is now) gradients are in: apply the mean, reply to the live contributors."""
        if not self._from or len(self._from) < self.k_now():
            return []
        contributors = tuple(self._from)
        out = self._k_notice(len(contributors))
        staleness = int(round(sum(self._stale) / len(self._stale)))
        grad = self._sum.mean()
        if len(contributors) < self.k:
            self.short_steps += 1
            self.k_min = min(self.k_min, len(contributors))
        lr = self.apply(grad, staleness)
        if lr is None:  # the mean overflowed: the run diverged
            out.append(Dropped(-1, "non-finite"))
        else:
            out.append(Applied(-1, self.version, staleness, self._sum.samples, lr, contributors=len(contributors), workers=contributors))
        self._sum.clear()
        self._from, self._stale = [], []
        return out + [self.reply(w) for w in contributors if w in self.live] + self._after_step(contributors)

    def _after_step(self, contributors: tuple[int, ...]) -> list[Output]:
        """What the other live workers are told when a step is taken (nothing: they keep computing)."""
        return []

    # -- driver API -------------------------------------------------------------------
    def add_worker(self, worker: int, now: float) -> list[Output]:
        """A (re)joining worker starts at once on the current weights; its gradient counts if it is among the first K."""
        self.live.add(worker)
        return [self.reply(worker)]

    def remove_worker(self, worker: int, now: float) -> list[Output]:
        self.live.discard(worker)
        return self._maybe_step(now)  # K may have shrunk to what is already in

    def _member(self, update: Update) -> list[Output] | None:
        """The checks both rules make first: a member, a version this server handed out, not already in the sum."""
        w = update.worker
        if w not in self.live:
            return [Dropped(w, "not-a-member")]
        if update.base_version > self.version or update.base_version < 0:
            return [Dropped(w, "bad-version"), self.reply(w)]
        if w in self._from:  # already in the pending step (a rejoined worker's second gradient): it waits for the step
            return [Dropped(w, "duplicate")]
        return None

    def report(self) -> dict[str, Any]:
        return {"k": self.k, "k_min": self.k_min, "short_steps": self.short_steps}

    def state(self) -> dict[str, Any]:
        return super().state() | {"k": self.k, "k_now": self.k_now(), "pending": list(self._from)}


class KSyncSGD(FirstKSGD):
    """``ksync:K``: each round steps on the first K gradients computed at its weights."""

    name = "ksync"
    round_based = True

    def _after_step(self, contributors: tuple[int, ...]) -> list[Output]:
        """The N - K others abandon their step: each is told (``Cancel``), sends what it has at once, and the
        reply to that late gradient brings the new weights."""
        return [Cancel(w, self.version) for w in sorted(self.live) if w not in contributors]

    def on_update(self, update: Update, now: float) -> list[Output]:
        rejected = self._member(update)
        if rejected is not None:
            return rejected
        if update.base_version != self.version:
            # Too late for its round: dropped and counted; the sender gets the current weights now.
            return [Dropped(update.worker, "stale-round"), self.reply(update.worker)]
        out = self._take(update, 0)
        return out if out is not None else self._maybe_step(now)


class KAsyncSGD(FirstKSGD):
    """``kasync:K``: a step from every K gradients that arrive, however stale."""

    name = "kasync"

    def on_update(self, update: Update, now: float) -> list[Output]:
        rejected = self._member(update)
        if rejected is not None:
            return rejected
        out = self._take(update, self.version - update.base_version)
        return out if out is not None else self._maybe_step(now)
