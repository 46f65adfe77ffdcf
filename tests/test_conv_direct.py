"""The direct convolution kernels (zsgd.nn.conv.direct) against the im2col path, finite differences and PyTorch.

The im2col + sgemm path is the reference: the direct kernels must give the
same outputs and gradients to float32 rounding (they sum in another order),
and the same bits every time they run (the simulator's reproducibility).
The shapes make the tiles' edges run: output rows of 15 pixels are tiles of
8, 4, 2 and 1 rows; odd sizes leave pooling windows off the edge;
overlapping windows accumulate.
"""

from __future__ import annotations

import numpy as np
import pytest

from zsgd.nn import conv as C
from zsgd.nn import layers as L
from zsgd.nn.conv import direct as D
from zsgd.nn.lstm_gemm import NR

RNG = np.random.default_rng(24)

# n, c, h, w, cout, k, pool, pool stride
CASES = [
    (3, 32, 12, 12, 64, 3, 2, 2),  # the CNN's conv2, smaller: pooled, windows tile the output
    (2, 32, 9, 17, 32, 3, 0, 0),  # unpooled; OW = 15: tiles of 8, 4, 2, 1 rows
    (2, 64, 11, 10, 32, 5, 2, 2),  # 7x6 output: the last pooling row is off the edge
    (2, 32, 10, 10, 64, 3, 3, 2),  # overlapping windows
    (1, 32, 5, 5, 32, 1, 0, 0),  # 1x1 kernel
    (3, 1, 12, 11, 32, 3, 0, 0),  # the CNN's conv1: one input channel (the input gradient through a padded panel)
    (2, 3, 10, 9, 32, 3, 2, 2),  # three input channels, pooled
]


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def run_layer(g: C.ConvGeom, x, w, b, dout, direct: bool, mask_dx: bool):
    """Forward and backward of one conv (+ReLU, +pool) through ``conv_forward``/``conv_backward``."""
    n = x.shape[0]
    buf = C.ConvBuffers(g, g.chunk(n), direct=direct)
    arg = np.empty((n, g.ph, g.pw, g.cout), np.int8) if g.pool else None
    out = np.empty((n, g.ph, g.pw, g.cout), np.float32)
    C.conv_forward(g, x, w, b, True, out, arg, buf)
    gw, gb, dx = np.empty_like(w), np.empty(g.cout, np.float32), np.empty_like(x)
    C.conv_backward(g, x, w, True, out, arg, dout.copy(), False, gw, gb, dx, mask_dx, buf)
    return out, arg, gw, gb, dx, buf


def close(a: np.ndarray, e: np.ndarray, rtol: float = 5e-6) -> None:
    """Equal to float32 rounding of sums of a few hundred terms: within ``rtol`` of the largest magnitude.

    (Measured: at most 1.2e-6 in these cases.)
    """
    np.testing.assert_allclose(a, e, rtol=0, atol=rtol * (np.abs(e).max() + 1e-30))


@pytest.mark.parametrize("case", CASES)
def test_direct_matches_im2col(case):
    n, c, h, w, co, k, pool, ps = case
    g = C.ConvGeom(c, h, w, co, k, k, 1, 0, pool, ps)
    assert D.supported(co, 1, 0)
    x, wt, b = rand(n, h, w, c), rand(co, c, k, k) * 0.2, rand(co)
    dout = rand(n, g.ph, g.pw, co)
    ref = run_layer(g, x, wt, b, dout, False, True)
    got = run_layer(g, x, wt, b, dout, True, True)
    assert got[-1].direct and not ref[-1].direct
    close(got[0], ref[0])
    if pool:
        assert np.mean(got[1] == ref[1]) > 0.999  # argmax: only a near tie could pick another pixel
    for a, e in zip(got[2:5], ref[2:5]):
        close(a, e)
    assert np.all(got[4][x <= 0] == 0)  # the producing layer's ReLU derivative


