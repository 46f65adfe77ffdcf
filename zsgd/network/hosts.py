"""The host model: a host's cores, shared by every thread of a run that lives on it.

Why: on a machine with fewer cores than busy threads, a run's processes take
turns. ``zsgd run --n-proc 8`` on a 2-core laptop puts the server's step, its
ZeroMQ I/O thread, eight workers (each with its own I/O thread) and the
evaluator on two cores; a simulator that gives each its own core predicts
the knee far too late and K servers scaling that cannot happen (on 2 cores
the real K = 2 and 4 plateaus do not pass K = 1's).

How: egalitarian processor sharing. A job is some CPU work (seconds on one
core) with a demand (how many threads it keeps busy at once: a worker's step 1,
the K range servers' steps of one update K). While the total
demand D of the running jobs exceeds the host's C cores, every thread runs
at C / D of a core; otherwise at full speed. Because every running job
advances at the same rate, one work clock serves them all: a job that
starts when the clock reads S with work W ends when it reads S + W, so the
next job to end is the head of a heap, and only that one end is scheduled
on the event queue (a generation number discards ends that a later change
of the rate moved). Each start or end is O(log jobs).

A ``FifoStage`` is a single thread that serves its requests one at a time
(the server's step; a server's ZeroMQ I/O thread): each request is a job on
the host's pool, so the stage slows down when the host is busy. A message
crossing loopback with the transport measured is such a request
(``crossing_stage``): the time a lone crossing takes in the echo with one
client, of which the server's I/O thread holds the stage only for its own
measured share (``io_share``: that thread's CPU over the lone exchange's
time); the rest (the peer's copy, the wake-ups) runs after it on the pool,
beside the next crossing, so that the CPU of the whole crossing is what the
lone echo's threads took. The contention of several in flight is this
sharing, not a measured figure. With a NIC given by hand a crossing is an
occupancy instead: it takes the given time and keeps its threads busy
meanwhile (``CpuPool.occupy``).
"""

from __future__ import annotations

import heapq
import math
import os
from collections import deque
from dataclasses import dataclass
from typing import Callable

from zsgd.errors import ZsgdError

Done = Callable[[float], None]  # called with the time a job ends
Schedule = Callable[[float, "CpuPool", int], None]  # push an event: (time, pool, generation)

PLACEMENTS = ("spread", "local")


