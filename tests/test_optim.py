"""Fused optimizer kernels against plain numpy references and torch.optim."""

from __future__ import annotations

import numpy as np
import pytest

from zsgd.errors import ZsgdError
from zsgd.nn.optim import OPTIMIZER_NAMES, clip_grad_norm, make_optimizer

N = 1000
LR, MU, WD = 0.05, 0.9, 0.01


class NumpyRef:
    """Textbook update rules in float64 numpy (torch.optim's formulas)."""

    def __init__(self, name: str, lr: float = LR, wd: float = WD):
        self.name, self.lr, self.wd, self.t = name, lr, wd, 0
        self.buf = self.m = self.v = self.acc = np.zeros(N)

    def step(self, w: np.ndarray, g: np.ndarray, lr: float | None = None) -> np.ndarray:
        lr = self.lr if lr is None else lr
        w, g = w.astype(np.float64), g.astype(np.float64)
        self.t += 1
        if self.name == "adamw":
            w = w * (1 - lr * self.wd)
        else:
            g = g + self.wd * w
        if self.name == "sgd":
            return w - lr * g
        if self.name in ("momentum", "nesterov"):
            self.buf = MU * self.buf + g
            return w - lr * (g + MU * self.buf if self.name == "nesterov" else self.buf)
        if self.name == "adagrad":
            self.acc = self.acc + g * g
            return w - lr * g / (np.sqrt(self.acc) + 1e-10)
        self.m = 0.9 * self.m + 0.1 * g
        self.v = 0.999 * self.v + 0.001 * g * g
        mhat, vhat = self.m / (1 - 0.9 ** self.t), self.v / (1 - 0.999 ** self.t)
        return w - lr * mhat / (np.sqrt(vhat) + 1e-8)


