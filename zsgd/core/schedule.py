"""Learning-rate schedules over a run's known length (``--lr-schedule``).

A schedule is a factor on ``--lr`` as a function of the run's progress in
[0, 1], taken from the stop rule (the largest fraction of ``--steps``,
``--epochs`` or ``--time`` done), so one definition serves ``zsgd train``,
the broker and the simulator alike, in updates, samples or (virtual)
seconds. Decaying the rate to zero over a fixed budget is what lets a short
run end in a sharp minimum instead of bouncing around one at the full rate;
for a two-epoch cnn it is worth more than any other single knob.

The factor for an update is taken from the counters *before* it is applied,
so ``zsgd run --n-proc 1 --algo sync`` still reproduces ``zsgd train`` bit
for bit.

The default, ``auto``, is cosine wherever there is a central optimizer and a
budget to decay over, and constant elsewhere: local SGD steps on the workers
and the decentralized rules have their own step sizes (``--alpha0``,
``--mu``), and a run that stops only at ``--target-acc`` has no length.
Each driver resolves it first (``zsgd.algorithms.schedules``: the rule says whether it has a central
optimizer), so ``config.yaml`` records what was used.
(Measured: a two-epoch cnn on Fashion-MNIST goes from 88.3 % to 89.5 % with
cosine in one process, and from 88.0 % to 89.5 % with 4 sync workers.)
"""

from __future__ import annotations

import math


from zsgd.errors import ZsgdError


LR_SCHEDULES = ("auto", "constant", "cosine", "linear")


def check_lr_schedule(kind: str) -> str:
    if kind not in LR_SCHEDULES:
        raise ZsgdError(f"unknown --lr-schedule {kind!r}; choose one of {', '.join(LR_SCHEDULES)}")
    return kind


def lr_factor(kind: str, progress: float) -> float:
    """The multiplier on the base learning rate at ``progress`` (clipped to [0, 1])."""
    if kind == "constant":
        return 1.0
    p = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if kind == "linear":
        return 1.0 - p
    if kind == "auto":
        raise ZsgdError("internal: --lr-schedule auto was not resolved before training (resolve_lr_schedule)")
    raise ZsgdError(f"unknown --lr-schedule {kind!r}; choose one of {', '.join(LR_SCHEDULES)}")
