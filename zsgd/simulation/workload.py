"""What every arm of a sweep shares, measured once: data, model, initial weights, shards, message sizes,
and the calibrations (a worker's step, the server's step, the server's transport), which a
``zsgd.simulation.calibration.Calibration`` keeps per machine so the same command gives the same metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from zsgd.core.config import TrainConfig
from zsgd.network import Constant, Delay, Measured
from zsgd.wire import protocol

if TYPE_CHECKING:
    from zsgd.simulation.simulator import SimOptions


class Workload:
    """What every arm of a sweep shares: data, model, the initial weights and
    the shards (so arms differ only in the world they run in), and the exact
    message sizes of the real encoding, computed once per model."""

    def __init__(self, cfg: TrainConfig, problem: Any, calibration: Any = None) -> None:
        from zsgd.simulation.calibration import current

        self.cfg, self.problem = cfg, problem
        self.calibration = calibration or current()  # where the measured figures come from (cache, fresh, a file)
        self.model = problem.model
        self.w0 = np.asarray(self.model.init(seed=cfg.seed), dtype=np.float32)
        self.w0.flags.writeable = False
        flat = np.broadcast_to(np.float32(0), (self.model.n_params,))  # sizes only: no allocation
        run = "0" * 12
        self.update_bytes = protocol.message_nbytes(protocol.update_message(run, 0, 0, flat, cfg.batch_size, 0.0))
        self.weights_bytes = protocol.message_nbytes(protocol.weights_message(run, 0, flat))
        self._shards: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.compute_samples: list[float] | None = None  # timed steps behind compute=measured
        self.transport: Any = None  # broker-bandwidth=measured: zsgd.simulation.transport.Transport, for this message size

    def shards(self, n_workers: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(x, y) of each worker, as ``make_shard`` gives the runtime's workers."""
        if n_workers not in self._shards:
            from zsgd.data import make_shards

            ds = self.problem.dataset
            idx = make_shards(ds.y_train, self.cfg.split, self.cfg.seed, n_workers)
            self._shards[n_workers] = [(ds.x_train[i], ds.y_train[i]) for i in idx]
        return self._shards[n_workers]

    def share_shards(self, other: "Workload") -> None:
        """Use ``other``'s shards, cut or to be cut once for both, when they split the same data alike: the shards
        depend on the data, the split, the seed and the worker count, not on the batch size or learning rate in
        which two workloads of one sweep differ (cutting them copies the training set: 0.085 s for Fashion-MNIST)."""
        if self.problem is other.problem and (self.cfg.split, self.cfg.seed) == (other.cfg.split, other.cfg.seed):
            self._shards = other._shards

    def compute_model(self, spec: "Delay | Measured", steps: int = 5) -> "tuple[Delay, float | None]":
        """The compute-time model of an arm, and the calibrated seconds when it is ``measured``."""
        if isinstance(spec, Measured):
            seconds = self.calibrate(steps)
            return Constant(seconds), seconds
        return spec, None

    def broker_model(self, opts: "SimOptions") -> "tuple[float, list[float] | None]":
        """Seconds per update at the broker, and the timed samples when ``opts.broker_s`` is measured.

        Timed once per machine and ``server_step_key`` (kept by
        ``self.calibration``) and shared by every arm, like the compute time,
        and for the same reason: arms differ only in what the grid varies.
        Worker counts share it too: the handler's cost per update does not
        depend on them (a sync round's one step is spread over at most 8
        updates here).
        """
        if not isinstance(opts.broker_s, Measured):
            return float(opts.broker_s), None
        from zsgd.simulation.calibrate import median, time_server_step

        key = self.server_step_key(opts)
        size, workers = key["range"], key["workers"]
        entry = self.calibration.get("server_step", key, lambda: {"samples": time_server_step(
            self.cfg, self.model, self.w0[:size], opts.algo, opts.compress, opts.compress_replies, opts.staleness_lr, workers=workers,
            cycles=max(5, 24 // workers), clip=opts.servers == 1)})
        samples = [float(v) for v in entry["samples"]]
        return median(samples), samples

    def server_step_key(self, opts: "SimOptions") -> dict[str, Any]:
        """What the server step's time depends on: the range one server holds, the rule, its workers, the optimizer, codecs.

        --servers K: the K servers take their ranges of every update at once and step in parallel, so the update
        costs the largest range's step (the handler's fixed part included, timed for real). Worker counts above 8
        share a figure (a sync round's one step spread over 8 updates) and async needs one."""
        from zsgd.core.ranges import split_ranges

        cfg = self.cfg
        size = max(hi - lo for lo, hi in split_ranges(self.model.n_params, opts.servers))
        return {"model": cfg.model, "range": size, "algo": opts.algo, "workers": min(opts.n_workers, 8) if opts.algo != "async" else 1,
                "optimizer": cfg.optimizer, "momentum": float(cfg.momentum), "weight_decay": float(cfg.weight_decay),
                "clip_norm": cfg.clip_norm if opts.servers == 1 else None, "staleness_lr": str(opts.staleness_lr),
                "compress": opts.compress, "compress_replies": opts.compress_replies}

    def compute_key(self) -> dict[str, Any]:
        """What a gradient step's time depends on: the model, its input and the batch (the data set's name for the record)."""
        ds, cfg = self.problem.dataset, self.cfg
        key: dict[str, Any] = {"model": cfg.model, "n_params": int(self.model.n_params), "data": ds.name,
                               "sample": [int(d) for d in np.shape(ds.x_train)[1:]], "batch_size": cfg.batch_size}
        if getattr(self.model, "is_language_model", False):
            key["bptt"] = int(self.model.bptt)
        return key

    def transport_key(self) -> dict[str, Any]:
        return {"message_bytes": max(1, int(max(self.update_bytes, self.weights_bytes)))}

    def calibration_record(self, opts: Any) -> dict[str, Any] | None:
        """The measured figures arm ``opts`` uses (measured or read now if not yet), for its config.yaml; None: it uses none."""
        wanted = []
        if isinstance(getattr(opts, "compute", None), Measured):
            self.calibrate(getattr(opts, "calibration_steps", 5))
            wanted.append(("compute", self.compute_key()))
        if isinstance(getattr(opts, "broker_s", None), Measured):
            self.broker_model(opts)
            wanted.append(("server_step", self.server_step_key(opts)))
        if isinstance(getattr(opts, "broker_bandwidth", None), Measured):
            self.transport_model(opts)
            wanted.append(("transport", self.transport_key()))
        from zsgd.simulation.calibrate import broker_loop, charges_loop, loop_key

        if charges_loop(opts):  # --placement local: the broker's per-message cost (absent from an older replayed record)
            broker_loop(self, opts)
            wanted.append(("broker_loop", loop_key(self)))
        return self.calibration.record(wanted) if wanted else None

    def transport_model(self, opts: "SimOptions") -> "tuple[Any, bool]":
        """One server's transport (``zsgd.simulation.transport.Transport``) and whether it was measured (a
        ZeroMQ echo of this model's message size, plain and with work in its loop, timed once per machine
        and cached). A NIC given by hand is a server host's own: the step runs beside its I/O (overlap 1)."""
        from zsgd.simulation.transport import Transport, server_transport

        if not isinstance(opts.broker_bandwidth, Measured):
            bw = float(opts.broker_bandwidth)
            return Transport(bw, 1.0), False
        if self.transport is None:
            self.transport = server_transport(self.transport_key()["message_bytes"], calibration=self.calibration)
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
        once per machine (kept by ``self.calibration``) and shared by every arm.

        Why once: arms must differ only in what the grid varies; timing each
        arm separately lets machine noise (a busy neighbour, turbo states)
        masquerade as an effect of latency or algorithm. Why warm-up steps:
        the first calls pay JIT compilation and first-touch of scratch buffers.
        """
        if self.compute_samples is None:
            from zsgd.simulation.calibrate import timings

            def measure() -> dict[str, Any]:
                step = self.gradient_step()
                for i in range(warmup):
                    step(i)
                return {"samples": timings(step, steps, start=warmup)}

            entry = self.calibration.get("compute", self.compute_key(), measure)
            self.compute_samples = [float(v) for v in entry["samples"]]
        return float(np.median(self.compute_samples))


__all__ = ["Workload"]
