"""A range server: one of the K processes of ``--servers K``.

It is started like a worker (``zsgd worker --role server --id I``, locally
or over SSH, CURVE keys on stdin), joins the coordinator (the ``zsgd run``
process) over a heartbeating link, and gets its range ``[lo, hi)`` of the
flat parameter vector, the run's configuration and, in a STATE message,
that range's weights and optimizer state (fresh, or from a checkpoint on
``--resume``). It then binds a ROUTER of its own and runs an ordinary
broker on it: the same endpoint, session and parameter-server service as
the coordinator, over a vector of ``hi - lo`` coordinates. Workers join it
like any broker and push and pull that range; the server algorithm (async,
sync, ssp, local SGD) decides alone, and because every worker sends every
range together, the K servers' rounds stay in step. ``ksync`` and ``kasync``
pick gradients by arrival order, which differs between servers: for them the
coordinator decides and this server replays its decisions
(``zsgd.algorithms.step_log``), sent over the control link and handled as
soon as they arrive (the broker's loop wakes for them).

What it does not own: the stop rule, evaluation and checkpoints. The
coordinator asks for the range's state (STATE requests, answered from the
broker's tick) and says LEAVE when the run is over; if the coordinator goes
silent for ``--timeout``, the server stops too. Everything ends.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from zsgd.core.config import TrainConfig
from zsgd.core.ledger import RunLedger
from zsgd.core.stopping import StopRule
from zsgd.errors import ZsgdError
from zsgd.runtime.server.context import ServiceContext
from zsgd.runtime.server.parameter_server import ParameterServer
from zsgd.runtime.worker.node_options import NodeOptions, log
from zsgd.wire import protocol
from zsgd.wire.link import BROKER_DEAD, BrokerLink
from zsgd.wire.protocol import Message, MsgType

STATS_EVERY_S = 0.5  # how often the coordinator's live view hears from this server


class _RangeModel:
    """What the broker needs of a model, for a range: its size (weights come from the coordinator)."""

    def __init__(self, n_params: int) -> None:
        self.n_params = n_params

    def init(self, seed: int = 0) -> np.ndarray:
        return np.zeros(self.n_params, dtype=np.float32)


class FollowerLedger(RunLedger):
    """A range server's ledger: it counts and follows the run's progress (so ``--lr-schedule`` decays
    every range alike) but never ends the run; the coordinator applies the stop and divergence rules
    to the same updates and losses, and says LEAVE."""

    def stop(self, reason: str) -> None:
        pass

    def diverge(self, what: str, update: int | None = None) -> None:
        pass

    def end(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason


class RangeProblem:
    """The broker's view of the problem on a range server: a size, and the run's stop rule to follow."""

    def __init__(self, n_params: int, rule: dict[str, Any]) -> None:
        self.model = _RangeModel(n_params)
        self.rule = StopRule(**rule)

    def ledger(self, cfg: TrainConfig, emit=None, updates: int = 0, samples: int = 0, eval_every: int | None = None) -> RunLedger:
        return FollowerLedger(self.rule, n_train=self.rule.n_train, log_every=1 << 30, eval_every=0, diverge_factor=0.0, emit=emit,
                              updates=updates, samples=samples)


def _range_service(ctx: ServiceContext, w0: np.ndarray, opt_state: dict | None) -> ParameterServer:
    """A range server's service: an ordinary parameter server over its range, following the coordinator's step log."""
    from zsgd.nn.optim import make_optimizer, warm_optimizer

    cfg = ctx.cfg
    warm_optimizer(cfg.optimizer, cfg.momentum, cfg.weight_decay)
    optimizer = make_optimizer(cfg.optimizer, w0.size, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return ParameterServer(ctx, w0, optimizer, ctx.opts.server, opt_state, one_range=True, follower=True)


def serve_range(opts: NodeOptions, link: BrokerLink, assign: Message) -> int:
    """Serve range ``assign.meta['range']`` until the coordinator says LEAVE or goes silent; the exit code."""
    from zsgd.runtime.server.broker import Broker, BrokerOptions
    from zsgd.output.metrics import MetricsWriter
    from zsgd.runtime.run_options import EmulationOptions, NetworkOptions, ServerOptions

    meta = assign.meta
    index = assign.worker
    cfg = TrainConfig.from_dict(dict(meta["config"]))
    lo, hi = (int(x) for x in meta["range"])
    state = _initial_state(opts, link, hi - lo)
    if state is None:
        return 3
    w, opt_state, counters = state
    curve = meta.get("curve")
    if curve is not None:
        curve = {"secret": curve["secret"].encode("ascii"), "public": curve["public"].encode("ascii"), "allowed": dict(curve["allowed"])}
    server = ServerOptions(**dict(meta["server_options"]) | {"checkpoint_every": 0, "eval_interval": 0.0, "servers": 1})
    # Compute times are drawn by the coordinator alone (a sharded worker stretches to its reply's draw): a
    # range server on another machine need not have a --inject-compute trace file.
    emulation = EmulationOptions(**dict(meta["emulation"]) | {"inject_compute": None})
    n_workers = int(meta["n_workers"])
    bind = f"tcp://{_bracketed(opts.advertise) if opts.advertise else meta['bind_host']}:0"
    network = NetworkOptions(heartbeat=float(meta["heartbeat"]), timeout=float(meta["timeout"]), shared_memory=meta.get("shared_memory") is not False)
    bopts = BrokerOptions(server, network, n_workers=n_workers,
                          bind=bind, curve=curve, token=opts.token if curve is None else None, emulator=emulation.emulator(n_workers, int(meta["seed"])), emulation=emulation,
                          wait_workers_s=math.inf)
    work = Path(tempfile.mkdtemp(prefix=f"zsgd-server-{index}-"))
    try:
        with MetricsWriter(work / "metrics.jsonl") as metrics:
            broker = Broker(cfg, RangeProblem(hi - lo, dict(meta["stop_rule"])), bopts, work, metrics, resume=(w, opt_state, counters), run_id=assign.run,
                            service=_range_service)
            port = int(broker.address.rsplit(":", 1)[1])
            link.send(protocol.hello(link.run, index, stage="ready", role="server", port=port,
                                     host=opts.advertise, address=broker.address))
            log(opts, f"serving range [{lo:,}, {hi:,}) of run {assign.run} on {broker.address}")
            service = broker.service
            assert isinstance(service, ParameterServer)  # what _range_service built
            control = _Control(opts, link, broker, service, index)
            service.on_gather = control.answer
            # Woken by the coordinator's messages as by the workers': ksync/kasync replay its decisions at once.
            broker.serve(on_tick=control.tick, tick_s=0.05, wake=link.wake_socket)
            return control.exit_code
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _initial_state(opts: NodeOptions, link: BrokerLink, n: int) -> tuple[np.ndarray, dict | None, dict] | None:
    deadline = time.monotonic() + opts.join_timeout
    while time.monotonic() < deadline:
        msg = link.recv(timeout=1.0)
        if msg is BROKER_DEAD:
            break
        if msg is None or msg.type != MsgType.STATE:
            continue
        w = np.array(msg.arrays["w"], dtype=np.float32)
        if w.shape != (n,):
            raise ZsgdError(f"the coordinator sent {w.size} weights for a range of {n}")
        opt = {k[4:]: np.array(v) for k, v in msg.arrays.items() if k.startswith("opt.")} or None
        return w, opt, {"updates": int(msg.meta.get("updates", 0)), "samples": int(msg.meta.get("samples", 0)),
                   "elapsed": float(msg.meta.get("elapsed", 0.0))}
    log(opts, "the coordinator sent no state for this range; exiting")
    return None


class _Control:
    """The coordinator's side of the range server, handled between bursts of worker traffic."""

    def __init__(self, opts: NodeOptions, link: BrokerLink, broker: Any, service: ParameterServer, index: int) -> None:
        self.opts, self.link, self.broker, self.service, self.index = opts, link, broker, service, index
        self.exit_code = 0
        self._last_stats = 0.0
        self._last = (time.monotonic(), 0, 0, 0)
        # gathers asked "at" a version this range has not reached yet: (tag, full, at, answer anyway by)
        self._waiting: list[tuple[int, bool, int, float]] = []

    def tick(self, broker: Any) -> None:
        while True:
            msg = self.link.recv(timeout=0)
            if msg is None:
                break
            if msg is BROKER_DEAD:
                log(self.opts, f"coordinator at {self.opts.connect} silent for {self.opts.timeout:g} s; stopping")
                self.exit_code = 3
                broker.ledger.end("coordinator gone")
                return
            if msg.type == MsgType.LEAVE:
                broker.ledger.end(str(msg.meta.get("reason", "run over")))
                return
            if msg.type == MsgType.STATE and "log" in msg.meta:  # ksync/kasync: the coordinator's decisions (step_log)
                if not self.service.follow_log(msg.meta):
                    log(self.opts, "lost part of the coordinator's step log; stopping (continue with --resume RUN_DIR)")
                    self.exit_code = 3
                    broker.ledger.end("step log lost")
                    return
            elif msg.type == MsgType.STATE:
                at = msg.meta.get("at")
                if isinstance(at, int) and not isinstance(at, bool) and at > self.service.version:
                    # its copy of the last gradient is still on its way: wait for it, not for ever (a worker that died
                    # between its ranges never sends it); well inside the coordinator's own wait, max(2 s, --timeout)
                    self._waiting.append((int(msg.meta.get("tag", 0)), bool(msg.meta.get("full")), at,
                                          time.monotonic() + max(1.0, self.opts.timeout / 2)))
                else:
                    self.answer(int(msg.meta.get("tag", 0)), bool(msg.meta.get("full")))
        now = time.monotonic()
        if self._waiting:
            due = [w for w in self._waiting if self.service.version >= w[2] or now >= w[3]]
            self._waiting = [w for w in self._waiting if w not in due]
            for tag, full, _at, _by in due:
                self.answer(tag, full)
        if now - self._last_stats >= STATS_EVERY_S:
            self._last_stats = now
            self.link.send(protocol.state_message(self.link.run, self.index, self.service.version, {}, tag=0, stats=self.stats(now)))

    def stats(self, now: float) -> dict[str, float]:
        b, service = self.broker, self.service
        t0, u0, i0, o0 = self._last
        dt = max(now - t0, 1e-9)
        out = {"updates": service.version, "updates_per_s": (service.version - u0) / dt,
               "bytes_in_per_s": (b.endpoint.bytes_in - i0) / dt, "bytes_out_per_s": (b.endpoint.bytes_out - o0) / dt,
               "rejected": int(sum(b.rejected.values())), "workers": len(b.session.members.live_workers()),
               "queue_depth": b.endpoint.queue_depth, "shared_memory_links": b.endpoint.shared.taken}
        self._last = (now, service.version, b.endpoint.bytes_in, b.endpoint.bytes_out)
        return out | (service.algo.report() if service.algo.name == "follower" else {})  # ksync/kasync: the replayed steps' digest (equal to the coordinator's)

    def answer(self, tag: int, full: bool) -> None:
        """This range's weights (``full``: and optimizer state) for the coordinator's gather ``tag``."""
        service = self.service
        arrays: dict[str, np.ndarray] = {"w": np.array(service.weights, copy=True)}
        if full:
            arrays |= {f"opt.{k}": v for k, v in service.optimizer.state_arrays().items()}
        self.link.send(protocol.state_message(self.link.run, self.index, service.version, arrays, tag=tag,
                                              stats=self.stats(time.monotonic())))
