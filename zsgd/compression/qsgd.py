"""QSGD: unbiased stochastic quantization (Alistarh et al., NeurIPS 2017).

The vector is cut into buckets of ``bucket`` coordinates (default 512, the
bucket size of the paper's 4- and 8-bit experiments). Each bucket sends one
float32 scale ``m`` and, per coordinate, a signed level ``l`` in [-s, s] with
``s = 2**(BITS-1) - 1`` (127 for 8 bits, 7 for 4 bits)::

    x = |g_i| / m * s              in [0, s]
    l = floor(x + u),  u ~ U[0,1)  so E[l] = x exactly: unbiased
    decoded_i = sign(g_i) * l * m / s,   |decoded_i - g_i| < m / s

Wire: ``{"m": float32 (n_buckets,), "q": int8 (n,)}`` for 8 bits; for 4 bits
``"q"`` is uint8 (ceil(n/2),), two levels per byte, coordinate 2j in the
low nibble, 2j+1 in the high nibble, each level in 4-bit two's complement
(the nibble 0x8, i.e. -8, never occurs and is rejected, as is -128 for
8 bits, and a nonzero padding nibble when n is odd).

The scale ``m`` is the bucket's max |g| (its infinity norm), not the L2 norm
of the paper's analysis: the estimator stays unbiased with the same
per-coordinate bound m/s, and its variance is far lower, because the largest
coordinate maps to level s instead of about s/sqrt(bucket); at 4 bits with
the L2 norm nearly every coordinate of a 512-bucket would round to 0 or +-1.

Randomness is counter-based (splitmix64 of the worker's seed and a call
counter, advanced per coordinate), so a worker's stream is reproducible,
independent of numpy's global state, and costs a few ns per coordinate. QSGD
is unbiased, so it keeps no error-feedback residual.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numba import njit

from zsgd.jit import always_inline  # before any @njit: LLVM options, cache keys (see zsgd.jit)

from zsgd.compression.base import Codec, expect_arrays
from zsgd.compression.spec import CodecSpec
from zsgd.errors import ProtocolError

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S40 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(40)
_U24 = 1.0 / (1 << 24)


@njit(cache=True)
def _mix(z):  # pragma: no cover - jitted
    always_inline()
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(cache=True)
def _quantize(g, bucket, s, key, scales, q):  # pragma: no cover - jitted
    """Fill scales (one per bucket) and q (signed int8 levels)."""
    n = g.size
    state = _mix(key)
    for b in range(scales.size):
        start = b * bucket
        end = min(start + bucket, n)
        m = np.float32(0.0)
        for i in range(start, end):
            a = abs(g[i])
            if a > m or a != a:  # a NaN scale travels, and the broker rejects it
                m = a
        scales[b] = m
        if not (m > 0 and m < np.inf):
            q[start:end] = 0
            continue
        mult = np.float64(s) / np.float64(m)
        for i in range(start, end):
            state += _GAMMA
            u = np.float64(_mix(state) >> _S40) * _U24
            lvl = min(int(np.float64(abs(g[i])) * mult + u), s)
            q[i] = -lvl if g[i] < 0 else lvl


@njit(cache=True)
def _pack4(levels, out):  # pragma: no cover - jitted
    """Two 4-bit two's-complement levels per byte, low nibble first; odd tail padded with 0."""
    n = levels.size
    for j in range(n >> 1):
        out[j] = (levels[2 * j] & 0xF) | ((levels[2 * j + 1] & 0xF) << 4)
    if n & 1:
        out[n >> 1] = levels[n - 1] & 0xF


