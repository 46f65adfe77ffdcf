"""Seeded compute times per worker and step, the same in ``zsgd sim --compute`` and ``zsgd run --inject-compute``.

A worker's n-th step (counted from 0, per worker id, for the whole run: a
restarted worker goes on counting) takes ``draw(worker, n)`` seconds. The
draw comes from its own generator, seeded by the run seed, the worker and
the step, so it does not depend on the order in which workers ask: the
simulator draws when it sends a worker its weights, the broker of a real
run when it sends the same reply, and in a sync or K-sync run those orders
differ by a hair without changing a single draw. That is what makes a real
run and its simulated twin see the same delays.

Both drivers count a worker's steps the same way: one per reply that
carries weights to a live worker (a worker computes one step per reply).
``local_steps`` (local SGD's K, ``ServerAlgorithm.local_steps``) sums K
draws of the same generator: each of the K local steps takes a compute time;
with ``round:SPEC`` one draw is the whole round.

What "a step takes the drawn time" means differs only where it must: the
simulator's step is exactly the draw; a real worker cannot go faster than
its gradient, so its step is stretched to the draw, ``max(draw, real)``
(see ``zsgd.node``). With draws well above the real gradient time (the
studies inject 10s of ms on a model that computes in 1-2 ms) the two agree.
"""

from __future__ import annotations

import numpy as np

from zsgd.network import Delay
from zsgd.network.delays import Constant, PerRound

_TAG = 0xC0417E  # keeps these streams apart from every other seeded stream of a run


class ComputeDraw:
    """``draw(worker, step)`` -> seconds, from ``spec`` (a ``zsgd.network`` delay) and the run seed."""

    def __init__(self, spec: Delay, seed: int) -> None:
        self.spec = spec
        self.seed = int(seed) & 0xFFFFFFFF
        self._next: dict[int, int] = {}  # worker -> its next step (the drivers' counter)
        self._constant = isinstance(spec, Constant)
        self._per_round = isinstance(spec, PerRound)  # round:SPEC: one draw for a local-SGD round's K steps

    def draw(self, worker: int, step: int, local_steps: int = 1) -> float:
        """Seconds of ``worker``'s ``step``: the same for the same seed, whoever asks and in whatever order."""
        # A constant takes nothing from the generator: not seeding one (5 of the 7 us a draw costs) gives the same value.
        rng = None if self._constant else np.random.default_rng(self._entropy(int(worker), int(step)))
        if local_steps == 1 or self._per_round:
            return float(0 + self.spec.sample(rng))  # sum() of one draw: the same 0 + x, without the generator
        return float(sum(self.spec.sample(rng) for _ in range(max(1, int(local_steps)))))

    def _entropy(self, worker: int, step: int) -> np.ndarray | list[int]:
        """``[seed, tag, worker, step]`` as SeedSequence takes it: each int below 2**32 is one 32-bit word, so
        this array is the same seed without the conversion of four Python ints (a fifth of a draw's cost)."""
        if 0 <= worker <= 0xFFFFFFFF and 0 <= step <= 0xFFFFFFFF:
            return np.array((self.seed, _TAG, worker, step), dtype=np.uint32)
        return [self.seed, _TAG, worker, step]

    def next(self, worker: int, local_steps: int = 1) -> float:
        """The draw of ``worker``'s next step (counts it)."""
        step = self._next.get(worker, 0)
        self._next[worker] = step + 1
        return self.draw(worker, step, local_steps)

    def __str__(self) -> str:
        return str(self.spec)


__all__ = ["ComputeDraw"]
