"""Convolution and dense layers: zsgd's register tile where the shape allows, im2col + sgemm elsewhere.

**Direct kernels** (``zsgd.nn.conv.direct``, the tile in
``zsgd.nn.conv.tile``): a stride-1, unpadded conv whose output channels
fill 32-column panels (the MNIST CNN's conv1 and conv2) skips im2col and
numpy's sgemm altogether. The tile reads the input, the output gradient
and weights packed once per call in place, at 217-234 GFLOP/s on one Zen 5
core (its FMA peak is about 236) against OpenBLAS's 79-90 there (the
environment pins it to its AVX2 kernels); the backward pass needs no
col2im. Dense layers whose inputs fill panels (the CNN's fc1) use the same
tile. :class:`ConvBuffers` picks the path (``direct=False`` forces im2col,
which the tests use as the reference); the two agree to float32 rounding.

**The im2col path** (LeNet-5's 6- and 16-channel convs, strides,
padding): every multiply-accumulate goes through numpy's ``@`` on
contiguous float32 and numba only moves data (``zsgd.kernels``). A
convolution is processed **a few samples at a time** (``chunk``) so the
im2col buffer (``OH*OW*kh*kw*C`` floats per sample, 650 KB for the MNIST
CNN's second conv) stays in L2 between the im2col pass and the sgemm that
reads it (1.5x faster than one batch-wide im2col on the Zen 4 test box,
whose 42 MB buffer round-trips through DRAM). The backward pass recomputes
im2col per chunk instead of storing it, which is cheaper than reading it
back from memory.

Weights keep PyTorch's layouts inside the flat parameter vector; a conv's
(Cout, Cin, kh, kw) weight is copied to the sgemm or panel layout once per
call (18 K floats for conv2: noise next to the product).

The ``*_nchw`` functions at the bottom are the small, allocate-as-you-go
NCHW API used by tests and by anyone who wants one kernel on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zsgd import kernels as K
from zsgd.errors import ZsgdError
from zsgd.nn.conv import direct as D
from zsgd.nn.lstm_gemm import NR

#: im2col bytes per chunk; 2 MiB keeps a chunk's columns in L2 (measured:
#: 1-4 samples of the CNN's conv2 are all within 3% of each other).
CHUNK_BYTES = 2 << 20


@dataclass(frozen=True)
class ConvGeom:
    """Per-sample shapes of one conv (+ optional max-pool) layer."""

    c: int
    h: int
    w: int
    cout: int
    kh: int
    kw: int
    stride: int = 1
    pad: int = 0
    pool: int = 0  # 0: no pooling; else window size
    pool_stride: int = 0

    @property
    def oh(self) -> int:
        return K.conv_out_size(self.h, self.kh, self.stride, self.pad)

    @property
    def ow(self) -> int:
        return K.conv_out_size(self.w, self.kw, self.stride, self.pad)

    @property
    def ph(self) -> int:
        return K.conv_out_size(self.oh, self.pool, self.pool_stride, 0) if self.pool else self.oh

    @property
    def pw(self) -> int:
        return K.conv_out_size(self.ow, self.pool, self.pool_stride, 0) if self.pool else self.ow

    @property
    def k(self) -> int:
        """Inner dimension of the sgemm: one im2col row."""
        return self.kh * self.kw * self.c

    @property
    def out_shape(self) -> tuple[int, int, int]:
        """Per-sample output (H, W, C) after conv and pooling."""
        return (self.ph, self.pw, self.cout)

    def chunk(self, n: int) -> int:
        """Samples per im2col chunk (>= 1, <= n)."""
        per = self.oh * self.ow * self.k * 4
        return max(1, min(n, CHUNK_BYTES // max(per, 1)))


def weight_to_gemm(w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """(Cout, Cin, kh, kw) PyTorch weight -> ``out`` (kh*kw*Cin, Cout) in im2col column order."""
    cout = w.shape[0]
    np.copyto(out.reshape(w.shape[2], w.shape[3], w.shape[1], cout), w.transpose(2, 3, 1, 0))
    return out


def gemm_grad_to_weight(gt: np.ndarray, gw: np.ndarray) -> None:
    """(Cout, kh*kw*Cin) gradient -> PyTorch (Cout, Cin, kh, kw) ``gw`` (overwritten)."""
    co, ci, kh, kw = gw.shape
    np.copyto(gw, gt.reshape(co, kh, kw, ci).transpose(0, 3, 1, 2))


_NO_TMP = np.empty((0, 0), np.float32)


class ConvBuffers:
    """Scratch buffers for one conv layer at one chunk size (reused across calls).

    ``direct``: use the direct kernels (default: whenever
    :func:`zsgd.nn.conv.direct.supported` says the shape allows).
    """

    def __init__(self, g: ConvGeom, chunk: int, direct: bool | None = None):
        if direct is None:
            direct = D.supported(g.cout, g.stride, g.pad)
        self.direct = direct
        rows = chunk * g.oh * g.ow
        self.z = np.empty((rows, g.cout), np.float32)
        self.chunk = chunk
        if direct:
            self.wp = np.empty((g.cout // NR, g.k, NR), np.float32)
            self.gm = np.empty((g.k, g.cout), np.float32)
            self.db = np.empty(g.cout, np.float64)
            self.dzp: np.ndarray | None = None  # allocated by the first backward, as are the two below
            self.wq: np.ndarray | None = None
            self.tmp = _NO_TMP
            return
        self.gt = np.empty((g.cout, g.k), np.float32)
        self.cols = np.empty((rows, g.k), np.float32)
        self.dcols: np.ndarray | None = None  # allocated by the first backward (not needed to predict)
        self.wm = np.empty((g.k, g.cout), np.float32)
        self.gt_tmp = np.empty((g.cout, g.k), np.float32)


def conv_forward(
    g: ConvGeom, x: np.ndarray, w: np.ndarray, b: np.ndarray, relu: bool,
    out: np.ndarray, arg: np.ndarray | None, buf: ConvBuffers,
) -> None:
    """Conv + bias + optional ReLU (+ max-pool when ``g.pool``) of NHWC ``x``.

    ``out``: (N, PH, PW, Cout) array of any strides when pooling (``arg`` the
    same shape, int8), else a C-contiguous (N, OH, OW, Cout) array.
    """
    n = x.shape[0]
    wm = D.pack_weight(w, buf.wp) if buf.direct else weight_to_gemm(w, buf.wm)
    p = g.oh * g.ow
    ch = buf.chunk
    for n0 in range(0, n, ch):
        n1 = min(n, n0 + ch)
        rows = (n1 - n0) * p
        z = buf.z[:rows] if g.pool else out[n0:n1].reshape(rows, g.cout)
        if buf.direct:
            D.forward(np.ascontiguousarray(x[n0:n1]), wm, g.kh, g.kw, z)
        else:
            cols = buf.cols[:rows]
            K.im2col_nhwc(x[n0:n1], g.kh, g.kw, g.stride, g.stride, g.pad, g.pad, cols)
            np.matmul(cols, wm, out=z)
        if g.pool:
            K.bias_act_pool(z, b, relu, n1 - n0, g.oh, g.ow, g.pool, g.pool_stride, out[n0:n1], arg[n0:n1])
        else:
            K.bias_act_rows(z, b, relu)


def conv_backward(
    g: ConvGeom, x: np.ndarray, w: np.ndarray, relu: bool, out: np.ndarray, arg: np.ndarray | None,
    dout: np.ndarray, premasked: bool, gw: np.ndarray, gb: np.ndarray,
    dx: np.ndarray | None, mask_dx: bool, buf: ConvBuffers,
) -> None:
    """Gradients of :func:`conv_forward`.

    ``dout`` is d(loss)/d(out) (already ReLU-masked if ``premasked``; it is
    modified in place when unpooled). Writes ``gw`` (PyTorch layout) and ``gb``;
    if ``dx`` is given, writes d(loss)/d(x) there, times ``x > 0`` when
    ``mask_dx`` (the producing layer's ReLU, fused into col2im or the direct input gradient). Skipping
    ``dx`` for the first layer saves a third of its cost.
    """
    if not g.pool and relu and not premasked:
        K.relu_backward(dout, out)
    if buf.direct:
        _direct_backward(g, x, w, arg, dout, gw, gb, dx, mask_dx, buf)
        return
    n = x.shape[0]
    wm = weight_to_gemm(w, buf.wm)
    p = g.oh * g.ow
    ch = buf.chunk
    gb[:] = 0.0
    first = True
    for n0 in range(0, n, ch):
        n1 = min(n, n0 + ch)
        rows = (n1 - n0) * p
        if g.pool:
            dz = buf.z[:rows]
            K.pool_backward(dout[n0:n1], arg[n0:n1], g.pool, g.pool_stride, g.oh, g.ow, dz, gb)
        else:
            dz = dout[n0:n1].reshape(rows, g.cout)
            K.colsum_add(dz, gb)
        cols = buf.cols[:rows]
        K.im2col_nhwc(x[n0:n1], g.kh, g.kw, g.stride, g.stride, g.pad, g.pad, cols)
        if first:
            np.matmul(dz.T, cols, out=buf.gt)
            first = False
        else:
            np.matmul(dz.T, cols, out=buf.gt_tmp)
            buf.gt += buf.gt_tmp
        if dx is not None:
            if buf.dcols is None:
                buf.dcols = np.empty_like(buf.cols)
            dcols = buf.dcols[:rows]
            np.matmul(dz, wm.T, out=dcols)
            K.col2im_nhwc(dcols, g.kh, g.kw, g.stride, g.stride, g.pad, g.pad, x[n0:n1], mask_dx, dx[n0:n1])
    gemm_grad_to_weight(buf.gt, gw)


def _direct_backward(g: ConvGeom, x: np.ndarray, w: np.ndarray, arg: np.ndarray | None, dout: np.ndarray,
                     gw: np.ndarray, gb: np.ndarray, dx: np.ndarray | None, mask_dx: bool, buf: ConvBuffers) -> None:
    """:func:`conv_backward` through the direct kernels (``dout`` already ReLU-masked when unpooled)."""
    if buf.dzp is None:  # the zero border is written once; each image overwrites the interior
        buf.dzp = np.zeros((g.oh + 2 * (g.kh - 1), g.ow + 2 * (g.kw - 1), g.cout), np.float32)
    if dx is not None and buf.wq is None:
        p = D.panels(g.c)
        buf.wq = np.empty((p, g.kh * g.kw * g.cout, NR), np.float32)
        if g.c % NR:
            buf.tmp = np.empty((g.h * g.w, p * NR), np.float32)
    x = np.ascontiguousarray(x)
    wq = D.pack_flipped(w, buf.wq) if dx is not None else buf.wp[:0]
    dxa = dx if dx is not None else x[:0]
    if g.pool:
        D.backward_pooled(x, dout, arg, g.pool, g.pool_stride, g.kh, g.kw, buf.dzp, buf.gm, wq, dxa, mask_dx,
                          buf.db, buf.tmp)
    else:
        D.backward_plain(x, np.ascontiguousarray(dout), g.kh, g.kw, buf.dzp, buf.gm, wq, dxa, mask_dx,
                         buf.db, buf.tmp)
    gb[:] = buf.db
    D.gemm_to_weight(buf.gm, gw)


def _contiguous(*arrays: np.ndarray | None) -> bool:
    """Whether every array given is C-contiguous (the tile's kernels index them flat)."""
    return all(a is None or a.flags.c_contiguous for a in arrays)


def dense_scratch(n: int, n_in: int, n_out: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Shapes of :func:`dense_forward`'s ``xp`` and ``ot`` for a batch of ``n``, or None: BLAS does it."""
    if not D.dense_supported(n_in):
        return None
    p = D.panels(n)
    return (p, n_in, NR), (n_out, p * NR)


def dense_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, relu: bool, out: np.ndarray,
                  xp: np.ndarray | None = None, ot: np.ndarray | None = None) -> None:
    """``out = act(x @ w.T + b)``; ``w`` is PyTorch's (out, in).

    With scratch ``xp`` and ``ot`` (shapes from :func:`dense_scratch`) the
    product runs through the tile (``zsgd.nn.conv.direct.dense_forward``),
    else through BLAS, which uses ``w`` transposed without a copy.
    """
    if xp is not None and ot is not None and _contiguous(x, w):
        D.dense_forward(x, w, xp, ot)
        np.copyto(out, ot[:, :x.shape[0]].T)
    else:
        np.matmul(x, w.T, out=out)
    K.bias_act_rows(out, b, relu)


def dense_backward(
    x: np.ndarray, w: np.ndarray, relu: bool, out: np.ndarray, dout: np.ndarray,
    gw: np.ndarray, gb: np.ndarray, dx: np.ndarray | None,
) -> None:
    """Gradients of :func:`dense_forward`; ``dout`` is ReLU-masked in place."""
    if relu:
        K.relu_backward(dout, out)
    if D.dense_supported(x.shape[1]) and _contiguous(x, dout, w, gw, dx):
        D.dense_backward(x, dout, w, gw, dx if dx is not None else x[:0])
    else:
        np.matmul(dout.T, x, out=gw)
        if dx is not None:
            np.matmul(dout, w, out=dx)
    gb[:] = 0.0
    K.colsum_add(dout, gb)


# ---------------------------------------------------------------- NCHW convenience API


def _f32(a: np.ndarray, name: str, ndim: int) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim != ndim:
        raise ZsgdError(f"{name} must be {ndim}-D, got shape {a.shape}: reshape it")
    return a


def conv2d_nchw(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int = 1, padding: int = 0,
                relu: bool = False) -> np.ndarray:
    """PyTorch ``conv2d`` (+ optional ReLU): NCHW in, NCHW out, float32."""
    x, w = _f32(x, "x", 4), _f32(w, "weight", 4)
    b = _f32(b, "bias", 1)
    if x.shape[1] != w.shape[1] or b.shape[0] != w.shape[0]:
        raise ZsgdError(f"conv2d: x {x.shape}, weight {w.shape}, bias {b.shape} do not match")
    g = ConvGeom(x.shape[1], x.shape[2], x.shape[3], w.shape[0], w.shape[2], w.shape[3], stride, padding)
    if g.oh < 1 or g.ow < 1:
        raise ZsgdError(f"conv2d: input {x.shape[2:]} smaller than kernel {w.shape[2:]}")
    out = np.empty((x.shape[0], g.oh, g.ow, g.cout), np.float32)
    conv_forward(g, np.ascontiguousarray(x.transpose(0, 2, 3, 1)), w, b, relu, out, None,
                 ConvBuffers(g, g.chunk(x.shape[0])))
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def conv2d_backward_nchw(x: np.ndarray, w: np.ndarray, dy: np.ndarray, stride: int = 1,
                         padding: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dw, db) of a plain conv2d (no activation) for output gradient ``dy``."""
    x, w, dy = _f32(x, "x", 4), _f32(w, "weight", 4), _f32(dy, "dy", 4)
    g = ConvGeom(x.shape[1], x.shape[2], x.shape[3], w.shape[0], w.shape[2], w.shape[3], stride, padding)
    if dy.shape != (x.shape[0], g.cout, g.oh, g.ow):
        raise ZsgdError(f"conv2d backward: dy has shape {dy.shape}, expected {(x.shape[0], g.cout, g.oh, g.ow)}")
    xh = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    dyh = np.ascontiguousarray(dy.transpose(0, 2, 3, 1))
    dx = np.empty_like(xh)
    dw = np.empty_like(w)
    db = np.empty(g.cout, np.float32)
    conv_backward(g, xh, w, False, dyh, None, dyh, True, dw, db, dx, False, ConvBuffers(g, g.chunk(x.shape[0])))
    return np.ascontiguousarray(dx.transpose(0, 3, 1, 2)), dw, db


def maxpool2d_nchw(x: np.ndarray, k: int = 2, stride: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch ``max_pool2d`` (floor mode): returns (y NCHW, argmax positions for the backward)."""
    x = _f32(x, "x", 4)
    s = stride or k
    n, c, h, w = x.shape
    oh, ow = K.conv_out_size(h, k, s, 0), K.conv_out_size(w, k, s, 0)
    if oh < 1 or ow < 1 or not 1 <= k <= 11:
        raise ZsgdError(f"maxpool2d: window {k} does not fit input {h}x{w} (or is over 11)")
    z = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(-1, c)
    y = np.empty((n, oh, ow, c), np.float32)
    arg = np.empty((n, oh, ow, c), np.int8)
    K.bias_act_pool(z, np.zeros(c, np.float32), False, n, h, w, k, s, y, arg)
    return np.ascontiguousarray(y.transpose(0, 3, 1, 2)), arg


def maxpool2d_backward_nchw(dy: np.ndarray, arg: np.ndarray, x_shape: tuple[int, int, int, int],
                            k: int = 2, stride: int | None = None) -> np.ndarray:
    """d(loss)/d(x) of :func:`maxpool2d_nchw` given d(loss)/d(y)."""
    s = stride or k
    n, c, h, w = x_shape
    dyh = np.ascontiguousarray(_f32(dy, "dy", 4).transpose(0, 2, 3, 1))
    dz = np.empty((n * h * w, c), np.float32)
    K.pool_backward(dyh, arg, k, s, h, w, dz, np.zeros(c, np.float32))
    return np.ascontiguousarray(dz.reshape(n, h, w, c).transpose(0, 3, 1, 2))
