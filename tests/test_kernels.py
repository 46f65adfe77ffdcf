"""Kernels against plain numpy references, finite differences and PyTorch.

Every backward is checked by central differences of the float32 forward on a
sample of coordinates; convolution and dense layers are linear in each
argument, so those differences are exact up to rounding and the tolerance
can be tight.
"""

from __future__ import annotations

import numpy as np
import pytest

from zsgd.nn import conv as C
from zsgd import kernels as K
from zsgd.errors import ZsgdError

RNG = np.random.default_rng(1234)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def conv_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Direct float64 convolution (cross-correlation, like PyTorch)."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, wd = x.shape
    co, _, kh, kw = w.shape
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    y = np.zeros((n, co, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
            y[:, :, i, j] = np.tensordot(patch, w.astype(np.float64), axes=([1, 2, 3], [1, 2, 3]))
    return y + b[None, :, None, None]


def pool_ref(x: np.ndarray, k: int, s: int) -> np.ndarray:
    n, c, h, w = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    y = np.empty((n, c, oh, ow), x.dtype)
    for i in range(oh):
        for j in range(ow):
            y[:, :, i, j] = x[:, :, i * s:i * s + k, j * s:j * s + k].max(axis=(2, 3))
    return y


def fd_check(f, x: np.ndarray, analytic: np.ndarray, n: int = 25, eps: float = 1e-2, rtol: float = 2e-3) -> None:
    """Central differences of scalar ``f`` at ``n`` random coordinates of ``x`` vs ``analytic``."""
    flat = x.reshape(-1)
    idx = RNG.choice(flat.size, size=min(n, flat.size), replace=False)
    scale = np.abs(analytic).max() + 1e-6
    for i in idx:
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        num = (fp - fm) / (2 * eps)
        assert abs(num - analytic.reshape(-1)[i]) <= rtol * scale, (i, num, analytic.reshape(-1)[i])


CONV_CASES = [  # (n, c, h, w, cout, k, stride, pad)
    (2, 1, 7, 7, 4, 3, 1, 0),
    (2, 3, 8, 6, 5, 3, 1, 1),
    (3, 2, 9, 9, 3, 3, 2, 1),
    (1, 4, 6, 7, 2, 5, 1, 2),
    (2, 3, 5, 5, 2, 2, 2, 0),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_im2col_col2im_are_adjoint(case):
    n, c, h, w, _, k, s, p = case
    x = rand(n, h, w, c)
    oh, ow = K.conv_out_size(h, k, s, p), K.conv_out_size(w, k, s, p)
    cols = np.empty((n * oh * ow, k * k * c), np.float32)
    K.im2col_nhwc(x, k, k, s, s, p, p, cols)
    r = rand(*cols.shape)
    back = np.empty_like(x)
    K.col2im_nhwc(r, k, k, s, s, p, p, x, False, back)
    assert np.isclose(np.vdot(cols.astype(np.float64), r), np.vdot(x.astype(np.float64), back), rtol=1e-5)
    masked = np.empty_like(x)
    K.col2im_nhwc(r, k, k, s, s, p, p, x, True, masked)
    np.testing.assert_array_equal(masked, np.where(x > 0, back, 0))


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_forward_matches_direct_convolution(case):
    n, c, h, w, co, k, s, p = case
    x, wt, b = rand(n, c, h, w), rand(co, c, k, k), rand(co)
    np.testing.assert_allclose(C.conv2d_nchw(x, wt, b, s, p), conv_ref(x, wt, b, s, p), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(C.conv2d_nchw(x, wt, b, s, p, relu=True),
                               np.maximum(conv_ref(x, wt, b, s, p), 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_backward_finite_differences(case):
    n, c, h, w, co, k, s, p = case
    x, wt, b = rand(n, c, h, w), rand(co, c, k, k), rand(co)
    r = rand(*C.conv2d_nchw(x, wt, b, s, p).shape)
    dx, dw, db = C.conv2d_backward_nchw(x, wt, r, s, p)

    def loss() -> float:
        return float(np.vdot(C.conv2d_nchw(x, wt, b, s, p).astype(np.float64), r))

    fd_check(loss, x, dx)
    fd_check(loss, wt, dw)
    fd_check(loss, b, db)


def test_conv_chunking_does_not_change_results(monkeypatch):
    x, wt, b = rand(7, 3, 10, 10), rand(4, 3, 3, 3), rand(4)
    r = rand(7, 4, 10, 10)
    ref = C.conv2d_nchw(x, wt, b, 1, 1), C.conv2d_backward_nchw(x, wt, r, 1, 1)
    monkeypatch.setattr(C, "CHUNK_BYTES", 1)  # one sample per chunk
    got = C.conv2d_nchw(x, wt, b, 1, 1), C.conv2d_backward_nchw(x, wt, r, 1, 1)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, e in zip(got[1], ref[1]):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("c", [3, 20])  # scalar path for few channels, vector path for many
@pytest.mark.parametrize("k,s,h,w", [(2, 2, 8, 6), (2, 2, 9, 8), (3, 2, 9, 8), (3, 3, 9, 8), (2, 1, 5, 7)])
def test_maxpool_forward_backward(k, s, h, w, c):
    """Exact tiling, ragged edges (floor mode) and overlapping windows."""
    n = 2
    # distinct multiples of 1/8 and a power-of-two step: x +- eps is exact, no argmax flips
    x = RNG.permutation(n * c * h * w).astype(np.float32).reshape(n, c, h, w) / 8
    y, arg = C.maxpool2d_nchw(x, k, s)
    np.testing.assert_array_equal(y, pool_ref(x, k, s))
    r = rand(*y.shape)
    dx = C.maxpool2d_backward_nchw(r, arg, x.shape, k, s)
    fd_check(lambda: float(np.vdot(C.maxpool2d_nchw(x, k, s)[0].astype(np.float64), r)), x, dx, n=60, eps=2**-10)


@pytest.mark.parametrize("c", [4, 24])
def test_fused_bias_relu_pool_routes_gradient_only_through_positive_maxima(c):
    n, oh, ow = 2, 6, 6
    z = rand(n * oh * ow, c)
    b = rand(c)
    out = np.empty((n, 3, 3, c), np.float32)
    arg = np.empty((n, 3, 3, c), np.int8)
    K.bias_act_pool(z, b, True, n, oh, ow, 2, 2, out, arg)
    ref = np.maximum(pool_ref((z + b).reshape(n, oh, ow, c).transpose(0, 3, 1, 2), 2, 2), 0)
    np.testing.assert_allclose(out.transpose(0, 3, 1, 2), ref, rtol=1e-6)
    assert ((arg == -1) == (out == 0)).all()
    dout = rand(*out.shape)
    dz = np.empty_like(z)
    db = np.zeros(c, np.float32)
    K.pool_backward(dout, arg, 2, 2, oh, ow, dz, db)
    np.testing.assert_allclose(db, np.where(out > 0, dout, 0).sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    assert np.count_nonzero(dz) == np.count_nonzero(out)


def test_dense_forward_backward_finite_differences():
    x, w, b = rand(5, 7), rand(4, 7), rand(4)
    for relu in (False, True):
        out = np.empty((5, 4), np.float32)
        C.dense_forward(x, w, b, relu, out)
        ref = x.astype(np.float64) @ w.T + b
        np.testing.assert_allclose(out, np.maximum(ref, 0) if relu else ref, rtol=1e-5, atol=1e-6)
        r = rand(5, 4)
        gw, gb, dx = np.empty_like(w), np.empty_like(b), np.empty_like(x)
        C.dense_backward(x, w, relu, out, r.copy(), gw, gb, dx)

        def loss() -> float:
            o = np.empty((5, 4), np.float32)
            C.dense_forward(x, w, b, relu, o)
            return float(np.vdot(o.astype(np.float64), r))

        # ReLU kinks: small steps (no unit crosses zero at these magnitudes).
        fd_check(loss, x, dx, eps=1e-3, rtol=5e-3)
        fd_check(loss, w, gw, eps=1e-3, rtol=5e-3)
        fd_check(loss, b, gb, eps=1e-3, rtol=5e-3)


def test_relu_backward_and_bias_act():
    z = rand(6, 5)
    b = rand(5)
    y = z.copy()
    K.bias_act_rows(y, b, True)
    np.testing.assert_allclose(y, np.maximum(z + b, 0))
    d = rand(6, 5)
    d2 = d.copy()
    K.relu_backward(d2, y)
    np.testing.assert_array_equal(d2, np.where(y > 0, d, 0))


def test_dropout_is_seeded_scaled_and_masked():
    p = 0.3
    x = np.ones(200_000, np.float32)
    keep = np.empty(x.shape, np.uint8)
    a = x.copy()
    K.dropout_forward(a, p, np.uint64(7), keep)
    assert abs(keep.mean() - (1 - p)) < 0.01
    np.testing.assert_allclose(a, keep / np.float32(1 - p), rtol=1e-6)
    b, keep_b = x.copy(), np.empty_like(keep)
    K.dropout_forward(b, p, np.uint64(7), keep_b)
    np.testing.assert_array_equal(a, b)
    c, keep_c = x.copy(), np.empty_like(keep)
    K.dropout_forward(c, p, np.uint64(8), keep_c)
    assert 0.3 < np.mean(keep != keep_c) < 0.5  # independent masks differ in ~2p(1-p)
    d = rand(200_000)
    d2 = d.copy()
    K.dropout_backward(d2, keep, p)
    np.testing.assert_allclose(d2, d * keep / np.float32(1 - p), rtol=1e-6)


def test_softmax_xent_matches_reference_and_is_stable():
    logits, y = rand(6, 5) * 3, RNG.integers(0, 5, 6)
    d = np.empty_like(logits)
    loss = K.softmax_xent(logits, y, d)
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    assert loss == pytest.approx(np.mean(lse - z[np.arange(6), y]), rel=1e-6)
    fd_check(lambda: K.softmax_xent(logits, y, np.empty_like(logits)), logits, d, eps=1e-3, rtol=1e-3)
    huge = np.array([[1e4, -1e4, 0.0], [-3e4, 3e4, 3e4]], np.float32)
    dh = np.empty_like(huge)
    lh = K.softmax_xent(huge, np.array([1, 2]), dh)
    assert np.isfinite(lh) and np.isfinite(dh).all()
    assert lh == pytest.approx((2e4 + np.log(2)) / 2, rel=1e-6)
    s, correct = K.xent_sum_correct(logits, y)
    assert s / 6 == pytest.approx(loss, rel=1e-6) and correct == int((logits.argmax(1) == y).sum())


def test_nchw_api_rejects_bad_shapes():
    with pytest.raises(ZsgdError, match="do not match"):
        C.conv2d_nchw(rand(1, 2, 5, 5), rand(3, 1, 3, 3), rand(3))
    with pytest.raises(ZsgdError, match="smaller than kernel"):
        C.conv2d_nchw(rand(1, 1, 2, 2), rand(3, 1, 3, 3), rand(3))
    with pytest.raises(ZsgdError, match="4-D"):
        C.conv2d_nchw(rand(2, 5, 5), rand(3, 1, 3, 3), rand(3))
    with pytest.raises(ZsgdError, match="does not fit"):
        C.maxpool2d_nchw(rand(1, 1, 2, 2), 3)


def test_kernels_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, w, b = rand(2, 3, 11, 9), rand(5, 3, 3, 3), rand(5)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = F.conv2d(xt, wt, bt, stride=2, padding=1)
    r = rand(*yt.shape)
    yt.backward(torch.tensor(r))
    np.testing.assert_allclose(C.conv2d_nchw(x, w, b, 2, 1), yt.detach().numpy(), rtol=1e-4, atol=1e-5)
    for mine, ref in zip(C.conv2d_backward_nchw(x, w, r, 2, 1), (xt.grad, wt.grad, bt.grad)):
        np.testing.assert_allclose(mine, ref.numpy(), rtol=1e-4, atol=1e-4)
    xp = torch.tensor(x, requires_grad=True)
    pt = F.max_pool2d(xp, 3, 2)
    rp = rand(*pt.shape)
    pt.backward(torch.tensor(rp))
    y, arg = C.maxpool2d_nchw(x, 3, 2)
    np.testing.assert_array_equal(y, pt.detach().numpy())
    np.testing.assert_allclose(C.maxpool2d_backward_nchw(rp, arg, x.shape, 3, 2), xp.grad.numpy(), rtol=1e-6)
    logits, y = rand(4, 7), RNG.integers(0, 7, 4)
    lt = torch.tensor(logits, requires_grad=True)
    F.cross_entropy(lt, torch.tensor(y)).backward()
    d = np.empty_like(logits)
    K.softmax_xent(logits, y, d)
    np.testing.assert_allclose(d, lt.grad.numpy(), rtol=1e-5, atol=1e-7)
