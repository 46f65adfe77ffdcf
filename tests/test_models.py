"""Model zoo: PyTorch parity, finite differences, determinism, error messages."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

from zsgd.errors import ZsgdError
from zsgd.nn.models import MODEL_NAMES, Model, evaluate, get_model

RNG = np.random.default_rng(99)
SHAPES = [(1, 28, 28), (3, 32, 32)]


def batch(shape, n=4, k=10, seed=0):
    r = np.random.default_rng(seed)
    return r.random((n, *shape), dtype=np.float32), r.integers(0, k, n)


def torch_module(name: str, shape, k: int):
    """The PyTorch equivalent of each zoo model (attribute names = state_dict names)."""
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional
    c, h, w = shape

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            if name == "logreg":
                self.fc = nn.Linear(c * h * w, k)
            elif name == "mlp":
                self.fc1, self.fc2, self.fc3 = nn.Linear(c * h * w, 256), nn.Linear(256, 128), nn.Linear(128, k)
            elif name == "cnn":
                self.conv1, self.conv2 = nn.Conv2d(c, 32, 3), nn.Conv2d(32, 64, 3)
                self.fc1, self.fc2 = nn.Linear(64 * ((h - 4) // 2) * ((w - 4) // 2), 128), nn.Linear(128, k)
                self.d1, self.d2 = nn.Dropout(0.25), nn.Dropout(0.5)
            else:
                self.conv1, self.conv2 = nn.Conv2d(c, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
                self.fc1 = nn.Linear(16 * (h // 2 - 4) // 2 * ((w // 2 - 4) // 2), 120)
                self.fc2, self.fc3 = nn.Linear(120, 84), nn.Linear(84, k)

        def forward(self, x):
            if name == "logreg":
                return self.fc(x.flatten(1))
            if name == "mlp":
                return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))
            if name == "cnn":
                x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
                x = F.relu(self.fc1(self.d1(x).flatten(1)))
                return self.fc2(self.d2(x))
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    return Net()


def test_cnn_parameter_count_and_layout():
    m = get_model("cnn", input_shape=(1, 28, 28), n_classes=10)
    assert m.n_params == 1_199_882
    names = [n for n, _, _ in m.layout()]
    assert names == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias",
                     "fc2.weight", "fc2.bias"]
    assert dict((n, s) for n, s, _ in m.layout())["fc1.weight"] == (128, 9216)
    offsets = [o for _, _, o in m.layout()]
    assert offsets == sorted(offsets) and offsets[0] == 0


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_parity_with_torch(name, shape):
    torch = pytest.importorskip("torch")
    m = get_model(name, input_shape=shape, n_classes=10)
    # torch's own init, seeded: unseeded, about one draw in a few hundred put a max-pool window or a ReLU
    # input within float rounding of a tie, where the two libraries may route the gradient differently.
    torch.manual_seed(0)
    net = torch_module(name, shape, 10).eval()
    assert sum(p.numel() for p in net.parameters()) == m.n_params
    w = m.load_state_dict(net.state_dict())  # torch's own init, loaded through our names/layouts
    x, y = batch(shape, n=5)
    loss, g = m.loss_and_grad(w, x, y, training=False)
    out = net(torch.tensor(x))
    lt = torch.nn.functional.cross_entropy(out, torch.tensor(y))
    lt.backward()
    assert loss == pytest.approx(lt.item(), rel=1e-5)
    np.testing.assert_allclose(m.predict(w, x), out.detach().numpy(), rtol=1e-4, atol=1e-5)
    grads = m.state_dict(g)
    for pname, p in net.named_parameters():
        np.testing.assert_allclose(grads[pname], p.grad.numpy(), rtol=1e-3, atol=2e-6, err_msg=pname)
    # and the other way: our weights load into torch unchanged
    net.load_state_dict({k: torch.tensor(v.copy()) for k, v in m.state_dict(m.init(3)).items()})


FD_SHAPES = {"logreg": (2, 4, 5), "mlp": (1, 5, 4), "cnn": (2, 8, 7), "lenet5": (1, 12, 13)}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradient_finite_differences(name):
    """Directional derivatives of the float32 loss vs the analytic gradient (dropout off)."""
    shape = FD_SHAPES[name]
    m = get_model(name, input_shape=shape, n_classes=3)
    w = m.init(1)
    x, y = batch(shape, n=3, k=3, seed=2)
    _, g = m.loss_and_grad(w, x, y, training=False)
    wd = w.astype(np.float64)
    for trial in range(4):
        v = np.random.default_rng(trial).standard_normal(m.n_params)
        v /= np.linalg.norm(v)
        eps = 1e-2
        lp = m.loss_and_grad((wd + eps * v).astype(np.float32), x, y, training=False)[0]
        lm = m.loss_and_grad((wd - eps * v).astype(np.float32), x, y, training=False)[0]
        num = (lp - lm) / (2 * eps)
        ana = float(np.dot(g.astype(np.float64), v))
        assert abs(num - ana) <= 2e-3 * max(np.linalg.norm(g), 1e-3), (trial, num, ana)
    # single coordinates, one per parameter tensor (its largest gradient entry). A ReLU unit
    # near zero makes the loss kinked within a step, so the check passes if some small step agrees.
    for pname, pshape, off in m.layout():
        size = int(np.prod(pshape))
        i = off + int(np.argmax(np.abs(g[off:off + size])))
        nums = []
        for eps in (1e-3, 3e-4):
            e = np.zeros(m.n_params)
            e[i] = eps
            nums.append((m.loss_and_grad((wd + e).astype(np.float32), x, y, training=False)[0]
                         - m.loss_and_grad((wd - e).astype(np.float32), x, y, training=False)[0]) / (2 * eps))
        assert any(n == pytest.approx(g[i], rel=2e-2, abs=2e-4) for n in nums), (pname, nums, g[i])


def test_determinism_of_init_and_dropout():
    m = get_model("cnn", input_shape=(1, 12, 12), n_classes=4)
    np.testing.assert_array_equal(m.init(5), m.init(5))
    assert not np.array_equal(m.init(5), m.init(6))
    w = m.init(0)
    x, y = batch((1, 12, 12), n=6, k=4)
    l1, g1 = m.loss_and_grad(w, x, y, training=True, seed=11)
    l2, g2 = m.loss_and_grad(w, x, y, training=True, seed=11)
    assert l1 == l2 and np.array_equal(g1, g2)
    l3, g3 = m.loss_and_grad(w, x, y, training=True, seed=12)
    assert not np.array_equal(g1, g3)
    le, ge = m.loss_and_grad(w, x, y, training=False)
    assert not np.array_equal(g1, ge)
    # seed=None follows the model's own stream, reproducibly from get_model(seed=)
    a, b = (get_model("cnn", input_shape=(1, 12, 12), n_classes=4, seed=3) for _ in range(2))
    ga = [a.loss_and_grad(w, x, y)[1] for _ in range(2)]
    gb = [b.loss_and_grad(w, x, y)[1] for _ in range(2)]
    assert np.array_equal(ga[0], gb[0]) and np.array_equal(ga[1], gb[1])
    assert not np.array_equal(ga[0], ga[1])


def test_dropout_scales_activations_in_training():
    """Training-mode loss differs from eval; averaged over masks it is close to eval's logits scale."""
    m = get_model("cnn", input_shape=(1, 10, 10), n_classes=3)
    w = m.init(0)
    x, y = batch((1, 10, 10), n=8, k=3)
    le = m.loss_and_grad(w, x, y, training=False)[0]
    lt = [m.loss_and_grad(w, x, y, training=True, seed=s)[0] for s in range(20)]
    assert all(v != le for v in lt)
    assert abs(np.mean(lt) - le) < 0.5


