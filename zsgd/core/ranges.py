"""How ``--servers K`` splits the flat parameter vector.

Every model is one flat float32 vector whose layers are contiguous views
(ARCHITECTURE.md), so sharding the parameter server is cutting that vector
into K contiguous ranges. Equal lengths are equal bytes: each server then
carries the same share of the traffic and of the optimizer's work, which is
what makes K servers worth K cores and K links.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from zsgd.errors import ZsgdError

Range = tuple[int, int]
#: The most servers a run or simulation may split a model over: far beyond any cluster's parameter servers, and
#: it keeps a typo (--servers 100000) from passing silently into a simulation with more servers than sense.
MAX_SERVERS = 1024


def split_ranges(n_params: int, k: int) -> list[Range]:
    """K contiguous ``[lo, hi)`` ranges covering ``0..n_params``, lengths differing by at most one."""
    check_servers(k, n_params)
    edges = [i * n_params // k for i in range(k + 1)]
    return [(edges[i], edges[i + 1]) for i in range(k)]


def check_servers(k: int, n_params: int | None = None) -> None:
    """``--servers K`` is a whole number from 1 to ``MAX_SERVERS`` and to the model's parameter count (one line,
    exit 2, otherwise)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ZsgdError(f"--servers must be a whole number >= 1, got {str(k)[:40]}")
    if k > MAX_SERVERS:
        raise ZsgdError(f"--servers {k:,} is more servers than zsgd splits a model over (at most {MAX_SERVERS:,})")
    if n_params is not None and k > n_params:
        raise ZsgdError(f"--servers {k} is more servers than the model has parameters ({n_params:,}); use at most {n_params:,}")


def slice_state(state: Mapping[str, np.ndarray] | None, n_params: int, lo: int, hi: int) -> dict[str, np.ndarray] | None:
    """One range of an optimizer's state arrays: per-coordinate vectors are cut, scalars (the step count) kept."""
    if state is None:
        return None
    return {k: (np.ascontiguousarray(v[lo:hi]) if np.ndim(v) == 1 and len(v) == n_params else np.array(v)) for k, v in state.items()}


def join_state(parts: list[Mapping[str, np.ndarray]], n_params: int) -> dict[str, np.ndarray]:
    """The inverse of ``slice_state`` over all ranges, in range order (scalars from the first range)."""
    first = parts[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        out[key] = np.concatenate([np.asarray(p[key]) for p in parts]) if np.ndim(value) == 1 else np.array(value)
    for key, value in out.items():
        if np.ndim(value) == 1 and len(value) != n_params:
            raise ZsgdError(f"optimizer state {key!r} joins to {len(value)} values, not {n_params}")
    return out
