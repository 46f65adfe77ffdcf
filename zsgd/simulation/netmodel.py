"""Models of the world around training: delays, bandwidth, loss, compute time,
stragglers and failures, with one spec syntax for simulation and emulation.

``zsgd sim`` samples these models on a virtual clock; ``zsgd run`` can delay
real messages by samples of the very same objects (see ``zsgd.runtime.emulation``),
so a delay studied in the simulator is the delay injected into a real run.
Each model is a small object with ``sample(rng) -> seconds``; each parser
turns a user's text into one and raises ``ZsgdError`` naming the bad value.

Spec syntax (the same in flags and YAML):

- durations: ``0``, ``10ms``, ``0.5s``, ``250us``, ``2min``. A bare number
  other than 0 is an error (is ``10`` ten seconds or ten milliseconds?),
  except inside a list where the unit of a neighbour applies:
  ``0,10,50,200ms`` means 0, 10, 50 and 200 ms, ``uniform:5,20ms`` means 5 to
  20 ms.
- delay distributions: ``uniform:LO,HI``, ``normal:MEAN,SD`` (clipped at 0),
  ``lognormal:MEDIAN,SIGMA`` (SIGMA unitless; heavy right tail, the usual fit
  for WAN round trips), ``exp:MEAN``, ``shifted-exp:SHIFT,MEAN`` (SHIFT plus an
  exponential of mean MEAN: the compute-time model of the K-sync/K-async
  analyses, Dutta et al. 2018), ``trace:FILE.csv`` (first column:
  measured samples in milliseconds, resampled uniformly).
- bandwidth: ``100Mbps``, ``1Gbps`` (bits/s), ``10MB/s``, ``1GiB/s``
  (bytes/s), ``inf``.
- loss: ``0.01`` or ``1%``, the chance that a message is lost and resent
  after ``--retransmit`` (geometric number of resends).
- stragglers: ``FRACTION:FACTORx`` (a seeded choice of workers computes
  FACTOR times slower for the whole run) or
  ``FRACTION:FACTORx,transient:MEAN_PERIOD_S:MEAN_DURATION_S`` (those workers
  are slow only during random episodes: exponential gaps of mean PERIOD
  between episodes of exponential length of mean DURATION).
- failures: ``W@T[+RECOVER]`` items (``3@10s+5s``: worker 3 dies at virtual
  10 s and rejoins 5 s later; ``0-7@60s``: workers 0..7 die for good) or
  ``rate:R[+RECOVER]`` (each worker fails as a Poisson process of R failures
  per second).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from zsgd.errors import ZsgdError
from zsgd.simulation.trace import MAX_TRACE_BYTES, MAX_TRACE_ROWS, Trace, load_trace  # noqa: F401 -- re-exported: trace:FILE specs

# ``\d+(?:\.\d*)?`` rather than ``\d+\.?\d*``: the same numbers, but a long run of digits that fails to match
# is not tried at every split between its two digit runs (100,000 digits and a bad unit took minutes).
_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
TIME_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "sec": 1.0, "min": 60.0}
_TIME_RE = re.compile(rf"^({_NUM})\s*([a-zµ]*)$", re.IGNORECASE)
_BW_RE = re.compile(rf"^({_NUM})\s*([kmgt]?)(i?)(bps|bit/s|b/s|B/s|Bps)$", re.IGNORECASE)
_BW_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BIN_SCALE = {"": 1.0, "k": 2.0**10, "m": 2.0**20, "g": 2.0**30, "t": 2.0**40}
#: Distributions and how many comma-separated arguments each takes (for list splitting).
DISTRIBUTIONS = {"uniform": 2, "normal": 2, "lognormal": 2, "exp": 1, "shifted-exp": 2, "trace": 1}
NONE_WORDS = ("none", "off", "0")
#: Ceilings of the specs below (issue 20: ``--stragglers 1:1e308x`` and ``--timeout 1e308`` passed a finite
#: check, then overflowed where a worker turned them into a sleep or a poll timeout). Each is far beyond any
#: network or machine worth modelling; a value above it is a typo.
MAX_DURATION = 1e6  # seconds (11.6 days) of one delay, failure time, period or retransmission
MAX_SIGMA = 10.0  # lognormal spread: exp(10) is a factor of 22,000 between median and one sigma
MAX_FACTOR = 1000.0  # a straggler 1000 times slower is already one that never finishes a step
MIN_BANDWIDTH = 125.0  # bytes/s (1 Kbps): slower links make one model's transfer take days
MAX_LOSS = 0.9  # beyond it a message needs more than ten sends on average


MAX_SPEC = 4096  # characters of one spec (a trace file's path included); a longer one is a paste, not a spec


def _spec(text: object, what: str, limit: int = MAX_SPEC) -> str:
    """``text`` stripped, or ZsgdError when it is longer than ``limit`` characters (checked before any regex)."""
    s = str(text).strip()
    if len(s) > limit:
        raise ZsgdError(f"bad {what} {_q(s)}: {len(s):,} characters, at most {limit:,}")
    return s


def _q(value: object) -> str:
    """A user's spec quoted for an error message, cut to 60 characters (a spec can be a pasted megabyte)."""
    text = repr(str(value))
    return text if len(text) <= 60 else text[:56] + "...'"


