"""Layers of the model zoo: parameter shapes, buffers, forward and backward.

A layer owns no parameters: it is handed views into the model's flat
float32 vector (and into the flat gradient) on every call, so the model can
be sent, averaged and updated as one contiguous buffer.

Data between layers:

* conv layers take and give channels-last (N, H, W, C) C-contiguous arrays
  (see ``zsgd.kernels``); the last conv before a dense layer writes its
  output straight into PyTorch's NCHW flatten order, so ``fc1.weight`` keeps
  PyTorch's layout and ``state_dict`` loads into ``torch.nn.Linear`` as is;
* dense layers take and give (N, F) arrays;
* dropout works in place on its input (the dropped units' gradient is zero,
  so the ReLU mask read later from the same buffer stays correct).

Buffers live in a per-batch-size workspace dict (``ws``) that the model
keeps between calls, so a training step allocates nothing but its result.
"""

from __future__ import annotations

import math

import numpy as np

from zsgd.nn import conv as C
from zsgd import kernels as K

_U64 = (1 << 64) - 1


def buffer(ws: dict, key: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """The workspace array ``key``, allocated on first use (uninitialised)."""
    a = ws.get(key)
    if a is None or a.shape != shape or a.dtype != dtype:
        a = ws[key] = np.empty(shape, dtype)
    return a


class Layer:
    """Base: no parameters, identity shapes."""

    name = ""
    #: (parameter suffix, shape) in PyTorch order and layout.
    params: list[tuple[str, tuple[int, ...]]] = []
    #: fan-in used by the PyTorch-default uniform init.
    fan_in = 1
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()

    def forward(self, ws: dict, x: np.ndarray, p: list[np.ndarray], training: bool, seed: int) -> np.ndarray:
        raise NotImplementedError

    def backward(self, ws: dict, x: np.ndarray, out: np.ndarray, dout: np.ndarray,
                 p: list[np.ndarray], g: list[np.ndarray], need_dx: bool) -> np.ndarray | None:
        raise NotImplementedError


class Conv2d(Layer):
    """Conv + bias, optional ReLU, optional max-pool, as one fused layer.

    ``flatten_out`` (pooled convs) makes the output (N, C*H*W) in PyTorch's
    NCHW flatten order, for a following dense layer. ``premasked`` and
    ``mask_dx`` are set by the model when two ReLU convs follow each other:
    the second applies the first's ReLU derivative inside its col2im pass.
    """

    def __init__(self, name: str, in_hwc: tuple[int, int, int], cout: int, k: int, pad: int = 0,
                 relu: bool = True, pool: int = 0, flatten_out: bool = False):
        h, w, c = in_hwc
        if flatten_out and not pool:
            raise ValueError("flatten_out is implemented for pooled convs (the pool writes NCHW order)")
        self.name = name
        self.g = C.ConvGeom(c, h, w, cout, k, k, 1, pad, pool, pool)
        self.relu = relu
        self.flatten_out = flatten_out
        self.premasked = False
        self.mask_dx = False
        self.params = [("weight", (cout, c, k, k)), ("bias", (cout,))]
        self.fan_in = c * k * k
        self.in_shape = (h, w, c)
        ph, pw, co = self.g.out_shape
        self.out_shape = (co * ph * pw,) if flatten_out else (ph, pw, co)

    def _bufs(self, ws: dict, n: int) -> C.ConvBuffers:
        b = ws.get("conv")
        ch = self.g.chunk(n)
        if b is None or b.chunk != ch:
            b = ws["conv"] = C.ConvBuffers(self.g, ch)
        return b

    def _out_view(self, out: np.ndarray) -> np.ndarray:
        """NHWC view of the output buffer (strided when it holds NCHW order)."""
        if not self.flatten_out:
            return out
        ph, pw, co = self.g.out_shape
        return out.reshape(-1, co, ph, pw).transpose(0, 2, 3, 1)

    def forward(self, ws, x, p, training, seed):
        n = x.shape[0]
        g = self.g
        out = buffer(ws, "out", (n, *self.out_shape))
        if g.pool:
            arg = buffer(ws, "arg", (n, g.ph, g.pw, g.cout), np.int8)
            C.conv_forward(g, x, p[0], p[1], self.relu, self._out_view(out), arg, self._bufs(ws, n))
        else:
            C.conv_forward(g, x, p[0], p[1], self.relu, out, None, self._bufs(ws, n))
        return out

    def backward(self, ws, x, out, dout, p, g, need_dx):
        n = x.shape[0]
        geo = self.g
        dx = buffer(ws, "dx", x.shape) if need_dx else None
        bufs = self._bufs(ws, n)
        arg = ws["arg"] if geo.pool else None
        C.conv_backward(geo, x, p[0], self.relu, self._out_view(out), arg, self._out_view(dout),
                        self.premasked, g[0], g[1], dx, self.mask_dx, bufs)
        return dx


class Dense(Layer):
    """Fully connected layer with PyTorch's (out, in) weight, optional ReLU."""

    def __init__(self, name: str, n_in: int, n_out: int, relu: bool):
        self.name = name
        self.relu = relu
        self.params = [("weight", (n_out, n_in)), ("bias", (n_out,))]
        self.fan_in = n_in
        self.in_shape = (n_in,)
        self.out_shape = (n_out,)

    def forward(self, ws, x, p, training, seed):
        out = buffer(ws, "out", (x.shape[0], *self.out_shape))
        shapes = C.dense_scratch(x.shape[0], self.in_shape[0], self.out_shape[0])
        if shapes is None:
            C.dense_forward(x, p[0], p[1], self.relu, out)
        else:
            C.dense_forward(x, p[0], p[1], self.relu, out, buffer(ws, "xp", shapes[0]), buffer(ws, "ot", shapes[1]))
        return out

    def backward(self, ws, x, out, dout, p, g, need_dx):
        dx = buffer(ws, "dx", x.shape) if need_dx else None
        C.dense_backward(x, p[0], self.relu, out, dout, g[0], g[1], dx)
        return dx


class Dropout(Layer):
    """Inverted dropout, in place; the mask is a hash of the step seed (see kernels)."""

    def __init__(self, name: str, shape: tuple[int, ...], p: float, salt: int):
        self.name = name
        self.p = float(p)
        self.salt = salt
        self.in_shape = self.out_shape = shape

    def layer_seed(self, seed: int) -> np.uint64:
        """Per-layer 64-bit key, so two dropout layers never share a mask."""
        return np.uint64((int(seed) * 0x9E3779B97F4A7C15 + self.salt * 0xD1B54A32D192ED69) & _U64)

    def forward(self, ws, x, p, training, seed):
        if training and self.p > 0.0:
            keep = buffer(ws, "keep", x.shape, np.uint8)
            K.dropout_forward(x, self.p, self.layer_seed(seed), keep)
            ws["active"] = True
        else:
            ws["active"] = False
        return x

    def backward(self, ws, x, out, dout, p, g, need_dx):
        if ws.get("active"):
            K.dropout_backward(dout, ws["keep"], self.p)
        return dout


def uniform_init(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """PyTorch's default for Conv2d/Linear weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    (``kaiming_uniform_(a=sqrt(5))`` reduces to exactly this bound.)
    """
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return ((rng.random(shape, dtype=np.float32) * 2.0 - 1.0) * bound).astype(np.float32)
