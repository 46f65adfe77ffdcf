"""Server update rules and the worker step, shared by ``zsgd run`` and ``zsgd sim``."""

from __future__ import annotations

import numpy as np

from zsgd.algorithms.asynchronous import AsyncSGD
from zsgd.algorithms.base import Applied, Dropped, Output, Reply, ServerAlgorithm, Update
from zsgd.algorithms.ssp import StaleSynchronousSGD
from zsgd.algorithms.synchronous import SyncSGD
from zsgd.errors import ZsgdError

ALGORITHMS = ("async", "sync", "ssp:S")


def parse_algo(spec: str) -> tuple[str, dict]:
    """``async`` | ``sync`` | ``ssp:S`` -> (name, options); ZsgdError names a bad spec."""
    name, _, arg = spec.strip().partition(":")
    if name in ("async", "sync") and not arg:
        return name, {}
    if name == "ssp":
        try:
            bound = int(arg)
        except ValueError:
            bound = -1
        if bound < 0:
            raise ZsgdError(f"bad algorithm {spec!r}: ssp needs a staleness bound, e.g. ssp:4")
        return "ssp", {"bound": bound}
    raise ZsgdError(f"unknown algorithm {spec!r}; choose one of {', '.join(ALGORITHMS)}")


def make_server_algorithm(spec: str, w0: np.ndarray, optimizer, staleness_lr: bool = False, clip_norm: float | None = None) -> ServerAlgorithm:
    name, opts = parse_algo(spec)
    cls = {"async": AsyncSGD, "sync": SyncSGD, "ssp": StaleSynchronousSGD}[name]
    return cls(w0, optimizer, staleness_lr=staleness_lr, clip_norm=clip_norm, **opts)


__all__ = [
    "Applied", "AsyncSGD", "Dropped", "Output", "Reply", "ServerAlgorithm", "StaleSynchronousSGD",
    "SyncSGD", "Update", "make_server_algorithm", "parse_algo",
]