# ---------------------------------------------------------------------------
# numbers with units


def parse_duration(text: str, what: str = "duration", default_unit: str | None = None) -> float:
    """``10ms`` -> 0.01 seconds. Negative, non-finite, unit-less (unless
    ``default_unit``) or unknown-unit values raise ZsgdError naming ``what``."""
    s = _spec(text, what, 256)
    m = _TIME_RE.match(s)
    if not s or m is None:
        raise ZsgdError(f"bad {what} {_q(text)}: expected a number with a unit, e.g. 10ms, 0.5s")
    value, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(value) or value < 0:
        raise ZsgdError(f"bad {what} {_q(text)}: must be a finite number >= 0")
    if not unit:
        if value == 0:
            return 0.0
        if default_unit is None:
            raise ZsgdError(f"bad {what} {_q(text)}: give a unit, e.g. {m.group(1)}ms or {m.group(1)}s")
        unit = default_unit
    if unit not in TIME_UNITS:
        raise ZsgdError(f"bad {what} {_q(text)}: unknown unit {_q(unit)}; use us, ms, s or min")
    if value * TIME_UNITS[unit] > MAX_DURATION:
        raise ZsgdError(f"bad {what} {_q(text)}: at most {MAX_DURATION:,.0f} s ({MAX_DURATION / 86400:.1f} days)")
    return value * TIME_UNITS[unit]


def format_duration(seconds: float) -> str:
    """Short human form of a duration, for labels: 0, 250us, 10ms, 1.5s."""
    if seconds == 0:
        return "0"
    if seconds < 1e-3:
        return f"{seconds * 1e6:g}us"
    if seconds < 1:
        return f"{seconds * 1e3:g}ms"
    return f"{seconds:g}s"


def parse_bandwidth(text: str) -> float:
    """``100Mbps`` / ``10MB/s`` / ``inf`` -> bytes per second (``inf``: no transfer time)."""
    s = _spec(text, "bandwidth", 256)
    if s.lower() in ("inf", "infinite", "unlimited", "none"):
        return math.inf
    m = _BW_RE.match(s)
    if m is None:
        raise ZsgdError(f"bad bandwidth {_q(text)}: expected e.g. 100Mbps, 1Gbps, 10MB/s or inf")
    value, prefix, binary, unit = float(m.group(1)), m.group(2).lower(), m.group(3), m.group(4)
    if not math.isfinite(value) or value <= 0:
        raise ZsgdError(f"bad bandwidth {_q(text)}: must be a positive number (or inf)")
    scale = (_BIN_SCALE if binary else _BW_SCALE)[prefix]
    is_bytes = unit in ("B/s", "Bps")  # capital B: bytes; b, bps, bit/s: bits
    bytes_per_s = value * scale / (1.0 if is_bytes else 8.0)
    if bytes_per_s < MIN_BANDWIDTH:
        raise ZsgdError(f"bad bandwidth {_q(text)}: at least 1Kbps (or inf)")
    return bytes_per_s


