"""Where a server's time per update goes: the profile behind ``bench_broker.py --profile``.

Two views of the same pipelined load (``bench_broker.measure``), each from
its own round so that neither distorts the other:

* **CPU by thread and by kind of code** (``perf record`` of the server
  process, when ``perf`` is installed): the main thread's step kernels
  (numba's JIT code), the Python interpreter, system calls, libzmq; the
  ZeroMQ I/O thread (TCP copies in and out); pyzmq's garbage-collector
  thread (frees zero-copy buffers). The raw ROUTER echo is profiled the same
  way, so the table says what zsgd adds to the transport, per update, in
  CPU time: robust to a shared machine's load, unlike wall time.
* **The broker's stages one by one** (in this process, on the thread's CPU
  clock): header decode, validation, byte accounting, header encode, a
  tracked and an untracked zero-copy send, the step in and out of place,
  the ledger with its metrics line; and a worker's two thread hand-offs
  (compute thread -> link thread over an inproc pipe, and back), as one
  exchange through ``BrokerLink`` beside one straight through a DEALER.
  (A profiler inside the broker was tried
  and dropped: cProfile's own cost per Python call, a microsecond or two,
  swamps stages that cost ten.)
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

def _cpu_us(fn: Callable[[], object], reps: int) -> float:
    """Median CPU microseconds of ``fn`` (this thread's clock: a busy machine's preemption is not counted)."""
    for _ in range(min(20, reps)):
        fn()
    runs = []
    for _ in range(5):
        t0 = time.thread_time()
        for _ in range(reps):
            fn()
        runs.append((time.thread_time() - t0) / reps * 1e6)
    return statistics.median(runs)


def _cold_us(fn: Callable[[], object], reps: int, evict: Any) -> float:
    """Median CPU microseconds of ``fn`` run cold: before each call a pass over ``evict`` (larger than the last-level
    cache) throws this thread's data out of it, as a 4.8 MB transfer does between two messages in the server."""
    fn()
    times = []
    for _ in range(reps):
        evict += 1
        t0 = time.thread_time()
        fn()
        times.append((time.thread_time() - t0) * 1e6)
    return statistics.median(times)


def stage_costs(n_params: int, reps: int = 400) -> list[tuple[str, float, float]]:
    """CPU µs of each stage, warm and cold (``_cold_us``), of the broker's path for one cnn-size update, alone, on this thread, as the broker runs it:
    the header decode and checks, validation, byte accounting, the WEIGHTS encode, a zero-copy tracked and untracked
    send (inproc, received at once), the step in place and out of place (fused numba kernels), and the ledger with
    its metrics line (a file flushed per line, as a run's)."""
    import numpy as np
    import zmq

    from zsgd.core.config import TrainConfig
    from zsgd.core.problem import Problem
    from zsgd.nn.optim import make_optimizer
    from zsgd.nn.server_step import is_finite
    from zsgd.output.metrics import MetricsWriter
    from zsgd.wire import protocol

    rng = np.random.default_rng(0)
    g = (rng.standard_normal(n_params) * 1e-3).astype(np.float32)
    w = rng.standard_normal(n_params).astype(np.float32)
    run = "0123456789ab"
    frames = protocol.encode(protocol.update_message(run, 3, 1200, g, 64, 0.53, compute_s=0.0123))
    msg = protocol.decode(frames)
    reply = protocol.weights_message(run, 1201, w)
    evict = np.zeros(64 << 18, np.float32)  # 64 MB: twice this machine's L3, and most machines'

    def both(fn: Callable[[], object], n: int = reps) -> tuple[float, float]:
        return _cpu_us(fn, n), _cold_us(fn, 60, evict)

    rows = [("decode UPDATE: header parse and checks, array views", *both(lambda: protocol.decode(frames))),
            ("validate_update: run, worker, shape, meta", *both(lambda: protocol.validate_update(
                msg, run=run, known_workers={3}, n_params=n_params, require_finite=False))),
            ("message_nbytes: the update's bytes (its header encoded again)", *both(lambda: protocol.message_nbytes(msg))),
            ("encode WEIGHTS: header JSON and its re-parse", *both(lambda: protocol.encode(reply))),
            ("encode WEIGHTS without the re-parse (the server's reply)", *both(lambda: protocol.encode(reply, check=False)))]
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    b.setsockopt(zmq.ROUTING_ID, b"w")
    a.bind("inproc://stage-costs")
    b.connect("inproc://stage-costs")
    b.send(b"hi")
    a.recv_multipart()
    out = protocol.encode(reply)
    for track in (True, False):
        def send() -> None:
            a.send_multipart([b"w", *out], copy=False, track=track)
            b.recv_multipart(copy=False)

        rows.append((f"zero-copy send of WEIGHTS, {'tracked' if track else 'untracked'} (inproc, with the receive)", *both(send)))
    a.close(linger=0)
    b.close(linger=0)
    ctx.term()
    opt = make_optimizer("momentum", n_params, 0.001)
    spare = np.empty_like(w)

    def in_place() -> None:
        if is_finite(g):
            opt.step(w, g)

    def out_of_place() -> None:
        opt.step_into(w, g, spare)

    rows.append(("the step in place: numba finite check + momentum", *both(in_place, 50)))
    rows.append(("the step out of place (a reply in flight): one fused pass", *both(out_of_place, 50)))
    cfg = TrainConfig(model="logreg", data="embedded", steps=10**9, eval_every=10**9).validate()
    with tempfile.TemporaryDirectory() as tmp, MetricsWriter(Path(tmp) / "metrics.jsonl") as metrics:
        ledger = Problem.from_config(cfg).ledger(cfg, emit=metrics.write)
        count = iter(range(1, 10**9))
        rows.append(("ledger.applied: counts, the update's metrics line (flushed), eval and stop checks",
                     *both(lambda: ledger.applied(1.0, version=next(count), n_samples=64, worker=3, staleness=1, lr=0.001))))
    return rows


