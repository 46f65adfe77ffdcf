"""Which learning-rate schedule a run of a given algorithm uses: the rule's own answer.

``--lr-schedule auto`` is cosine wherever the server rule has a central
optimizer to decay (``central_schedule``) and the run has a length, constant
elsewhere; a decaying schedule asked of a rule without one is refused. The
schedules themselves (``lr_factor``) are in ``zsgd.core.schedule``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zsgd.algorithms import DECENTRALIZED_NAMES, algorithm_class
from zsgd.errors import ZsgdError

if TYPE_CHECKING:
    from zsgd.core.config import TrainConfig


def _central(algo: str) -> bool:
    """The server rule decays a central optimizer (``central_schedule``); the decentralized rules have none."""
    if algo.partition(":")[0] in DECENTRALIZED_NAMES:
        return False
    return algorithm_class(algo).central_schedule


def resolve_lr_schedule(cfg: "TrainConfig", algo: str) -> "TrainConfig":
    """``cfg`` with ``auto`` replaced by the schedule it means for ``algo`` ("train" for one process)."""
    if cfg.lr_schedule != "auto":
        return cfg
    from dataclasses import replace

    has_length = cfg.epochs is not None or cfg.steps is not None or cfg.time_limit is not None or (
        cfg.target_acc is None and cfg.target_ppl is None)
    central = algo == "train" or _central(algo)
    return replace(cfg, lr_schedule="cosine" if central and has_length else "constant")


def check_schedule_applies(kind: str, algo: str) -> None:
    """A decaying schedule drives the central optimizer; say so where there is none."""
    if kind in ("constant", "auto"):
        return
    name = algo.partition(":")[0]
    if name not in DECENTRALIZED_NAMES and not _central(algo):
        raise ZsgdError(f"--lr-schedule {kind} applies to the central optimizer; {name} steps on the workers at a constant --lr")
    if name in DECENTRALIZED_NAMES:
        raise ZsgdError(f"--lr-schedule {kind} applies to the central optimizer; {name} has its own step sizes (--alpha0, --mu)")
