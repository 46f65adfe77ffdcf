"""Hyper-parameters scaled to the number of workers, for the flags a user left alone.

The defaults (batch 64, lr 0.05, momentum 0.9) are tuned for one process.
Spread over N workers they stop being right, in two different ways: with
them, ``zsgd run --n-proc 4`` either averages into a quarter of the steps
(sync) or diverges (async). So ``zsgd run`` and ``zsgd broker`` adapt the
batch size and learning rate the user did not set, by flag or YAML, and say
so on the terminal and in ``config.yaml``:

* per-worker batch ``max(16, ceil(64 / N))``: the samples in one sync step,
  or in one async window of N updates, stay near the one-process batch as
  far as per-worker efficiency allows (below 16 the numba kernels lose
  their sgemm speed);
* **sync** averages N batches, so a step sees ``N * b`` samples and the
  learning rate follows the linear scaling rule (Goyal et al. 2017,
  "Accurate, large minibatch SGD"): ``lr * N * b / 64``;
* **async and ssp:S** apply every batch on its own, at weights ``N - 1``
  updates old. The rate per sample is kept (``lr * b / 64``) and divided by
  ``sqrt(N)``: delayed-gradient analyses bound the step by the delay (Lian et
  al. 2015), and momentum compounds with staleness ("asynchrony begets
  momentum", Mitliagkas et al. 2016). Measured, cnn on Fashion-MNIST, 4
  workers, 2 epochs (docs/benchmarks.md): lr/2 at momentum 0.9 gave
  88.7 %, the full rate 87.8 % (momentum 0.8), and lowering the momentum
  instead (0.6, the 1 - N * 0.1 rule) 87.6 %.

The momentum is left as given. Local SGD and the decentralized algorithms
step on each worker like one process does and keep every value, and so do
``ksync:K`` and ``kasync:K``, whose step size depends on K as much as on N
(a study of K sets its own values).
Which rule applies is the server rule's own answer (``worker_scaling``).
``zsgd sim`` applies the same rule to each arm (``zsgd.simulation.sweep.arm_config``),
so a simulation predicts the run of the same flags; ``zsgd sim --literal``
keeps every value, for sweeps that must vary one thing at a time.
Experiment files are always literal: the file is the record of what each
arm trains with.
"""

from __future__ import annotations

import math
from dataclasses import replace

from zsgd.core.config import TrainConfig

SCALED_FIELDS = ("batch_size", "lr")
MIN_BATCH = 16


def scale_for_workers(cfg: TrainConfig, algo: str, n_workers: int, free: set[str] | frozenset[str]) -> tuple[TrainConfig, str | None]:
    """``cfg`` with the ``free`` fields adapted to ``n_workers`` of ``algo``, and a line saying what changed (None: nothing)."""
    name = algo.partition(":")[0]
    mode = _worker_scaling(algo)
    if n_workers <= 1 or mode is None or not free:
        return cfg, None
    ref_batch = cfg.batch_size
    batch = max(MIN_BATCH, math.ceil(ref_batch / n_workers)) if "batch_size" in free else ref_batch
    changes: dict[str, float | int] = {}
    if batch != cfg.batch_size:
        changes["batch_size"] = batch
    if "lr" in free:
        if mode == "linear":
            changes["lr"] = round(cfg.lr * n_workers * batch / ref_batch, 8)
        else:
            changes["lr"] = round(cfg.lr * batch / ref_batch / math.sqrt(n_workers), 8)
    changes = {k: v for k, v in changes.items() if v != getattr(cfg, k)}
    if not changes:
        return cfg, None
    scaled = replace(cfg, **changes).validate()
    shown = {"batch_size": "batch", "lr": "lr"}
    parts = [f"{shown[k]} {getattr(cfg, k):g} -> {v:g}" for k, v in changes.items()]
    flags = ", ".join("--" + k.replace("_", "-") for k in changes)
    return scaled, f"scaled for {n_workers} {name} workers: {', '.join(parts)} (set {flags} to choose yourself)"


def _worker_scaling(algo: str) -> str | None:
    """The rule's ``worker_scaling``; the decentralized rules keep every value."""
    from zsgd.algorithms import DECENTRALIZED_NAMES, algorithm_class

    if algo.partition(":")[0] in DECENTRALIZED_NAMES:
        return None
    return algorithm_class(algo).worker_scaling
