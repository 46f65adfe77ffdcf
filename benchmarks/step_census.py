"""Which step the loaded server takes, and what each costs there: ``bench_broker.py --census``.

The server steps in place when no reply of the live weights is still in
flight, and otherwise out of place into a spare buffer from a small pool
(``zsgd.algorithms.base``), allocating a fresh one when every pooled buffer
is still held by a send. Timed alone, the out-of-place pass costs more than
the in-place one, and a fresh buffer adds page faults; whether either
matters is a question about the real server under the real load, so this
counts and times them there: ``zsgd broker`` runs under this file (the
benchmark's ``prefix``), which wraps ``ServerAlgorithm.apply`` and
``_take_spare`` and ``MetricsWriter.write`` with counters and the main
thread's CPU clock, and writes one JSON line when the broker exits.

CPU time, not wall time: on a shared two-core machine a pass preempted
half-way takes twice its wall time, which says nothing about the pass.
Nothing in zsgd changes: the wrappers call the originals and only look.
"""

from __future__ import annotations

import atexit
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

#: Updates before this many seconds after the first one are warm-up, not counted.
WARMUP_S = 2.0


class Census:
    """Counts and CPU microseconds of the server's steps and metrics lines, from ``WARMUP_S`` after the first update."""

    def __init__(self, warmup_s: float = WARMUP_S) -> None:
        self.warmup_s = warmup_s
        self.first: float | None = None
        self.start: tuple[float, float] | None = None  # (thread CPU, process CPU) when counting began
        self.end: tuple[float, float] | None = None
        self.steps: dict[str, list[float]] = {"in place": [], "out of place, pooled buffer": [], "out of place, fresh buffer": [], "dropped": []}
        self.metrics_us: list[float] = []
        self.fresh = False  # set by the _take_spare wrapper for the step under way

    def counting(self) -> bool:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        if self.start is None and now - self.first >= self.warmup_s:
            self.start = (time.thread_time(), time.process_time())
        return self.start is not None

    def summary(self) -> dict[str, Any]:
        n = sum(len(v) for v in self.steps.values())
        out: dict[str, Any] = {"updates": n, "steps": {k: len(v) for k, v in self.steps.items()},
                               "step_median_us": {k: statistics.median(v) for k, v in self.steps.items() if v},
                               "metrics_lines": len(self.metrics_us),
                               "metrics_line_median_us": statistics.median(self.metrics_us) if self.metrics_us else None}
        if n and self.start is not None and self.end is not None:
            out["per_update_us"] = {"main thread": (self.end[0] - self.start[0]) / n * 1e6,
                                    "whole process": (self.end[1] - self.start[1]) / n * 1e6,
                                    "the step": sum(sum(v) for v in self.steps.values()) / n,
                                    "metrics lines": sum(self.metrics_us) / n}
        return out


def install(census: Census) -> Callable[[], None]:
    """Wrap the server's step, its spare-buffer choice and the metrics writer with ``census``'s counters;
    returns what puts the originals back."""
    from zsgd.algorithms.base import ServerAlgorithm
    from zsgd.output.metrics import MetricsWriter

    apply: Callable = ServerAlgorithm.apply
    take: Callable = ServerAlgorithm._take_spare
    write: Callable = MetricsWriter.write

    def counted_take(self: Any) -> Any:
        pooled = {id(b) for b in self._pool}
        buf = take(self)
        census.fresh = id(buf) not in pooled
        return buf

    def counted_apply(self: Any, grad: Any, staleness: int, lr: float | None = None) -> Any:
        if not census.counting():
            return apply(self, grad, staleness, lr)
        before, census.fresh = id(self.w), False  # an id, not a reference: one more would make the live buffer look held
        t0 = time.thread_time()
        result = apply(self, grad, staleness, lr)
        us = (time.thread_time() - t0) * 1e6
        path = "dropped" if result is None else "in place" if id(self.w) == before else \
            "out of place, fresh buffer" if census.fresh else "out of place, pooled buffer"
        census.steps[path].append(us)
        census.end = (time.thread_time(), time.process_time())
        return result

    def counted_write(self: Any, event: str, t: float, **fields: Any) -> Any:
        if census.start is None:
            return write(self, event, t, **fields)
        t0 = time.thread_time()
        record = write(self, event, t, **fields)
        census.metrics_us.append((time.thread_time() - t0) * 1e6)
        return record

    ServerAlgorithm.apply = counted_apply  # type: ignore[method-assign]
    ServerAlgorithm._take_spare = counted_take  # type: ignore[method-assign]
    MetricsWriter.write = counted_write  # type: ignore[method-assign]

    def restore() -> None:
        ServerAlgorithm.apply, ServerAlgorithm._take_spare, MetricsWriter.write = apply, take, write  # type: ignore[method-assign]

    return restore


def table(s: dict[str, Any]) -> list[str]:
    """Markdown rows of one census (``Census.summary``)."""
    n = max(s["updates"], 1)
    lines = ["| measure | count | share | CPU µs (median per step) |", "|---|---:|---:|---:|"]
    for path, count in s["steps"].items():
        med = s["step_median_us"].get(path)
        lines.append(f"| {path} | {count} | {count / n:.1%} | {'' if med is None else f'{med:.0f}'} |")
    if s.get("metrics_line_median_us") is not None:
        lines.append(f"| metrics lines | {s['metrics_lines']} | | {s['metrics_line_median_us']:.0f} |")
    for k, v in s.get("per_update_us", {}).items():
        lines.append(f"| CPU per update: {k} | | | {v:.0f} (mean) |")
    return lines


def census(measure: Callable[..., float], workers: int, client_procs: int, seconds: float, warmup: float, out: Path) -> tuple[float, dict[str, Any]]:
    """One round of ``bench_broker.measure`` with the broker under this file; returns (updates/s, the summary)."""
    out.mkdir(parents=True, exist_ok=True)
    dump = out / "census.json"
    dump.unlink(missing_ok=True)
    rate = measure("zsgd", workers, 1, client_procs, seconds, warmup, out / "run", prefix=[__file__, "--census-out", str(dump)])
    try:
        return rate, json.loads(dump.read_text())
    except (OSError, ValueError):
        raise SystemExit(f"the broker wrote no census to {dump} (did it exit cleanly on SIGINT?)") from None


def main() -> None:
    """``step_census.py --census-out PATH broker ...``: run ``zsgd broker ...`` counted, the summary to PATH at exit."""
    import runpy

    if len(sys.argv) < 3 or sys.argv[1] != "--census-out":
        raise SystemExit("usage: step_census.py --census-out PATH <zsgd arguments>")
    path, c = Path(sys.argv[2]), Census()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    install(c)
    atexit.register(lambda: path.write_text(json.dumps(c.summary())))
    sys.argv = ["zsgd", *sys.argv[3:]]
    runpy.run_module("zsgd", run_name="__main__")


if __name__ == "__main__":
    main()
