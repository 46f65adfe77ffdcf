"""Per-coordinate staleness (AdaComp's rule): divide each coordinate's step by
the number of updates that touched *that coordinate* since the sender fetched.

With sparse updates (top-k, AdaComp) the scalar rule ``lr / staleness``
punishes every coordinate for updates that never touched it: a worker whose
gradient lands 16 versions late, but on coordinates nobody else changed in
between, is not stale at all there. ``--staleness-lr per-coordinate`` uses

    divisor_j = max(1, #{applied updates v in (base_version, current] touching j})

Dense updates (codec ``none``, QSGD) touch every coordinate, so with no
sparse codec in play the rule equals the scalar one.

Data structure, and its bound. Per coordinate, the versions of its last
``depth`` sparse touches (uint32, newest first: 4 * depth bytes per parameter,
19 MB at the default depth 4 for the 1.2M-parameter cnn); dense updates go
to one short sorted list of versions instead of n writes. Recording costs
O(k * depth) for k indices, a sparse query O(k * depth), a dense query
O(n * depth); nothing depends on the staleness itself, which matters in the
simulator with thousands of workers. The count is

* exact when the coordinate had fewer than ``depth`` sparse touches in the
  window (in particular, divisor 1 when nothing intervened), plus any number of
  dense ones (up to ``dense_history`` = 65,536 remembered);
* otherwise estimated from the coordinate's recent touch rate (``depth - 1``
  intervals between its stored touches), extrapolated over the rest of the
  window and clamped to the window. The estimate is exact for a
  coordinate touched by every update (the hot coordinates top-k keeps
  choosing), and never exceeds the scalar staleness.

Versions are stored modulo 2**32: exact for runs of fewer than 4.29e9
updates.

``CoordinateStalenessMixin`` puts the rule in front of any server that calls
``self.apply(update.grad, staleness)`` from ``on_update`` (AsyncSGD, SSP).
The sparse indices travel in ``update.meta["indices"]`` (the broker sets it
from ``zsgd.compression.touched_indices``; absent or None means dense).
The divisor scales the gradient, which equals scaling the step for plain
SGD; with momentum or Adam it scales what enters the optimizer's state.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from zsgd.jit import always_inline  # before any @njit: LLVM options, cache keys (see zsgd.jit)

from zsgd.algorithms.asynchronous import AsyncSGD
from zsgd.algorithms.base import Output, ServerAlgorithm, Update
from zsgd.algorithms.ssp import StaleSynchronousSGD

_WRAP = 1 << 32


@njit(cache=True)
def _count_one(hist, i, cur, window, depth):  # pragma: no cover - jitted
    always_inline()
    c = 0
    age = np.uint32(0)
    for d in range(depth):
        age = np.uint32(cur - hist[i, d])  # modular age
        if np.int64(age) < window:
            c += 1
        else:
            return np.float64(c)
    # Saturated: `depth` touches within the last age+1 versions. Extrapolate their rate,
    # (depth-1) intervals over `age` versions, over the older part of the window.
    span = np.float64(age) + 1.0
    rate = (depth - 1) / np.float64(age) if depth > 1 else 1.0 / span
    est = depth + rate * (np.float64(window) - span)
    return min(est, np.float64(window))


@njit(cache=True)
def _count_sparse(hist, indices, cur, window, dense, out):  # pragma: no cover - jitted
    depth = hist.shape[1]
    for j in range(indices.size):
        c = _count_one(hist, np.int64(indices[j]), cur, window, depth) + dense
        out[j] = max(1.0, min(c, np.float64(window)))


@njit(cache=True)
def _count_all(hist, cur, window, dense, out):  # pragma: no cover - jitted
    depth = hist.shape[1]
    for i in range(hist.shape[0]):
        c = _count_one(hist, i, cur, window, depth) + dense
        out[i] = max(1.0, min(c, np.float64(window)))


@njit(cache=True)
def _record(hist, indices, version):  # pragma: no cover - jitted
    depth = hist.shape[1]
    for j in range(indices.size):
        i = np.int64(indices[j])
        for d in range(depth - 1, 0, -1):
            hist[i, d] = hist[i, d - 1]
        hist[i, 0] = version


class CoordinateStaleness:
    """Counts, per coordinate, the updates applied since a given version (see module doc)."""

    def __init__(self, n_params: int, depth: int = 4, dense_history: int = 65536) -> None:
        if n_params < 1 or depth < 1 or dense_history < 1:
            raise ValueError("n_params, depth and dense_history must be >= 1")
        self.n_params = int(n_params)
        self.depth = int(depth)
        self.dense_history = int(dense_history)
        self._hist = np.zeros((self.n_params, self.depth), np.uint32)  # 0 = never (versions start at 1)
        self._dense = np.empty(0, np.int64)
        self.last_version = 0

    def _window(self, base_version: int, current_version: int) -> tuple[int, int]:
        if not 0 <= base_version <= current_version:
            raise ValueError(f"need 0 <= base_version <= current_version, got {base_version}, {current_version}")
        if current_version > self.last_version:
            raise ValueError(f"version {current_version} is ahead of the last recorded {self.last_version}")
        window = min(current_version - base_version, _WRAP - 1)
        lo = np.searchsorted(self._dense, base_version, side="right")
        return window, len(self._dense) - int(lo)

    def _indices(self, indices: np.ndarray) -> np.ndarray:
        """Bounds-check once in numpy (O(k)): the kernels index without checks."""
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self.n_params):
            raise ValueError(f"indices outside [0, {self.n_params})")
        return idx

    def scale(self, indices: np.ndarray | None, base_version: int, current_version: int) -> np.ndarray:
        """float32 divisors (>= 1) for ``indices`` (or all n coordinates when None).

        Counts updates recorded with versions in (base_version, current_version];
        ``current_version`` is the model version the update is about to be applied to.
        """
        window, dense = self._window(int(base_version), int(current_version))
        cur = current_version % _WRAP
        if indices is None:
            out = np.empty(self.n_params, np.float32)
            _count_all(self._hist, cur, window, dense, out)
        else:
            idx = self._indices(indices)
            out = np.empty(idx.size, np.float32)
            _count_sparse(self._hist, idx, cur, window, dense, out)
        return out

    def record(self, indices: np.ndarray | None, version: int) -> None:
        """The update that produced model ``version`` touched ``indices`` (None = all)."""
        version = int(version)
        if version <= self.last_version:
            raise ValueError(f"versions must increase: {version} after {self.last_version}")
        self.last_version = version
        if indices is None:
            keep = self._dense[-(self.dense_history - 1):] if self.dense_history > 1 else self._dense[:0]
            self._dense = np.append(keep, version)
        else:
            _record(self._hist, self._indices(indices), np.uint32(version % _WRAP))


class CoordinateStalenessMixin:
    """Per-coordinate step divisors for a server that applies one update at a time.

    Mix in before the server class: ``class X(CoordinateStalenessMixin, AsyncSGD)``.
    Overrides ``apply`` only, and only for the update being handled in
    ``on_update``, so the server's own rules (membership, version checks,
    SSP's clocks, replies) run unchanged.
    """

    tracker: CoordinateStaleness

    def __init__(self, *args, staleness_depth: int = 4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        assert isinstance(self, ServerAlgorithm)
        self.tracker = CoordinateStaleness(self.w.size, depth=staleness_depth)
        self._handling: Update | None = None

    def on_update(self, update: Update, now: float) -> list[Output]:
        self._handling = update
        try:
            return super().on_update(update, now)  # type: ignore[misc]
        finally:
            self._handling = None

    def apply(self, grad: np.ndarray, staleness: int) -> float | None:
        update = self._handling
        if update is None:
            return super().apply(grad, staleness)  # type: ignore[misc]
        indices = update.meta.get("indices")
        div = self.tracker.scale(indices, update.base_version, self.version)  # type: ignore[attr-defined]
        g = np.array(grad, dtype=np.float32, copy=True)
        if indices is None:
            g /= div
        else:
            g[np.asarray(indices)] /= div
        saved, self.staleness_lr = self.staleness_lr, False  # type: ignore[attr-defined]
        try:
            lr = super().apply(g, 0)  # type: ignore[misc]
        finally:
            self.staleness_lr = saved  # type: ignore[attr-defined]
        if lr is not None:
            self.tracker.record(indices, self.version)  # type: ignore[attr-defined]
        return lr


class CoordinateStalenessAsyncSGD(CoordinateStalenessMixin, AsyncSGD):
    """Async SGD with AdaComp's per-coordinate staleness rule (``--staleness-lr per-coordinate``)."""

    name = "async"


class CoordinateStalenessSSP(CoordinateStalenessMixin, StaleSynchronousSGD):
    """SSP (``ssp:S``) with the per-coordinate rule instead of ``lr / staleness``."""

    name = "ssp"