@njit(cache=True)
def _dequantize(scales, q, bucket, s, n, packed, out):  # pragma: no cover - jitted
    """out = levels * scale / s; returns (error code, position), 0 = fine.

    The inner loops are branch-free (a bad level only sets a flag) so they
    vectorize; the rare error path rescans for the position to report.
    """
    for b in range(scales.size):
        m = scales[b]
        if not (m < np.inf and m > -np.inf):  # NaN fails both
            return 1, b
        if m < 0:
            return 4, b
        f = np.float32(m / np.float32(s))
        start = b * bucket
        end = min(start + bucket, n)
        bad = False
        if packed:
            for i in range(start, end):
                nib = (np.int32(q[i >> 1]) >> ((i & 1) << 2)) & 0xF
                bad |= nib == 8  # -8 is outside [-7, 7]
                out[i] = np.float32(nib - ((nib & 8) << 1)) * f
        else:
            for i in range(start, end):
                lvl = np.int32(q[i])
                bad |= lvl < -s
                out[i] = np.float32(lvl) * f
        if bad:
            for i in range(start, end):
                if (packed and ((np.int32(q[i >> 1]) >> ((i & 1) << 2)) & 0xF) == 8) or \
                        (not packed and np.int32(q[i]) < -s):
                    return 2, i
    if packed and n & 1 and (q[n >> 1] >> 4) != 0:
        return 3, n
    return 0, -1


def n_buckets(n_params: int, bucket: int) -> int:
    return -(-n_params // bucket)


class QSGD(Codec):
    """``qsgd:BITS`` (4 or 8): unbiased, no residual, seeded per worker."""

    def __init__(self, spec: CodecSpec, n_params: int, seed: int = 0, error_feedback: bool = True) -> None:
        super().__init__(spec, n_params, seed, error_feedback)
        self.bits = spec.bits
        self.bucket = spec.bucket
        self.levels = 2 ** (self.bits - 1) - 1
        self.calls = 0
        self._levels: np.ndarray | None = None

    def encode(self, grad: np.ndarray) -> dict[str, np.ndarray]:
        g = self._check_input(grad)
        scales = np.empty(n_buckets(self.n_params, self.bucket), np.float32)
        # A distinct stream per (seed, call): seed spread by the golden-ratio constant, then mixed.
        key = np.uint64((self.seed * 0x9E3779B97F4A7C15 + self.calls) & 0xFFFFFFFFFFFFFFFF)
        self.calls += 1
        if self.bits == 8:
            q = np.empty(self.n_params, np.int8)
            _quantize(g, self.bucket, self.levels, key, scales, q)
            return {"m": scales, "q": q}
        if self._levels is None:
            self._levels = np.empty(self.n_params, np.int8)  # scratch, reused: only the packed copy is sent
        _quantize(g, self.bucket, self.levels, key, scales, self._levels)
        q = np.empty((self.n_params + 1) // 2, np.uint8)
        _pack4(self._levels, q)
        return {"m": scales, "q": q}


def decode_qsgd(spec: CodecSpec, arrays: Mapping[str, np.ndarray], n_params: int) -> np.ndarray:
    """Dense float32 vector from ``{"m", "q"}``; scales and levels are checked."""
    packed = spec.bits == 4
    layout = {"m": np.dtype(np.float32), "q": np.dtype(np.uint8 if packed else np.int8)}
    scales, q = expect_arrays(spec.name, arrays, layout)
    nb = n_buckets(n_params, spec.bucket)
    if scales.size != nb:
        raise ProtocolError("wrong-shape", f"{spec.name}: {scales.size} scales, expected {nb}")
    want = (n_params + 1) // 2 if packed else n_params
    if q.size != want:
        raise ProtocolError("wrong-shape", f"{spec.name}: {q.size} level bytes, expected {want}")
    out = np.empty(n_params, np.float32)
    code, pos = _dequantize(scales, q, spec.bucket, 2 ** (spec.bits - 1) - 1, n_params, packed, out)
    if code == 1:
        raise ProtocolError("non-finite", f"{spec.name}: scale m[{pos}] is NaN or Inf")
    if code == 4:
        raise ProtocolError("bad-array", f"{spec.name}: scale m[{pos}] is negative")
    if code == 2:
        raise ProtocolError("bad-array", f"{spec.name}: level of coordinate {pos} outside [-s, s]")
    if code == 3:
        raise ProtocolError("bad-array", f"{spec.name}: padding nibble of the last byte is not zero")
    return out
