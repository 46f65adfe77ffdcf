"""How a worker turns the broker's WEIGHTS replies into weights (full, or ``--compress-replies`` deltas).

Shared by the single-broker worker (``zsgd.node``) and the worker of a
sharded run (``zsgd.runtime.sharded_worker``), which keeps one decoder per range.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from zsgd.wire import protocol
from zsgd.wire.protocol import Message


def reply_decoder(spec: str, n_params: int) -> Callable[[Message], np.ndarray]:
    """``msg -> weights``: full WEIGHTS as they come, or with --compress-replies the
    local copy advanced by each coded delta (ProtocolError if a message does not fit)."""
    if spec == "none":
        def full_only(msg: Message) -> np.ndarray:
            if msg.codec != "none":
                raise protocol.ProtocolError("bad-schema", f"unexpected reply codec {msg.codec!r}")
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
            raise protocol.ProtocolError("bad-schema", f"unexpected reply codec {msg.codec!r}")
        return decoder.apply(msg.arrays)

    return with_deltas
