"""Stragglers and failures: which workers are slow or die, when, and for how long."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from zsgd.errors import ZsgdError
from zsgd.network.delays import MAX_WORKERS, _worker_range
from zsgd.network.units import _NUM, MAX_FACTOR, NONE_WORDS, _q, _spec, format_duration, parse_duration

@dataclass(frozen=True)
class StragglerSpec:
    fraction: float
    factor: float
    period_s: float | None = None  # transient: mean gap between slow episodes
    duration_s: float | None = None  # transient: mean episode length

    @property
    def transient(self) -> bool:
        return self.period_s is not None

    def __str__(self) -> str:
        base = f"{self.fraction:g}:{self.factor:g}x"
        return base + (f",transient:{self.period_s:g}:{self.duration_s:g}" if self.transient else "")

    def assign(self, n_workers: int, seed: int) -> "Stragglers":
        """Choose the slow workers (seeded, so every arm of a sweep slows the same ones)."""
        rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x57A6]))
        k = min(n_workers, max(1, int(round(self.fraction * n_workers))))
        chosen = np.sort(rng.choice(n_workers, size=k, replace=False))
        return Stragglers(self, {int(w) for w in chosen}, seed)


def parse_stragglers(text: str) -> StragglerSpec | None:
    """``none`` | ``FRACTION:FACTORx[,transient:PERIOD:DURATION]``."""
    s = _spec(text, "--stragglers")
    if not s:
        raise ZsgdError("bad --stragglers '': empty; use none or FRACTION:FACTORx, e.g. 0.1:4x")
    if s.lower() in NONE_WORDS:
        return None
    head, _, tail = s.partition(",")
    m = re.fullmatch(rf"\s*({_NUM})\s*:\s*({_NUM})\s*x?\s*", head, re.IGNORECASE)
    if m is None:
        raise ZsgdError(f"bad --stragglers {_q(text)}: expected FRACTION:FACTORx, e.g. 0.1:4x")
    fraction, factor = float(m.group(1)), float(m.group(2))
    if not 0 < fraction <= 1:
        raise ZsgdError(f"bad --stragglers {_q(text)}: FRACTION must be in (0, 1]")
    if not math.isfinite(factor) or not 1 <= factor <= MAX_FACTOR:
        raise ZsgdError(f"bad --stragglers {_q(text)}: FACTOR must be from 1 to {MAX_FACTOR:g} (how many times slower)")
    if not tail:
        return StragglerSpec(fraction, factor)
    parts = [p.strip() for p in tail.split(":")]
    if len(parts) != 3 or parts[0].lower() != "transient":
        raise ZsgdError(f"bad --stragglers {_q(text)}: the option is transient:MEAN_PERIOD_S:MEAN_DURATION_S, e.g. transient:30:5")
    period = parse_duration(parts[1], "straggler period", default_unit="s")
    duration = parse_duration(parts[2], "straggler duration", default_unit="s")
    if period <= 0 or duration <= 0:
        raise ZsgdError(f"bad --stragglers {_q(text)}: transient period and duration must be > 0")
    return StragglerSpec(fraction, factor, period, duration)


class Stragglers:
    """Slowdown factor of a worker's step starting at virtual time ``t``.

    Transient episodes follow a per-worker renewal process (its own RNG
    stream), so one worker's episodes do not depend on what others do.
    Queries for one worker must come in non-decreasing ``t``, as they do:
    a worker computes one step after another.
    """

    def __init__(self, spec: StragglerSpec, workers: set[int], seed: int) -> None:
        self.spec = spec
        self.workers = workers
        self._seed = int(seed) & 0xFFFFFFFF
        self._episode: dict[int, tuple[float, float, np.random.Generator]] = {}

    def factor(self, worker: int, t: float) -> float:
        if worker not in self.workers:
            return 1.0
        spec = self.spec
        if not spec.transient:
            return spec.factor
        assert spec.period_s is not None and spec.duration_s is not None
        state = self._episode.get(worker)
        if state is None:
            rng = np.random.default_rng(np.random.SeedSequence([self._seed, 0x57A6, worker]))
            start = spec.period_s * rng.standard_exponential()
            state = (start, start + spec.duration_s * rng.standard_exponential(), rng)
        start, end, rng = state
        while t >= end:
            start = end + spec.period_s * rng.standard_exponential()
            end = start + spec.duration_s * rng.standard_exponential()
        self._episode[worker] = (start, end, rng)
        return spec.factor if start <= t else 1.0

    def persistent_factors(self) -> dict[int, float]:
        """worker -> factor, for the runtime's emulated stragglers (persistent only)."""
        return {} if self.spec.transient else {w: self.spec.factor for w in sorted(self.workers)}


# ---------------------------------------------------------------------------
# failures


@dataclass(frozen=True)
class FailureSpec:
    events: tuple[tuple[int, float, float | None], ...] = ()  # (worker, at, recover_after)
    rate: float | None = None  # failures per worker per second
    recover_s: float | None = None  # for rate-driven failures

    def __str__(self) -> str:
        if self.rate is not None:
            return f"rate:{self.rate:g}" + (f"+{format_duration(self.recover_s)}" if self.recover_s is not None else "")
        return ",".join(f"{w}@{format_duration(t)}" + (f"+{format_duration(r)}" if r is not None else "") for w, t, r in self.events)

    def check(self, n_workers: int) -> None:
        bad = sorted({w for w, _t, _r in self.events if w >= n_workers})
        if bad:
            raise ZsgdError(f"bad --failures {self}: worker {bad[0]} does not exist ({n_workers} workers: 0..{n_workers - 1})")


def parse_failures(text: str, max_workers: int = MAX_WORKERS) -> FailureSpec | None:
    """``none`` | ``W@T[+RECOVER],...`` (W may be FIRST-LAST, below ``max_workers``) | ``rate:R[+RECOVER]``."""
    s = str(text).strip()
    if not s:
        raise ZsgdError("bad --failures '': empty; use none, W@T[+RECOVER] (e.g. 3@10s+5s) or rate:R[+RECOVER]")
    if s.lower() in NONE_WORDS:
        return None
    if s.lower().startswith("rate:"):
        rate_text, _, rec = s[5:].partition("+")
        try:
            rate = float(rate_text)
        except ValueError:
            rate = -1.0
        if not math.isfinite(rate) or rate <= 0:
            raise ZsgdError(f"bad --failures {_q(text)}: rate:R needs R > 0 failures per worker per second, e.g. rate:0.001+30s")
        return FailureSpec(rate=rate, recover_s=parse_duration(rec, "failure recovery time", "s") if rec else None)
    events = []
    for item in s.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*@([^+]+)(?:\+(.+))?", item)
        if m is None:
            raise ZsgdError(f"bad --failures item {_q(item.strip())}: expected WORKER@TIME[+RECOVER], e.g. 3@10s+5s")
        workers = _worker_range("--failures item", item.strip(), m.group(1), m.group(2), max_workers)
        at = parse_duration(m.group(3), "failure time", "s")
        rec = parse_duration(m.group(4), "failure recovery time", "s") if m.group(4) else None
        events.extend((w, at, rec) for w in workers)
    return FailureSpec(events=tuple(sorted(events, key=lambda e: (e[1], e[0]))))
