"""Which training samples each worker sees, and in what order.

A shard is a function of ``(labels, split, seed, worker, n_workers)`` only, so
any process (a forked worker, a remote worker over SSH, the simulator, a
plotting script after the run) rebuilds exactly the same shard without any
index list being sent around. Randomness comes from ``SeedSequence([seed,
tag])`` with a fixed per-split tag, never from Python's salted ``hash()``.

Splits:

- ``iid``: a random permutation cut into equal contiguous slices; the usual
  baseline where every worker's data looks like the whole.
- ``shards``: contiguous blocks of the original order, no shuffling: the
  classic "one file per worker" setup of earlier MNIST experiments.
- ``dirichlet:ALPHA``: label skew; for each class, proportions drawn from
  Dirichlet(ALPHA) over workers. ALPHA=100 is close to iid, 0.5 is the common
  "moderately non-iid" setting, 0.1 leaves most workers with 1-2 classes.
  Every worker gets at least one sample.
- ``classes:K``: each worker holds exactly K classes, assigned round-robin
  (worker w gets classes wK .. wK+K-1, modulo the class count), so all classes
  are covered when K * n_workers >= n_classes; a class's samples are shared
  evenly by the workers that hold it.

Shards of one split are disjoint; for ``iid`` and ``shards`` (and
``dirichlet``) their union is the whole training set; for ``classes:K`` it is
all samples of the covered classes.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from zsgd.errors import ZsgdError

SPLIT_HELP = "iid, shards, dirichlet:ALPHA (ALPHA > 0, e.g. 0.5) or classes:K (K >= 1, e.g. 2)"


@dataclass(frozen=True)
class Split:
    """A parsed split specification; ``str(split)`` gives the canonical spec back."""

    kind: str
    alpha: float | None = None
    k: int | None = None

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "classes":
            return f"classes:{self.k}"
        return self.kind


def parse_split(spec: str | Split) -> Split:
    """Validate a split spec such as ``iid`` or ``dirichlet:0.5``; a bad one raises ``ZsgdError``."""
    if isinstance(spec, Split):
        return spec
    text = str(spec).strip().lower()
    kind, sep, arg = text.partition(":")
    if kind in ("iid", "shards") and not sep:
        return Split(kind)
    if kind == "dirichlet" and arg:
        try:
            alpha = float(arg)
        except ValueError:
            alpha = float("nan")
        if math.isfinite(alpha) and alpha > 0:
            return Split("dirichlet", alpha=alpha)
        raise ZsgdError(f"invalid split '{spec}': ALPHA in dirichlet:ALPHA must be a positive number, e.g. dirichlet:0.5")
    if kind == "classes" and arg:
        if arg.isascii() and arg.isdigit() and int(arg) >= 1:
            return Split("classes", k=int(arg))
        raise ZsgdError(f"invalid split '{spec}': K in classes:K must be a whole number >= 1, e.g. classes:2")
    raise ZsgdError(f"invalid split '{spec}': use {SPLIT_HELP}")


def _rng(seed: int, kind: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, zlib.crc32(kind.encode())]))


def _check(labels: np.ndarray, n_workers: int, worker: int | None = None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if n_workers < 1:
        raise ZsgdError(f"number of workers must be at least 1, got {n_workers}")
    if n_workers > len(labels):
        raise ZsgdError(f"cannot split {len(labels)} training samples across {n_workers} workers: use fewer workers")
    if worker is not None and not 0 <= worker < n_workers:
        raise ZsgdError(f"worker index {worker} is out of range for {n_workers} workers (0..{n_workers - 1})")
    return labels


def _dirichlet(labels: np.ndarray, alpha: float, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet(np.full(n, alpha))
        if not np.all(np.isfinite(p)):  # vanishing alpha can underflow: give the class to one worker
            p = np.eye(n)[rng.integers(n)]
        cuts = np.round(np.cumsum(p)[:-1] * len(members)).astype(np.int64)
        for w, piece in enumerate(np.split(members, cuts)):
            parts[w].append(piece)
    shards = [np.sort(np.concatenate(p)) for p in parts]
    # Guarantee every worker a sample: take one from the currently largest shard.
    for w in range(n):
        if len(shards[w]) == 0:
            donor = max(range(n), key=lambda i: (len(shards[i]), -i))
            shards[w] = shards[donor][-1:].copy()
            shards[donor] = shards[donor][:-1]
    return shards


def worker_classes(worker: int, k: int, n_classes: int) -> list[int]:
    """Class positions held by ``worker`` under ``classes:K`` (round-robin blocks of K)."""
    return sorted({(worker * k + j) % n_classes for j in range(k)})


def _classes(labels: np.ndarray, k: int, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    classes = np.unique(labels)
    if k > len(classes):
        raise ZsgdError(f"split classes:{k} asks for more classes than the data set has ({len(classes)}): lower K")
    held = [worker_classes(w, k, len(classes)) for w in range(n)]
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for pos, c in enumerate(classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        holders = [w for w in range(n) if pos in held[w]]
        if holders:
            for w, piece in zip(holders, np.array_split(members, len(holders))):
                parts[w].append(piece)
    shards = [np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts]
    for w, shard in enumerate(shards):
        if len(shard) == 0:
            raise ZsgdError(
                f"split classes:{k} leaves worker {w} of {n} with no samples (too few samples per class): "
                "use fewer workers or a larger K"
            )
    return shards


def make_shards(labels: np.ndarray, split: str | Split, seed: int, n_workers: int) -> list[np.ndarray]:
    """All workers' shards at once (the simulator's path; one pass instead of one per worker)."""
    parsed = parse_split(split)
    labels = _check(labels, n_workers)
    rng = _rng(seed, parsed.kind)
    if parsed.kind == "iid":
        order = rng.permutation(len(labels))
        shards = [np.sort(s) for s in np.array_split(order, n_workers)]
    elif parsed.kind == "shards":
        shards = np.array_split(np.arange(len(labels)), n_workers)
    elif parsed.kind == "dirichlet":
        assert parsed.alpha is not None
        shards = _dirichlet(labels, parsed.alpha, rng, n_workers)
    else:
        assert parsed.k is not None
        shards = _classes(labels, parsed.k, rng, n_workers)
    return [np.asarray(s, dtype=np.int64) for s in shards]


def make_shard(labels: np.ndarray, split: str | Split, seed: int, worker: int, n_workers: int) -> np.ndarray:
    """Sorted int64 indices into the training set for ``worker`` of ``n_workers``."""
    parsed = parse_split(split)
    labels = _check(labels, n_workers, worker)
    if parsed.kind == "shards":
        bounds = np.array_split(np.arange(len(labels)), n_workers)[worker]
        return np.asarray(bounds, dtype=np.int64)
    return make_shards(labels, parsed, seed, n_workers)[worker]


class BatchStream:
    """Endless mini-batches of indices from one shard, reshuffled every epoch.

    Every batch has exactly ``batch_size`` indices: the tail of one epoch is
    completed from the start of the next, so no sample is dropped and step
    counts stay simple. Epoch ``e`` is ordered by ``SeedSequence([seed, e])``,
    so the stream is reproducible; give each worker its own seed (for
    example ``seed * 1000 + worker``) or all workers walk their shards in
    lockstep order.

    ``epoch``: completed passes over the shard. ``samples_seen``: indices
    handed out so far.
    """

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int = 0) -> None:
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(self.indices) == 0:
            raise ZsgdError("cannot draw batches from an empty shard: use fewer workers or another split")
        if int(batch_size) < 1:
            raise ZsgdError(f"batch size must be at least 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        masked = self.seed & 0xFFFFFFFFFFFFFFFF  # SeedSequence([masked, epoch]) takes an int as its 32-bit words, low first
        self._seed_words = [masked & 0xFFFFFFFF] + ([masked >> 32] if masked >> 32 else [])
        self.epoch = 0
        self.samples_seen = 0
        self._order = self._epoch_order(0)
        self._pos = 0

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if len(self.indices) == 1:  # the one order of one sample (a permutation of 1 is [0]: no generator to seed)
            return self.indices.copy()
        # SeedSequence([seed, epoch]), given as the words it would make of them (the same generator, without its
        # conversion of Python ints: a fifth of the cost, paid once per pass over a shard -- per few samples when
        # 1,024 simulated workers share 10,000 samples).
        entropy = np.array(self._seed_words + [epoch], dtype=np.uint32) if 0 <= epoch <= 0xFFFFFFFF else \
            [self.seed & 0xFFFFFFFFFFFFFFFF, epoch]
        rng = np.random.default_rng(np.random.SeedSequence(entropy))
        return self.indices[rng.permutation(len(self.indices))]

    @property
    def epoch_fraction(self) -> float:
        """Passes over the shard so far, fractional (for logging and learning-rate schedules)."""
        return self.samples_seen / len(self.indices)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> np.ndarray:
        if len(self.indices) == 1:  # a one-sample shard (10,000 simulated workers on 10,000 samples): a pass per sample
            self.epoch += self.batch_size
            self.samples_seen += self.batch_size
            return np.full(self.batch_size, self.indices[0], dtype=np.int64)
        out = np.empty(self.batch_size, dtype=np.int64)
        filled = 0
        while filled < self.batch_size:
            take = min(self.batch_size - filled, len(self._order) - self._pos)
            out[filled : filled + take] = self._order[self._pos : self._pos + take]
            filled += take
            self._pos += take
            if self._pos == len(self._order):
                self.epoch += 1
                self._order = self._epoch_order(self.epoch)
                self._pos = 0
        self.samples_seen += self.batch_size
        return out

    def next_batch(self) -> np.ndarray:
        """The next batch of indices (same as ``next(stream)``)."""
        return next(self)
