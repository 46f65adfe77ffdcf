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
* weight gradient: ``gm[(i, j, c), co] = sum_{oh, ow} x[oh + i, ow + j, c] * dz[oh, ow, co]``,
  eight consecutive ``(j, c)`` of one kernel row per tile (broadcast from
  the input), a 32-channel panel of the output gradient as the vectors,
  summed over the image's pixels (accumulating over images);
* input gradient: a convolution of the output gradient, zero-padded by
  ``k - 1`` (:func:`route_pool` and :func:`backward_plain` write it so),
  with the flipped weights (:func:`pack_flipped`), kernel rows that fall
  wholly in the padding skipped; the producing layer's ReLU derivative
  applied on the way out (``mask``).

The backward pass goes one image at a time (its padded gradient, 200 KB
for conv2, stays in L2 for both products). Everything runs in a fixed
order, so results are bit-for-bit the same run to run.

Conditions (:func:`supported`): stride 1, no padding, and the output
channels a multiple of the 32-column panel (16 without AVX-512): the CNN's
conv1 (one input channel) and conv2. Input channels that do not fill a
panel are padded with zero weights for the input gradient. Other convs
(LeNet's 6 and 16 channels) keep the im2col path in ``zsgd.nn.conv``.
Loops over plain memory index with unsigned integers, as in
``zsgd.kernels`` (signed indices' wrap-around checks stop LLVM's
vectoriser: the bias gradient's sums went from 0.64 to 0.20 ms).

The dense layers' two backward products (:func:`dense_backward`) use the
same tile: their operands' rows are contiguous along the inputs, so they
need no packing either.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba import uint64 as u8

from zsgd.jit import always_inline  # before any @njit: LLVM options, cache keys (see zsgd.jit)
from zsgd.nn.conv.tile import tile1, tile2, tile4, tile_full
from zsgd.nn.lstm_gemm import KC, MR, NR, prefer_512

_FM = {"reassoc", "contract", "nsz", "arcp"}
_F0 = np.float32(0.0)


def supported(cout: int, stride: int, pad: int) -> bool:
    """Whether the direct kernels handle a conv of this shape (else: im2col)."""
    return stride == 1 and pad == 0 and cout % NR == 0


def panels(c: int) -> int:
    """Panels of NR columns that hold ``c`` channels."""
    return -(-c // NR)


def pack_weight(w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """(Cout, C, kh, kw) -> ``out`` (Cout / NR, kh*kw*C, NR): panels of output channels, k in im2col order."""
    co, c, kh, kw = w.shape
    np.copyto(out.reshape(co // NR, kh, kw, c, NR), w.reshape(co // NR, NR, c, kh, kw).transpose(0, 3, 4, 2, 1))
    return out


def pack_flipped(w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """(Cout, C, kh, kw) -> ``out`` (panels(C), kh*kw*Cout, NR): the input gradient's weights, kernel flipped.

    Input channels past C (the last panel's padding) get zero weights.
    """
    co, c, kh, kw = w.shape
    p = out.shape[0]
    if c != p * NR:
        wz = np.zeros((co, p * NR, kh, kw), np.float32)
        wz[:, :c] = w
        w = wz
    np.copyto(out.reshape(p, kh, kw, co, NR), w[:, :, ::-1, ::-1].reshape(co, p, NR, kh, kw).transpose(1, 3, 4, 0, 2))
    return out


def gemm_to_weight(gm: np.ndarray, gw: np.ndarray) -> None:
    """(kh*kw*C, Cout) weight gradient -> PyTorch (Cout, C, kh, kw) ``gw`` (overwritten)."""
    co, c, kh, kw = gw.shape
    np.copyto(gw, gm.reshape(kh, kw, c, co).transpose(3, 2, 0, 1))


@njit(cache=True, error_model="numpy")
def _rows(a, b, c, a0, ars, ak1, ak2, b0, bk1, bk2, c0, crs, n1, n2, acc, m):
    """``m`` result rows from ``a0``/``c0`` on: tiles of MR, then 4, 2, 1 rows."""
    always_inline()
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
def _weight_grad(x: np.ndarray, s: int, d: np.ndarray, d0: int, drs: int, oh: int, ow: int, kh: int, kw: int,
                 gm: np.ndarray, acc: int) -> None:
    """``gm[(i, j, c), co] (+)= sum_{y < oh, v < ow} x[s, y + i, v + j, c] * d[d0 + y * drs + v * Cout + co]``.

    ``d`` is image ``s``'s output gradient, flat, rows ``drs`` floats apart
    (in place or inside the padded buffer). Tile rows are ``(j, c)`` of one
    kernel row (eight consecutive input floats broadcast), columns a panel
    of output channels.
    """
    always_inline()
    n, H, W, C = x.shape
    cout = gm.shape[1]
    xf, gf = x.reshape(-1), gm.reshape(-1)
    for i in range(kh):
        for p in range(cout // NR):
            _rows(xf, d, gf, ((s * H + i) * W) * C, 1, C, W * C, d0 + p * NR, cout, drs,
                  i * kw * C * cout + p * NR, cout, ow, oh, acc, kw * C)


@njit(cache=True, error_model="numpy")
def _input_grad(x: np.ndarray, s: int, dzp: np.ndarray, kh: int, kw: int, wq: np.ndarray, dx: np.ndarray,
                mask: bool, tmp: np.ndarray) -> None:
    """Image ``s``'s input gradient: the zero-bordered ``dzp`` convolved with the flipped weights ``wq``.

    Kernel rows that fall wholly in the border are skipped. When C is not
    a whole number of panels the tiles write ``tmp`` (H*W, panels * NR) and
    the C real channels are copied out. Times ``x > 0`` when ``mask``.
    """
    always_inline()
    n, H, W, C = x.shape
    HP, WP, cout = dzp.shape
    OH = HP - 2 * (kh - 1)
    P, KQ = wq.shape[0], wq.shape[1]
    df, wf, xf = dzp.reshape(-1), wq.reshape(-1), x.reshape(-1)
    whole = C == P * NR
    out = dx.reshape(-1) if whole else tmp.reshape(-1)
    base = s * H * W * C if whole else 0
    ld = C if whole else P * NR
    for p in range(P):
        for y in range(H):
            lo = max(0, kh - 1 - y)
            hi = min(kh, kh - 1 + OH - y)
            _rows(df, wf, out, (y + lo) * WP * cout, cout, 1, WP * cout, p * KQ * NR + lo * kw * cout * NR,
                  NR, kw * cout * NR, base + y * W * ld + p * NR, ld, kw * cout, hi - lo, 0, W)
    if not whole:
        for e in range(H * W):
            for c in range(C):
                dx[s, e // W, e % W, c] = tmp[e, c]
    if mask:
        xo = dx.reshape(-1)
        b0 = u8(s * H * W * C)
        for e in range(u8(H * W * C)):
            if not xf[b0 + e] > _F0:
                xo[b0 + e] = _F0


@njit(cache=True, fastmath=_FM, error_model="numpy")
def route_pool(dout: np.ndarray, arg: np.ndarray, s: int, k: int, st: int, oh: int, ow: int, kh: int, kw: int,
               dzp: np.ndarray, db: np.ndarray) -> None:
    """Image ``s`` of the max-pool's adjoint into the interior of the zero-bordered ``dzp``.

    Same routing as ``zsgd.kernels.pool_backward`` (``arg``: window
    position of the max, -1 where the ReLU zeroed it); ``db`` (float64)
    accumulates the routed gradient's channel sums (the bias gradient).
    """
    always_inline()
    _, PH, PW, C = dout.shape
    WP = dzp.shape[1]
    y0, x0 = kh - 1, kw - 1
    overlap = st < k
    if overlap or PH * k != oh or PW * k != ow:
        for y in range(oh):
            for xx in range(ow):
                for c in range(C):
                    dzp[y0 + y, x0 + xx, c] = _F0
    pf = dzp.reshape(-1)
    g = np.empty(C, np.float32)
    a = np.empty(C, np.int8)
    uc = u8(C)
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
                    r0 = u8(((y0 + pi * st + ki) * WP + x0 + pj * st + kj) * C)
                    if overlap:
                        for c in range(uc):
                            if a[c] == pos:
                                pf[r0 + c] += g[c]
                    else:
                        for c in range(uc):
                            pf[r0 + c] = g[c] if a[c] == pos else _F0


@njit(cache=True, error_model="numpy")
def backward_pooled(x: np.ndarray, dout: np.ndarray, arg: np.ndarray, k: int, st: int, kh: int, kw: int,
                    dzp: np.ndarray, gm: np.ndarray, wq: np.ndarray, dx: np.ndarray, mask: bool,
                    db: np.ndarray, tmp: np.ndarray) -> None:
    """Gradients of a direct conv + ReLU + max-pool over the batch, one image at a time.

    ``dout`` (N, PH, PW, Cout), any strides, is routed through ``arg`` into
    the zero-bordered ``dzp`` (OH + 2(kh-1), OW + 2(kw-1), Cout), which both
    products then read. ``gm`` (kh*kw*C, Cout) and ``db`` (float64) are
    overwritten with the weight and bias gradients; ``dx`` (N, H, W, C)
    gets the input gradient unless it is empty (shape (0, ...)).
    """
    prefer_512()
    HP, WP, cout = dzp.shape
    oh, ow = HP - 2 * (kh - 1), WP - 2 * (kw - 1)
    db[:] = 0.0
    d0 = ((kh - 1) * WP + (kw - 1)) * cout
    df = dzp.reshape(-1)
    for s in range(x.shape[0]):
        route_pool(dout, arg, s, k, st, oh, ow, kh, kw, dzp, db)
        _weight_grad(x, s, df, d0, WP * cout, oh, ow, kh, kw, gm, 1 if s > 0 else 0)
        if dx.shape[0] > 0:
            _input_grad(x, s, dzp, kh, kw, wq, dx, mask, tmp)


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _colsum(d: np.ndarray, b0: int, rows: int, db: np.ndarray) -> None:
    """``db += `` the channel sums of ``rows`` rows of ``d`` from ``b0`` on (unsigned indices: vectorised)."""
    always_inline()
    uc = u8(db.shape[0])
    for r in range(rows):
        base = u8(b0 + r * db.shape[0])
        for c in range(uc):
            db[c] += d[base + c]


@njit(cache=True, error_model="numpy")
def backward_plain(x: np.ndarray, dz: np.ndarray, kh: int, kw: int, dzp: np.ndarray, gm: np.ndarray,
                   wq: np.ndarray, dx: np.ndarray, mask: bool, db: np.ndarray, tmp: np.ndarray) -> None:
    """:func:`backward_pooled` for an unpooled conv: ``dz`` (N, OH, OW, Cout) C-contiguous, ReLU-masked.

    The weight gradient reads ``dz`` in place; only the input gradient
    needs it copied into the zero-bordered ``dzp``.
    """
    prefer_512()
    n, oh, ow, cout = dz.shape
    db[:] = 0.0
    df = dz.reshape(-1)
    pf = dzp.reshape(-1)
    WP = dzp.shape[1]
    for s in range(n):
        b0 = s * oh * ow * cout
        _colsum(df, b0, oh * ow, db)
        _weight_grad(x, s, df, b0, ow * cout, oh, ow, kh, kw, gm, 1 if s > 0 else 0)
        if dx.shape[0] > 0:
            for y in range(oh):
                r0, q0 = u8(((kh - 1 + y) * WP + kw - 1) * cout), u8(b0 + y * ow * cout)
                for e in range(u8(ow * cout)):
                    pf[r0 + e] = df[q0 + e]
            _input_grad(x, s, dzp, kh, kw, wq, dx, mask, tmp)


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


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _pack_batch(x: np.ndarray, xp: np.ndarray) -> None:
    """``xp[p, k, j] = x[p * NR + j, k]``, zero past the batch: 16 columns at a time, so the reads stay in L1."""
    always_inline()
    M, F = x.shape
    for p in range(xp.shape[0]):
        for k0 in range(0, F, 16):
            k1 = min(F, k0 + 16)
            for j in range(NR):
                m = p * NR + j
                if m < M:
                    src = x[m]
                    for k in range(k0, k1):
                        xp[p, k, j] = src[k]
                else:
                    for k in range(k0, k1):
                        xp[p, k, j] = _F0


@njit(cache=True, error_model="numpy")
def dense_forward(x: np.ndarray, w: np.ndarray, xp: np.ndarray, ot: np.ndarray) -> None:
    """``ot[:, :M] = w @ x.T``: ``x`` (M, F), ``w`` (O, F), ``xp`` (panels(M), F, NR), ``ot`` (O, panels(M) * NR).

    Both operands are contiguous along F, the reduction, so one has to be
    repacked: the batch (``x``, 0.17 ms for the cnn's fc1, half the size of
    its weights), into panels of NR samples. The tile's rows are outputs
    (weights broadcast), its vectors samples; F runs in blocks of KC so a
    panel block (32 KB) stays in L1 while every row of ``w`` uses it.
    Columns of ``ot`` past M are the zero padding's products (zeros).
    """
    prefer_512()
    M, F = x.shape
    O = w.shape[0]
    P = xp.shape[0]
    _pack_batch(x, xp)
    wf, bf, of = w.reshape(-1), xp.reshape(-1), ot.reshape(-1)
    for k0 in range(0, max(F, 1), KC):
        n = min(KC, F - k0)
        for p in range(P):
            _rows(wf, bf, of, k0, F, 1, 0, p * F * NR + k0 * NR, NR, 0, p * NR, P * NR, n, 1, 1 if k0 > 0 else 0, O)
