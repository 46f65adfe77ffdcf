"""A PyTorch module as a zsgd model: ``--model torch:package.module:factory``.

Why: researchers who study delays and staleness do it on their own models,
and writing a backward pass by hand for zsgd's numpy interface is a poor way
in. The adapter lets autograd do it while zsgd stays what it is: one flat
float32 vector that the broker sends as one frame and updates in one pass.

* ``factory(input_shape=(C, H, W), n_classes=K)`` (either argument may be left
  out of its signature) returns a ``torch.nn.Module`` mapping float32 images
  ``(N, C, H, W)`` in [0, 1] to logits ``(N, K)``, or a pair ``(module, loss)``
  where ``loss(logits, labels)`` returns a scalar tensor (default: mean
  cross-entropy, as zsgd's own models use). The factory runs under
  ``torch.manual_seed(seed)``, so every process that builds the model gets the
  same initial weights and the same constant buffers.
* The module's trainable parameters, in ``named_parameters()`` order, become
  views (``torch.from_numpy`` on slices) into the flat weight vector zsgd hands
  in: nothing is copied when that vector is writable; a read-only one (a
  received frame) is copied once into the adapter's own buffer.
  ``loss_and_grad`` lets autograd produce its gradient tensors as a plain
  PyTorch step does (``zero_grad(set_to_none=True)``) and writes them into
  the flat gradient with one ``torch.cat(..., out=)``: one pass over the
  parameters, cheaper than accumulating into zeroed views of the flat
  gradient (a zeroing pass and a read-add-write pass; measured, see
  ``benchmarks/bench_torch_adapter.py``). Parameters must be float32 on
  the CPU (refused in one line otherwise: call ``module.float()``); frozen
  ones (``requires_grad=False``) are not trained and stay as the factory made
  them, like buffers.
* ``state_dict(w)`` has the module's own names (``module.state_dict()``'s keys,
  buffers included), so ``user_module.load_state_dict({k: torch.from_numpy(v)
  ...})`` puts trained weights back into the user's module.

**Buffers are local to each process; they do not travel.** The flat vector is
what every algorithm updates with gradients (momentum, weight decay,
averaging, compression), and running statistics are not gradients, so they
are not in it. Constant buffers are the same everywhere (seeded factory).
BatchNorm's running statistics follow the batches that this process trained
on: in ``zsgd train`` that is every batch; in ``zsgd sim`` the one model that
computes every virtual worker's gradients; in ``zsgd run`` each worker keeps
its own, like FedBN. A process that has not trained a normalization layer
(the broker or evaluator of ``zsgd run``) evaluates it with each evaluation
batch's own statistics (``PREDICT_BATCH`` images) instead of its untouched
initial ones, so a distributed run's accuracy is not silently wrong; the
tests check both cases. That process's ``state_dict`` (the ``weights.npz`` of
``zsgd run``) therefore carries untrained statistics (``num_batches_tracked``
0): re-estimate them with a few forward passes in train mode before using
the module in eval mode.

Threads: a process whose ``OMP_NUM_THREADS`` is set (zsgd's workers, ``zsgd
run`` and ``zsgd sim`` set it to 1 before numpy loads, as they do for numba)
gets ``torch.set_num_threads`` to match, so workers compute on one thread each.

Importing this module does not import torch; building a model does, and
without torch installed that is a one-line error saying what to install.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable

import numpy as np

from zsgd.errors import ZsgdError
from zsgd.nn.flat import check_flat
from zsgd.nn.user_code import describe, load_factory, one_line, user_call

#: The spec prefix (also ``zsgd.nn.models.TORCH_PREFIX``).
PREFIX = "torch:"
#: Images per forward pass in ``predict``: bounds memory, and is the batch whose statistics an untrained
#: normalization layer uses (see the module docstring).
PREDICT_BATCH = 256


def import_torch() -> Any:
    """The ``torch`` module, or a one-line ZsgdError that says what to install."""
    try:
        import torch
    except ImportError as exc:
        raise ZsgdError(f"--model torch:... needs PyTorch, which this Python cannot import ({one_line(exc)}): "
                        f"pip install 'zsgd[torch]'") from None
    return torch


def torch_model(spec: str, input_shape: tuple[int, int, int], n_classes: int, seed: int = 0) -> "TorchModel":
    """Build ``spec`` (``torch:package.module:factory``) for images ``input_shape`` and ``n_classes`` classes."""
    target = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    if target.count(":") != 1 or not all(target.partition(":")[::2]):
        raise ZsgdError(f"bad model '{spec}': give torch:package.module:factory")
    torch = import_torch()
    _match_threads(torch)
    factory = load_factory(spec, target)
    return TorchModel(spec, factory, input_shape, n_classes, seed)


def _match_threads(torch: Any) -> None:
    n = os.environ.get("OMP_NUM_THREADS", "").strip()
    if n.isdigit() and int(n) >= 1 and torch.get_num_threads() != int(n):
        torch.set_num_threads(int(n))


class TorchModel:
    """A ``torch.nn.Module`` behind zsgd's model interface (``zsgd.nn.models.ModelLike``)."""

    streams_gradients = False  # autograd fills the gradient as a whole

    def __init__(self, spec: str, factory: Callable[..., Any], input_shape: tuple[int, int, int], n_classes: int,
                 seed: int = 0) -> None:
        self._torch = torch = import_torch()
        self.name = spec
        self.input_shape = tuple(int(s) for s in input_shape)
        self.n_classes = int(n_classes)
        self._factory = factory
        self._seed = int(seed)
        self._rng = np.random.default_rng(seed)
        self.module, self._loss = self._build(self._seed)
        self._params = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if not self._params:
            raise ZsgdError(f"model '{spec}': the module has no trainable parameters (requires_grad=True): nothing to train")
        self._slots: list[tuple[str, tuple[int, ...], int, int]] = []  # name, shape, offset, size
        off = 0
        for name, p in self._params:
            if p.dtype != torch.float32:
                raise ZsgdError(f"model '{spec}': parameter '{name}' is {p.dtype}; zsgd keeps the weights in one float32 "
                                f"vector: return module.float() from the factory")
            if p.device.type != "cpu":
                raise ZsgdError(f"model '{spec}': parameter '{name}' is on {p.device}; zsgd computes on the CPU: "
                                f"return the module on the CPU from the factory")
            self._slots.append((name, tuple(p.shape), off, p.numel()))
            off += p.numel()
        self.n_params = off
        self._w0 = self._flat_of(self.module)
        self._own = self._w0.copy()
        self._bound: np.ndarray | None = None
        self._bound_ptr = -1
        self._moded: bool | None = None
        self._bind(self._own)
        self._probe()

    # ------------------------------------------------------------ building

    def _build(self, seed: int) -> tuple[Any, Callable[[Any, Any], Any]]:
        torch = self._torch
        kwargs = _accepted(self._factory, {"input_shape": self.input_shape, "n_classes": self.n_classes})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            made = user_call(self.name, "the factory", lambda: self._factory(**kwargs))
        loss = torch.nn.functional.cross_entropy
        if isinstance(made, tuple) and len(made) == 2:
            made, loss = made
            if not callable(loss):
                raise ZsgdError(f"model '{self.name}': the factory's loss is {describe(loss)}, not a function of (logits, labels)")
        if not isinstance(made, torch.nn.Module):
            raise ZsgdError(f"model '{self.name}': the factory returned {describe(made)}, not a torch.nn.Module "
                            f"(or a (module, loss) pair)")
        return made, loss

    def _flat_of(self, module: Any) -> np.ndarray:
        params = dict(module.named_parameters())
        w = np.empty(self.n_params, np.float32)
        for name, shape, off, size in self._slots:
            p = params.get(name)
            if p is None or tuple(p.shape) != shape:
                raise ZsgdError(f"model '{self.name}': the factory built a different module for another seed "
                                f"(parameter '{name}'): it must build the same architecture every time")
            w[off:off + size] = p.detach().reshape(-1).numpy()
        return w

    def _probe(self) -> None:
        """One evaluation and one training step on two images, so a module that does not fit the data fails
        here in one line, before training starts; buffers are restored afterwards (a probe is not data)."""
        torch = self._torch
        saved = [(b, b.detach().clone()) for b in self.module.buffers()]
        x = np.full((2, *self.input_shape), 0.5, dtype=np.float32)
        y = np.arange(2, dtype=np.int64) % self.n_classes
        try:
            self.predict(self._own, x)
            self.loss_and_grad(self._own.copy(), x, y, training=True, seed=self._seed)
        finally:
            with torch.no_grad():
                for b, v in saved:
                    b.copy_(v)
            self._bind(self._own)

    # ------------------------------------------------------------ the flat vector

    def layout(self) -> list[tuple[str, tuple[int, ...], int]]:
        """(name, shape, offset into the flat vector) of every trained parameter, in ``named_parameters()`` order."""
        return [(n, s, o) for n, s, o, _ in self._slots]

    def init(self, seed: int = 0) -> np.ndarray:
        """The factory's initial weights under ``torch.manual_seed(seed)`` as a new flat vector."""
        if int(seed) == self._seed:
            return self._w0.copy()
        module, _ = self._build(int(seed))
        return self._flat_of(module)

    def _bind(self, w: np.ndarray) -> None:
        """Make the parameters views into ``w`` (a writable float32 vector), or into a copy of a read-only one."""
        if not w.flags.writeable:
            np.copyto(self._own, w)
            w = self._own
        ptr = w.__array_interface__["data"][0]
        if ptr == self._bound_ptr:  # self._bound keeps that memory alive, so it is the same memory
            return
        storage = self._torch.from_numpy(w).untyped_storage()
        with self._torch.no_grad():  # set_ on the storage: 16 us for the example's 20 tensors, p.data = ... takes 180
            for (_, p), (_, shape, off, _) in zip(self._params, self._slots):
                p.set_(storage, off, shape)
        self._bound, self._bound_ptr = w, ptr

    def state_dict(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """``module.state_dict()``'s names: trained parameters as views into ``w``, the rest (buffers, frozen
        parameters) as copies of this process's values."""
        w = check_flat(w, self.n_params, self.name)
        slots = {id(p): slot for (_, p), slot in zip(self._params, self._slots)}
        out: dict[str, np.ndarray] = {}
        for key, t in self.module.state_dict(keep_vars=True).items():
            if not isinstance(t, self._torch.Tensor):
                continue
            slot = slots.get(id(t))
            if slot is not None:
                _, shape, off, size = slot
                out[key] = w[off:off + size].reshape(shape)
            else:
                out[key] = t.detach().cpu().numpy().copy()
        return out

    def load_state_dict(self, sd: dict[str, Any]) -> np.ndarray:
        """A new flat vector from a ``state_dict`` (numpy arrays or CPU tensors, the module's names); buffers
        in it are loaded into this process's module."""
        torch = self._torch
        known = self.module.state_dict(keep_vars=True)
        missing = [n for n, _, _, _ in self._slots if n not in sd]
        extra = [k for k in sd if k not in known]
        if missing or extra:
            raise ZsgdError(f"state_dict does not match model '{self.name}': missing {missing}, unexpected {extra}")
        w = np.empty(self.n_params, np.float32)
        trained = {n for n, _, _, _ in self._slots}
        for name, shape, off, size in self._slots:
            v = _as_numpy(sd[name])
            if v.shape != shape:
                raise ZsgdError(f"state_dict['{name}'] has shape {v.shape}, model '{self.name}' needs {shape}")
            w[off:off + size] = v.astype(np.float32, copy=False).ravel()
        with torch.no_grad():
            for key, v in sd.items():
                t = known[key]
                if key not in trained and isinstance(t, torch.Tensor):
                    t.copy_(torch.as_tensor(_as_numpy(v)).reshape(t.shape))
        return w

    # ------------------------------------------------------------ validation

    def _check_x(self, x: Any) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape or x.shape[0] == 0:
            raise ZsgdError(f"model '{self.name}' expects input of shape (N>0, {', '.join(map(str, self.input_shape))}), "
                            f"got {x.shape}: check the data set's image shape")
        if not np.issubdtype(x.dtype, np.floating):
            raise ZsgdError(f"model '{self.name}' expects float32 images in [0, 1], got {x.dtype}: scale with zsgd.data.to_float")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _check_y(self, y: Any, n: int) -> np.ndarray:
        y = np.asarray(y)
        if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
            raise ZsgdError(f"labels must be an integer array of shape ({n},), got {y.dtype} {y.shape}")
        if int(y.min()) < 0 or int(y.max()) >= self.n_classes:
            raise ZsgdError(f"labels must be in [0, {self.n_classes}), got range [{y.min()}, {y.max()}]: check n_classes")
        return np.ascontiguousarray(y, dtype=np.int64)

    def _logits(self, xt: Any) -> Any:
        out = user_call(self.name, f"the module's forward on images of shape {self.input_shape}", lambda: self.module(xt))
        want = (xt.shape[0], self.n_classes)
        if not isinstance(out, self._torch.Tensor) or tuple(out.shape) != want:
            got = f"shape {tuple(out.shape)}" if isinstance(out, self._torch.Tensor) else describe(out)
            raise ZsgdError(f"model '{self.name}': the module maps {want[0]} images of shape {self.input_shape} to {got}; the data "
                            f"needs logits of shape {want} (one score per class)")
        return out

    # ------------------------------------------------------------ compute

    def loss_and_grad(self, w: np.ndarray, x: np.ndarray, y: np.ndarray, training: bool = True,
                      seed: int | None = None, out: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        """The loss on the batch and its gradient by autograd, written into a new flat vector (or ``out``).

        ``training=False`` runs the module in eval mode (no dropout; BatchNorm on its running statistics).
        ``seed`` seeds torch's generator for this step (dropout masks), so steps are reproducible.
        """
        torch = self._torch
        w = check_flat(w, self.n_params, self.name)
        x = self._check_x(x)
        y = self._check_y(y, x.shape[0])
        if out is None:
            grad = np.empty(self.n_params, np.float32)
        else:
            grad = out
            if grad.shape != (self.n_params,) or grad.dtype != np.float32 or not grad.flags.c_contiguous:
                raise ZsgdError(f"out must be a contiguous float32 vector of {self.n_params} parameters")
        self._bind(w)
        params = [p for _, p in self._params]
        for p in params:
            p.grad = None  # autograd hands backward's own tensors over, as after zero_grad(set_to_none=True)
        if seed is None:
            seed = int(self._rng.integers(0, 2**63 - 1))
        torch.default_generator.manual_seed(seed)  # the CPU generator dropout draws from (torch.manual_seed: 0.3-0.5 ms)
        self._mode(training)
        logits = self._logits(torch.from_numpy(x))
        loss = user_call(self.name, "the loss", lambda: self._loss(logits, torch.from_numpy(y)))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ZsgdError(f"model '{self.name}': the loss must return a scalar tensor that depends on the logits, got "
                            f"{describe(loss) if not isinstance(loss, torch.Tensor) else f'a tensor of shape {tuple(loss.shape)}'}")
        user_call(self.name, "backward", lambda: loss.backward())
        self._gather(params, torch.from_numpy(grad))
        return float(loss.detach()), grad

    def _gather(self, params: list[Any], flat: Any) -> None:
        """Write the parameters' gradients into ``flat`` in one pass (zeros for a parameter the loss does not
        reach) and let go of backward's tensors (the allocator reuses them for the next step)."""
        grads = [p.grad for p in params]
        if all(g is not None for g in grads):
            self._torch.cat([g.reshape(-1) for g in grads], out=flat)
        else:
            for g, (_, _, off, size) in zip(grads, self._slots):
                if g is None:
                    flat[off:off + size].zero_()
                else:
                    flat[off:off + size].copy_(g.reshape(-1))
        for p in params:
            p.grad = None

    def _mode(self, training: bool) -> None:
        """``module.train(training)``, skipped when the module is in that mode already (it walks every submodule)."""
        if self.module.training != training or self._moded != training:
            self.module.train(training)
            self._moded = training

    def predict(self, w: np.ndarray, x: np.ndarray, batch_size: int = PREDICT_BATCH) -> np.ndarray:
        """Logits (N, n_classes) in eval mode, ``batch_size`` images at a time."""
        torch = self._torch
        w = check_flat(w, self.n_params, self.name)
        x = np.asarray(x)
        self._check_x(x[:1])
        self._bind(w)
        self._mode(False)
        out = np.empty((x.shape[0], self.n_classes), np.float32)
        untrained = self._untrained_norms()
        saved = [(m, m.running_mean, m.running_var) for m in untrained]
        try:
            for m in untrained:  # no running statistics: normalize by the batch's own (see the module docstring)
                m.running_mean = m.running_var = None
            with torch.no_grad():
                for i in range(0, x.shape[0], batch_size):
                    xb = np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32)
                    out[i:i + len(xb)] = self._logits(torch.from_numpy(xb)).numpy()
        finally:
            for m, mean, var in saved:
                m.running_mean, m.running_var = mean, var
        return out

    def _untrained_norms(self) -> list[Any]:
        base = self._torch.nn.modules.batchnorm._NormBase
        return [m for m in self.module.modules()
                if isinstance(m, base) and m.track_running_stats and m.num_batches_tracked is not None
                and int(m.num_batches_tracked) == 0]

    def __repr__(self) -> str:
        return (f"TorchModel({self.name!r}, input_shape={self.input_shape}, n_classes={self.n_classes}, "
                f"n_params={self.n_params})")


def _accepted(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``kwargs`` that ``fn``'s signature takes (all of them if it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params and params[k].kind is not inspect.Parameter.POSITIONAL_ONLY}


def _as_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    return np.asarray(v)
