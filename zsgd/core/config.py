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
        """Raise ZsgdError naming the first bad option; return self.

        Every field's type is checked first (a YAML file can hold anything: a
        list as ``name``, a mapping as ``model``), then its range, then the
        combinations.
        """
        for f in dataclasses.fields(self):
            check_field(f.name, getattr(self, f.name))
        from zsgd.core.schedule import check_lr_schedule

        check_lr_schedule(self.lr_schedule)
        if self.lr_schedule in ("cosine", "linear") and self.epochs is None and self.steps is None and self.time_limit is None \
                and (self.target_acc is not None or self.target_ppl is not None):
            raise ZsgdError(f"--lr-schedule {self.lr_schedule} needs a run length to decay over: add --epochs, --steps or --time")
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


MAX_SEED = 2**32 - 1  # seeds are folded to 32 bits where random streams are derived
DAY = 86_400.0
#: --time: a year of wall or virtual seconds. Every duration a user gives has a sane ceiling, because an
#: absurd one (1e308) is accepted by a float check and then overflows where it becomes an integer timeout.
MAX_TIME_LIMIT = 366 * DAY
MAX_EPOCHS = 1e6  # --epochs: beyond it epochs x samples leaves the floats (1e308 overflowed where the budget became a count)
MAX_IMAGE_SIZE = 1024
MAX_NAME = 256
MAX_MODEL_SPEC = 512  # a built-in name, lstm:... or [torch:]package.module:factory


def check_field(name: str, value: Any) -> None:
    """ZsgdError unless ``value`` has the type and range of TrainConfig field ``name``.

    The message names the option as a flag (``--batch-size``); a YAML file's
    loader adds the file and line.
    """
    flag = "time" if name == "time_limit" else name.replace("_", "-")
    if name in ("model", "data", "name", "split", "lr_schedule", "optimizer"):
        if not isinstance(value, str) or not value.strip():
            raise ZsgdError(f"--{flag} must be a non-empty string, got {_show(value)}")
        if name == "model" and (len(value) > MAX_MODEL_SPEC or not value.isprintable()):
            raise ZsgdError(f"--model must be at most {MAX_MODEL_SPEC} printable characters (a model's name or "
                            f"package.module:factory), got {_show(value)}")
        if name == "name" and (len(value) > MAX_NAME or not value.isprintable()):
            raise ZsgdError(f"--name must be at most {MAX_NAME} printable characters, got {_show(value)}")
        if name == "data" and value.partition(":")[2]:  # imagefolder:PATH, text:FILE
            from zsgd.output.rundir import check_path_name

            check_path_name("--data", value.partition(":")[2])
        if name == "split":
            from zsgd.data.shards import parse_split

            parse_split(value)
        if name == "optimizer" and value not in OPTIMIZERS:
            raise ZsgdError(f"unknown optimizer {value!r}; choose one of {', '.join(OPTIMIZERS)}")
    elif name == "data_dir":
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ZsgdError(f"--data-dir must be a directory path, got {_show(value)}")
        if value is not None:
            from zsgd.output.rundir import check_path_name

            check_path_name("--data-dir", value)
    elif name == "grayscale":
        if not isinstance(value, bool):
            raise ZsgdError(f"--grayscale must be true or false, got {_show(value)}")
    elif name == "extra":
        if not isinstance(value, dict):
            raise ZsgdError(f"extra must be a mapping, got {_show(value)}")
    elif name in ("batch_size", "steps"):
        if value is not None or name == "batch_size":
            _positive_int(flag, value)
    elif name == "seed":
        if not _is_int(value) or not 0 <= value <= MAX_SEED:
            raise ZsgdError(f"--seed must be a whole number in 0..{MAX_SEED}, got {_show(value)}")
    elif name == "image_size":
        if not _is_int(value) or not 8 <= value <= MAX_IMAGE_SIZE:
            raise ZsgdError(f"--image-size must be a whole number in 8..{MAX_IMAGE_SIZE}, got {_show(value)}")
    elif name in ("eval_every", "log_every"):
        if not _is_int(value) or value < (0 if name == "eval_every" else 1):
            raise ZsgdError(f"--{flag} must be a whole number >= {0 if name == 'eval_every' else 1}, got {_show(value)}")
    elif name == "time_limit":
        if value is not None:
            check_seconds("--time", value, MAX_TIME_LIMIT, positive=True)
    elif name in ("lr", "clip_norm", "epochs"):
        if value is not None or name == "lr":
            _positive_float(flag, value)
        if name == "epochs" and value is not None and value > MAX_EPOCHS:
            raise ZsgdError(f"--epochs must be at most {MAX_EPOCHS:,.0f}, got {_show(value)}")
    elif name == "target_ppl":
        if value is not None and (not _is_number(value) or not math.isfinite(value) or value < 1.0):
            raise ZsgdError(f"--target-ppl must be a perplexity >= 1, got {_show(value)}")
    elif name == "bptt":
        _positive_int("bptt", value)
    elif name == "tokens":
        from zsgd.data.text import TOKEN_KINDS

        if value not in TOKEN_KINDS:
            raise ZsgdError(f"--tokens must be one of {', '.join(TOKEN_KINDS)}, got {_show(value)}")
    elif name == "diverge_factor":
        if not _is_number(value) or not math.isfinite(value) or (value != 0 and value <= 1):
            raise ZsgdError(f"--diverge-factor must be 0 (off) or a number > 1, got {_show(value)}")
    elif name in ("momentum", "weight_decay", "target_acc"):
        if value is None and name == "target_acc":
            return
        if not _is_number(value) or not math.isfinite(value):
            raise ZsgdError(f"--{flag} must be a number, got {_show(value)}")
        if name == "momentum" and not 0.0 <= value < 1.0:
            raise ZsgdError(f"--momentum must be in [0, 1), got {value}")
        if name == "weight_decay" and value < 0:
            raise ZsgdError(f"--weight-decay must be >= 0, got {value}")
        if name == "target_acc" and not 0.0 < value <= 1.0:
            raise ZsgdError(f"--target-acc must be in (0, 1], got {value}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: Any) -> str:
    """A value for an error message, cut short: a bad value can be a megabyte of nested lists."""
    text = repr(value)
    kind = "" if isinstance(value, (str, int, float, type(None))) else f"{type(value).__name__} "
    return kind + (text if len(text) <= 60 else text[:57] + "...")


def _positive_int(name: str, value: int) -> None:
    if not _is_int(value) or value <= 0:
        raise ZsgdError(f"--{name} must be a positive integer, got {_show(value)}")


def check_seconds(flag: str, value: Any, high: float, positive: bool = False) -> float:
    """``value`` if it is a finite number of seconds >= 0 (> 0 with ``positive``) and at most ``high``, else
    ZsgdError naming ``flag``: the one check of every duration option, so none overflows a timer later."""
    if not _is_number(value) or not math.isfinite(value) or value < 0 or (positive and value == 0) or value > high:
        limit = f"{high / DAY:g} days" if high >= 2 * DAY else f"{high:,g} s"
        raise ZsgdError(f"{flag} must be a number of seconds {'> 0' if positive else '>= 0'} and at most {limit}, got {_show(value)}")
    return float(value)


def _positive_float(name: str, value: float) -> None:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ZsgdError(f"--{name} must be a positive number, got {_show(value)}")


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Write the resolved configuration as YAML, the form users edit and re-run (atomically: never half a file)."""
    import yaml

    from zsgd.output.rundir import atomic_write_bytes

    atomic_write_bytes(Path(path), yaml.safe_dump(config, sort_keys=False).encode())
