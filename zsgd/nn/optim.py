"""Optimizers as fused, in-place numba passes over the flat parameter vector.

Why fused: on the broker, applying an update is on the critical path of every
worker's round trip. A numpy expression such as ``buf = mu*buf + g;
w -= lr*buf`` makes four passes and two temporaries over a 4.8 MB vector;
the kernels below read ``w``, ``g`` and the state once and write them once.

The update rules match ``torch.optim`` (SGD with/without momentum and
Nesterov, Adagrad, Adam) with the same defaults and the same L2 weight decay
(``g + wd * w``), so a learning rate tuned in PyTorch carries over; the tests
compare several steps against ``torch.optim`` and a plain numpy reference.
Arithmetic is float32, like PyTorch's; the gradient is never modified
(it may be a read-only buffer straight off the wire).

``step(w, g, lr=...)`` takes a per-step learning rate so the broker can use
staleness-aware rates (``lr / staleness``) without rebuilding the optimizer.

``step_into(w, g, out, ...)`` is the server's variant (``zsgd.nn.server_step``):
one out-of-place pass that also checks the gradient is finite and folds in
gradient clipping; the new weights land in ``out`` and nothing changes when
the gradient holds NaN or Inf.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit
from numba import uint64 as u8

from zsgd import jit as _jit  # noqa: F401  before any @njit: LLVM options, cache keys (see zsgd.jit)
from zsgd.errors import ZsgdError
from zsgd.nn import server_step as _into

_FM = {"reassoc", "contract", "nsz", "arcp"}
OPTIMIZER_NAMES = ("sgd", "momentum", "nesterov", "adagrad", "adam", "adamw")


# ---------------------------------------------------------------- kernels


@njit(cache=True, fastmath=_FM)
def _sgd(w, g, lr, wd):
    for i in range(u8(w.size)):
        w[i] -= lr * (g[i] + wd * w[i])


@njit(cache=True, fastmath=_FM)
def _momentum(w, g, buf, lr, mu, wd, nesterov):
    for i in range(u8(w.size)):
        d = g[i] + wd * w[i]
        b = mu * buf[i] + d
        buf[i] = b
        if nesterov:
            w[i] -= lr * (d + mu * b)
        else:
            w[i] -= lr * b


@njit(cache=True, fastmath=_FM)
def _adagrad(w, g, acc, clr, wd, eps):
    for i in range(u8(w.size)):
        d = g[i] + wd * w[i]
        a = acc[i] + d * d
        acc[i] = a
        w[i] -= clr * d / (np.sqrt(a) + eps)


@njit(cache=True, fastmath=_FM)
def _adam(w, g, m, v, lr, b1, b2, eps, wd, decoupled, step_size, bc2_sqrt):
    one = np.float32(1.0)
    for i in range(u8(w.size)):
        wi = w[i]
        d = g[i]
        if decoupled:
            wi = wi * (one - lr * wd)
        else:
            d = d + wd * wi
        mi = b1 * m[i] + (one - b1) * d
        vi = b2 * v[i] + (one - b2) * d * d
        m[i] = mi
        v[i] = vi
        w[i] = wi - step_size * mi / (np.sqrt(vi) / bc2_sqrt + eps)


@njit(cache=True, fastmath=_FM)
def _sumsq(g):
    s = 0.0
    for i in range(u8(g.size)):
        x = np.float64(g[i])
        s += x * x
    return s


@njit(cache=True, fastmath=_FM)
def _scale(g, c):
    for i in range(u8(g.size)):
        g[i] *= c


# ---------------------------------------------------------------- API


def clip_grad_norm(g: np.ndarray, max_norm: float) -> float:
    """Scale ``g`` in place so its L2 norm is at most ``max_norm``; return the norm before.

    Same rule as ``torch.nn.utils.clip_grad_norm_`` (factor ``max_norm /
    (norm + 1e-6)`` when above). A non-finite norm leaves ``g`` untouched and
    is returned as is, so the caller can drop that update instead of spreading
    NaN through the model.
    """
    if not (max_norm > 0 and math.isfinite(max_norm)):
        raise ZsgdError(f"max_norm must be a positive number, got {max_norm}")
    if not isinstance(g, np.ndarray) or g.dtype != np.float32 or g.ndim != 1 or not g.flags.c_contiguous:
        raise ZsgdError("clip_grad_norm needs a contiguous 1-D float32 gradient")
    norm = math.sqrt(_sumsq(g))
    if math.isfinite(norm) and norm > max_norm:
        _scale(g, np.float32(max_norm / (norm + 1e-6)))
    return norm


def _check_lr(lr: float, allow_zero: bool = False) -> float:
    """A usable rate; a per-step override may be 0 (a schedule at its end: the step only updates the optimizer's state)."""
    try:
        lr = float(lr)
    except (TypeError, ValueError):
        raise ZsgdError(f"learning rate must be a number, got {lr!r}") from None
    if not ((lr > 0 or (allow_zero and lr == 0)) and math.isfinite(lr)):
        raise ZsgdError(f"learning rate must be > 0 and finite, got {lr}: try 0.01 (SGD) or 0.001 (Adam)")
    return lr


def _check_unit(name: str, x: float) -> float:
    x = float(x)
    if not 0.0 <= x < 1.0:
        raise ZsgdError(f"{name} must be in [0, 1), got {x}")
    return x


class Optimizer:
    """Base class: holds ``lr``, ``weight_decay``, a step counter and flat float32 state."""

    name = "sgd"
    _state_names: tuple[str, ...] = ()

    def __init__(self, n_params: int, lr: float, weight_decay: float = 0.0):
        if isinstance(n_params, bool) or not isinstance(n_params, (int, np.integer)) or n_params < 1:
            raise ZsgdError(f"n_params must be a positive integer, got {n_params!r}")
        self.n_params = int(n_params)
        self.lr = _check_lr(lr)
        wd = float(weight_decay)
        if not (wd >= 0 and math.isfinite(wd)):
            raise ZsgdError(f"weight_decay must be >= 0, got {weight_decay}: try 0 or 5e-4")
        self.weight_decay = wd
        self.steps = 0
        self._state = {k: np.zeros(self.n_params, np.float32) for k in self._state_names}
        self._spare: dict[str, np.ndarray] | None = None  # step_into's second state set

    def _check(self, w: np.ndarray, g: np.ndarray, writable: bool = True) -> None:
        for nm, a in (("weights", w), ("gradient", g)):
            if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != (self.n_params,) \
                    or not a.flags.c_contiguous:
                got = f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}"
                raise ZsgdError(f"{self.name}: {nm} must be a contiguous float32 vector of {self.n_params}, got {got}")
        if writable and not w.flags.writeable:
            raise ZsgdError(f"{self.name}: weights are read-only; pass a writable copy")

    def step(self, w: np.ndarray, g: np.ndarray, lr: float | None = None) -> None:
        """Update ``w`` in place from gradient ``g`` (one fused pass); ``lr`` overrides ``self.lr`` once."""
        self._check(w, g)
        lr = self.lr if lr is None else _check_lr(lr, allow_zero=True)
        self.steps += 1
        self._update(w, g, lr)

    def _update(self, w: np.ndarray, g: np.ndarray, lr: float) -> None:
        _sgd(w, g, np.float32(lr), np.float32(self.weight_decay))

    def step_into(self, w: np.ndarray, g: np.ndarray, out: np.ndarray, lr: float | None = None,
                  clip_norm: float | None = None) -> bool:
        """One fused out-of-place step: ``out`` gets the new weights; ``w`` and ``g`` are only read.

        Checks that ``g`` is finite in the same pass and, with ``clip_norm``,
        scales it as :func:`clip_grad_norm` would (one extra read of ``g`` for
        its norm). Returns False, changing nothing (state, step count), when
        ``g`` holds NaN or Inf. The state is double-buffered: the pass writes
        the spare set, which becomes current on success.
        """
        self._check(w, g, writable=False)
        if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != w.shape or not out.flags.c_contiguous \
                or not out.flags.writeable or np.may_share_memory(out, w) or np.may_share_memory(out, g):
            raise ZsgdError(f"{self.name}: out must be a writable contiguous float32 vector of {self.n_params}, apart from w and g")
        lr = self.lr if lr is None else _check_lr(lr, allow_zero=True)
        scaled, c = False, np.float32(1.0)
        if clip_norm is not None:
            norm = math.sqrt(_sumsq(g))
            if not math.isfinite(norm):
                return False
            if norm > clip_norm:
                scaled, c = True, np.float32(clip_norm / (norm + 1e-6))
        spare = self._spare
        if spare is None:
            spare = {k: np.empty(self.n_params, np.float32) for k in self._state_names}
        self.steps += 1
        if not self._update_into(w, g, out, spare, lr, scaled, c):
            self.steps -= 1
            self._spare = spare
            return False
        self._spare, self._state = self._state, spare
        return True

    def _update_into(self, w, g, out, new, lr, scaled, c) -> bool:
        return _into.sgd_into(w, g, out, np.float32(lr), np.float32(self.weight_decay), scaled, c)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Checkpointable state: flat float32 arrays (copies) and ``step`` (int64 scalar array)."""
        d = {k: v.copy() for k, v in self._state.items()}
        d["step"] = np.array(self.steps, dtype=np.int64)
        return d

    def load_state_arrays(self, d: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state_arrays` returned; validates names, sizes and dtypes."""
        want = set(self._state_names) | {"step"}
        if set(d) != want:
            raise ZsgdError(f"optimizer state for '{self.name}' needs {sorted(want)}, got {sorted(d)}: "
                            f"was the checkpoint written with another optimizer?")
        step = np.asarray(d["step"])
        if step.size != 1 or not np.issubdtype(step.dtype, np.integer) or int(step) < 0:
            raise ZsgdError(f"optimizer state 'step' must be a non-negative integer, got {step!r}")
        new = {}
        for k in self._state_names:
            a = np.asarray(d[k])
            if a.shape != (self.n_params,) or a.dtype != np.float32:
                raise ZsgdError(f"optimizer state '{k}' must be float32 ({self.n_params},), got {a.dtype} {a.shape}")
            new[k] = a.copy()
        self._state = new
        self._spare = None
        self.steps = int(step)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lr={self.lr}, weight_decay={self.weight_decay}, steps={self.steps})"


