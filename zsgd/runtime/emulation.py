"""Emulated network conditions for real runs, from the simulator's models.

``zsgd run`` can hold real messages back by samples of the same
``zsgd.network`` objects ``zsgd sim`` uses, so one spec (``--latency
lognormal:20ms,0.5 --stragglers 0.1:4x``) means the same thing in a
simulation and on real sockets. Everything here is sans-IO: the broker asks
``LinkEmulator`` how long a message should take, parks it in a
``DelayQueue`` and sends what is due each time round its poll loop::

    emu = LinkEmulator(network, stragglers=None, seed=cfg.seed)
    queue = DelayQueue()
    # instead of sending a reply at once:
    queue.push((identity, msg), now, emu.delay(worker, up=False, nbytes=n))
    # in the poll loop (poll timeout: min(tick, queue.next_due() - now)):
    for identity, msg in queue.pop_due(now):
        send(identity, msg)

Delaying at the broker (both directions: incoming updates are parked before
``on_update``) keeps workers unchanged and needs no clock agreement between
machines.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Iterable

from zsgd.errors import ZsgdError
from zsgd.network.compute_draw import ComputeDraw
from zsgd.network.link_draws import LinkDraws
from zsgd.network import (Delay, Measured, Network, StragglerSpec, Stragglers, parse_bandwidth, parse_compute, parse_delay,
                           parse_duration, parse_failures, parse_loss, parse_stragglers, parse_worker_latency)

__all__ = [
    "DelayQueue", "LinkEmulator", "Measured", "Network", "parse_bandwidth", "parse_compute", "parse_delay", "parse_duration",
    "parse_failures", "parse_loss", "parse_stragglers", "parse_worker_latency",
]


class DelayQueue:
    """Items held until a due time; items due at the same time leave in push order.

    No clock inside: the caller passes ``now`` (wall or virtual seconds), so
    the same queue serves the broker and tests.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()

    def push(self, item: Any, now: float, delay: float) -> float:
        """Hold ``item`` for ``delay`` seconds from ``now``; returns its due time."""
        if delay < 0:
            raise ValueError(f"delay must be >= 0, got {delay}")
        due = now + delay
        heapq.heappush(self._heap, (due, next(self._seq), item))
        return due

    def pop_due(self, now: float) -> list[Any]:
        """Every item due at or before ``now``, earliest first."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
        return out

    def next_due(self) -> float | None:
        """When the next item is due (None: empty); use it as the poll timeout."""
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)


class LinkEmulator:
    """Samples per-message delays, straggler slowdowns and (``--inject-compute``) compute times for a real run."""

    def __init__(self, network: Network, stragglers: StragglerSpec | None = None, n_workers: int = 1, seed: int = 0,
                 compute: Delay | None = None, nic_bandwidth: float = float("inf")) -> None:
        self.network = network
        self.nic_bandwidth = nic_bandwidth  # bytes/s of the server's own NIC (--inject-broker-bandwidth), shared by all
        self._rx_free = self._tx_free = 0.0  # when the NIC has received / sent what it holds
        self.links = LinkDraws(seed)  # each link's own stream: the twin draws the same latency for the same message
        self.stragglers: Stragglers | None = stragglers.assign(n_workers, seed) if stragglers is not None else None
        self.compute: ComputeDraw | None = ComputeDraw(compute, seed) if compute is not None else None
        self.update_received: dict[int, float] = {}  # when the broker took each worker's latest update off its socket
        self.update_due: dict[int, float] = {}  # ... and when its emulated hold was due to end (emulation.loop_wait)
        self._link_free: dict[int, float] = {}  # peer_delay: when each sender's link has sent what it holds

    def compute_target(self, worker: int, local_steps: int = 1) -> float | None:
        """Seconds ``worker``'s next step should take (its reply carries them; the worker stretches its step to
        them), drawn as ``zsgd sim --compute`` draws that step; None without --inject-compute."""
        return None if self.compute is None else self.compute.next(worker, local_steps)

    def delay(self, worker: int, up: bool, nbytes: int) -> float:
        """Seconds to hold one message of ``nbytes`` to (up=False) or from (up=True) ``worker``."""
        return self.network.delay(worker, up, nbytes, self.links)

    def update_delay(self, worker: int, nbytes: int, now: float) -> float:
        """Seconds to hold an update that arrives from ``worker`` at ``now``: its uplink, then the server's NIC,
        which takes one message at a time (``zsgd sim --broker-bandwidth``: reserved in the order they are sent)."""
        d = self.delay(worker, True, nbytes)
        if self.nic_bandwidth != float("inf"):
            self._rx_free = max(now + d, self._rx_free) + nbytes / self.nic_bandwidth
            d = self._rx_free - now
        self.update_received[worker] = now  # the broker's reply stamps this worker's hop to here (parameter_server)
        self.update_due[worker] = now + d
        return d

    def reply_delay(self, worker: int, nbytes: int, now: float) -> float:
        """Seconds to hold a reply to ``worker`` sent at ``now``: the server's NIC sends one message at a time
        (beside its receiving), then the worker's downlink, as ``zsgd sim`` models them."""
        d = self.delay(worker, False, nbytes)
        if self.nic_bandwidth == float("inf"):
            return d
        self._tx_free = max(now, self._tx_free) + nbytes / self.nic_bandwidth
        return self._tx_free - now + d

    def peer_delay(self, worker: int, nbytes: int, now: float) -> float:
        """Seconds to hold one peer message that ``worker`` sends at ``now`` (decentralized runs). Its link
        sends one message at a time, as ``zsgd sim`` models a node (the k-th message of a round arrives after
        k + 1 message times, plus the latency): a node's copies to its neighbours queue on its one link."""
        wait = max(0.0, self._link_free.get(worker, now) - now)
        self._link_free[worker] = now + wait + nbytes / self.network.bandwidth
        return wait + self.delay(worker, True, nbytes)

    def slowdown(self, worker: int, now: float) -> float:
        """Factor by which ``worker``'s step starting at ``now`` is slowed (1.0: not a straggler)."""
        return 1.0 if self.stragglers is None else self.stragglers.factor(worker, now)


