"""``--model torch:package.module:factory``: the adapter against plain PyTorch, its buffers, its bad input.

The gradient test is the contract: for the same weights and batch, the flat
gradient the adapter returns is what ``loss.backward()`` gives a plain copy of
the module. Bad input runs through the CLI in-process (one line, exit 2; a NaN
loss is a divergence, exit 3). The runtime, the simulator and experiments with
a torch model are in test_torch_runs.py (slow).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from helpers import REPO, cli, lines_of
from zsgd.errors import ZsgdError
from zsgd.nn.models import get_model, is_user_model

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

RESNET = "torch:examples.torch.resnet:make"

USER_MODULES = '''
import torch
from torch import nn


class DropNet(nn.Module):
    def __init__(self, c, k):
        super().__init__()
        self.fc1 = nn.Linear(c * 28 * 28, 32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, k)
        self.register_buffer("scale", torch.full((1,), 2.0))
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x.flatten(1) * self.scale))))


def dropnet(input_shape, n_classes):
    return DropNet(input_shape[0], n_classes)


def no_args():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def with_loss(n_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, n_classes)), lambda out, y: nn.functional.cross_entropy(out, y, reduction="sum")


def raises(input_shape, n_classes):
    raise RuntimeError("boom\\nsecond line")


def not_a_module(input_shape, n_classes):
    return "a module"


def no_params():
    return nn.Sequential(nn.Flatten(), nn.ReLU())


def wrong_out():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 5))


def wrong_in():
    return nn.Sequential(nn.Flatten(), nn.Linear(100, 10))


def float64():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).double()


def nan_loss():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), lambda out, y: (out * float("nan")).sum()


def vector_loss():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), lambda out, y: nn.functional.cross_entropy(out, y, reduction="none")


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)
        self.spare = nn.Linear(2, 3, bias=False)

    def forward(self, x):
        return self.fc(x.flatten(1))


def unused():
    return Unused()


def tied():
    a = nn.Linear(10, 10)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), a, nn.ReLU(), a)
    return net
'''


@pytest.fixture
def user_mod(tmp_path, monkeypatch):
    """``zsgd_torch_models``: the factories above, importable in this process."""
    (tmp_path / "zsgd_torch_models.py").write_text(USER_MODULES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "zsgd_torch_models", raising=False)
    monkeypatch.chdir(REPO)
    return "torch:zsgd_torch_models"


def batch(n: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, n).astype(np.int64)


def plain_grads(net, w_model, x, y, training: bool, loss_fn=None) -> tuple[float, dict[str, np.ndarray]]:
    """loss.backward() on ``net`` (a plain module) loaded with ``w_model``'s weights."""
    net.train(training)
    loss = (loss_fn or torch.nn.functional.cross_entropy)(net(torch.from_numpy(x)), torch.from_numpy(y))
    net.zero_grad(set_to_none=True)
    loss.backward()
    return float(loss.detach()), {n: p.grad.numpy().copy() for n, p in net.named_parameters() if p.grad is not None}


def fresh_resnet():
    from examples.torch.resnet import make

    torch.manual_seed(123)
    return make((1, 28, 28), 10)


# -- the contract: gradients equal plain autograd's ------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
def test_resnet_gradient_matches_plain_autograd(training, monkeypatch):
    monkeypatch.chdir(REPO)
    m = get_model(RESNET, (1, 28, 28), 10)
    net = fresh_resnet()  # different init (seed 123): the adapter must use the weights it is handed
    w = m.load_state_dict(net.state_dict())
    x, y = batch()
    loss, g = m.loss_and_grad(w, x, y, training=training, seed=0)
    want_loss, want = plain_grads(net, w, x, y, training)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    assert set(want) == {n for n, _, _ in m.layout()}
    for name, shape, off in m.layout():
        got = g[off:off + int(np.prod(shape))].reshape(shape)
        np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_dropout_off_matches_and_dropout_on_is_seeded(user_mod):
    spec = f"{user_mod}:dropnet"
    m = get_model(spec, (1, 28, 28), 10, seed=3)
    x, y = batch()
    w = m.init(3)
    torch.manual_seed(3)
    import zsgd_torch_models

    net = zsgd_torch_models.dropnet((1, 28, 28), 10)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict(w).items()})
    loss, g = m.loss_and_grad(w, x, y, training=False)
    want_loss, want = plain_grads(net, w, x, y, training=False)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    for name, shape, off in m.layout():
        np.testing.assert_allclose(g[off:off + int(np.prod(shape))].reshape(shape), want[name], rtol=1e-5, atol=1e-6)
    assert "frozen" not in {n for n, _, _ in m.layout()}  # not trained: stays as the factory made it
    on = [m.loss_and_grad(w, x, y, training=True, seed=s)[1] for s in (7, 7, 8)]
    np.testing.assert_array_equal(on[0], on[1])  # same seed, same dropout masks
    assert not np.array_equal(on[0], on[2])
    assert not np.allclose(on[0], g)


