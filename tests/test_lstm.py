"""The LSTM language model: kernels, gradients (PyTorch autograd and finite differences), layout, state."""

from __future__ import annotations

import numpy as np
import pytest

from zsgd.errors import ZsgdError
from zsgd.nn import lstm_kernels as LK
from zsgd.nn.lstm import LSTMModel, get_lstm, is_lstm_name, parse_lstm_name


def _batch(rng: np.random.Generator, v: int, b: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, v, (b, t)), rng.integers(0, v, (b, t))


def _torch_lm(torch, m: LSTMModel):
    """torch.nn.Embedding -> LSTM(batch_first) -> Linear, with the zsgd model's names."""
    s = m.spec

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(m.vocab_size, s.embed)
            self.lstm = torch.nn.LSTM(s.embed, s.hidden, s.layers, batch_first=True)
            self.fc = torch.nn.Linear(s.hidden, m.vocab_size)

        def forward(self, x, hc):
            out, hc = self.lstm(self.embed(x), hc)
            return self.fc(out), hc

    return LM().double()


# ---------------------------------------------------------------- kernels


def test_rational_tanh_and_sigmoid_match_numpy():
    x = np.linspace(-30, 30, 200_001).astype(np.float32)
    out = np.empty_like(x)
    LK.apply_elementwise(x, out, LK.TANH)
    assert np.abs(out - np.tanh(x.astype(np.float64))).max() < 2e-6
    LK.apply_elementwise(x, out, LK.SIGMOID)
    assert np.abs(out - 1.0 / (1.0 + np.exp(-x.astype(np.float64)))).max() < 2e-6
    LK.apply_elementwise(np.array([np.nan], np.float32), out[:1], LK.TANH)
    assert np.isnan(out[0])  # a NaN weight must show, not be clamped away


def test_vectorised_exp_and_softmax_xent_match_float64():
    x = np.linspace(-86.9, 0, 200_001).astype(np.float32)
    out = np.empty_like(x)
    LK.apply_elementwise(x, out, LK.EXP_NEG)
    ref = np.exp(x.astype(np.float64))
    assert (np.abs(out - ref) / ref).max() < 5e-7
    LK.apply_elementwise(np.array([-200.0, np.nan], np.float32), out[:2], LK.EXP_NEG)
    assert 0.0 <= out[0] < 1e-37 and np.isnan(out[1])
    rng = np.random.default_rng(3)
    for scale in (1.0, 30.0):  # wide logits: the row max keeps exp in range
        z = (rng.standard_normal((50, 72)) * scale).astype(np.float32)
        y = rng.integers(0, 72, 50)
        d = np.empty_like(z)
        loss = LK.softmax_xent(z, y, d)
        z64 = z.astype(np.float64)
        e = np.exp(z64 - z64.max(1, keepdims=True))
        p = e / e.sum(1, keepdims=True)
        ref_loss = -np.log(p[np.arange(50), y]).mean()
        p[np.arange(50), y] -= 1.0
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert np.abs(d - p / 50).max() <= 1e-6 * np.abs(p / 50).max()
    d = np.empty((1, 3), np.float32)
    assert np.isnan(LK.softmax_xent(np.array([[0.0, np.nan, 1.0]], np.float32), np.array([0]), d))


def test_nan_weights_give_a_nan_loss():
    m = get_lstm("lstm:embed=4,hidden=6,layers=1", 6)
    w = m.init(0)
    w[dict((n, o) for n, _, o in m.layout())["lstm.weight_hh_l0"]] = np.nan
    x = np.zeros((2, 3), np.int64)
    assert np.isnan(m.loss_and_grad(w, x, x)[0])


def test_embedding_scatter_accumulates_repeated_tokens():
    table = np.zeros((4, 3), np.float32)
    dx = np.arange(12, dtype=np.float32).reshape(4, 3)
    LK.embed_scatter_add(dx, np.array([1, 1, 3, 1]), table)
    np.testing.assert_array_equal(table[1], dx[0] + dx[1] + dx[3])
    np.testing.assert_array_equal(table[3], dx[2])
    assert not table[0].any() and not table[2].any()


# ---------------------------------------------------------------- names and layout


