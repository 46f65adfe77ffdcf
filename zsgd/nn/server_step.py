"""The server's step: one fused, out-of-place pass per update.

On the parameter server every update costs one trip through memory, and at
4.8 MB per vector that trip is the step (the arithmetic is free). Done
naively an update makes four passes: a finite check over the gradient,
the optimizer's in-place update, and a snapshot copy of the new weights
for the zero-copy reply. The kernels here make one:

    read  w, g, state           (the old weights, the gradient, momentum/Adam moments)
    write w_out, state_out      (the new weights are the reply buffer)
    check every g[i] is finite  (a count of ``not |g[i]| < inf``: true for NaN and Inf)

Out of place for two reasons. The old weights stay intact while a reply of
them may still be in flight, so no snapshot copy is needed; and a gradient
found to hold NaN or Inf halfway through changes nothing: the caller simply
does not swap the buffers in (the optimizer state is double-buffered too).

Each kernel evaluates exactly the expressions of its in-place twin in
``zsgd.nn.optim`` (same fastmath flags), so without clipping the result is
bit-identical to ``Optimizer.step``; with clipping the gradient's scale is
folded into the pass (``g[i] * c``) where the in-place path stores the
scaled gradient first, and LLVM may contract the two differently: within
float32 rounding (a few ulp). ``tests/test_server_step.py`` checks both.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba import uint64 as u8

from zsgd import jit as _jit  # noqa: F401  before any @njit: LLVM options, cache keys (see zsgd.jit)

_FM = {"reassoc", "contract", "nsz", "arcp"}  # as zsgd.nn.optim: no nnan/ninf, so NaN/Inf stay visible
_INF = np.float32(np.inf)


@njit(cache=True, fastmath=_FM)
def sgd_into(w, g, out, lr, wd, scaled, c):
    bad = 0
    for i in range(u8(w.size)):
        gi = g[i]
        if scaled:
            gi = gi * c
        bad += not (abs(gi) < _INF)
        wi = w[i]
        out[i] = wi - lr * (gi + wd * wi)
    return bad == 0


@njit(cache=True, fastmath=_FM)
def momentum_into(w, g, buf, out, buf_out, lr, mu, wd, nesterov, scaled, c):
    bad = 0
    for i in range(u8(w.size)):
        gi = g[i]
        if scaled:
            gi = gi * c
        bad += not (abs(gi) < _INF)
        wi = w[i]
        d = gi + wd * wi
        b = mu * buf[i] + d
        buf_out[i] = b
        if nesterov:
            out[i] = wi - lr * (d + mu * b)
        else:
            out[i] = wi - lr * b
    return bad == 0


@njit(cache=True, fastmath=_FM)
def adagrad_into(w, g, acc, out, acc_out, clr, wd, eps, scaled, c):
    bad = 0
    for i in range(u8(w.size)):
        gi = g[i]
        if scaled:
            gi = gi * c
        bad += not (abs(gi) < _INF)
        wi = w[i]
        d = gi + wd * wi
        a = acc[i] + d * d
        acc_out[i] = a
        out[i] = wi - clr * d / (np.sqrt(a) + eps)
    return bad == 0


@njit(cache=True, fastmath=_FM)
def adam_into(w, g, m, v, out, m_out, v_out, lr, b1, b2, eps, wd, decoupled, step_size, bc2_sqrt, scaled, c):
    one = np.float32(1.0)
    bad = 0
    for i in range(u8(w.size)):
        wi = w[i]
        d = g[i]
        if scaled:
            d = d * c
        bad += not (abs(d) < _INF)
        if decoupled:
            wi = wi * (one - lr * wd)
        else:
            d = d + wd * wi
        mi = b1 * m[i] + (one - b1) * d
        vi = b2 * v[i] + (one - b2) * d * d
        m_out[i] = mi
        v_out[i] = vi
        out[i] = wi - step_size * mi / (np.sqrt(vi) / bc2_sqrt + eps)
    return bad == 0


@njit(cache=True, fastmath=_FM)
def all_finite(g):
    """Whether every element of a float32 vector is finite (one read pass)."""
    bad = 0
    for i in range(u8(g.size)):
        bad += not (abs(g[i]) < _INF)
    return bad == 0


def is_finite(g: np.ndarray) -> bool:
    """``g`` (a float32 vector) holds no NaN or Inf: one numba pass, no temporary."""
    return bool(all_finite(g))


@njit(cache=True)  # no fastmath: a * g + acc rounds exactly as numpy's acc += g * a (no fused multiply-add)
def add_scaled(acc, g, a):
    """``acc += a * g`` in one pass, without the model-sized temporary numpy makes for ``g * a``.

    A sync round sums its workers' gradients weighted by their sample counts;
    with this, each arriving gradient costs one read of it and one
    read-write of the sum."""
    for i in range(u8(acc.size)):
        acc[i] += a * g[i]
