"""The LSTM's per-time-step matrix products as numba kernels, with no weight packing.

Each time step of the recurrence multiplies a (B, H) state by the (4H, H)
recurrent matrix, B = 32 rows: 128 such products forward and 126 backward in
a training step of the default model. Through OpenBLAS each call repacks the
1 MB weight matrix before it computes (there is no "pack once" API), and at
32 rows that packing is about 40 % of the call (93 GFLOP/s against 160 for
the same sgemm at 2,048 rows). The products here read the weight rows as
they are:

``gemm_nt(a, w, c)``: ``c = a @ w.T`` for row-major ``a`` (M, K) and ``w``
(N, K). Every output is a dot product along contiguous rows; a 4 x 4 tile of
outputs is sixteen scalar reductions over k in one loop, which LLVM turns
into sixteen AVX-512 accumulators fed by eight vector loads per sixteen
fused multiply-adds (no spills, checked in the generated assembly). Each
output then costs one horizontal sum of a 16-lane register, which is why the
kernel gains more the longer the rows: forward (K = H = 256) it matches
OpenBLAS, backward (K = 4H = 1024) it is 1.4x faster.

**Why ``prefer_512()``.** LLVM's default tuning for Intel server cores
prefers 256-bit vectors when it vectorises loops ("prefer-vector-width" 256,
to avoid AVX-512 clock throttling on older parts), which halves the peak of
a multiply-add loop. The intrinsic below marks the one numba function that
calls it with ``"prefer-vector-width"="512"``, the attribute clang sets for
``-mprefer-vector-width=512``; other functions are untouched, and a CPU
without AVX-512 simply gets its widest vectors. llvmlite only accepts the
attribute names it knows, so the string attribute is added to the set
directly; should a future llvmlite refuse it, the kernels compile without it
(slower, same results).

Numba's on-disk cache of ``zsgd.nn.lstm_kernels`` holds its own copy of
``gemm_nt`` and is keyed on that file only: after editing this one, touch
``lstm_kernels.py`` (or clear its ``__pycache__``) so the layer loops
recompile.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

_FM = {"reassoc", "contract", "nsz", "arcp"}
_WIDE = '"prefer-vector-width"="512"'


@intrinsic
def prefer_512(typingctx):
    """Mark the calling numba function to vectorise with 512-bit registers (see the module docstring)."""
    sig = types.none()

    def codegen(context, builder, signature, args):
        try:
            set.add(builder.function.attributes, _WIDE)
        except Exception:  # pragma: no cover - an llvmlite that stores attributes differently: narrower, still correct
            pass
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, fastmath=_FM, error_model="numpy")
def gemm_nt(a: np.ndarray, w: np.ndarray, c: np.ndarray) -> None:
    """``c[:] = a @ w.T``; ``a`` (M, K), ``w`` (N, K), ``c`` (M, N), all C-contiguous float32.

    ``c`` must not overlap ``a`` or ``w``. Loops: 4 weight rows at a time
    (16 KB at K = 1024, kept in L1) against every 4-row block of ``a``,
    then the leftover rows and columns one dot product at a time.
    """
    prefer_512()
    M, K = a.shape
    N = w.shape[0]
    m4 = M - M % 4
    n4 = N - N % 4
    for n in range(0, n4, 4):
        w0 = w[n]
        w1 = w[n + 1]
        w2 = w[n + 2]
        w3 = w[n + 3]
        for i in range(0, m4, 4):
            a0 = a[i]
            a1 = a[i + 1]
            a2 = a[i + 2]
            a3 = a[i + 3]
            s00 = s01 = s02 = s03 = np.float32(0.0)
            s10 = s11 = s12 = s13 = np.float32(0.0)
            s20 = s21 = s22 = s23 = np.float32(0.0)
            s30 = s31 = s32 = s33 = np.float32(0.0)
            for k in range(K):
                x0 = a0[k]
                x1 = a1[k]
                x2 = a2[k]
                x3 = a3[k]
                y0 = w0[k]
                y1 = w1[k]
                y2 = w2[k]
                y3 = w3[k]
                s00 += x0 * y0
                s01 += x0 * y1
                s02 += x0 * y2
                s03 += x0 * y3
                s10 += x1 * y0
                s11 += x1 * y1
                s12 += x1 * y2
                s13 += x1 * y3
                s20 += x2 * y0
                s21 += x2 * y1
                s22 += x2 * y2
                s23 += x2 * y3
                s30 += x3 * y0
                s31 += x3 * y1
                s32 += x3 * y2
                s33 += x3 * y3
            c[i, n] = s00
            c[i, n + 1] = s01
            c[i, n + 2] = s02
            c[i, n + 3] = s03
            c[i + 1, n] = s10
            c[i + 1, n + 1] = s11
            c[i + 1, n + 2] = s12
            c[i + 1, n + 3] = s13
            c[i + 2, n] = s20
            c[i + 2, n + 1] = s21
            c[i + 2, n + 2] = s22
            c[i + 2, n + 3] = s23
            c[i + 3, n] = s30
            c[i + 3, n + 1] = s31
            c[i + 3, n + 2] = s32
            c[i + 3, n + 3] = s33
        for i in range(m4, M):
            _dots(a[i], w, n, n + 4, c[i])
    for i in range(M):
        _dots(a[i], w, n4, N, c[i])


@njit(cache=True, fastmath=_FM, error_model="numpy", inline="always")
def _dots(x: np.ndarray, w: np.ndarray, n0: int, n1: int, out: np.ndarray) -> None:
    """``out[n] = x . w[n]`` for n in [n0, n1): the edges of :func:`gemm_nt`."""
    for n in range(n0, n1):
        wr = w[n]
        s = np.float32(0.0)
        for k in range(x.shape[0]):
            s += x[k] * wr[k]
        out[n] = s