def test_name_parsing_and_defaults():
    assert parse_lstm_name("lstm").name == "lstm:embed=64,hidden=256,layers=2"
    s = parse_lstm_name("lstm:hidden=32,layers=1")
    assert (s.embed, s.hidden, s.layers) == (64, 32, 1)
    assert is_lstm_name("lstm:embed=8") and not is_lstm_name("mypkg.lstm:make") and not is_lstm_name("mlp")
    for bad in ("lstm:hidden=0", "lstm:layers=3", "lstm:width=5", "lstm:hidden", "lstm:hidden=x"):
        with pytest.raises(ZsgdError):
            parse_lstm_name(bad)
    with pytest.raises(ZsgdError):
        get_lstm("lstm", 1)


def test_layout_is_pytorch_state_dict_order_and_views():
    m = get_lstm("lstm:embed=5,hidden=7,layers=2", 11)
    names = [n for n, _, _ in m.layout()]
    assert names == ["embed.weight",
                     "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0",
                     "lstm.weight_ih_l1", "lstm.weight_hh_l1", "lstm.bias_ih_l1", "lstm.bias_hh_l1",
                     "fc.weight", "fc.bias"]
    shapes = dict((n, s) for n, s, _ in m.layout())
    assert shapes["lstm.weight_ih_l0"] == (28, 5) and shapes["lstm.weight_ih_l1"] == (28, 7)
    assert m.n_params == sum(int(np.prod(s)) for s in shapes.values())
    w = m.init(3)
    np.testing.assert_array_equal(w, m.init(3))
    sd = m.state_dict(w)
    sd["fc.bias"][0] = 42.0  # a view: writes through
    assert w[m.layout()[-1][2]] == 42.0
    np.testing.assert_array_equal(m.load_state_dict(sd), w)
    with pytest.raises(ZsgdError, match="missing"):
        m.load_state_dict({k: v for k, v in sd.items() if k != "fc.bias"})


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("spec,b,t", [("lstm:embed=6,hidden=9,layers=1", 3, 5), ("lstm:embed=8,hidden=16,layers=2", 4, 11)])
def test_gradients_match_pytorch_autograd(spec, b, t):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    m = get_lstm(spec, 13)
    w = m.init(2)
    x, y = _batch(rng, 13, b, t)
    state = m.init_state(b)
    state.h[:] = rng.standard_normal(state.h.shape) * 0.5  # a carried state, not zeros
    state.c[:] = rng.standard_normal(state.c.shape) * 0.5
    h0, c0 = torch.from_numpy(state.h.astype(np.float64)), torch.from_numpy(state.c.astype(np.float64))
    loss, g = m.loss_and_grad(w, x, y, state=state)

    net = _torch_lm(torch, m)
    net.load_state_dict({k: torch.from_numpy(v.astype(np.float64)) for k, v in m.state_dict(w).items()})
    logits, (ht, ct) = net(torch.from_numpy(x), (h0, c0))
    lt = torch.nn.functional.cross_entropy(logits.reshape(-1, 13), torch.from_numpy(y).reshape(-1))
    lt.backward()
    assert loss == pytest.approx(lt.item(), rel=1e-5)
    np.testing.assert_allclose(state.h, ht.detach().numpy(), atol=1e-5)  # the state it hands on
    np.testing.assert_allclose(state.c, ct.detach().numpy(), atol=1e-5)
    gs = m.state_dict(g)
    for name, p in net.named_parameters():
        ref = p.grad.numpy()
        err = np.abs(gs[name] - ref).max() / np.abs(ref).max()
        assert err <= 1e-4, f"{name}: relative error {err:.2e}"
    # and PyTorch's own init loads through our names and layouts
    net32 = _torch_lm(torch, m).float()
    w2 = m.load_state_dict(net32.state_dict())
    np.testing.assert_array_equal(m.state_dict(w2)["lstm.weight_hh_l0"], net32.lstm.weight_hh_l0.detach().numpy())


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(5)
    m = get_lstm("lstm:embed=4,hidden=6,layers=2", 7)
    w = m.init(0) * np.float32(3.0)  # larger weights: saturating gates exercise every derivative
    x, y = _batch(rng, 7, 2, 6)
    state = m.init_state(2)
    state.h[:] = rng.standard_normal(state.h.shape)
    state.c[:] = rng.standard_normal(state.c.shape)
    h0, c0 = state.h.copy(), state.c.copy()
    _, g = m.loss_and_grad(w, x, y, state=state)

    def loss_at(v: np.ndarray) -> float:
        st = m.init_state(2)
        st.h[:], st.c[:] = h0, c0
        return m.loss_and_grad(v, x, y, state=st)[0]

    eps = 1e-2
    for name, shape, off in m.layout():
        size = int(np.prod(shape))
        for k in rng.choice(size, size=min(size, 4), replace=False):
            i = off + int(k)
            wp, wm = w.copy(), w.copy()
            wp[i] += eps
            wm[i] -= eps
            fd = (loss_at(wp) - loss_at(wm)) / (2 * eps)
            assert abs(fd - g[i]) <= 2e-3 + 2e-2 * abs(fd), f"{name}[{k}]: fd {fd:.6f} vs grad {g[i]:.6f}"