def steps(seed: int = 0, n: int = 6):
    r = np.random.default_rng(seed)
    w = r.standard_normal(N).astype(np.float32)
    return w, [r.standard_normal(N).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("wd", [0.0, WD])
def test_matches_numpy_reference(name, wd):
    w, gs = steps()
    opt = make_optimizer(name, N, lr=LR, momentum=MU, weight_decay=wd)
    ref, wr = NumpyRef(name, wd=wd), w.astype(np.float64)
    for i, g in enumerate(gs):
        lr = LR / 2 if i == 3 else None  # per-step override (staleness-aware rates)
        g_before = g.copy()
        opt.step(w, g, lr)
        wr = ref.step(wr, g, lr)
        np.testing.assert_array_equal(g, g_before)  # the gradient is never modified
        np.testing.assert_allclose(w, wr, rtol=1e-5, atol=1e-5, err_msg=f"{name} step {i}")
    assert opt.steps == len(gs)


TORCH = {"sgd": ("SGD", {}), "momentum": ("SGD", {"momentum": MU}),
         "nesterov": ("SGD", {"momentum": MU, "nesterov": True}), "adagrad": ("Adagrad", {}),
         "adam": ("Adam", {}), "adamw": ("AdamW", {})}


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_matches_torch_optim(name):
    torch = pytest.importorskip("torch")
    w, gs = steps(1)
    wt = torch.tensor(w.copy(), requires_grad=True)
    cls, kw = TORCH[name]
    topt = getattr(torch.optim, cls)([wt], lr=LR, weight_decay=WD, **kw)
    opt = make_optimizer(name, N, lr=LR, momentum=MU, weight_decay=WD)
    for g in gs:
        opt.step(w, g)
        wt.grad = torch.tensor(g)
        topt.step()
    # float32 both sides, summed in a different order (torch uses lerp for Adam's moments)
    np.testing.assert_allclose(w, wt.detach().numpy(), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_state_round_trip(name):
    w, gs = steps(2)
    a = make_optimizer(name, N, lr=LR)
    for g in gs[:3]:
        a.step(w, g)
    st = a.state_arrays()
    assert int(st["step"]) == 3
    assert all(v.dtype == np.float32 and v.shape == (N,) for k, v in st.items() if k != "step")
    b = make_optimizer(name, N, lr=LR)
    b.load_state_arrays(st)
    wb = w.copy()
    for g in gs[3:]:
        a.step(w, g)
        b.step(wb, g)
    np.testing.assert_array_equal(w, wb)
    st["step"] += 100  # state_arrays returns copies
    assert a.steps == 6


@pytest.mark.parametrize("name,kw,match", [
    ("sgd", {"lr": 0.0}, "learning rate"),
    ("sgd", {"lr": -1.0}, "learning rate"),
    ("adam", {"lr": float("nan")}, "learning rate"),
    ("momentum", {"momentum": 1.0}, "momentum"),
    ("nesterov", {"momentum": -0.1}, "momentum"),
    ("nesterov", {"momentum": 0.0}, "nesterov needs momentum"),
    ("sgd", {"weight_decay": -1e-4}, "weight_decay"),
    ("adam", {"beta2": 1.0}, "beta2"),
    ("adam", {"eps": 0.0}, "eps"),
    ("adagrad", {"lr_decay": -1.0}, "lr_decay"),
    ("sgd", {"dampening": 0.1}, "bad option"),
    ("rmsprop", {}, "unknown optimizer 'rmsprop'"),
])
def test_bad_hyper_parameters(name, kw, match):
    args = {"lr": LR, **kw}
    with pytest.raises(ZsgdError, match=match):
        make_optimizer(name, N, **args)


def test_bad_inputs_to_step_and_state():
    opt = make_optimizer("momentum", N, lr=LR)
    w, gs = steps()
    with pytest.raises(ZsgdError, match="gradient"):
        opt.step(w, gs[0][:-1])
    with pytest.raises(ZsgdError, match="weights"):
        opt.step(w.astype(np.float64), gs[0])
    with pytest.raises(ZsgdError, match="learning rate"):
        opt.step(w, gs[0], lr=-1.0)
    with pytest.raises(ZsgdError, match="another optimizer"):
        opt.load_state_arrays({"exp_avg": np.zeros(N, np.float32), "step": np.array(1)})
    with pytest.raises(ZsgdError, match="float32"):
        opt.load_state_arrays({"momentum_buffer": np.zeros(N - 1, np.float32), "step": np.array(1)})
    with pytest.raises(ZsgdError, match="n_params"):
        make_optimizer("sgd", 0, lr=LR)


def test_read_only_gradient_is_accepted():
    opt = make_optimizer("adam", N, lr=LR)
    w, gs = steps()
    g = gs[0]
    g.flags.writeable = False  # e.g. np.frombuffer on a received frame
    opt.step(w, g)
    assert np.isfinite(w).all()


def test_clip_grad_norm():
    r = np.random.default_rng(3)
    g = r.standard_normal(N).astype(np.float32)
    norm0 = float(np.linalg.norm(g.astype(np.float64)))
    h = g.copy()
    assert clip_grad_norm(h, 1.0) == pytest.approx(norm0, rel=1e-6)
    assert np.linalg.norm(h) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(h, g * (1.0 / (norm0 + 1e-6)), rtol=1e-6)
    k = g.copy()
    assert clip_grad_norm(k, 2 * norm0) == pytest.approx(norm0, rel=1e-6)
    np.testing.assert_array_equal(k, g)  # under the limit: untouched
    bad = g.copy()
    bad[5] = np.nan
    assert np.isnan(clip_grad_norm(bad, 1.0))
    np.testing.assert_array_equal(bad[:5], g[:5])
    with pytest.raises(ZsgdError, match="max_norm"):
        clip_grad_norm(g, 0.0)
    with pytest.raises(ZsgdError, match="float32"):
        clip_grad_norm(g.astype(np.float64), 1.0)


def test_clip_grad_norm_matches_torch():
    torch = pytest.importorskip("torch")
    g = np.random.default_rng(3).standard_normal(N).astype(np.float32)
    norm0 = float(np.linalg.norm(g.astype(np.float64)))
    t = torch.tensor(g.copy())
    t.grad = t.clone()
    tn = torch.nn.utils.clip_grad_norm_([t], 1.0)
    assert float(tn) == pytest.approx(norm0, rel=1e-5)
    h = g.copy()
    clip_grad_norm(h, 1.0)
    np.testing.assert_allclose(h, t.grad.numpy(), rtol=1e-5)
