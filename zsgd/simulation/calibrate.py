"""Costs the simulator measures on this machine instead of assuming: the server's step.

``zsgd sim --broker-time measured`` (the default) times what the broker does
for one update of *this* model, optimizer, algorithm and codec, with the
broker's own code: decode the frames the worker sent (zero-copy views),
then the server engine's ``receive`` -- the very call the broker's
parameter server makes (``zsgd.engine``): validation, the codec's decode,
the server algorithm's ``on_update`` (the fused optimizer step with its
finite check, on reply views of the live weights, as the broker sets it
up), the ledger's booking and the replies it asks for, encoded
(``--compress-replies`` included). What it leaves out is the socket I/O,
which ZeroMQ's I/O thread does beside the handler, and the metrics line.

The frames reach the handler through a TCP loopback socket in this
process, as a broker's do: written by ZeroMQ's I/O thread into fresh
buffers. That matters because the step is one pass over memory: on the
2-core VM the cnn step took 0.53 ms on a gradient in this core's cache and
0.80-0.88 ms on one just received (``docs/benchmarks.md``). The time of
the transfer itself is not counted.

The synthetic workers answer round-robin from a queue of replies, so
sync, SSP and local SGD rounds complete as they do in a run; the time per
update is averaged over whole cycles of ``workers`` updates (a sync round's
one optimizer step is spread over its updates, as the sim's FIFO server
model charges every update the same), and the median of several cycles is
kept, so a busy neighbour during one cycle does not set the figure.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Any, Callable

import numpy as np


def timings(fn: Callable[[int], object], reps: int, start: int = 0) -> list[float]:
    """Seconds of each of ``reps`` calls ``fn(start)``, ``fn(start + 1)``, ... (the index seeds a step's batch)."""
    times = []
    for i in range(start, start + max(1, reps)):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return times


def time_server_step(cfg: Any, model: Any, w0: np.ndarray, algo: str, compress: str = "none", compress_replies: str = "none",
                     staleness_lr: str | bool = "off", workers: int = 4, cycles: int = 5, warmup: int = 1, clip: bool = True) -> list[float]:
    """Seconds per update of the broker's handler, one figure per cycle of ``workers`` updates (after ``warmup`` cycles).

    ``w0`` may be one range of the model (``--servers K``: what one server
    holds); ``clip`` False leaves out ``--clip-norm``, which workers then do."""
    from zsgd.algorithms import make_server_algorithm, update_kind_of
    from zsgd.compression import make_codec
    from zsgd.core.ledger import RunLedger
    from zsgd.core.stopping import StopRule
    from zsgd.engine import ServerEngine
    from zsgd.nn.optim import make_optimizer
    from zsgd.wire import protocol

    n = w0.size
    run = "0" * 12
    optimizer = make_optimizer(cfg.optimizer, n, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    server = make_server_algorithm(algo, w0, optimizer, staleness_lr=staleness_lr, clip_norm=cfg.clip_norm if clip else None)
    server.share_snapshots = True  # as the broker: replies are views of the live weights
    server.snapshot_busy = lambda: False  # each reply leaves before the next update arrives (the common case)
    reply_codec = None
    if compress_replies != "none":
        from zsgd.compression.delta import DeltaReplyEncoder

        reply_codec = DeltaReplyEncoder(compress_replies, n, seed=cfg.seed)
    port = _CalibrationPort(run, workers)
    ledger = RunLedger(StopRule(n_train=1 << 30, batch_size=cfg.batch_size), n_train=1 << 30, log_every=cfg.log_every, diverge_factor=0.0)  # counts and windows, never stops
    engine = ServerEngine(server, optimizer, ledger, port, run=run, lr_schedule="constant", reply_codec=reply_codec,
                          default_batch=cfg.batch_size)
    limits = protocol.Limits.for_model(n)
    kind = {"kind": "delta"} if update_kind_of(algo) == "delta" else {}
    grad = (np.random.default_rng(cfg.seed).standard_normal(n) * 1e-4).astype(np.float32)
    codec = make_codec(compress, n, seed=cfg.seed) if compress != "none" else None
    coded = codec.encode(grad) if codec is not None else None

    def frames_of(worker: int, version: int) -> list:
        if codec is None:
            msg = protocol.update_message(run, worker, version, grad, cfg.batch_size, 0.5, **kind)
        else:
            msg = protocol.update_message(run, worker, version, None, cfg.batch_size, 0.5, codec=codec.name, extra_arrays=coded, **kind)
        return protocol.encode(msg)

    for w in range(workers):
        engine.add_worker(w, 0.0)
    per_update: list[float] = []
    with _Loopback() as wire:
        for cycle in range(warmup + cycles):
            spent, count = 0.0, 0
            while count < workers and port.pending:
                w, version = port.pending.popleft()
                frames = wire.carry(frames_of(w, version))
                t0 = time.perf_counter()
                engine.receive(w, protocol.decode(frames, limits), 0.0)
                spent += time.perf_counter() - t0
                count += 1
            if not count:
                break  # nobody holds weights (not with these rules; but never loop for ever)
            if cycle >= warmup:
                per_update.append(spent / count)
    if port.rejected:
        from zsgd.errors import ZsgdError

        raise ZsgdError(f"internal: the server-step calibration's own updates were rejected ({port.rejected})")
    return per_update


class _CalibrationPort:
    """The engine's port for synthetic workers: each reply is encoded, as the broker's socket would, and queued for
    its worker's next update (round-robin, so sync, SSP and local SGD rounds complete as in a run)."""

    def __init__(self, run: str, workers: int) -> None:
        from zsgd.core.tally import WorkerTally

        self.run = run
        self.tallies = [WorkerTally() for _ in range(workers)]
        self.pending: deque[tuple[int, int]] = deque()  # (worker, version of the weights it holds)
        self.rejected: str | None = None

    def tally(self, worker: int) -> Any:
        return self.tallies[worker]

    def live_workers(self) -> range:
        return range(len(self.tallies))

    def send_weights(self, worker: int, version: int, weights: np.ndarray, coded: Any) -> None:
        from zsgd.wire import protocol

        protocol.encode(coded if coded is not None else protocol.weights_message(self.run, version, weights))
        self.pending.append((worker, version))

    def send_abandon(self, worker: int, version: int) -> None:
        pass  # a synthetic worker has no step to cut short

    def reject(self, worker: int, reason: str, text: str) -> None:
        self.rejected = text

    def booked(self, applied: Any) -> None:
        pass


class _Loopback:
    """A TCP loopback pair in this process: frames arrive as the broker's do, written by ZeroMQ's I/O thread into
    fresh buffers, so the handler timed on them reads them, and runs, with the caches a received update leaves."""

    def __enter__(self) -> "_Loopback":
        import zmq

        self.ctx = zmq.Context(io_threads=1)
        self.rx = self.ctx.socket(zmq.PULL)
        self.tx = self.ctx.socket(zmq.PUSH)
        for s in (self.rx, self.tx):
            s.linger = 0
        self.tx.connect(f"tcp://127.0.0.1:{self.rx.bind_to_random_port('tcp://127.0.0.1')}")
        return self

    def carry(self, frames: list) -> list:
        self.tx.send_multipart(frames, copy=False)
        if not self.rx.poll(30_000):
            from zsgd.errors import ZsgdError

            raise ZsgdError("--broker-time measured: a loopback socket on 127.0.0.1 carried nothing in 30 s; give --broker-time a value")
        return self.rx.recv_multipart(copy=False)

    def __exit__(self, *exc: object) -> None:
        self.rx.close(linger=0)
        self.tx.close(linger=0)
        self.ctx.term()


def median(samples: list[float]) -> float:
    return float(statistics.median(samples)) if samples else 0.0


# -- the broker's loop, end to end: what a message costs beyond the step and the crossings -------------------

#: Rounds of bursts (the real broker's lone exchanges, the lone echo's, the 4-client echo's, the step) behind
#: ``time_broker_loop``: each figure is the median over the rounds, so a slow minute hits all four and sets none.
LOOP_ROUNDS = 7


def time_broker_loop(cfg: Any, model: Any, w0: np.ndarray, algo: str, nbytes: int, pairs: int | None = None,
                     timeout_s: float = 120.0) -> dict[str, Any]:
    """The real broker's per-message cost beyond its step and the two lone crossings, measured end to end, and the
    lone crossings themselves, from the same minutes.

    A ``zsgd broker`` process (the very loop a run has: the endpoint's
    receive, the session, the engine, the ledger's metrics line, the tracked
    send, housekeeping) serves one synthetic worker of this process
    (``zsgd.wire.synthetic``) that sends the next update the moment its
    weights arrive (no compute), as the knee's workers do. Its bursts of
    exchanges alternate with bursts of the lone echo
    (``zsgd.simulation.transport``: the two crossings alone, with the CPU of
    its threads and of the echo server's I/O thread), of the 4-client echo
    and of the engine's step timed here (``time_server_step``), ``pairs``
    rounds of the four, so a change of load hits them alike. ``samples``:
    the broker's exchange time per burst; less the same round's echo, what
    the loop costs per message (``beyond_echo``); ``overhead_s`` is the
    median of those less the median step: the loop's Python around the step
    and the worker's encode and decode, which ``--placement local`` charges
    on the server's thread. The lone echo's figures (medians over the rounds,
    as ``transport.lone_figures``) are what ``--placement local`` charges the
    crossings with when it charges this loop (``local_server``): one worker
    alone is then the broker's own lone cycle of these minutes, whatever the
    echo did in another minute (a single burst moved by 20 % between quiet
    minutes). ``dispersion``: each figure's median absolute deviation over its
    median (``transport.dispersion``)."""
    from zsgd.simulation import transport

    exchanges = max(8, transport.messages_per_burst(nbytes))
    cycles, echoes, steps, loaded, lone, threads, spreads, io = [], [], [], [], [], [], [], []
    with _BrokerProcess(cfg, algo, timeout_s) as broker:
        import zmq

        from zsgd.wire.synthetic import SyntheticWorker, join_all

        ctx = zmq.Context(io_threads=1)
        client = SyntheticWorker(ctx, broker.endpoint, 0, broker.token, w0.size, cfg.batch_size)
        try:
            join_all([client], timeout_s)
            client.exchanges(2, timeout_s)  # warm-up: the first steps load and compile, the first buffers are touched
            for _ in range(max(1, pairs or LOOP_ROUNDS)):
                cycles.append(client.exchanges(exchanges, timeout_s) / exchanges)
                bps = transport.measure_transport(nbytes, bursts=1, clients=1, threads=threads, spreads=spreads, io=io)
                lone += bps
                echoes += [nbytes / b for b in bps]
                loaded += transport.measure_transport(nbytes, bursts=1)
                steps.append(median(time_server_step(cfg, model, w0, algo, workers=1, cycles=3)))
        finally:
            client.close()
            ctx.term()
    beyond = [c - e for c, e in zip(cycles, echoes)]  # under load a burst's echo may come out the slower: kept as it is
    lone_bps, busy, spread, share = transport.lone_figures(lone, threads, spreads, io)
    d = transport.dispersion
    return {"samples": cycles, "echoes": echoes, "beyond_echo": beyond, "steps": steps, "exchanges_per_burst": exchanges,
            "overhead_s": max(0.0, median(beyond) - median(steps)),
            "lone_bytes_per_s": lone_bps, "lone_threads": busy, "lone_spread": spread, "io_share": share,
            "bytes_per_s": median(loaded), "lone_samples": lone, "loaded_samples": loaded, "lone_thread_samples": threads,
            "lone_spread_samples": spreads, "io_share_samples": io,
            "dispersion": {"samples": d(cycles), "echoes": d(echoes), "beyond_echo": d(beyond), "steps": d(steps), "bytes_per_s": d(loaded),
                           "lone_threads": d(threads), "io_share": d(io)}}


class _BrokerProcess:
    """``zsgd broker`` for one worker on 127.0.0.1, with the run's model, data and server options. It binds a port of
    its own choosing (``--port 0``: no window in which another process can take a port picked here) and says which in
    its run's first metrics line (the ``start`` event's ``address``), written before its keys file."""

    def __init__(self, cfg: Any, algo: str, timeout_s: float) -> None:
        self.cfg, self.algo, self.timeout_s = cfg, algo, timeout_s

    def argv(self, port: int) -> list[str]:
        import sys

        cfg = self.cfg
        argv = [sys.executable, "-m", "zsgd", "broker", "--workers", "1", "--model", cfg.model, "--data", cfg.data, "--algo", self.algo,
                "--batch-size", str(cfg.batch_size), "--optimizer", cfg.optimizer, "--lr", repr(float(cfg.lr)), "--momentum",
                repr(float(cfg.momentum)), "--weight-decay", repr(float(cfg.weight_decay)), "--seed", str(cfg.seed),
                "--lr-schedule", "constant", "--port", str(port), "--no-evaluator", "--quiet", "--checkpoint-every", "0",
                "--eval-every", "100000000", "--steps", "100000000", "--heartbeat", "1", "--timeout", "60", "--no-shared-memory",
                "--out", str(self.out)]
        if cfg.data_dir:
            argv += ["--data-dir", str(cfg.data_dir)]
        if cfg.clip_norm is not None:
            argv += ["--clip-norm", repr(float(cfg.clip_norm))]
        if getattr(cfg, "bptt", None) and "lstm" in str(cfg.model):
            argv += ["--bptt", str(cfg.bptt)]
        return argv

    def _listening(self) -> bool:
        """Whether the broker has written its keys (once it listens) and its address; reads both."""
        import json

        from zsgd.wire.security import RUN_SECRET_FILE

        try:
            self.token = json.loads((self.out / "keys" / RUN_SECRET_FILE).read_text())["token"]
            with open(self.out / "metrics.jsonl") as f:
                for line in f:
                    event = json.loads(line)
                    if event.get("event") == "start" and str(event.get("address", "")).startswith("tcp://"):
                        self.endpoint = f"tcp://127.0.0.1:{int(str(event['address']).rsplit(':', 1)[1])}"  # it listens there too
                        return True
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        return False

    def __enter__(self) -> "_BrokerProcess":
        import os
        import subprocess
        import tempfile
        from pathlib import Path

        from zsgd.errors import ZsgdError

        self.out = Path(tempfile.mkdtemp(prefix="zsgd-broker-loop-"))
        env = os.environ | {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(self.argv(0), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + self.timeout_s
        while not self._listening():  # a refused command ends at once
            if self.proc.poll() is not None or time.monotonic() > deadline:
                ended = self.proc.poll() is not None
                lines = (self.proc.stderr.read() if ended and self.proc.stderr else "").strip().splitlines() or ["no word from it"]
                self.__exit__()
                raise ZsgdError(f"the broker's per-message calibration could not start 'zsgd broker' ({lines[-1][:200]}); "
                                f"give --broker-time a value")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        import shutil
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the broker ends its run as on Ctrl-C
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.out, ignore_errors=True)


def loop_key(workload: Any) -> dict[str, Any]:
    """What the broker's per-message cost depends on: the model (its messages), the data it is started with, the optimizer
    whose step is subtracted, the batch (the update's header). Measured with ``async`` and one server, for every arm."""
    cfg = workload.cfg
    return {"model": cfg.model, "n_params": int(workload.model.n_params), "data": workload.problem.dataset.name,
            "optimizer": cfg.optimizer, "momentum": float(cfg.momentum), "weight_decay": float(cfg.weight_decay),
            "clip_norm": cfg.clip_norm, "batch_size": cfg.batch_size}


def charges_loop(opts: Any) -> bool:
    """Whether arm ``opts`` charges the broker's per-message cost: ``--placement local`` with the server's step and
    transport both measured (a step or a NIC given by hand is the user's whole figure; a cluster's is unchanged)."""
    from zsgd.network import Measured

    placement = str(getattr(opts, "placement", "spread")).strip().lower()  # a decentralized arm has none
    return placement == "local" and isinstance(getattr(opts, "broker_s", None), Measured) \
        and isinstance(getattr(opts, "broker_bandwidth", None), Measured)


def _loop_entry(workload: Any, opts: Any) -> dict[str, Any] | None:
    if not charges_loop(opts):
        return None
    cfg = workload.cfg
    nbytes = max(workload.update_bytes, workload.weights_bytes)
    return workload.calibration.get("broker_loop", loop_key(workload),
                                    lambda: time_broker_loop(cfg, workload.model, workload.w0, "async", nbytes), optional=True)


def broker_loop(workload: Any, opts: Any) -> float:
    """Seconds of server-thread CPU per message beyond the step (``time_broker_loop``'s ``overhead_s``), kept by the
    workload's calibration; 0 where ``charges_loop`` says no, or replaying a record made before it was measured."""
    entry = _loop_entry(workload, opts)
    return 0.0 if entry is None else float(entry["overhead_s"])


def local_server(workload: Any, opts: Any, transport: Any) -> tuple[float, Any]:
    """What ``--placement local`` charges a server beyond its step: the loop per message (``broker_loop``), and the
    transport whose lone figures its crossings take: those measured beside the loop, in the same rounds
    (``time_broker_loop``), where the loop is charged and its record has them; else ``transport`` as it is (a cluster,
    figures given by hand, a record from before the loop's own echo was measured: replayed as it ran)."""
    import dataclasses

    entry = _loop_entry(workload, opts)
    if entry is None:
        return 0.0, transport
    if "lone_bytes_per_s" in entry and transport.lone_bytes_per_s is not None:
        transport = dataclasses.replace(transport, **{k: None if entry.get(k) is None else float(entry[k])
                                                      for k in ("lone_bytes_per_s", "lone_threads", "lone_spread", "io_share")})
    return float(entry["overhead_s"]), transport
