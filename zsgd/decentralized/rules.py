"""Decentralized update rules, sans-IO: one object per node, no sockets, no clocks.

A node holds its flat float32 model ``x`` (and its algorithm's state), says
what it shares with its neighbours this round (``public()``), and advances
one round when handed its neighbours' values *of the same round*
(``step(received, own)``). That is **Jacobi** mixing: every node of round k
mixes round-k values only, never a neighbour's round-(k+1) value (which would
be Gauss-Seidel and would make the result depend on the order nodes run in).
The rule enforces it by never mutating a shared array: each round makes new
arrays and the old ones are frozen (read-only), so a value handed out in
round k stays the round-k value even while the node computes round k+1.

``received[j][name]`` are neighbour j's public arrays; ``own[name]`` is what
the neighbours hold of *this* node (the same as the node's state unless the
messages are compressed, see ``peer.py``). With compression the mixing uses
the CHOCO form (Koloskova et al. 2019)::

    mix(x_i) = x_i + gamma * sum_j W_ij (xhat_j - xhat_i)

which equals ``sum_j W_ij x_j`` when ``xhat = x`` and ``gamma = 1``, and keeps the
nodes' average exactly in both cases (W is symmetric), so compression delays
consensus but does not bias the average.

Rules (``g_i`` is node i's stochastic gradient on its own shard):

- ``dsgd`` (Nedic & Ozdaglar 2009; Lian et al. 2017):
  ``x_i <- sum_j W_ij x_j - alpha_k g_i(x_i)``. With a constant step it
  converges to a neighbourhood of the optimum whose size grows with alpha and
  with how different the nodes' local optima are (non-iid data); a decaying
  step removes that bias slowly.
- ``dsgt`` (gradient tracking; Di Lorenzo & Scutari 2016, Pu & Nedic 2020):
  ``x_i <- sum_j W_ij x_j - alpha_k y_i``;
  ``y_i <- sum_j W_ij y_j + g_i(x_i_new) - g_i(x_i_old)``, ``y_i^0 = g_i(x_i^0)``.
  The average of the y's is always the average gradient, so y_i tracks the
  *global* gradient and a constant step converges to the exact optimum
  (deterministic gradients) however heterogeneous the shards are. Costs two
  arrays per message instead of one.
- ``cadmm`` (consensus ADMM as in DiNNO, Yu et al. 2022): each round, with the
  round's neighbour models x_j: dual ``p_i <- p_i + rho sum_j (x_i - x_j)``;
  primal: ``primal_steps`` steps of the local optimizer on
  ``L_i(x) + <p_i, x> + rho sum_j ||x - (x_i + x_j)/2||^2`` starting at x_i;
  then ``rho <- rho * rho_scaling``. The duals sum to zero over the graph, so
  at a fixed point all x_i agree and minimise sum_i L_i (the centralized
  solution), exactly, with a constant rho.

Step size of dsgd/dsgt: ``alpha_k = alpha0 / (1 + mu * k)`` (k = round). This
is the usual O(1/k) family (the earlier project's DSGD took the same alpha0
and mu); ``mu = 0`` is a constant step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from zsgd.decentralized.topology import MixingRow
from zsgd.errors import ZsgdError

#: x -> (mean loss, gradient, samples used). The gradient must be a fresh array: rules scale it in place.
GradFn = Callable[[np.ndarray], tuple[float, np.ndarray, int]]


def node_gradient(step: Any, clip_norm: float | None, weight_decay: float, add_weight_decay: bool) -> GradFn:
    """A node's gradient from its ``WorkerStep``: clipped, plus weight decay.

    One definition for ``zsgd sim`` and ``zsgd run`` nodes, so a real run and
    its simulated arm compute the very same steps. CADMM leaves weight decay
    to its local optimizer (``add_weight_decay=False``).
    """
    from zsgd.nn.optim import clip_grad_norm

    wd = np.float32(weight_decay) if add_weight_decay and weight_decay else None

    def grad(w: np.ndarray) -> tuple[float, np.ndarray, int]:
        u = step.compute(w, step.steps)
        g = u.grad
        if clip_norm is not None:
            clip_grad_norm(g, clip_norm)
        if wd is not None:
            g += wd * w
        return u.loss, g, u.n_samples

    return grad

FLOAT32_MAX = float(np.finfo(np.float32).max)
DECENTRALIZED = ("dsgd", "dsgt", "cadmm")
#: Hyper-parameters each rule takes (the experiment config rejects the others).
PARAMS_OF: dict[str, tuple[str, ...]] = {
    "dsgd": ("alpha0", "mu", "gamma"),
    "dsgt": ("alpha0", "mu", "gamma"),
    "cadmm": ("rho", "rho_scaling", "primal_steps"),
}


#: CHOCO consensus step used with compressed messages unless ``gamma`` is given (see DecentralizedParams).
COMPRESSED_GAMMA = 0.2


def is_decentralized(algo: str) -> bool:
    return str(algo).strip().partition(":")[0] in DECENTRALIZED


@dataclass(frozen=True)
class DecentralizedParams:
    """Hyper-parameters of the three rules, with defaults and why.

    - ``alpha0`` None: the problem's ``lr``, so a dsgd arm steps like the
      centralized arms it is compared with; ``mu`` 0: a constant step, the
      fair comparison with the constant-lr centralized arms over a fixed
      budget (set e.g. 1e-3 to halve the step by round 1000 and shrink dsgd's bias).
    - ``rho`` 0.1 and ``rho_scaling`` 1.0: small enough that the first rounds
      are mostly local learning (the coupling ``2 rho d`` stays well below the
      curvature of a softmax loss), large enough that nodes agree within a few
      hundred rounds on the embedded set (0.3 did marginally better on a
      classes:2 ring there, 76.4% vs 75.8%, but the coupling grows with the
      degree and a larger rho destabilises dense graphs: see ``CADMM``). A
      constant rho converges exactly; DiNNO grows it by a factor slightly above
      1 per round (e.g. ``rho_scaling`` 1.001) to tighten consensus late.
    - ``primal_steps`` 5: a handful of local steps, as in DiNNO; more steps
      solve the primal better but cost compute per round (time = steps x compute).
    - ``gamma`` None: the consensus step of CHOCO mixing, 1.0 (plain mixing)
      without compression and ``COMPRESSED_GAMMA`` 0.2 with it. Why not 1 with
      compression: the public copies lag the models, and full steps towards
      lagging copies oscillate. Measured on the embedded set (logreg, ring of
      8, dsgd, 300 rounds): topk:0.1 at gamma 1 diverged (consensus error
      5e5), at 0.5 and 0.2 reached 77.8%; topk:0.01 needed 0.2 (77.6%; 0.5
      gave 64.5%); qsgd:4 was fine at any gamma.
    """

    alpha0: float | None = None
    mu: float = 0.0
    rho: float = 0.1
    rho_scaling: float = 1.0
    primal_steps: int = 5
    gamma: float | None = None

    def resolved_gamma(self, compress: str = "none") -> float:
        if self.gamma is not None:
            return self.gamma
        return 1.0 if compress == "none" else COMPRESSED_GAMMA

    def validate(self) -> "DecentralizedParams":
        def pos(name: str, v: Any, allow_zero: bool = False) -> None:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
            if not ok:
                raise ZsgdError(f"bad {name} {v!r}: must be a {'non-negative' if allow_zero else 'positive'} number")
            if v > FLOAT32_MAX:  # the rules compute in float32: it would be inf from the first round
                raise ZsgdError(f"bad {name} {v!r}: must be at most {FLOAT32_MAX:.4g} (the rules compute in float32)")

        if self.alpha0 is not None:
            pos("alpha0", self.alpha0)
        pos("mu", self.mu, allow_zero=True)
        pos("rho", self.rho)
        pos("rho_scaling", self.rho_scaling)
        if not (isinstance(self.primal_steps, int) and not isinstance(self.primal_steps, bool) and self.primal_steps >= 1):
            raise ZsgdError(f"bad primal_steps {self.primal_steps!r}: must be a whole number >= 1")
        if self.gamma is not None:
            pos("gamma", self.gamma)
        if self.gamma is not None and self.gamma > 1:
            raise ZsgdError(f"bad gamma {self.gamma!r}: the consensus step must be in (0, 1]")
        return self

    def for_algo(self, algo: str) -> dict[str, Any]:
        """The parameters ``algo`` uses (for config.yaml and summaries)."""
        return {k: v for k, v in asdict(self).items() if k in PARAMS_OF[algo]}


@dataclass(frozen=True)
class StepStats:
    """What one node did in one round (for metrics and the virtual clock)."""

    loss: float  # mean local loss over this round's gradient steps
    samples: int
    grad_steps: int  # gradient evaluations (compute time is proportional)
    lr: float  # alpha_k (dsgd/dsgt) or rho (cadmm)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def mix(row: MixingRow, state: np.ndarray, own: np.ndarray, received: list[np.ndarray], gamma: float = 1.0,
        tmp: np.ndarray | None = None) -> np.ndarray:
    """One Metropolis mixing of ``state`` with the neighbours' ``received`` values: a new float32 array.

    ``own`` is what the neighbours hold of this node; when it *is* ``state`` and
    gamma is 1, this is the textbook ``W_ii x_i + sum_j W_ij x_j`` (bit for bit);
    otherwise the CHOCO form, equal in exact arithmetic when ``own == state``.
    One pass per neighbour over the flat vector; ``tmp`` is scratch of the same size.
    """
    tmp = np.empty_like(state) if tmp is None else tmp
    if own is state and gamma == 1.0:
        out = np.multiply(state, np.float32(row.self_weight))
        for w, a in zip(row.weights, received):
            out += np.multiply(a, np.float32(w), out=tmp)
        return out
    acc = np.multiply(own, np.float32(-(1.0 - row.self_weight)))
    for w, a in zip(row.weights, received):
        acc += np.multiply(a, np.float32(w), out=tmp)
    if gamma != 1.0:
        acc *= np.float32(gamma)
    acc += state
    return acc


class NodeRule:
    """One node's state and update; subclasses define ``shared`` and ``step``."""

    name = "base"
    shared: tuple[str, ...] = ("x",)
    #: The rule's own local optimizer applies the weight decay (cadmm), so its gradients carry none.
    applies_weight_decay = False
    #: What a diverged run's reason tells the user to change.
    diverge_hint = "lower --lr"

    @classmethod
    def batches_per_round(cls, params: "DecentralizedParams") -> int:
        """Mini-batches a node takes in one round (cadmm: its primal steps)."""
        return 1

    def __init__(self, row: MixingRow, x0: np.ndarray, grad_fn: GradFn) -> None:
        self.row = row
        self.node = row.node
        self.grad_fn = grad_fn
        self.round = 0
        self.x = _frozen(np.array(x0, dtype=np.float32, copy=True))
        self._tmp: np.ndarray | None = None

    def public(self) -> dict[str, np.ndarray]:
        """This round's shared arrays (read-only; they never change afterwards)."""
        return {"x": self.x}

    def step(self, received: Mapping[int, Mapping[str, np.ndarray]], own: Mapping[str, np.ndarray] | None = None) -> StepStats:
        """Advance from round k to k+1 given every neighbour's round-k ``public()``."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return {"round": self.round}

    # -- helpers ---------------------------------------------------------
    def _neighbour_values(self, received: Mapping[int, Mapping[str, np.ndarray]], name: str) -> list[np.ndarray]:
        if set(received) != set(self.row.neighbours):
            raise ValueError(f"node {self.node} round {self.round}: got values from {sorted(received)}, "
                             f"expected its neighbours {list(self.row.neighbours)}")
        return [received[j][name] for j in self.row.neighbours]

    def _scratch(self) -> np.ndarray:
        if self._tmp is None:
            self._tmp = np.empty_like(self.x)
        return self._tmp


class _Stepped(NodeRule):
    """dsgd and dsgt: a step-size schedule and an optional CHOCO gamma."""

    def __init__(self, row: MixingRow, x0: np.ndarray, grad_fn: GradFn, *, alpha0: float, mu: float = 0.0,
                 gamma: float = 1.0) -> None:
        super().__init__(row, x0, grad_fn)
        if not alpha0 > 0 or not mu >= 0 or not 0 < gamma <= 1:
            raise ValueError("need alpha0 > 0, mu >= 0, 0 < gamma <= 1")
        self.alpha0, self.mu, self.gamma = float(alpha0), float(mu), float(gamma)

    def alpha(self, k: int) -> float:
        """alpha_k = alpha0 / (1 + mu k)."""
        return self.alpha0 / (1.0 + self.mu * k)


class DSGD(_Stepped):
    """Decentralized SGD: mix, then step along the local gradient at the round's own model."""

    name = "dsgd"

    def step(self, received: Mapping[int, Mapping[str, np.ndarray]], own: Mapping[str, np.ndarray] | None = None) -> StepStats:
        xs = self._neighbour_values(received, "x")
        alpha = self.alpha(self.round)
        loss, g, n = self.grad_fn(self.x)  # g_i(x_i^k)
        new = mix(self.row, self.x, own["x"] if own is not None else self.x, xs, self.gamma, self._scratch())
        new -= np.multiply(g, np.float32(alpha), out=g)
        self.x = _frozen(new)
        self.round += 1
        return StepStats(loss, n, 1, alpha)


class DSGT(_Stepped):
    """Gradient tracking: x moves along y, y mixes and adds the change of the local gradient."""

    name = "dsgt"
    shared = ("x", "y")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.y: np.ndarray | None = None
        self.g_prev: np.ndarray | None = None
        self._pending = (0.0, 0, 0)  # the initial gradient's loss, samples, steps: reported with round 0

    def _init(self) -> None:
        loss, g, n = self.grad_fn(self.x)
        self.g_prev = _frozen(g)
        self.y = self.g_prev  # y^0 = g(x^0); both read-only, so sharing one array is safe
        self._pending = (loss, n, 1)

    def public(self) -> dict[str, np.ndarray]:
        if self.y is None:
            self._init()
        assert self.y is not None
        return {"x": self.x, "y": self.y}

    def step(self, received: Mapping[int, Mapping[str, np.ndarray]], own: Mapping[str, np.ndarray] | None = None) -> StepStats:
        if self.y is None:
            self._init()
        assert self.y is not None and self.g_prev is not None
        xs = self._neighbour_values(received, "x")
        ys = self._neighbour_values(received, "y")
        own_x = own["x"] if own is not None else self.x
        own_y = own["y"] if own is not None else self.y
        alpha = self.alpha(self.round)
        tmp = self._scratch()
        x_new = mix(self.row, self.x, own_x, xs, self.gamma, tmp)
        x_new -= np.multiply(self.y, np.float32(alpha), out=tmp)
        y_new = mix(self.row, self.y, own_y, ys, self.gamma, tmp)
        loss, g, n = self.grad_fn(x_new)
        y_new += g
        y_new -= self.g_prev
        self.x, self.y, self.g_prev = _frozen(x_new), _frozen(y_new), _frozen(g)
        self.round += 1
        l0, n0, s0 = self._pending
        self._pending = (0.0, 0, 0)
        mean_loss = (loss * n + l0 * n0) / (n + n0) if s0 else loss
        return StepStats(mean_loss, n + n0, 1 + s0, alpha)


class CADMM(NodeRule):
    """Consensus ADMM with an inexact primal step (a few local optimizer steps), as in DiNNO.

    Stability: the primal objective's curvature is L + 2 rho d, so the local
    optimizer needs roughly ``lr (L + 2 rho d) < 2``: a high-degree graph wants
    a smaller rho (or lr) than a ring.
    """

    diverge_hint = "lower --lr or --rho (or --rho-scaling)"

    name = "cadmm"
    applies_weight_decay = True

    @classmethod
    def batches_per_round(cls, params: "DecentralizedParams") -> int:
        return params.primal_steps

    def __init__(self, row: MixingRow, x0: np.ndarray, grad_fn: GradFn, *, optimizer: Any, rho: float = 0.1,
                 rho_scaling: float = 1.0, primal_steps: int = 5) -> None:
        super().__init__(row, x0, grad_fn)
        if not rho > 0 or not rho_scaling > 0 or primal_steps < 1:
            raise ValueError("need rho > 0, rho_scaling > 0, primal_steps >= 1")
        self.optimizer = optimizer  # persists across rounds (its momentum/Adam moments), as DiNNO's does
        self.rho, self.rho_scaling, self.primal_steps = float(rho), float(rho_scaling), int(primal_steps)
        self.p = np.zeros_like(self.x)  # the dual; never shared, so updated in place

    def step(self, received: Mapping[int, Mapping[str, np.ndarray]], own: Mapping[str, np.ndarray] | None = None) -> StepStats:
        xs = self._neighbour_values(received, "x")
        xi = own["x"] if own is not None else self.x
        d, rho = len(xs), self.rho
        s = np.zeros_like(self.x)
        for a in xs:
            s += a
        with np.errstate(over="ignore", invalid="ignore"):  # a rho too large overflows: the ledger says diverged
            # dual: p += rho * (d x_i - sum_j x_j)
            self.p += np.float32(rho) * (np.float32(d) * xi - s)
            # gradient of the augmented term: 2 rho sum_j (z - (x_i + x_j)/2) = 2 rho d z - rho (d x_i + s)
            b = self.p - np.float32(rho) * (np.float32(d) * xi + s)
        z = np.array(self.x, dtype=np.float32, copy=True)
        loss_sum, samples = 0.0, 0
        coupling = np.float32(2.0 * rho * d)
        tmp = self._scratch()
        for _ in range(self.primal_steps):
            loss, g, n = self.grad_fn(z)
            g += b
            if d:
                g += np.multiply(z, coupling, out=tmp)
            self.optimizer.step(z, g)
            loss_sum += loss * n
            samples += n
        self.x = _frozen(z)
        self.rho *= self.rho_scaling
        self.round += 1
        return StepStats(loss_sum / samples if samples else math.nan, samples, self.primal_steps, rho)

    def state(self) -> dict[str, Any]:
        return super().state() | {"rho": self.rho}


RULES: dict[str, type[NodeRule]] = {}  # filled below, once the classes exist


def rule_class(algo: str) -> type[NodeRule]:
    """The node rule's class for ``algo``: its capabilities without building it."""
    return RULES[str(algo).strip()]


def make_rule(algo: str, row: MixingRow, x0: np.ndarray, grad_fn: GradFn, params: DecentralizedParams, *,
              lr: float, optimizer: Any = None) -> NodeRule:
    """The node rule for ``algo``; ``lr`` is the problem's (alpha0's default), ``optimizer`` cadmm's local one.

    A ``gamma`` of None means 1.0 here: the caller that knows about compression
    (``DecentralizedRound.build``) resolves it first.
    """
    name = str(algo).strip()
    if name == "dsgd":
        return DSGD(row, x0, grad_fn, alpha0=params.alpha0 or lr, mu=params.mu, gamma=params.resolved_gamma())
    if name == "dsgt":
        return DSGT(row, x0, grad_fn, alpha0=params.alpha0 or lr, mu=params.mu, gamma=params.resolved_gamma())
    if name == "cadmm":
        if optimizer is None:
            from zsgd.nn.optim import SGD

            optimizer = SGD(int(np.size(x0)), lr)
        return CADMM(row, x0, grad_fn, optimizer=optimizer, rho=params.rho, rho_scaling=params.rho_scaling,
                     primal_steps=params.primal_steps)
    raise ZsgdError(f"unknown decentralized algorithm {algo!r}; choose one of {', '.join(DECENTRALIZED)}")


RULES.update({"dsgd": DSGD, "dsgt": DSGT, "cadmm": CADMM})
