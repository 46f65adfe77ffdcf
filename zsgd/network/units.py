"""Numbers with units in specs: durations, bandwidths, loss, and lists of specs with a shared unit.

Every parser has a ceiling (``MAX_*``) and refuses an over-long spec before any regular expression
sees it, so no spec a user or a file can state costs unbounded time or memory."""

from __future__ import annotations

import math
import re

from zsgd.errors import ZsgdError

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
