"""Asynchronous SGD (Downpour / Hogwild-style parameter server).

Each update is applied the moment it arrives and the sender gets the
current weights back, so nobody waits for anybody; the price is staleness:
a gradient computed at version v lands on version v + s. ``staleness_lr``
divides the step by s (Zhang et al., "Staleness-aware async-SGD"), which
keeps large worker counts stable.
"""

from __future__ import annotations

from zsgd.algorithms.base import Applied, Dropped, Output, ServerAlgorithm, Update


class AsyncSGD(ServerAlgorithm):
    name = "async"

    def add_worker(self, worker: int, now: float) -> list[Output]:
        self.live.add(worker)
        return [self.reply(worker)]

    def remove_worker(self, worker: int, now: float) -> list[Output]:
        self.live.discard(worker)
        return []

    def on_update(self, update: Update, now: float) -> list[Output]:
        if update.worker not in self.live:
            return [Dropped(update.worker, "not-a-member")]
        if update.base_version > self.version or update.base_version < 0:
            return [Dropped(update.worker, "bad-version"), self.reply(update.worker)]
        staleness = self.version - update.base_version
        lr = self.apply(update.grad, staleness)
        if lr is None:  # NaN or Inf: rejected, and the sender gets the current weights
            return [Dropped(update.worker, "non-finite"), self.reply(update.worker)]
        return [Applied(update.worker, self.version, staleness, update.n_samples, lr), self.reply(update.worker)]