def test_token_table_and_block_projection_give_the_same_gradients(monkeypatch):
    """Layer 0 reads a (V, 4H) token table when the vocabulary is small; the general path must agree."""
    rng = np.random.default_rng(7)
    m = get_lstm("lstm:embed=5,hidden=7,layers=2", 11)
    w = m.init(3)
    x, y = _batch(rng, 11, 3, 6)  # 18 rows >= 11 tokens: the table path
    assert m._token_table(18)
    st_table = m.init_state(3)
    loss_table, g_table = m.loss_and_grad(w, x, y, state=st_table)
    monkeypatch.setattr(LSTMModel, "_token_table", lambda self, rows: False)
    st_block = m.init_state(3)
    loss_block, g_block = m.loss_and_grad(w, x, y, state=st_block)
    assert loss_block == pytest.approx(loss_table, rel=1e-6)
    np.testing.assert_allclose(st_block.h, st_table.h, atol=1e-6)
    for name, shape, off in m.layout():
        ref = g_block[off:off + int(np.prod(shape))]
        err = np.abs(g_table[off:off + ref.size] - ref).max() / max(np.abs(ref).max(), 1e-12)
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 9, 36), (8, 16, 64), (15, 7, 13), (32, 256, 1024), (32, 1024, 256),
                                   (33, 300, 70), (6, 0, 5)])
def test_packed_gemm_matches_numpy(m, k, n):
    """The per-step product of the recurrence: both packings, tiles of 8/4/2/1 rows, padded panels, k blocks."""
    from zsgd.nn import lstm_gemm as LG

    rng = np.random.default_rng(m * 100 + n)
    a = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    ref = a.astype(np.float64) @ w.T.astype(np.float64)
    for pack, weights in ((LG.pack_rows, w), (LG.pack_cols, np.ascontiguousarray(w.T))):
        bp = np.full((LG.panels(n), k, LG.NR), np.nan, np.float32)
        pack(weights, bp)
        c = np.full((m, LG.panels(n) * LG.NR + 3), np.nan, np.float32)
        LG.gemm_packed(a, bp, c)
        assert np.abs(c[:, :n] - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max()), pack.__name__
        assert not c[:, n:LG.panels(n) * LG.NR].any()  # the padding columns come out zero


@pytest.mark.parametrize("m,k,n,n2", [(1024, 600, 64, 32), (13, 37, 32, 0), (7, 1, 32, 32), (3, 300, 0, 64), (6, 0, 32, 0)])
def test_gemm_at_matches_numpy(m, k, n, n2):
    """The weight-gradient product ``at.T @ b`` (and a second ``b2`` in the same pass, and the column sums):
    k blocks with a ragged last one, row tiles of 8/4/2/1, columns past N left alone."""
    from zsgd.nn import lstm_gemm as LG

    n, n2 = n * LG.NR // 32, n2 * LG.NR // 32  # the same number of panels on a CPU without AVX-512
    rng = np.random.default_rng(m + k + n)
    at = rng.standard_normal((k, m), dtype=np.float32)
    b, b2 = rng.standard_normal((k, n), dtype=np.float32), rng.standard_normal((k, n2), dtype=np.float32)
    c, c2 = np.full((m, n + 3), np.nan, np.float32), np.full((m, n2), np.nan, np.float32)
    sums = np.full(m, 0.5)
    LG.gemm_at(at, b, c, b2, c2, sums)
    a64 = at.astype(np.float64)
    for got, ref in ((c[:, :n], a64.T @ b), (c2, a64.T @ b2)):
        assert np.abs(got - ref).max(initial=0.0) <= 1e-5 * max(1.0, np.abs(ref).max(initial=0.0))
    assert np.isnan(c[:, n:]).all()  # columns past N are not written
    np.testing.assert_allclose(sums, 0.5 + a64.sum(0), rtol=1e-6, atol=1e-5)
    LG.gemm_at(at, b, c, b2, c2, np.zeros(0))  # no column sums asked for: still the products
    assert np.abs(c[:, :n] - a64.T @ b).max(initial=0.0) <= 1e-5 * max(1.0, np.abs(a64.T @ b).max(initial=0.0))


