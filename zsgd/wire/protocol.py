"""The wire API: every message zsgd sends is built, and every one it receives
checked, through this module.

The frame format itself (header + raw array frames, limits, zero-copy send
and bounded receive) is ``zsgd.wire.frames``; it is re-exported here so that
callers need one import. What lives here needs run state or names a message
kind: validation of updates and weights, and one builder per message type.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Container, Mapping, Sequence
from typing import Any

import numpy as np

from zsgd import __version__

from zsgd.wire.frames import (  # noqa: F401  (re-exported: the one wire API)
    _CODEC_RE, DEFAULT_LIMITS, DTYPES, MAGIC, PROTOCOL_VERSION, REASONS, ZERO_COPY_THRESHOLD, Limits, Message,
    MsgType, ProtocolError, _is_int, decode, encode, message_nbytes, recv, send, set_socket_limits, worker_identity,
)

__all__ = [
    "PROTOCOL_VERSION", "MAGIC", "DTYPES", "REASONS", "ZERO_COPY_THRESHOLD", "MsgType", "Message",
    "Limits", "DEFAULT_LIMITS", "ProtocolError", "encode", "decode", "send", "recv", "message_nbytes",
    "set_socket_limits", "worker_identity", "validate_update", "validate_weights", "hello", "assign",
    "weights_message", "weights_delta_message", "update_message", "heartbeat", "eval_message", "round_report", "leave", "error_message",
    "shard_message", "peer_message", "wait_message", "REPLY_HOP", "reply_hop",
]

# validation that needs run state


def _check_float_vector(msg: Message, name: str, n_params: int) -> None:
    arr = msg.arrays.get(name)
    if arr is None:
        raise ProtocolError("missing-array", f"{MsgType(msg.type).name} lacks array {name!r}")
    if arr.dtype != np.float32:
        raise ProtocolError("wrong-dtype", f"{name!r} is {arr.dtype}, expected float32")
    if arr.shape != (n_params,):
        raise ProtocolError("wrong-shape", f"{name!r} has shape {arr.shape}, expected ({n_params},)")


def _check_finite(msg: Message) -> None:
    for name, arr in msg.arrays.items():
        if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
            raise ProtocolError("non-finite", f"{name!r} holds NaN or Inf")


def validate_update(msg: Message, *, run: str, known_workers: Container[int], n_params: int,
                    require_finite: bool = True, identity: bytes | None = None) -> None:
    """Check an UPDATE against the broker's state before it touches the model.

    codec "none": array "g" must be float32 of shape (n_params,). Any codec:
    no array may hold more than n_params elements (a codec that needs more is
    no compression), floats must be finite, and meta must carry an int
    n_samples >= 0 and a numeric or null loss. Codec-specific layout checks
    belong to the codec. Pass the ROUTER `identity` to also refuse a worker
    that claims another worker's id.
    """
    if msg.type != MsgType.UPDATE:
        raise ProtocolError("wrong-type", f"expected UPDATE, got {MsgType(msg.type).name}")
    if msg.run != run:
        raise ProtocolError("wrong-run", f"run {msg.run!r}, expected {run!r}")
    if msg.worker < 0 or msg.worker not in known_workers:
        raise ProtocolError("unknown-worker", f"worker {msg.worker}")
    if identity is not None and identity != worker_identity(run, msg.worker):
        raise ProtocolError("wrong-identity", f"worker {msg.worker} sent from {identity[:64]!r}")
    if msg.codec == "none":
        _check_float_vector(msg, "g", n_params)
    for name, arr in msg.arrays.items():
        if arr.size > n_params:
            raise ProtocolError("wrong-shape", f"{name!r} has {arr.size} elements > n_params {n_params}")
    n_samples, loss = msg.meta.get("n_samples"), msg.meta.get("loss")
    if not _is_int(n_samples) or n_samples < 0:
        raise ProtocolError("bad-meta", f"n_samples must be an int >= 0, got {str(n_samples)[:32]}")
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
        raise ProtocolError("bad-meta", "loss must be a number or null")
    if require_finite:   # a simulated message never went through JSON: check loss too
        if loss is not None and not math.isfinite(loss):
            raise ProtocolError("non-finite", f"loss is {loss}")
        _check_finite(msg)


def validate_weights(msg: Message, *, run: str, n_params: int, require_finite: bool = True) -> None:
    """Check WEIGHTS (or a PEER message carrying weights): float32 "w" of (n_params,)."""
    if msg.type not in (MsgType.WEIGHTS, MsgType.PEER):
        raise ProtocolError("wrong-type", f"expected WEIGHTS or PEER, got {MsgType(msg.type).name}")
    if msg.run != run:
        raise ProtocolError("wrong-run", f"run {msg.run!r}, expected {run!r}")
    _check_float_vector(msg, "w", n_params)
    if require_finite:
        _check_finite(msg)


#: Meta key of a broker's reply in an emulated run: ``[reached, left, wait]``, seconds of the broker's monotonic clock (the
#: machine's: the runs this serves are on one host). ``reached``: when the broker's loop took the update the reply
#: answers off its socket, before the emulated hold (its uplink); ``left``: when the reply's own emulated hold (its downlink)
#: was due to end; ``wait`` (optional): how long that update waited for the broker's loop after its hold, beyond the
#: engine's steps of other updates (``emulation.loop_wait``). A worker subtracts its update's send and its reply's arrival
#: to log the hops beyond the emulated delays (``zsgd.runtime.worker.broker_hops``), which a simulated twin adds to its
#: latency (``zsgd.experiments.twin``). Optional, and informational: nothing in a run depends on it.
REPLY_HOP = "hop"


def reply_hop(meta: Mapping[str, Any]) -> tuple[float, ...] | None:
    """A reply's ``REPLY_HOP`` stamps (two, or three with the wait), or None if it has none; ProtocolError ("bad-meta") if
    they are not two or three finite numbers."""
    hop = meta.get(REPLY_HOP)
    if hop is None:
        return None
    if (not isinstance(hop, list) or len(hop) not in (2, 3)
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in hop)):
        raise ProtocolError("bad-meta", f"{REPLY_HOP} must be two or three finite numbers (seconds), got {str(hop)[:64]}")
    return tuple(float(x) for x in hop)


# constructors used by the runtime; the broker is worker -1


def hello(run: str, worker: int, capabilities: Sequence[str] = (), **meta: Any) -> Message:
    """Join request; fills hostname, pid and zsgd version (override via meta)."""
    m = {"hostname": socket.gethostname(), "pid": os.getpid(), "zsgd": __version__,
         "capabilities": list(capabilities), **meta}
    return Message(MsgType.HELLO, run, worker, 0, {}, meta=m)


def assign(run: str, worker: int, config: Mapping[str, Any], version: int = 0, **meta: Any) -> Message:
    """Broker's answer to HELLO: `w` is the worker id assigned, m.config the run config."""
    return Message(MsgType.ASSIGN, run, worker, version, {}, meta={"config": dict(config), **meta})