#: A ROUTER that answers every message with the same WEIGHTS (frames encoded once): the far end of ``handoff_costs``.
WEIGHTS_ECHO = r"""
import sys, zmq, numpy as np
sys.path.insert(0, sys.argv[3])
from zsgd.wire import protocol
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.linger = 0
s.bind(sys.argv[1]); frames = protocol.encode(protocol.weights_message("0123456789ab", 1, np.ones(int(sys.argv[2]), np.float32)))
print("ready", flush=True)
while True:
    parts = s.recv_multipart(copy=False)
    if len(parts) == 2 and parts[1].bytes == b"bye":
        break
    s.send_multipart([parts[0], *frames], copy=False)
"""


def handoff_costs(n_params: int, reps: int = 100, rounds: int = 3) -> tuple[list[float], list[float]]:
    """Milliseconds per exchange (update up, weights down, tcp loopback) from the calling thread: straight through a
    DEALER, and through a worker's ``BrokerLink`` (compute thread -> inproc PAIR -> link thread -> DEALER, and back).
    The difference is the two hand-offs. Alternating rounds; each is the median of ``reps``."""
    import numpy as np
    import zmq

    from bench_broker import free_port
    from zsgd.wire import protocol
    from zsgd.wire.link import BrokerLink

    root = str(Path(__file__).resolve().parents[1])
    port = free_port()
    echo = subprocess.Popen([sys.executable, "-c", WEIGHTS_ECHO, f"tcp://127.0.0.1:{port}", str(n_params), root],
                            stdout=subprocess.PIPE, text=True)
    echo.stdout.readline()
    g = np.ones(n_params, np.float32)
    update = protocol.update_message("0123456789ab", 0, 1, g, 64, 0.5)
    ctx = zmq.Context()
    direct, linked = [], []
    try:
        d = ctx.socket(zmq.DEALER)
        d.linger = 0
        d.connect(f"tcp://127.0.0.1:{port}")
        link = BrokerLink(ctx, f"tcp://127.0.0.1:{port}", b"profile-link", run="0123456789ab", worker=0, heartbeat=60, timeout=120).open()

        def through_dealer() -> None:
            protocol.send(d, update)
            protocol.recv(d)

        def through_link() -> None:
            link.send(update)
            while not isinstance(link.recv(10.0), protocol.Message):
                pass

        for _ in range(rounds):
            for fn, out in ((through_dealer, direct), (through_link, linked)):
                for _ in range(5):
                    fn()
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                out.append(statistics.median(times) * 1e3)
        link.close(flush=False)
        d.send(b"bye")
        echo.wait(timeout=10)
        d.close()
    finally:
        if echo.poll() is None:
            echo.kill()
        ctx.term()
    return direct, linked


def _kind(comm: str, pid: str, tid: str, dso: str) -> tuple[str, str]:
    if comm.startswith("ZMQbg/IO"):
        thread = "ZeroMQ I/O thread"
    elif comm.startswith("ZMQbg"):
        thread = "ZeroMQ reaper"
    elif pid == tid:
        thread = "main thread"
    else:
        thread = "other Python threads (pyzmq gc)"
    if "kernel" in dso:
        code = "kernel (TCP copies, system calls)"
    elif "perf-" in dso or "JIT" in dso:
        code = "numba kernels (the step)"
    elif "libpython" in dso:
        code = "Python interpreter"
    elif "zmq" in dso:
        code = "libzmq, pyzmq"
    else:
        code = "libc, numpy, other"
    return thread, code