def test_step_kernels_match_the_lstm_equations():
    """Gates, cell update and the backward step against the equations in float64, odd H, a panel-padded dh."""
    rng = np.random.default_rng(11)
    B, H, T, R = 5, 37, 3, 9
    xp = rng.standard_normal((R, 4 * H + 5), dtype=np.float32)  # wider than 4H, as a padded product leaves it
    rows = rng.integers(0, R, B)
    rec, bias = rng.standard_normal((B, 4 * H), dtype=np.float32), rng.standard_normal(4 * H, dtype=np.float32)
    a = np.empty((B, 4 * H), np.float32)
    LK.gates_forward(xp, rows, rec, bias, a)
    z = xp[rows, :4 * H].astype(np.float64) + rec + bias
    sig = 1.0 / (1.0 + np.exp(-z))
    ref = np.concatenate([sig[:, :2 * H], np.tanh(z[:, 2 * H:3 * H]), sig[:, 3 * H:]], axis=1)
    np.testing.assert_allclose(a, ref, atol=3e-6)
    i, f, g, o = (a[:, q * H:(q + 1) * H].astype(np.float64) for q in range(4))
    cs = rng.standard_normal((T + 1, B, H), dtype=np.float32)
    h = np.empty((B, H), np.float32)
    LK.cell_forward(a, cs[1], cs[2], h)
    c_ref = f * cs[1] + i * g
    np.testing.assert_allclose(cs[2], c_ref, atol=1e-6)
    np.testing.assert_allclose(h, o * np.tanh(c_ref), atol=3e-6)
    dh_out = rng.standard_normal((B, H + 11), dtype=np.float32)  # only the first H columns are d(loss)/d(h)
    carry = rng.standard_normal((2, B, H), dtype=np.float32)
    dc_in, dh_back = carry[0].astype(np.float64), carry[1].astype(np.float64)
    dg = a.copy()
    LK.cell_backward(dg, cs, 1, dh_out, carry)  # in place: the gates' gradients over the gates
    th = np.tanh(cs[2].astype(np.float64))
    dh = dh_out[:, :H] + dh_back
    dc = dc_in + dh * o * (1 - th * th)
    ref = np.concatenate([dc * g * i * (1 - i), dc * cs[1] * f * (1 - f), dc * i * (1 - g * g), dh * th * o * (1 - o)], 1)
    np.testing.assert_allclose(dg, ref, atol=1e-5)
    np.testing.assert_allclose(carry[0], dc * f, atol=1e-5)


@pytest.mark.parametrize("spec,vocab,b,t", [("lstm:embed=32,hidden=32,layers=2", 50, 3, 5),
                                            ("lstm:embed=20,hidden=40,layers=2", 13, 5, 7)])
