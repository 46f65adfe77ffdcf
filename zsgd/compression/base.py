"""What every codec shares: the worker-side ``Codec`` and payload checks.

A codec object lives on one worker and is stateful (its error-feedback
residual, its random stream); decoding on the broker is a stateless
function of (codec name, arrays, n_params), so one broker serves any mix
of workers and a restarted worker needs no handshake beyond its header.

``encode`` always returns arrays that nobody touches afterwards (fresh
allocations, or the caller's own gradient for ``none``), because the
runtime hands them to ZeroMQ zero-copy and computes the next step while
they are still in flight.

The payload checks raise ``ProtocolError`` with the protocol's reason
codes, so the broker counts a malformed compressed update exactly like any
other bad message: "missing-array", "bad-schema" (unexpected array or
unknown codec), "wrong-dtype", "wrong-shape" (lengths), "bad-array"
(indices out of range or not strictly increasing, levels out of range),
"non-finite" (NaN/Inf values or scales).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numba import njit

from zsgd.jit import always_inline  # before any @njit: LLVM options, cache keys (see zsgd.jit)

from zsgd.compression.spec import CodecSpec
from zsgd.errors import ProtocolError


class Codec:
    """Worker-side compressor for one flat float32 vector of ``n_params``.

    ``error_feedback=True`` (the default for gradients) keeps what was not
    sent in ``residual`` and adds it to the next input, so nothing is lost,
    only delayed (Seide et al. 2014; Stich et al. 2018). ``False`` forgets it:
    for callers that keep their own mirror, such as the reply delta codec.
    """

    def __init__(self, spec: CodecSpec, n_params: int, seed: int = 0, error_feedback: bool = True) -> None:
        if isinstance(n_params, bool) or not isinstance(n_params, (int, np.integer)) or n_params < 1:
            raise ValueError(f"n_params must be a positive integer, got {n_params!r}")
        self.spec = spec
        self.name = spec.name
        self.n_params = int(n_params)
        self.seed = int(seed)
        self.error_feedback = bool(error_feedback)

    @property
    def residual(self) -> np.ndarray | None:
        """The error-feedback memory (None for codecs without one)."""
        return None

    def encode(self, grad: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _check_input(self, grad: np.ndarray) -> np.ndarray:
        g = np.ascontiguousarray(grad, dtype=np.float32)
        if g.shape != (self.n_params,):
            raise ValueError(f"{self.name}: expected a vector of {self.n_params}, got shape {np.shape(grad)}")
        return g

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, n_params={self.n_params}, error_feedback={self.error_feedback})"


def encoded_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of an encoded update (array frames only, no header)."""
    return sum(int(np.asarray(a).nbytes) for a in arrays.values())


# ---------------------------------------------------------------- payload checks


def expect_arrays(codec: str, arrays: Mapping[str, np.ndarray], layout: Mapping[str, np.dtype]) -> list[np.ndarray]:
    """The arrays named in ``layout``, each 1-D with the listed dtype; nothing else allowed."""
    if not isinstance(arrays, Mapping):
        raise ProtocolError("bad-schema", f"{codec}: arrays must be a mapping")
    extra = sorted(set(arrays) - set(layout))
    if extra:
        raise ProtocolError("bad-schema", f"{codec}: unexpected arrays {extra[:4]}")
    out = []
    for name, dtype in layout.items():
        a = arrays.get(name)
        if a is None:
            raise ProtocolError("missing-array", f"{codec} payload lacks array {name!r}")
        if not isinstance(a, np.ndarray):
            raise ProtocolError("bad-array", f"{codec}: {name!r} is {type(a).__name__}, not ndarray")
        if a.dtype != dtype:
            raise ProtocolError("wrong-dtype", f"{codec}: {name!r} is {a.dtype}, expected {np.dtype(dtype).name}")
        if a.ndim != 1:
            raise ProtocolError("wrong-shape", f"{codec}: {name!r} has shape {a.shape}, expected 1-D")
        out.append(a)
    return out


@njit(cache=True)
def _first_non_finite(a):  # pragma: no cover - jitted
    for i in range(a.size):
        if not np.isfinite(a[i]):
            return i
    return -1


def check_finite(codec: str, name: str, a: np.ndarray) -> None:
    """One jitted pass (no n-sized boolean temporary, unlike ``np.isfinite(a).all()``)."""
    if a.size and _first_non_finite(a) >= 0:
        raise ProtocolError("non-finite", f"{codec}: {name!r} holds NaN or Inf")
