"""A worker's hops to and from its broker beyond the emulated delays: what a simulated twin adds to its latency.

Why: in an emulated run the broker holds each update and each reply for a
drawn delay, which the simulator models. What it does not model is the rest
of the way: the worker's link thread and ZeroMQ's I/O threads (the
message's transfer included), the broker's receive before the hold, the
reply's encoding and send, and the thread wake-ups on a shared host; and,
after an update's hold, its wait for the broker's loop while that loop
receives and sends other messages or is not yet awake (``zsgd.runtime.emulation.loop_wait``: the
simulator's server is its engine's step alone, so the wait behind other
updates' steps, which it models as its queue, is left out of it). Those
hand-offs grow with the host's load, so they are measured in the run
itself: the broker stamps each reply (``protocol.REPLY_HOP``: when it took
the update the reply answers off its socket, when the reply's hold was due
to end, and that update's loop wait), and the worker takes its update's
hand-off to the socket and the reply's arrival at it
(``BrokerLink.last_forward``, ``last_arrival``) against them. All on one
host's monotonic clock. The twin reads the logged means
(``zsgd.experiments.twin.broker_overhead_s``).

The stamps change nothing in a run: a reply without them is not counted, and
malformed or implausible ones are ignored and counted.
"""

from __future__ import annotations

from typing import Any

from zsgd.errors import ProtocolError
from zsgd.runtime.emulation import SteadyMeans
from zsgd.wire import protocol

LOGGED = "broker hop ms (mean up, mean down; hops, ignored"  # the log line's head, which the twin reads
MAX_HOP_S = 60.0  # a hop beyond the emulated delay longer than this is not a measurement of one host's hand-offs
EARLY_S = 0.1  # the link thread stamps its send after handing it over: a preempted one may stamp after the broker's receipt


def overrun(t0: float, computed: float, ended: float, target_s: float, slowdown: float) -> float:
    """Seconds an emulated stretch held a step beyond the simulator's step (0 if none, or if it was cut short).

    ``zsgd.runtime.worker.replies.stretch_step`` holds a step that started at ``t0`` (its gradient done at
    ``computed``) to the drawn ``target_s`` (``--inject-compute``), then ``slowdown`` times that (a straggler),
    and ends when the worker's thread wakes (``ended``): late by a wake-up, 1-3 ms at load 7 here, or by a
    gradient slower than its draw. The simulator's step is the draw, or the turnaround, times the slowdown, so
    that lateness is the update's to carry: the first part of its up hop. A stretch cut short (a message
    ended it, a K-sync abandon) measures nothing."""
    if target_s <= 0 and slowdown <= 1.0:
        return 0.0
    late = ended - t0 - slowdown * (target_s if target_s > 0 else computed - t0)
    return late if late > 0 else 0.0


class BrokerHops:
    """Per reply: ``up`` (update handed to the link thread -> the engine, less the emulated uplink; the link thread's
    own wait before the socket is in the worker's turnaround already), ``down`` (the reply's emulated downlink due to
    end -> its arrival at this worker's socket) and ``wait`` (the update's ``loop_wait``, stamped by the broker),
    seconds; kept as running sums (``SteadyMeans``)."""

    def __init__(self) -> None:
        self.sums = SteadyMeans(3)  # up, down, wait
        self.ignored = 0
        self._handing = 0.0  # the latest update's hand-off to the link thread (``handed``)

    def handed(self, seconds: float) -> None:
        """The worker's own hand-off of its update to its link thread (the copy into shared memory, the frames), which
        no turnaround holds (``BrokerLink.send``), and its stretch's ``overrun``: the first part of the up hop of the
        reply that answers it."""
        self._handing = seconds

    def record(self, meta: dict[str, Any], forward: float, arrival: float) -> None:
        """One reply's ``meta`` and this worker's clock: when its last update went to the socket and this reply came."""
        try:
            stamps = protocol.reply_hop(meta)
        except ProtocolError:
            self.ignored += 1
            return
        if stamps is None:
            return
        up, down = self._handing + stamps[0] - forward, arrival - stamps[1]
        wait = stamps[2] if len(stamps) > 2 else 0.0  # a broker of before the loop wait was stamped: none
        self._handing = 0.0
        if forward <= 0 or not (-EARLY_S <= up <= MAX_HOP_S and -EARLY_S <= down <= MAX_HOP_S and 0.0 <= wait <= MAX_HOP_S):
            self.ignored += 1
            return
        self.sums.add(up, down, wait)

    def means_ms(self) -> tuple[float, float, int, float] | None:
        """Mean up hop, down hop (ms) after the first quarter of replies, how many, and their mean loop wait (ms); None
        with fewer than 10.

        A quarter, as the steady state a twin is judged on (``zsgd sim --validate`` skips a quarter of the
        updates, the fidelity cells a fifth to a quarter): the first replies of a run hold its start-up (the
        first evaluation, a partner run's workers loading their kernels), up hops of 0.1-0.8 s at load 6."""
        if self.sums.count < 10:
            return None
        (up, down, wait), n = self.sums.steady()
        return 1e3 * up, 1e3 * down, n, 1e3 * wait

    def line(self) -> str | None:
        """The log line the twin reads (``LOGGED``; its fifth value the loop wait), or None with too few replies stamped."""
        means = self.means_ms()
        if means is None:
            return None
        return f"{LOGGED}; loop wait; after the first quarter): {means[0]:.4f},{means[1]:.4f},{means[2]},{self.ignored},{means[3]:.4f}"
