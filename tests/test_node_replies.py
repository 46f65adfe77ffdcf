"""The worker's side of --compress-replies: what it accepts as weights, and what it refuses."""

from __future__ import annotations

import numpy as np
import pytest

from zsgd.wire import protocol
from zsgd.compression.delta import DeltaReplyEncoder
from zsgd.runtime.worker.replies import reply_decoder as _reply_decoder
from zsgd.wire.protocol import Message, MsgType, ProtocolError

N = 300
RUN = "r" * 12


def weights(w: np.ndarray) -> Message:
    return protocol.weights_message(RUN, 1, w)


def delta(enc: DeltaReplyEncoder, w: np.ndarray, worker: int = 0) -> Message:
    return Message(MsgType.WEIGHTS, RUN, -1, 2, enc.encode(worker, w), codec=enc.name)


def test_full_weights_only_without_reply_compression():
    take = _reply_decoder("none", N)
    w = np.arange(N, dtype=np.float32)
    np.testing.assert_array_equal(take(weights(w)), w)
    with pytest.raises(ProtocolError):
        take(weights(np.zeros(N + 1, np.float32)))  # wrong shape
    enc = DeltaReplyEncoder("topk:0.1", N)
    enc.full(0, w)
    with pytest.raises(ProtocolError, match="codec"):
        take(delta(enc, w + 1))


def test_deltas_follow_the_brokers_mirror_bit_for_bit():
    take = _reply_decoder("topk:0.1", N)
    enc = DeltaReplyEncoder("topk:0.1", N)
    rng = np.random.default_rng(0)
    w = rng.standard_normal(N).astype(np.float32)
    enc.full(0, w)
    take(weights(w))
    for _ in range(20):
        w = w - 0.1 * rng.standard_normal(N).astype(np.float32)
        np.testing.assert_array_equal(take(delta(enc, w)), enc.mirrors[0])


def test_bad_deltas_are_refused():
    enc = DeltaReplyEncoder("topk:0.1", N)
    w = np.ones(N, np.float32)
    enc.full(0, w)
    with pytest.raises(ProtocolError):
        _reply_decoder("topk:0.1", N)(delta(enc, w * 2))  # a delta before any full weights
    take = _reply_decoder("topk:0.1", N)
    take(weights(w))
    msg = delta(enc, w * 3)
    key = next(k for k, a in msg.arrays.items() if a.dtype.kind in "iu")
    bad = dict(msg.arrays)
    bad[key] = np.full_like(msg.arrays[key], N + 5)  # indices out of range
    with pytest.raises(ProtocolError):
        take(Message(MsgType.WEIGHTS, RUN, -1, 3, bad, codec=msg.codec))
    with pytest.raises(ProtocolError, match="codec"):
        take(Message(MsgType.WEIGHTS, RUN, -1, 3, msg.arrays, codec="delta+qsgd:8"))
