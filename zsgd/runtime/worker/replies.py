"""How a worker turns the broker's WEIGHTS replies into weights (full, or ``--compress-replies`` deltas),
and how long it then takes over its step under emulation (``emulated_stretch``).

Shared by the single-broker worker (``zsgd.node``) and the worker of a
sharded run (``zsgd.runtime.worker.sharded_worker``), which keeps one decoder per range.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np

from zsgd.errors import ProtocolError
from zsgd.wire import protocol
from zsgd.wire.protocol import Message, MsgType


def reply_decoder(spec: str, n_params: int) -> Callable[[Message], np.ndarray]:
    """``msg -> weights``: full WEIGHTS as they come, or with --compress-replies the
    local copy advanced by each coded delta (ProtocolError if a message does not fit)."""
    if spec == "none":
        def full_only(msg: Message) -> np.ndarray:
            if msg.codec != "none":
                raise ProtocolError("bad-schema", f"unexpected reply codec {msg.codec!r}")
            protocol.validate_weights(msg, run=msg.run, n_params=n_params, require_finite=False)
            return msg.arrays["w"]

        return full_only
    from zsgd.compression.delta import DeltaReplyDecoder, delta_codec_name

    decoder = DeltaReplyDecoder(delta_codec_name(spec), n_params)

    def with_deltas(msg: Message) -> np.ndarray:
        if msg.codec == "none":
            protocol.validate_weights(msg, run=msg.run, n_params=n_params, require_finite=False)
            return decoder.full(msg.arrays["w"])
        if msg.codec != "delta+" + decoder.inner:
            raise ProtocolError("bad-schema", f"unexpected reply codec {msg.codec!r}")
        return decoder.apply(msg.arrays)

    return with_deltas


MAX_STRETCH_S = 3600.0  # a reply asking for a longer step is not the emulation's: it is ignored


def emulated_stretch(meta: dict[str, Any]) -> tuple[float, float]:
    """``(target_s, slowdown)`` that the broker's emulation put in a reply: the drawn compute time of this step
    (``--inject-compute``; 0: none) and the straggler factor (``--stragglers``; 1: none). Anything else is ignored,
    as a worker validates what its broker sends."""
    def number(key: str, lo: float) -> float:
        v = meta.get(key, lo)
        good = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= MAX_STRETCH_S
        return float(v) if good else lo

    return number("compute_target_s", 0.0), number("slowdown", 1.0)




def stretch_step(t0: float, target_s: float, slowdown: float, recv: Callable[[float], Message | None] | None = None,
                 version: int = 0, first: bool = False) -> Message | None:
    """Hold the step that started at ``t0`` (monotonic) as the simulator times it: first to ``target_s`` (a real
    gradient cannot go faster, so the step takes ``max(draw, real)``), then ``slowdown`` times all of that.

    ``first``: the worker's first step, whose time holds the process's one-time costs (kernels loaded or, on a
    fresh machine, compiled: seconds), is slowed down on its drawn time alone (none without ``--inject-compute``):
    a 3x straggler stretched a 5.4 s first step to 16 s and took no part in a short run (a clean-clone fidelity
    cell). The simulator's straggler is slow in the steady state its twin is judged on, after such a step.

    With ``recv`` (``timeout -> message or None``) the hold listens instead of sleeping: a WAIT ``abandon``
    for a version newer than the step's (``version``) ends it at once (the step is no longer wanted: its
    update goes now, and the reply brings the new weights); any other message ends it too and is returned,
    for the caller to handle next. None otherwise."""
    def hold(seconds: float) -> Message | None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if recv is None:
                time.sleep(left)
                return None
            msg = recv(left)
            if msg is not None and not (_abandons(msg) and msg.version <= version):
                return msg  # an abandon for an older step is stale news: keep holding
        return None

    got = hold(target_s - (time.monotonic() - t0)) if target_s > 0 else None
    if got is None and slowdown > 1.0:
        got = hold((slowdown - 1.0) * (target_s if first else time.monotonic() - t0))
    return None if got is not None and _abandons(got) else got  # abandoned: the update goes now


def _abandons(msg: Any) -> bool:
    """A WAIT ``abandon`` (anything else, BROKER_DEAD included, is for the caller's loop)."""
    return isinstance(msg, Message) and msg.type == MsgType.WAIT and msg.meta.get("reason") == protocol.ABANDON
