"""The worker process: joins a broker, computes gradients on its shard.

Started by ``zsgd run`` (locally or over SSH) or by hand with
``zsgd worker --connect tcp://HOST:PORT``. It knows nothing of the run until
the broker's ASSIGN arrives: the configuration travels on the wire, so a
worker on another machine trains exactly what the broker resolved.

Protocol, from the worker's side:
  HELLO(stage=join) -> ASSIGN(config) -> load shard -> HELLO(stage=ready)
  -> [SHARD if it had no local data] -> WEIGHTS -> UPDATE -> WEIGHTS -> ...
  -> LEAVE (done). An evaluator is a worker with role "evaluator": it answers
  WEIGHTS with EVAL instead of UPDATE.
"""

from __future__ import annotations

import signal
import socket
import time
from typing import TYPE_CHECKING

import numpy as np
import zmq

from zsgd.wire import protocol
from zsgd.errors import ProtocolError, ZsgdError
from zsgd.wire.link import BrokerLink
from zsgd.wire.protocol import Message, MsgType
from zsgd.runtime.worker.node_options import EXIT_BAD_REPLY, EXIT_BROKER_GONE, NodeOptions, expect, identity_for, join_proof, log, session_end
from zsgd.runtime.worker.broker_hops import BrokerHops, overrun
from zsgd.runtime.worker.replies import emulated_stretch, reply_decoder, stretch_step

if TYPE_CHECKING:
    from zsgd.core.config import TrainConfig

UNASSIGNED_RUN = "-"  # run id in messages sent before the broker assigned one


def _terminate(signum, frame):  # SIGTERM from a launcher: leave politely
    raise KeyboardInterrupt


def run_node(opts: NodeOptions) -> int:
    """Run until the broker says LEAVE or disappears; return the exit code."""
    signal.signal(signal.SIGTERM, _terminate)
    ctx = zmq.Context()
    link = BrokerLink(ctx, opts.connect, identity_for(opts), run=UNASSIGNED_RUN, worker=opts.worker_id if opts.worker_id is not None else -1,
                      heartbeat=opts.heartbeat, timeout=max(opts.timeout, opts.join_timeout), curve=opts.curve).open()
    flush = False  # only our own LEAVE needs to go out: after the broker's LEAVE (or its death) nothing queued matters
    try:
        return _session(opts, link)
    except KeyboardInterrupt:
        log(opts, "interrupted; leaving")
        _leave(link, "interrupted")
        flush = True
        return 130
    finally:
        link.close(flush=flush)
        ctx.term()


def _leave(link: BrokerLink, reason: str) -> None:
    try:
        link.send(protocol.leave(link.run, link.worker, reason))
    except (zmq.ZMQError, ZsgdError):  # ZsgdError: the link thread is gone, there is no one to tell
        pass


