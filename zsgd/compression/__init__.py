"""Gradient compression: a stateful codec per worker, a stateless decoder on the broker.

Worker::

    codec = make_codec("topk:0.01", n_params, seed=run_seed * 1_000_003 + worker)
    arrays = codec.encode(grad)                      # what goes on the wire
    msg = protocol.update_message(run, worker, version, None, n, loss,
                                  codec=codec.name, extra_arrays=arrays)

Broker (after ``protocol.validate_update``)::

    grad = decode(msg.codec, msg.arrays, n_params)   # dense float32, or ProtocolError
    idx = touched_indices(msg.codec, msg.arrays)     # for per-coordinate staleness

Codecs (see ``spec.py`` for the grammar and why each default):

=================  ==========================  ===================================
``none``           ``{"g": float32 (n,)}``     passthrough (aliases the input)
``topk:F``         ``{"i": int32, "v": f32}``  k = ceil(F n) largest, error feedback
``adacomp:BIN``    ``{"i": int32, "v": f32}``  AdaComp per-bin threshold, error feedback
``qsgd:BITS``      ``{"m": f32, "q": i8/u8}``  unbiased stochastic levels, 8 or 4 bits
=================  ==========================  ===================================

Weights can travel compressed too: ``delta.DeltaReplyEncoder`` /
``DeltaReplyDecoder`` send ``w_new - w_the_worker_has`` through a codec.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from zsgd.compression.base import Codec, check_finite, encoded_nbytes, expect_arrays
from zsgd.compression.qsgd import QSGD, decode_qsgd
from zsgd.compression.sparse import AdaComp, TopK, decode_sparse
from zsgd.compression.spec import CODEC_HELP, CODEC_KINDS, CodecSpec, parse_codec
from zsgd.errors import ZsgdError
from zsgd.errors import ProtocolError


class NoCompression(Codec):
    """``none``: the dense float32 gradient as array ``"g"`` (what codec-less UPDATEs carry)."""

    def encode(self, grad: np.ndarray) -> dict[str, np.ndarray]:
        return {"g": self._check_input(grad)}


_CODECS: dict[str, type[Codec]] = {"none": NoCompression, "topk": TopK, "adacomp": AdaComp, "qsgd": QSGD}


def make_codec(spec: str, n_params: int, seed: int = 0, *, error_feedback: bool = True) -> Codec:
    """A worker's codec for ``spec``; ZsgdError names a bad spec.

    ``seed`` drives QSGD's random rounding: give each worker its own (e.g.
    ``run_seed * 1_000_003 + worker``) or all workers round alike.
    """
    try:
        parsed = parse_codec(spec)
    except ValueError as exc:
        raise ZsgdError(str(exc)) from None
    return _CODECS[parsed.kind](parsed, n_params, seed, error_feedback)


def _spec_of(codec_name: str) -> CodecSpec:
    try:
        return parse_codec(codec_name)
    except ValueError as exc:
        raise ProtocolError("bad-schema", str(exc)) from None


def decode(codec_name: str, arrays: Mapping[str, np.ndarray], n_params: int) -> np.ndarray:
    """Dense float32 ``(n_params,)`` gradient from a payload; ProtocolError if malformed.

    Checks everything a peer controls: the codec name, array names, dtypes,
    lengths, index range and order, level range, finiteness of values and
    scales. For ``none`` the result is the received array itself (possibly a
    read-only view on the frame: the optimizer only reads it); for the other
    codecs it is a fresh array.
    """
    spec = _spec_of(codec_name)
    if spec.kind == "none":
        (g,) = expect_arrays("none", arrays, {"g": np.dtype(np.float32)})
        if g.size != n_params:
            raise ProtocolError("wrong-shape", f"none: 'g' has {g.size} elements, expected {n_params}")
        check_finite("none", "g", g)
        return g if g.flags.c_contiguous else np.ascontiguousarray(g)
    if spec.kind == "qsgd":
        return decode_qsgd(spec, arrays, n_params)
    return decode_sparse(spec, arrays, n_params)


def touched_indices(codec_name: str, arrays: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The coordinates a sparse payload sets (int32, increasing), or None for dense codecs.

    Call after ``decode`` succeeded (it validated them). QSGD counts as dense:
    its zero levels are rounding, not a choice to leave a coordinate alone.
    """
    kind = _spec_of(codec_name).kind
    return arrays["i"] if kind in ("topk", "adacomp") else None


__all__ = [
    "CODEC_HELP", "CODEC_KINDS", "AdaComp", "Codec", "CodecSpec", "NoCompression", "QSGD", "TopK", "decode",
    "encoded_nbytes", "make_codec", "parse_codec", "touched_indices",
]
