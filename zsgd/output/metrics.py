"""Metrics events: one schema for real runs and simulations.

Each line of ``metrics.jsonl`` is one JSON object with at least ``event``
and ``t`` (seconds since the run started: wall clock in real runs, virtual
clock in simulations). Keeping one schema is what lets ``zsgd plot`` draw a
simulated arm beside a real run.

Events and their usual fields:
- ``start``: config summary;
- ``train``: ``updates``, ``samples``, ``loss`` (mean over the interval), ``epoch``;
- ``eval``: ``updates``, ``samples``, ``test_loss``, ``test_acc``;
- ``update``: per applied update in distributed runs: ``worker``, ``staleness``, ``bytes``;
- ``worker``: membership changes (``status``: joined, left, dead, rejoined);
- ``end``: final counters.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

from zsgd.errors import ZsgdError


#: ``json.dumps(record, separators=(",", ":"))`` builds this very encoder on every call; one, kept, writes the same text.
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
_PLAIN = (int, str, bool, type(None))  # exact types written as they are (no NaN to clean, no numpy scalar to unwrap)


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every line stays parseable."""
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else None
    if kind in _PLAIN:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (list, dict)):
        return _clean(value.item())
    return value


class MetricsWriter:
    """Appends events to ``metrics.jsonl``, one flushed line each, so a run
    killed mid-way keeps every event up to the kill. With ``tensorboard``
    (a directory) the scalars also go to TensorBoard event files.

    ``flush_every_s``: flush at most that often instead (the simulator, which writes an ``update`` line
    every few microseconds: a write call per line was a tenth of its time); a run killed with SIGKILL
    then loses at most that many seconds of events, and ``close`` (a stop, Ctrl-C, an error) writes all.
    The file's content is the same either way."""

    def __init__(self, path: Path, tensorboard: Path | None = None, flush_every_s: float | None = None) -> None:
        self.path = Path(path)
        self._file = open(self.path, "a", buffering=1 if flush_every_s is None else 1 << 16)
        self._flush_every = flush_every_s
        self._flushed = time.monotonic()
        self._tb = TensorBoardSink(Path(tensorboard)) if tensorboard is not None else None

    def write(self, event: str, t: float, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "t": round(float(t), 6)}
        for k, v in fields.items():  # _clean's fast path inline: this runs for every update of a simulation
            kind = type(v)
            record[k] = (v if math.isfinite(v) else None) if kind is float else v if kind in _PLAIN else _clean(v)
        self._file.write(_ENCODE(record) + "\n")
        if self._flush_every is not None and time.monotonic() - self._flushed >= self._flush_every:
            self._file.flush()
            self._flushed = time.monotonic()
        if self._tb is not None:
            self._tb.write(record)
        return record

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TensorBoardSink:
    """Mirrors the scalar events into TensorBoard files (tensorboardX, optional)."""

    TAGS = {"train": {"loss": "train/loss"}, "eval": {"test_acc": "test/accuracy", "test_loss": "test/loss"},
            "update": {"staleness": "staleness"}}

    def __init__(self, log_dir: Path) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ZsgdError("--tensorboard needs tensorboardX: pip install 'zsgd[tensorboard]' (or tensorboardX)") from None
        self._t0 = time.time()
        self._writer = SummaryWriter(str(log_dir), flush_secs=5)

    def write(self, record: dict[str, Any]) -> None:
        tags = self.TAGS.get(record["event"])
        step = record.get("updates")
        if not tags or step is None:
            return
        for field, tag in tags.items():
            value = record.get(field)
            if value is not None:
                self._writer.add_scalar(tag, value, global_step=step, walltime=self._t0 + record["t"])

    def close(self) -> None:
        self._writer.close()


#: The longest line read: an event is a few hundred bytes (the start event's configuration a few kB);
#: a longer line is not one zsgd wrote, and is refused before it is held in memory.
MAX_LINE_BYTES = 1 << 20


def read_metrics(path: Path) -> Iterator[dict[str, Any]]:
    """Yield events; a torn last line (a killed run) is skipped, anything
    else that is not a JSON object (or not UTF-8 text, or longer than
    ``MAX_LINE_BYTES``) is an error naming the line.

    Read line by line, so memory is one line (and what the caller keeps),
    whatever the file's size. JSON that Python refuses for its size (an
    integer of 5 million digits: a ``ValueError`` that is no
    ``JSONDecodeError``) is a corrupt line like any other.
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ZsgdError(f"cannot read {path}: {exc.strerror or exc}") from None
    with f:
        i, raw = 0, f.readline(MAX_LINE_BYTES + 1)
        while raw:
            i += 1
            if len(raw) > MAX_LINE_BYTES:
                raise ZsgdError(f"{path}:{i}: not a metrics event (a line longer than {MAX_LINE_BYTES >> 20} MiB)")
            following = f.readline(MAX_LINE_BYTES + 1)
            if raw.strip():
                try:
                    event = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError):
                    if not following:  # the torn last line of a killed run
                        return
                    raise ZsgdError(f"{path}:{i}: not a metrics event (corrupt line)") from None
                if not isinstance(event, dict):
                    raise ZsgdError(f"{path}:{i}: not a metrics event (a JSON object expected, got {type(event).__name__})")
                yield event
            raw = following


def drop_events_after(path: Path, updates: int) -> int:
    """Remove the progress events past ``updates`` from ``metrics.jsonl``; returns how many.

    A run resumed from its last checkpoint replays the updates made after
    that checkpoint; without this the file would count them twice. Events
    without an update count (start, worker, end) stay: they are history.
    """
    from zsgd.output.rundir import atomic_write_bytes

    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1  # a torn last line of a killed run (or bytes that were never JSON)
            continue
        if isinstance(event, dict) and isinstance(event.get("updates"), int) and event["updates"] > updates \
                and event.get("event") in ("update", "train", "eval"):
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())
    return dropped