class SGD(Optimizer):
    """Plain SGD: ``w -= lr * (g + wd * w)``."""


class Momentum(Optimizer):
    """Heavy-ball momentum as ``torch.optim.SGD(momentum=mu)`` (dampening 0); optional Nesterov."""

    name = "momentum"
    _state_names = ("momentum_buffer",)

    def __init__(self, n_params: int, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False):
        super().__init__(n_params, lr, weight_decay)
        self.momentum = _check_unit("momentum", momentum)
        self.nesterov = bool(nesterov)
        if self.nesterov:
            self.name = "nesterov"
            if self.momentum == 0.0:
                raise ZsgdError("nesterov needs momentum > 0 (e.g. 0.9)")

    def _update(self, w, g, lr):
        _momentum(w, g, self._state["momentum_buffer"], np.float32(lr), np.float32(self.momentum),
                  np.float32(self.weight_decay), self.nesterov)

    def _update_into(self, w, g, out, new, lr, scaled, c):
        return _into.momentum_into(w, g, self._state["momentum_buffer"], out, new["momentum_buffer"], np.float32(lr),
                                   np.float32(self.momentum), np.float32(self.weight_decay), self.nesterov, scaled, c)


class Adagrad(Optimizer):
    """``torch.optim.Adagrad``: per-coordinate rate ``lr / sqrt(sum g^2)``; ``lr_decay``, ``eps=1e-10``."""

    name = "adagrad"
    _state_names = ("sum",)

    def __init__(self, n_params: int, lr: float, weight_decay: float = 0.0, lr_decay: float = 0.0,
                 eps: float = 1e-10):
        super().__init__(n_params, lr, weight_decay)
        self.lr_decay = float(lr_decay)
        self.eps = float(eps)
        if not self.lr_decay >= 0:
            raise ZsgdError(f"lr_decay must be >= 0, got {lr_decay}")
        if not self.eps > 0:
            raise ZsgdError(f"eps must be > 0, got {eps}")

    def _update(self, w, g, lr):
        clr = lr / (1.0 + (self.steps - 1) * self.lr_decay)
        _adagrad(w, g, self._state["sum"], np.float32(clr), np.float32(self.weight_decay), np.float32(self.eps))

    def _update_into(self, w, g, out, new, lr, scaled, c):
        clr = lr / (1.0 + (self.steps - 1) * self.lr_decay)
        return _into.adagrad_into(w, g, self._state["sum"], out, new["sum"], np.float32(clr), np.float32(self.weight_decay),
                                  np.float32(self.eps), scaled, c)


