"""The broker: a ZeroMQ ROUTER holding the central model.

It drives a sans-IO server algorithm (``zsgd.algorithms``) with the wall
clock: messages in, the algorithm's outputs out. Around that it does what
the algorithm must not know about: membership and heartbeats, validation of
every message before it touches the model, evaluation in a separate
evaluator process (so the update loop never stalls on it), checkpoints, and
metrics. A bad message is rejected and counted; the broker keeps running.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from zsgd.wire import protocol
from zsgd.algorithms import Applied, Dropped, Reply, Update, make_server_algorithm
from zsgd.runtime.checkpoint import save_checkpoint
from zsgd.core.config import TrainConfig
from zsgd.errors import ZsgdError
from zsgd.wire.membership import Membership, Peer
from zsgd.output.metrics import MetricsWriter
from zsgd.wire.protocol import Message, MsgType, ProtocolError
from zsgd.core.schedule import lr_factor, resolve_lr_schedule


@dataclass
class BrokerOptions:
    algo: str = "async"
    n_workers: int = 1
    bind: str = "tcp://127.0.0.1:0"
    heartbeat: float = 1.0
    timeout: float = 3.0  # a worker silent this long is dead (3 heartbeats)
    staleness_lr: str | bool = "off"  # off | scalar | per-coordinate
    compress: str = "none"  # the workers' update codec (travels in ASSIGN)
    compress_replies: str = "none"  # replies as weight deltas through this codec (zsgd.compression.delta)
    checkpoint_every: int = 500  # updates; 0 disables
    eval_every_s: float = 0.0  # also evaluate every N seconds (0: off)
    wait_workers_s: float = 120.0  # abort if no worker is live this long after start
    curve: dict | None = None  # {"secret": ..., "public": ..., "allowed": [...]}
    emulator: Any = None  # zsgd.runtime.emulation.LinkEmulator: delays messages and slows stragglers (emulation)


@dataclass
class BrokerState:
    """Counters the live view and summary read."""

    updates: int = 0
    samples: int = 0
    rejected: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    staleness: list[int] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    last_loss: float = float("nan")
    test_loss: float = float("nan")
    test_acc: float = float("nan")
    bytes_in: int = 0
    bytes_out: int = 0
    deaths: int = 0
    rejoins: int = 0
    update_bytes: int = 0  # accepted updates, as sent
    dense_update_bytes: int = 0  # the same updates uncompressed
    reply_bytes: int = 0  # weight replies to workers, as sent
    dense_reply_bytes: int = 0  # the same replies as full weights
    stop_reason: str | None = None


class Broker:
    def __init__(self, cfg: TrainConfig, problem, opts: BrokerOptions, run_dir: Path, metrics: MetricsWriter,
                 resume: tuple[np.ndarray, dict, dict] | None = None, run_id: str | None = None) -> None:
        from zsgd.nn.optim import make_optimizer

        cfg = resolve_lr_schedule(cfg, opts.algo)
        self.cfg, self.problem, self.opts, self.run_dir, self.metrics = cfg, problem, opts, Path(run_dir), metrics
        self.run = run_id or uuid.uuid4().hex[:12]
        model = problem.model
        self.n_params = model.n_params
        self.optimizer = make_optimizer(cfg.optimizer, model.n_params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.reply_codec = None
        if opts.compress_replies != "none":
            from zsgd.compression.delta import DeltaReplyEncoder

            self.reply_codec = DeltaReplyEncoder(opts.compress_replies, model.n_params, seed=cfg.seed)
        w0 = model.init(seed=cfg.seed)
        self.state = BrokerState()
        self.t_offset = 0.0
        if resume is not None:
            w0, opt_state, counters = resume
            if w0.shape != (self.n_params,):
                raise ZsgdError("checkpoint does not match the model (parameter count differs)")
            self.optimizer.load_state_arrays(opt_state)
            self.state.updates, self.state.samples = int(counters["updates"]), int(counters["samples"])
            self.t_offset = float(counters.get("elapsed", 0.0))
        self.algo = self._make_algorithm(w0)
        self.algo.version = self.state.updates
        # Replies are sent zero-copy from a view of the live weights; the algorithm copies
        # them away before an update only while a tracked send of that view is in flight.
        # Emulation parks messages before sending them (untracked), so it keeps copies.
        self._weight_sends: list[zmq.MessageTracker] = []
        if opts.emulator is None and hasattr(self.algo, "share_snapshots"):
            self.algo.share_snapshots = True
            self.algo.snapshot_busy = self._weights_in_flight
        self.members = Membership(opts.n_workers, opts.timeout)
        self.rule = problem.stop_rule(cfg)
        self.limits = protocol.Limits.for_model(self.n_params)
        self.ctx = zmq.Context()
        self.sock = self._bind()
        self._eval_pending = False
        self._next_eval = self._first_eval_mark()
        self._last_eval_t = 0.0
        self._loss_window: list[float] = []
        self._t0 = time.monotonic()
        self._last_live = self._t0
        if opts.emulator is not None:
            from zsgd.runtime.emulation import DelayQueue

            self._held = DelayQueue()  # emulated network: messages parked until due
        else:
            self._held = None

    # -- set-up ----------------------------------------------------------------
    def _make_algorithm(self, w0: np.ndarray):
        """The server algorithm the broker drives (a hook: the decentralized relay has none)."""
        return make_server_algorithm(self.opts.algo, w0, self.optimizer, staleness_lr=self.opts.staleness_lr, clip_norm=self.cfg.clip_norm)

    def _assign_meta(self, peer: Peer) -> dict[str, Any]:
        """Extra ASSIGN fields for ``peer`` (a hook: the relay adds the topology and the rule's parameters)."""
        return {}

    def _bind(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.sndhwm = sock.rcvhwm = 64
        sock.linger = 0
        self.guard = None  # CURVE: ZAP allow-list + refusal counter (zsgd.wire.security)
        self._joining_user: str | None = None  # the CURVE key of the HELLO being handled
        if self.opts.curve:
            from zsgd.wire.security import CurveGuard

            sock.curve_server = True
            sock.curve_secretkey = self.opts.curve["secret"]
            sock.curve_publickey = self.opts.curve["public"]
            self.guard = CurveGuard(self.ctx, self.opts.curve.get("allowed", ()), self.run_dir / "security.log")
            self.guard.attach(sock)
        addr = self.opts.bind
        try:
            if addr.startswith("tcp://") and addr.endswith(":0"):
                port = sock.bind_to_random_port(addr[:-2])
                self.address = f"{addr[:-2]}:{port}"
            else:
                sock.bind(addr)
                self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            sock.close()
            if self.guard is not None:
                self.guard.stop()
            self.ctx.term()
            if exc.errno == zmq.EADDRINUSE:
                raise ZsgdError(f"cannot listen on {addr}: the port is in use; choose another with --port (0 picks a free one)") from None
            raise ZsgdError(f"cannot listen on {addr}: {exc}") from None
        return sock

    def _first_eval_mark(self) -> int:
        """Next evaluation point: in updates with --eval-every, else in samples (once per epoch)."""
        if self.cfg.eval_every:
            return self.state.updates + self.cfg.eval_every
        n_train = len(self.problem.dataset.y_train)
        return (self.state.samples // n_train + 1) * n_train

    def _eval_due(self) -> bool:
        return (self.state.updates if self.cfg.eval_every else self.state.samples) >= self._next_eval

    @property
    def elapsed(self) -> float:
        return self.t_offset + time.monotonic() - self._t0

    # -- main loop -------------------------------------------------------------
    def serve(self, on_tick: Callable[["Broker"], None] | None = None, tick_s: float = 0.25) -> dict[str, Any]:
        """Run until a stop rule fires; return the summary counters."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        last_tick = 0.0
        hb = self.opts.heartbeat
        try:
            while self.state.stop_reason is None:
                wait = min(hb / 4, tick_s)
                if self._held is not None and self._held.next_due() is not None:
                    wait = max(0.0, min(wait, self._held.next_due() - time.monotonic()))
                events = dict(poller.poll(int(wait * 1000)))
                if self.sock in events:
                    for _ in range(256):  # drain a burst, then do housekeeping
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_frames(frames)
                        if self.state.stop_reason is not None:
                            break
                now = time.monotonic()
                if self._held is not None:
                    self._release_held(now)
                self._housekeeping(now)
                if on_tick is not None and now - last_tick >= tick_s:
                    on_tick(self)
                    last_tick = now
        finally:
            self._finish()
        return self.summary()

    def _on_frames(self, frames: list) -> None:
        now = time.monotonic()
        if len(frames) < 2:
            self.state.rejected["frame-count"] += 1
            return
        identity = frames[0].bytes
        self.state.bytes_in += sum(len(f.buffer) for f in frames[1:])
        try:
            msg = protocol.decode(frames[1:], self.limits)
        except ProtocolError as exc:
            self._reject(identity, exc.reason, str(exc))
            return
        peer = self.members.peers.get(identity)
        if self.guard is not None and not self._key_matches(identity, peer, frames[1], msg):
            return
        if peer is not None:
            peer.last_seen = now
        if msg.type == MsgType.HEARTBEAT:
            return  # liveness only (already noted); may precede the run id's assignment
        if msg.type == MsgType.HELLO:
            self._on_hello(identity, peer, msg, now)
        elif peer is None or peer.state == "gone" or msg.run != self.run:
            self._reject(identity, "unknown-peer" if peer is None or peer.state == "gone" else "wrong-run", f"{msg.type.name} from a peer not in this run")
        elif msg.type == MsgType.UPDATE:
            if self._held is not None:  # emulated uplink: the update "arrives" later
                delay = self.opts.emulator.delay(peer.worker, True, protocol.message_nbytes(msg))
                self._held.push(("in", peer, msg), now, delay)
            else:
                self._on_update(peer, msg)
        elif msg.type == MsgType.EVAL:
            self._on_eval(peer, msg)
        elif msg.type == MsgType.PEER:
            self._on_peer(peer, frames, msg)
        elif msg.type == MsgType.LEAVE:
            self._drop_peer(peer, "left", now)
        else:
            self._reject(identity, "unexpected-type", f"{msg.type.name} is not accepted by the broker")

    def _on_peer(self, peer: Peer, frames: list, msg: Message) -> None:
        """Worker-to-worker messages exist only in decentralized runs (``zsgd.runtime.relay``)."""
        self._reject(peer.identity, "unexpected-type", "PEER is not accepted by a centralized broker")

    def _reject(self, identity: bytes, reason: str, text: str) -> None:
        self.state.rejected[reason] += 1
        self.metrics.write("rejected", self.elapsed, reason=reason, detail=text[:200], peer=identity[:64].hex())

    # -- membership ------------------------------------------------------------
    def _key_matches(self, identity: bytes, peer: Peer | None, frame, msg: Message) -> bool:
        """CURVE: a routing identity belongs to the key that joined with it.

        ROUTER_HANDOVER lets a new connection take over a routing identity;
        without this check a client holding *another* worker's valid key
        could speak as that worker. One key holds at most one live peer.
        """
        try:
            user = frame.get("User-Id")
        except (zmq.ZMQError, AttributeError):
            user = None
        live = peer is not None and peer.state != "gone"
        if live and peer.user is not None and user != peer.user:
            self._reject(identity, "wrong-key", f"{msg.type.name} for {peer.role} {peer.worker} signed by another client key")
            return False
        if msg.type == MsgType.HELLO and msg.meta.get("stage", "join") == "join":
            if any(p.user == user and p.identity != identity and p.state != "gone" for p in self.members.peers.values()):
                self._reject(identity, "key-in-use", f"client key {user!r} already holds a live peer")
                return False
            self._joining_user = user
        return True

    def _on_hello(self, identity: bytes, peer: Peer | None, msg: Message, now: float) -> None:
        stage = msg.meta.get("stage", "join")
        role = msg.meta.get("role", "worker")
        if role not in ("worker", "evaluator"):
            self._reject(identity, "bad-role", f"role {role!r}")
            return
        if stage == "join":
            if peer is not None and peer.state == "ready" and peer.role == "worker":
                self._dispatch(self.algo.remove_worker(peer.worker, self.elapsed))
            peer, rejoined = self.members.admit(identity, role, msg.worker, now)
            if peer is not None and role == "worker" and self.reply_codec is not None:
                self.reply_codec.forget(peer.worker)  # a (re)joining worker holds no weights yet: full ones first
            if peer is None:
                self._send(identity, Message(MsgType.ERROR, self.run, -1, 0, {}, meta={"message": f"run is full ({self.opts.n_workers} workers)", "fatal": True}))
                self.state.rejected["run-full"] += 1
                return
            peer.host, peer.pid = str(msg.meta.get("host", "?"))[:64], int(msg.meta.get("pid", 0) or 0)
            peer.user = self._joining_user
            if rejoined:
                self.state.rejoins += 1
            meta = {"config": self.cfg.to_dict(), "n_workers": self.opts.n_workers, "heartbeat": self.opts.heartbeat,
                    "algo": self.opts.algo, "compress": self.opts.compress, "compress_replies": self.opts.compress_replies} | self._assign_meta(peer)
            self._send_peer(peer, Message(MsgType.ASSIGN, self.run, peer.worker, self.algo.version, {}, meta=meta))
            self.metrics.write("worker", self.elapsed, worker=peer.worker, role=role, status="rejoined" if rejoined else "joined", host=peer.host, pid=peer.pid)
        elif stage == "ready" and peer is not None and peer.state == "joining" and msg.run == self.run:
            if msg.meta.get("need_shard") and role == "worker":
                self._send_shard(peer)
            peer.state = "ready"
            if role == "worker":
                self._on_worker_ready(peer)
            else:
                self._maybe_send_eval()
        else:
            self._reject(identity, "bad-hello", f"HELLO stage {stage!r} out of order")

    def _on_worker_ready(self, peer: Peer) -> None:
        self._dispatch(self.algo.add_worker(peer.worker, self.elapsed))

    def _send_shard(self, peer: Peer) -> None:
        from zsgd.data import make_shard

        ds = self.problem.dataset
        idx = make_shard(ds.y_train, self.cfg.split, self.cfg.seed, peer.worker, self.opts.n_workers)
        meta = {"input_shape": list(ds.input_shape), "n_classes": ds.n_classes}
        self._send_peer(peer, Message(MsgType.SHARD, self.run, peer.worker, 0, {"x": np.ascontiguousarray(ds.x_train[idx]), "y": ds.y_train[idx]}, meta=meta))

    def _drop_peer(self, peer: Peer, status: str, now: float) -> None:
        peer.state = "gone"
        if peer.role == "worker":
            if self.reply_codec is not None:
                self.reply_codec.forget(peer.worker)
            self._dispatch(self.algo.remove_worker(peer.worker, self.elapsed))
        else:
            peer.busy = False
        if status == "dead":
            self.state.deaths += 1
        self.metrics.write("worker", self.elapsed, worker=peer.worker, role=peer.role, status=status, host=peer.host)

    def _housekeeping(self, now: float) -> None:
        for peer in self.members.expired(now):
            self._drop_peer(peer, "dead", now)
        for peer in self.members.needing_heartbeat(now, self.opts.heartbeat):
            self._send_peer(peer, protocol.heartbeat(self.run, -1))
        if self.members.live_workers():
            self._last_live = now
        elif now - self._last_live > self.opts.wait_workers_s:
            self.state.stop_reason = f"no live worker for {self.opts.wait_workers_s:g} s"
        if self.opts.eval_every_s and self.elapsed - self._last_eval_t >= self.opts.eval_every_s:
            self._eval_pending = True
            self._maybe_send_eval()
        reason = self.rule.reason(self.state.updates, self.state.samples, self.elapsed)
        if reason and self.state.stop_reason is None:
            self.state.stop_reason = reason

    # -- training --------------------------------------------------------------
    def _on_update(self, peer: Peer, msg: Message) -> None:
        if peer.role != "worker" or peer.state != "ready":
            self._reject(peer.identity, "not-ready", "UPDATE before the worker was ready")
            return
        try:
            protocol.validate_update(msg, run=self.run, known_workers={peer.worker}, n_params=self.n_params)
        except ProtocolError as exc:
            self._reject(peer.identity, exc.reason, str(exc))
            # Re-admit so the worker gets fresh weights and no sync round waits on it.
            self._dispatch(self.algo.remove_worker(peer.worker, self.elapsed))
            self._dispatch(self.algo.add_worker(peer.worker, self.elapsed))
            return
        grad, meta = msg.arrays.get("g"), {"kind": str(msg.meta.get("kind", "grad"))}
        if msg.codec != "none":
            from zsgd.compression import decode, touched_indices

            try:
                grad = decode(msg.codec, msg.arrays, self.n_params)
            except ProtocolError as exc:
                self._reject(peer.identity, exc.reason, str(exc))
                self._dispatch(self.algo.remove_worker(peer.worker, self.elapsed))
                self._dispatch(self.algo.add_worker(peer.worker, self.elapsed))
                return
            meta["indices"] = touched_indices(msg.codec, msg.arrays)
        self.state.update_bytes += protocol.message_nbytes(msg)
        self.state.dense_update_bytes += 4 * self.n_params
        loss = msg.meta.get("loss")
        peer.last_loss = float(loss) if isinstance(loss, (int, float)) else float("nan")
        n = int(msg.meta.get("n_samples", self.cfg.batch_size))
        compute_s = msg.meta.get("compute_s")
        if isinstance(compute_s, (int, float)) and 0 <= compute_s < 3600:
            peer.compute_s_sum += float(compute_s)
        update = Update(peer.worker, msg.version, grad, n, peer.last_loss, meta)
        progress = self.rule.progress(self.state.updates, self.state.samples, self.elapsed)
        self.algo.lr_scale = lr_factor(self.cfg.lr_schedule, progress)
        self._dispatch(self.algo.on_update(update, self.elapsed))

    def _release_held(self, now: float) -> None:
        """Deliver emulated-network messages whose delay has passed."""
        for direction, peer, msg in self._held.pop_due(now):
            if peer.state != "ready" or self.state.stop_reason is not None:
                continue
            self._deliver_held(direction, peer, msg)

    def _deliver_held(self, direction: str, peer: Peer, msg: Any) -> None:
        """One emulated message arrives (a hook: the relay also holds relayed peer messages)."""
        if direction == "in":
            self._on_update(peer, msg)
        else:
            self._send_reply(peer, msg)

    def _dispatch(self, outputs: list) -> None:
        for out in outputs:
            if isinstance(out, Reply):
                peer = self.members.by_worker.get(out.worker)
                if peer is None or peer.state != "ready":
                    continue
                msg = self._reply_message(peer.worker, out.version, out.weights)
                if self._held is None:
                    self._send_reply(peer, msg)
                    continue
                factor = self.opts.emulator.slowdown(peer.worker, self.elapsed)
                if factor != 1.0:
                    msg.meta["slowdown"] = factor
                delay = self.opts.emulator.delay(peer.worker, False, protocol.message_nbytes(msg))
                self._held.push(("out", peer, msg), time.monotonic(), delay)
            elif isinstance(out, Applied):
                self._on_applied(out)
            elif isinstance(out, Dropped):
                self.state.dropped[out.reason] += 1

    def _on_applied(self, a: Applied) -> None:
        st = self.state
        st.updates = a.version
        st.samples += a.n_samples
        st.staleness.append(a.staleness)
        peer = self.members.by_worker.get(a.worker)
        if peer is not None:
            peer.steps += 1
            peer.samples += a.n_samples
            peer.staleness_sum += a.staleness
            peer.staleness_max = max(peer.staleness_max, a.staleness)
            self._loss_window.append(peer.last_loss)
        elif a.worker == -1:
            losses = [p.last_loss for p in self.members.live_workers()]
            for p in self.members.live_workers():
                p.steps += 1
            self._loss_window.extend(losses)
        self.metrics.write("update", self.elapsed, updates=a.version, samples=st.samples, worker=a.worker, staleness=a.staleness, lr=a.lr)
        if a.version % self.cfg.log_every == 0 and self._loss_window:
            finite = [x for x in self._loss_window if np.isfinite(x)]
            st.last_loss = float(np.mean(finite)) if finite else float("nan")
            self.metrics.write("train", self.elapsed, updates=a.version, samples=st.samples, epoch=st.samples / len(self.problem.dataset.y_train), loss=st.last_loss)
            self._loss_window.clear()
        if self._eval_due():
            self._next_eval = self._first_eval_mark()
            self._eval_pending = True
            self._maybe_send_eval()
        if self.opts.checkpoint_every and a.version % self.opts.checkpoint_every == 0:
            self.checkpoint()
        reason = self.rule.reason(st.updates, st.samples, self.elapsed)
        if reason:
            st.stop_reason = reason

    # -- evaluation ------------------------------------------------------------
    def _maybe_send_eval(self) -> None:
        ev = self.members.evaluator
        if not self._eval_pending or ev is None or ev.state != "ready" or ev.busy:
            return
        meta = {"updates": self.state.updates, "samples": self.state.samples, "t": self.elapsed}
        msg = protocol.weights_message(self.run, self.algo.version, self.algo.snapshot())
        msg.meta.update(meta)
        if self._send_peer(ev, msg):
            ev.busy = True
            self._eval_pending = False
            self._last_eval_t = self.elapsed

    def _on_eval(self, peer: Peer, msg: Message) -> None:
        peer.busy = False
        m = msg.meta
        try:
            rec = {k: float(m[k]) for k in ("test_loss", "test_acc", "t")} | {k: int(m[k]) for k in ("updates", "samples")}
        except (KeyError, TypeError, ValueError):
            self._reject(peer.identity, "bad-eval", "EVAL without its numbers")
            return
        self._record_eval(rec)
        self._maybe_send_eval()

    def _record_eval(self, rec: dict[str, Any]) -> None:
        st = self.state
        st.test_loss, st.test_acc = rec["test_loss"], rec["test_acc"]
        st.evals.append(rec)
        n_train = len(self.problem.dataset.y_train)
        self.metrics.write("eval", rec["t"], updates=rec["updates"], samples=rec["samples"], epoch=rec["samples"] / n_train,
                           test_loss=rec["test_loss"], test_acc=rec["test_acc"])
        reason = self.rule.reason(st.updates, st.samples, self.elapsed, rec["test_acc"])
        if reason and st.stop_reason is None:
            st.stop_reason = reason

    # -- I/O ---------------------------------------------------------------------
    @property
    def current_lr(self) -> float:
        """The step size now, after --lr-schedule (for the live view)."""
        return self.optimizer.lr * getattr(self.algo, "lr_scale", 1.0)

    def _reply_message(self, worker: int, version: int, weights: np.ndarray) -> Message:
        """WEIGHTS for a worker: the full snapshot, or with --compress-replies a coded delta from what it holds."""
        full = protocol.weights_message(self.run, version, weights)
        dense = protocol.message_nbytes(full)
        self.state.dense_reply_bytes += dense
        arrays = self.reply_codec.reply(worker, weights) if self.reply_codec is not None else None
        if arrays is None:
            self.state.reply_bytes += dense
            return full
        msg = Message(MsgType.WEIGHTS, self.run, -1, version, arrays, codec=self.reply_codec.name)
        self.state.reply_bytes += protocol.message_nbytes(msg)
        return msg

    def _send_reply(self, peer: Peer, msg: Message) -> None:
        if not self._send_peer(peer, msg) and self.reply_codec is not None:
            self.reply_codec.forget(peer.worker)  # it never got this delta: its mirror is wrong now

    def _send_peer(self, peer: Peer, msg: Message) -> bool:
        ok = self._send(peer.identity, msg)
        if ok:
            peer.last_sent = time.monotonic()
        return ok

    def _weights_in_flight(self) -> bool:
        """Whether ZeroMQ may still read a full-weights message sent earlier (its last frame is the weights)."""
        self._weight_sends = [t for t in self._weight_sends if not t.done]
        return bool(self._weight_sends)

    def _send(self, identity: bytes, msg: Message) -> bool:
        frames = [identity, *protocol.encode(msg)]
        track = msg.type == MsgType.WEIGHTS and msg.codec == "none"
        try:
            tracker = self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False, track=track)
        except zmq.Again:
            self.state.dropped["send-queue-full"] += 1
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self.state.dropped["peer-unreachable"] += 1
                return False
            raise
        if track:
            self._weight_sends.append(tracker)
        self.state.bytes_out += protocol.message_nbytes(msg)
        return True

    # -- ending ------------------------------------------------------------------
    def checkpoint(self) -> None:
        counters = {"updates": self.state.updates, "samples": self.state.samples, "elapsed": self.elapsed,
                    "algo": self.opts.algo, "run": self.run}
        save_checkpoint(self.run_dir, self.algo.w, self.optimizer.state_arrays(), counters)

    def _finish(self) -> None:
        for peer in list(self.members.peers.values()):
            if peer.state != "gone":
                self._send(peer.identity, Message(MsgType.LEAVE, self.run, peer.worker, self.algo.version, {}, meta={"reason": self.state.stop_reason or "broker stopped"}))
        self.sock.close(linger=500)
        if self.guard is not None:
            self.guard.stop()
        self.ctx.term()
        if self.opts.checkpoint_every:
            self.checkpoint()

    def final_evaluation(self) -> None:
        """Evaluate the final model here, so the summary is exact and current."""
        loss, acc = self.problem.evaluate(self.algo.w)
        self._record_eval({"test_loss": loss, "test_acc": acc, "t": self.elapsed, "updates": self.state.updates, "samples": self.state.samples})

    def _mean_compute(self) -> float | None:
        steps = sum(p.steps for p in self.members.by_worker.values())
        return sum(p.compute_s_sum for p in self.members.by_worker.values()) / steps if steps else None

    def summary(self) -> dict[str, Any]:
        st = self.state
        stale = np.asarray(st.staleness if st.staleness else [0])
        return {
            "test_accuracy": st.test_acc, "test_loss": st.test_loss, "train_loss": st.last_loss,
            "updates": st.updates, "samples": st.samples, "epochs": st.samples / len(self.problem.dataset.y_train),
            "wall_s": self.elapsed, "rejected_messages": int(sum(st.rejected.values())), "rejected_by_reason": dict(st.rejected),
            "dropped_updates": dict(st.dropped), "staleness_mean": float(stale.mean()), "staleness_p50": float(np.percentile(stale, 50)),
            "staleness_p99": float(np.percentile(stale, 99)), "staleness_max": int(stale.max()),
            "bytes_sent": st.bytes_in, "bytes_received": st.bytes_out, "worker_deaths": st.deaths, "worker_rejoins": st.rejoins,
            "stop_reason": st.stop_reason, "refused_clients": self.guard.refused if self.guard is not None else 0,
            "compression_ratio": st.dense_update_bytes / st.update_bytes if st.update_bytes else 1.0,
            "reply_compression_ratio": st.dense_reply_bytes / st.reply_bytes if st.reply_bytes else 1.0,
            "compute_s_mean": self._mean_compute(),
            "workers": {str(p.worker): {"host": p.host, "steps": p.steps, "samples": p.samples, "mean_staleness": p.mean_staleness,
                                        "max_staleness": p.staleness_max, "incarnations": p.incarnations,
                                        "compute_s_mean": p.compute_s_sum / p.steps if p.steps else None,
                                        "emulated_stall_s": p.stall_s_sum}
                        for p in self.members.by_worker.values()},
        }
