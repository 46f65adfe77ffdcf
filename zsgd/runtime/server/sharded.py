"""``--servers K``: the coordinator's service, serving range 0 and gathering the others.

The flat parameter vector is cut into K contiguous ranges
(``zsgd.core.ranges``). The ``zsgd run`` process keeps range 0 in an
ordinary parameter server and coordinates K-1 range servers
(``zsgd.runtime.server.range_server``), each its own process with its own ROUTER
port, so K servers use K cores and K links. Workers hold one link per
server and push and pull every range concurrently
(``zsgd.runtime.worker.sharded_worker``).

The coordinator keeps what is one per run: membership of the run (workers
join it first and learn the servers' addresses from its ASSIGN; they join
no server before every server is up), the ledger (range 0 sees every
update, loss and staleness), the stop rule, evaluations (the ranges are
gathered into one vector first), and checkpoints: one file of the whole
vector and optimizer state, gathered from every server, so ``--resume``
restores every range and ``--servers 1`` and ``--servers K`` runs write the
same format. A range server that dies stops the run within ``--timeout``
with one line naming it; the last complete checkpoint is where
``--resume`` continues.

Under ``ksync``/``kasync`` (rules with ``step_log``) the coordinator's rule
alone picks each step's gradients; it logs its decisions and sends them to
every range server (``publish_log``; a send that cannot go out now is
retried), and its gathers go into that log, so each range answers at the
same step (``zsgd.algorithms.step_log``).

Gradient clipping (``--clip-norm``) needs the whole gradient's norm, which
no range server sees: with K > 1 each worker clips its own gradient before
splitting it. For async and ssp that is exactly the single server's rule;
for sync and local SGD it clips each worker's contribution rather than
their average.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from zsgd.core.ranges import join_state, slice_state, split_ranges
from zsgd.runtime.server.context import ServiceContext
from zsgd.runtime.server.parameter_server import ParameterServer
from zsgd.wire import protocol
from zsgd.wire.membership import Peer
from zsgd.wire.protocol import Message, MsgType

Done = Callable[[np.ndarray, dict | None], None]


@dataclass
class _Gather:
    full: bool
    own_w: np.ndarray
    own_opt: dict | None
    done: Done
    parts: dict[int, tuple[np.ndarray, dict | None]] = field(default_factory=dict)
    digest: str | None = None  # ksync/kasync: the coordinator's step digest where the gather sits in the log


def sharded_parameter_server(ctx: ServiceContext, w0: np.ndarray, opt_state: dict | None) -> "ShardedParameterServer":
    """The broker's service with ``--servers K > 1`` (``zsgd.broker.Broker(service=...)``)."""
    from zsgd.nn.optim import make_optimizer, warm_optimizer

    cfg = ctx.cfg
    ranges = split_ranges(w0.size, ctx.opts.server.servers)
    lo, hi = ranges[0]
    warm_optimizer(cfg.optimizer, cfg.momentum, cfg.weight_decay)
    optimizer = make_optimizer(cfg.optimizer, hi - lo, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return ShardedParameterServer(ctx, w0, optimizer, opt_state, ranges)


class ShardedParameterServer(ParameterServer):
    """Range 0 of the model, plus the coordination of range servers 1..K-1."""

    def __init__(self, ctx: ServiceContext, w0: np.ndarray, optimizer: Any, opt_state: dict | None, ranges: list[tuple[int, int]]) -> None:
        n = w0.size
        lo, hi = ranges[0]
        super().__init__(ctx, np.ascontiguousarray(w0[lo:hi]), optimizer, ctx.opts.server, slice_state(opt_state, n, lo, hi),
                         one_range=True)
        self.n_params, self.ranges = n, ranges
        # What each range server starts from (sent after its ASSIGN), and the latest of its weights we have seen.
        self.initial = {i: (np.ascontiguousarray(w0[a:b]), slice_state(opt_state, n, a, b)) for i, (a, b) in enumerate(ranges) if i}
        self.latest: dict[int, np.ndarray] = {i: w for i, (w, _opt) in self.initial.items()}
        self.addresses: dict[int, dict[str, Any]] = {}  # server index -> {"port", "host"} once it serves
        self.stats: dict[int, dict[str, Any]] = {}
        self._gathers: dict[int, _Gather] = {}
        self._tag = 0
        self._eval_w: np.ndarray | None = None
        self._eval_gathering = False
        self._checkpointing = False
        self._final: tuple[np.ndarray, dict] | None = None
        self._leaving = False
        self.failed = False
        self._own_last = (time.monotonic(), self.version, 0, 0)
        self._own_rates = (0.0, 0.0, 0.0)
        # ksync/kasync (self.leader): the log of this rule's decisions, per range server: entries not yet sent, and
        # the index of the first of them (zsgd.algorithms.step_log; a send that cannot go out now is retried).
        self._outbox: dict[int, list] = {i: [] for i in range(1, len(ranges))}
        self._log_sent: dict[int, int] = {i: 0 for i in range(1, len(ranges))}
        self._final_digest: str | None = None

    @property
    def k(self) -> int:
        return len(self.ranges)

    def all_serving(self) -> bool:
        return len(self.addresses) == self.k - 1

    # -- joining -----------------------------------------------------------------------
    def defer_join(self, role: str) -> bool:
        return role == "worker" and not self.all_serving()  # its ASSIGN must list every server

    def assign_meta(self, peer: Peer) -> dict[str, Any]:
        ctx = self.ctx
        if peer.role == "server":
            lo, hi = self.ranges[peer.worker] if 0 < peer.worker < self.k else (0, 0)
            o = ctx.opts
            curve = None
            if o.curve is not None:
                allowed = o.curve["allowed"]() if callable(o.curve["allowed"]) else o.curve["allowed"]
                curve = {"secret": o.curve["secret"].decode("ascii"), "public": o.curve["public"].decode("ascii"), "allowed": dict(allowed)}
            return {"range": [lo, hi], "n_params": self.n_params, "bind_host": _host_of(ctx.port.address), "curve": curve,
                    "stop_rule": dataclasses.asdict(ctx.ledger.rule), "emulation": dataclasses.asdict(o.emulation), "seed": ctx.cfg.seed,
                    "server_options": dataclasses.asdict(o.server), "timeout": o.network.timeout, "shared_memory": o.network.shared_memory}
        if peer.role == "worker":
            servers = [{"index": i, "lo": self.ranges[i][0], "hi": self.ranges[i][1], **self.addresses[i]} for i in sorted(self.addresses)]
            return {"servers": servers, "range0": list(self.ranges[0])}
        return {}

    def server_joined(self, peer: Peer) -> None:
        ctx = self.ctx
        if not 0 < peer.worker < self.k:
            ctx.port.send(peer, protocol.error_message(ctx.run, peer.worker, f"no range {peer.worker} in a run of --servers {self.k}",
                                                        "bad-server", fatal=True))
            return
        w, opt = self.initial[peer.worker]
        arrays = {"w": w} | {f"opt.{k}": v for k, v in (opt or {}).items()}
        ctx.port.send(peer, protocol.state_message(ctx.run, peer.worker, self.version, arrays, updates=ctx.ledger.updates,
                                                   samples=ctx.ledger.samples, elapsed=ctx.elapsed()))

    def server_ready(self, peer: Peer, msg: Message) -> None:
        port = msg.meta.get("port")
        if not isinstance(port, int) or not 0 < port < 65536:
            self.ctx.reject(peer.identity, "bad-hello", "range server without a port")
            return
        host = msg.meta.get("host")
        self.addresses[peer.worker] = {"port": port, "host": host if isinstance(host, str) else None}
        self.ctx.metrics.write("server", self.ctx.elapsed(), server=peer.worker, status="serving", range=list(self.ranges[peer.worker]),
                             host=peer.host, port=port, pid=peer.pid)
        if self.all_serving():
            self.ctx.replay_deferred()

    def server_gone(self, peer: Peer, status: str) -> None:
        ctx = self.ctx
        self._gathers.clear()  # none of them can complete now
        self._eval_gathering = self._checkpointing = False
        ctx.metrics.write("server", ctx.elapsed(), server=peer.worker, status=status, host=peer.host)
        if ctx.ledger.stop_reason is None and not self._leaving:
            what = "died (silent for {:g} s)".format(ctx.opts.network.timeout) if status == "dead" else f"left ({status})"
            self.failed = True
            ctx.ledger.stop(f"range server {peer.worker} on {peer.host} {what}; continue with --resume RUN_DIR")

    # -- the step log (ksync, kasync) ---------------------------------------------------
    def publish_log(self) -> None:
        """Append the rule's new decisions to every range server's log and send what is pending."""
        entries = self.leader.take() if self.leader is not None else []
        for box in self._outbox.values():
            box.extend(entries)
        members = self.ctx.members.servers
        for i, box in self._outbox.items():
            peer = members.get(i)
            if not box or peer is None or peer.state != "ready":
                continue
            if self.ctx.port.send(peer, protocol.state_message(self.ctx.run, -1, self.version, {}, log=box, first=self._log_sent[i])):
                self._log_sent[i] += len(box)
                self._outbox[i] = []

    def tick(self, now: float) -> None:
        super().tick(now)
        if self.leader is not None:
            self.publish_log()  # what could not go out before (a full queue, a server not serving yet)

    # -- gathering the ranges ----------------------------------------------------------
    def _gather(self, full: bool, done: Done, at: int | None = None) -> None:
        self._tag += 1
        own_opt = self.optimizer.state_arrays() if full else None
        g = _Gather(full, np.array(self.algo.w, copy=True), own_opt, done)
        if self.k == 1:
            done(g.own_w, own_opt)
            return
        self._gathers[self._tag] = g
        if self.leader is not None:  # in the log: each range answers at this very step, so the ranges agree
            g.digest = self.leader.digest.hex()
            self.leader.gather(self._tag, full)
            self.publish_log()
            return
        for peer in self.ctx.members.servers.values():
            if peer.state == "ready":
                self.ctx.port.send(peer, protocol.state_request(self.ctx.run, self._tag, full, at=at))

    def on_state(self, peer: Peer, msg: Message) -> None:
        tag = msg.meta.get("tag")
        if isinstance(msg.meta.get("stats"), dict):
            self.stats[peer.worker] = dict(msg.meta["stats"]) | {"range": list(self.ranges[peer.worker])}
        if tag == 0 or tag not in self._gathers:
            return
        g = self._gathers[tag]
        lo, hi = self.ranges[peer.worker]
        w = msg.arrays.get("w")
        if w is None or w.shape != (hi - lo,) or w.dtype != np.float32:
            self.ctx.reject(peer.identity, "bad-schema", f"STATE of range server {peer.worker} without its {hi - lo} weights")
            return
        opt = {k[4:]: np.array(v) for k, v in msg.arrays.items() if k.startswith("opt.")} if g.full else None
        g.parts[peer.worker] = (np.array(w), opt)
        self.latest[peer.worker] = g.parts[peer.worker][0]
        if len(g.parts) == self.k - 1:
            del self._gathers[tag]
            order = range(1, self.k)
            w_all = np.concatenate([g.own_w] + [g.parts[i][0] for i in order])
            opt_all = join_state([g.own_opt] + [g.parts[i][1] for i in order], self.n_params) if g.full and g.own_opt is not None else None
            g.done(w_all, opt_all)

    # -- what the broker asks ----------------------------------------------------------
    @property
    def weights(self) -> np.ndarray:
        """The whole model: the final gathered one at the end, else range 0 now and the others as last seen."""
        if self._final is not None:
            return self._final[0]
        return np.concatenate([self.algo.w] + [self.latest[i] for i in range(1, self.k)])

    def snapshot(self) -> np.ndarray | None:
        if self._eval_w is not None:
            w, self._eval_w = self._eval_w, None
            return w
        if not self._eval_gathering:
            self._eval_gathering = True

            def ready(w: np.ndarray, _opt: dict | None) -> None:
                self._eval_gathering = False
                self._eval_w = w
                self.ctx.snapshot_ready()

            self._gather(False, ready)
        return None

    def checkpoint_state(self) -> tuple[np.ndarray, dict] | None:
        if self._leaving:
            return self._final  # None when a server could not answer: the last complete checkpoint stays
        if not self._checkpointing:
            self._checkpointing = True

            def ready(w: np.ndarray, opt: dict | None) -> None:
                self._checkpointing = False
                self.ctx.write_checkpoint(w, opt or {})

            self._gather(True, ready)
        return None

    def before_leave(self) -> None:
        """Gather every range's final weights and optimizer state while the servers are still up."""
        self._leaving = True
        ctx = self.ctx
        if self.failed or self.k == 1:
            return

        def final(w: np.ndarray, opt: dict | None) -> None:
            self._final = (w, opt or {})

        self._gathers.clear()
        # at this range's version: a range server still taking the last gradient (its copy of the worker's update
        # was in flight when this range reached the stop) answers once it has, so every range ends at the same step
        self._gather(True, final, at=self.algo.version)
        if self.leader is not None:
            self._final_digest = self._gathers[self._tag].digest
        deadline = time.monotonic() + max(2.0, ctx.opts.network.timeout)
        while self._final is None and self._gathers and time.monotonic() < deadline:
            for identity, msg in ctx.port.drain(0.05):
                self._take_state_only(identity, msg)

    def _take_state_only(self, identity: bytes, msg: Message) -> None:
        """At the end only STATE from the servers matters; updates arriving now are not applied."""
        peer = self.ctx.members.peers.get(identity)
        if peer is not None and peer.role == "server" and msg.type == MsgType.STATE and msg.run == self.ctx.run:
            self.on_state(peer, msg)

    def server_rows(self) -> list[dict[str, Any]]:
        """Server 0 (this process) measured here; the others as they last reported (every 0.5 s)."""
        now = time.monotonic()
        e = self.ctx.port
        t, u, i, o = self._own_last
        dt = max(now - t, 1e-9)
        if dt >= 1.0:
            self._own_rates = ((self.version - u) / dt, (e.bytes_in - i) / dt, (e.bytes_out - o) / dt)
            self._own_last = (now, self.version, e.bytes_in, e.bytes_out)
        ups, bin_, bout = self._own_rates
        rows = [{"server": 0, "range": list(self.ranges[0]), "state": "ready", "updates_per_s": ups, "queue_depth": e.queue_depth,
                 "bytes_in_per_s": bin_, "bytes_out_per_s": bout}]
        members = self.ctx.members.servers
        for i in range(1, self.k):
            peer = members.get(i)
            rows.append({"server": i, "range": list(self.ranges[i]), "state": peer.state if peer is not None else "starting"}
                        | {k: v for k, v in self.stats.get(i, {}).items() if k != "range"})
        return rows

    def summary(self) -> dict[str, Any]:
        out = super().summary() | {"servers": self.k, "server_ranges": [list(r) for r in self.ranges],
                                   "server_stats": {str(i): s for i, s in sorted(self.stats.items())}}
        if self.leader is not None:  # every range server's final STATE carries its own: equal means the same steps
            out["step_digest"] = self._final_digest or self.leader.digest.hex()
        return out


def _host_of(address: str) -> str:
    """``tcp://HOST:PORT`` -> HOST (brackets of an IPv6 address kept)."""
    return address[len("tcp://"):].rsplit(":", 1)[0]
