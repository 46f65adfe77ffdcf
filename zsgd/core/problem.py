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
from zsgd.errors import ZsgdError


@dataclass
class Problem:
    """A data set and a model built for it: what every mode trains."""

    dataset: Any
    model: Any

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "Problem":
        from zsgd.data import load_dataset
        from zsgd.nn.lstm_spec import is_lstm_name
        from zsgd.nn.models import get_model

        if cfg.data == "default" and is_lstm_name(cfg.model):
            cfg.data = "text"  # a language model's default data: the embedded corpus
        ds = load_dataset(cfg.data, data_dir=cfg.data_dir, image_size=cfg.image_size, grayscale=cfg.grayscale,
                          tokens=cfg.tokens)
        if cfg.data in ("default", "text"):
            # Resolve now: "default" may mean different data on another machine,
            # and every worker must shard the very same training set.
            cfg.data = ds.name
        if getattr(ds, "is_text", False):
            # A worker's shard of text is one contiguous span, so its batches can
            # continue each other and carry the hidden state: no other split means that.
            cfg.split = "shards"
        else:  # (text: check_fits checks the spans against batch x bptt)
            n_train = len(ds.y_train)
            if cfg.batch_size > n_train:
                raise ZsgdError(f"--batch-size {cfg.batch_size:,} is larger than the training set ({n_train:,} samples of "
                                f"{ds.name}): choose at most {n_train:,} (64-256 is usual)")
        model = get_model(cfg.model, input_shape=ds.input_shape, n_classes=ds.n_classes, seed=cfg.seed, bptt=cfg.bptt)
        _check_batch_memory(cfg, model)
        return cls(ds, model)

    @property
    def is_language_model(self) -> bool:
        """True for a model over tokens: samples are tokens, and perplexity is reported."""
        return bool(getattr(self.model, "is_language_model", False))

    def samples_per_step(self, cfg: TrainConfig) -> int:
        """Samples in one worker's batch: images, or for a language model tokens (batch x bptt)."""
        return cfg.batch_size * cfg.bptt if self.is_language_model else cfg.batch_size

    def check_fits(self, cfg: TrainConfig, n_workers: int = 1) -> None:
        """Raise ZsgdError now if a language model's data is too short for ``n_workers``.

        Each worker's contiguous span must hold at least one block (``batch``
        rows of ``bptt + 1`` tokens): found here, before anything starts,
        rather than in a worker process after its launch.
        """
        if not self.is_language_model:
            return
        from zsgd.data.text import TokenStream

        shortest = len(self.dataset.train) // max(n_workers, 1)  # spans differ by at most one token
        TokenStream(self.dataset.train[:shortest], cfg.batch_size, cfg.bptt)  # raises the one-line error

    def data_fields(self) -> dict[str, Any]:
        """What the resolved configuration records about the data beyond its name.

        For text: the vocabulary's size and digest, so ``--resume`` can refuse
        to continue a run on a text whose vocabulary differs (the same token
        ids would mean other tokens, and the weights' shapes may not fit).
        """
        ds = self.dataset
        if not getattr(ds, "is_text", False):
            return {}
        return {"vocab_size": ds.n_classes, "vocab_digest": ds.vocab_digest()}

    def check_resume(self, stored: dict[str, Any], run_dir: str) -> None:
        """Raise ZsgdError if ``stored`` (a run's config.yaml) was trained on another vocabulary."""
        from zsgd.errors import ZsgdError

        mine = self.data_fields()
        if "vocab_digest" not in stored and not mine:
            return
        if stored.get("vocab_digest") != mine.get("vocab_digest"):
            raise ZsgdError(f"cannot resume {run_dir}: it was trained on a vocabulary of {stored.get('vocab_size', '?')} "
                            f"tokens ({stored.get('tokens', '?')}), this data has {mine.get('vocab_size', 'no')} "
                            f"(vocabulary differs): resume with the same --data and --tokens")

    def stop_rule(self, cfg: TrainConfig) -> StopRule:
        return StopRule(
            n_train=len(self.dataset.y_train),
            batch_size=self.samples_per_step(cfg),
            epochs=cfg.epochs,
            steps=cfg.steps,
            time_limit=cfg.time_limit,
            target_acc=cfg.target_acc,
            target_ppl=cfg.target_ppl,
        )

    def ledger(self, cfg: TrainConfig, emit=None, updates: int = 0, samples: int = 0, eval_every: int | None = None) -> RunLedger:
        """The run's ledger: counts, cadence, stop and divergence rules from ``cfg`` (see zsgd.core.ledger)."""
        return RunLedger(self.stop_rule(cfg), n_train=len(self.dataset.y_train), log_every=cfg.log_every,
                         eval_every=cfg.eval_every if eval_every is None else eval_every,
                         diverge_factor=cfg.diverge_factor, emit=emit, updates=updates, samples=samples,
                         language_model=self.is_language_model)

    def evaluate(self, w: np.ndarray) -> tuple[float, float]:
        from zsgd.nn.models import evaluate

        return evaluate(self.model, w, self.dataset.x_test, self.dataset.y_test)


def _check_batch_memory(cfg: TrainConfig, model: Any) -> None:
    """Refuse a batch whose step cannot fit in this machine's available memory (built-in models know their need)."""
    from zsgd.core.machine import available_memory

    per_sample = getattr(model, "bytes_per_sample", None)
    avail = available_memory()
    if not callable(per_sample) or avail is None:
        return
    need = cfg.batch_size * per_sample()
    if need > avail:
        fits = max(1, avail // per_sample())
        raise ZsgdError(f"--batch-size {cfg.batch_size:,} needs about {need / 2**30:.1f} GiB for one step of {cfg.model}, more than the "
                        f"{avail / 2**30:.1f} GiB available: choose at most {fits:,}")


def step_seed(seed: int, worker: int, step: int) -> int:
    """Dropout seed for one step: distinct per (run seed, worker, step), reproducible."""
    return (seed * 1_000_003 + worker * 7_919 + step) % (2**31 - 1)
