"""Numba kernels: the element-wise and data-movement half of every layer.

The arithmetic-heavy half (the big matrix products of convolution and dense
layers) runs in ``zsgd.nn.conv``: through zsgd's own register tile where
the shape allows (``zsgd.nn.conv.direct``: the MNIST CNN's convs and fc1),
else as float32 sgemm through numpy's OpenBLAS. What is here is everything
around those products: im2col/col2im for the sgemm path, fused bias + ReLU
(+ max-pool), dropout masks, and softmax cross-entropy.

Conventions, chosen for speed:

* Activations are **channels-last (NHWC)** inside the model, so one im2col
  row is ``kh`` contiguous runs of ``kw * C`` floats, and a convolution's
  sgemm output (rows = pixels, columns = channels) *is* the next NHWC
  activation with no transpose.
* Hot loops index flat arrays with **unsigned** integers. Numba inserts a
  negative-index wrap-around check for signed indices, which blocks LLVM's
  vectoriser; with ``uint64`` indices the copies run at memory speed
  (im2col measured 6x faster: 17 ms to 2.5 ms for the MNIST CNN's conv2).
* Everything is float32; long reductions (loss, bias gradients over
  36 K pixels) accumulate in float64 so large batches lose no precision.
* ``fastmath`` is limited to re-association/contraction (no ``nnan``/
  ``ninf``) so NaN and Inf still propagate and the broker can reject them.

All kernels are single-threaded (``parallel=False``): parallelism comes from
worker processes, and ``cache=True`` keeps a worker's start-up fast.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba import uint64 as u8

from zsgd.jit import always_inline  # before any @njit: LLVM options, cache keys (see zsgd.jit)

_FM = {"reassoc", "contract", "nsz", "arcp"}
_F0 = np.float32(0.0)


def conv_out_size(size: int, k: int, stride: int, pad: int) -> int:
    """Output length of a convolution/pool along one axis (floor mode, like PyTorch)."""
    return (size + 2 * pad - k) // stride + 1


# ---------------------------------------------------------------- im2col / col2im


@njit(cache=True, fastmath=_FM)
def im2col_nhwc(x: np.ndarray, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int,
                out: np.ndarray) -> None:
    """Unfold NHWC ``x`` (C-contiguous) into ``out`` of shape (N*OH*OW, kh*kw*C).

    Column order is (ki, kj, c), so a window row inside the image is one
    contiguous copy of ``kw*C`` floats per ``ki``; padding writes zeros.
    """
    N, H, W, C = x.shape
    OH = (H + 2 * ph - kh) // sh + 1
    OW = (W + 2 * pw - kw) // sw + 1
    xf = x.reshape(-1)
    of = out.reshape(-1)
    L = u8(kw * C)
    uc = u8(C)
    dst = u8(0)
    for n in range(N):
        for oi in range(OH):
            for oj in range(OW):
                j0 = oj * sw - pw
                for ki in range(kh):
                    ii = oi * sh - ph + ki
                    if ii < 0 or ii >= H:
                        for t in range(L):
                            of[dst + t] = _F0
                    elif j0 >= 0 and j0 + kw <= W:
                        src = u8(((n * H + ii) * W + j0) * C)
                        for t in range(L):
                            of[dst + t] = xf[src + t]
                    else:
                        for kj in range(kw):
                            jj = j0 + kj
                            d = dst + u8(kj * C)
                            if jj < 0 or jj >= W:
                                for t in range(uc):
                                    of[d + t] = _F0
                            else:
                                src = u8(((n * H + ii) * W + jj) * C)
                                for t in range(uc):
                                    of[d + t] = xf[src + t]
                    dst += L


@njit(cache=True, fastmath=_FM)
def col2im_nhwc(dcols: np.ndarray, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int,
                mask: np.ndarray, use_mask: bool, out: np.ndarray) -> None:
    """Fold ``dcols`` (N*OH*OW, kh*kw*C) back onto NHWC ``out`` (overwritten).

    The adjoint of :func:`im2col_nhwc`. One input row at a time is summed in a
    small buffer that stays in L1, then written once; with ``use_mask`` the
    write multiplies by ``mask > 0`` (the ReLU derivative of the layer that
    produced the input), which saves a separate pass over the activation.
    """
    N, H, W, C = out.shape
    OH = (H + 2 * ph - kh) // sh + 1
    OW = (W + 2 * pw - kw) // sw + 1
    K = kh * kw * C
    L = u8(kw * C)
    uc = u8(C)
    WC = u8(W * C)
    df = dcols.reshape(-1)
    mf = mask.reshape(-1)
    of = out.reshape(-1)
    row = np.empty(W * C, np.float32)
    for n in range(N):
        for i in range(H):
            row[:] = _F0
            for ki in range(kh):
                t0 = i + ph - ki
                if t0 < 0 or t0 % sh != 0:
                    continue
                oi = t0 // sh
                if oi >= OH:
                    continue
                for oj in range(OW):
                    j0 = oj * sw - pw
                    src = u8(((n * OH + oi) * OW + oj) * K + ki * kw * C)
                    if j0 >= 0 and j0 + kw <= W:
                        d = u8(j0 * C)
                        for t in range(L):
                            row[d + t] += df[src + t]
                    else:
                        for kj in range(kw):
                            jj = j0 + kj
                            if jj >= 0 and jj < W:
                                d = u8(jj * C)
                                s = src + u8(kj * C)
                                for t in range(uc):
                                    row[d + t] += df[s + t]
            base = u8((n * H + i) * W * C)
            if use_mask:
                for t in range(WC):
                    of[base + t] = row[t] if mf[base + t] > _F0 else _F0
            else:
                for t in range(WC):
                    of[base + t] = row[t]


# ---------------------------------------------------------------- bias, ReLU, pooling


@njit(cache=True, fastmath=_FM)
def bias_act_rows(z: np.ndarray, b: np.ndarray, relu: bool) -> None:
    """In place: ``z[r, :] += b`` and optionally ReLU; ``z`` is (rows, C) contiguous."""
    R, C = z.shape
    zf = z.reshape(-1)
    uc = u8(C)
    for r in range(R):
        base = u8(r * C)
        if relu:
            for c in range(uc):
                v = zf[base + c] + b[c]
                zf[base + c] = v if v > _F0 else _F0
        else:
            for c in range(uc):
                zf[base + c] += b[c]


@njit(cache=True, fastmath=_FM)
def relu_backward(dy: np.ndarray, y: np.ndarray) -> None:
    """In place: ``dy *= (y > 0)``; both contiguous, any shape."""
    df = dy.reshape(-1)
    yf = y.reshape(-1)
    for t in range(u8(df.size)):
        if not yf[t] > _F0:
            df[t] = _F0


@njit(cache=True, fastmath=_FM)
def colsum_add(z: np.ndarray, acc: np.ndarray) -> None:
    """``acc += z.sum(axis=0)`` for (rows, C) ``z``, summed in float64 (bias gradients)."""
    R, C = z.shape
    zf = z.reshape(-1)
    s = np.zeros(C, np.float64)
    uc = u8(C)
    for r in range(R):
        base = u8(r * C)
        for c in range(uc):
            s[c] += zf[base + c]
    for c in range(C):
        acc[c] += s[c]


@njit(cache=True)
def bias_act_pool(z: np.ndarray, b: np.ndarray, relu: bool, n: int, oh: int, ow: int, k: int, s: int,
                  out: np.ndarray, arg: np.ndarray) -> None:
    """Fused bias + optional ReLU + max-pool of conv output rows.

    ``z`` is (n*oh*ow, C) pre-bias conv output (NHWC pixels as rows); ``out``
    is an (n, PH, PW, C) view of any strides (so the last conv can write
    straight into the PyTorch NCHW flatten order); ``arg`` gets the window
    position (ki*k+kj) of the max, or -1 where ReLU zeroed the output (its
    gradient is 0). Bias and ReLU are monotone, so
    ``relu(max(z) + b) == max(relu(z + b))``: pooling first leaves bias and
    ReLU a quarter of the values. Ties keep the first maximum, as PyTorch does.
    Few channels (LeNet's 6) take a scalar path: per-window loop overhead
    would otherwise dominate.
    """
    C = z.shape[1]
    PH = (oh - k) // s + 1
    PW = (ow - k) // s + 1
    zf = z.reshape(-1)
    uc = u8(C)
    best = np.empty(C, np.float32)
    bidx = np.empty(C, np.int8)
    for i in range(n):
        for pi in range(PH):
            for pj in range(PW):
                r0 = u8(((i * oh + pi * s) * ow + pj * s) * C)
                if C < 16:
                    for c in range(C):
                        bv = zf[r0 + u8(c)]
                        bi = 0
                        for ki in range(k):
                            for kj in range(k):
                                v = zf[u8(((i * oh + pi * s + ki) * ow + pj * s + kj) * C + c)]
                                if v > bv:
                                    bv = v
                                    bi = ki * k + kj
                        v = bv + b[c]
                        if relu and not v > _F0:
                            out[i, pi, pj, c] = _F0
                            arg[i, pi, pj, c] = -1
                        else:
                            out[i, pi, pj, c] = v
                            arg[i, pi, pj, c] = bi
                    continue
                for c in range(uc):
                    best[c] = zf[r0 + c]
                    bidx[c] = 0
                for ki in range(k):
                    for kj in range(k):
                        if ki == 0 and kj == 0:
                            continue
                        r = u8(((i * oh + pi * s + ki) * ow + pj * s + kj) * C)
                        pos = np.int8(ki * k + kj)
                        for c in range(uc):
                            v = zf[r + c]
                            if v > best[c]:
                                best[c] = v
                                bidx[c] = pos
                for c in range(C):
                    v = best[c] + b[c]
                    if relu and not v > _F0:
                        out[i, pi, pj, c] = _F0
                        arg[i, pi, pj, c] = -1
                    else:
                        out[i, pi, pj, c] = v
                        arg[i, pi, pj, c] = bidx[c]


@njit(cache=True)
def pool_backward(dout: np.ndarray, arg: np.ndarray, k: int, s: int, oh: int, ow: int, dz: np.ndarray,
                  db: np.ndarray) -> None:
    """Adjoint of :func:`bias_act_pool`: route ``dout`` to each window's max.

    ``dz`` (n*oh*ow, C) is overwritten: zero except at the maxima. When the
    windows tile the image exactly (the usual 2x2/2 on even sizes) every
    element is written once and no separate zeroing pass is needed;
    overlapping windows (``s < k``) accumulate. ``db += `` the per-channel sum
    of the routed gradient (the fused bias's gradient).
    """
    n, PH, PW, C = dout.shape
    zf = dz.reshape(-1)
    overlap = s < k
    if overlap or PH * k != oh or PW * k != ow:
        zf[:] = _F0
    acc = np.zeros(C, np.float64)
    gl = np.empty(C, np.float32)
    al = np.empty(C, np.int8)
    uc = u8(C)
    for i in range(n):
        for pi in range(PH):
            for pj in range(PW):
                if C < 16 and not overlap:  # few channels: scalar, no staging arrays
                    for c in range(C):
                        a = arg[i, pi, pj, c]
                        g = dout[i, pi, pj, c]
                        if a >= 0:
                            acc[c] += g
                        for ki in range(k):
                            for kj in range(k):
                                r = u8(((i * oh + pi * s + ki) * ow + pj * s + kj) * C + c)
                                zf[r] = g if a == ki * k + kj else _F0
                    continue
                for c in range(C):
                    a = arg[i, pi, pj, c]
                    g = dout[i, pi, pj, c]
                    al[c] = a
                    gl[c] = g
                    if a >= 0:
                        acc[c] += g
                for ki in range(k):
                    for kj in range(k):
                        pos = np.int8(ki * k + kj)
                        base = u8(((i * oh + pi * s + ki) * ow + pj * s + kj) * C)
                        if overlap:
                            for c in range(uc):
                                if al[c] == pos:
                                    zf[base + c] += gl[c]
                        else:
                            for c in range(uc):
                                zf[base + c] = gl[c] if al[c] == pos else _F0
    for c in range(C):
        db[c] += acc[c]


# ---------------------------------------------------------------- dropout


@njit(cache=True)
def _mix64(z):
    """splitmix64 finaliser: a good 64-bit hash, cheap and vectorisable."""
    always_inline()
    z = (z ^ (z >> u8(30))) * u8(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> u8(27))) * u8(0x94D049BB133111EB)
    return z ^ (z >> u8(31))


@njit(cache=True, fastmath=_FM)
def dropout_forward(x: np.ndarray, p: float, seed: np.uint64, keep: np.ndarray) -> None:
    """In place inverted dropout on contiguous ``x``; ``keep`` (uint8) records the mask.

    The mask bit of element ``t`` is a hash of ``(seed, t)``: a pure function
    of the step seed, so a worker, the simulator and a test replaying the same
    seed drop the same units, with no RNG state to carry around.
    """
    xf = x.reshape(-1)
    kf = keep.reshape(-1)
    thr = u8(p * 16777216.0 + 0.5)  # keep iff 24-bit uniform >= p
    scale = np.float32(1.0 / (1.0 - p))
    key = _mix64(u8(seed) * u8(0x9E3779B97F4A7C15) + u8(0x632BE59BD9B4E019))
    for t in range(u8(xf.size)):
        h = _mix64(key + t * u8(0x9E3779B97F4A7C15)) >> u8(40)
        if h >= thr:
            kf[t] = 1
            xf[t] *= scale
        else:
            kf[t] = 0
            xf[t] = _F0


@njit(cache=True, fastmath=_FM)
def dropout_backward(dx: np.ndarray, keep: np.ndarray, p: float) -> None:
    """In place: ``dx *= keep / (1 - p)``."""
    df = dx.reshape(-1)
    kf = keep.reshape(-1)
    scale = np.float32(1.0 / (1.0 - p))
    for t in range(u8(df.size)):
        df[t] = df[t] * scale if kf[t] else _F0


# ---------------------------------------------------------------- loss


@njit(cache=True)
def softmax_xent(logits: np.ndarray, y: np.ndarray, dlogits: np.ndarray) -> float:
    """Mean softmax cross-entropy of (N, K) ``logits``; writes d(loss)/d(logits).

    Stable: subtracts the row max before ``exp`` and uses log-sum-exp, so huge
    logits give a finite loss instead of Inf/NaN.
    """
    N, K = logits.shape
    inv_n = np.float32(1.0 / N)
    total = 0.0
    for i in range(N):
        m = logits[i, 0]
        for j in range(1, K):
            if logits[i, j] > m:
                m = logits[i, j]
        s = 0.0
        for j in range(K):
            e = np.exp(logits[i, j] - m)
            dlogits[i, j] = e
            s += e
        total += np.log(s) + m - logits[i, y[i]]
        inv = np.float32(1.0 / s) * inv_n
        for j in range(K):
            dlogits[i, j] *= inv
        dlogits[i, y[i]] -= inv_n
    return total / N


@njit(cache=True)
def xent_sum_correct(logits: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """(sum of cross-entropy, number of correct argmax predictions) for evaluation."""
    N, K = logits.shape
    total = 0.0
    correct = 0
    for i in range(N):
        m = logits[i, 0]
        am = 0
        for j in range(1, K):
            if logits[i, j] > m:
                m = logits[i, j]
                am = j
        s = 0.0
        for j in range(K):
            s += np.exp(logits[i, j] - m)
        total += np.log(s) + m - logits[i, y[i]]
        if am == y[i]:
            correct += 1
    return total, correct