def format_bandwidth(bytes_per_s: float) -> str:
    if math.isinf(bytes_per_s):
        return "inf"
    bits = bytes_per_s * 8
    for unit, scale in (("Gbps", 1e9), ("Mbps", 1e6), ("Kbps", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit}"
    return f"{bits:g}bps"


def parse_loss(text: str) -> float:
    """``0.01`` or ``1%`` -> probability in [0, 1) that one message is lost."""
    s = _spec(text, "loss", 256)
    pct = s.endswith("%")
    try:
        p = float(s[:-1] if pct else s) / (100.0 if pct else 1.0)
    except ValueError:
        raise ZsgdError(f"bad loss {_q(text)}: expected a probability such as 0.01 or 1%") from None
    if not (0.0 <= p <= MAX_LOSS):
        raise ZsgdError(f"bad loss {_q(text)}: must be in [0, {MAX_LOSS:g}] (beyond it a message takes more than ten sends)")
    return p


# ---------------------------------------------------------------------------
# delay distributions


@dataclass(frozen=True)
class Constant:
    seconds: float

    def sample(self, rng: np.random.Generator) -> float:
        return self.seconds

    @property
    def mean(self) -> float:
        return self.seconds

    def __str__(self) -> str:
        return format_duration(self.seconds)


@dataclass(frozen=True)
class Uniform:
    lo: float
    hi: float

    def sample(self, rng: np.random.Generator) -> float:
        return self.lo + (self.hi - self.lo) * rng.random()

    @property
    def mean(self) -> float:
        return (self.lo + self.hi) / 2

    def __str__(self) -> str:
        return f"uniform:{format_duration(self.lo)},{format_duration(self.hi)}"


@dataclass(frozen=True)
class Normal:
    mu: float
    sd: float

    def sample(self, rng: np.random.Generator) -> float:
        return max(0.0, self.mu + self.sd * rng.standard_normal())

    @property
    def mean(self) -> float:
        """Mean after clipping at 0: mu*Phi(mu/sd) + sd*phi(mu/sd)."""
        if self.sd == 0:
            return self.mu
        z = self.mu / self.sd
        return self.mu * 0.5 * (1 + math.erf(z / math.sqrt(2))) + self.sd * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)

    def __str__(self) -> str:
        return f"normal:{format_duration(self.mu)},{format_duration(self.sd)}"


@dataclass(frozen=True)
class LogNormal:
    median: float
    sigma: float

    def sample(self, rng: np.random.Generator) -> float:
        return self.median * math.exp(self.sigma * rng.standard_normal())

    @property
    def mean(self) -> float:
        return self.median * math.exp(self.sigma**2 / 2)

    def __str__(self) -> str:
        return f"lognormal:{format_duration(self.median)},{self.sigma:g}"


@dataclass(frozen=True)
class Exponential:
    mean_s: float

    def sample(self, rng: np.random.Generator) -> float:
        return self.mean_s * rng.standard_exponential()

    @property
    def mean(self) -> float:
        return self.mean_s

    def __str__(self) -> str:
        return f"exp:{format_duration(self.mean_s)}"


@dataclass(frozen=True)
class ShiftedExponential:
    """``shift + Exp(mean)``: a floor no step goes below, and an exponential tail (Dutta et al. 2018)."""

    shift_s: float
    mean_s: float

    def sample(self, rng: np.random.Generator) -> float:
        return self.shift_s + self.mean_s * rng.standard_exponential()

    @property
    def mean(self) -> float:
        return self.shift_s + self.mean_s

    def __str__(self) -> str:
        return f"shifted-exp:{format_duration(self.shift_s)},{format_duration(self.mean_s)}"


Delay = Constant | Uniform | Normal | LogNormal | Exponential | ShiftedExponential | Trace


