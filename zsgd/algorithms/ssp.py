"""Stale-synchronous parallel (SSP, Ho et al. 2013): async with a leash.

Updates apply as they arrive, as in async SGD, but a worker whose clock
(updates it has contributed) is more than ``bound`` ahead of the slowest
live worker is held: it gets no weights until the slowest catches up. The
bound caps staleness from fast workers; ``ssp:0`` moves workers in lock
step while still applying each gradient separately. A newcomer starts at
the slowest live clock so it neither blocks others nor races ahead.
"""

from __future__ import annotations

from zsgd.algorithms.base import Applied, Dropped, Output, ServerAlgorithm, Update


class StaleSynchronousSGD(ServerAlgorithm):
    name = "ssp"

    def __init__(self, *args, bound: int = 4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if bound < 0:
            raise ValueError("SSP bound must be >= 0")
        self.bound = bound
        self.clock: dict[int, int] = {}
        self.held: set[int] = set()

    def _min_clock(self) -> int:
        return min((self.clock[w] for w in self.live), default=0)

    def add_worker(self, worker: int, now: float) -> list[Output]:
        start = self._min_clock() if self.live - {worker} else 0
        self.live.add(worker)
        self.held.discard(worker)
        self.clock[worker] = start
        return [self.reply(worker)]

    def remove_worker(self, worker: int, now: float) -> list[Output]:
        self.live.discard(worker)
        self.held.discard(worker)
        self.clock.pop(worker, None)
        return self._release()

    def on_update(self, update: Update, now: float) -> list[Output]:
        w = update.worker
        if w not in self.live:
            return [Dropped(w, "not-a-member")]
        if update.base_version > self.version or update.base_version < 0 or w in self.held:
            return [Dropped(w, "bad-version")]
        staleness = self.version - update.base_version
        lr = self.apply(update.grad, staleness)
        if lr is None:  # NaN or Inf: rejected; its clock stays, and it gets the current weights
            return [Dropped(w, "non-finite"), self.reply(w)]
        self.clock[w] += 1
        out: list[Output] = [Applied(w, self.version, staleness, update.n_samples, lr)]
        if self.clock[w] - self._min_clock() > self.bound:
            self.held.add(w)
        else:
            out.append(self.reply(w))
        return out + self._release()

    def _release(self) -> list[Output]:
        floor = self._min_clock()
        freed = sorted(w for w in self.held if self.clock[w] - floor <= self.bound)
        self.held.difference_update(freed)
        return [self.reply(w) for w in freed]

    def state(self) -> dict:
        return super().state() | {"clock": dict(self.clock), "held": sorted(self.held)}
