"""Local SGD / model averaging (``--algo localsgd:K``), FedAvg-style.

Each worker takes K SGD steps on its own copy of the model, then sends its
model *delta* ``w_local - w_start`` with the number of samples it used; the
broker averages the deltas of a round weighted by samples and applies
``w += server_lr * avg_delta``. With K = 1 and plain SGD this is exactly
synchronous SGD; larger K trades gradient freshness for K times fewer
messages (McMahan et al. 2017; Lin et al. 2020, "Don't use large
mini-batches, use local SGD"). K = 4-16 is the usual range: beyond that the
workers' models drift apart on non-IID shards.

Server: ``LocalSGD`` *is* ``SyncSGD`` (same round logic: a round waits for
every worker that got its weights, a dead worker is removed by the driver
and the round completes without it, joiners wait for the next round, a
sample-weighted average); only what "apply" means differs, so it overrides
``apply`` and nothing else of the round. The server optimizer is not used:
the step size already happened on the workers (``server_lr`` 1.0 is plain
averaging). Optional server momentum (Hsu et al. 2019, "FedAvgM")::

    buf = server_momentum * buf + avg_delta;   w += server_lr * buf

``clip_norm`` is applied by the workers to each local gradient, not to the
delta (a clipped delta would shrink the K steps, not the outliers).

Worker: ``LocalSGDWorkerStep`` is a ``WorkerStep`` (same shard, batch stream
and dropout seeds, so a worker's batches are identical to those it would
draw under sync SGD) whose ``compute`` runs K local steps. The local
optimizer is plain SGD with the run's lr and weight decay by default: the
FedAvg analysis assumes it, K = 1 then matches sync SGD exactly, and a
momentum buffer kept on a worker would act on a model it no longer holds
after averaging. Pass ``local_optimizer`` (e.g. ``make_optimizer(...)``) to
use the run's optimizer locally instead; its state then persists across
rounds on that worker.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

import numpy as np

from zsgd.algorithms.base import Dropped, Output, Update
from zsgd.algorithms.synchronous import SyncSGD
from zsgd.algorithms.worker import WorkerStep
from zsgd.errors import ZsgdError

_SPEC_RE = re.compile(r"([0-9]{1,9})(?:,momentum=([0-9.eE+-]{1,32}))?", re.ASCII)
LOCALSGD_HELP = "localsgd:K (K >= 1 local steps per round), optionally localsgd:K,momentum=M"


def parse_localsgd(arg: str) -> dict[str, Any]:
    """The part after ``localsgd:`` -> ``{"k": K, "server_momentum": M}``; ZsgdError if bad."""
    m = _SPEC_RE.fullmatch(arg.strip())
    k = int(m.group(1)) if m else 0
    mom = 0.0
    if m and m.group(2) is not None:
        try:
            mom = float(m.group(2))
        except ValueError:
            mom = math.nan
    if k < 1 or not 0.0 <= mom < 1.0:
        raise ZsgdError(f"bad algorithm 'localsgd:{arg}': use {LOCALSGD_HELP}, e.g. localsgd:8")
    return {"k": k, "server_momentum": mom}


class LocalSGD(SyncSGD):
    """Synchronous rounds of averaged model deltas (server side of ``localsgd:K``)."""

    name = "localsgd"
    update_kind = "delta"
    central_schedule = False  # the workers step at a constant --lr
    worker_scaling = None  # each worker steps like one process

    @classmethod
    def steps_per_reply(cls, opts: dict) -> int:
        return int(opts.get("k", 1))

    def __init__(self, *args, k: int = 1, server_lr: float = 1.0, server_momentum: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if k < 1 or not server_lr > 0 or not 0.0 <= server_momentum < 1.0:
            raise ValueError("LocalSGD needs k >= 1, server_lr > 0, 0 <= server_momentum < 1")
        self.k = self.local_steps = int(k)
        self.server_lr = float(server_lr)
        self.server_momentum = float(server_momentum)
        self._buf = np.zeros_like(self.w) if self.server_momentum else None

    def on_update(self, update: Update, now: float) -> list[Output]:
        if update.meta.get("kind", "delta") != "delta":
            # A gradient is not a delta (a worker running the wrong step): let SyncSGD
            # drop it as off-round, which also keeps the round from waiting for it.
            out = super().on_update(replace(update, base_version=-1), now)
            return [Dropped(o.worker, "not-a-delta") if isinstance(o, Dropped) and o.reason == "stale-round" else o
                    for o in out]
        return super().on_update(update, now)

    def apply(self, grad: np.ndarray, staleness: int) -> float:
        """``grad`` is the round's sample-weighted mean delta: add it to the model."""
        delta = np.asarray(grad, dtype=np.float32)
        if self._buf is not None:
            self._buf *= np.float32(self.server_momentum)
            self._buf += delta
            delta = self._buf
        w = self.writable_weights()
        if self.server_lr == 1.0:
            w += delta
        else:
            w += np.float32(self.server_lr) * delta
        self.version += 1
        return self.server_lr

    def state(self) -> dict[str, Any]:
        return super().state() | {"k": self.k, "server_momentum": self.server_momentum}


class LocalSGDWorkerStep(WorkerStep):
    """``compute(weights, version)`` -> K local steps -> ``Update`` carrying the delta."""

    def __init__(self, model, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, worker: int, *,
                 k: int, lr: float, weight_decay: float = 0.0, local_optimizer=None,
                 clip_norm: float | None = None) -> None:
        super().__init__(model, x, y, batch_size, seed, worker)
        if k < 1:
            raise ValueError(f"local steps must be >= 1, got {k}")
        self.k = int(k)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.clip_norm = clip_norm
        self.local_optimizer = local_optimizer

    def _optimizer(self, n_params: int):
        if self.local_optimizer is None:
            from zsgd.nn.optim import SGD

            self.local_optimizer = SGD(n_params, self.lr, self.weight_decay)
        return self.local_optimizer

    def compute(self, weights: np.ndarray, version: int) -> Update:
        from zsgd.nn.optim import clip_grad_norm

        w = np.array(weights, dtype=np.float32, copy=True)
        opt = self._optimizer(w.size)
        samples, loss_sum = 0, 0.0
        for _ in range(self.k):
            step = super().compute(w, version)  # one batch, one gradient at the local weights
            grad = step.grad
            if self.clip_norm is not None:
                clip_grad_norm(grad, self.clip_norm)  # a fresh array from loss_and_grad: safe to scale
            opt.step(w, grad)
            samples += step.n_samples
            loss_sum += step.loss * step.n_samples
        np.subtract(w, weights, out=w)  # w now holds the delta
        loss = loss_sum / samples if samples else float("nan")
        return Update(self.worker, version, w, samples, loss, meta={"kind": "delta", "local_steps": self.k})
