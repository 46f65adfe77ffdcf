"""The problem every mode trains: a data set and a model built for it.

Lives in the core layer so that the sans-IO worker step, the simulator, the
runtime and the trainer build the very same model on the very same data
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from zsgd.core.config import TrainConfig
from zsgd.core.ledger import RunLedger
from zsgd.core.stopping import StopRule


@dataclass
class Problem:
    """A data set and a model built for it: what every mode trains."""

    dataset: Any
    model: Any

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "Problem":
        from zsgd.data import load_dataset
        from zsgd.nn.models import get_model

        ds = load_dataset(cfg.data, data_dir=cfg.data_dir, image_size=cfg.image_size, grayscale=cfg.grayscale)
        if cfg.data == "default":
            # Resolve now: "default" may mean different data on another machine,
            # and every worker must shard the very same training set.
            cfg.data = ds.name
        model = get_model(cfg.model, input_shape=ds.input_shape, n_classes=ds.n_classes, seed=cfg.seed)
        return cls(ds, model)

    def stop_rule(self, cfg: TrainConfig) -> StopRule:
        return StopRule(
            n_train=len(self.dataset.y_train),
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
            steps=cfg.steps,
            time_limit=cfg.time_limit,
            target_acc=cfg.target_acc,
        )

    def ledger(self, cfg: TrainConfig, emit=None, updates: int = 0, samples: int = 0, eval_every: int | None = None) -> RunLedger:
        """The run's ledger: counts, cadence, stop and divergence rules from ``cfg`` (see zsgd.core.ledger)."""
        return RunLedger(self.stop_rule(cfg), n_train=len(self.dataset.y_train), log_every=cfg.log_every,
                         eval_every=cfg.eval_every if eval_every is None else eval_every,
                         diverge_factor=cfg.diverge_factor, emit=emit, updates=updates, samples=samples)

    def evaluate(self, w: np.ndarray) -> tuple[float, float]:
        from zsgd.nn.models import evaluate

        return evaluate(self.model, w, self.dataset.x_test, self.dataset.y_test)


def step_seed(seed: int, worker: int, step: int) -> int:
    """Dropout seed for one step: distinct per (run seed, worker, step), reproducible."""
    return (seed * 1_000_003 + worker * 7_919 + step) % (2**31 - 1)
