"""Reading a real run beside its simulated twin: the figures both are compared on.

Shared by ``zsgd sim --validate`` (``zsgd.experiments.validate``) and the
fidelity tests (``tests/test_fidelity.py``), so the check a user runs is the
one the project tests itself with.

Why the twin is calibrated on the real run itself: a real run's workers
share this machine's cores with each other, the broker and the evaluator,
so their steps take longer than one step timed alone. Each worker logs the
distribution of its *turnaround* per step when it leaves (20 quantiles, after
its first 10 % of steps: ``logs/worker-N.log``); pooled, those quantiles are
the twin's ``--compute trace:FILE``, so a sync round waits for the slowest
of its workers' draws, as the real round does. What the twin is then judged
on is everything else: the network, the algorithm, the server, the codecs.
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

TURNAROUND = "turnaround ms (20 quantiles"
HOP = "peer hop ms (20 quantiles"  # a decentralized node's peer messages: see relay_overhead_s


def metrics_path(run_dir: str | Path) -> Path:
    """The run's ``metrics.jsonl``: at its top, else the first below it (a sweep's arm directory)."""
    top = Path(run_dir) / "metrics.jsonl"
    if top.is_file():
        return top
    found = sorted(glob.glob(f"{run_dir}/**/metrics.jsonl", recursive=True))
    if not found:
        from zsgd.errors import ZsgdError

        raise ZsgdError(f"{run_dir}: no metrics.jsonl")
    return Path(found[0])


def events(run_dir: str | Path, kind: str) -> list[dict[str, Any]]:
    """The run's events of one kind, in order (lines that do not parse are skipped: a run cut short may end mid-line)."""
    out = []
    needle = f'"event":"{kind}"'
    with open(metrics_path(run_dir)) as f:
        for line in f:
            if needle in line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    return out