def test_direct_is_bit_for_bit_repeatable():
    g = C.ConvGeom(32, 14, 14, 64, 3, 3, 1, 0, 2, 2)
    x, wt, b = rand(4, 14, 14, 32), rand(64, 32, 3, 3), rand(64)
    dout = rand(4, g.ph, g.pw, 64)
    first = run_layer(g, x, wt, b, dout, True, False)
    buf = first[-1]
    for _ in range(2):  # the same buffers again (the padded gradient's border must stay zero)
        out = np.empty_like(first[0])
        arg = np.empty_like(first[1])
        C.conv_forward(g, x, wt, b, True, out, arg, buf)
        gw, gb, dx = np.empty_like(wt), np.empty(64, np.float32), np.empty_like(x)
        C.conv_backward(g, x, wt, True, out, arg, dout.copy(), False, gw, gb, dx, False, buf)
        for a, e in zip((out, arg, gw, gb, dx), first[:5]):
            np.testing.assert_array_equal(a, e)


def test_layer_with_flatten_out_uses_direct_kernels(monkeypatch):
    """The CNN's conv2 as the model builds it: the output in NCHW flatten order (a strided NHWC view)."""
    layer = L.Conv2d("conv2", (12, 12, 32), 64, 3, pool=2, flatten_out=True)
    x = rand(5, 12, 12, 32)
    p = [rand(64, 32, 3, 3) * 0.2, rand(64)]
    dout = rand(5, layer.out_shape[0])

    def step():
        ws: dict = {}
        out = layer.forward(ws, x, p, True, 0).copy()
        g = [np.empty_like(p[0]), np.empty_like(p[1])]
        dx = layer.backward(ws, x, out, dout.copy(), p, g, True)
        return ws["conv"].direct, out, g[0], g[1], dx

    got = step()
    monkeypatch.setattr(D, "supported", lambda *a, **k: False)
    ref = step()
    assert got[0] and not ref[0]
    for a, e in zip(got[1:], ref[1:]):
        close(a, e)


def test_direct_finite_differences():
    """The NCHW API takes the direct path for these shapes; its gradients against central differences."""
    x, wt, b = rand(2, 32, 6, 7), rand(32, 32, 3, 3) * 0.2, rand(32)
    r = rand(2, 32, 4, 5)
    dx, dw, db = C.conv2d_backward_nchw(x, wt, r)

    def loss() -> float:
        return float(np.vdot(C.conv2d_nchw(x, wt, b).astype(np.float64), r))

    for arr, grad in ((x, dx), (wt, dw), (b, db)):
        flat, gflat = arr.reshape(-1), grad.reshape(-1)
        for i in RNG.choice(flat.size, size=12, replace=False):
            old = flat[i]
            flat[i] = old + 0.05
            fp = loss()
            flat[i] = old - 0.05
            fm = loss()
            flat[i] = old
            assert abs((fp - fm) / 0.1 - gflat[i]) <= 2e-3 * (np.abs(gflat).max() + 1.0)