def emulator_from_specs(latency: str | None, bandwidth: str | None, loss: str | None, stragglers: str | None,
                        n_workers: int, seed: int, compute: str | None = None, broker_bandwidth: str | None = None) -> "LinkEmulator | None":
    """The ``--inject-*`` and ``--stragglers`` specs as a LinkEmulator, or None when they emulate nothing.

    One function, so that the coordinator and every range server of
    ``--servers K`` emulate the same network: each server delays its own
    link's messages by its own share of the bytes.
    """
    from zsgd.network import Constant

    if not (latency or bandwidth or loss or stragglers or compute or broker_bandwidth):
        return None
    lat = parse_delay(latency or "0", "--inject-latency")
    net = Network(latency_up=lat, latency_down=lat, bandwidth=parse_bandwidth(bandwidth or "inf"), loss=parse_loss(loss or "0"))
    spec = parse_stragglers(stragglers) if stragglers else None
    draw = parse_delay(compute, "--inject-compute") if compute else None
    if isinstance(draw, Constant) and draw.seconds == 0:
        draw = None  # "0": no step is stretched
    try:
        nic = parse_bandwidth(broker_bandwidth or "inf")
    except ZsgdError as exc:
        raise ZsgdError(f"--inject-broker-bandwidth: {exc}") from None
    if (isinstance(lat, Constant) and lat.seconds == 0 and net.bandwidth == float("inf") and net.loss == 0 and spec is None and draw is None
            and nic == float("inf")):
        return None  # "0", "inf", "none": nothing to emulate
    return LinkEmulator(net, spec, n_workers=n_workers, seed=seed, compute=draw, nic_bandwidth=nic)


# -- what an emulated run measures of itself: shared by the broker (its stamps) and the workers (their hops) --

def loop_wait(due: float, start: float, steps: Iterable[tuple[float, float]]) -> float:
    """Seconds an update whose emulated hold was ``due`` to end waited until the engine took it (``start``), less the
    engine's ``steps`` ((start, end) of other updates) in between: the broker's one loop receiving and sending other
    messages, and waking. The simulator's server queues an update behind the other updates' steps itself (its
    ``--broker-time``), not behind the rest: at 8 workers and 10 ms on 2 cores the loop's receive, step and reply
    send of an update took 0.7 ms, its step 0.2 ms, and a held update waited 0.6-2.2 ms for the loop at load 5-8."""
    if start <= due:
        return 0.0
    busy = sum(max(0.0, min(end, start) - max(begin, due)) for begin, end in steps)
    return max(0.0, start - due - busy)


class SteadyMeans:
    """Running sums of a few quantities, and their means after the first quarter of the samples (a run's start-up).

    Not one value per sample: a long run takes millions. The sums are also noted at every ``stride``-th sample, at
    most ``2 * CHECKPOINTS`` of them: when that many, every other one goes and the stride doubles. The first
    quarter is then exact up to ``2 * CHECKPOINTS`` samples, and within ``1 / CHECKPOINTS`` of them beyond."""

    CHECKPOINTS = 64

    def __init__(self, width: int) -> None:
        self.count = 0
        self.sums = [0.0] * width
        self._stride = 1
        self._marks: list[tuple[int, list[float]]] = [(0, [0.0] * width)]  # (count, sums) at every stride-th sample

    def add(self, *values: float) -> None:
        self.count += 1
        self.sums = [s + v for s, v in zip(self.sums, values)]
        if self.count % self._stride == 0:
            self._marks.append((self.count, self.sums))
            if len(self._marks) > 2 * self.CHECKPOINTS:
                self._marks = self._marks[::2]  # counts 0, 2*stride, 4*stride, ...
                self._stride *= 2

    def steady(self) -> tuple[list[float], int]:
        """The means after the first quarter (from the latest mark no later than it), and how many samples they hold."""
        k, skipped = max((m for m in self._marks if m[0] <= self.count // 4), key=lambda m: m[0])
        n = self.count - k
        return [(s - s0) / n if n else 0.0 for s, s0 in zip(self.sums, skipped)], n
