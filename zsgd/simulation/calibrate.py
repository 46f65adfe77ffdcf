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
