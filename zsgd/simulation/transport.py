"""The cost the simulator measures for moving messages through one server: ``--broker-bandwidth measured``.

Why: on one machine (or any fast network) what bounds a parameter server is
not its optimizer step but moving every message through ZeroMQ and the
kernel. A cnn update is 4.8 MB each way; the server's ZeroMQ I/O thread
copies both through TCP, one message after another. With the NIC modelled
as infinite the simulator predicted 4-7x the real updates/s
(``benchmarks/bench_server_capacity.py``); with the bytes/s a raw ZeroMQ
echo moves here it predicted the saturation knee.

How: a ROUTER echo (its own ZeroMQ context, so its own I/O thread, as the
broker has) and a few DEALER clients on ``tcp://127.0.0.1`` that each keep
one message of the model's size in flight (``copy=False``, as the
runtime sends), like pipelined workers with no compute. The echo's
messages/s at saturation times the message size is the bytes/s the server
moves *each way* (the figure ``--broker-bandwidth`` takes: the simulator
queues received and sent messages separately, each at this rate). The
median of a few short bursts is kept, so one busy moment does not set it.

The overlap: the same echo, in bursts that alternate with bursts where
its loop does a memory-bound pass of about 0.7 of a message's time per
message (the server's step sits there: same thread, between receiving and
replying). If the pass hides behind the I/O the server's stages work in
tandem (overlap 1); if the two add, the step holds up receiving (overlap
0). On the 2-core development VM, where the clients share the cores, it
measured 0.1-0.8 (noisy) and the real server's plateau had matched
1 / (1/echo + step) rather than the tandem's 1 / max(1/echo, step).

The lone echo: the same echo with one client, so one message in flight.
A lone exchange (two crossings) is what a crossing costs when it has the
cores; ``--placement local`` charges every crossing that CPU work and lets
the host's processor sharing make the contention (the 1-client echo moved
about 1.5x the 4-client one's bytes/s here at light load, and charging
every crossing the loaded speed made one worker alone 40 % slow). Its
bursts alternate with the 4-client ones, so a change of load on the
machine hits both alike. Beside its time, the CPU it takes: the lone echo
runs every thread it has in this process (the client, both contexts' I/O
threads, the echo's loop), so this process's CPU clock over a burst,
divided by the burst's wall time, is how many threads a lone exchange keeps
busy on average (``lone_threads``). On the 2-core VM it measured 0.6-0.9,
not the 2 threads a crossing was charged before: a lone message's copies
and wake-ups mostly take turns, so the host model that charged 2 threads
for its whole time saw twice the CPU there is (its plateau was 10-13 %
low, and a 4-client echo it could not explain).

The echo runs in a thread of this process: ZeroMQ's I/O threads do the
copies without the GIL, and the Python around each message is a few
microseconds. Checked against an echo in a child process (as
``benchmarks/bench_broker.py`` runs it), cnn size, 4 and 8 clients, three
rounds on the loaded 2-core VM: 0.60-0.94 GB/s in a thread, 0.63-0.83 GB/s
in a child: the same within the noise, without the 0.1 s of starting one.

Kept with the simulator's other measured figures (``zsgd.simulation.calibration``):
once per machine and message size, so repeated ``zsgd sim`` invocations do
not pay the ~1 s again, and give the same metrics.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

#: Bytes each burst moves (each way): the cnn's 4.8 MB messages make about 20 exchanges a burst.
BURST_BYTES = 96 * 2**20
MIN_MESSAGES, MAX_MESSAGES = 4, 800  # per burst: huge models send fewer, tiny ones are capped
#: Lone and 4-client bursts, alternating: a burst of the cnn is about 60 ms on a quiet 2-core VM and one moved by 20 %
#: between quiet minutes, so the figure is the median of several, each a burst of its own minute's noise.
BURSTS = 7
PAIRS = 5  # plain and loaded bursts, alternating, behind the overlap
CLIENTS = 4
#: Counts calibrations (echo and overlap) made in this process (tests check the caches with it, never with time).
measurements = 0


def messages_per_burst(nbytes: int) -> int:
    """Exchanges timed per burst for messages of ``nbytes``: about ``BURST_BYTES``, within [4, 800]."""
    return max(MIN_MESSAGES, min(MAX_MESSAGES, BURST_BYTES // max(1, int(nbytes))))


def _tids() -> set[int]:
    """This process's threads (Linux; elsewhere none, and the I/O thread's share is not measured)."""
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def _io_threads(started: set[int]) -> list[int]:
    """The ZeroMQ I/O threads among ``started`` (libzmq names them ``ZMQbg/IO/n``, from inside the new thread: asked
    once the first replies are in, not the moment the context starts them)."""
    found = []
    for tid in sorted(started):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith("ZMQbg/IO"):
                    found.append(tid)
        except OSError:
            pass
    return found


def thread_cpu(tids: list[int]) -> float | None:
    """CPU seconds the threads ``tids`` of this process have had (Linux's per-thread CPU clock: nanoseconds, where
    ``/proc``'s ticks are 10 ms, a third of a burst); None where it cannot be read."""
    try:
        return sum(time.clock_gettime(((~tid) << 3) | 6) for tid in tids) if tids else None  # MAKE_THREAD_CPUCLOCK(tid, SCHED)
    except (OSError, OverflowError, ValueError):
        return None


def _echo(ctx, nbytes: int, ready: list, stop: threading.Event, work: "Callable[[], object] | None", loaded: threading.Event) -> None:
    """A ROUTER that answers every message with a buffer of ``nbytes``, after ``work()`` while ``loaded`` is set
    (a stand-in for the server's step: the same thread, between receiving and replying, as in the broker)."""
    import numpy as np
    import zmq

    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.sndhwm = sock.rcvhwm = 64
    ready.append(sock.bind_to_random_port("tcp://127.0.0.1"))
    reply = np.ones(max(1, int(nbytes)), np.uint8)
    try:
        while not stop.is_set():
            if sock.poll(20):
                ident, _payload = sock.recv_multipart(copy=False)
                if work is not None and loaded.is_set():
                    work()
                sock.send_multipart([ident, reply], copy=False)
    finally:
        sock.close(linger=0)


def measure_transport(nbytes: int, bursts: int = BURSTS, clients: int = CLIENTS, messages: int | None = None,
                      timeout_s: float = 30.0, work: "Callable[[], object] | None" = None,
                      threads: list[float] | None = None, spreads: list[float] | None = None,
                      io: list[float] | None = None) -> list[float]:
    """Bytes/s each way of one ZeroMQ echo server for ``nbytes`` messages, one figure per burst.

    ``clients`` DEALERs each keep one message in flight; the first
    ``clients`` replies are a warm-up (connections, first touches of the
    buffers), then each burst times ``messages`` replies. With ``work``, the
    echo does it per message in every odd burst (plain and loaded bursts
    alternate, so a change of load on the machine hits both alike). ``threads``: given, each burst's CPU
    time of this process over its wall time is appended to it (the threads the echo kept busy on average);
    ``spreads``: each burst's coefficient of variation of the time between replies (with one client: of an exchange);
    ``io``: each burst's CPU time of the echo server's ZeroMQ I/O thread over its wall time (the share of the time
    that one thread, which every message of a server passes, was on a core; nothing where it cannot be read)."""
    import numpy as np
    import zmq

    from zsgd.errors import ZsgdError

    nbytes = max(1, int(nbytes))
    per_burst = messages or messages_per_burst(nbytes)
    server_ctx, client_ctx = zmq.Context(io_threads=1), zmq.Context(io_threads=2)
    stop, ready, loaded = threading.Event(), [], threading.Event()
    thread = threading.Thread(target=_echo, args=(server_ctx, nbytes, ready, stop, work, loaded), name="zsgd-transport-echo", daemon=True)
    before = _tids()
    thread.start()
    socks: list = []
    try:
        deadline = time.monotonic() + timeout_s
        while not ready:
            if time.monotonic() > deadline or not thread.is_alive():
                raise ZsgdError("--broker-bandwidth measured: the echo server did not start")
            time.sleep(0.001)
        started = _tids() - before if io is not None else set()  # the echo's context started its threads with its socket
        io_tids: list[int] = []
        payload = np.zeros(nbytes, np.uint8)
        poller = zmq.Poller()
        for _ in range(clients):
            s = client_ctx.socket(zmq.DEALER)
            s.linger = 0
            s.sndhwm = s.rcvhwm = 64
            s.connect(f"tcp://127.0.0.1:{ready[0]}")
            poller.register(s, zmq.POLLIN)
            socks.append(s)
        for s in socks:
            s.send(payload, copy=False)
        stamps: list[float] = []
        cpu: list[float] = []  # this process's CPU clock at each stamp (every thread of the echo lives here)
        io_cpu: list[float | None] = []  # the echo server's I/O thread's CPU clock at each stamp
        need = clients + bursts * per_burst
        while len(stamps) < need:
            if time.monotonic() > deadline:
                raise ZsgdError(f"--broker-bandwidth measured: {len(stamps)} of {need} echoes in {timeout_s:g} s")
            for s, _ in poller.poll(100):
                s.recv(copy=False)
                stamps.append(time.perf_counter())
                cpu.append(time.process_time())
                if started and len(stamps) == clients:  # the warm-up's end, the first mark: named by now
                    io_tids = _io_threads(started)
                io_cpu.append(thread_cpu(io_tids) if io_tids else None)
                done = len(stamps) - clients
                if work is not None and done >= 0 and done % per_burst == 0:
                    (loaded.set if (done // per_burst) % 2 else loaded.clear)()
                s.send(payload, copy=False)
        marks = stamps[clients - 1::per_burst]  # burst b spans marks[b] -> marks[b + 1]
        if threads is not None:
            cpu_marks = cpu[clients - 1::per_burst]
            threads += [(d - c) / (b - a) for a, b, c, d in zip(marks, marks[1:], cpu_marks, cpu_marks[1:]) if b > a]
        io_marks = io_cpu[clients - 1::per_burst]
        if io_tids and None not in io_marks:
            io += [(d - c) / (b - a) for a, b, c, d in zip(marks, marks[1:], io_marks, io_marks[1:]) if b > a]
        if spreads is not None:
            for first in range(clients - 1, need - 1, per_burst):
                gaps = [b - a for a, b in zip(stamps[first:first + per_burst], stamps[first + 1:first + per_burst + 1])]
                if len(gaps) > 1 and statistics.fmean(gaps) > 0:
                    spreads.append(statistics.pstdev(gaps) / statistics.fmean(gaps))
        return [per_burst * nbytes / (b - a) for a, b in zip(marks, marks[1:]) if b > a]
    finally:
        stop.set()
        for s in socks:
            s.close(linger=0)
        thread.join(timeout=5)
        client_ctx.term()
        server_ctx.term()


@dataclass(frozen=True)
class Transport:
    """What one server does with messages of one size on this machine.

    ``bytes_per_s``: what the echo moves each way with several clients in
    flight (the server's throughput). ``overlap``: how much of a server's
    step runs beside its socket I/O, from 1 (a core to spare: receiving the
    next update, stepping and sending proceed in tandem) to 0 (the step
    holds up receiving, so their times add at saturation).
    ``lone_bytes_per_s``: the same echo with one client, so one message in
    flight and nothing else wanting the cores: a lone exchange (two
    crossings) takes ``message / lone_bytes_per_s``. ``--placement local``
    charges each crossing that CPU work and lets the host's cores share it
    out (``zsgd.network.hosts``); None when the NIC was given by hand.
    ``lone_threads``: the threads a lone exchange keeps busy on average (this
    process's CPU over the lone bursts' wall time): a crossing's demand on
    the host; None (a record from before it was measured, or a NIC given by
    hand): 2, the server's I/O thread and its peer's for the whole time.
    ``lone_spread``: the coefficient of variation of a crossing's time: a lone
    exchange's, times sqrt(2) (its two crossings drawn apart add their
    variances), which ``--placement local`` gives each crossing's work
    (``zsgd.network.hosts.FifoStage``). ``io_share``: the fraction of a lone exchange's time the echo server's
    ZeroMQ I/O thread was on a core (its CPU clock): the one serial part of a crossing, which ``--placement
    local`` holds the server's I/O thread for (the rest of a crossing runs beside the next one); None (a record
    from before it was measured): the whole crossing holds it."""

    bytes_per_s: float
    overlap: float
    lone_bytes_per_s: float | None = None  # measured: one client's echo, one message in flight (what a crossing costs with the cores)
    lone_threads: float | None = None  # measured: CPU / wall of the lone echo (how many threads a crossing keeps busy)
    lone_spread: float | None = None  # measured: coefficient of variation of a lone exchange's time (None: constant)
    io_share: float | None = None  # measured: the echo server's I/O thread's CPU over a lone exchange's time (None: all of it)


def dispersion(samples: list[float]) -> float | None:
    """How far a median of ``samples`` can be trusted: their median absolute deviation over their median (0.1: half
    the bursts within 10 % of it), recorded beside each calibrated figure; None for fewer than two."""
    if len(samples) < 2:
        return None
    mid = statistics.median(samples)
    return float(statistics.median(abs(x - mid) for x in samples) / abs(mid)) if mid else None


def busy_work(seconds: float) -> "tuple[Callable[[], object], float]":
    """A memory-bound pass over float32 data (the shape of the server's fused step) sized to take about
    ``seconds`` here, and its measured median time."""
    import numpy as np

    data = np.ones(1 << 20, np.float32)
    for _ in range(2):  # sized at a probe's speed, then at its own (caches make small passes faster per element)
        per_element = _median_call(lambda: np.multiply(data, 1.0, out=data), 5) / data.size
        data = np.ones(max(1024, int(seconds / max(per_element, 1e-12))), np.float32)

    def work() -> object:
        return np.multiply(data, 1.0, out=data)

    return work, _median_call(work, 7)


def _median_call(fn: "Callable[[], object]", reps: int) -> float:
    """Median seconds of ``reps`` calls of ``fn`` (here, not ``calibrate.timings``: the broker's loop there measures
    the echo of this module, and the two must not import each other)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def overlap_from(echo_s: float, loaded_echo_s: float, work_s: float) -> float:
    """The overlap f that explains an echo taking ``loaded_echo_s`` per message with ``work_s`` of work in
    its loop, against ``echo_s`` without: ``loaded = echo + work - f * min(echo, work)``, so f = 1 when the
    shorter hid behind the longer (stages in tandem) and f = 0 when the two added in full."""
    if min(echo_s, work_s) <= 0:
        return 1.0
    return float(min(1.0, max(0.0, (echo_s + work_s - loaded_echo_s) / min(echo_s, work_s))))


def measure_server_transport(nbytes: int, bursts: int | None = None, pairs: int | None = None) -> tuple[Transport, dict]:
    """The echo's bytes/s with one client (lone) and with several, then bursts of the same echo alternately plain
    and doing about 0.7 of a message's time in work per message: the overlap is the median over those pairs.

    The server's stages are three: receive, step, send. With cores to spare
    they work in tandem and a step shorter than a message's I/O costs no
    throughput; on a host whose cores are all busy (clients on the same
    machine, a small VM) the step and the copies take turns on the same
    cores and their times add (measured on the 2-core development VM: the
    real plateau matched 1 / (1/echo + step), not 1 / max(1/echo, step)).
    Which one this host gives is measured, not assumed."""
    global measurements
    nbytes = max(1, int(nbytes))
    bursts, pairs = bursts or BURSTS, pairs or PAIRS
    measurements += 1
    lone, samples, threads, spreads, io, loaded_io = [], [], [], [], [], []
    for _ in range(bursts):  # alternating, so a change of load on the machine hits both alike
        lone += measure_transport(nbytes, bursts=1, clients=1, threads=threads, spreads=spreads, io=io)
        samples += measure_transport(nbytes, bursts=1, io=loaded_io)
    work, work_s = busy_work(0.7 * nbytes / float(statistics.median(samples)))
    paired = measure_transport(nbytes, bursts=2 * pairs, work=work)
    plain, loaded = paired[0::2], paired[1::2]
    overlaps = [overlap_from(nbytes / p, nbytes / q, work_s) for p, q in zip(plain, loaded)]
    bps = float(statistics.median(samples + plain))
    value = Transport(bps, float(statistics.median(overlaps)), *lone_figures(lone, threads, spreads, io))
    return value, {"samples": samples + plain, "loaded_samples": loaded, "overlaps": overlaps, "work_s": work_s, "lone_samples": lone,
                   "lone_thread_samples": threads, "lone_spread_samples": spreads, "io_share_samples": io,
                   "loaded_io_share_samples": loaded_io,  # the I/O thread's busy share with 4 clients: near 1, it was what held them
                   "dispersion": {"bytes_per_s": dispersion(samples + plain), "lone_bytes_per_s": dispersion(lone),
                                  "lone_threads": dispersion(threads), "io_share": dispersion(io)}}


def lone_figures(lone: list[float], threads: list[float], spreads: list[float], io: list[float]) -> tuple:
    """The lone echo's figures from its bursts (each a median): bytes/s, threads busy (never more than its two copying
    threads), a crossing's spread (an exchange's, times sqrt 2: half an exchange, drawn alone), the I/O thread's share
    (at most all of the time; None where it was not measured)."""
    busy = float(min(2.0, max(0.05, statistics.median(threads)))) if threads else 2.0
    spread = float(min(3.0, math.sqrt(2.0) * statistics.median(spreads))) if spreads else 0.0
    share = float(min(1.0, max(0.01, statistics.median(io)))) if io else None
    return float(statistics.median(lone)), busy, spread, share


def server_transport(nbytes: int, calibration: Any = None) -> Transport:
    """:class:`Transport` for ``nbytes`` messages on this machine: measured once, then kept by ``calibration``
    (a ``zsgd.simulation.calibration.Calibration``; default: this process's)."""
    from zsgd.simulation.calibration import current

    nbytes = max(1, int(nbytes))

    def measure() -> dict:
        value, details = measure_server_transport(nbytes)
        return {"bytes_per_s": value.bytes_per_s, "overlap": value.overlap, "lone_bytes_per_s": value.lone_bytes_per_s,
                "lone_threads": value.lone_threads, "lone_spread": value.lone_spread, "io_share": value.io_share, **details}

    entry = (calibration or current()).get("transport", {"message_bytes": nbytes}, measure)
    lone = entry.get("lone_bytes_per_s")  # None: a replayed record from before the lone echo was measured
    busy = entry.get("lone_threads")  # None: a replayed record from before the lone echo's CPU was measured
    spread = entry.get("lone_spread")  # None: nor its spread (each crossing then takes its mean)
    share = entry.get("io_share")  # None: nor its I/O thread's share (a crossing then holds that thread throughout)
    return Transport(float(entry["bytes_per_s"]), float(entry["overlap"]), *(None if v is None else float(v) for v in (lone, busy, spread, share)))


__all__ = ["Transport", "busy_work", "dispersion", "lone_figures", "measure_server_transport", "measure_transport",
           "messages_per_burst", "overlap_from", "server_transport", "thread_cpu"]