def test_gradients_match_autograd_with_whole_and_partial_panels(spec, vocab, b, t):
    """Widths that are whole panels (read in place) and not (padded copies), the block projection of
    layer 0 (vocabulary above the block's rows) and the token table: gradients as autograd's."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    m = get_lstm(spec, vocab)
    assert m._token_table(b * t) == (vocab <= b * t)
    w = m.init(5)
    x, y = _batch(rng, vocab, b, t)
    loss, g = m.loss_and_grad(w, x, y)
    net = _torch_lm(torch, m)
    net.load_state_dict({k: torch.from_numpy(v.astype(np.float64)) for k, v in m.state_dict(w).items()})
    lt = torch.nn.functional.cross_entropy(net(torch.from_numpy(x), None)[0].reshape(-1, vocab),
                                           torch.from_numpy(y).reshape(-1))
    lt.backward()
    assert loss == pytest.approx(lt.item(), rel=1e-5)
    gs = m.state_dict(g)
    for name, p in net.named_parameters():
        ref = p.grad.numpy()
        err = np.abs(gs[name] - ref).max() / np.abs(ref).max()
        assert err <= 1e-4, f"{name}: relative error {err:.2e}"


@pytest.mark.slow
def test_packed_gemm_without_avx512_uses_the_narrow_tile(tmp_path):
    """Compiled for a CPU without AVX-512 (numba's target set by environment), the kernel takes 4 x 16
    tiles of 8-float vectors, and the products and the model's gradients stay right."""
    from narrow_cpu import run_without_avx512

    code = """
import numpy as np
from zsgd.nn import lstm_gemm as LG
from zsgd.nn.lstm import get_lstm
assert (LG.NR, LG.MR) == (16, 4), (LG.NR, LG.MR)
rng = np.random.default_rng(0)
for m, k, n in ((32, 256, 1024), (7, 300, 20), (1, 3, 5)):
    a = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    bp = np.empty((LG.panels(n), k, LG.NR), np.float32)
    LG.pack_rows(w, bp)
    c = np.empty((m, LG.panels(n) * LG.NR), np.float32)
    LG.gemm_packed(a, bp, c)
    ref = a.astype(np.float64) @ w.T.astype(np.float64)
    assert np.abs(c[:, :n] - ref).max() <= 1e-5 * np.abs(ref).max()
mdl = get_lstm("lstm:embed=5,hidden=20,layers=2", 9)
wt = mdl.init(1)
x = rng.integers(0, 9, (6, 7))
g = mdl.loss_and_grad(wt, x, x)[1]
eps, i = 1e-2, mdl.layout()[2][2] + 3  # one weight of weight_hh_l0
wp, wm = wt.copy(), wt.copy()
wp[i] += eps
wm[i] -= eps
fd = (mdl.loss_and_grad(wp, x, x)[0] - mdl.loss_and_grad(wm, x, x)[0]) / (2 * eps)
assert abs(fd - g[i]) <= 2e-3 + 2e-2 * abs(fd), (fd, g[i])
print("narrow ok")
"""
    proc = run_without_avx512(code, tmp_path)
    assert proc.returncode == 0 and "narrow ok" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------- state, prediction, errors


def test_carried_state_equals_one_long_sequence():
    """Two blocks with the state carried give the logits of one block twice as long."""
    rng = np.random.default_rng(2)
    m = get_lstm("lstm:embed=5,hidden=8,layers=2", 9)
    w = m.init(1)
    x = rng.integers(0, 9, (3, 10))
    whole = m.predict(w, x)
    st = m.init_state(3)
    first, second = m.predict(w, x[:, :4], state=st), m.predict(w, x[:, 4:], state=st)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, atol=1e-6)
    st.reset()
    np.testing.assert_allclose(m.predict(w, x[:, 4:], state=st), m.predict(w, x[:, 4:]), atol=0)


def test_training_lowers_the_loss():
    """A few SGD steps on a periodic sequence: the model must learn it."""
    m = get_lstm("lstm:embed=8,hidden=16,layers=1", 5)
    w = m.init(0)
    seq = np.tile(np.array([0, 1, 2, 3, 4, 3, 2, 1]), 40)
    x = np.stack([seq[i:i + 16] for i in range(0, 64, 8)])
    y = np.stack([seq[i + 1:i + 17] for i in range(0, 64, 8)])
    first = m.loss_and_grad(w, x, y)[0]
    for _ in range(150):
        loss, g = m.loss_and_grad(w, x, y)
        w -= np.float32(0.5) * g
    assert loss < 0.3 * first


def test_evaluate_stream_matches_predict():
    rng = np.random.default_rng(3)
    m = get_lstm("lstm:embed=4,hidden=6,layers=1", 6)
    w = m.init(0)
    tokens = rng.integers(0, 6, 103)
    loss, acc = m.evaluate_stream(w, tokens, batch=2, bptt=7)
    rows = tokens[:102].reshape(2, 51)
    logits = m.predict(w, rows[:, :-1]).reshape(-1, 6).astype(np.float64)
    tgt = rows[:, 1:].reshape(-1)
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    assert loss == pytest.approx(float(np.mean(lse - logits[np.arange(len(tgt)), tgt])), rel=1e-5)
    assert acc == pytest.approx(float(np.mean(logits.argmax(1) == tgt)))


def test_bad_inputs_raise_one_line_errors():
    m = get_lstm("lstm:embed=4,hidden=6,layers=1", 6)
    w = m.init(0)
    ok = np.zeros((2, 3), np.int64)
    for x, msg in ((np.full((2, 3), 6), "outside the model's vocabulary"), (np.full((2, 3), -1), "outside"),
                   (np.zeros((2, 3), np.float32), "integer token ids"), (np.zeros(3, np.int64), "shape")):
        with pytest.raises(ZsgdError, match=msg):
            m.loss_and_grad(w, x, ok)
    with pytest.raises(ZsgdError, match="flat float32"):
        m.loss_and_grad(w[:-1], ok, ok)
    with pytest.raises(ZsgdError, match="does not fit batch"):
        m.loss_and_grad(w, ok, ok, state=m.init_state(3))
    with pytest.raises(ZsgdError, match="shape of inputs"):
        m.loss_and_grad(w, ok, ok[:, :2])
