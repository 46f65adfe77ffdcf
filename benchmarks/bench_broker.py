"""Server throughput: N pipelined synthetic workers against a real ``zsgd broker``,
beside a raw pyzmq ROUTER echo with the same clients and payload, in the same run.

Each synthetic worker speaks zsgd's protocol (HELLO, ASSIGN, HELLO ready,
then UPDATE -> WEIGHTS for ever) with a pre-computed ``cnn``-size gradient
(1,199,882 float32: 4.8 MB up, 4.8 MB down) and no compute: the moment its
weights arrive it sends the next update, so the server is the only thing
that limits the rate. The reference is the same client processes, with the
same sockets and payload, against a ROUTER that echoes a buffer of the same
size (no decode, no validation, no optimizer step). A shared machine's speed
drifts, so in every round (``--rounds``) both servers and both sets of clients
are up at once and take turns of ``--slice`` seconds (``interleaved_round``);
the ratio is taken within each pair of turns, and the table reports medians.
``--against TREE`` adds a third side, zsgd from another source tree (a
before/after in the same seconds).

Sharded servers (``--servers K``): a worker holds one link (a DEALER) per
server, and an exchange is complete when every link's reply has arrived;
the flat vector is split into K contiguous ranges balanced by bytes. The
raw echo runs K echo processes; zsgd runs ``zsgd broker --servers K``
(the coordinator serves range 0 and starts K-1 range servers).

``--only step`` times the server's step alone, in this process, on a cnn-size
vector: the unfused path (numpy finite check, then the in-place momentum
kernel, plus a snapshot copy when a reply of the live weights is still in
flight) beside the fused kernels of ``zsgd.nn.server_step`` (a numba finite
check, then in place; or one out-of-place pass with the check inside).

``--profile``: where the server's time per update goes (``broker_profile.py``).

``--census``: which step the loaded server takes (in place, out of place from its buffer pool, out of place
into a fresh buffer) and the CPU each costs there, per round (``step_census.py``).

Run: ``python benchmarks/bench_broker.py [--workers 4] [--servers 1,2,4] [--rounds 3] [--slices-per-round 6] [--slice 1] [--against TREE] [--only step|exchange] [--profile] [--census]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zsgd.wire.memory import MMAP_THRESHOLD, TRIM_THRESHOLD, keep_message_memory  # noqa: E402
from zsgd.wire.security import RUN_SECRET_FILE  # noqa: E402
from zsgd.wire.synthetic import SyntheticWorker, join_all  # noqa: E402

N_PARAMS = 1_199_882
ENV = os.environ | {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
#: The raw echo's processes with glibc's thresholds fixed as zsgd fixes its own (zsgd.wire.memory): left to adapt,
#: a fresh echo process took 0 or ~450 page faults per update depending on its first frees, and moved the
#: reference by 40 % between rounds. ``--raw-as-pyzmq`` leaves them as they come.
RAW_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}

ECHO_SERVER = r"""
import sys, zmq, numpy as np
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.linger = 0; s.sndhwm = s.rcvhwm = 64
s.bind(sys.argv[1]); reply = np.ones(int(sys.argv[2]), np.float32)
print("ready", flush=True)
try:
    while True:
        ident, payload = s.recv_multipart(copy=False)
        s.send_multipart([ident, reply], copy=False)