class Adam(Optimizer):
    """``torch.optim.Adam`` (L2 weight decay), or AdamW with ``decoupled_weight_decay=True``.

    Defaults ``betas=(0.9, 0.999)``, ``eps=1e-8``; a good starting ``lr`` is 1e-3.
    """

    name = "adam"
    _state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, n_params: int, lr: float, weight_decay: float = 0.0, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, decoupled_weight_decay: bool = False,
                 betas: tuple[float, float] | None = None):
        super().__init__(n_params, lr, weight_decay)
        if betas is not None:
            beta1, beta2 = betas
        self.beta1 = _check_unit("beta1", beta1)
        self.beta2 = _check_unit("beta2", beta2)
        self.eps = float(eps)
        if not self.eps > 0:
            raise ZsgdError(f"eps must be > 0, got {eps}")
        self.decoupled = bool(decoupled_weight_decay)
        if self.decoupled:
            self.name = "adamw"

    def _bias(self, lr):
        t = self.steps
        return lr / (1.0 - self.beta1 ** t), math.sqrt(1.0 - self.beta2 ** t)

    def _update(self, w, g, lr):
        step_size, bc2_sqrt = self._bias(lr)
        f = np.float32
        _adam(w, g, self._state["exp_avg"], self._state["exp_avg_sq"], f(lr), f(self.beta1), f(self.beta2),
              f(self.eps), f(self.weight_decay), self.decoupled, f(step_size), f(bc2_sqrt))

    def _update_into(self, w, g, out, new, lr, scaled, c):
        step_size, bc2_sqrt = self._bias(lr)
        f = np.float32
        return _into.adam_into(w, g, self._state["exp_avg"], self._state["exp_avg_sq"], out, new["exp_avg"], new["exp_avg_sq"],
                               f(lr), f(self.beta1), f(self.beta2), f(self.eps), f(self.weight_decay), self.decoupled,
                               f(step_size), f(bc2_sqrt), scaled, c)