def test_state_dict_roundtrip_and_views():
    m = get_model("lenet5", input_shape=(3, 32, 32), n_classes=10)
    w = m.init(0)
    sd = m.state_dict(w)
    assert sd["fc1.weight"].shape == (120, 16 * 6 * 6)
    assert sd["conv1.weight"].shape == (6, 3, 5, 5)
    np.testing.assert_array_equal(m.load_state_dict(sd), w)
    sd["fc3.bias"][:] = 7.0  # a view: writes land in w
    assert (w[-10:] == 7.0).all()
    with pytest.raises(ZsgdError, match="missing"):
        m.load_state_dict({k: v for k, v in sd.items() if k != "fc1.bias"})
    with pytest.raises(ZsgdError, match="unexpected"):
        m.load_state_dict({**sd, "fc9.weight": np.zeros(3)})
    with pytest.raises(ZsgdError, match="shape"):
        m.load_state_dict({**sd, "conv1.weight": np.zeros((6, 1, 5, 5))})


def test_predict_batches_and_evaluate():
    m = get_model("mlp", input_shape=(1, 8, 8), n_classes=5)
    w = m.init(0)
    xu = np.random.default_rng(0).integers(0, 256, (23, 1, 8, 8), dtype=np.uint8)
    y = np.random.default_rng(1).integers(0, 5, 23)
    xf = xu.astype(np.float32) / 255
    np.testing.assert_allclose(m.predict(w, xf, batch_size=4), m.predict(w, xf), rtol=1e-5, atol=1e-7)
    logits = m.predict(w, xf).astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    ref = (np.mean(lse - logits[np.arange(23), y]), np.mean(logits.argmax(1) == y))
    for xin, bs in ((xu, 5), (xf, 1000)):
        loss, acc = evaluate(m, w, xin, y, batch_size=bs)
        assert loss == pytest.approx(ref[0], rel=1e-5) and acc == pytest.approx(ref[1])
    with pytest.raises(ZsgdError, match="labels"):
        evaluate(m, w, xu, y[:5])


