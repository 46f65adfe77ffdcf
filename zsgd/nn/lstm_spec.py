"""The ``lstm`` model name: its sizes, parsed without importing numpy or numba.

Kept apart from ``zsgd.nn.lstm`` because option handling (``zsgd.core.config``)
asks "is this a language model?" before any kernel is needed, and ``zsgd
--help`` should not pay for a numba import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zsgd.errors import ZsgdError

LSTM_NAME = "lstm"  # the built-in language model (zsgd.nn.models.BUILTIN_MODELS lists it beside the image models)
LSTM_FORM = "lstm:embed=E,hidden=H,layers=L"
_DEFAULTS = {"embed": 64, "hidden": 256, "layers": 2}
_LIMITS = {"embed": (1, 4096), "hidden": (1, 4096), "layers": (1, 2)}


@dataclass(frozen=True)
class LSTMSpec:
    """Sizes of an ``lstm`` model, parsed from its name."""

    embed: int = _DEFAULTS["embed"]
    hidden: int = _DEFAULTS["hidden"]
    layers: int = _DEFAULTS["layers"]

    @property
    def name(self) -> str:
        """The canonical model name (what config.yaml and checkpoints record)."""
        return f"lstm:embed={self.embed},hidden={self.hidden},layers={self.layers}"


def is_lstm_name(name: Any) -> bool:
    """True for ``lstm`` and ``lstm:...`` (and not for a user factory such as ``pkg.lstm:make``)."""
    return isinstance(name, str) and (name == LSTM_NAME or name.startswith(LSTM_NAME + ":"))


def parse_lstm_name(name: str) -> LSTMSpec:
    """``lstm`` or ``lstm:embed=64,hidden=256,layers=2`` (any subset, any order) -> sizes."""
    head, _, args = name.partition(":")
    if head != "lstm":
        raise ZsgdError(f"not an lstm model name: '{name}'")
    sizes = dict(_DEFAULTS)
    given: set[str] = set()
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip()
        if key not in sizes or not eq:
            raise ZsgdError(f"bad lstm model option '{item}' in '{name}': use {LSTM_FORM}")
        if key in given:  # which one would win is a guess; say so instead
            raise ZsgdError(f"lstm {key} is given twice in '{name}': give each of embed, hidden, layers at most once")
        given.add(key)
        lo, hi = _LIMITS[key]
        if not val.strip().isdigit() or not lo <= int(val) <= hi:
            raise ZsgdError(f"lstm {key} must be a whole number in [{lo}, {hi}], got '{val}' in '{name}'")
        sizes[key] = int(val)
    return LSTMSpec(**sizes)
