"""What every arm of a sweep shares, measured once: data, model, initial weights, shards, message sizes,
and the calibrations (a worker's step, the server's step, the server's transport)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from zsgd.core.config import TrainConfig
from zsgd.simulation.netmodel import Constant, Delay, Measured
from zsgd.wire import protocol

if TYPE_CHECKING:
    from zsgd.sim import SimOptions


class Workload:
    """What every arm of a sweep shares: data, model, the initial weights and
    the shards (so arms differ only in the world they run in), and the exact
    message sizes of the real encoding, computed once per model."""

    def __init__(self, cfg: TrainConfig, problem: Any) -> None:
        self.cfg, self.problem = cfg, problem
        self.model = problem.model
        self.w0 = np.asarray(self.model.init(seed=cfg.seed), dtype=np.float32)
        self.w0.flags.writeable = False
        flat = np.broadcast_to(np.float32(0), (self.model.n_params,))  # sizes only: no allocation
        run = "0" * 12
        self.update_bytes = protocol.message_nbytes(protocol.update_message(run, 0, 0, flat, cfg.batch_size, 0.0))
        self.weights_bytes = protocol.message_nbytes(protocol.weights_message(run, 0, flat))
        self._shards: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.compute_samples: list[float] | None = None  # timed steps behind compute=measured
        self.server_step_samples: dict[tuple, list[float]] = {}  # broker-time=measured, per algorithm and codecs
        self.transport: Any = None  # broker-bandwidth=measured: zsgd.simulation.transport.Transport, for this message size

    def shards(self, n_workers: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(x, y) of each worker, as ``make_shard`` gives the runtime's workers."""
        if n_workers not in self._shards:
            from zsgd.data import make_shards

            ds = self.problem.dataset
            idx = make_shards(ds.y_train, self.cfg.split, self.cfg.seed, n_workers)
            self._shards[n_workers] = [(ds.x_train[i], ds.y_train[i]) for i in idx]
        return self._shards[n_workers]

    def compute_model(self, spec: "Delay | Measured", steps: int = 5) -> "tuple[Delay, float | None]":
        """The compute-time model of an arm, and the calibrated seconds when it is ``measured``."""
        if isinstance(spec, Measured):
            seconds = self.calibrate(steps)
            return Constant(seconds), seconds
        return spec, None

    def broker_model(self, opts: "SimOptions") -> "tuple[float, list[float] | None]":
        """Seconds per update at the broker, and the timed samples when ``opts.broker_s`` is measured.

        Timed once per (algorithm, codecs) and shared by every arm, like the
        compute time, and for the same reason: arms differ only in what the
        grid varies. Worker counts share it too: the handler's cost per
        update does not depend on them (a sync round's one step is spread
        over at most 8 updates here).
        """
        if not isinstance(opts.broker_s, Measured):
            return float(opts.broker_s), None
        from zsgd.core.ranges import split_ranges
        from zsgd.simulation.calibrate import median, time_server_step

        workers = min(opts.n_workers, 8)
        # --servers K: the K servers take their ranges of every update at once and step in parallel, so
        # the update costs the largest range's step (the handler's fixed part included, timed for real).
        size = max(hi - lo for lo, hi in split_ranges(self.model.n_params, opts.servers))
        key = (opts.algo, opts.compress, opts.compress_replies, str(opts.staleness_lr), size, workers if opts.algo != "async" else 1)
        if key not in self.server_step_samples:
            self.server_step_samples[key] = time_server_step(self.cfg, self.model, self.w0[:size], opts.algo, opts.compress,
                                                             opts.compress_replies, opts.staleness_lr, workers=key[-1],
                                                             cycles=max(5, 24 // key[-1]), clip=opts.servers == 1)
        samples = self.server_step_samples[key]
        return median(samples), samples

    def transport_model(self, opts: "SimOptions") -> "tuple[Any, bool]":
        """One server's transport (``zsgd.simulation.transport.Transport``) and whether it was measured (a
        ZeroMQ echo of this model's message size, plain and with work in its loop, timed once per machine
        and cached). A NIC given by hand is a server host's own: the step runs beside its I/O (overlap 1)."""
        from zsgd.simulation.transport import Transport, server_transport

        if not isinstance(opts.broker_bandwidth, Measured):
            bw = float(opts.broker_bandwidth)
            return Transport(bw, 1.0), False
        if self.transport is None:
            self.transport = server_transport(max(self.update_bytes, self.weights_bytes))
        return self.transport, True

    def gradient_step(self) -> Callable[[int], Any]:
        """``step(i)``: one real gradient of a worker's size at the initial weights (an image batch, or
        for a language model one block of batch x bptt tokens with the state carried)."""
        from zsgd.data import to_float

        ds = self.problem.dataset
        if getattr(self.model, "is_language_model", False):
            from zsgd.data import TokenStream

            stream, state = TokenStream(ds.x_train, self.cfg.batch_size, self.model.bptt), self.model.init_state(self.cfg.batch_size)
            return lambda i: self.model.loss_and_grad(self.w0, *next(stream)[:2], state=state)
        idx = np.arange(self.cfg.batch_size) % len(ds.y_train)
        xb, yb = to_float(ds.x_train[idx]), ds.y_train[idx]
        return lambda i: self.model.loss_and_grad(self.w0, xb, yb, training=True, seed=i)

    def calibrate(self, steps: int = 5, warmup: int = 3) -> float:
        """Median seconds of one real gradient step on this machine, measured
        once per workload and shared by every arm.

        Why once: arms must differ only in what the grid varies; timing each
        arm separately lets machine noise (a busy neighbour, turbo states)
        masquerade as an effect of latency or algorithm. Why warm-up steps:
        the first calls pay JIT compilation and first-touch of scratch buffers.
        """
        if self.compute_samples is None:
            from zsgd.simulation.calibrate import timings

            step = self.gradient_step()
            for i in range(warmup):
                step(i)
            self.compute_samples = timings(step, steps, start=warmup)
        return float(np.median(self.compute_samples))


__all__ = ["Workload"]
