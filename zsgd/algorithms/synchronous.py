"""Synchronous SGD: one central step per round, gradients averaged.

A round waits for every worker that received its weights; a worker that
dies is removed by the driver (after the heartbeat timeout) and the round
completes without it, so nothing waits forever. Workers joining mid-round
wait and enter the next round. The average is weighted by sample counts, so
a round with one short batch is still an unbiased mean.
"""

from __future__ import annotations

import numpy as np

from zsgd.algorithms.base import Applied, Dropped, Output, SampleWeightedSum, ServerAlgorithm, Update
from zsgd.nn.server_step import is_finite


class SyncSGD(ServerAlgorithm):
    name = "sync"
    round_based = True
    worker_scaling = "linear"  # a step averages N batches: the linear scaling rule
    #: Admit a joiner into the round in progress (it computes at this round's weights, and the round waits for
    #: it) instead of holding it for the next round. Sharded servers (--servers K) set it: each server keeps
    #: its own rounds, and a joiner reaches them at different moments; held at one server but in another's
    #: round, it would wait for the first while the second waits for it, for ever. Admitted everywhere, it
    #: gets every server's weights at once, computes, and every round it is in completes.
    admit_into_open_round = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.expected: set[int] = set()  # workers computing for this round
        self.waiting: set[int] = set()  # joined, get weights at the next round
        self._sum = SampleWeightedSum()
        self._got: set[int] = set()

    def add_worker(self, worker: int, now: float) -> list[Output]:
        self.live.add(worker)
        self.expected.discard(worker)
        if not self.expected - self._got:
            # Nobody is computing: start a round with this worker (and any waiters) right away.
            return self._maybe_finish()
        if self.admit_into_open_round:
            self.waiting.discard(worker)
            self.expected.add(worker)  # computes at this round's weights; the round waits for it
            return [self.reply(worker)]
        self.waiting.add(worker)
        return []

    def remove_worker(self, worker: int, now: float) -> list[Output]:
        self.live.discard(worker)
        self.waiting.discard(worker)
        self.expected.discard(worker)
        # A departed worker's gradient already in the sum stays: it was
        # computed at this round's weights and is as valid as any other.
        return self._maybe_finish()

    def on_update(self, update: Update, now: float) -> list[Output]:
        w = update.worker
        if w not in self.live:
            return [Dropped(w, "not-a-member")]
        if w not in self.expected or update.base_version != self.version or w in self._got:
            # A gradient for a round it was not part of (it rejoined, or a duplicate): discard it.
            self.waiting.add(w)
            self.expected.discard(w)
            out: list[Output] = [Dropped(w, "stale-round")]
            return out + self._maybe_finish()
        grad = np.asarray(update.grad, dtype=np.float32)
        if not is_finite(grad):
            # Rejected: like a worker the driver re-admits, it leaves this round and waits for the next.
            self.expected.discard(w)
            self.waiting.add(w)
            return [Dropped(w, "non-finite")] + self._maybe_finish()
        self._sum.add(grad, update.n_samples)
        self._got.add(w)
        return self._maybe_finish()

    def _maybe_finish(self) -> list[Output]:
        if self.expected - self._got:
            return []  # someone is still computing
        out: list[Output] = []
        if not self._sum.empty and self._sum.samples > 0:
            lr = self.apply(self._sum.mean(), 0)
            if lr is None:  # the sum overflowed
                out.append(Dropped(-1, "non-finite"))
            else:
                out.append(Applied(-1, self.version, 0, self._sum.samples, lr, contributors=len(self._got)))
        return out + self._start_round()

    def _start_round(self) -> list[Output]:
        self._sum.clear()
        self._got = set()
        self.expected = set(self.live)
        self.waiting.clear()
        return [self.reply(w) for w in sorted(self.expected)]
