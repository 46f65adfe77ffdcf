"""Direct convolution kernels: the three products of a stride-1, unpadded conv without im2col.

Why: on one core, a conv layer through im2col + numpy's sgemm spends its
time in OpenBLAS (which the environment may pin to AVX2 kernels: 79
GFLOP/s for conv2's shape on the Zen 5 test VM) and in the im2col/col2im
passes over a buffer nine times the input. Here the register tile of
``zsgd.nn.conv.tile`` reads the input, the output gradient and the packed
weights in place:

* forward: ``z[pixel, co] = sum_{i, (j, c)} x[oh + i, ow + j, c] * w[co, c, i, j]``,
  eight pixels of one output row per tile, one 32-channel panel of packed
  weights per pass (36 KB for conv2, in L1);
* weight gradient: ``gt[co, (i, j, c)] = sum_{oh, ow} dz[oh, ow, co] * x[oh + i, ow + j, c]``,
  eight output channels per tile, 32 consecutive ``(j, c)`` of one kernel
  row per panel, summed over the image's pixels (accumulating over images);
* input gradient: a convolution of the output gradient, zero-padded by
  ``k - 1`` (:func:`route_pool`, :func:`route_plain` write it so), with the
  flipped weights (``pack_flipped``), kernel rows that fall wholly in the
  padding skipped; the producing layer's ReLU derivative applied on the way
  out (``mask``).

The backward pass goes one image at a time (its padded gradient, 200 KB
for conv2, stays in L2 for both products). Everything runs in a fixed
order, so results are bit-for-bit the same run to run.

Conditions (checked by :func:`supported`): stride 1, no padding, and the
output channels, one kernel row's ``kw * C`` and (for the input gradient)
the input channels multiples of the 32-column panel (16 without AVX-512).
Other convs keep the im2col path in ``zsgd.nn.conv``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from zsgd.nn.conv.tile import tile1, tile2, tile4, tile_full
from zsgd.nn.lstm_gemm import MR, NR, prefer_512

_FM = {"reassoc", "contract", "nsz", "arcp"}
_F0 = np.float32(0.0)


def supported(c: int, cout: int, kw: int, stride: int, pad: int, need_dx: bool) -> bool:
    """Whether the direct kernels handle a conv of this shape (else: im2col)."""
    return stride == 1 and pad == 0 and cout % NR == 0 and (kw * c) % NR == 0 and (not need_dx or c % NR == 0)


def pack_weight(w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """(Cout, C, kh, kw) -> ``out`` (Cout / NR, kh*kw*C, NR): panels of output channels, k in im2col order."""
    co, c, kh, kw = w.shape
    np.copyto(out.reshape(co // NR, kh, kw, c, NR), w.reshape(co // NR, NR, c, kh, kw).transpose(0, 3, 4, 2, 1))
    return out


def pack_flipped(w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """(Cout, C, kh, kw) -> ``out`` (C / NR, kh*kw*Cout, NR): the input gradient's weights, kernel flipped."""
    co, c, kh, kw = w.shape
    np.copyto(out.reshape(c // NR, kh, kw, co, NR),
              w[:, :, ::-1, ::-1].reshape(co, c // NR, NR, kh, kw).transpose(1, 3, 4, 0, 2))
    return out


@njit(cache=True, error_model="numpy")
def _rows(a, b, c, a0, ars, ak1, ak2, b0, bk1, bk2, c0, crs, n1, n2, acc, m):
    """``m`` result rows from ``a0``/``c0`` on: tiles of MR, then 4, 2, 1 rows."""
    i = 0
    while m - i >= MR:
        tile_full(a, b, c, a0 + i * ars, ars, ak1, ak2, b0, bk1, bk2, c0 + i * crs, crs, n1, n2, acc)
        i += MR
    if MR > 4 and m - i >= 4:
        tile4(a, b, c, a0 + i * ars, ars, ak1, ak2, b0, bk1, bk2, c0 + i * crs, crs, n1, n2, acc)
        i += 4
    if m - i >= 2:
        tile2(a, b, c, a0 + i * ars, ars, ak1, ak2, b0, bk1, bk2, c0 + i * crs, crs, n1, n2, acc)
        i += 2
    if m - i >= 1:
        tile1(a, b, c, a0 + i * ars, ars, ak1, ak2, b0, bk1, bk2, c0 + i * crs, crs, n1, n2, acc)


@njit(cache=True, error_model="numpy")
def forward(x: np.ndarray, wp: np.ndarray, kh: int, kw: int, z: np.ndarray) -> None:
    """``z`` (N*OH*OW, Cout) = the convolution of NHWC ``x`` (N, H, W, C) with packed weights ``wp``."""
    prefer_512()
    n, H, W, C = x.shape
    OH, OW = H - kh + 1, W - kw + 1
    P, K = wp.shape[0], wp.shape[1]
    cout = z.shape[1]
    xf, bf, zf = x.reshape(-1), wp.reshape(-1), z.reshape(-1)
    for s in range(n):
        for p in range(P):
            for oh in range(OH):
                _rows(xf, bf, zf, ((s * H + oh) * W) * C, C, 1, W * C, p * K * NR, NR, kw * C * NR,
                      (s * OH + oh) * OW * cout + p * NR, cout, kw * C, kh, 0, OW)


@njit(cache=True, error_model="numpy")
def backward_image(x: np.ndarray, s: int, dzp: np.ndarray, kh: int, kw: int, gt: np.ndarray, acc: int,
                   wq: np.ndarray, dx: np.ndarray, mask: bool) -> None:
    """Image ``s``'s weight gradient (into ``gt`` (Cout, kh*kw*C), added when ``acc``) and input gradient.

    ``dzp`` (OH + 2(kh-1), OW + 2(kw-1), Cout) is the image's output
    gradient inside a zero border. ``dx`` (N, H, W, C) gets image ``s``'s
    input gradient unless it is empty (shape (0, ...)); times ``x > 0``
    when ``mask``.
    """
    prefer_512()
    n, H, W, C = x.shape
    HP, WP, cout = dzp.shape
    OH, OW = HP - 2 * (kh - 1), WP - 2 * (kw - 1)
    K = kh * kw * C
    xf, df, gf = x.reshape(-1), dzp.reshape(-1), gt.reshape(-1)
    d0 = ((kh - 1) * WP + (kw - 1)) * cout
    for i in range(kh):
        for q in range(0, kw * C, NR):
            _rows(df, xf, gf, d0, 1, cout, WP * cout, ((s * H + i) * W) * C + q, C, W * C,
                  i * kw * C + q, K, OW, OH, acc, cout)
    if dx.shape[0] == 0:
        return
    wf, xo = wq.reshape(-1), dx.reshape(-1)
    KQ = wq.shape[1]
    for p in range(wq.shape[0]):
        for y in range(H):
            lo = max(0, kh - 1 - y)
            hi = min(kh, kh - 1 + OH - y)
            _rows(df, wf, xo, (y + lo) * WP * cout, cout, 1, WP * cout, p * KQ * NR + lo * kw * cout * NR,
                  NR, kw * cout * NR, ((s * H + y) * W) * C + p * NR, C, kw * cout, hi - lo, 0, W)
    if mask:
        base = s * H * W * C
        for e in range(H * W * C):
            if not xf[base + e] > _F0:
                xo[base + e] = _F0


@njit(cache=True, fastmath=_FM, error_model="numpy")
def route_pool(dout: np.ndarray, arg: np.ndarray, s: int, k: int, st: int, oh: int, ow: int, kh: int, kw: int,
               dzp: np.ndarray, db: np.ndarray) -> None:
    """Image ``s`` of the max-pool's adjoint into the interior of the zero-bordered ``dzp``.

    Same routing as ``zsgd.kernels.pool_backward`` (``arg``: window
    position of the max, -1 where the ReLU zeroed it); ``db`` (float64)
    accumulates the routed gradient's channel sums (the bias gradient).
    """
    _, PH, PW, C = dout.shape
    y0, x0 = kh - 1, kw - 1
    overlap = st < k
    if overlap or PH * k != oh or PW * k != ow:
        for y in range(oh):
            for xx in range(ow):
                for c in range(C):
                    dzp[y0 + y, x0 + xx, c] = _F0
    g = np.empty(C, np.float32)
    a = np.empty(C, np.int8)
    for pi in range(PH):
        for pj in range(PW):
            for c in range(C):
                a[c] = arg[s, pi, pj, c]
                g[c] = dout[s, pi, pj, c]
                if a[c] >= 0:
                    db[c] += g[c]
            for ki in range(k):
                for kj in range(k):
                    pos = np.int8(ki * k + kj)
                    row = dzp[y0 + pi * st + ki, x0 + pj * st + kj]
                    if overlap:
                        for c in range(C):
                            if a[c] == pos:
                                row[c] += g[c]
                    else:
                        for c in range(C):
                            row[c] = g[c] if a[c] == pos else _F0


@njit(cache=True, fastmath=_FM, error_model="numpy")
def route_plain(dz: np.ndarray, s: int, kh: int, kw: int, dzp: np.ndarray, db: np.ndarray) -> None:
    """Image ``s`` of an unpooled conv's (ReLU-masked) output gradient ``dz`` (N, OH, OW, C) into ``dzp``."""
    _, OH, OW, C = dz.shape
    for y in range(OH):
        for xx in range(OW):
            src = dz[s, y, xx]
            dst = dzp[kh - 1 + y, kw - 1 + xx]
            for c in range(C):
                dst[c] = src[c]
                db[c] += src[c]


@njit(cache=True, error_model="numpy")
def backward(x: np.ndarray, dout: np.ndarray, arg: np.ndarray, k: int, st: int, kh: int, kw: int,
             dzp: np.ndarray, gt: np.ndarray, wq: np.ndarray, dx: np.ndarray, mask: bool, db: np.ndarray) -> None:
    """Both gradients of a direct conv over the batch, one image at a time.

    ``k`` > 0: ``dout`` is the max-pool's output gradient (N, PH, PW, Cout),
    any strides, routed through ``arg``; ``k`` == 0: ``dout`` is the conv's
    own (ReLU-masked) output gradient (N, OH, OW, Cout). ``gt`` (Cout,
    kh*kw*C) is overwritten with the weight gradient, ``db`` (float64) with
    the bias gradient; ``dx`` as in :func:`backward_image`.
    """
    HP, WP, _ = dzp.shape
    oh, ow = HP - 2 * (kh - 1), WP - 2 * (kw - 1)
    db[:] = 0.0
    for s in range(x.shape[0]):
        if k > 0:
            route_pool(dout, arg, s, k, st, oh, ow, kh, kw, dzp, db)
        else:
            route_plain(dout, s, kh, kw, dzp, db)
        backward_image(x, s, dzp, kh, kw, gt, 1 if s > 0 else 0, wq, dx, mask)


# ---------------------------------------------------------------- dense layers


def dense_supported(n_in: int) -> bool:
    """Whether :func:`dense_backward` handles a dense layer with ``n_in`` inputs (whole panels)."""
    return n_in % NR == 0


@njit(cache=True, error_model="numpy")
def dense_backward(x: np.ndarray, dout: np.ndarray, w: np.ndarray, gw: np.ndarray, dx: np.ndarray) -> None:
    """``gw = dout.T @ x`` and (unless ``dx`` is empty) ``dx = dout @ w``, all C-contiguous float32.

    ``x`` (M, F), ``dout`` (M, O), ``w`` and ``gw`` (O, F), ``dx`` (M, F),
    F a multiple of NR. Both products run along F in panels of NR columns
    read in place (``x``'s and ``w``'s rows are contiguous along F, so
    neither needs packing); a panel (M or O rows of 128 bytes) stays in L1
    while every tile of rows uses it. The reductions, over the batch (M)
    and the outputs (O), are short: each tile is computed in one pass.
    """
    prefer_512()
    M, F = x.shape
    O = dout.shape[1]
    xf, df, wf, gf, of = x.reshape(-1), dout.reshape(-1), w.reshape(-1), gw.reshape(-1), dx.reshape(-1)
    grad_in = dx.shape[0] > 0
    for k0 in range(0, F, NR):
        _rows(df, xf, gf, 0, 1, O, 0, k0, F, 0, k0, F, M, 1, 0, O)
        if grad_in:
            _rows(df, wf, of, 0, O, 1, 0, k0, F, 0, k0, F, O, 1, 0, M)
