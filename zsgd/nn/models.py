"""The model zoo: small image classifiers on ONE flat float32 parameter vector.

Why one vector: the broker sends the model as a single zero-copy frame, an
optimizer updates it in one fused pass, and compression/averaging work on a
plain array. Each layer's weight and bias are views into it, laid out in
PyTorch's names, order and shapes, so ``state_dict`` loads into the
equivalent ``torch.nn`` module unchanged (the tests check this).

Models (``get_model(name, input_shape=(C, H, W), n_classes=K)``):

* ``logreg``: flatten -> fc.
* ``mlp``:    flatten -> fc1 256 -> ReLU -> fc2 128 -> ReLU -> fc3.
* ``cnn``:    the Keras ``mnist_cnn`` example: conv1 32@3x3 -> ReLU -> conv2
  64@3x3 -> ReLU -> max-pool 2 -> dropout 0.25 -> flatten -> fc1 128 -> ReLU ->
  dropout 0.5 -> fc2 (1,199,882 parameters on 1x28x28, 10 classes).
* ``lenet5``: conv1 6@5x5 pad 2 -> ReLU -> max-pool 2 -> conv2 16@5x5 -> ReLU ->
  max-pool 2 -> fc1 120 -> ReLU -> fc2 84 -> ReLU -> fc3. This is the modern
  variant (ReLU and max-pooling instead of LeCun's tanh and trainable
  sub-sampling, and a dense layer in place of the sparse C3 connections):
  it trains faster and is what "LeNet-5" means in most code today.

``"package.module:factory"`` names a user's model: ``factory(input_shape=...,
n_classes=...)`` must return an object with the same interface as ``Model``.
``"torch:package.module:factory"`` names a ``torch.nn.Module`` (zsgd.nn.torch_model).

A ``Model`` keeps scratch buffers between calls, so one instance must not be
used from two threads at once (zsgd's workers are processes).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from zsgd import kernels as K
from zsgd.errors import ZsgdError
from zsgd.nn.flat import check_flat, load_flat
from zsgd.nn.layers import Conv2d, Dense, Dropout, Layer, buffer, uniform_init
from zsgd.nn.lstm_spec import LSTM_FORM, LSTM_NAME
from zsgd.nn.user_code import describe as _describe, load_factory, user_call as _user_call

#: Samples per forward pass in ``predict``: bounds memory (the CNN's conv1
#: output is 86 KB per sample) while keeping each sgemm large.
PREDICT_BATCH = 256
#: Rows a language model's test stream is cut into: wide enough for sgemm
#: (28 K tokens/s forward on one core, against 17 K with 10 rows), and each row
#: long enough (3 K tokens of the embedded corpus) that the state reset at
#: its start costs little.
LM_EVAL_BATCH = 32
#: Batch sizes whose buffers are kept (training, evaluation, a ragged tail).
_WORKSPACES = 3


@runtime_checkable
class ModelLike(Protocol):
    """What zsgd needs from a model (built-in or a user's factory)."""

    name: str
    input_shape: tuple[int, int, int]
    n_classes: int
    n_params: int

    def init(self, seed: int = 0) -> np.ndarray: ...
    def loss_and_grad(self, w: np.ndarray, x: np.ndarray, y: np.ndarray, training: bool = True,
                      seed: int | None = None) -> tuple[float, np.ndarray]: ...
    def predict(self, w: np.ndarray, x: np.ndarray) -> np.ndarray: ...
    def state_dict(self, w: np.ndarray) -> dict[str, np.ndarray]: ...
    def load_state_dict(self, sd: dict[str, Any]) -> np.ndarray: ...
    def layout(self) -> list[tuple[str, tuple[int, ...], int]]: ...


class Model:
    """A feed-forward stack of zsgd layers over one flat parameter vector."""

    def __init__(self, name: str, input_shape: tuple[int, int, int], n_classes: int, layers: list[Layer],
                 seed: int = 0):
        self.name = name
        self.input_shape = tuple(int(s) for s in input_shape)
        self.n_classes = int(n_classes)
        self.layers = layers
        self._nhwc_input = isinstance(layers[0], Conv2d)
        self._specs: list[tuple[str, tuple[int, ...], int, int]] = []  # name, shape, offset, fan_in
        self._slots: list[list[tuple[int, tuple[int, ...]]]] = []  # per layer: (offset, shape)
        off = 0
        for layer in layers:
            slots = []
            for suffix, shape in layer.params:
                self._specs.append((f"{layer.name}.{suffix}", shape, off, layer.fan_in))
                slots.append((off, shape))
                off += int(np.prod(shape))
            self._slots.append(slots)
        self.n_params = off
        # After layer i's backward, grad[_ready_from[i]:] is final (layers own contiguous, increasing offsets).
        self._ready_from = [off] * (len(layers) + 1)
        for i in range(len(layers) - 1, -1, -1):
            self._ready_from[i] = self._slots[i][0][0] if self._slots[i] else self._ready_from[i + 1]
        # Fuse the ReLU derivative of conv i into conv i+1's col2im (see layers.Conv2d).
        for prev, cur in zip(layers, layers[1:]):
            if isinstance(prev, Conv2d) and isinstance(cur, Conv2d) and prev.relu and not prev.g.pool:
                prev.premasked = cur.mask_dx = True
        self._rng = np.random.default_rng(seed)
        self._ws: OrderedDict[int, list[dict]] = OrderedDict()
        #: set to a dict to accumulate seconds per layer ("conv1/fwd", ...): see ``benchmarks/``.
        self.timings: dict[str, float] | None = None

    # ------------------------------------------------------------ parameters

    def bytes_per_sample(self) -> int:
        """Memory one training step needs per sample of its batch: the input as float32, each layer's output and
        gradient (convolutions work in chunks, so their scratch does not grow with the batch). The CNN on 28x28
        measures 272 KB a sample at batch 1024; this says 318 KB."""
        floats = int(np.prod(self.input_shape)) + sum(2 * int(np.prod(layer.out_shape)) for layer in self.layers)
        return 4 * floats

    def layout(self) -> list[tuple[str, tuple[int, ...], int]]:
        """(name, shape, offset into the flat vector) of every parameter, in order."""
        return [(n, s, o) for n, s, o, _ in self._specs]

    def init(self, seed: int = 0) -> np.ndarray:
        """A fresh flat vector with PyTorch's default init; same seed, same vector."""
        rng = np.random.default_rng(seed)
        w = np.empty(self.n_params, np.float32)
        for _, shape, off, fan_in in self._specs:
            w[off:off + int(np.prod(shape))] = uniform_init(rng, shape, fan_in).ravel()
        return w

    def _views(self, w: np.ndarray, i: int) -> list[np.ndarray]:
        return [w[o:o + math.prod(s)].reshape(s) for o, s in self._slots[i]]

    def state_dict(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """{PyTorch name: view into ``w``} (writing to a view writes to ``w``)."""
        w = self._check_w(w)
        return {n: w[o:o + int(np.prod(s))].reshape(s) for n, s, o, _ in self._specs}

    def load_state_dict(self, sd: dict[str, Any]) -> np.ndarray:
        """A new flat vector from a ``state_dict`` (numpy arrays or CPU torch tensors)."""
        return load_flat(sd, self.layout(), self.n_params, self.name)

    # ------------------------------------------------------------ validation

    def _check_w(self, w: np.ndarray) -> np.ndarray:
        return check_flat(w, self.n_params, self.name)

    def _check_x(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape or x.shape[0] == 0:
            want = ", ".join(map(str, self.input_shape))
            raise ZsgdError(f"model '{self.name}' expects input of shape (N>0, {want}), got {x.shape}: "
                            f"check the data set's image shape")
        if not np.issubdtype(x.dtype, np.floating):
            raise ZsgdError(f"model '{self.name}' expects float32 images in [0, 1], got {x.dtype}: "
                            f"scale with zsgd.data.to_float (or x / 255)")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _check_y(self, y: np.ndarray, n: int) -> np.ndarray:
        y = np.asarray(y)
        if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
            raise ZsgdError(f"labels must be an integer array of shape ({n},), got {y.dtype} {y.shape}")
        if n and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
            raise ZsgdError(f"labels must be in [0, {self.n_classes}), got range [{y.min()}, {y.max()}]: "
                            f"check n_classes")
        return np.ascontiguousarray(y, dtype=np.int64)

    # ------------------------------------------------------------ compute

    def _workspace(self, n: int) -> list[dict]:
        ws = self._ws.get(n)
        if ws is None:
            ws = self._ws[n] = [{} for _ in range(len(self.layers) + 1)]
            while len(self._ws) > _WORKSPACES:
                self._ws.popitem(last=False)
        else:
            self._ws.move_to_end(n)
        return ws

    def _tick(self, key: str, t0: float) -> float:
        t = time.perf_counter()
        if self.timings is not None:
            self.timings[key] = self.timings.get(key, 0.0) + (t - t0)
        return t

    def _forward(self, w: np.ndarray, x: np.ndarray, training: bool, seed: int, ws: list[dict]):
        t = time.perf_counter()
        n = x.shape[0]
        if self._nhwc_input:
            c, h, wd = self.input_shape
            if c == 1:
                h0 = x.reshape(n, h, wd, 1)
            else:
                h0 = buffer(ws[-1], "x_nhwc", (n, h, wd, c))
                np.copyto(h0, x.transpose(0, 2, 3, 1))
        else:
            h0 = x.reshape(n, -1)
        acts = [h0]
        t = self._tick("input", t)
        for i, layer in enumerate(self.layers):
            acts.append(layer.forward(ws[i], acts[-1], self._views(w, i), training, seed))
            t = self._tick(f"{layer.name}/fwd", t)
        return acts

    streams_gradients = True  # loss_and_grad takes on_ready (a user's model need not)

    def loss_and_grad(self, w: np.ndarray, x: np.ndarray, y: np.ndarray, training: bool = True,
                      seed: int | None = None, out: np.ndarray | None = None,
                      on_ready: Callable[[int, np.ndarray, float, int], None] | None = None) -> tuple[float, np.ndarray]:
        """Mean cross-entropy over the batch and its gradient (a new flat vector, or ``out``).

        ``training=False`` turns dropout off (exact, deterministic gradients).
        ``seed`` picks this step's dropout masks; ``None`` draws from the model's
        own stream (``get_model(..., seed=)``). ``on_ready(offset, grad, loss,
        n)`` is called after each layer's backward pass, when ``grad[offset:]``
        is final: backward produces the last layers first, so a worker can send
        those ranges while the first layers are still being computed.
        """
        w = self._check_w(w)
        x = self._check_x(x)
        n = x.shape[0]
        y = self._check_y(y, n)
        if seed is None:
            seed = int(self._rng.integers(0, 2**63 - 1))
        grad = np.empty(self.n_params, np.float32) if out is None else out
        if grad.shape != (self.n_params,) or grad.dtype != np.float32 or not grad.flags.c_contiguous:
            raise ZsgdError(f"out must be a contiguous float32 vector of {self.n_params} parameters")
        ws = self._workspace(n)
        acts = self._forward(w, x, training, seed, ws)
        t = time.perf_counter()
        logits = acts[-1]
        dlogits = buffer(ws[-1], "dlogits", logits.shape)
        loss = float(K.softmax_xent(logits, y, dlogits))
        t = self._tick("loss", t)
        d = dlogits
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            d = layer.backward(ws[i], acts[i], acts[i + 1], d, self._views(w, i), self._views(grad, i), i > 0)
            t = self._tick(f"{layer.name}/bwd", t)
            if on_ready is not None:
                on_ready(self._ready_from[i], grad, loss, n)
        return loss, grad

    def predict(self, w: np.ndarray, x: np.ndarray, batch_size: int = PREDICT_BATCH) -> np.ndarray:
        """Logits (N, n_classes) in inference mode (no dropout), ``batch_size`` samples at a time."""
        w = self._check_w(w)
        x = np.asarray(x)
        self._check_x(x[:1])
        out = np.empty((x.shape[0], self.n_classes), np.float32)
        for i in range(0, x.shape[0], batch_size):
            xb = np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32)
            out[i:i + len(xb)] = self._forward(w, xb, False, 0, self._workspace(len(xb)))[-1]
        return out

    def __repr__(self) -> str:
        return (f"Model({self.name!r}, input_shape={self.input_shape}, n_classes={self.n_classes}, "
                f"n_params={self.n_params})")


# ---------------------------------------------------------------- the zoo


def _conv(name: str, hwc: tuple[int, int, int], cout: int, k: int, pad: int = 0, pool: int = 0,
          flatten_out: bool = False) -> Conv2d:
    layer = Conv2d(name, hwc, cout, k, pad=pad, relu=True, pool=pool, flatten_out=flatten_out)
    g = layer.g
    if g.oh < max(1, pool) or g.ow < max(1, pool):
        raise ValueError(f"{name} ({k}x{k}, pad {pad}) gets a {hwc[0]}x{hwc[1]} input")
    return layer


def _logreg(c: int, h: int, w: int, k: int) -> list[Layer]:
    return [Dense("fc", c * h * w, k, relu=False)]


def _mlp(c: int, h: int, w: int, k: int) -> list[Layer]:
    return [Dense("fc1", c * h * w, 256, True), Dense("fc2", 256, 128, True), Dense("fc3", 128, k, False)]


def _cnn(c: int, h: int, w: int, k: int) -> list[Layer]:
    c1 = _conv("conv1", (h, w, c), 32, 3)
    c2 = _conv("conv2", c1.out_shape, 64, 3, pool=2, flatten_out=True)
    f = c2.out_shape[0]
    return [c1, c2, Dropout("dropout1", (f,), 0.25, 1), Dense("fc1", f, 128, True),
            Dropout("dropout2", (128,), 0.5, 2), Dense("fc2", 128, k, False)]


def _lenet5(c: int, h: int, w: int, k: int) -> list[Layer]:
    c1 = _conv("conv1", (h, w, c), 6, 5, pad=2, pool=2)
    c2 = _conv("conv2", c1.out_shape, 16, 5, pool=2, flatten_out=True)
    f = c2.out_shape[0]
    return [c1, c2, Dense("fc1", f, 120, True), Dense("fc2", 120, 84, True), Dense("fc3", 84, k, False)]


_ZOO: dict[str, tuple[Callable[[int, int, int, int], list[Layer]], str]] = {
    "logreg": (_logreg, "any image size"),
    "mlp": (_mlp, "any image size"),
    "cnn": (_cnn, "images of at least 6x6"),
    "lenet5": (_lenet5, "images of at least 12x12"),
}
MODEL_NAMES = tuple(_ZOO)  # the image models
#: Every built-in model, for messages and warm-up: the image models of ``_ZOO`` and the language model.
BUILTIN_MODELS = (*MODEL_NAMES, LSTM_NAME)


def _check_shape(input_shape: Any, n_classes: Any) -> tuple[tuple[int, int, int], int]:
    try:
        shape = tuple(int(s) for s in input_shape)
        exact = all(s == float(t) for s, t in zip(shape, input_shape))
    except (TypeError, ValueError):
        shape, exact = (), False
    if len(shape) != 3 or min(shape) < 1 or not exact:
        raise ZsgdError(f"input_shape must be (channels, height, width) with positive sizes, got {input_shape!r}")
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 2:
        raise ZsgdError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    return shape, int(n_classes)


def _user_model(spec: str, input_shape: tuple[int, int, int], n_classes: int, seed: int = 0) -> ModelLike:
    factory = load_factory(spec)
    model = _user_call(spec, "the factory", lambda: factory(input_shape=input_shape, n_classes=n_classes))
    missing = [a for a in ("name", "input_shape", "n_classes", "n_params", "init", "loss_and_grad", "predict",
                           "state_dict", "load_state_dict", "layout") if not hasattr(model, a)]
    if missing:
        raise ZsgdError(f"model factory '{spec}' returned {type(model).__name__}, which lacks {missing}: "
                        f"see zsgd.nn.models.ModelLike")
    check_model(spec, model, input_shape, n_classes, seed)
    return model


def check_model(spec: str, model: ModelLike, input_shape: tuple[int, int, int], n_classes: int, seed: int = 0) -> None:
    """One small step through every method zsgd calls, so a broken user model fails before training starts
    (not in a worker, nor after the last update when the weights are saved)."""
    n = model.n_params
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ZsgdError(f"model '{spec}': n_params must be a positive integer, got {n!r}")
    w = _user_call(spec, "init", lambda: model.init(seed))
    if not isinstance(w, np.ndarray) or w.shape != (n,) or not np.issubdtype(w.dtype, np.floating):
        raise ZsgdError(f"model '{spec}': init() must return a float vector of n_params={n} numbers, got {_describe(w)}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    x = np.full((2, *input_shape), 0.5, dtype=np.float32)
    y = np.arange(2, dtype=np.int64) % n_classes
    out = _user_call(spec, "loss_and_grad", lambda: model.loss_and_grad(w, x, y, training=True, seed=seed))
    if not isinstance(out, tuple) or len(out) != 2:
        raise ZsgdError(f"model '{spec}': loss_and_grad() must return (loss, gradient), got {_describe(out)}")
    try:
        float(out[0])
    except (TypeError, ValueError):
        raise ZsgdError(f"model '{spec}': loss_and_grad() returned a loss that is not a number: {_describe(out[0])}") from None
    grad = out[1]
    if not isinstance(grad, np.ndarray) or grad.size != n:
        raise ZsgdError(f"model '{spec}': loss_and_grad() must return a gradient of n_params={n} numbers, got {_describe(grad)}")
    logits = _user_call(spec, "predict", lambda: model.predict(w, x))
    if not isinstance(logits, np.ndarray) or logits.shape != (2, n_classes):
        raise ZsgdError(f"model '{spec}': predict() on 2 images must return an array of shape (2, {n_classes}) (one score per "
                        f"class), got {_describe(logits)}")
    sd = _user_call(spec, "state_dict", lambda: model.state_dict(w))
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in sd.items()):
        raise ZsgdError(f"model '{spec}': state_dict() must return a dict of name -> numpy array, got {_describe(sd)}")


#: A model spec that starts so names a PyTorch module: ``torch:package.module:factory`` (see zsgd.nn.torch_model).
TORCH_PREFIX = "torch:"


def is_user_model(spec: Any) -> bool:
    """True when ``spec`` names a user's code (``package.module:factory`` or ``torch:package.module:factory``)
    rather than a built-in model: building it imports and runs that code, so a worker should build it only
    when it was started for it. Cheap: imports nothing."""
    from zsgd.nn.lstm_spec import is_lstm_name

    return isinstance(spec, str) and ":" in spec and not is_lstm_name(spec)


def get_model(name: str, input_shape: tuple[int, ...], n_classes: int, seed: int = 0,
              bptt: int = 64) -> Model | ModelLike:
    """Build a model by name (``logreg|mlp|cnn|lenet5|lstm[:...]``), ``package.module:factory`` or
    ``torch:package.module:factory`` (a PyTorch module, see zsgd.nn.torch_model; needs ``zsgd[torch]``).

    ``seed`` seeds the model's own dropout stream (used when a step passes no seed).
    ``lstm`` is a language model over ``n_classes`` tokens: it takes text data
    (``input_shape`` ``()``) and reads its training stream ``bptt`` tokens at a time.
    Raises ZsgdError for an unknown name or an input shape the model cannot take.
    """
    from zsgd.nn.lstm_spec import is_lstm_name

    text = tuple(input_shape) == ()
    if is_lstm_name(name):
        from zsgd.nn.lstm import get_lstm

        if not text:
            raise ZsgdError(f"model '{name}' is a language model and needs text data: use --data text "
                            f"(the embedded corpus) or --data text:FILE")
        return get_lstm(name, n_classes, seed=seed, bptt=bptt)
    _check_builtin_name(name)
    if isinstance(name, str) and name.startswith(TORCH_PREFIX):
        from zsgd.nn.torch_model import torch_model

        if text:
            raise ZsgdError(f"model '{name}' is a PyTorch image classifier; text data needs --model lstm")
        shape, k = _check_shape(input_shape, n_classes)
        return torch_model(name, shape, k, seed)
    if text and not (isinstance(name, str) and ":" in name):
        raise ZsgdError(f"model '{name}' classifies images; text data needs a language model: use --model lstm")
    shape, k = _check_shape(input_shape, n_classes)
    if isinstance(name, str) and ":" in name:
        return _user_model(name, shape, k, seed)
    build, needs = _ZOO[name]
    try:
        layers = build(*shape, k)
    except ValueError as exc:
        raise ZsgdError(f"model '{name}' needs {needs}; input_shape {shape} is too small ({exc})") from None
    return Model(name, shape, k, layers, seed=seed)


def _check_builtin_name(name: Any) -> None:
    """ZsgdError unless ``name`` is an image model of ``_ZOO`` or names code (``module:factory``, ``torch:...``);
    a built-in name with options (``cnn:foo=1``) is not a module to import: say that only lstm takes options."""
    if not isinstance(name, str):
        raise ZsgdError(f"a model is named by a string, got {type(name).__name__}")
    head, _, rest = name.partition(":")
    shown = name if len(name) <= 60 else name[:57] + "..."
    if ":" in name and head.lower() in BUILTIN_MODELS and not rest.isidentifier():  # cnn:make may be a module's factory
        if head.lower() == LSTM_NAME:
            raise ZsgdError(f"unknown model '{shown}' (did you mean '{LSTM_NAME}:{rest}'?): {LSTM_FORM}")
        raise ZsgdError(f"model '{head}' takes no options, got '{shown}': only {LSTM_NAME} does ({LSTM_FORM})")
    if ":" not in name and name not in _ZOO:
        close = [m for m in BUILTIN_MODELS if m == name.lower()]
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ZsgdError(f"unknown model '{shown}'{hint}: choose one of {', '.join(BUILTIN_MODELS)} ({LSTM_FORM}) "
                        f"or give 'package.module:factory'")


def evaluate(model: ModelLike, w: np.ndarray, x: np.ndarray, y: np.ndarray,
             batch_size: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``w`` on ``x``, ``y``.

    ``x`` may be uint8 (scaled by 1/255 one batch at a time, so a whole test
    set is never converted at once) or float in [0, 1]. For a language model
    ``x`` (and ``y``) is the test token stream and the result is (mean
    cross-entropy per token, next-token accuracy): see ``LSTMModel.evaluate_stream``.
    """
    if getattr(model, "is_language_model", False):
        return model.evaluate_stream(w, np.asarray(x), batch=LM_EVAL_BATCH, bptt=model.bptt)
    x = np.asarray(x)
    y = np.asarray(y)
    if len(x) != len(y) or len(x) == 0:
        raise ZsgdError(f"evaluate needs as many labels as images (and at least one): {len(x)} images, {len(y)} labels")
    if batch_size < 1:
        raise ZsgdError(f"batch_size must be >= 1, got {batch_size}")
    total, correct = 0.0, 0
    scale = np.float32(1.0 / 255.0)
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        xb = xb.astype(np.float32) * scale if xb.dtype == np.uint8 else np.asarray(xb, dtype=np.float32)
        yb = np.asarray(y[i:i + batch_size])
        if not np.issubdtype(yb.dtype, np.integer) or yb.min() < 0 or yb.max() >= model.n_classes:
            raise ZsgdError(f"labels must be integers in [0, {model.n_classes})")
        with np.errstate(over="ignore", invalid="ignore"):  # a diverged model shows as a non-finite loss, not warnings
            logits = np.ascontiguousarray(model.predict(w, xb), dtype=np.float32)
        s, c = K.xent_sum_correct(logits, yb.astype(np.int64))
        total += s
        correct += c
    return total / len(x), correct / len(x)


def warm_up(names: tuple[str, ...] = BUILTIN_MODELS, shared: bool = True) -> None:
    """Compile (or load from numba's cache) every kernel the built-in models use; ``shared``: also those every
    model's run uses (the optimizers' and the server step's, ``warm_optimizer``).

    Run once after installing, so the first training step of a real run, and
    every worker's start-up, reads compiled code instead of compiling it.
    With writable weights and read-only ones: a worker's and an evaluator's weights are views of the
    broker's message frames, and numba compiles (and caches) a kernel apart for a read-only array (a clean
    clone's first ``zsgd run`` compiled those for 5 s before its first update); and ``evaluate``'s own kernel.
    """
    rng = np.random.default_rng(0)
    for name in names:
        if name == LSTM_NAME:
            from zsgd.nn.lstm import warm_up as warm_up_lstm

            warm_up_lstm()
            _warm_lstm_read_only()
            continue
        m = get_model(name, input_shape=(1, 28, 28), n_classes=10)
        w = m.init(seed=0)
        x = rng.random((2, 1, 28, 28), dtype=np.float32)
        y = np.array([0, 1], dtype=np.int64)
        for weights in (w, read_only(w)):
            m.loss_and_grad(weights, x, y, training=True, seed=0)
            m.predict(weights, x)
        evaluate(m, read_only(w), x, y)
    if not shared:
        return
    from zsgd.nn.optim import OPTIMIZER_NAMES, warm_optimizer

    for opt in OPTIMIZER_NAMES:
        warm_optimizer(opt, weight_decay=1e-4)


def _warm_lstm_read_only() -> None:
    """The LSTM's step with read-only weights, and its evaluation (``zsgd.nn.lstm.warm_up`` does the writable step),
    on both of layer 0's paths (6 tokens or more: the block-wide projection instead of the token table), and with
    widths of whole panels (``NR``), whose inputs the weight gradients read in place, not through a padded copy."""
    from zsgd.nn.lstm import get_lstm
    from zsgd.nn.lstm_gemm import NR

    x = np.array([[0, 1, 2], [3, 4, 0]], np.int64)
    for width, vocab in ((4, 5), (4, 7), (NR, 5), (NR, 7)):
        m = get_lstm(f"lstm:embed={width},hidden={width},layers=2", vocab)
        w = read_only(m.init(0))
        m.loss_and_grad(w, x, x, state=m.init_state(2))
        stream = np.arange(4 * LM_EVAL_BATCH, dtype=np.int64) % vocab
        evaluate(m, w, stream, stream)


def read_only(a: np.ndarray) -> np.ndarray:
    """A read-only copy of ``a``, as weights that arrive in a message are (``warm_up``)."""
    out = np.array(a)
    out.flags.writeable = False
    return out


def warm_up_in_parallel(jobs: int | None = None) -> None:
    """``warm_up`` of every built-in model, in up to ``jobs`` processes (default: one per core, at most one
    per model): numba compiles on one thread, so ``zsgd remote init`` on a many-core host would otherwise
    compile for minutes on one core. Kernels two models share are compiled by both at worst; numba writes
    its cache files atomically."""
    import os
    import subprocess
    import sys

    # so the bins come out about even: on two cores cnn, mlp, logreg | lenet5, lstm and the shared kernels (compile
    # CPU about 10 + 1 + 1 | 5 + 7 + 3.5 s on the development machine, read-only variants included)
    order = ("cnn", "lenet5", "mlp", "lstm", "logreg")
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(order)))
    if jobs == 1:
        warm_up(order)
        return
    bins = [order[i::jobs] for i in range(jobs)]
    # the kernels every run shares (the optimizers') once, by the last bin (one without the cnn), not by every bin at once
    procs = [subprocess.Popen([sys.executable, "-c", f"import zsgd.nn.models as m; m.warm_up({names!r}, shared={i == jobs - 1})"],
                              stdin=subprocess.DEVNULL) for i, names in enumerate(bins)]
    failed = [names for names, proc in zip(bins, procs) if proc.wait() != 0]
    if failed:
        raise RuntimeError(f"compiling the kernels of {', '.join(n for names in failed for n in names)} failed")