def make_optimizer(name: str, n_params: int, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                   **kw) -> Optimizer:
    """Build an optimizer: ``sgd|momentum|nesterov|adagrad|adam`` (and ``adamw``).

    ``momentum`` is used by ``momentum``/``nesterov`` only (so one config can
    switch optimizers freely). Extra keywords: Adagrad ``lr_decay``, ``eps``;
    Adam ``beta1``, ``beta2`` (or ``betas``), ``eps``, ``decoupled_weight_decay``.
    """
    try:
        _check_unit("momentum", momentum)  # checked for every name: a bad flag is a bad flag
        if name == "sgd":
            opt: Optimizer = SGD(n_params, lr, weight_decay, **kw)
        elif name in ("momentum", "nesterov"):
            opt = Momentum(n_params, lr, momentum, weight_decay, nesterov=name == "nesterov", **kw)
        elif name == "adagrad":
            opt = Adagrad(n_params, lr, weight_decay, **kw)
        elif name in ("adam", "adamw"):
            if name == "adamw":
                kw.setdefault("decoupled_weight_decay", True)
            opt = Adam(n_params, lr, weight_decay, **kw)
        else:
            raise ZsgdError(f"unknown optimizer '{name}': choose one of {', '.join(OPTIMIZER_NAMES)}")
    except TypeError as exc:
        raise ZsgdError(f"bad option for optimizer '{name}': {exc}") from None
    except ValueError as exc:
        raise ZsgdError(f"bad hyper-parameter for optimizer '{name}': {exc}") from None
    return opt


def warm_optimizer(name: str, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
    """Compile (or load from numba's cache) the update kernel of optimizer ``name``.

    The first call of a numba kernel in a process costs about a second (the
    cache is read and the dispatcher set up); a broker that paid it on the
    first update would fall silent for longer than a short heartbeat
    timeout. A two-element scratch optimizer takes the same kernel path.
    Each with a writable gradient and a read-only one: a broker's gradients are views of the workers'
    message frames, and numba compiles (and caches) a kernel apart for a read-only array.
    """
    opt = make_optimizer(name, 2, lr=1e-3, momentum=momentum, weight_decay=weight_decay)
    read_only = np.ones(2, dtype=np.float32)
    read_only.flags.writeable = False
    for g in (np.ones(2, dtype=np.float32), read_only):
        opt.step(np.zeros(2, dtype=np.float32), g, 1e-3)
        # the server step's kernels too: its finite check, the aggregators' sum and the out-of-place pass (with and without clipping)
        _into.all_finite(g)
        _into.add_scaled(np.zeros(2, dtype=np.float32), g, np.float32(1))
        for clip in (None, 1e-3):
            opt.step_into(np.zeros(2, dtype=np.float32), g, np.empty(2, dtype=np.float32), 1e-3, clip_norm=clip)