def weights_message(run: str, version: int, w: np.ndarray, **meta: Any) -> Message:
    """Model weights. Sent zero-copy: pass a snapshot, not the live buffer."""
    return Message(MsgType.WEIGHTS, run, -1, version, {"w": w}, meta=dict(meta))


def weights_delta_message(run: str, version: int, arrays: Mapping[str, np.ndarray], codec: str) -> Message:
    """Weights as a coded delta from what the worker holds (``--compress-replies``; zsgd.compression.delta)."""
    return Message(MsgType.WEIGHTS, run, -1, version, dict(arrays), codec=codec)


def update_message(run: str, worker: int, base_version: int, grad: np.ndarray | None,
                   n_samples: int, loss: float | None, codec: str = "none",
                   extra_arrays: Mapping[str, np.ndarray] | None = None, **meta: Any) -> Message:
    """Gradient/delta computed on weights `base_version`; a codec's arrays go in `extra_arrays`."""
    arrays = {} if grad is None else {"g": grad}
    arrays.update(extra_arrays or {})
    finite = loss is None or math.isfinite(loss)
    m = {"n_samples": int(n_samples), "loss": float(loss) if loss is not None and finite else None, **meta}
    if not finite:
        m["non_finite"] = True  # JSON has no NaN: the worker's loss blew up (the broker ends the run as diverged)
    return Message(MsgType.UPDATE, run, worker, base_version, arrays, codec, m)


