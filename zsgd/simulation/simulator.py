"""The discrete-event simulator (``zsgd/sim.py`` is its entry point): real gradients, virtual clock.

An event queue (a heap ordered by virtual time, ties broken by a sequence
number so a run is deterministic) drives the very ``ServerAlgorithm`` and
``WorkerStep`` objects the ZeroMQ runtime drives. Only time is simulated:
each gradient is computed for real, on the worker's own shard and batch
stream, at the (possibly stale) weights snapshot that worker received. So
a staleness or latency study here exercises the same update rules as a run
on a cluster, and the metrics it writes have the same schema.

One worker's cycle::

    broker sends weights at t --(downlink latency + bytes/bandwidth [+ resends])-->
    worker computes for compute_time x straggler factor --(uplink ...)-->
    update arrives -> engine.apply(update, now) -> replies scheduled

The server side is the engine the broker runs (``zsgd.engine``): the same
dispatch of the algorithm's outputs, the same booking, rejections and reply
coding; this simulator is its port in virtual time, as the broker's
parameter-server service is its port on a ZeroMQ socket.

Why it scales with central updates rather than workers: a worker's gradient
is computed lazily when its update reaches the broker (the result is the
same, as it depends only on the weights it holds and its own batch stream),
so an idle worker costs one heap entry and a reference to a weights snapshot
that is shared by every worker holding that version. The broker handles one
update at a time (FIFO) and each costs ``broker_s``: measured by default
(``zsgd.simulation.calibrate`` times the broker's own handler code for this
model, optimizer, algorithm and codec, once per workload), so a sweep over
worker counts finds the server's saturation knee; evaluation costs no
virtual time (the runtime evaluates in a separate process too).
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from zsgd.wire import protocol
from zsgd.algorithms import Applied, Update, check_servers_support, local_steps_of, make_server_algorithm, make_worker_step, parse_algo
from zsgd.algorithms.worker import WorkerStep
from zsgd.core.config import TrainConfig, write_config
from zsgd.core.ledger import run_header
from zsgd.core.tally import WorkerTally
from zsgd.engine import ServerEngine
from zsgd.errors import ZsgdError
from zsgd.output.metrics import MetricsWriter
from zsgd.simulation import calibrate, interrupt
from zsgd.network.compute_draw import ComputeDraw
from zsgd.network import Delay, FailureSpec, LinkDraws, Measured, Network, StragglerSpec, format_bandwidth
from zsgd.network.hosts import CpuPool, FifoStage, Job, crossing_stage
from zsgd.output.rundir import save_arrays, write_json
from zsgd.simulation.workload import Workload
from zsgd.algorithms.schedules import check_schedule_applies, resolve_lr_schedule

# Event kinds. A heap entry is (t, seq, kind, worker, incarnation, a, b).
_CROSSING_THREADS = 2.0  # --placement local: a message crossing loopback keeps the server's I/O thread and its peer's busy
_SIM_RUN = "0" * 12  # the run id in simulated messages (their sizes count it as a real run's)
_DONE, _ARRIVE, _PROCESS, _FAIL, _DETECT, _RECOVER, _CANCEL, _START, _CPU, _OCC, _WIRE = range(11)


@dataclass
class SimOptions:
    """One arm: the algorithm and the world it runs in."""

    algo: str = "async"
    n_workers: int = 16
    network: Network = field(default_factory=Network)
    compute: Delay | Measured = field(default_factory=Measured)
    stragglers: StragglerSpec | None = None
    failures: FailureSpec | None = None
    detect_s: float = 3.0  # failure -> broker notices (the runtime's heartbeat timeout)
    broker_s: float | Measured = 0.0  # broker time per update (0: instantaneous; Measured: timed here, the CLI's default)
    broker_bandwidth: float | Measured = math.inf  # bytes/s of the broker's own NIC (Measured: ZeroMQ's here, the CLI's default)
    # --servers K: K servers, each with its range, its step and its own NIC (see broker_model). One rule over the
    # whole vector is what K ranges in step make (ksync/kasync: the runtime's coordinator decides, and its range
    # servers replay the same steps, zsgd.algorithms.step_log; that hop is not modelled).
    servers: int = 1
    staleness_lr: str | bool = "off"
    compress: str = "none"  # worker->broker codec, as in the runtime (real encoded sizes on the wire)
    compress_replies: str = "none"  # broker->worker weight deltas, as the runtime's --compress-replies
    target: float | None = None  # accuracy whose first crossing is reported (time_to_target_s)
    calibration_steps: int = 5  # timed steps for compute=measured (median)
    scaling: str | None = None  # what the sweep adapted to n_workers, as 'zsgd run' prints it (None: values as given)
    # Where the run's processes live (zsgd.network.hosts): "spread", the server and each worker on hosts of their own
    # (a cluster); "local", all on one host of host_cores cores (zsgd run --n-proc N here), whose threads share them.
    placement: str = "spread"
    host_cores: float | None = None  # None: this machine's cores

    def validate(self) -> "SimOptions":
        from zsgd.compression import make_codec

        parse_algo(self.algo)
        make_codec(self.compress, 1)  # a bad --compress spec fails before any work
        make_codec(self.compress_replies, 1)
        if not isinstance(self.n_workers, int) or self.n_workers < 1:
            raise ZsgdError(f"--workers must be a whole number >= 1, got {self.n_workers!r}")
        if self.failures is not None:
            self.failures.check(self.n_workers)
        if self.target is not None and not 0 < self.target <= 1:
            raise ZsgdError(f"--target must be in (0, 1], got {self.target}")
        from zsgd.core.ranges import check_servers

        check_servers(self.servers)
        check_servers_support(self.algo, self.servers)
        from zsgd.network.hosts import parse_host_cores, parse_placement

        self.placement = parse_placement(self.placement)
        from zsgd.simulation.calibration import current

        self.host_cores = parse_host_cores(self.host_cores, auto=current().host_cores())
        for name, v in (("--detect", self.detect_s), ("--broker-time", 0.0 if isinstance(self.broker_s, Measured) else self.broker_s)):
            if not math.isfinite(v) or v < 0:
                raise ZsgdError(f"{name} must be a finite duration >= 0, got {v}")
        return self

    def describe(self) -> dict[str, Any]:
        """Plain values for config.yaml, the start event and the summary."""
        return {"algo": self.algo, "n_workers": self.n_workers, **self.network.describe(), "compute": str(self.compute),
                "stragglers": str(self.stragglers) if self.stragglers else "none",
                "failures": str(self.failures) if self.failures else "none", "detect_s": self.detect_s,
                "broker_s": str(self.broker_s) if isinstance(self.broker_s, Measured) else self.broker_s,
                "broker_bandwidth": str(self.broker_bandwidth) if isinstance(self.broker_bandwidth, Measured)
                else format_bandwidth(self.broker_bandwidth), "servers": self.servers,
                "staleness_lr": self.staleness_lr, "compress": self.compress, "compress_replies": self.compress_replies,
                "scaling": self.scaling, "placement": self.placement, "host_cores": self.host_cores}


@dataclass
class SimResult:
    summary: dict[str, Any]
    staleness: np.ndarray
    evals: list[tuple[float, int, float]]  # (virtual t, updates, test_acc)
    weights: np.ndarray


ProgressFn = Callable[[int, int, float, float], None]  # updates, samples, virtual t, test_acc


class Simulation:
    """One arm in virtual time; ``run()`` writes metrics events and returns a SimResult."""

    def __init__(self, cfg: TrainConfig, opts: SimOptions, workload: Workload, metrics: MetricsWriter,
                 progress: ProgressFn | None = None) -> None:
        from zsgd.nn.optim import make_optimizer

        cfg = resolve_lr_schedule(cfg, opts.algo)
        check_schedule_applies(cfg.lr_schedule, opts.algo)
        self.cfg, self.opts, self.wl, self.metrics, self.progress = cfg, opts.validate(), workload, metrics, progress
        n = opts.n_workers
        self.n = n
        self.model = workload.model
        self.data = workload.shards(n)
        self.n_train = len(workload.problem.dataset.y_train)
        self.ledger = workload.problem.ledger(cfg, emit=metrics.write)
        optimizer = make_optimizer(cfg.optimizer, self.model.n_params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.algo = make_server_algorithm(opts.algo, workload.w0, optimizer, staleness_lr=opts.staleness_lr, clip_norm=cfg.clip_norm)
        self.compute, self.compute_s = workload.compute_model(opts.compute, opts.calibration_steps)
        self.broker_s, self.broker_samples = workload.broker_model(opts)
        transport, self.broker_bw_measured = workload.transport_model(opts)  # --placement local: the broker's loop beyond its step, and
        self.loop_s, transport = calibrate.local_server(workload, opts, transport)  # the lone echo measured beside it
        self.transport, self.broker_bw, self.overlap, self.nic_bw = transport, transport.bytes_per_s, transport.overlap, transport.bytes_per_s * opts.servers  # K NICs
        self.host: CpuPool | None = None  # --placement local: the one host's cores (zsgd.network.hosts)
        self.lone_bw = transport.lone_bytes_per_s if self.broker_bw_measured else None  # the echo with one client
        self.io_stage: FifoStage | None = None  # --placement local, lone_bw measured: crossings are CPU work on the host
        if opts.placement == "local":
            self.host = CpuPool(opts.host_cores, lambda t, _pool, generation: self._push(t, _CPU, -1, generation))
            self.step_stage = FifoStage(self.host, demand=float(opts.servers))  # the K range servers step together
            if self.lone_bw:  # each server's I/O thread copies its range of every message in turn, for its share of a lone crossing
                self.io_stage = crossing_stage(self.host, opts.servers, transport.lone_threads, transport.io_share, transport.lone_spread, cfg.seed)
                self.crossing_per_byte = 1.0 / (2.0 * self.lone_bw * opts.servers)  # CPU-s/thread/byte: a lone exchange is 2
            self.jobs: dict[int, tuple[int, Job]] = {}  # each worker's running step: (token, job)
            self.cut: set[int] = set()  # steps abandoned before they started (their token)
        self.stragglers = opts.stragglers.assign(n, cfg.seed) if opts.stragglers else None
        self.rng_fail = np.random.default_rng(np.random.SeedSequence([cfg.seed & 0xFFFFFFFF, 0x51D]).spawn(4)[3])
        self.links = LinkDraws(cfg.seed)  # each link's latencies, as zsgd run --inject-latency draws them
        self.compute_draw = ComputeDraw(self.compute, cfg.seed)  # the draws of zsgd run --inject-compute
        self.net = opts.network
        self.u_bytes, self.w_bytes = workload.update_bytes, workload.weights_bytes
        self.codecs: list = [None] * n
        reply_codec = None  # --compress-replies: the runtime's own encoder, mirrors and all
        if opts.compress_replies != "none":
            from zsgd.compression.delta import DeltaReplyEncoder

            reply_codec = DeltaReplyEncoder(opts.compress_replies, self.model.n_params, seed=cfg.seed)
        self.engine = ServerEngine(self.algo, optimizer, self.ledger, self, run=_SIM_RUN, lr_schedule=cfg.lr_schedule,
                                   reply_codec=reply_codec, default_batch=cfg.batch_size)
        self.local_steps = local_steps_of(opts.algo)
        # Sparse codecs whose size depends on the gradient (AdaComp) are encoded when
        # the worker finishes, so the transfer time uses the real size; fixed-size
        # codecs stay lazy (computed on arrival), which keeps idle workers free.
        self.eager = opts.compress.startswith("adacomp")
        if opts.compress != "none" and not self.eager:
            from zsgd.compression import make_codec

            self.u_bytes = self._encoded_update_bytes(make_codec(opts.compress, self.model.n_params, seed=0))
        # virtual clock and queue
        self.now = 0.0
        self.heap: list[tuple] = []
        self.seq = 0
        self.tx_free = self.rx_free = self.busy_until = 0.0
        # workers
        self.alive = [True] * n
        self.inc = [0] * n
        self.steppers: list[WorkerStep | None] = [None] * n
        self.tallies = [WorkerTally() for _ in range(n)]
        # The step each worker computes: (token, version, weights, started at), for K-sync's Cancel. A cancelled
        # step ends at once, but not before the part a real worker cannot cut: its gradient when the compute
        # time is the measured one (all of it), nothing when it is a drawn one (--inject-compute stretches to it).
        self.step_of: list[tuple[int, int, np.ndarray, float] | None] = [None] * n
        self.cancel_floor = self.compute_s if self.compute_s is not None else 0.0
        self._wait_bytes = protocol.message_nbytes(protocol.wait_message(_SIM_RUN, 0, 0, reason="abandon"))
        # counters
        self.bytes_sent = self.bytes_received = 0  # workers -> broker, broker -> workers
        self.deaths = self.rejoins = self.events = 0
        self.rejected: Counter = Counter()
        self.evals: list[tuple[float, int, float]] = []
        self.time_to_target: float | None = None
        self.grad_s = self.eval_s = 0.0

    # The ledger keeps the counts; these read it (the event handlers and the sweeps use them).
    @property
    def updates(self) -> int:
        return self.ledger.updates

    @property
    def samples(self) -> int:
        return self.ledger.samples

    @property
    def reason(self) -> str | None:
        return self.ledger.stop_reason

    @property
    def test_acc(self) -> float:
        return self.ledger.test_acc

    # -- queue -----------------------------------------------------------------
    def _push(self, t: float, kind: int, worker: int, inc: int, a: Any = None, b: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, worker, inc, a, b))

    # -- the engine's port: the server side in virtual time ------------------------------
    def tally(self, worker: int) -> WorkerTally:
        return self.tallies[worker]  # a failed worker the server has not noticed is still its member

    def live_workers(self) -> list[int]:
        return list(self.algo.live)

    def reject(self, worker: int, reason: str, text: str) -> None:
        self.rejected[reason] += 1

    def booked(self, a: Applied) -> None:
        if self.ledger.take_eval():
            self._evaluate()
        if self.progress is not None and (a.version & 31) == 0:
            self.progress(self.updates, self.samples, self.now, self.test_acc)

    def send_abandon(self, worker: int, version: int) -> None:
        """The WAIT the broker sends, over the same link as a reply."""
        if self.alive[worker]:
            t = self.now + self.net.delay(worker, False, self._wait_bytes, self.links)
            self._push(t, _CANCEL, worker, self.inc[worker], version)

    def send_weights(self, w: int, version: int, weights: np.ndarray, coded: protocol.Message | None) -> None:
        if coded is None:
            nbytes = self.w_bytes
        else:
            weights = self.engine.reply_codec.mirrors[w].copy()  # bit-identical to what the runtime's worker decodes
            weights.flags.writeable = False
            nbytes = protocol.message_nbytes(coded)
        self.bytes_received += nbytes
        if not self.alive[w]:
            self.engine.forget_replies(w)  # lost with the worker: it restarts from full weights
            return  # dead, not yet noticed: the message goes nowhere
        self.seq += 1
        token, inc = self.seq, self.inc[w]
        self.step_of[w] = (token, version, weights, math.inf)  # on its way (_deliver says when it arrives)
        if self.io_stage is not None:  # copied out by the server's I/O thread when its turn comes, on the host's cores
            self.io_stage.submit(self.now, nbytes * self.crossing_per_byte, lambda t: self._deliver(w, inc, version, weights, token, nbytes, t))
            return
        t = self.now
        if self.nic_bw != math.inf:  # the broker's NIC sends one message at a time
            t = self.tx_free = max(t, self.tx_free) + nbytes / self.nic_bw
            self._occupy(t - nbytes / self.nic_bw, t)
        self._deliver(w, inc, version, weights, token, nbytes, t)

    def _deliver(self, w: int, inc: int, version: int, weights: np.ndarray, token: int, nbytes: int, t: float) -> None:
        """The reply left the server at ``t``: it reaches the worker after its link, and the worker steps."""
        if not self.alive[w] or inc != self.inc[w] or self.step_of[w] is None or self.step_of[w][0] != token:
            return  # the worker failed (or the step was superseded) while the reply waited for the I/O thread
        t += self.net.delay(w, False, nbytes, self.links)
        c = self.compute_draw.next(w, self.local_steps)  # local SGD: K steps per round
        if self.stragglers is not None:
            c *= self.stragglers.factor(w, t)
        self.step_of[w] = (token, version, weights, t)
        if self.host is None:
            self._push(t + c, _DONE, w, inc, version, (weights, token))
        else:  # the step is CPU work on the shared host, from when the weights arrive
            self._push(t, _START, w, inc, version, (weights, token, c))

    def _occupy(self, start: float, end: float) -> None:
        """--placement local: a message crosses the host's loopback from ``start`` to ``end``, keeping a thread busy."""
        if self.host is not None and end > start:
            self._push(start, _OCC, -1, 0, _CROSSING_THREADS)
            self._push(end, _OCC, -1, 0, -_CROSSING_THREADS)

    def _on_start(self, w: int, inc: int, version: int, step: tuple[np.ndarray, int, float]) -> None:
        """--placement local: the weights reached the worker; its step runs on the host's shared cores."""
        weights, token, c = step
        current = self.step_of[w]
        if not self.alive[w] or inc != self.inc[w] or current is None or current[0] != token:
            return
        if token in self.cut:  # abandoned while the weights were on their way: only the part it cannot cut
            self.cut.discard(token)
            c = min(c, self.cancel_floor)
        self._run_step(w, inc, version, weights, token, c)

    def _run_step(self, w: int, inc: int, version: int, weights: np.ndarray, token: int, work: float) -> None:
        self.jobs[w] = (token, self.host.start(self.now, work, 1.0, lambda _t: self._on_done(w, inc, version, (weights, token))))

    def _encoded_update_bytes(self, codec, grad: np.ndarray | None = None) -> int:
        g = np.zeros(self.model.n_params, np.float32) if grad is None else grad
        arrays = codec.encode(g)
        return protocol.message_nbytes(protocol.update_message(_SIM_RUN, 0, 0, None, self.cfg.batch_size, 0.0, codec=codec.name, extra_arrays=arrays))

    def _compute_update(self, w: int, version: int, weights: np.ndarray) -> tuple[Update, int]:
        """The worker's real step, through its codec: the update as the broker decodes it, and its wire size."""
        stepper = self.steppers[w]
        if stepper is None:
            x, y = self.data[w]
            stepper = self.steppers[w] = make_worker_step(self.opts.algo, self.model, x, y, self.cfg.batch_size, self.cfg.seed, w,
                                                          lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, clip_norm=self.cfg.clip_norm)
        t0 = time.perf_counter()
        update = stepper.compute(weights, version)
        nbytes = self.u_bytes
        if self.opts.compress != "none" and np.isfinite(update.grad).all():
            from zsgd.compression import decode, make_codec, touched_indices

            codec = self.codecs[w]
            if codec is None:
                codec = self.codecs[w] = make_codec(self.opts.compress, self.model.n_params, seed=self.cfg.seed * 1_000_003 + w)
            arrays = codec.encode(update.grad)
            nbytes = protocol.message_nbytes(protocol.update_message(_SIM_RUN, w, version, None, update.n_samples, 0.0, codec=codec.name,
                                                                     extra_arrays=arrays))
            update.grad = decode(codec.name, arrays, self.model.n_params)
            update.meta["indices"] = touched_indices(codec.name, arrays)
        self.grad_s += time.perf_counter() - t0
        return update, nbytes

    def _on_done(self, w: int, inc: int, version: int, step: tuple[np.ndarray, int]) -> None:
        """The worker finished computing (or abandoned its step) and sends its update."""
        weights, token = step
        if not self.alive[w] or inc != self.inc[w] or self.step_of[w] is None or self.step_of[w][0] != token:
            return  # dead, or the step already ended (abandoned: this is its original end)
        self.step_of[w] = None
        if self.eager:
            payload = self._compute_update(w, version, weights)
            nbytes = payload[1]
        else:
            payload, nbytes = weights, self.u_bytes
        t = self.now + self.net.delay(w, True, nbytes, self.links)
        if self.nic_bw != math.inf or self.io_stage is not None:  # the server's NIC takes it when it gets there (_on_wire)
            self._push(t, _WIRE, w, inc, version, (payload, nbytes))
        else:
            self._push(t, _ARRIVE, w, inc, version, payload)

    def _on_wire(self, w: int, inc: int, version: int, sent: tuple[Any, int]) -> None:
        """An update reaches the server's NIC, which receives one at a time, beside its sends, in the order they
        arrive (reserved when sent instead, a late message of a heavy-tailed latency held back earlier arrivals)."""
        payload, nbytes = sent
        if self.io_stage is not None:  # --placement local: the server's I/O thread copies it in, on the host's cores
            self.io_stage.submit(self.now, nbytes * self.crossing_per_byte, lambda _t: self._on_arrive(w, inc, version, payload))
            return
        start = max(self.now, self.rx_free)
        self.rx_free = start + nbytes / self.nic_bw
        self._occupy(start, self.rx_free)
        t = self.rx_free
        self.rx_free += self._not_overlapped(nbytes)
        self._push(t, _ARRIVE, w, inc, version, payload)

    def _not_overlapped(self, nbytes: int) -> float:
        """Seconds of this update's step and receive that do not run beside each other (``1 - overlap`` of the
        shorter, measured with the transport): on a host whose cores are all busy the server's stages take
        turns, so each is held that much longer. Occupancy only: no message of its own waits for it, so one
        worker alone never sees it, and the plateau is ``1 / (max(step, receive) + that)``."""
        if self.overlap >= 1.0 or self.nic_bw == math.inf or self.broker_s <= 0:
            return 0.0
        step = self.broker_s * (self.opts.servers if self.host is not None else 1)  # local: K steps take turns with the I/O
        return (1.0 - self.overlap) * min(step, nbytes / self.nic_bw)

    def _on_cancel(self, w: int, inc: int, version: int, _b: Any) -> None:
        """The broker's abandon reaches the worker: a step at an older version ends now (or after its floor)."""
        step = self.step_of[w]
        if not self.alive[w] or inc != self.inc[w] or step is None or step[1] >= version:
            return  # done already, or computing at the current weights
        token, v, weights, started = step
        if self.host is not None:  # --placement local: the step ends now, or once it has had its floor of CPU
            running = self.jobs.get(w)
            if started > self.now or running is None or running[0] != token:
                self.cut.add(token)  # the weights are still on their way
            elif not running[1].cancelled:
                self.host.cancel(self.now, running[1])
                rest = self.cancel_floor - self.host.attained(self.now, running[1])
                self._run_step(w, inc, v, weights, token, max(0.0, rest))
            return
        at = started + self.cancel_floor
        if at > self.now:
            self._push(at, _DONE, w, inc, v, (weights, token))  # whichever end comes first counts
        else:
            self._on_done(w, inc, v, (weights, token))

    def _on_arrive(self, w: int, inc: int, version: int, payload: Any) -> None:
        update, nbytes = payload if isinstance(payload, tuple) else (None, self.u_bytes)
        self.bytes_sent += nbytes
        if inc != self.inc[w]:
            self.engine.dropped["previous-incarnation"] += 1
            return
        if w not in self.algo.live:
            self.engine.dropped["not-a-member"] += 1
            return
        if update is None:
            update, nbytes = self._compute_update(w, version, payload)
        if self.host is not None:  # the server's step, on the host's shared cores
            self.step_stage.submit(self.now, self.broker_s + self.loop_s, lambda _t: self._process(update, nbytes))
        elif self.broker_s > 0:
            self.busy_until = max(self.now, self.busy_until) + self.broker_s
            self._push(self.busy_until, _PROCESS, w, inc, update, nbytes)
            self.busy_until += self._not_overlapped(nbytes)
        else:
            self._process(update, nbytes)

    def _process(self, update: Update, nbytes: int) -> None:
        """The server takes the update: the engine the broker runs. A worker whose loss is not finite says so
        instead of sending a gradient (the runtime's worker does), and the run has diverged."""
        if not math.isfinite(update.loss):
            self.ledger.diverge(f"train loss is not finite on worker {update.worker}")
            return
        self.engine.apply(update, self.now, nbytes)

    def _evaluate(self) -> None:
        from zsgd.nn.models import evaluate

        ds = self.wl.problem.dataset
        t0 = time.perf_counter()
        test_loss, test_acc = (float(v) for v in evaluate(self.model, self.algo.w, ds.x_test, ds.y_test))
        if self.host is not None:  # the evaluator's pass takes a core of the host too: a forward pass is about a third of a step
            self.host.start(self.now, self.compute.mean * len(ds.y_test) / (3 * self.cfg.batch_size), 1.0)
        self.eval_s += time.perf_counter() - t0
        self.evals.append((self.now, self.updates, test_acc))
        if self.opts.target is not None and self.time_to_target is None and test_acc >= self.opts.target:
            self.time_to_target = self.now
        self.ledger.evaluated(self.now, test_loss, test_acc)

    # -- failures --------------------------------------------------------------
    def _on_fail(self, w: int, inc: int, recover_s: float | None, _b: Any) -> None:
        if not self.alive[w] or (inc >= 0 and inc != self.inc[w]):
            return  # already dead, or a rate failure scheduled for an earlier life
        inc = self.inc[w]
        self.alive[w] = False
        self.engine.forget_replies(w)  # a restarted worker holds no weights: its first reply is full
        self._push(self.now + self.opts.detect_s, _DETECT, w, inc, self.now)
        if recover_s is not None:
            self._push(self.now + recover_s, _RECOVER, w, inc)

    def _on_detect(self, w: int, inc: int, failed_at: float, _b: Any) -> None:
        if inc != self.inc[w] or self.alive[w] or w not in self.algo.live:
            return
        self.deaths += 1
        self.metrics.write("worker", self.now, worker=w, role="worker", status="dead", host="sim", failed_at=failed_at)
        self.engine.remove_worker(w, self.now)

    def _on_recover(self, w: int, inc: int, *_: Any) -> None:
        if inc != self.inc[w] or self.alive[w]:
            return
        if w in self.algo.live:  # rejoined before the broker noticed: it replaces the old peer
            self.engine.remove_worker(w, self.now)
        self.inc[w] += 1
        self.alive[w] = True
        self.tallies[w].incarnations += 1
        self.rejoins += 1
        self.steppers[w] = None  # a restarted worker process starts its batch stream afresh
        self.metrics.write("worker", self.now, worker=w, role="worker", status="rejoined", host="sim")
        self._schedule_rate_failure(w)
        self.engine.add_worker(w, self.now)

    def _schedule_rate_failure(self, w: int) -> None:
        f = self.opts.failures
        if f is not None and f.rate is not None:
            self._push(self.now + self.rng_fail.standard_exponential() / f.rate, _FAIL, w, self.inc[w], f.recover_s)

    # -- main loop -------------------------------------------------------------
    def run(self) -> SimResult:
        real0 = time.perf_counter()
        cfg, opts, ds = self.cfg, self.opts, self.wl.problem.dataset
        self.metrics.write("start", 0.0, mode="sim", model=cfg.model, data=ds.name, n_params=self.model.n_params,
                           n_train=self.n_train, compute_s=self.compute_s,
                           **(opts.describe() | {"broker_s": self.broker_s, "broker_bandwidth": format_bandwidth(self.broker_bw)}),
                           straggler_workers=sorted(self.stragglers.workers) if self.stragglers else [],
                           update_bytes=self.u_bytes, weights_bytes=self.w_bytes)
        if opts.failures is not None:
            for w, at, rec in opts.failures.events:
                self._push(at, _FAIL, w, -1, rec)  # -1: whichever life the worker is in
        for w in range(self.n):
            self.metrics.write("worker", 0.0, worker=w, role="worker", status="joined", host="sim")
            self._schedule_rate_failure(w)
            self.engine.add_worker(w, 0.0)
        handlers = {_DONE: self._on_done, _ARRIVE: self._on_arrive, _PROCESS: self._process, _FAIL: self._on_fail, _CANCEL: self._on_cancel,
                    _DETECT: self._on_detect, _RECOVER: self._on_recover, _START: self._on_start, _WIRE: self._on_wire,
                    _CPU: lambda _w, generation, _a, _b: self.host.on_event(self.now, generation),
                    _OCC: lambda _w, _inc, threads, _b: self.host.occupy(self.now, threads)}
        limit = cfg.time_limit
        heap, pop, ledger, requested = self.heap, heapq.heappop, self.ledger, interrupt.requested
        while ledger.stop_reason is None:
            if requested():  # Ctrl-C or SIGTERM: end as a stop rule would, with a summary
                self.ledger.stop(interrupt.STOP_REASON)
                break
            if not heap:
                self.ledger.stop("no events left: every worker failed or is held")
                break
            t, _seq, kind, w, inc, a, b = pop(heap)
            if limit is not None and t > limit:
                self.now = max(self.now, limit)
                self.ledger.stop(f"reached the time limit of {limit:g} s")
                break
            self.now = t
            self.events += 1
            if kind == _PROCESS:
                self._process(a, b)
            else:
                handlers[kind](w, inc, a, b)
        if self.ledger.final_eval_needed:
            self._evaluate()
        header = run_header("sim", self.opts.algo, self.n, self.cfg.model, self.wl.problem.dataset, self.model.n_params)
        summary = self.ledger.close(self.now, header, **self._summary_extra(time.perf_counter() - real0))
        return SimResult(summary, np.asarray(self.ledger.staleness, dtype=np.int64), self.evals, self.algo.w)

    def _summary_extra(self, real_s: float) -> dict[str, Any]:
        """What a simulated run's summary has beyond the keys every mode has."""
        v = self.now
        return {
            "virtual_s": v, "real_s": real_s,
            "rejected_messages": int(sum(self.rejected.values())), "rejected_by_reason": dict(self.rejected),
            "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
            "worker_deaths": self.deaths, "worker_rejoins": self.rejoins, "target": self.opts.target, "time_to_target_s": self.time_to_target,
            "compute_s": self.compute_s if self.compute_s is not None else self.compute.mean,
            "compute_measured": self.compute_s is not None,
            "compute_calibration_s": self.wl.compute_samples if self.compute_s is not None else None,
            "servers": self.opts.servers, "broker_s": self.broker_s, "broker_measured": self.broker_samples is not None,
            "broker_calibration_s": self.broker_samples, "broker_bandwidth_Bps": self.broker_bw, "broker_bandwidth_measured": self.broker_bw_measured,
            "server_overlap": self.overlap, "broker_lone_bandwidth_Bps": self.lone_bw, "broker_loop_s": self.loop_s,
            "crossing_threads": (self.transport.lone_threads or _CROSSING_THREADS) if self.io_stage else None, "crossing_spread": self.io_stage and self.io_stage.spread,
            "crossing_io_share": self.transport.io_share if self.io_stage else None,
            "host_cpu_utilisation": self.host.busy_core_s / (self.now * self.host.cores) if self.host is not None and self.now > 0 else None,
            "sim": self.opts.describe() | {"straggler_workers": sorted(self.stragglers.workers) if self.stragglers else []},
            "events": self.events, "gradient_real_s": self.grad_s, "eval_real_s": self.eval_s, **self.engine.summary(),
            "workers": {str(w): t.row("sim") for w, t in enumerate(self.tallies)},
        }