def parse_delay(text: str, what: str = "latency") -> Delay:
    """A delay spec (see the module docstring) -> a sampler of seconds."""
    s = _spec(text, what)
    if not s:
        raise ZsgdError(f"bad {what} '': empty; give e.g. 10ms or normal:10ms,2ms")
    name, sep, arg = s.partition(":")
    name = name.strip().lower()
    if not sep or name not in DISTRIBUTIONS:
        if sep:
            raise ZsgdError(f"bad {what} {_q(text)}: unknown distribution {_q(name)}; use {', '.join(DISTRIBUTIONS)}")
        return Constant(parse_duration(s, what))
    if name == "trace":
        if not arg.strip():
            raise ZsgdError(f"bad {what} {_q(text)}: trace needs a file, e.g. trace:pings.csv")
        return load_trace(arg.strip(), what)
    args = [a.strip() for a in arg.split(",")]
    if len(args) != DISTRIBUTIONS[name] or not all(args):
        example = {"uniform": "uniform:5ms,20ms", "normal": "normal:10ms,2ms", "lognormal": "lognormal:10ms,0.5", "exp": "exp:10ms",
                   "shifted-exp": "shifted-exp:10ms,5ms"}[name]
        raise ZsgdError(f"bad {what} {_q(text)}: {name} takes {DISTRIBUTIONS[name]} value(s), e.g. {example}")
    if name == "lognormal":
        median = parse_duration(args[0], what)
        try:
            sigma = float(args[1])
        except ValueError:
            sigma = -1.0
        if not math.isfinite(sigma) or not 0 <= sigma <= MAX_SIGMA:
            raise ZsgdError(f"bad {what} {_q(text)}: lognormal SIGMA must be a unitless number in [0, {MAX_SIGMA:g}], e.g. 0.5")
        return LogNormal(median, sigma)
    vals = [parse_duration(a, what) for a in propagate_units(args)]
    if name == "exp":
        return Exponential(vals[0])
    if name == "shifted-exp":
        return ShiftedExponential(vals[0], vals[1])
    if name == "normal":
        return Normal(vals[0], vals[1])
    if vals[0] > vals[1]:
        raise ZsgdError(f"bad {what} {_q(text)}: uniform needs LO <= HI")
    return Uniform(vals[0], vals[1])


# ---------------------------------------------------------------------------
# lists of specs (the simulator's grid of arms)

_UNIT_RE = re.compile(rf"^({_NUM})\s*([A-Za-zµ%][^\s]*)?$")


def propagate_units(items: list[str]) -> list[str]:
    """Give unit-less numbers the unit of the nearest neighbour that has one
    (to the right first): ``["0", "10", "200ms"]`` -> ``["0ms", "10ms", "200ms"]``."""
    parsed = [_UNIT_RE.match(i.strip()) for i in items]
    units = [m.group(2) if m and m.group(2) else None for m in parsed]
    out = []
    for i, (item, m) in enumerate(zip(items, parsed)):
        if m is None or units[i] is not None:
            out.append(item.strip())
            continue
        right = next((u for u in units[i + 1:] if u), None)
        left = next((u for u in reversed(units[:i]) if u), None)
        unit = right or left
        out.append(item.strip() + unit if unit else item.strip())
    return out


def split_specs(value: str, what: str, units: bool = True) -> list[str]:
    """Split a comma list of specs into arms, keeping distribution arguments
    (``uniform:5ms,20ms``) and straggler options (``0.1:4x,transient:30:5``)
    together. With a ``;`` anywhere, arms are split on ``;`` only."""
    text = str(value).strip()
    if not text:
        raise ZsgdError(f"bad {what} '': empty; give a value")
    if ";" in text:
        items = [t.strip() for t in text.split(";")]
        if not all(items):
            raise ZsgdError(f"bad {what} {_q(value)}: empty item in the ';' list")
        return items
    tokens = [t.strip() for t in text.split(",")]
    items: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok:
            raise ZsgdError(f"bad {what} {_q(value)}: empty item in the comma list")
        name = tok.partition(":")[0].lower()
        if name == "transient" and items:
            items[-1] += "," + tok
            i += 1
            continue
        need = DISTRIBUTIONS.get(name, 1) - 1 if ":" in tok else 0
        items.append(",".join(tokens[i:i + need + 1]))
        i += need + 1
    return propagate_units(items) if units else items


# ---------------------------------------------------------------------------
# the network


