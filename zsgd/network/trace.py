"""Latency traces: ``trace:FILE.csv`` delays, measured samples resampled uniformly.

The one place trace files are read: ``zsgd sim --latency trace:...``,
``zsgd run --inject-latency trace:...`` and experiment arms all come here
through ``zsgd.network.parse_delay``, so one size cap guards all
of them (``trace:/dev/zero`` used to grow to 3.4 GB and die in a MemoryError).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zsgd.errors import ZsgdError


@dataclass(frozen=True, eq=False)
class Trace:
    """Measured samples (e.g. ping times), drawn uniformly with replacement."""

    path: str
    samples: np.ndarray

    def sample(self, rng: np.random.Generator) -> float:
        # One uniform a draw, as the other delays take theirs: the same message on the same link draws the same
        # quantile of a trace and of a lognormal it was written from (``LogNormal.sample``, zsgd.network.link_draws).
        return float(self.samples[min(int(rng.random() * len(self.samples)), len(self.samples) - 1)])

    @property
    def mean(self) -> float:
        return float(self.samples.mean())

    def __str__(self) -> str:
        return f"trace:{self.path}"


#: A trace is measured samples (ping times): a million rows is far more than any measurement, and
#: bounded so that ``trace:/dev/zero`` or a mistyped multi-gigabyte file is an error, not a MemoryError.
MAX_TRACE_BYTES = 32 * 1024 * 1024
MAX_TRACE_ROWS = 1_000_000


def load_trace(path: str, what: str = "latency") -> Trace:
    """Read the first column of a CSV of samples in milliseconds; a header line is allowed.

    The one place trace files are read (``zsgd sim``, ``zsgd run --inject-latency``
    and experiment arms all come here): only a regular file, at most
    ``MAX_TRACE_BYTES`` read and ``MAX_TRACE_ROWS`` samples kept.
    """
    p = Path(path).expanduser()
    try:
        if not p.is_file():  # a device (/dev/zero), a FIFO (which would block) or a directory
            raise ZsgdError(f"bad {what} trace {path!r}: " + ("not a regular file" if p.exists() else "file not found"))
        with open(p, "rb") as f:
            data = f.read(MAX_TRACE_BYTES + 1)
        if len(data) > MAX_TRACE_BYTES:
            raise ZsgdError(f"bad {what} trace {path!r}: larger than the {MAX_TRACE_BYTES >> 20} MiB a trace may be "
                            f"(at most {MAX_TRACE_ROWS:,} samples)")
        lines = data.decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ZsgdError(f"bad {what} trace {path!r}: cannot read it ({exc})") from None
    values: list[float] = []
    for i, line in enumerate(lines, 1):
        cell = line.split(",")[0].strip()
        if not cell or cell.startswith("#"):
            continue
        try:
            v = float(cell)
        except ValueError:
            if values:  # a header is fine on top, not in the middle
                raise ZsgdError(f"bad {what} trace {path}:{i}: {cell[:40]!r} is not a number (milliseconds)") from None
            continue
        if not math.isfinite(v) or v < 0:
            raise ZsgdError(f"bad {what} trace {path}:{i}: {cell[:40]!r} must be a finite number of ms >= 0")
        if len(values) == MAX_TRACE_ROWS:
            raise ZsgdError(f"bad {what} trace {path!r}: more than the {MAX_TRACE_ROWS:,} samples a trace may hold")
        values.append(v)
    if not values:
        raise ZsgdError(f"bad {what} trace {path!r}: no numbers in its first column (samples in ms)")
    return Trace(str(path), np.asarray(values, dtype=np.float64) / 1000.0)