def test_any_channel_count_and_size_that_fits():
    for name, shape, flat in [("cnn", (3, 20, 28), 64 * 8 * 12), ("lenet5", (1, 12, 12), 16),
                              ("lenet5", (3, 32, 32), 576), ("cnn", (1, 6, 6), 64)]:
        m = get_model(name, input_shape=shape, n_classes=7)
        assert dict((n, s) for n, s, _ in m.layout())["fc1.weight"][1] == flat
        x, y = batch(shape, n=2, k=7)
        loss, g = m.loss_and_grad(m.init(0), x, y)
        assert np.isfinite(loss) and np.isfinite(g).all() and g.dtype == np.float32


@pytest.mark.parametrize("name,shape", [("cnn", (1, 5, 5)), ("lenet5", (1, 11, 11)), ("lenet5", (3, 32, 9))])
def test_too_small_input_is_a_user_error(name, shape):
    with pytest.raises(ZsgdError, match=f"model '{name}' needs images of at least"):
        get_model(name, input_shape=shape, n_classes=10)


def test_user_errors_have_helpful_messages():
    with pytest.raises(ZsgdError, match="unknown model 'resnet'.*logreg, mlp, cnn, lenet5"):
        get_model("resnet", input_shape=(1, 28, 28), n_classes=10)
    with pytest.raises(ZsgdError, match="cannot load model factory"):
        get_model("no_such_pkg.mod:factory", input_shape=(1, 28, 28), n_classes=10)
    with pytest.raises(ZsgdError, match="cannot load model factory"):
        get_model("zsgd.nn.models:no_such_factory", input_shape=(1, 28, 28), n_classes=10)
    with pytest.raises(ZsgdError, match="input_shape"):
        get_model("mlp", input_shape=(28, 28), n_classes=10)
    with pytest.raises(ZsgdError, match="n_classes"):
        get_model("mlp", input_shape=(1, 28, 28), n_classes=1)
    m = get_model("cnn", input_shape=(1, 28, 28), n_classes=10)
    w = m.init(0)
    x, y = batch((1, 28, 28), n=2)
    with pytest.raises(ZsgdError, match=r"expects input of shape \(N>0, 1, 28, 28\)"):
        m.loss_and_grad(w, x[:, :, :20], y)
    with pytest.raises(ZsgdError, match="float32 images"):
        m.loss_and_grad(w, (x * 255).astype(np.uint8), y)
    with pytest.raises(ZsgdError, match="labels must be in"):
        m.loss_and_grad(w, x, y + 10)
    with pytest.raises(ZsgdError, match="flat float32 vector of 1199882"):
        m.loss_and_grad(w[:-1], x, y)
    with pytest.raises(ZsgdError, match="flat float32 vector"):
        m.predict(w.astype(np.float64), x)


def test_user_factory(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        from zsgd.nn.models import get_model
        def tiny(input_shape, n_classes):
            return get_model("logreg", input_shape=input_shape, n_classes=n_classes)
        def broken(input_shape, n_classes):
            return object()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    m = get_model("my_models:tiny", input_shape=(1, 4, 4), n_classes=3)
    assert isinstance(m, Model) and m.n_params == 16 * 3 + 3
    with pytest.raises(ZsgdError, match="lacks"):
        get_model("my_models:broken", input_shape=(1, 4, 4), n_classes=3)
    sys.modules.pop("my_models", None)


@pytest.mark.parametrize("name", ["mlp", "cnn", "lenet5"])
def test_gradient_tails_are_final_when_announced(name):
    """on_ready(offset, ...) promises grad[offset:] will not change: a sharded worker sends those ranges at once."""
    from zsgd.nn.models import get_model

    model = get_model(name, input_shape=(1, 28, 28), n_classes=10, seed=0)
    rng = np.random.default_rng(0)
    x = rng.random((8, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 8)
    w = model.init(seed=0)
    seen = []
    loss, grad = model.loss_and_grad(w, x, y, training=False, on_ready=lambda off, g, l, n: seen.append((off, g[off:].copy(), l, n)))
    offsets = [off for off, *_ in seen]
    assert offsets == sorted(offsets, reverse=True) and offsets[-1] == 0 and offsets[0] < model.n_params
    for off, tail, l, n in seen:
        np.testing.assert_array_equal(tail, grad[off:])
        assert l == loss and n == 8
    loss2, grad2 = model.loss_and_grad(w, x, y, training=False)
    assert loss2 == loss and np.array_equal(grad2, grad)  # the callback changes nothing