def summary(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((metrics_path(run_dir).parent / "summary.json").read_text())


def steady(run_dir: str | Path, skip: int = 200) -> tuple[float, float]:
    """Seconds per update and mean staleness over the updates after the first ``skip``."""
    ups = events(run_dir, "update")[skip:]
    if len(ups) < 2:
        from zsgd.errors import ZsgdError

        raise ZsgdError(f"{run_dir}: {len(ups)} update(s) after the first {skip}: too few for a time per update")
    return (ups[-1]["t"] - ups[0]["t"]) / (len(ups) - 1), sum(u["staleness"] for u in ups) / len(ups)


def staleness_p99(run_dir: str | Path, skip: int = 0) -> float:
    """The 99th percentile of the staleness of the updates after the first ``skip`` (nearest rank: a real update's)."""
    values = [u["staleness"] for u in events(run_dir, "update")[skip:]]
    return float(np.percentile(values, 99, method="inverted_cdf")) if values else 0.0


def staleness_p99_interval(run_dir: str | Path, skip: int = 0) -> tuple[float, float]:
    """Where the run's p99 staleness could as well have fallen: a distribution-free 95 % interval for the 99th
    percentile, the order statistics of ranks n*0.99 -/+ 1.96 sd of the binomial count below it. A short run's
    p99 is one of its few largest values (the 2nd largest of 150 updates), so another run of the same case
    draws another of them; the twin's p99 is one draw too, so the two are told apart only where their intervals
    do not meet (``validate.p99_row``)."""
    values = np.sort([u["staleness"] for u in events(run_dir, "update")[skip:]])
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    half = 1.96 * math.sqrt(n * 0.99 * 0.01)
    lo, hi = max(1, math.floor(n * 0.99 - half)), min(n, math.ceil(n * 0.99 + half))
    return float(values[lo - 1]), float(values[hi - 1])


def accuracies(run_dir: str | Path) -> dict[int, float]:
    """Test accuracy by the update count it was evaluated at."""
    return {int(e["updates"]): float(e["test_acc"]) for e in events(run_dir, "eval") if e.get("test_acc") is not None}


def logged_values(run_dir: str | Path, what: str) -> Iterator[list[str]]:
    """The comma-separated values of each worker log line headed ``what`` (``zsgd worker N: WHAT...: v1,v2,...``)."""
    for log in sorted(glob.glob(f"{run_dir}/logs/worker-*.log")):
        with open(log, errors="replace") as f:
            for line in f:
                if line.split(": ", 1)[-1].startswith(what):
                    yield [x for x in line.rsplit(":", 1)[1].strip().split(",") if x.strip()]


def turnaround_samples(run_dir: str | Path, what: str = TURNAROUND) -> list[float]:
    """The workers' logged turnaround quantiles (ms), pooled (``what``: another logged quantity, e.g. ``HOP``)."""
    return [float(x) for values in logged_values(run_dir, what) for x in values]


def steps_per_turnaround(algo: str, primal_steps: int = 5) -> int:
    """Gradient steps a worker takes per turnaround, as the simulator charges them draws of ``--compute``:
    K for ``localsgd:K``, cadmm's ``primal_steps`` per round, else 1."""
    name, _, arg = algo.partition(":")
    if name == "localsgd":
        return int(arg or 1)
    return int(primal_steps) if name == "cadmm" else 1


def relay_overhead_s(run_dir: str | Path, latency: str) -> float | None:
    """Mean seconds a decentralized run's peer message spent on its hop beyond its emulated delay (``latency``,
    the run's ``--inject-latency``); None if its nodes logged no hops.

    A peer message of a real run goes from its sender through the broker's relay to its neighbour: the
    emulated delay, plus the relay's handling (one message at a time, a round's messages in a burst) and
    the thread and socket hand-offs on both sides. Each receiving node times the hop from the sender's stamp
    to its own socket (``zsgd.runtime.worker.decentralized_node``). The relay and those hand-offs are not in
    ``zsgd sim``'s decentralized model (docs/simulation.md, "The fidelity matrix"); their cost grows with the
    load of the host, so the twin takes it from the run, as it takes the nodes' turnaround."""
    from zsgd.network import parse_delay

    samples = turnaround_samples(run_dir, HOP)
    if not samples:
        return None
    return max(0.0, float(np.mean(samples)) / 1e3 - parse_delay(latency, "--latency").mean)


def broker_overhead_s(run_dir: str | Path) -> tuple[float, float] | None:
    """Mean seconds a central run's update (up) and reply (down) spent on their way beyond their emulated hold;
    None if its workers logged no hops (a run without emulation, or too short).

    The broker's hand-offs around its step: the link and ZeroMQ threads on both sides (the message's transfer
    included), its receive before the hold, the reply's encoding and send; and, on the way up, the update's wait
    for the broker's loop after its hold beyond other updates' engine steps (``emulation.loop_wait``: the
    loop receiving and sending other messages, waking; the wait behind other steps is the simulator's queue).
    Each worker logs its means from the broker's stamps on its replies (``zsgd.runtime.worker.broker_hops``);
    pooled here weighted by their counts. They grow with the host's load, so the twin takes them from the run,
    as it takes the workers' turnaround."""
    from zsgd.runtime.worker.broker_hops import LOGGED

    up = down = 0.0
    n = 0
    for values in logged_values(run_dir, LOGGED):
        try:
            u, d, k = (float(x) for x in values[:3])
            wait = float(values[4]) if len(values) > 4 else 0.0  # a worker of before the loop wait was logged: none
        except ValueError:
            continue
        up, down, n = up + (u + wait) * k, down + d * k, n + int(k)
    return None if n == 0 else (up / n / 1e3, down / n / 1e3)


def central_latency(run_dir: str | Path, latency: str, out_dir: str | Path | None = None) -> tuple[str, str] | None:
    """``--latency-up`` and ``--latency-down`` for a central run's twin: the emulated ``latency`` plus the run's
    mean hop beyond it each way (``broker_overhead_s``); None if the run logged none. The hops exclude the whole
    emulated hold (its link time under ``--inject-bandwidth`` included), so unlike the relay's they hold with a
    bandwidth too. ``out_dir``: where a shifted lognormal or trace is written (as a trace).

    Under a round rule the way down also holds the close's extra step (``round_close_s``): a round's replies leave
    only after the step that closes it, which the twin's server step (the gather step, ``central_server``) leaves out."""
    extra = broker_overhead_s(run_dir)
    if extra is None:
        return None
    down = extra[1] + round_close_s(run_dir)
    return shifted_latency(latency, extra[0], out_dir, "up"), shifted_latency(latency, down, out_dir, "down")


def round_close_s(run_dir: str | Path) -> float:
    """Seconds by which the run's step that closes a round (applies it, sends every reply) outlasts its other steps
    (which add an update to the round); 0 where every step applied a version (async, ssp) or none was kept.

    Why apart: the simulator charges one step per update, and a twin charged the mean of all steps had each round's
    replies leave early by the close's extra (sync at 0 ms: 6-23 % fast; a close of cnn took 4.9 ms, the others
    0.6). Charged once per round on the replies' way, the round's server time is the run's: N gathers plus the
    extra is N - 1 gathers and the close."""
    from zsgd.errors import ZsgdError

    try:
        s = summary(run_dir)
    except (ZsgdError, OSError):  # no run's files there: nothing kept
        return 0.0
    close, gather = s.get("engine_close_s_mean"), s.get("engine_gather_s_mean")
    if not isinstance(close, (int, float)) or not isinstance(gather, (int, float)):
        return 0.0
    return max(0.0, float(close) - float(gather))


def central_server(run_dir: str | Path, broker_time: str = "measured", broker_bandwidth: str = "measured") -> dict[str, str]:
    """``--broker-time`` and ``--broker-bandwidth`` for a central run's twin whose latency holds the run's hops
    (``central_latency``); a figure given by hand (not ``measured``) is the user's and is kept.

    The server's NIC: the hops hold each message's transfer through ZeroMQ, both ways, so the twin's NIC is
    unlimited; charged again from this machine's cached transport calibration, the twin of 8 workers at 10 ms
    was 2-6 % slow, more with a calibration cached on a busy machine (its bandwidth lower). A NIC given by hand
    is emulated in the real run's holds (``--inject-broker-bandwidth``), which the hops leave out. The server's
    step: the engine's mean step in this run (``engine_s_mean``, after its first quarter), as its broker took it
    beside the workers, instead of the calibration's, timed alone; the calibration's if the run has none. Under a
    round rule, its gather step (``engine_gather_s_mean``): the close's extra is on the replies' way (``round_close_s``)."""
    out = {"broker_time": broker_time, "broker_bandwidth": broker_bandwidth}
    if str(broker_bandwidth).strip().lower() == "measured":
        out["broker_bandwidth"] = "inf"
    s = summary(run_dir)
    step = s.get("engine_gather_s_mean", s.get("engine_s_mean"))
    if str(broker_time).strip().lower() == "measured" and isinstance(step, (int, float)) and step > 0:
        out["broker_time"] = f"{step * 1e3:.4f}ms"
    return out


TRACE_POINTS = 4000  # quantiles of a shifted lognormal written as a trace (scaled to its mean)


def shifted_latency(latency: str, extra_s: float, out_dir: str | Path | None = None, tag: str = "") -> str:
    """The latency spec ``latency`` with every draw ``extra_s`` seconds longer (constant, uniform, normal, exp; with
    ``out_dir``, also lognormal and trace, written as a trace ``out_dir/latency-TAG.csv``)."""
    from zsgd.errors import ZsgdError
    from zsgd.network import parse_delay
    from zsgd.network.delays import Constant, Exponential, LogNormal, Normal, ShiftedExponential, Uniform
    from zsgd.network.trace import Trace

    d, ms = parse_delay(latency, "--latency"), lambda x: f"{x * 1e3:.4f}ms"
    if out_dir is not None and isinstance(d, (LogNormal, Trace)):
        if isinstance(d, LogNormal):
            from statistics import NormalDist

            z = np.array([NormalDist().inv_cdf((i + 0.5) / TRACE_POINTS) for i in range(TRACE_POINTS)])
            samples = d.median * np.exp(d.sigma * z)
            samples *= d.mean / samples.mean()  # the quantiles' mean falls short by the tail they cut (0.4 % at sigma 1.5)
        else:
            samples = d.samples
        path = Path(out_dir) / f"latency-{tag or 'shifted'}.csv"
        path.write_text("\n".join(f"{x:.5f}" for x in np.maximum(0.0, samples + extra_s) * 1e3) + "\n")
        return f"trace:{path}"
    if isinstance(d, Constant):
        return ms(d.seconds + extra_s)
    if isinstance(d, Uniform):
        return f"uniform:{ms(d.lo + extra_s)},{ms(d.hi + extra_s)}"
    if isinstance(d, Normal) and d.mu > 4 * d.sd:  # not clipped at 0 in practice: a shift moves every draw
        return f"normal:{ms(d.mu + extra_s)},{ms(d.sd)}"
    if isinstance(d, (Exponential, ShiftedExponential)):
        shift = getattr(d, "shift_s", 0.0)
        return f"shifted-exp:{ms(shift + extra_s)},{ms(d.mean_s)}"
    raise ZsgdError(f"cannot add the measured hop time to --latency {latency}: a twin takes constant, uniform, normal or exp "
                    f"(lognormal and trace where it can write a trace)")


def decentralized_latency(run_dir: str | Path, latency: str, bandwidth: str | None = None) -> str:
    """``--latency`` for a decentralized run's twin: the emulated one plus the run's mean relay overhead.

    With a finite ``bandwidth`` the hops also hold each message's time on its link (and the queue of a node's
    copies on it), which the simulator models itself: added again, a 100 Mbps ring's twin ran 73 % slow. The
    relay's own handling cannot be told apart from the link's time in a hop, so it is left out there."""
    if bandwidth is not None:
        from zsgd.network import parse_bandwidth

        if parse_bandwidth(bandwidth) != float("inf"):
            return latency
    extra = relay_overhead_s(run_dir, latency)
    return latency if extra is None else shifted_latency(latency, extra)


def compute_trace(run_dir: str | Path, out: str | Path, steps: int = 1, per_round: bool = False) -> str:
    """``--compute`` for the twin: the workers' turnaround quantiles as a trace written to ``out``, else their mean.

    ``steps``: gradient steps per turnaround (``localsgd:K`` takes K between replies, cadmm its primal steps).
    ``per_round`` (the central simulator, local SGD): a turnaround is one draw of a whole round
    (``round:trace:FILE``), since a real worker's K steps are slow or fast together, and K independent draws of a
    K-th of it made the twin's rounds too even (its slowest worker 10 % early). Otherwise (the decentralized
    simulator, which draws per step) each sample is divided by ``steps``."""
    samples = turnaround_samples(run_dir)
    prefix = "round:" if per_round and steps > 1 else ""
    if not prefix:
        samples = [x / steps for x in samples]
    if not samples:
        return f"{prefix}{summary(run_dir)['compute_s_mean'] * 1000 / (1 if prefix else steps):.4f}ms"
    Path(out).write_text("\n".join(f"{x:.4f}" for x in samples) + "\n")
    return f"{prefix}trace:{out}"


__all__ = ["accuracies", "broker_overhead_s", "central_latency", "central_server", "compute_trace", "decentralized_latency", "events", "metrics_path", "relay_overhead_s", "round_close_s", "shifted_latency",
           "staleness_p99", "steady", "steps_per_turnaround", "summary", "turnaround_samples"]
