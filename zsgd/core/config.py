"""One validated training configuration, shared by flags, YAML and the wire.

Every command (train, run, sim, worker) builds a ``TrainConfig`` from its
flags or from a YAML file and calls ``validate()`` before any work starts, so
a bad value is caught in the first millisecond with a message naming the
option, not minutes later inside a worker process. The same dict travels to
workers in the ASSIGN message, so a worker trains with exactly the resolved
configuration the broker wrote to ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zsgd.errors import ZsgdError

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "adam")


@dataclass
class TrainConfig:
    """What to train and how; the fields every training mode shares."""

    model: str = "cnn"
    data: str = "default"
    data_dir: str | None = None
    image_size: int = 64
    grayscale: bool = False
    split: str = "iid"
    batch_size: int = 64
    lr: float = 0.05
    lr_schedule: str = "auto"
    optimizer: str = "momentum"
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip_norm: float | None = None
    seed: int = 0
    epochs: float | None = None
    steps: int | None = None
    time_limit: float | None = None
    target_acc: float | None = None
    target_ppl: float | None = None  # language models: stop once test perplexity is at most this
    bptt: int = 64  # language models: tokens per sequence (truncated back-propagation through time)
    tokens: str = "chars"  # text data: chars, bytes or words
    eval_every: int = 0  # updates between evaluations; 0 = about 10 per run, at least one per epoch (zsgd.core.ledger)
    log_every: int = 20  # updates between train-loss events
    diverge_factor: float = 100.0  # stop when the train loss stays above this x its start (zsgd.core.ledger); 0: off
    name: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        """Raise ZsgdError naming the first bad option; return self."""
        _positive_int("batch-size", self.batch_size)
        _positive_float("lr", self.lr)
        from zsgd.core.schedule import check_lr_schedule

        check_lr_schedule(self.lr_schedule)
        if self.lr_schedule in ("cosine", "linear") and self.epochs is None and self.steps is None and self.time_limit is None \
                and (self.target_acc is not None or self.target_ppl is not None):
            raise ZsgdError(f"--lr-schedule {self.lr_schedule} needs a run length to decay over: add --epochs, --steps or --time")
        if self.optimizer not in OPTIMIZERS:
            raise ZsgdError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ZsgdError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0 or not math.isfinite(self.weight_decay):
            raise ZsgdError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.clip_norm is not None:
            _positive_float("clip-norm", self.clip_norm)
        if self.epochs is not None:
            _positive_float("epochs", self.epochs)
        if self.steps is not None:
            _positive_int("steps", self.steps)
        if self.time_limit is not None:
            _positive_float("time", self.time_limit)
        if self.target_acc is not None and not 0.0 < self.target_acc <= 1.0:
            raise ZsgdError(f"--target-acc must be in (0, 1], got {self.target_acc}")
        if self.target_ppl is not None and not (math.isfinite(self.target_ppl) and self.target_ppl >= 1.0):
            raise ZsgdError(f"--target-ppl must be a perplexity >= 1, got {self.target_ppl}")
        _positive_int("bptt", self.bptt)
        from zsgd.data.text import TOKEN_KINDS

        if self.tokens not in TOKEN_KINDS:
            raise ZsgdError(f"--tokens must be one of {', '.join(TOKEN_KINDS)}, got {self.tokens!r}")
        if self.eval_every < 0:
            raise ZsgdError(f"--eval-every must be >= 0, got {self.eval_every}")
        if self.log_every <= 0:
            raise ZsgdError(f"--log-every must be > 0, got {self.log_every}")
        if not isinstance(self.diverge_factor, (int, float)) or not math.isfinite(self.diverge_factor) \
                or (self.diverge_factor != 0 and self.diverge_factor <= 1):
            raise ZsgdError(f"--diverge-factor must be 0 (off) or a number > 1, got {self.diverge_factor!r}")
        if self.image_size < 8:
            raise ZsgdError(f"--image-size must be >= 8, got {self.image_size}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a dict, rejecting unknown keys so typos never pass silently."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ZsgdError(f"unknown configuration key(s): {', '.join(unknown)}")
        return cls(**d)


#: Defaults of the language model (``--model lstm``) where they differ from
#: the image models', applied to the options a user left unset (flag or
#: YAML). Why: under the image defaults (momentum SGD, lr 0.05, no
#: clipping) a character LSTM is still at the unigram perplexity (20) after
#: 500 K tokens of the embedded corpus; momentum SGD at lr 0.2 with
#: gradients clipped to norm 1 (the usual guard against the exploding
#: gradients of back-propagation through time) reaches perplexity 7 in the
#: same tokens, and Adam at 2e-3 (char-rnn's rate) in half of them (270 K),
#: measured with 32 streams x 64 tokens. 32 streams keep a step's recurrent
#: sgemm efficient while giving twice the updates of 64.
LM_DEFAULTS: dict[str, Any] = {"batch_size": 32, "optimizer": "adam", "lr": 0.002, "clip_norm": 1.0}


def model_defaults(model: str) -> dict[str, Any]:
    """The option defaults of ``model``'s family that differ from the common ones (see ``LM_DEFAULTS``)."""
    from zsgd.nn.lstm_spec import is_lstm_name

    return dict(LM_DEFAULTS) if is_lstm_name(model) else {}


def _positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ZsgdError(f"--{name} must be a positive integer, got {value!r}")


def _positive_float(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ZsgdError(f"--{name} must be a positive number, got {value!r}")


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Write the resolved configuration as YAML, the form users edit and re-run."""
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))
