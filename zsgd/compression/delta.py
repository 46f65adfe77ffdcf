"""Compressed replies: send a worker ``w_new - w_it_has`` through a codec.

In async SGD every update is answered with the full model (4.8 MB for the
cnn), so compressing only the gradients halves the traffic at best. The
reply can shrink too: the broker remembers, per worker, the weights that
worker reconstructed (its *mirror*) and sends ``codec(w_new - mirror)``;
both sides then add the *decoded* delta to their copy with the same float32
operation, so they stay bit-identical without any acknowledgement.

The mirror is the error feedback: whatever a lossy codec left out of one
delta is still in ``w_new - mirror`` next time, so the worker's weights
trail the central model by a bounded, shrinking error instead of drifting.
That is why the inner codec runs with ``error_feedback=False`` (a residual
on top of the mirror would send the same error twice).

Cost: one float32 mirror per worker on the broker (4.8 MB each for the cnn).
A worker the broker has no mirror for (new, restarted, or after ``forget``)
gets full weights: ``encode`` returns None and the caller sends WEIGHTS as
today, then calls ``full``. Lost or reordered replies would desynchronise
the pair; zsgd's DEALER/ROUTER links are ordered and a worker that times out
rejoins (and gets full weights), which is what ``forget`` is for.

Wire (``--compress-replies``; the broker's ``_reply_message``, the
simulator's ``_reply``, the worker's ``reply_decoder``): a WEIGHTS message
with codec ``"delta+" + inner_name`` (e.g. ``delta+topk:0.01``, a valid
protocol codec string) and the inner codec's arrays; the version is the
model version the worker holds after applying it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from zsgd.compression import decode, make_codec
from zsgd.compression.spec import parse_codec
from zsgd.errors import ProtocolError

DELTA_PREFIX = "delta+"


def delta_codec_name(inner: str) -> str:
    return DELTA_PREFIX + parse_codec(inner).name


class DeltaReplyEncoder:
    """Broker side: one mirror per worker; ``encode`` -> arrays, or None for "send full weights"."""

    def __init__(self, spec: str, n_params: int, seed: int = 0) -> None:
        self.codec = make_codec(spec, n_params, seed, error_feedback=False)
        self.name = DELTA_PREFIX + self.codec.name
        self.n_params = self.codec.n_params
        self.mirrors: dict[int, np.ndarray] = {}

    def full(self, worker: int, weights: np.ndarray) -> None:
        """The worker was just sent these full weights: start its mirror from them."""
        self.mirrors[worker] = np.array(weights, dtype=np.float32, copy=True)

    def forget(self, worker: int) -> None:
        """The worker left or must resynchronise: its next reply is full weights."""
        self.mirrors.pop(worker, None)

    def encode(self, worker: int, weights: np.ndarray) -> dict[str, np.ndarray] | None:
        """Arrays carrying ``weights - mirror`` (mirror advances by what they decode to)."""
        mirror = self.mirrors.get(worker)
        if mirror is None:
            return None
        # A fresh delta each time: the "none" codec sends its input as is, zero-copy.
        arrays = self.codec.encode(np.subtract(weights, mirror, dtype=np.float32))
        mirror += decode(self.codec.name, arrays, self.n_params)
        return arrays


    def reply(self, worker: int, weights: np.ndarray) -> dict[str, np.ndarray] | None:
        """What to send: a coded delta, or None for full weights (whose mirror then starts)."""
        arrays = self.encode(worker, weights)
        if arrays is None:
            self.full(worker, weights)
        return arrays


class DeltaReplyDecoder:
    """Worker side: the local weights, advanced by each delta reply."""

    def __init__(self, name: str, n_params: int) -> None:
        if not name.startswith(DELTA_PREFIX):
            raise ProtocolError("bad-schema", f"{name!r} is not a delta codec")
        try:
            self.inner = parse_codec(name[len(DELTA_PREFIX):]).name
        except ValueError as exc:
            raise ProtocolError("bad-schema", str(exc)) from None
        self.n_params = int(n_params)
        self.w: np.ndarray | None = None

    def full(self, weights: np.ndarray) -> np.ndarray:
        """Full weights arrived: they replace the local copy (which is returned)."""
        self.w = np.array(weights, dtype=np.float32, copy=True)
        return self.w

    def apply(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """Add a decoded delta to the local weights and return them (ProtocolError if malformed)."""
        if self.w is None:
            raise ProtocolError("bad-meta", "delta reply before any full weights")
        self.w += decode(self.inner, arrays, self.n_params)
        return self.w