def test_direct_matches_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    n, c, h, w, co = 3, 32, 13, 12, 64
    g = C.ConvGeom(c, h, w, co, 3, 3, 1, 0, 2, 2)
    x, wt, b = rand(n, h, w, c), rand(co, c, 3, 3) * 0.2, rand(co)
    dout = rand(n, g.ph, g.pw, co)
    out, _, gw, gb, dx, _ = run_layer(g, x, wt, b, dout, True, False)
    xt = torch.tensor(x.transpose(0, 3, 1, 2).copy(), dtype=torch.float64, requires_grad=True)
    wtt = torch.tensor(wt, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    y = F.max_pool2d(F.relu(F.conv2d(xt, wtt, bt)), 2)
    y.backward(torch.tensor(dout.transpose(0, 3, 1, 2), dtype=torch.float64))
    close(out, y.detach().numpy().transpose(0, 2, 3, 1))
    close(gw, wtt.grad.numpy())
    close(gb, bt.grad.numpy())
    close(dx, xt.grad.numpy().transpose(0, 2, 3, 1))


def test_supported_shapes():
    assert D.supported(64, 1, 0) and D.supported(32, 1, 0)
    assert not D.supported(64, 2, 0)  # stride 2
    assert not D.supported(64, 1, 1)  # padding
    assert not D.supported(NR + 8, 1, 0)  # output channels off the panel
    assert C.ConvBuffers(C.ConvGeom(6, 14, 14, 16, 5, 5), 4).direct is False  # LeNet's conv2: im2col


@pytest.mark.parametrize("m,f,o", [(64, 9216 // 8, 128), (13, 96, 10), (1, 32, 1)])
def test_dense_backward_matches_blas(m, f, o):
    """The dense layers' gradients through the tile (rows in tiles of 8, 4, 2, 1) against numpy's sgemm."""
    x, dout, w = rand(m, f), rand(m, o), rand(o, f)
    gw, gb, dx = np.empty_like(w), np.empty(o, np.float32), np.empty_like(x)
    assert D.dense_supported(f)
    C.dense_backward(x, w, False, np.empty((m, o), np.float32), dout, gw, gb, dx)
    close(gw, dout.T.astype(np.float64) @ x)
    close(dx, dout.astype(np.float64) @ w)
    close(gb, dout.sum(axis=0, dtype=np.float64))
    gw2 = np.empty_like(w)
    C.dense_backward(x, w, False, None, dout, gw2, gb, None)  # no input gradient (a first layer)
    np.testing.assert_array_equal(gw2, gw)
    assert not D.dense_supported(f + 1)


@pytest.mark.slow
def test_direct_kernels_without_avx512_use_the_narrow_tile(tmp_path):
    """Compiled for a CPU without AVX-512, the panels are 16 wide and the tiles 4 rows of 8-float vectors;
    the cnn's gradient still matches the im2col path's."""
    from narrow_cpu import run_without_avx512

    code = """
import numpy as np
from zsgd.nn.conv import direct as D
from zsgd.nn.models import get_model
assert (D.NR, D.MR) == (16, 4), (D.NR, D.MR)
m = get_model("cnn", (1, 20, 20), 10)
w = m.init(0)
rng = np.random.default_rng(0)
x, y = rng.random((5, 1, 20, 20), dtype=np.float32), rng.integers(0, 10, 5)
loss, g = m.loss_and_grad(w, x, y, training=False)
assert m._ws[5][1]["conv"].direct
D.supported = lambda *a: False
m._ws.clear()
loss2, g2 = m.loss_and_grad(w, x, y, training=False)
assert abs(loss - loss2) <= 1e-5 * abs(loss2), (loss, loss2)
assert np.abs(g - g2).max() <= 1e-5 * np.abs(g2).max(), np.abs(g - g2).max()
print("narrow ok")
"""
    proc = run_without_avx512(code, tmp_path)
    assert proc.returncode == 0 and "narrow ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("m,f,o", [(64, 9216 // 8, 128), (13, 96, 10), (33, 32, 1), (0, 64, 8)])
def test_dense_forward_matches_blas(m, f, o):
    """The dense forward through the tile (the batch packed into panels, padded with zeros) against BLAS."""
    x, w, b = rand(m, f), rand(o, f), rand(o)
    xs, os_ = C.dense_scratch(m, f, o)
    got, ref = np.empty((m, o), np.float32), np.empty((m, o), np.float32)
    xp, ot = np.full(xs, np.nan, np.float32), np.full(os_, np.nan, np.float32)  # stale scratch must not leak
    C.dense_forward(x, w, b, True, got, xp, ot)
    C.dense_forward(x, w, b, True, ref)
    if m:
        close(got, ref)
    again = np.empty_like(got)
    C.dense_forward(x, w, b, True, again, xp, ot)
    np.testing.assert_array_equal(again, got)
    assert C.dense_scratch(m, f + 1, o) is None
