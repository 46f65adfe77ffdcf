"""Delay distributions and the network of links between workers and their server (latency, bandwidth, loss)."""

from __future__ import annotations

import math
import re
from statistics import NormalDist
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zsgd.errors import ZsgdError
from zsgd.network.link_draws import LinkDraws
from zsgd.network.trace import Trace, load_trace
from zsgd.network.units import (DISTRIBUTIONS, MAX_SIGMA, _q, _spec, format_bandwidth, format_duration, parse_bandwidth, parse_duration,
                                propagate_units)

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


_STANDARD_NORMAL = NormalDist()
_TINY = 2.0**-54  # a uniform of exactly 0 (one in 2**53) as the smallest positive one: the inverse CDF takes (0, 1)


@dataclass(frozen=True)
class LogNormal:
    median: float
    sigma: float

    def sample(self, rng: np.random.Generator) -> float:
        # By its inverse CDF from one uniform, as a trace of its quantiles is drawn (``Trace.sample``): a twin whose
        # latency is this one shifted, written as such a trace (zsgd.experiments.twin.shifted_latency), then draws
        # the same quantile for the same message from its link's stream (zsgd.network.link_draws). Drawn through
        # standard_normal, the two sides' draws were unrelated, and one seed's two samples stayed 4 % apart.
        return self.median * math.exp(self.sigma * _STANDARD_NORMAL.inv_cdf(rng.random() or _TINY))

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

    def delay(self, worker: int, up: bool, nbytes: int, links: LinkDraws) -> float:
        """Seconds from send to arrival of one ``nbytes`` message, drawn from its link's own stream (``LinkDraws``)."""
        lat = self.worker_latency.get(worker)
        if lat is None:
            lat = self.latency_up if up else self.latency_down
        if isinstance(lat, Constant) and self.loss == 0.0:
            return lat.seconds + nbytes / self.bandwidth  # draws nothing: no link's generator is made
        rng = links.rng(worker, up)
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


@dataclass(frozen=True)
class PerRound:
    """``round:SPEC``: one draw of SPEC is a whole round of ``localsgd:K`` (its K steps), not each step.

    Why: K independent draws of a step make a round's time far less variable than one draw of K steps, and a
    real worker's K steps are slow or fast together (they share its core and its neighbours). A round's
    measured turnaround (``zsgd sim --validate``'s twin) is such a draw; for one-step rules it is the step."""

    spec: Any

    def sample(self, rng: np.random.Generator) -> float:
        return self.spec.sample(rng)

    @property
    def mean(self) -> float:
        return self.spec.mean

    def __str__(self) -> str:
        return f"round:{self.spec}"


def parse_compute(text: str) -> Delay | Measured:
    """``measured``, a delay spec for one worker's gradient step, or ``round:SPEC`` for a whole local-SGD round."""
    value = str(text).strip()
    if value.lower() == "measured":
        return Measured()
    if value.lower().startswith("round:"):
        return PerRound(parse_delay(value[len("round:"):], "compute time per round"))
    return parse_delay(text, "compute time")
