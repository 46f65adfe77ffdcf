"""The network knobs: one table of every setting of the simulated (or emulated) world around training.

Why one table: the same settings show up in four places -- ``zsgd sim``'s flags, the grid of arms
those flags make (``zsgd.simulation.sweep``), the keys of an experiment file
(``zsgd.experiments.config``) and ``zsgd run``'s emulation flags -- and written out in each they
drifted (a help text, a default, a key one place took and another refused). Each place now derives
its view from ``KNOBS``:

- the click options: ``zsgd.commands.options.sim_network_options`` (``zsgd sim``) and
  ``run_emulation_options`` (``zsgd run``, ``zsgd broker``);
- the sweep: a knob with ``sweep`` set is a grid dimension (``zsgd.simulation.sweep.dimensions``);
- the experiment file: a knob with ``file`` modes is an arm key, checked with its parser and refused
  on an arm of another mode.

What each knob *does* to the simulated world (which field of ``Network`` or ``SimOptions`` it sets)
is the simulator's business, in ``zsgd.simulation.sweep.build_arms``; this table says only how the
knob is named, given, checked and documented. It imports no click and no numpy: the CLI reads it
while registering its commands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from zsgd.network.hosts import host_cores_spec, parse_placement
from zsgd.network.units import parse_bandwidth, parse_duration, parse_loss, split_specs


def _later(module: str, name: str) -> Callable[..., Any]:
    """``zsgd.network.<module>.<name>``, imported at its first call: those modules import numpy, which must
    not load while the CLI registers its commands (``single_threaded_blas`` acts only before numpy's import)."""
    def call(*args: Any, **kwargs: Any) -> Any:
        from importlib import import_module

        return getattr(import_module(f"zsgd.network.{module}"), name)(*args, **kwargs)
    return call


parse_broker_bandwidth, parse_broker_time, parse_compute, parse_delay, parse_worker_latency = (
    _later("delays", n) for n in ("parse_broker_bandwidth", "parse_broker_time", "parse_compute", "parse_delay", "parse_worker_latency"))
parse_failures, parse_stragglers = (_later("faults", n) for n in ("parse_failures", "parse_stragglers"))

SIM, RUN = "sim", "run"  # experiment-file arm modes (an arm's ``mode:``)
#: How a knob's value makes arms: a comma list whose bare numbers take a neighbour's unit (``0,10,50ms``),
#: a plain comma list, or ';'-separated scenarios (a comma is part of one scenario: ``3@10s,4@20s``).
SPLITS = ("units", "plain", "scenarios")
LIST_HELP = {"units": " A comma list makes arms (every combination with the other lists).",
             "plain": " A comma list makes arms (every combination with the other lists).",
             "scenarios": " Separate scenarios (arms) with ';'."}

#: ``parse(text, what, max_workers)``: ``what`` is how the user wrote the knob (``--detect`` on the command
#: line, ``detect`` in a file) for parsers whose messages name it; ``max_workers`` bounds worker ranges.
Parser = Callable[[Any, str, int], Any]


@dataclass(frozen=True)
class Knob:
    """One setting of the world: its names, where it may be given, its parser, default and help."""

    name: str  # experiment-file key, ``SweepSpec`` grid key, and ``zsgd sim``'s parameter name
    help: str  # zsgd sim's help line (a sweepable knob's list sentence is added, see LIST_HELP)
    parse: Parser
    default: str | None = None  # zsgd sim's default (None: not given, e.g. --latency-up follows --latency)
    sweep: str | None = None  # one of SPLITS: a list makes arms; None: one value per run
    label: str = ""  # the knob in an arm's name (``lat=10ms``); sweepable knobs only
    file: tuple[str, ...] = (SIM,)  # experiment-file modes whose arms take the key; (): not a file key
    run_flag: str | None = None  # the ``zsgd run`` flag that emulates it in real processes
    run_help: str = ""
    run_metavar: str = "SPEC"
    metavar: str | None = None  # zsgd sim's metavar (None: click's)
    multiple: bool = False  # a repeatable zsgd sim flag; its value is a tuple of specs

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def run_name(self) -> str | None:
        """The parameter (and ``EmulationOptions`` field) name of ``run_flag``."""
        return self.run_flag[2:].replace("-", "_") if self.run_flag else None

    @property
    def sim_help(self) -> str:
        return self.help + (LIST_HELP[self.sweep] if self.sweep else "")

    def split(self, text: str, what: str) -> list[str]:
        """The arms' values of ``text`` (one item for a knob that does not sweep)."""
        return split_values(self.sweep, text, what)

    def __post_init__(self) -> None:
        """A knob that could not be given where it claims to be fails on import, not in a user's run."""
        if self.sweep not in (None, *SPLITS) or (self.sweep and not self.label) or (RUN in self.file and not self.run_flag) \
                or not set(self.file) <= {SIM, RUN} or (self.multiple and self.sweep):
            raise ValueError(f"inconsistent network knob {self.name!r}")

    def parse_value(self, text: Any, what: str | None = None, max_workers: int | None = None) -> Any:
        """The model of one value (``ZsgdError`` naming it when it is bad); ``max_workers``: default ``delays.MAX_WORKERS``."""
        if max_workers is None:
            from zsgd.network.delays import MAX_WORKERS as max_workers
        return self.parse(text, what or self.flag, max_workers)


def split_values(kind: str | None, text: str, what: str) -> list[str]:
    """The arms' values of ``text`` for a list of ``kind`` (one of SPLITS; None: one value)."""
    if kind is None:
        return [str(text).strip()]
    if kind == "scenarios" and ";" not in str(text):
        return [str(text).strip()]  # a failure list is one scenario; use ';' between scenarios
    return split_specs(text, what, units=kind == "units")


def _delay(what: str) -> Parser:
    return lambda text, _what, _n: parse_delay(text, what)


KNOBS: tuple[Knob, ...] = (
    Knob("latency", "One-way latency per message: 10ms, uniform:5ms,20ms, normal:10ms,2ms, lognormal:10ms,0.5, exp:10ms, "
                    "trace:FILE.csv (ms). '0,10,50,200ms' is four arms in ms.", _delay("latency"), default="0", sweep="units",
         label="lat", file=(SIM, RUN), run_flag="--inject-latency",
         run_help="Emulate one-way latency per message (same specs as 'zsgd sim --latency', e.g. 20ms, lognormal:20ms,0.5)."),
    Knob("latency_up", "Worker-to-broker latency (overrides --latency).", _delay("uplink latency"), sweep="units", label="up"),
    Knob("latency_down", "Broker-to-worker latency (overrides --latency).", _delay("downlink latency"), sweep="units", label="down"),
    Knob("latency_worker", "Latency of one worker or a range, both directions, e.g. 3=50ms or 0-7=exp:30ms (repeatable).",
         lambda items, _what, n: parse_worker_latency(items, n), file=(), metavar="W=SPEC", multiple=True),
    Knob("bandwidth", "Per-worker link bandwidth: 100Mbps, 1Gbps, 10MB/s, inf.", lambda text, _what, _n: parse_bandwidth(text),
         default="inf", sweep="units", label="bw", file=(SIM, RUN), run_flag="--inject-bandwidth",
         run_help="Emulate per-worker link bandwidth, e.g. 100Mbps."),
    Knob("broker_bandwidth", "Each server's own NIC, shared by all workers (received and sent messages each queue on it one at a "
                             "time): 'measured' (the bytes/s a ZeroMQ server moves each way on this machine for this model's "
                             "messages, timed once and cached) or a bandwidth, e.g. 10Gbps; inf makes it free.",
         lambda text, _what, _n: parse_broker_bandwidth(text), default="measured", run_flag="--inject-broker-bandwidth",
         run_help="Emulate the server's own NIC, shared by every worker's updates and replies (one at a time each way), "
                  "as 'zsgd sim --broker-bandwidth', e.g. 100Mbps; each of --servers K has its own."),
    Knob("loss", "Chance a message is lost and resent, e.g. 0.01 or 1%.", lambda text, _what, _n: parse_loss(text), default="0",
         sweep="units", label="loss", file=(SIM, RUN), run_flag="--inject-loss", run_metavar="P",
         run_help="Emulate message loss with a 200 ms retransmit, e.g. 0.01."),
    Knob("retransmit", "Delay before a lost message is resent (TCP's minimum RTO is 200 ms).", _delay("retransmit delay"),
         default="200ms"),
    Knob("compute", "Time per gradient step: 'measured' (median of timed real steps on this machine) or a delay spec, e.g. 5ms "
                    "or normal:5ms,1ms.", lambda text, _what, _n: parse_compute(text), default="measured", sweep="units",
         label="compute", run_flag="--inject-compute",
         run_help="Stretch each worker's step to a seeded draw, as 'zsgd sim --compute' draws it: exp:MEAN, shifted-exp:SHIFT,MEAN, "
                  "trace:FILE."),
    Knob("stragglers", "FRACTION:FACTORx (seeded choice of workers, always slow) or "
                       "FRACTION:FACTORx,transient:MEAN_PERIOD_S:MEAN_DURATION_S.", lambda text, _what, _n: parse_stragglers(text),
         default="none", sweep="plain", label="strag", file=(SIM, RUN), run_flag="--stragglers",
         run_help="Slow a fraction of workers, e.g. 0.25:3x (as in 'zsgd sim')."),
    Knob("failures", "W@T[+RECOVER],... (e.g. 3@10s+5s, 0-7@60s) or rate:R[+RECOVER] (R per worker per second).",
         lambda text, _what, n: parse_failures(text, n), default="none", sweep="scenarios", label="fail"),
    Knob("detect", "Time for the broker to notice a dead worker (the runtime's --timeout).",
         lambda text, what, _n: parse_duration(text, what, default_unit="s"), default="3s"),
    Knob("broker_time", "Broker time per update, queued FIFO: 'measured' (the broker's handler for this model, optimizer, "
                        "algorithm and codec, timed here once) or a duration, e.g. 0.2ms; 0 makes the broker instantaneous.",
         lambda text, _what, _n: parse_broker_time(text), default="measured"),
    Knob("placement", "Where the run's processes live: 'spread' (the server and each worker on hosts of their own, a cluster) "
                      "or 'local' (all on one host of --host-cores cores, as 'zsgd run --n-proc N' on this machine: the "
                      "workers' steps, the server's step and its I/O take turns on those cores).",
         lambda text, _what, _n: parse_placement(text), default="spread", sweep="plain", label="place"),
    Knob("host_cores", "Cores of the host with --placement local: 'auto' (this machine's) or a number, e.g. 16.",
         lambda text, _what, _n: host_cores_spec(text), default="auto",
         sweep="plain", label="cores"),  # auto: resolved by the simulator (this machine's, or a replayed calibration's)
)


def all_knobs() -> tuple[Knob, ...]:
    """Every knob, in the order ``zsgd sim --help`` lists them (read at call time, so a test may extend ``KNOBS``)."""
    return KNOBS


def knob(name: str) -> Knob:
    for k in KNOBS:
        if k.name == name:
            return k
    raise KeyError(f"no network knob {name!r}")


def sweepable() -> tuple[Knob, ...]:
    """The knobs a list turns into arms, in the grid's order."""
    return tuple(k for k in KNOBS if k.sweep)


def emulated() -> tuple[Knob, ...]:
    """The knobs ``zsgd run`` emulates, each with its flag."""
    return tuple(k for k in KNOBS if k.run_flag)
