"""When a training run ends: the stop conditions every mode shares.

``--epochs``, ``--steps`` (central updates), ``--time`` (seconds, wall or
virtual), ``--target-acc`` and, for language models, ``--target-ppl`` (test
perplexity, ``exp`` of the mean test cross-entropy); the first one met ends
the run. With none
given a run trains one epoch, so nothing runs forever by accident.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StopRule:
    n_train: int
    batch_size: int
    epochs: float | None = None
    steps: int | None = None
    time_limit: float | None = None
    target_acc: float | None = None
    target_ppl: float | None = None

    def __post_init__(self) -> None:
        if self.epochs is None and self.steps is None and self.time_limit is None and self.target_acc is None \
                and self.target_ppl is None:
            object.__setattr__(self, "epochs", 1.0)

    @property
    def total_samples(self) -> int | None:
        return None if self.epochs is None else int(math.ceil(self.epochs * self.n_train))

    @property
    def total_updates(self) -> int | None:
        """Updates until the first count-based limit, for progress bars (None: unknown)."""
        candidates = []
        if self.steps is not None:
            candidates.append(self.steps)
        if self.total_samples is not None:
            candidates.append(int(math.ceil(self.total_samples / self.batch_size)))
        return min(candidates) if candidates else None

    def total_updates_at(self, samples_per_update: int) -> int | None:
        """Updates until the first count-based limit when each update takes ``samples_per_update`` samples."""
        candidates = [self.steps] if self.steps is not None else []
        if self.total_samples is not None:
            candidates.append(int(math.ceil(self.total_samples / max(1, samples_per_update))))
        return min(candidates) if candidates else None

    def expected_updates(self, updates: int, samples: int, samples_per_update: float | None) -> int | None:
        """The update count at which ``reason`` will stop the run on a count: ``--steps``, or the updates the
        samples still to go take at ``samples_per_update`` (the last update's; None while that is unknown: an
        epoch budget before the first update, or no count-based limit).

        What a live view shows as its total. Taken from the updates themselves rather than from
        ``batch_size``: one update is a batch for async and ssp, a round of every worker's batch for sync, K
        batches each for localsgd:K, the first K gradients for ksync:K, a round of every node for the
        decentralized rules (and a worker's batch may be the scaled one); the last update, not the mean, since
        a sync run's first round holds only the workers that had joined, and a dead worker shrinks the rounds.
        """
        candidates = [self.steps] if self.steps is not None else []
        if self.total_samples is not None:
            if not samples_per_update or samples_per_update <= 0:
                return None
            left = max(0, self.total_samples - samples)
            candidates.append(updates + math.ceil(left / samples_per_update - 1e-9))
        return min(candidates) if candidates else None

    @property
    def has_length(self) -> bool:
        """Whether progress is defined: a step, epoch or time budget is set."""
        return self.steps is not None or self.epochs is not None or self.time_limit is not None

    def progress(self, updates: int, samples: int, elapsed: float) -> float:
        """How far the run is towards its first budget, in [0, 1] (0 with no budget)."""
        fractions = [0.0]
        if self.steps is not None:
            fractions.append(updates / self.steps)
        if self.total_samples is not None:
            fractions.append(samples / self.total_samples)
        if self.time_limit is not None:
            fractions.append(elapsed / self.time_limit)
        return min(max(fractions), 1.0)

    def reason(self, updates: int, samples: int, elapsed: float, test_acc: float | None = None,
               test_loss: float | None = None) -> str | None:
        """The reason to stop now, or None to go on (``test_*``: an evaluation that just finished)."""
        if self.steps is not None and updates >= self.steps:
            return f"reached {self.steps} updates"
        if self.total_samples is not None and samples >= self.total_samples:
            return f"reached {self.epochs:g} epochs"
        if self.time_limit is not None and elapsed >= self.time_limit:
            return f"reached the time limit of {self.time_limit:g} s"
        if self.target_acc is not None and test_acc is not None and test_acc >= self.target_acc:
            return f"reached the target accuracy {self.target_acc:.2%}"
        if self.target_ppl is not None and test_loss is not None and math.isfinite(test_loss) \
                and math.exp(min(test_loss, 700.0)) <= self.target_ppl:
            return f"reached the target perplexity {self.target_ppl:g}"
        return None