def test_parameters_are_views_into_the_flat_vector_and_grads_fill_out(monkeypatch):
    monkeypatch.chdir(REPO)
    m = get_model(RESNET, (1, 28, 28), 10)
    w = m.init(0)
    x, y = batch(8)
    out = np.full(m.n_params, 99.0, np.float32)
    loss, g = m.loss_and_grad(w, x, y, out=out)
    assert g is out and np.isfinite(out).all() and not (out == 99.0).any()
    p = dict(m.module.named_parameters())["fc.bias"]
    off = dict((n, o) for n, _, o in m.layout())["fc.bias"]
    assert p.data_ptr() == w[off:].__array_interface__["data"][0]  # zero-copy: the module reads w itself
    w[off] = 5.0
    assert float(p.detach()[0]) == 5.0
    assert p.grad is None  # backward's tensors were written into out and let go
    ro = w.copy()
    ro.setflags(write=False)  # a received frame: copied into the adapter's own buffer, never written
    np.testing.assert_array_equal(m.loss_and_grad(ro, x, y, training=False)[1], m.loss_and_grad(w, x, y, training=False)[1])


def test_init_is_the_factory_under_the_seed(monkeypatch):
    monkeypatch.chdir(REPO)
    m = get_model(RESNET, (1, 28, 28), 10, seed=5)
    from examples.torch.resnet import make

    torch.manual_seed(9)
    want = torch.cat([p.detach().reshape(-1) for p in make((1, 28, 28), 10).parameters()]).numpy()
    np.testing.assert_array_equal(m.init(9), want)
    np.testing.assert_array_equal(m.init(5), m.init(5))
    assert not np.array_equal(m.init(5), m.init(9))
    assert m.init(5).dtype == np.float32 and m.init(5).shape == (m.n_params,)


def test_state_dict_goes_back_into_the_users_module(monkeypatch):
    monkeypatch.chdir(REPO)
    m = get_model(RESNET, (1, 28, 28), 10)
    w = m.init(0) + np.float32(0.01)
    x, y = batch(32)
    m.loss_and_grad(w, x, y)  # running statistics move
    sd = m.state_dict(w)
    net = fresh_resnet()
    assert list(sd) == list(net.state_dict())  # the module's own names, buffers included, in its order
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        want = net.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(m.predict(w, x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(m.load_state_dict(net.state_dict()), w)
    with pytest.raises(ZsgdError, match=r"missing \['stem.weight'\]"):
        m.load_state_dict({k: v for k, v in sd.items() if k != "stem.weight"})


def test_a_parameter_the_loss_does_not_reach_gets_a_zero_gradient(user_mod):
    m = get_model(f"{user_mod}:unused", (1, 28, 28), 10)
    x, y = batch(4)
    _, g = m.loss_and_grad(m.init(0), x, y, out=np.full(m.n_params, 7.0, np.float32))
    off = dict((n, o) for n, _, o in m.layout())["spare.weight"]
    assert (g[off:off + 6] == 0).all() and (g[:off] != 7.0).all()


def test_shared_parameters_are_one_slot(user_mod):
    m = get_model(f"{user_mod}:tied", (1, 28, 28), 10)
    assert [n for n, _, _ in m.layout()] == ["1.weight", "1.bias", "2.weight", "2.bias"]
    sd = m.state_dict(m.init(0))
    assert np.shares_memory(sd["2.weight"], sd["4.weight"])


# -- buffers: local to each process -----------------------------------------------------------------
def test_running_statistics_are_local_and_outside_the_flat_vector(monkeypatch):
    monkeypatch.chdir(REPO)
    m = get_model(RESNET, (1, 28, 28), 10)
    net = fresh_resnet()
    assert m.n_params == sum(p.numel() for p in net.parameters())  # no buffer in the flat vector
    bn = m.module.bn
    assert int(bn.num_batches_tracked) == 0 and float(bn.running_mean.abs().sum()) == 0.0  # the probe left no trace
    w = m.init(0)
    x, y = batch(32)
    m.loss_and_grad(w, x, y)
    assert int(bn.num_batches_tracked) == 1 and float(bn.running_mean.abs().sum()) > 0
    m.loss_and_grad(w, x, y, training=False)
    assert int(bn.num_batches_tracked) == 1  # eval mode does not train them


def test_untrained_norm_layers_evaluate_on_batch_statistics(monkeypatch):
    """The broker of a distributed run never trains: its BatchNorm layers normalize by each evaluation batch."""
    monkeypatch.chdir(REPO)
    m = get_model(RESNET, (1, 28, 28), 10)
    w = m.init(0)
    x, _ = batch(64, seed=1)
    net = fresh_resnet()
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in m.state_dict(w).items()})
    with torch.no_grad():
        batch_stats = net.train()(torch.from_numpy(x)).numpy()
        running = net.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(m.predict(w, x, batch_size=64), batch_stats, rtol=1e-4, atol=1e-5)
    assert int(m.module.bn.num_batches_tracked) == 0  # evaluating did not train them either
    assert not np.allclose(batch_stats, running, atol=1e-3)
    m.loss_and_grad(w, x, np.zeros(64, np.int64))  # once trained here, eval uses the running statistics
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in m.state_dict(w).items()})
    with torch.no_grad():
        np.testing.assert_allclose(m.predict(w, x), net.eval()(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)


def test_constant_buffers_come_from_the_seeded_factory(user_mod):
    m = get_model(f"{user_mod}:dropnet", (1, 28, 28), 10)
    sd = m.state_dict(m.init(0))
    assert float(sd["scale"][0]) == 2.0 and sd["frozen"].tolist() == [1.0, 1.0, 1.0]


# -- factories, loss, threads, imports --------------------------------------------------------------
def test_factory_arguments_and_custom_loss(user_mod):
    m = get_model(f"{user_mod}:no_args", (1, 28, 28), 10)
    assert m.n_params == 7850
    m2 = get_model(f"{user_mod}:with_loss", (1, 28, 28), 10)
    x, y = batch(4)
    w = m2.init(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in m2.state_dict(w).items()})
    loss, g = m2.loss_and_grad(w, x, y)
    want_loss, want = plain_grads(net, w, x, y, True, lambda o, t: torch.nn.functional.cross_entropy(o, t, reduction="sum"))
    assert loss == pytest.approx(want_loss, rel=1e-6)
    np.testing.assert_allclose(g[:7840].reshape(10, 784), want["1.weight"], rtol=1e-5, atol=1e-6)


