"""The worker of a sharded run (``--servers K``): one link per server, every range at once.

The coordinator's ASSIGN lists the range servers (index, ``[lo, hi)``,
port). The worker joins each one like a broker, then loops: it takes
each range's WEIGHTS as they arrive (from whichever server answers first)
into one flat buffer, and once it holds all K computes one gradient and
pushes each range to its server, with that range's own version. K servers
therefore work on K ranges in parallel, over K connections.

Backward produces the last layers first, and each range goes out as soon
as backward has finished it (``Model.loss_and_grad(on_ready=...)``): the
last servers apply their part while the first layers are still being
computed, as DDP overlaps its all-reduce buckets with the backward pass.

A server on the worker's machine gets its range through shared memory
(``zsgd.wire.shm``), as a single broker does: each link offers slots of its
range's size.

Per range: the server's version (async staleness and sync rounds are per
range), the update codec (``--compress``: top-k keeps its fraction of every
range, so of the whole) and the reply decoder (``--compress-replies``).
Gradient clipping happens here, before the split, since no server sees the
whole gradient (see ``zsgd.runtime.server.sharded``). LEAVE from any server ends the
worker; a server that goes silent ends it too (the coordinator stops the run).

Every gradient carries a number (``seq``, the same on every range): under
``ksync``/``kasync`` the range servers find by it the gradients the
coordinator's decisions name (``zsgd.algorithms.step_log``). An emulated
step is stretched listening to every server, so a WAIT ``abandon`` (K-sync's
backup workers) ends it as it does for the single-broker worker.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import zmq

from zsgd.core.config import TrainConfig
from zsgd.errors import ProtocolError, ZsgdError
from zsgd.runtime.worker.broker_hops import BrokerHops
from zsgd.runtime.worker.node_options import EXIT_BAD_REPLY, EXIT_BROKER_GONE, NodeOptions, join_proof, log, session_end
from zsgd.runtime.worker.replies import emulated_stretch, reply_decoder, stretch_step
from zsgd.wire import protocol
from zsgd.wire.link import BROKER_DEAD, BrokerLink, recv_any
from zsgd.wire.shm import broker_on_this_machine
from zsgd.wire.protocol import MsgType



def server_address(connect: str, entry: dict[str, Any]) -> str:
    """Where range server ``entry`` listens: its own host, or (a server on the coordinator's machine) the host we reached the coordinator at."""
    host = entry.get("host") or connect[len("tcp://"):].rsplit(":", 1)[0]
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{int(entry['port'])}"


def run_sharded(opts: NodeOptions, link: BrokerLink, config: TrainConfig, assign_meta: dict, model: Any, x: np.ndarray, y: np.ndarray) -> int:
    """Train on every range until a server says LEAVE or goes silent; the exit code."""
    servers = list(assign_meta["servers"])
    ranges = [tuple(assign_meta["range0"])] + [(int(s["lo"]), int(s["hi"])) for s in servers]
    ctx = zmq.Context()
    links = [link]
    try:
        for s in servers:
            extra = BrokerLink(ctx, server_address(opts.connect, s), link.identity, run=link.run, worker=link.worker,
                               heartbeat=opts.heartbeat, timeout=opts.timeout, curve=opts.curve).open()
            links.append(extra)
        for extra in links[1:]:
            extra.send(protocol.hello(link.run, link.worker, stage="join", role="worker", host=opts.host_label or "?",
                                      **join_proof(opts, "worker")))
        early: list = []
        code = _join_servers(opts, links, early)
        if code is not None:
            return code
        log(opts, f"joined {len(links)} servers (ranges {', '.join(f'[{a:,}, {b:,})' for a, b in ranges)})")
        return _loop(opts, links, config, assign_meta, model, x, y, ranges, early)
    finally:
        for extra in links[1:]:
            extra.close()
        ctx.term()


def _who(i: int) -> str:
    """How the logs name link ``i``: 0 is the coordinator, the others are range servers."""
    return "the coordinator" if i == 0 else f"range server {i}"


def _join_servers(opts: NodeOptions, links: list[BrokerLink], early: list) -> int | None:
    """Wait for every range server's ASSIGN (answering each with HELLO ready) while watching the coordinator:
    None when all have answered, else the exit code. A run that ends meanwhile (a worker that started
    late) ends the wait at once. Every other message (weights of the coordinator or of a server that has
    answered) is kept in ``early`` for the loop."""
    pending = set(range(1, len(links)))
    deadline = time.monotonic() + opts.join_timeout
    while pending and time.monotonic() < deadline:
        got = recv_any(links, min(1.0, max(0.0, deadline - time.monotonic())))
        if got is None:
            continue
        i, msg = got
        who = _who(i)
        if i in pending and msg is not BROKER_DEAD and msg.type == MsgType.ERROR:
            raise ZsgdError(f"{who} refused this worker: {msg.meta.get('message', '?')}")
        code = session_end(opts, msg, who, links[i].address, [], "the run ended before this worker joined every range server")
        if code is not None:
            return code
        if i in pending and msg.type == MsgType.ASSIGN:
            pending.discard(i)
            links[i].send(protocol.hello(links[0].run, links[0].worker, stage="ready", role="worker"))
        else:  # the coordinator's weights, or those of a server that has already answered
            early.append((i, msg))
    if not pending:
        return None
    first = min(pending)
    log(opts, f"no range server {first} answered at {links[first].address} within {opts.join_timeout:g} s (join); "
              f"is the range server {first} running and the address right?")
    return EXIT_BROKER_GONE


def _loop(opts: NodeOptions, links: list[BrokerLink], config: TrainConfig, meta: dict, model: Any, x: np.ndarray, y: np.ndarray,
          ranges: list[tuple[int, int]], early: list | None = None) -> int:
    from zsgd.algorithms import make_worker_step
    from zsgd.compression import make_codec
    from zsgd.nn.optim import clip_grad_norm

    algo = str(meta.get("algo", "async"))
    worker = links[0].worker
    step = make_worker_step(algo, model, x, y, config.batch_size, config.seed, worker, lr=config.lr,
                            weight_decay=config.weight_decay, clip_norm=config.clip_norm)
    clip = config.clip_norm if not algo.startswith("localsgd") else None  # local SGD clips each local step itself
    codecs = [make_codec(str(meta.get("compress", "none")), b - a, seed=(config.seed * 1_000_003 + worker) * 64 + i)
              for i, (a, b) in enumerate(ranges)]
    decoders = [reply_decoder(str(meta.get("compress_replies", "none")), b - a) for a, b in ranges]
    if opts.shared_memory and codecs[0].name == "none":
        for link, (a, b) in zip(links, ranges):  # each server on this machine takes its range through /dev/shm (zsgd.wire.shm)
            if broker_on_this_machine(link.address):
                link.offer_shared_memory(b - a)
    step.warm_up(model.init(seed=config.seed))
    w = np.empty(model.n_params, dtype=np.float32)
    versions = [0] * len(links)
    have = [False] * len(links)
    target_s, slowdown = 0.0, 1.0
    t0 = None
    turnarounds: list[float] = []
    hops = [BrokerHops() for _ in links]  # each server's hand-offs beyond the emulated delays, for a simulated twin
    early = early if early is not None else []
    # Each gradient's number, the same on every range: how range servers replaying the coordinator's ksync/kasync
    # decisions find it (zsgd.algorithms.step_log). Random start: a restarted worker's numbers are new ones.
    seq = int.from_bytes(os.urandom(5), "little")

    def listen(timeout: float):
        """One message from any server for the emulated stretch; what ends it (but an abandon) is handled next."""
        got = recv_any(links, timeout)
        if got is None:
            return None
        listened.append(got)
        return got[1]

    listened: list = []
    while True:
        try:
            got = early.pop(0) if early else recv_any(links, opts.timeout)
        except ProtocolError as exc:  # weights in shared memory that are not what the message says (as zsgd.node)
            log(opts, f"a server sent unusable weights ({exc}); exiting")
            return EXIT_BAD_REPLY
        if got is None:
            continue
        i, msg = got
        code = session_end(opts, msg, _who(i), links[i].address, turnarounds, "run over")
        if code is not None:
            for line in (h.line() for h in hops if code == 0):
                if line:
                    log(opts, line)
            return code
        if msg.type != MsgType.WEIGHTS:
            continue
        hops[i].record(msg.meta, links[i].last_forward, links[i].last_arrival)
        a, b = ranges[i]
        try:
            w[a:b] = decoders[i](msg)  # the one copy of a range: from its frame, or straight out of its shared-memory slot
        except ProtocolError as exc:
            log(opts, f"server {i} sent unusable weights ({exc}); exiting")
            return EXIT_BAD_REPLY
        if not links[i].shared.intact(msg):  # the server rewrote its slot under that copy: newer weights are on their way
            have[i] = False
            continue
        versions[i], have[i] = msg.version, True
        if i == 0:  # the coordinator's reply carries the emulated compute time and straggler factor
            target_s, slowdown = emulated_stretch(msg.meta)
        if t0 is None:
            t0 = links[i].last_arrival or time.monotonic()
        if not all(have):
            continue
        sent = [False] * len(ranges)

        def push(j: int, grad: np.ndarray, loss: float, n: int, kind: str | None = None) -> None:
            lo, hi = ranges[j]
            part = grad[lo:hi]
            extra = {"compute_s": time.monotonic() - t0, "seq": seq} | ({"kind": kind} if kind else {})
            if codecs[j].name == "none" or not np.isfinite(part).all():  # a non-finite range goes dense: its server rejects it
                out = protocol.update_message(links[j].run, worker, versions[j], part, n, loss, **extra)
            else:
                out = protocol.update_message(links[j].run, worker, versions[j], None, n, loss, codec=codecs[j].name,
                                              extra_arrays=codecs[j].encode(part), **extra)
            handing = time.monotonic()
            links[j].send(out)
            hops[j].handed(time.monotonic() - handing)
            sent[j] = True

        def on_ready(offset: int, grad: np.ndarray, loss: float, n: int) -> None:
            """Backward finished grad[offset:]: send the ranges it completes now, while the first layers still compute."""
            for j in range(len(ranges) - 1, -1, -1):
                if not sent[j] and ranges[j][0] >= offset:
                    push(j, grad, loss, n)

        # Streaming needs the gradient as it is sent: not with clipping (the whole norm first), local SGD (a delta
        # after K steps) or an emulated compute time or straggler (its stretch comes before anything leaves).
        streaming = clip is None and not algo.startswith("localsgd") and slowdown <= 1.0 and target_s <= 0
        update = step.compute(w, versions[0], on_ready=on_ready) if streaming else step.compute(w, versions[0])
        grad = update.grad
        if clip is not None and np.isfinite(grad).all():
            clip_grad_norm(grad, clip)
        # Emulation: stretch the step as the single-broker worker does, listening to every server: a ksync step
        # abandoned meanwhile (WAIT abandon, from the coordinator) ends the stretch and the update goes now.
        listened.clear()
        ended_by = stretch_step(t0, target_s, slowdown, recv=listen, version=versions[0], first=not turnarounds)
        if ended_by is not None:
            early.append(listened[-1])
        turnarounds.append(time.monotonic() - t0)
        for j in range(len(ranges) - 1, -1, -1):
            if not sent[j]:
                push(j, grad, update.loss, update.n_samples, update.meta.get("kind"))
        seq += 1
        have = [False] * len(links)
        t0 = None