def _session(opts: NodeOptions, link: BrokerLink) -> int:
    link.send(protocol.hello(UNASSIGNED_RUN, link.worker, stage="join", role=opts.role, host=opts.host_label or socket.gethostname(),
                             **join_proof(opts)))
    msg = expect(opts, link, {MsgType.ASSIGN}, opts.join_timeout, "join")
    if msg is None:
        return EXIT_BROKER_GONE
    cfg = checked_assign(opts, msg)
    run, worker = msg.run, msg.worker
    opts.worker_id = worker
    link.set_identity(run, worker)
    link.timeout = opts.timeout
    if opts.role == "server":
        from zsgd.runtime.server.range_server import serve_range

        return serve_range(opts, link, msg)
    loop = _own_loop(opts.role, msg.meta)
    if loop is not None:  # a decentralized node, or a worker of K sharded servers: (opts, link, config, meta, model, x, y)
        from zsgd.core.config import TrainConfig

        config = TrainConfig.from_dict(cfg)
        loaded = _load(opts, link, config, msg.meta)
        if loaded is None:
            return EXIT_BROKER_GONE
        kind = f"{len(msg.meta['servers']) + 1} servers" if msg.meta.get("servers") else "decentralized"
        log(opts, f"joined run {run} at {opts.connect} ({kind})")
        return loop(opts, link, config, msg.meta, loaded[0], loaded[2], loaded[3])
    compute = _build(opts, link, cfg, msg.meta)
    if compute is None:
        return EXIT_BROKER_GONE
    log(opts, f"joined run {run} at {opts.connect}")
    idle_since = time.monotonic()  # a step's turnaround starts when its weights arrive, or when this loop could take them
    turnarounds: list[float] = []
    hops = BrokerHops()  # the hand-offs beyond the emulated delays, for a simulated twin
    early = None  # a message that ended an emulated stretch: handled next
    while True:
        try:
            msg, early = early or link.recv(timeout=opts.timeout), None
        except ProtocolError as exc:  # weights in shared memory that are not what the message says
            log(opts, f"broker sent unusable weights ({exc}); exiting")
            return EXIT_BAD_REPLY
        if msg is None:
            continue  # the link thread decides when the broker is dead
        code = session_end(opts, msg, "broker", opts.connect, turnarounds, "broker finished")
        if code is not None:
            if code == 0 and (line := hops.line()):
                log(opts, line)
            return code
        if msg.type == MsgType.WEIGHTS:
            hops.record(msg.meta, link.last_forward, link.last_arrival)
            t0 = max(link.last_arrival, idle_since)
            # The link thread hands the previous update to the socket after this loop let go of it: that
            # hand-off is part of the previous turnaround, counted here so the mean comes out right.
            out_hop = max(0.0, link.last_forward - idle_since) if turnarounds else 0.0
            try:
                reply = compute(msg, t0 - out_hop)
                computed = time.monotonic()
                # Emulated compute time and straggler: stretch this step, measured as compute_s is (from the weights'
                # arrival, with the previous update's hand-off to the socket), so the emulation and the simulator's
                # models stretch the same time (a straggler's whole turnaround, as the twin's draw of it); a K-sync
                # step abandoned meanwhile ends the stretch (zsgd.runtime.worker.replies.stretch_step).
                stretch = emulated_stretch(msg.meta)
                early = stretch_step(t0 - out_hop, *stretch, recv=lambda s: link.recv(timeout=s), version=msg.version,
                                     first=not turnarounds)
            except ProtocolError as exc:
                log(opts, f"broker sent unusable weights ({exc}); exiting")
                return EXIT_BAD_REPLY
            if reply is None:  # the weights were superseded under the step (zsgd.wire.shm.WorkerShare.intact)
                continue
            handing = time.monotonic()
            link.send(reply)
            idle_since = time.monotonic()
            # On its way up: the stretch's lateness, the update's copy into shared memory and its frames.
            hops.handed(overrun(t0 - out_hop, computed, handing, *stretch) + idle_since - handing)
            if isinstance(reply.meta.get("compute_s"), float):
                turnarounds.append(reply.meta["compute_s"])


ASSIGN_NEEDS = {"worker": ("n_workers",), "evaluator": (),
                "server": ("range", "stop_rule", "server_options", "emulation", "n_workers", "heartbeat", "timeout", "seed")}


def checked_assign(opts: NodeOptions, msg: Message) -> dict:
    """The run configuration of the broker's ASSIGN, validated like any message from a peer: a worker
    trusts its broker no more than the broker trusts it. A user model (``package.module:factory``) is
    run only when this process was started for that very spec (``--model``), so a broker -- or something
    posing as one -- cannot make a worker import and call a module of its choosing; ZsgdError otherwise."""
    from zsgd.core.config import TrainConfig
    from zsgd.nn.models import is_user_model

    cfg, meta = msg.meta.get("config"), msg.meta
    if not isinstance(cfg, dict):
        raise ZsgdError("the broker's ASSIGN carries no run configuration; is the address a zsgd broker of the same version?")
    try:
        config = TrainConfig.from_dict(dict(cfg)).validate()
    except (ZsgdError, TypeError, ValueError) as exc:
        raise ZsgdError(f"the broker's ASSIGN carries an unusable configuration: {str(exc).splitlines()[0][:200]}") from None
    if is_user_model(config.model) and config.model != opts.model:
        raise ZsgdError(f"the broker asks this {opts.role} to run user model '{config.model[:100]}', which it was not started for; "
                        f"start it with --model {config.model[:100]} to allow that model")
    if not isinstance(msg.worker, int) or msg.worker < -1 or not isinstance(msg.run, str) or not msg.run:
        raise ZsgdError(f"the broker's ASSIGN gives no usable run and worker id ({str(msg.run)[:20]!r}, {str(msg.worker)[:20]})")
    missing = [k for k in ASSIGN_NEEDS.get(opts.role, ()) if k not in meta]
    if missing:
        raise ZsgdError(f"the broker's ASSIGN for a {opts.role} lacks {', '.join(missing)}; is it a zsgd broker of the same version?")
    return dict(cfg)


def _own_loop(role: str, meta: dict):
    """The loop of a worker that is not the single-broker kind, or None."""
    if role != "worker":
        return None
    if meta.get("servers"):
        from zsgd.runtime.worker.sharded_worker import run_sharded

        return run_sharded
    if "decentralized" in meta:
        from zsgd.runtime.worker.decentralized_node import run_rounds

        return run_rounds
    return None