def test_is_user_model():
    assert is_user_model("torch:examples.torch.resnet:make") and is_user_model("pkg.mod:make")
    assert not any(is_user_model(s) for s in ("cnn", "logreg", "lstm", "lstm:hidden=32", None, 3))


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=os.environ | env)


@pytest.mark.slow  # a new interpreter
def test_core_install_never_imports_torch():
    proc = run_python("""
        import sys
        import zsgd.cli, zsgd.nn.models, zsgd.nn.torch_model
        from zsgd.nn.models import get_model
        get_model("logreg", (1, 28, 28), 10)
        print('torch' in sys.modules)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.slow  # a new interpreter
def test_workers_compute_on_one_thread():
    proc = run_python("""
        import torch
        torch.set_num_threads(2)
        from zsgd.nn.models import get_model
        get_model("torch:examples.torch.resnet:make", (1, 28, 28), 10)
        print(torch.get_num_threads())
    """, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"


@pytest.mark.slow  # a new interpreter
def test_without_torch_a_torch_spec_says_what_to_install(tmp_path):
    blocker = tmp_path / "block" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named torch (blocked by the test)')\n")
    proc = subprocess.run([sys.executable, "-m", "zsgd", "train", "--model", RESNET, "--data", "embedded", "--steps", "2",
                           "--quiet", "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=os.environ | {"PYTHONPATH": str(tmp_path / "block"), "ZSGD_HOME": str(tmp_path / "home")})
    lines = lines_of(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "needs PyTorch" in lines[0] and "pip install 'zsgd[torch]'" in lines[0], proc.stderr


# -- bad input: one line, exit 2 (a NaN loss: divergence, exit 3) ------------------------------------
@pytest.mark.parametrize("factory,match", [
    ("raises", r"model 'torch:zsgd_torch_models:raises': the factory raised RuntimeError: boom second line"),
    ("not_a_module", r"the factory returned str 'a module', not a torch.nn.Module"),
    ("no_params", r"the module has no trainable parameters"),
    ("wrong_out", r"maps 2 images of shape \(1, 28, 28\) to shape \(2, 5\); the data needs logits of shape \(2, 10\)"),
    ("wrong_in", r"the module's forward on images of shape \(1, 28, 28\) raised RuntimeError: mat1 and mat2"),
    ("float64", r"parameter '1.weight' is torch.float64; .* return module.float\(\) from the factory"),
    ("vector_loss", r"the loss must return a scalar tensor .* got a tensor of shape \(2,\)"),
    ("missing", r"cannot load model factory 'torch:zsgd_torch_models:missing'"),
])
def test_bad_torch_models_are_one_line(user_mod, tmp_path, factory, match):
    result = cli("train", "--model", f"{user_mod}:{factory}", "--data", "embedded", "--steps", "2", "--quiet",
                 "--out", str(tmp_path / "o"))
    lines = lines_of(result.stderr)
    assert result.exit_code == 2, (result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("zsgd: error: "), result.stderr
    import re

    assert re.search(match, lines[0]), lines[0]
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


@pytest.mark.parametrize("spec", ["torch:", "torch:nocolon", "torch:a:b:c", "torch::make"])
def test_bad_torch_specs(spec, tmp_path):
    with pytest.raises(ZsgdError, match=r"give torch:package.module:factory"):
        get_model(spec, (1, 28, 28), 10)


def test_torch_model_on_text_data_is_refused():
    with pytest.raises(ZsgdError, match=r"text data needs --model lstm"):
        get_model(RESNET, (), 100)


def test_nan_loss_is_a_divergence(user_mod, tmp_path):
    result = cli("train", "--model", f"{user_mod}:nan_loss", "--data", "embedded", "--steps", "5", "--quiet",
                 "--out", str(tmp_path / "o"))
    assert result.exit_code == 3, (result.output, result.exception)
    assert "diverged" in result.stderr or "non-finite" in result.stderr, result.stderr