except KeyboardInterrupt:  # the benchmark's way of ending it
    pass
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranges(n: int, k: int) -> list[tuple[int, int]]:
    """K contiguous ranges of a flat float32 vector, balanced by bytes (a sharded server's split)."""
    cuts = [round(i * n / k) for i in range(k + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(k)]


def read_token(path: Path, timeout_s: float = 120.0) -> str:
    """The run secret ``zsgd broker`` writes for workers started by hand (RUN_DIR/keys/run.json), once it is there."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return json.loads(path.read_text())["token"]
        except (OSError, ValueError, KeyError):
            if time.monotonic() > deadline:
                raise SystemExit(f"no run secret in {path} within {timeout_s:g} s") from None
            time.sleep(0.05)  # the broker writes it once its socket is bound


# ------------------------------------------------------------------ client process


class RawWorker:
    """The raw side's synthetic worker: one DEALER per echo endpoint, the vector split as ``ranges`` says, the same
    calls as ``zsgd.wire.synthetic.SyntheticWorker`` (which speaks zsgd's protocol to a broker) so one pump drives both."""

    def __init__(self, ctx: zmq.Context, endpoints: list[str], grad: np.ndarray) -> None:
        self.grad, self.links, self.span, self.waiting = grad, [], {}, 0
        for ep, lo_hi in zip(endpoints, ranges(len(grad), len(endpoints))):
            d = ctx.socket(zmq.DEALER)
            d.linger = 0
            d.sndhwm = d.rcvhwm = 64
            d.connect(ep)
            self.links.append(d)
            self.span[d] = lo_hi

    def send(self) -> None:
        for d in self.links:
            lo, hi = self.span[d]
            d.send(self.grad[lo:hi], copy=False)
        self.waiting = len(self.links)

    def on_reply(self, d: zmq.Socket) -> bool:
        while True:
            try:
                d.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return self.waiting == 0
            self.waiting -= 1

    def close(self) -> None:
        for d in self.links:
            d.close(linger=0)


def client_main(args: argparse.Namespace) -> None:
    """One client process driving several synthetic workers; prints {"exchanges": n, "seconds": s}.

    raw: ``RawWorker``, one DEALER per echo endpoint. zsgd: ``zsgd.wire.synthetic.SyntheticWorker``, the one the
    simulator's calibration of the broker loop uses: it joins the broker and every range server its ASSIGN names
    (``--servers K``), exactly as ``zsgd.runtime.worker.sharded_worker`` does.
    """
    endpoints = args.endpoints.split(",")
    token = read_token(Path(args.keys_file)) if args.keys_file else None
    keep_message_memory()  # zsgd: as a worker's link does when it opens; raw: as RAW_MEMORY (off with ZSGD_KEEP_MEMORY=0)
    grad = np.random.default_rng(0).standard_normal(N_PARAMS).astype(np.float32) * np.float32(1e-3)
    ctx = zmq.Context()
    if args.mode == "raw":
        workers = [RawWorker(ctx, endpoints, grad) for _ in args.client_workers.split(",")]
    else:  # the handshake: the broker first, then every range server its ASSIGN names
        workers = [SyntheticWorker(ctx, endpoints[0], int(w), token, N_PARAMS, batch=64, grad=grad) for w in args.client_workers.split(",")]
        join_all(workers, timeout_s=120)
    owner = {d: worker for worker in workers for d in worker.links}
    poller = zmq.Poller()
    for d in owner:
        poller.register(d, zmq.POLLIN)

    def pump(t_measure: float, t_end: float, drain: bool) -> int:
        """Exchanges until ``t_end``, counting those done from ``t_measure``; with ``drain``, no exchange starts
        after ``t_end`` and every one in flight is waited for (and counted), so the server is idle on return."""
        counted = 0
        for worker in workers:
            worker.send()
        while True:
            now = time.monotonic()
            if now >= t_end and (not drain or not any(worker.waiting for worker in workers)):
                return counted
            for d, _ in poller.poll(100):
                worker = owner[d]
                in_flight = worker.waiting > 0  # else only a heartbeat: read, not counted
                if worker.on_reply(d) and in_flight:  # every range is back: one exchange done, start the next
                    now = time.monotonic()
                    if now >= t_measure:
                        counted += 1
                    if now < t_end:
                        worker.send()

    if args.slices:  # the parent's turns: "go SECONDS" runs one slice and reports it, "end" (or EOF) ends
        for line in sys.stdin:
            if not line.startswith("go "):
                break
            t0, c0, f0 = time.monotonic(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            n = pump(t0, t0 + float(line.split()[1]), drain=True)
            print(json.dumps({"exchanges": n, "seconds": time.monotonic() - t0, "cpu_s": time.process_time() - c0,
                              "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}), flush=True)
    else:
        t_start = time.monotonic()
        t_measure, t_end = t_start + args.warmup, t_start + args.warmup + args.seconds
        counted = pump(t_measure, t_end, drain=False)
        elapsed = min(time.monotonic(), t_end) - t_measure
        print(json.dumps({"exchanges": counted, "seconds": elapsed}), flush=True)
    for worker in workers:
        worker.close()
    ctx.term()


# ------------------------------------------------------------------ servers


def start_echo(k: int, tuned: bool = True) -> tuple[list[subprocess.Popen], list[str]]:
    """K raw ROUTER echo processes, with ``RAW_MEMORY``'s thresholds when ``tuned`` (and not ZSGD_KEEP_MEMORY=0)."""
    env = ENV | (RAW_MEMORY if tuned and os.environ.get("ZSGD_KEEP_MEMORY", "1") != "0" else {})
    procs, eps = [], []
    for lo, hi in ranges(N_PARAMS, k):
        ep = f"tcp://127.0.0.1:{free_port()}"
        p = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, ep, str(hi - lo)], stdout=subprocess.PIPE, text=True, env=env)
        p.stdout.readline()
        procs.append(p)
        eps.append(ep)
    return procs, eps


def start_brokers(k: int, n_workers: int, out: Path, prefix: list[str] | None = None, tree: str = "",
                  idle_ok: bool = False) -> tuple[list[subprocess.Popen], list[str]]:
    """``zsgd broker --servers K``: the coordinator (range 0) starts K-1 range servers itself. ``prefix``: the
    interpreter's arguments before ``broker`` (default ``-m zsgd``; ``--profile`` puts cProfile in front); ``tree``:
    the zsgd source tree it runs from (default this one); ``idle_ok``: its clients sit out other sides' turns, so
    it waits for them far longer than a dead worker's timeout."""
    port = free_port()
    env = ENV | ({"PYTHONPATH": str(Path(tree).resolve())} if tree else {})
    liveness = ["--heartbeat", "5", "--timeout", "300"] if idle_ok else ["--heartbeat", "1", "--timeout", "30"]
    p = subprocess.Popen([sys.executable, *(prefix or ["-m", "zsgd"]), "broker", "--workers", str(n_workers), "--servers", str(k), "--model", "cnn", "--data", "embedded",
                          "--algo", "async", "--port", str(port), "--no-evaluator", "--quiet", "--checkpoint-every", "0",
                          "--eval-every", "100000000", "--steps", "100000000", "--lr", "0.001", "--lr-schedule", "constant",
                          *liveness, "--out", str(out)],
                         env=env, cwd=str(Path(tree).resolve()) if tree else None, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    keys, deadline = out / "keys" / RUN_SECRET_FILE, time.monotonic() + 120
    while not (keys.exists() and keys.stat().st_size > 0):  # written once it listens; a refused command ends at once
        if p.poll() is not None:
            lines = p.stderr.read().strip().splitlines() or [f"exit {p.returncode}"]
            raise RuntimeError(f"zsgd broker --servers {k} ended before it listened: {lines[-1]}")
        if time.monotonic() > deadline:
            p.kill()
            raise RuntimeError(f"zsgd broker --servers {k} wrote no {keys} within 120 s")
        time.sleep(0.02)
    return [p], [f"tcp://127.0.0.1:{port}"]


def measure(mode: str, n_workers: int, k: int, client_procs: int, seconds: float, warmup: float, out: Path,
            on_start: Callable[[list[subprocess.Popen]], None] | None = None, prefix: list[str] | None = None) -> float:
    """Exchanges per second summed over every worker. ``on_start``: called with the server processes once they
    are started (``--profile`` attaches perf); ``prefix``: see ``start_brokers``."""
    servers, eps = (start_echo(k) if mode == "raw" else start_brokers(k, n_workers, out, prefix))
    if on_start is not None:
        on_start(servers)
    try:
        groups = [list(range(n_workers))[i::client_procs] for i in range(min(client_procs, n_workers))]
        clients = [subprocess.Popen([sys.executable, __file__, "--client", mode, "--endpoints", ",".join(eps),
                                     "--client-workers", ",".join(map(str, g)), "--seconds", str(seconds), "--warmup", str(warmup),
                                     *(["--keys-file", str(out / "keys" / RUN_SECRET_FILE)] if mode == "zsgd" else [])],
                                    env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for g in groups]
        rate = 0.0
        for c in clients:
            so, se = c.communicate(timeout=seconds + warmup + 180)
            if c.returncode != 0:
                detail = servers[0].stderr.read() if mode == "zsgd" and servers[0].poll() is not None else ""
                raise RuntimeError(f"client failed: {se[-2000:]} {detail[-2000:]}")
            r = json.loads(so.strip().splitlines()[-1])
            rate += r["exchanges"] / r["seconds"]
        return rate
    finally:
        for p in servers:
            p.send_signal(signal.SIGINT)  # the broker ends its run and writes summary.json
        for p in servers:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def process_cpu_s(pid: int) -> float:
    """CPU seconds process ``pid`` has run so far, all its threads (the scheduler's nanoseconds, not ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            pass
    return total * 1e-9


def _minor_faults(pid: int) -> int:
    """Minor page faults of process ``pid`` so far, all its threads (/proc/PID/stat, field 10)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def interleaved_round(sides: dict[str, str], n_workers: int, k: int, client_procs: int, slices: int, slice_s: float,
                      warmup: float, out: Path, raw_as_pyzmq: bool = False) -> dict[str, dict[str, list[float]]]:
    """One round of the exchange table: every side's servers and client processes up at once, the sides taking
    turns of ``slice_s`` seconds (order rotated every turn; each turn drains its exchanges, so the server the
    next side uses is the only busy one), ``slices`` turns each after one unmeasured turn of ``warmup`` s.

    ``sides``: name -> "raw" or a zsgd source tree ("" for this one). Run one after the other, each side 7-10 s
    after the last, the sides' ratio took the machine's drift: the raw echo moved 407 -> 505 -> 589 updates/s over
    three quiet rounds while zsgd stayed at 376-388. Per side and turn: updates/s over all workers, and the server
    processes' CPU ms per update (the coordinator's, all threads, the ZeroMQ I/O thread included)."""
    servers: dict[str, list[subprocess.Popen]] = {}
    clients: dict[str, list[subprocess.Popen]] = {}
    result = {name: {"rate": [], "server_cpu_ms": [], "client_cpu_ms": [], "server_faults": [], "client_faults": []} for name in sides}
    groups = [list(range(n_workers))[i::client_procs] for i in range(min(client_procs, n_workers))]

    def turn(name: str, seconds: float) -> tuple[float, int, float, float, int, int]:
        pid = servers[name][0].pid
        cpu0, faults0, client_cpu, client_faults = process_cpu_s(pid), _minor_faults(pid), 0.0, 0
        for c in clients[name]:
            c.stdin.write(f"go {seconds}\n")
            c.stdin.flush()
        rate, n = 0.0, 0
        for c in clients[name]:
            line = c.stdout.readline()
            if not line:
                raise RuntimeError(f"a {name} client ended: {c.stderr.read()[-2000:]}")
            r = json.loads(line)
            rate, n, client_cpu = rate + r["exchanges"] / r["seconds"], n + r["exchanges"], client_cpu + r["cpu_s"]
            client_faults += r["faults"]
        return rate, n, process_cpu_s(pid) - cpu0, client_cpu, _minor_faults(pid) - faults0, client_faults

    try:
        for name, tree in sides.items():
            servers[name], eps = (start_echo(k, tuned=not raw_as_pyzmq) if tree == "raw" else start_brokers(k, n_workers, out / name, tree=tree, idle_ok=True))
            mode = "raw" if tree == "raw" else "zsgd"
            clients[name] = [subprocess.Popen([sys.executable, __file__, "--client", mode, "--slices", "--endpoints", ",".join(eps),
                                               "--client-workers", ",".join(map(str, g)),
                                               *(["--keys-file", str(out / name / "keys" / RUN_SECRET_FILE)] if mode == "zsgd" else [])],
                                              env=ENV | ({"ZSGD_KEEP_MEMORY": "0"} if raw_as_pyzmq and mode == "raw" else {}), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                             for g in groups]
        names = list(sides)
        for name in names:
            turn(name, warmup)
        for i in range(slices):
            for name in names[i % len(names):] + names[:i % len(names)]:
                rate, n, cpu, client_cpu, faults, client_faults = turn(name, slice_s)
                for key, value in (("rate", rate), ("server_cpu_ms", 1e3 * cpu / max(n, 1)), ("client_cpu_ms", 1e3 * client_cpu / max(n, 1)),
                                   ("server_faults", faults / max(n, 1)), ("client_faults", client_faults / max(n, 1))):
                    result[name][key].append(value)
        return result
    finally:
        for c in (c for cs in clients.values() for c in cs):
            try:
                c.stdin.close()  # EOF: the client ends
                c.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                c.kill()
        for p in (p for ps in servers.values() for p in ps):
            p.send_signal(signal.SIGINT)
        for p in (p for ps in servers.values() for p in ps):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def exchange_table(args: argparse.Namespace, ks: list[int]) -> None:
    """The pipelined exchange: every side in every round (``interleaved_round``); ratios per turn pair, medians."""
    msg_bytes = 4 * N_PARAMS  # each way
    sides = {"raw": "raw", "zsgd": ""} | ({"against": args.against} if args.against else {})
    tmp = Path(tempfile.mkdtemp(prefix="bench-broker-"))
    load0 = os.getloadavg()[0]
    rows: dict[int, dict[str, dict[str, list[float]]]] = {}
    try:
        for k in ks:
            rows[k] = {name: {"rate": [], "server_cpu_ms": [], "client_cpu_ms": [], "server_faults": [], "client_faults": [], "ratio": [], "round": []} for name in sides}
            for r in range(max(1, args.rounds)):
                res = interleaved_round(sides, args.workers, k, args.client_procs, args.slices_per_round, args.slice, args.warmup, tmp / f"k{k}-r{r}",
                                        raw_as_pyzmq=args.raw_as_pyzmq)
                for name in sides:
                    ratios = [z / w for z, w in zip(res[name]["rate"], res["raw"]["rate"])]
                    row = rows[k][name]
                    for key in ("rate", "server_cpu_ms", "client_cpu_ms", "server_faults", "client_faults"):
                        row[key] += res[name][key]
                    row["ratio"] += ratios
                    row["round"].append(statistics.median(ratios))
                print(f"K={k} round {r + 1}: " + ", ".join(f"{n} {statistics.median(res[n]['rate']):.1f}/s (x{rows[k][n]['round'][-1]:.2f})"
                                                           for n in sides), file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gb = lambda rate: rate * 2 * msg_bytes / 1e9  # noqa: E731
    print(f"\n{args.workers} pipelined workers, cnn ({N_PARAMS:,} float32: {msg_bytes / 1e6:.1f} MB up + {msg_bytes / 1e6:.1f} MB down "
          f"per update), tcp loopback, {os.cpu_count()} cores, {args.client_procs} client process(es); {args.rounds} rounds per K, each "
          f"with every side up and taking {args.slices_per_round} turns of {args.slice:g} s (after {args.warmup:g} s unmeasured)\n")
    print("| K | server | updates/s (median of turns) | turns' spread (min-max) | GB/s (up + down) | CPU ms per update: server, clients "
          "| minor faults per update: server, clients | ratio to raw (median of turn pairs) | pairs' spread | per round (median of its pairs) | x of its K = 1 |")
    print("|---:|---|---:|---|---:|---|---|---:|---|---|---:|")
    base: dict[str, float] = {}
    label = {"raw": "raw pyzmq ROUTER echo" + (" (as pyzmq comes)" if args.raw_as_pyzmq else " (memory thresholds as zsgd's)"), "zsgd": "zsgd (this tree)", "against": f"zsgd from {args.against}"}
    for k, by_side in rows.items():
        for name, row in by_side.items():
            m = statistics.median(row["rate"])
            base.setdefault(name, m)
            ratio, spread = ("1.00", "") if name == "raw" else (f"**{statistics.median(row['ratio']):.2f}**", f"{min(row['ratio']):.2f}-{max(row['ratio']):.2f}")
            med = {key: statistics.median(row[key]) for key in ("server_cpu_ms", "client_cpu_ms", "server_faults", "client_faults")}
            print(f"| {k} | {label[name]}{'' if name == 'raw' else f' --servers {k}'} | {m:.1f} | {min(row['rate']):.0f}-{max(row['rate']):.0f} | {gb(m):.2f} | "
                  f"{med['server_cpu_ms']:.2f}, {med['client_cpu_ms']:.2f} | {med['server_faults']:.1f}, {med['client_faults']:.1f} | {ratio} | {spread} | "
                  f"{', '.join(f'{x:.2f}' for x in row['round'])} | {m / base[name]:.2f} |")
    if args.against:
        for k, by_side in rows.items():
            ab = [a / b for a, b in zip(by_side["zsgd"]["rate"], by_side["against"]["rate"])]
            print(f"\nK={k}: this tree against {args.against}: **{statistics.median(ab):.3f}x** updates/s "
                  f"(median of {len(ab)} turn pairs; faster in {sum(x > 1 for x in ab)})")
    print(f"\nload average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")


def step_table(rounds: int, reps: int = 200) -> None:
    """Milliseconds per server step, cnn size, momentum: medians of alternating rounds."""
    from zsgd.nn.optim import make_optimizer
    from zsgd.nn.server_step import all_finite

    rng = np.random.default_rng(0)
    g = (rng.standard_normal(N_PARAMS) * 1e-3).astype(np.float32)
    g.flags.writeable = False  # as received: a read-only view of a frame
    live = {"w": rng.standard_normal(N_PARAMS).astype(np.float32), "spare": np.empty(N_PARAMS, np.float32)}
    opt_a, opt_b = make_optimizer("momentum", N_PARAMS, 0.01), make_optimizer("momentum", N_PARAMS, 0.01)

    def unfused():
        assert np.isfinite(g).all()
        opt_a.step(live["w"], g)

    def unfused_busy():
        assert np.isfinite(g).all()
        live["w"] = live["w"].copy()  # copy-on-write: the old buffer stays with the send in flight
        opt_a.step(live["w"], g)

    def fused_in_place():
        assert all_finite(g)
        opt_a.step(live["w"], g)

    def fused_out_of_place():
        assert opt_b.step_into(live["w"], g, live["spare"])
        live["w"], live["spare"] = live["spare"], live["w"]

    cases = [("unfused: numpy finite check + in-place step", unfused),
             ("unfused, reply in flight: + snapshot copy", unfused_busy),
             ("fused: numba finite check + in-place step", fused_in_place),
             ("fused out of place (check inside; no copy ever)", fused_out_of_place)]
    results: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(max(1, rounds)):
        for name, fn in cases:
            for _ in range(5):
                fn()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            results[name].append(statistics.median(ts) * 1e3)
    print(f"\nserver step, cnn ({N_PARAMS:,} float32), momentum, one thread: ms per update "
          f"(median of {reps} per round, {rounds} alternating rounds; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n")
    print("| path | ms (median of rounds) | per round |")
    print("|---|---:|---|")
    for name, _ in cases:
        print(f"| {name} | {statistics.median(results[name]):.3f} | {', '.join(f'{x:.3f}' for x in results[name])} |")


def census_rounds(args: argparse.Namespace) -> None:
    """``--census``: one table per round (``step_census.py``), the load beside each."""
    from step_census import WARMUP_S, census, table

    tmp = Path(tempfile.mkdtemp(prefix="bench-broker-census-"))
    try:
        for r in range(max(1, args.rounds)):
            load0 = os.getloadavg()[0]
            rate, summary = census(measure, args.workers, args.client_procs, args.seconds, args.warmup, tmp / f"r{r}")
            print(f"\nround {r + 1}: {args.workers} pipelined workers, zsgd --servers 1 (async, momentum) at {rate:.1f} updates/s; "
                  f"{summary['updates']} updates counted from {WARMUP_S:g} s after the first; load average {load0:.1f} -> "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
            for line in table(summary):
                print(line)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4, help="synthetic workers (pipelined, no compute)")
    ap.add_argument("--servers", default="1", help="K servers, or a comma list such as 1,2,4 (raw: K echo processes; zsgd: --servers K)")
    ap.add_argument("--client-procs", type=int, default=2, help="client processes the workers are spread over")
    ap.add_argument("--seconds", type=float, default=8.0, help="measured seconds per run (--profile, --census)")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before measuring (each side's first turn)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (fresh servers and clients each), every side in each")
    ap.add_argument("--slices-per-round", type=int, default=6, help="turns of --slice seconds per side in a round")
    ap.add_argument("--only", choices=["exchange", "step"], default=None, help="only the pipelined exchange, or only the server step")
    ap.add_argument("--profile", action="store_true", help="where the server's time per update goes (K = 1): CPU by thread and code "
                    "(perf, raw echo beside zsgd) and the broker's Python path by stage (cProfile); see broker_profile.py")
    ap.add_argument("--census", action="store_true", help="which step the loaded server takes and its CPU there (K = 1, "
                    "--rounds rounds); see step_census.py")
    ap.add_argument("--client", choices=["raw", "zsgd"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--endpoints", default="", help=argparse.SUPPRESS)
    ap.add_argument("--client-workers", default="", help=argparse.SUPPRESS)
    ap.add_argument("--keys-file", default="", help=argparse.SUPPRESS)
    ap.add_argument("--slices", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--raw-as-pyzmq", action="store_true", help="the raw echo's processes with glibc's thresholds left to adapt "
                    "(see RAW_MEMORY), as pyzmq comes; by default they are fixed as zsgd fixes its own")
    ap.add_argument("--slice", type=float, default=1.0, help="seconds of one side's turn within a round (the exchange table)")
    ap.add_argument("--against", default="", metavar="TREE", help="a third side: zsgd's broker from another source tree "
                    "(e.g. a `git archive` of the commit before a change), taking turns with the others in every round")
    args = ap.parse_args()
    if args.client:
        args.mode = args.client
        client_main(args)
        return
    try:
        ks = [int(x) for x in str(args.servers).split(",")]
    except ValueError:
        raise SystemExit(f"--servers takes whole numbers, e.g. 1,2,4; got {args.servers!r}") from None
    if args.workers < 1 or min(ks) < 1 or args.client_procs < 1:
        raise SystemExit("--workers, --servers and --client-procs must be >= 1")
    if args.only == "step":
        step_table(args.rounds)
        return
    if args.profile:
        from broker_profile import profile

        tmp = Path(tempfile.mkdtemp(prefix="bench-broker-profile-"))
        try:
            profile(measure, args.workers, args.client_procs, args.seconds, args.warmup, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    if args.census:
        census_rounds(args)
        return
    exchange_table(args, ks)
    if args.only is None:
        step_table(args.rounds)


if __name__ == "__main__":
    main()