def record_arm(run_dir: Path, cfg: TrainConfig, described: dict, workload: Workload, simulate,
               calibration: dict | None = None) -> SimResult:
    """Write one simulated arm's run directory around ``simulate(metrics)``:
    config.yaml, metrics.jsonl, summary.json, weights.npz (the layout of real runs).
    ``calibration``: the measured figures the arm uses, recorded in config.yaml (``--calibration`` replays them)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ds, model = workload.problem.dataset, workload.model
    write_config(run_dir / "config.yaml", cfg.to_dict() | {"mode": "sim", "sim": described, "data_source": ds.source,
                                                           "n_params": model.n_params} | ({"calibration": calibration} if calibration else {}))
    path = run_dir / "metrics.jsonl"
    path.unlink(missing_ok=True)  # MetricsWriter appends; a re-run must not
    with MetricsWriter(path, flush_every_s=0.5) as metrics:
        result = simulate(metrics)
    save_arrays(run_dir / "weights.npz", model.state_dict(result.weights))
    write_json(run_dir / "summary.json", result.summary)
    return result


def run_arm(cfg: TrainConfig, opts: SimOptions, workload: Workload, run_dir: Path, progress: ProgressFn | None = None,
            plots: bool = False) -> SimResult:
    """Simulate one arm into ``run_dir``."""
    cfg = resolve_lr_schedule(cfg, opts.algo)
    result = record_arm(run_dir, cfg, opts.validate().describe(), workload,
                        lambda metrics: Simulation(cfg, opts, workload, metrics, progress).run(), workload.calibration_record(opts))
    if plots:
        from zsgd.output.plots import plot_curves

        plot_curves([Path(run_dir)], Path(run_dir), time_label="virtual time (s)")
    return result


__all__ = ["SimOptions", "SimResult", "Simulation", "Workload", "record_arm", "run_arm"]