@dataclass
class Network:
    """Per-worker links to the broker: latency per message (per direction,
    with per-worker overrides), link bandwidth, and loss with retransmission.

    Links do not contend: each worker has its own pipe, and the broker's own
    NIC is modelled separately by the simulator (``--broker-bandwidth``).
    """

    latency_up: Delay = field(default_factory=lambda: Constant(0.0))  # worker -> broker
    latency_down: Delay = field(default_factory=lambda: Constant(0.0))  # broker -> worker
    worker_latency: dict[int, Delay] = field(default_factory=dict)  # overrides, both directions
    bandwidth: float = math.inf  # bytes/s per worker link, each direction
    loss: float = 0.0
    retransmit: Delay = field(default_factory=lambda: Constant(0.2))

    def delay(self, worker: int, up: bool, nbytes: int, rng: np.random.Generator) -> float:
        """Seconds from send to arrival of one ``nbytes`` message."""
        lat = self.worker_latency.get(worker)
        if lat is None:
            lat = self.latency_up if up else self.latency_down
        t = lat.sample(rng) + nbytes / self.bandwidth
        if self.loss > 0.0:
            while rng.random() < self.loss:
                t += self.retransmit.sample(rng)
        return t

    def describe(self) -> dict[str, object]:
        return {"latency_up": str(self.latency_up), "latency_down": str(self.latency_down),
                "latency_worker": {str(w): str(d) for w, d in sorted(self.worker_latency.items())},
                "bandwidth": format_bandwidth(self.bandwidth), "loss": self.loss, "retransmit": str(self.retransmit)}


#: Worker numbers a range may name when the caller does not know the worker count (a sweep passes its
#: largest arm's): ranges are expanded worker by worker, so ``0-99999999999`` must fail before that.
MAX_WORKERS = 1_000_000


def _worker_range(flag: str, item: str, first: str, last: str | None, max_workers: int) -> range:
    """FIRST[-LAST] (digits) as a range, non-empty and only of workers below ``max_workers``
    (checked on the digits first: a 5000-digit number is too large for ``int``, not a traceback)."""
    short = item if len(item) <= 60 else item[:57] + "..."
    for text in (first, last or first):
        if len(text.lstrip("0")) > len(str(max_workers)) or int(text) >= max_workers:
            shown = text if len(text) <= 20 else text[:8] + "..." + f" ({len(text)} digits)"
            raise ZsgdError(f"bad {flag} {short!r}: worker {shown} does not exist "
                            f"(at most {max_workers:,} workers: 0..{max_workers - 1})")
    lo, hi = int(first), int(last or first)
    if hi < lo:
        raise ZsgdError(f"bad {flag} {short!r}: range {lo}-{hi} is empty")
    return range(lo, hi + 1)


def parse_worker_latency(items: list[str] | tuple[str, ...], max_workers: int = MAX_WORKERS) -> dict[int, Delay]:
    """``["3=50ms", "0-7=uniform:5ms,20ms"]`` -> {worker: delay}; later items win; workers below ``max_workers``."""
    out: dict[int, Delay] = {}
    for item in items:
        who, sep, spec = str(item).partition("=")
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", who)
        if not sep or m is None:
            raise ZsgdError(f"bad --latency-worker {_q(item)}: expected WORKER=SPEC or FIRST-LAST=SPEC, e.g. 3=50ms")
        workers = _worker_range("--latency-worker", str(item), m.group(1), m.group(2), max_workers)
        delay = parse_delay(spec, f"latency of worker {who.strip()}")
        out.update({w: delay for w in workers})
    return out


# ---------------------------------------------------------------------------
# compute time and stragglers


class Measured:
    """Compute time timed on this machine's real kernels (resolved per arm by the simulator)."""

    def __str__(self) -> str:
        return "measured"


def parse_broker_time(text: str) -> float | Measured:
    """``--broker-time``: ``measured`` (the server's step timed on this machine) or a duration such as 0.2ms."""
    if str(text).strip().lower() == "measured":
        return Measured()
    return parse_duration(text, "--broker-time")


def parse_broker_bandwidth(text: str) -> float | Measured:
    """``--broker-bandwidth``: ``measured`` (what one ZeroMQ server moves each way here, ``zsgd.simulation.transport``)
    or a bandwidth such as 10Gbps or inf."""
    if str(text).strip().lower() == "measured":
        return Measured()
    return parse_bandwidth(text)


def parse_compute(text: str) -> Delay | Measured:
    """``measured`` or a delay spec for one worker's gradient step."""
    if str(text).strip().lower() == "measured":
        return Measured()
    return parse_delay(text, "compute time")


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