class PerfRecorder:
    """``perf record`` of one process for ``seconds``, after ``delay``, in a thread; ``split()`` reads it."""

    def __init__(self, delay: float, seconds: float) -> None:
        self.delay, self.seconds = delay, seconds
        self.dir = Path(tempfile.mkdtemp(prefix="bench-perf-"))
        self.data = self.dir / "perf.data"
        self.window = (0.0, 0.0)
        self._thread: threading.Thread | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("perf") is not None

    def start(self, pid: int) -> None:
        def record() -> None:
            time.sleep(self.delay)  # past start-up and warm-up
            t0 = time.monotonic()
            subprocess.run(["perf", "record", "-q", "-o", str(self.data), "-p", str(pid), "--", "sleep", str(self.seconds)],
                           capture_output=True, timeout=self.seconds + 60)
            self.window = (t0, time.monotonic())

        self._thread = threading.Thread(target=record, daemon=True)
        self._thread.start()

    def split(self) -> dict[tuple[str, str], float]:
        """CPU seconds by (thread, kind of code) over the recorded window (cpu-clock samples, their periods summed)."""
        if self._thread is not None:
            self._thread.join(timeout=self.seconds + 90)
        out = subprocess.run(["perf", "script", "-i", str(self.data), "-F", "comm,pid,tid,period,ip,dso"],
                             capture_output=True, text=True, timeout=300)
        shutil.rmtree(self.dir, ignore_errors=True)
        cpu: Counter = Counter()
        for line in out.stdout.splitlines():
            head, _, dso = line.rpartition("(")
            parts = head.split()
            if len(parts) < 4 or "/" not in parts[-3]:
                continue
            pid, tid = parts[-3].split("/", 1)
            comm = " ".join(parts[:-3])
            cpu[_kind(comm, pid, tid, dso)] += int(parts[-2]) / 1e9  # cpu-clock periods are nanoseconds
        return dict(cpu)


def perf_table(raw: dict[tuple[str, str], float], raw_updates: float, zs: dict[tuple[str, str], float], zs_updates: float) -> list[str]:
    """Markdown rows: CPU µs per update by (thread, code), raw echo beside zsgd, and the difference."""
    keys = sorted(set(raw) | set(zs), key=lambda k: -zs.get(k, 0.0))
    lines = ["| thread | code | raw echo µs/update | zsgd µs/update | zsgd - raw |", "|---|---|---:|---:|---:|"]
    for k in keys:
        r, z = raw.get(k, 0.0) / max(raw_updates, 1) * 1e6, zs.get(k, 0.0) / max(zs_updates, 1) * 1e6
        if max(r, z) >= 1.0:
            lines.append(f"| {k[0]} | {k[1]} | {r:.0f} | {z:.0f} | {z - r:+.0f} |")
    r, z = sum(raw.values()) / max(raw_updates, 1) * 1e6, sum(zs.values()) / max(zs_updates, 1) * 1e6
    lines.append(f"| **all** | | **{r:.0f}** | **{z:.0f}** | **{z - r:+.0f}** |")
    return lines


def profile(measure: Any, workers: int, client_procs: int, seconds: float, warmup: float, out: Path) -> None:
    """Print both views for K = 1 (``measure`` is ``bench_broker.measure``)."""
    import os

    window = max(1.0, seconds - 1.0)
    if PerfRecorder.available():
        rates, splits = {}, {}
        for mode in ("raw", "zsgd"):
            rec = PerfRecorder(delay=warmup + 3.0, seconds=window)  # the servers start, the clients join, then warm up
            rates[mode] = measure(mode, workers, 1, client_procs, seconds + 3.0, warmup, out / f"perf-{mode}", on_start=lambda ps, r=rec: r.start(ps[0].pid))
            splits[mode] = rec.split()
        print(f"\nCPU per update by thread and code (perf record of the server process for {window:g} s of a {workers}-worker pipelined load; "
              f"raw echo {rates['raw']:.0f}/s, zsgd {rates['zsgd']:.0f}/s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n")
        for line in perf_table(splits["raw"], rates["raw"] * window, splits["zsgd"], rates["zsgd"] * window):
            print(line)
    else:
        print("\n(perf is not installed: no CPU split by thread; apt-get install linux-perf, or linux-tools)")
    print(f"\nThe broker's stages for one cnn-size update, each alone on this thread (CPU µs; warm: median of 5 runs of a loop; "
          f"cold: median of 60 calls, each after a pass over 64 MB; load average {os.getloadavg()[0]:.1f})\n")
    print("| stage | warm CPU µs | cold CPU µs |")
    print("|---|---:|---:|")
    for label, warm, cold in stage_costs(1_199_882):
        print(f"| {label} | {warm:.1f} | {cold:.1f} |")
    direct, linked = handoff_costs(1_199_882)
    print(f"\nA worker's hand-offs: one exchange (4.8 MB up, 4.8 MB down, tcp, a WEIGHTS echo) from the compute thread, ms, "
          f"median of 100 per round, {len(direct)} alternating rounds; load average {os.getloadavg()[0]:.1f}\n")
    print("| path | ms (median of rounds) | per round |")
    print("|---|---:|---|")
    print(f"| straight through a DEALER | {statistics.median(direct):.2f} | {', '.join(f'{x:.2f}' for x in direct)} |")
    print(f"| through BrokerLink: inproc PAIR to the link thread and back | {statistics.median(linked):.2f} | "
          f"{', '.join(f'{x:.2f}' for x in linked)} |")
    print(f"| the two hand-offs | {statistics.median(linked) - statistics.median(direct):+.2f} | |")
