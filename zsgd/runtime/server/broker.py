"""The broker (``zsgd/broker.py`` is its entry point): one ZeroMQ ROUTER in front of a training service.

It is built from parts, each with one concern:

- the **endpoint** (``zsgd.runtime.server.endpoint``): the socket, CURVE, limits,
  tracked zero-copy sends, the emulated-network queue;
- the **session** (``zsgd.runtime.server.session``): membership, the handshake,
  heartbeats and dead peers;
- the **service**: what the run computes. The parameter server
  (``zsgd.runtime.server.parameter_server``) trains the central model; the
  decentralized relay (``zsgd.runtime.server.relay``) forwards peer messages and
  averages the nodes' models. A new kind of server is a new service. It is
  given a ``ServiceContext`` (``zsgd.runtime.server.context``: the ledger, the
  clock, the membership, a port), never this broker, and it implements the
  ``Service`` protocol (``zsgd.runtime.server.service``), checked whole here;
- the **ledger** (``zsgd.core.ledger``): counts, logging, evaluation
  cadence, stop and divergence rules, the summary's core keys -- the same
  object the trainer and the simulators keep.

The broker itself routes each incoming message to the part that handles it,
runs the evaluator (a separate process, so updates never wait on a test-set
pass), writes checkpoints and assembles the summary. A bad message is
rejected and counted; the broker keeps running.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from zsgd.core.config import TrainConfig
from zsgd.algorithms.schedules import resolve_lr_schedule
from zsgd.errors import ProtocolError, ZsgdError
from zsgd.nn.server_step import is_finite
from zsgd.output.metrics import MetricsWriter
from zsgd.runtime.server.context import MembershipView, ServiceContext, ServicePort
from zsgd.runtime.server.endpoint import Endpoint
from zsgd.runtime.run_options import EmulationOptions, NetworkOptions, ServerOptions
from zsgd.runtime.server.service import Service, missing_hooks
from zsgd.runtime.server.session import Session
from zsgd.wire import protocol
from zsgd.wire.membership import Membership
from zsgd.wire.protocol import MsgType

#: seconds a broker's own check of its model (a divergence its workers' losses suggest) is reused for
CONFIRM_REUSE_S = 5.0
#: at most this often the loop's housekeeping (heartbeats, dead peers, time-based stop and evaluation rules) runs while
#: messages keep coming: every pass, it was 35-40 us of each update's CPU (a loaded server takes one update a pass)
HOUSEKEEPING_S = 0.01


@dataclass
class BrokerOptions:
    """The broker's options: the run's server and network groups as they are, plus what the
    runner resolves only at run time (the bound address, CURVE keys, the emulator, the worker count)."""

    server: ServerOptions = field(default_factory=ServerOptions)
    network: NetworkOptions = field(default_factory=NetworkOptions)
    n_workers: int = 1
    bind: str = "tcp://127.0.0.1:0"
    curve: dict | None = None  # {"secret": ..., "public": ..., "allowed": [...]}
    token: str | None = None  # without CURVE: the run secret every HELLO join must prove (zsgd.wire.auth)
    emulator: Any = None  # zsgd.runtime.emulation.LinkEmulator: delays messages and slows stragglers (emulation)
    emulation: EmulationOptions = field(default_factory=EmulationOptions)  # its specs: range servers build their own emulator
    wait_workers_s: float = 120.0  # abort if no worker is live this long after start


ServiceFactory = Callable[[ServiceContext, np.ndarray, dict | None], Service]
"""``factory(ctx, w0, opt_state)``: the service a broker runs, built from its context (never from the broker)."""


def parameter_server(ctx: ServiceContext, w0: np.ndarray, opt_state: dict | None) -> Service:
    """The default service: a central model trained by the run's server algorithm."""
    from zsgd.nn.optim import make_optimizer, warm_optimizer
    from zsgd.runtime.server.parameter_server import ParameterServer

    cfg = ctx.cfg
    warm_optimizer(cfg.optimizer, cfg.momentum, cfg.weight_decay)  # now, not on the first update: see its docstring
    optimizer = make_optimizer(cfg.optimizer, w0.size, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return ParameterServer(ctx, w0, optimizer, ctx.opts.server, opt_state)


class Broker:
    def __init__(self, cfg: TrainConfig, problem: Any, opts: BrokerOptions, run_dir: Path, metrics: MetricsWriter,
                 resume: tuple[np.ndarray, dict, dict] | None = None, run_id: str | None = None,
                 service: ServiceFactory = parameter_server) -> None:
        self.cfg = resolve_lr_schedule(cfg, opts.server.algo)
        metrics = HeldLines(metrics)  # every line of the broker's parts through it, so their order is kept
        self.problem, self.opts, self.run_dir, self.metrics = problem, opts, Path(run_dir), metrics
        self.run = run_id or uuid.uuid4().hex[:12]
        n_params = problem.model.n_params
        w0, opt_state, counters = problem.model.init(seed=cfg.seed), None, {"updates": 0, "samples": 0}
        t_offset = 0.0
        if resume is not None:
            w0, opt_state, counters = resume
            if w0.shape != (n_params,):
                raise ZsgdError("checkpoint does not match the model (parameter count differs)")
            t_offset = float(counters.get("elapsed", 0.0))
        self.ledger = problem.ledger(self.cfg, emit=metrics.write, updates=int(counters["updates"]), samples=int(counters["samples"]))
        # What the service is given instead of this broker (zsgd.runtime.server.context).
        self.ctx = ServiceContext(run=self.run, cfg=self.cfg, opts=opts, problem=problem, ledger=self.ledger, metrics=metrics,
                                  run_dir=self.run_dir, t_offset=t_offset, after_update=self.after_update,
                                  request_eval=self.request_eval, snapshot_ready=self.maybe_send_eval,
                                  replay_deferred=lambda: self.session.replay_deferred())
        self.rejected, self.reject = self.ctx.rejected, self.ctx.reject
        self.service: Service = service(self.ctx, w0, opt_state)
        missing = missing_hooks(self.service)
        if missing:
            raise TypeError(f"{type(self.service).__name__} is not a complete service: it lacks {', '.join(missing)}")
        limits = protocol.Limits.for_model(n_params, factor=self.service.limits_factor)
        self.endpoint = Endpoint(opts.bind, limits, self.run_dir, opts.curve, emulated=opts.emulator is not None)
        self.address = self.endpoint.address
        # Workers on this machine may offer it (zsgd.wire.shm), for the vectors of this server's range.
        self.endpoint.share_memory(self.service.exchanged_size(n_params), enabled=opts.network.shared_memory)
        self.session = Session(self, opts.n_workers, opts.network.heartbeat, opts.network.timeout, opts.wait_workers_s)
        self.ctx.bind(ServicePort(self.endpoint, self.session, opts.emulator), MembershipView(self.session.members))
        if opts.emulator is None:
            self.service.share_replies()
        self._eval_pending = False
        self._eval_asked: dict[str, Any] | None = None  # what the evaluator was sent: its answer must match
        self._last_eval_t = 0.0
        self.ledger.confirm_divergence = self._confirm_divergence  # workers' losses alone never end a run
        self._own_loss: tuple[int, float, float] | None = None  # (version, wall time, test loss) of the last check

    # -- what other parts read -------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return self.ctx.elapsed()

    @property
    def members(self) -> Membership:
        return self.session.members

    @property
    def current_lr(self) -> float:
        return self.service.current_lr

    @property
    def failed(self) -> bool:
        """The service gave up on the run (the relay, when a node is lost); the runner exits non-zero."""
        return self.service.failed

    def assign_meta(self) -> dict[str, Any]:
        s = self.opts.server
        return {"n_workers": self.opts.n_workers, "heartbeat": self.opts.network.heartbeat, "algo": s.algo, "compress": s.compress,
                "compress_replies": s.compress_replies}

    # -- main loop -----------------------------------------------------------------
    def serve(self, on_tick: Callable[["Broker"], None] | None = None, tick_s: float = 0.25, wake: Any = None) -> dict[str, Any]:
        """Run until the ledger says stop; return the summary. ``wake``: a socket whose messages ``on_tick``
        handles; readable, it ticks at once (a range server's link to its coordinator)."""
        last_tick = last_housekeeping = 0.0
        try:
            while self.ledger.stop_reason is None:
                timeout = self.endpoint.poll_timeout(min(self.opts.network.heartbeat / 4, tick_s))
                woken = False
                if wake is None:
                    readable = self.endpoint.poll(timeout)
                else:
                    readable, woken = self.endpoint.poll_with(wake, timeout)
                if readable:
                    for frames in self.endpoint.receive():  # a burst, then housekeeping
                        self._on_frames(frames)
                        if self.ledger.stop_reason is not None:
                            break
                now = time.monotonic()
                for direction, peer, payload in self.endpoint.due(now):
                    if peer.state == "ready" and self.ledger.stop_reason is None:
                        self.service.deliver_held(direction, peer, payload)
                if not readable or now - last_housekeeping >= HOUSEKEEPING_S:
                    self._housekeeping(now)
                    last_housekeeping = now
                if on_tick is not None and (woken or now - last_tick >= tick_s):
                    on_tick(self)
                    last_tick = now
        finally:
            self._finish()
        return self.summary()

    def _on_frames(self, frames: list) -> None:
        now = time.monotonic()
        identity = frames[0].bytes
        if len(frames) < 2:
            self.reject(identity, "frame-count", "a message without frames")
            return
        try:
            msg = protocol.decode(frames[1:], self.endpoint.limits)
        except ProtocolError as exc:
            self.reject(identity, exc.reason, str(exc))
            return
        members = self.session.members
        peer = members.peers.get(identity)
        if self.endpoint.guard is not None and not self.session.key_matches(identity, peer, frames[1], msg):
            return
        if peer is not None:
            peer.last_seen = now
        if msg.type == MsgType.HEARTBEAT:
            return  # liveness only (already noted); may precede the run id's assignment
        if msg.type == MsgType.HELLO:
            self.session.on_hello(identity, peer, msg, now)
        elif peer is None or peer.state == "gone" or msg.run != self.run:
            self.reject(identity, "unknown-peer" if peer is None or peer.state == "gone" else "wrong-run", f"{msg.type.name} from a peer not in this run")
        elif msg.type == MsgType.UPDATE:
            try:
                msg = self.endpoint.shared.incoming(identity, msg)  # the gradient, if it came through shared memory
            except ProtocolError as exc:
                self.reject(identity, exc.reason, str(exc))
                return
            if self.endpoint.held is not None:  # emulated uplink: the update "arrives" later
                self.endpoint.hold(("in", peer, msg), self.opts.emulator.update_delay(peer.worker, protocol.message_nbytes(msg), time.monotonic()))
                return
            self.metrics.hold()  # its lines wait for the next housekeeping (HeldLines)
            self.service.on_update(peer, msg)
        elif msg.type == MsgType.EVAL:
            self._on_eval(peer, msg)
        elif msg.type == MsgType.PEER:
            self.service.on_peer(peer, frames, msg)
        elif msg.type == MsgType.STATE and peer.role == "server":
            self.service.on_state(peer, msg)
        elif msg.type == MsgType.LEAVE:
            self.session.drop(peer, "left")
        else:
            self.reject(identity, "unexpected-type", f"{msg.type.name} is not accepted by the broker")

    def _housekeeping(self, now: float) -> None:
        self.metrics.release()
        self.session.housekeeping(now)
        self.service.tick(now)
        every_s = self.opts.server.eval_interval
        if every_s and self.elapsed - self._last_eval_t >= every_s:
            self.request_eval()
        self.ledger.check(self.elapsed)
        if self.ledger.take_eval() and self.service.evaluates_on_cadence:
            self.request_eval()

    def after_update(self) -> None:
        """The service applied an update (the ledger has it): evaluate and checkpoint on their cadences."""
        if self.ledger.take_eval() and self.service.evaluates_on_cadence:
            self.request_eval()
        every = self.opts.server.checkpoint_every
        if every and self.ledger.updates % every == 0:
            self.checkpoint()

    # -- evaluation ----------------------------------------------------------------
    def request_eval(self) -> None:
        self._eval_pending = True
        self.maybe_send_eval()

    def maybe_send_eval(self) -> None:
        ev = self.session.members.evaluator
        if not self._eval_pending or ev is None or ev.state != "ready" or ev.busy:
            return
        w = self.service.snapshot()
        if w is None:
            return  # being gathered from the range servers; the service calls again
        asked = {"version": self.service.version, "updates": self.ledger.updates, "samples": self.ledger.samples, "t": self.elapsed}
        msg = protocol.weights_message(self.run, asked["version"], w, updates=asked["updates"], samples=asked["samples"], t=asked["t"])
        if self.session.send(ev, msg):
            ev.busy = True
            self._eval_asked = asked
            self._eval_pending = False
            self._last_eval_t = self.elapsed

    def _on_eval(self, peer: Any, msg: Any) -> None:
        """An evaluation from the evaluator: checked against what it was asked, and never trusted to stop the run alone.

        Only the run's one evaluator, with an evaluation outstanding, may answer; the time, update and
        sample counts are the broker's own (those it sent with the weights), so only the loss and the
        accuracy come from the peer, each range-checked. An answer that would end the run (a target
        reached, a non-finite loss) is confirmed by the broker's own evaluation of its current model,
        and that evaluation is what the ledger decides on."""
        asked = self._eval_asked
        if peer is not self.session.members.evaluator or not peer.busy or asked is None:
            self.reject(peer.identity, "unasked-eval", f"EVAL from {peer.role} {peer.worker}, which was not asked to evaluate")
            return
        checked = _checked_eval(msg, asked)
        if isinstance(checked, str):
            self.reject(peer.identity, "bad-eval", checked)
            return
        peer.busy = False
        self._eval_asked = None
        rule = self.ledger.rule
        ends = not math.isfinite(checked["test_loss"]) or (
            rule.reason(self.ledger.updates, self.ledger.samples, self.elapsed, checked["test_acc"], checked["test_loss"]) is not None
            and rule.reason(self.ledger.updates, self.ledger.samples, self.elapsed) is None)
        if ends:
            self.final_evaluation()  # the broker's own numbers decide whether the run ends
        else:
            self.record_eval(checked)
        self.maybe_send_eval()

    def _confirm_divergence(self, limit: float, workers: frozenset[int]) -> bool:
        """Whether a divergence that workers' losses suggest is real: two of them agree (in a run of one
        worker, that one), , or this broker's own model says so -- its weights hold NaN or Inf, or its test loss is
        not finite or above ``limit`` (the threshold the workers' losses crossed).

        The evaluation is reused for the same model version and for ``CONFIRM_REUSE_S`` after it, so an
        admitted process that keeps reporting NaN costs the run at most one evaluation in that time."""
        if len(workers) >= min(2, max(1, self.opts.n_workers)):
            return True
        w = self.service.weights
        if not is_finite(w):
            return True
        now, version = time.monotonic(), self.service.version
        last = self._own_loss
        if last is None or (last[0] != version and now - last[1] >= CONFIRM_REUSE_S):
            loss, _ = self.problem.evaluate(w)
            last = self._own_loss = (version, now, float(loss))
        return not math.isfinite(last[2]) or last[2] > limit

    def record_eval(self, rec: dict[str, Any]) -> None:
        extra = self.service.eval_fields(rec["updates"])
        self.ledger.evaluated(rec["t"], rec["test_loss"], rec["test_acc"], updates=rec["updates"], samples=rec["samples"], **extra)

    def final_evaluation(self) -> None:
        """Evaluate the final model here, so the summary is exact and current."""
        loss, acc = self.problem.evaluate(self.service.weights)
        self.record_eval({"test_loss": loss, "test_acc": acc, "t": self.elapsed, "updates": self.service.version,
                          "samples": self.ledger.samples})

    # -- ending ----------------------------------------------------------------------
    def checkpoint(self) -> None:
        state = self.service.checkpoint_state()
        if state is not None:  # None: nothing to save, or (range servers) it is being gathered and comes back here
            self.ctx.write_checkpoint(*state)

    def _finish(self) -> None:
        self.metrics.release()
        self.service.before_leave()
        self.session.leave_all(self.ledger.stop_reason or "broker stopped")
        self.endpoint.close(linger_ms=500)
        if self.opts.server.checkpoint_every:
            self.checkpoint()

    def summary(self) -> dict[str, Any]:
        """The ledger's keys and the broker's own (``summary_extra``); the runner closes the ledger with the latter."""
        return self.ledger.summary(self.elapsed) | self.summary_extra()

    def summary_extra(self) -> dict[str, Any]:
        """What a real run's summary has beyond the keys every mode has: messages, bytes, peers, the service's."""
        s = self.session
        return {
            "rejected_messages": int(sum(self.rejected.values())), "rejected_by_reason": dict(self.rejected),
            "unconfirmed_divergences": self.ledger.unconfirmed_divergences,
            "dropped_connections": self.endpoint.dropped_connections,
            "bytes_sent": self.endpoint.bytes_in, "bytes_received": self.endpoint.bytes_out,
            "worker_deaths": s.deaths, "worker_rejoins": s.rejoins, "refused_clients": self.endpoint.refused + s.refused,
            "compute_s_mean": s.mean_compute(), "workers": s.workers_summary(),
        } | self.endpoint.shared.summary() | self.service.summary()


class HeldLines:
    """The run's metrics writer, whose lines wait while the broker is busy with updates and are written, in their
    order, at its next housekeeping (at most ``HOUSEKEEPING_S`` while messages keep coming, at once when the loop
    finds nothing to read) and when it stops. An update's line, a JSON encode and a write system call, cost 60-100
    us cold when written between two updates, the code and data evicted by each 4.8 MB transfer and step; several
    written together stay warm (the step census, one worker: 54 -> 9 us median per line, 68 -> 37 mean). The file still gets one
    flushed line per event, in order; a broker killed with SIGKILL loses at most the last few milliseconds of them."""

    def __init__(self, writer: MetricsWriter) -> None:
        self.writer = writer
        self._held: list[tuple[str, float, dict[str, Any]]] | None = None

    def write(self, event: str, t: float, **fields: Any) -> None:
        if self._held is None:
            self.writer.write(event, t, **fields)
        else:
            self._held.append((event, t, fields))

    def hold(self) -> None:
        """From now on every line waits (behind those already waiting) until ``release``."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Write the waiting lines in their order; later lines go out at once until the next ``hold``."""
        held, self._held = self._held or [], None
        for event, t, fields in held:
            self.writer.write(event, t, **fields)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.writer, name)


def _checked_eval(msg: Any, asked: dict[str, Any]) -> dict[str, Any] | str:
    """An EVAL's record (the broker's own counts, the peer's loss and accuracy), or why it is refused."""
    m = msg.meta
    if msg.version != asked["version"] or any(m.get(k) != asked[k] for k in ("updates", "samples", "t")):
        return (f"EVAL of version {msg.version} ({m.get('updates')!r} updates at t={m.get('t')!r}) does not answer the weights sent "
                f"(version {asked['version']}, {asked['updates']} updates at t={asked['t']:.3f})")[:300]
    acc, loss = m.get("test_acc"), m.get("test_loss")
    if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not 0.0 <= acc <= 1.0:
        return f"EVAL accuracy {str(acc)[:40]} is not a number in [0, 1]"
    if loss is None:
        loss = float("nan")  # the evaluator's word for a diverged model (JSON has no NaN); confirmed before it ends the run
    elif isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss) or loss < 0:
        return f"EVAL loss {str(loss)[:40]} is not a finite number >= 0 (or null for a diverged model)"
    return {"test_loss": float(loss), "test_acc": float(acc), "t": asked["t"], "updates": asked["updates"], "samples": asked["samples"]}
