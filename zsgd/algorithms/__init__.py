"""Server update rules and the worker step, shared by ``zsgd run`` and ``zsgd sim``."""

from __future__ import annotations

import numpy as np

from zsgd.algorithms.asynchronous import AsyncSGD
from zsgd.algorithms.base import Applied, Cancel, Dropped, Notice, Output, Reply, ServerAlgorithm, Update
from zsgd.algorithms.kgroup import KAsyncSGD, KSyncSGD, parse_k
from zsgd.algorithms.localsgd import LocalSGD, LocalSGDWorkerStep, parse_localsgd
from zsgd.algorithms.ssp import StaleSynchronousSGD
from zsgd.algorithms.synchronous import SyncSGD
from zsgd.algorithms.worker import WorkerStep
from zsgd.errors import ZsgdError

ALGORITHMS = ("async", "sync", "ssp:S", "localsgd:K", "ksync:K", "kasync:K")
# Dispatched by the callers before parse_algo (zsgd.decentralized.rules.DECENTRALIZED, a layer above),
# named here so that a typo's message lists every algorithm --algo takes.
DECENTRALIZED_NAMES = ("dsgd", "dsgt", "cadmm")
STALENESS_LR = ("off", "scalar", "per-coordinate")


def parse_algo(spec: str) -> tuple[str, dict]:
    """``async`` | ``sync`` | ``ssp:S`` | ``localsgd:K`` | ``ksync:K`` | ``kasync:K`` -> (name, options); ZsgdError names a bad spec."""
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
    if name == "localsgd":
        return "localsgd", parse_localsgd(arg)
    if name in ("ksync", "kasync"):
        return name, parse_k(name, arg)
    raise ZsgdError(f"unknown algorithm {spec!r}; choose one of {', '.join(ALGORITHMS)}, "
                    f"or decentralized {', '.join(DECENTRALIZED_NAMES)}")


def parse_staleness_lr(mode: str | bool | None) -> str:
    """Normalise ``--staleness-lr``: a bare flag means "scalar" (lr / staleness)."""
    if mode in (None, False):
        return "off"
    if mode is True:
        return "scalar"
    if mode not in STALENESS_LR:
        raise ZsgdError(f"bad --staleness-lr {mode!r}; choose one of {', '.join(STALENESS_LR)}")
    return mode


SERVER_RULES: dict[str, type[ServerAlgorithm]] = {
    "async": AsyncSGD, "sync": SyncSGD, "ssp": StaleSynchronousSGD, "localsgd": LocalSGD, "ksync": KSyncSGD, "kasync": KAsyncSGD,
}


def algorithm_class(spec: str) -> type[ServerAlgorithm]:
    """The server rule's class for ``spec``: its capabilities (``shardable``, ...) without building it."""
    return SERVER_RULES[parse_algo(spec)[0]]


def local_steps_of(spec: str) -> int:
    """Gradient steps a worker takes per reply under ``spec`` (localsgd:K: K; the others 1), asked of the rule."""
    name, opts = parse_algo(spec)
    return SERVER_RULES[name].steps_per_reply(opts)


def gradients_per_update(spec: str, n_workers: int) -> int:
    """About how many gradients one update takes under ``spec`` with ``n_workers``, asked of the rule: one for the
    rules that apply each gradient (async, ssp, kasync), a round of every worker for the others (each worker's local
    steps counted), and a round of every node for the decentralized rules (one update is one round)."""
    name = spec.split(":", 1)[0]
    if name in DECENTRALIZED_NAMES:
        return n_workers
    return (n_workers if algorithm_class(spec).round_based else 1) * local_steps_of(spec)


def update_kind_of(spec: str) -> str:
    """What a worker's update carries under ``spec``: "grad", or "delta" (a model change), asked of the rule."""
    return algorithm_class(spec).update_kind


def check_servers_support(spec: str, servers: int) -> None:
    """ZsgdError when ``--servers`` > 1 and the rule cannot run split over range servers."""
    if servers > 1 and not algorithm_class(spec).shardable:
        name = parse_algo(spec)[0]
        raise ZsgdError(f"--algo {spec} cannot run with --servers {servers}: its rule cannot be split over range servers; "
                        f"use --servers 1 with {name}")


def make_server_algorithm(spec: str, w0: np.ndarray, optimizer, staleness_lr: str | bool = "off", clip_norm: float | None = None) -> ServerAlgorithm:
    name, opts = parse_algo(spec)
    mode = parse_staleness_lr(staleness_lr)
    if mode == "per-coordinate":
        from zsgd.algorithms.staleness import CoordinateStalenessAsyncSGD, CoordinateStalenessSSP

        if name not in ("async", "ssp"):
            raise ZsgdError(f"--staleness-lr per-coordinate needs --algo async or ssp:S, not {spec!r}")
        cls = {"async": CoordinateStalenessAsyncSGD, "ssp": CoordinateStalenessSSP}[name]
        return cls(w0, optimizer, clip_norm=clip_norm, **opts)
    return algorithm_class(spec)(w0, optimizer, staleness_lr=mode == "scalar", clip_norm=clip_norm, **opts)


def make_worker_step(spec: str, model, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, worker: int, *,
                     lr: float, weight_decay: float = 0.0, clip_norm: float | None = None) -> WorkerStep:
    """The worker's side of an algorithm: one gradient, or K local steps for local SGD."""
    name, opts = parse_algo(spec)
    if name == "localsgd":
        return LocalSGDWorkerStep(model, x, y, batch_size, seed, worker, k=opts["k"], lr=lr, weight_decay=weight_decay, clip_norm=clip_norm)
    return WorkerStep(model, x, y, batch_size, seed, worker)


__all__ = [
    "Applied", "AsyncSGD", "Cancel", "Dropped", "KAsyncSGD", "KSyncSGD", "LocalSGD", "Notice", "Output", "Reply", "ServerAlgorithm",
    "StaleSynchronousSGD", "SyncSGD", "Update", "WorkerStep", "algorithm_class", "check_servers_support", "gradients_per_update", "local_steps_of", "make_server_algorithm",
    "make_worker_step", "parse_algo", "parse_staleness_lr", "update_kind_of",
]