def _load(opts: NodeOptions, link: BrokerLink, config: "TrainConfig", assign_meta: dict):
    """Data and model for the assigned role (says HELLO ready on the way): (model, dataset, x, y), None if the broker went.

    ``x, y`` is a worker's shard (local copy, or the broker's SHARD); ``dataset``
    is None when there is no local copy (evaluators always need one).
    """
    from zsgd.data import load_dataset, make_shard
    from zsgd.nn.models import get_model

    data_dir = opts.data_dir or config.data_dir
    need_shard = False
    x = y = None
    try:
        ds = load_dataset(config.data, data_dir=data_dir, image_size=config.image_size, grayscale=config.grayscale,
                          tokens=config.tokens)
        input_shape, n_classes = ds.input_shape, ds.n_classes
    except ZsgdError as exc:
        if opts.role != "worker":
            raise
        log(opts, f"no local copy of the data ({exc}); asking the broker for this worker's shard")
        need_shard, ds = True, None
    link.send(protocol.hello(link.run, link.worker, stage="ready", role=opts.role, need_shard=need_shard))
    if need_shard:
        shard = expect(opts, link, {MsgType.SHARD}, opts.join_timeout, "shard")
        if shard is None:
            return None
        x, y = np.array(shard.arrays["x"]), np.array(shard.arrays["y"])
        input_shape, n_classes = tuple(shard.meta["input_shape"]), int(shard.meta["n_classes"])
    model = get_model(config.model, input_shape=tuple(input_shape), n_classes=n_classes, seed=config.seed, bptt=config.bptt)
    if opts.role == "worker" and not need_shard:
        idx = make_shard(ds.y_train, config.split, config.seed, link.worker, int(assign_meta["n_workers"]))
        x, y = ds.x_train[idx], ds.y_train[idx]
    return model, ds, x, y


def _build(opts: NodeOptions, link: BrokerLink, cfg: dict, assign_meta: dict):
    """Load data and model for the assigned role; return the message handler."""
    from zsgd.core.config import TrainConfig
    from zsgd.nn.models import evaluate

    config = TrainConfig.from_dict(cfg)
    loaded = _load(opts, link, config, assign_meta)
    if loaded is None:
        return None
    model, ds, x, y = loaded

    if opts.role == "evaluator":
        def handle_eval(msg: Message, t0: float = 0.0) -> Message:
            loss, acc = evaluate(model, msg.arrays["w"], ds.x_test, ds.y_test)
            meta = {k: msg.meta[k] for k in ("updates", "samples", "t") if k in msg.meta}
            return protocol.eval_message(link.run, link.worker, msg.version, loss, acc, **meta)

        return handle_eval

    from zsgd.algorithms import make_worker_step
    from zsgd.compression import make_codec
    from zsgd.wire.shm import broker_on_this_machine

    algo = str(assign_meta.get("algo", "async"))
    step = make_worker_step(algo, model, x, y, config.batch_size, config.seed, link.worker, lr=config.lr,
                            weight_decay=config.weight_decay, clip_norm=config.clip_norm)
    codec = make_codec(str(assign_meta.get("compress", "none")), model.n_params, seed=config.seed * 1_000_003 + link.worker)
    # One throw-away step loads the kernels now, so the first timed step (its compute_s, and an
    # emulated straggler's sleep, which is proportional to it) is a steady-state one.
    step.warm_up(model.init(seed=config.seed))
    weights_of = reply_decoder(str(assign_meta.get("compress_replies", "none")), model.n_params)
    if opts.shared_memory and codec.name == "none" and broker_on_this_machine(opts.connect):
        link.offer_shared_memory(model.n_params)  # the big arrays through /dev/shm instead of TCP (zsgd.wire.shm)

    def handle_weights(msg: Message, t0: float = 0.0) -> Message | None:
        # compute_s is the worker's whole turnaround, from the weights reaching its socket (``t0``, or
        # from when the worker was ready for them) to the update going back, not the gradient alone:
        # it is what the simulator's compute time stands for (the worker holds the weights that long),
        # so a simulation calibrated on it sees this run's own message handling and CPU contention too.
        t0 = t0 or time.monotonic()
        weights = weights_of(msg)
        update = step.compute(weights, msg.version)
        if weights is msg.arrays.get("w") and not link.shared.intact(msg):
            return None  # computed on weights in shared memory that the broker rewrote meanwhile: void (newer ones are on their way)
        # A non-finite gradient goes out dense: the broker rejects and counts it, instead of it hiding in a codec's
        # residual forever. The codec's encoding is part of the turnaround (1.4 ms for top-k of mlp here).
        coded = None if codec.name == "none" or not np.isfinite(update.grad).all() else codec.encode(update.grad)
        extra = {"compute_s": time.monotonic() - t0}  # lets a simulation be calibrated against this very run
        if "kind" in update.meta:
            extra["kind"] = update.meta["kind"]
        if coded is None:
            return protocol.update_message(link.run, link.worker, msg.version, update.grad, update.n_samples, update.loss, **extra)
        return protocol.update_message(link.run, link.worker, msg.version, None, update.n_samples, update.loss, codec=codec.name,
                                       extra_arrays=coded, **extra)

    return handle_weights