def heartbeat(run: str, worker: int, version: int = 0) -> Message:
    """Liveness ping (Paranoid Pirate); the broker sends worker=-1."""
    return Message(MsgType.HEARTBEAT, run, worker, version)


def eval_message(run: str, worker: int, version: int, test_loss: float, test_acc: float,
                 **meta: Any) -> Message:
    """Evaluation of model `version`; a non-finite loss (a diverged model) travels as null."""
    m = {"test_loss": float(test_loss) if math.isfinite(test_loss) else None, "test_acc": float(test_acc), **meta}
    return Message(MsgType.EVAL, run, worker, version, meta=m)


def round_report(run: str, worker: int, round: int, loss: float, n_samples: int, arrays: Mapping[str, np.ndarray],
                 **meta: Any) -> Message:
    """A decentralized node finished ``round`` (its model in ``arrays["w"]`` on upload rounds); a non-finite loss is null."""
    m = {"kind": "round", "round": int(round), "loss": float(loss) if math.isfinite(loss) else None, "n_samples": int(n_samples), **meta}
    return Message(MsgType.UPDATE, run, worker, round, dict(arrays), meta=m)


def leave(run: str, worker: int, reason: str = "done", version: int = 0) -> Message:
    """Orderly goodbye, so the other side does not wait out a heartbeat timeout."""
    return Message(MsgType.LEAVE, run, worker, version, meta={"reason": reason})


def error_message(run: str, worker: int, message: str, reason: str = "", fatal: bool = False) -> Message:
    """Tell the peer what was wrong (e.g. a ProtocolError's reason and text); ``fatal``: it must leave."""
    meta: dict[str, Any] = {"message": message[:1000], "reason": reason}
    if fatal:
        meta["fatal"] = True
    return Message(MsgType.ERROR, run, worker, 0, meta=meta)


def shard_message(run: str, worker: int, x: np.ndarray, y: np.ndarray, **meta: Any) -> Message:
    """A worker's data shard, for hosts that do not have the data set."""
    return Message(MsgType.SHARD, run, worker, 0, {"x": x, "y": y}, meta=dict(meta))


def peer_message(run: str, worker: int, to: int, round: int, arrays: Mapping[str, np.ndarray],
                 version: int = 0, **meta: Any) -> Message:
    """Worker-to-worker payload relayed by the broker (gossip, averaging)."""
    return Message(MsgType.PEER, run, worker, version, dict(arrays),
                   meta={"to": to, "round": round, **meta})


def state_request(run: str, tag: int, full: bool = False, at: int | None = None) -> Message:
    """Coordinator -> range server: send your range's weights (``full``: and optimizer state), answering ``tag``;
    ``at``: once the range has taken that many updates (the run's final gather: every range at the same step)."""
    return Message(MsgType.STATE, run, -1, 0, meta={"tag": int(tag), "full": bool(full)} | ({} if at is None else {"at": int(at)}))


def state_message(run: str, server: int, version: int, arrays: Mapping[str, np.ndarray], **meta: Any) -> Message:
    """A range's state: weights ``w`` and optionally ``opt.NAME`` arrays (both ways: a server's reply, or its initial state)."""
    return Message(MsgType.STATE, run, server, version, dict(arrays), meta=dict(meta))


#: WAIT reason: the step at an older version is no longer wanted (K-sync's backup workers). Here, on the wire, because
#: both sides name it: the broker sends it (zsgd.runtime.server), the worker ends its step on it (zsgd.runtime.worker).
ABANDON = "abandon"


def wait_message(run: str, worker: int, version: int, reason: str = "barrier") -> Message:
    """No weights for this worker yet (sync barrier, SSP bound); ask again later."""
    return Message(MsgType.WAIT, run, worker, version, meta={"reason": reason})