def this_machines_cores() -> int:
    """The cores this process may run on (a container's or a taskset's limit, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_host_cores(text: str | int | float | None, auto: float | None = None) -> float:
    """``--host-cores N``: cores per simulated host (``auto``: ``auto`` if given -- a replayed calibration's machine --
    else this machine's)."""
    value = host_cores_spec(text)
    return float(auto if auto is not None else this_machines_cores()) if value is None else value


def host_cores_spec(text: str | int | float | None) -> float | None:
    """``--host-cores`` as given: a number of cores, or None for ``auto`` (resolved where the machine is known)."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "auto")):
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ZsgdError(f"--host-cores must be a number of cores > 0 or 'auto', got {str(text)[:40]!r}") from None
    if not math.isfinite(value) or value <= 0 or value > 65536:
        raise ZsgdError(f"--host-cores must be a number of cores in (0, 65536] or 'auto', got {str(text)[:40]!r}")
    return value


def parse_placement(text: str) -> str:
    """``--placement``: ``spread`` (the server on a host of its own, each worker on its own; a cluster) or ``local``
    (the server and every worker on one host, as ``zsgd run --n-proc N`` on this machine)."""
    value = str(text).strip().lower()
    if value not in PLACEMENTS:
        raise ZsgdError(f"--placement must be one of {', '.join(PLACEMENTS)}, got {str(text)[:40]!r}")
    return value


@dataclass
class Job:
    end_work: float  # the pool's work clock when this job is done
    demand: float
    done: Done | None
    cancelled: bool = False
    started_work: float = 0.0


class CpuPool:
    """One host's cores, shared by the jobs running on it (see the module docstring)."""

    def __init__(self, cores: float, schedule: Schedule) -> None:
        if cores <= 0:
            raise ZsgdError(f"a host needs cores > 0, got {cores}")
        self.cores, self.schedule = float(cores), schedule
        self.work = 0.0  # CPU-seconds every running thread has had since the start
        self.t = 0.0
        self.demand = 0.0
        self.heap: list[tuple[float, int, Job]] = []
        self.seq = 0
        self.generation = 0
        self.busy_core_s = 0.0  # cores x seconds in use (utilisation, for the summary)

    def rate(self) -> float:
        """The speed of each running thread now: 1 with a core each, C / D when D threads share C cores."""
        return 1.0 if self.demand <= self.cores else self.cores / self.demand

    def _advance(self, now: float) -> None:
        dt = now - self.t
        if dt > 0:
            self.work += dt * self.rate()
            self.busy_core_s += dt * min(self.demand, self.cores)
            self.t = now

    def start(self, now: float, work: float, demand: float = 1.0, done: Done | None = None) -> Job:
        """A job of ``work`` CPU-seconds (per thread) on ``demand`` threads starts now; ``done(t)`` when it ends."""
        self._advance(now)
        job = Job(self.work + max(0.0, work), demand, done, started_work=self.work)
        self.seq += 1
        heapq.heappush(self.heap, (job.end_work, self.seq, job))
        self.demand += demand
        self._reschedule(now)
        return job

    def occupy(self, now: float, threads: float) -> None:
        """``threads`` more (or, negative, fewer) threads busy for a time set elsewhere (a message crossing at the
        measured speed of this host's transport): they take their share of the cores without being slowed."""
        self._advance(now)
        self.demand = max(0.0, self.demand + threads)
        self._reschedule(now)

    def attained(self, now: float, job: Job) -> float:
        """CPU-seconds ``job`` has had so far."""
        self._advance(now)
        return self.work - job.started_work

    def cancel(self, now: float, job: Job) -> None:
        """``job`` stops now, undone (its ``done`` is not called)."""
        if job.cancelled:
            return
        self._advance(now)
        job.cancelled = True
        self.demand = max(0.0, self.demand - job.demand)
        self._reschedule(now)

    def on_event(self, now: float, generation: int) -> None:
        """The scheduled end of the next job (ignored if a later change of rate moved it)."""
        if generation != self.generation:
            return
        self._advance(now)
        finished = []
        tolerance = 1e-12 * max(1.0, self.work)
        while self.heap and self.heap[0][0] <= self.work + tolerance:
            job = heapq.heappop(self.heap)[2]
            if not job.cancelled:
                job.cancelled = True  # done: a later cancel is a no-op
                self.demand = max(0.0, self.demand - job.demand)
                finished.append(job)
        self._reschedule(now)
        for job in finished:
            if job.done is not None:
                job.done(now)

    def _reschedule(self, now: float) -> None:
        heap = self.heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        self.generation += 1
        if heap:
            self.schedule(now + max(0.0, heap[0][0] - self.work) / self.rate(), self, self.generation)


class FifoStage:
    """A thread that serves one request at a time, in arrival order, on a host's pool.

    ``spread``: the coefficient of variation of a request's work (None or 0: each takes exactly what it is given).
    Given, each request's work is drawn from a gamma distribution with that mean and spread, from a generator
    seeded with ``seed`` (so a run is the same every time). Why: a real stage's times vary (a lone exchange on the
    2-core VM, load 8.9: p10 3.5 ms, p90 12.5 ms), and with constant times two workers fall into a perfect
    pipeline through a serial stage at once, where the real ones queue behind each other now and then: the real
    curve bends gradually towards its plateau, a constant-time model's has a sharp knee.

    ``tail``: the fraction of each request's time that does not hold the stage: when the stage's own part is done
    the next request starts, and the tail runs on the pool (``tail_demand`` threads) before ``done`` is called."""

    def __init__(self, pool: CpuPool, demand: float = 1.0, spread: float | None = None, seed: int = 0, tail: float = 0.0,
                 tail_demand: float = 0.0) -> None:
        self.pool, self.demand = pool, demand
        self.tail, self.tail_demand = float(tail), float(tail_demand)  # the share of each request that runs after it leaves the stage
        self.queue: deque[tuple[float, Done]] = deque()
        self.busy = False
        self.spread = float(spread) if spread else None
        self.shape = 1.0 / (spread * spread) if spread else None  # gamma(k, 1/k): mean 1, coefficient of variation 1/sqrt(k)
        if self.shape is not None:
            import numpy as np

            self.rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x57A6E])

    def submit(self, now: float, work: float, done: Done) -> None:
        if self.shape is not None:
            work *= float(self.rng.gamma(self.shape, 1.0 / self.shape))
        self.queue.append((work, done))
        if not self.busy:
            self._next(now)

    def _next(self, now: float) -> None:
        if not self.queue:
            self.busy = False
            return
        self.busy = True
        work, done = self.queue.popleft()

        def finished(t: float) -> None:
            if self.tail > 0:
                self.pool.start(t, work * self.tail, self.tail_demand, done)
            else:
                done(t)
            self._next(t)

        self.pool.start(now, work * (1.0 - self.tail), self.demand, finished)


def crossing_stage(pool: CpuPool, servers: int, threads: float | None, io_share: float | None, spread: float | None = None,
                   seed: int = 0) -> FifoStage:
    """The server's I/O thread (K of them, each crossing its range of every message: one stage of K threads and 1/K
    of the work) for crossings whose time is the lone echo's. ``threads``: the threads a lone exchange keeps busy on
    average (None, a record from before it was measured: 2, the I/O thread and its peer's for the whole crossing).
    ``io_share``: the fraction of a lone exchange's time the echo server's I/O thread was on a core; the stage is
    held that long, and the rest of the crossing runs after it on ``(threads - io_share) / (1 - io_share)`` threads
    (the same CPU in all). None (a record from before it was measured): the stage is held for the whole crossing,
    on ``threads`` threads."""
    busy = 2.0 if threads is None else float(threads)
    if io_share is None:
        return FifoStage(pool, busy * servers, spread, seed)
    share = min(1.0, max(0.05, float(io_share)))
    rest = max(0.0, busy - share) / (1.0 - share) if share < 1.0 else 0.0
    return FifoStage(pool, float(servers), spread, seed, tail=1.0 - share, tail_demand=rest * servers)


__all__ = ["CpuPool", "FifoStage", "crossing_stage", "Job", "PLACEMENTS", "host_cores_spec", "parse_host_cores", "parse_placement", "this_machines_cores"]
