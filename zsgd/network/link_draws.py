"""Seeded latency draws per link, the same in ``zsgd sim`` and ``zsgd run --inject-latency``.

Each link (a worker's uplink or its downlink) draws its messages' delays
from its own generator, seeded by the run seed, the worker and the
direction. The n-th message on a link then gets the n-th draw of that
link, whatever the other links did meanwhile: a real emulated run and its
simulated twin (``zsgd sim --validate``, the fidelity matrix) see the same
latency for the same worker's same message, though their messages
interleave across workers in a slightly different order.

Why it matters: with one generator shared by all links, the twin's
latencies were a fresh sample of the same distribution, and a statistic
that a run's jitter sets (SSP's staleness, where the bound binds through
who drew a long latency) moved by about 5 % between runs of either side.
Common random numbers take that sampling noise out of the comparison, so
what is left is the model's own error. Compute draws do the same already
(``zsgd.network.compute_draw``, per worker and step).
"""

from __future__ import annotations

import numpy as np

_TAG = 0x11A7  # keeps these streams apart from every other seeded stream of a run


class LinkDraws:
    """``rng(worker, up)``: the generator of one link, made when the link first draws."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed) & 0xFFFFFFFF
        self._links: dict[tuple[int, bool], np.random.Generator] = {}

    def rng(self, worker: int, up: bool) -> np.random.Generator:
        """The generator of ``worker``'s uplink (``up``) or downlink: the same stream for the same seed in every driver."""
        key = (worker, up)
        rng = self._links.get(key)
        if rng is None:
            rng = self._links[key] = np.random.default_rng([self.seed, _TAG, int(worker), int(up)])
        return rng
