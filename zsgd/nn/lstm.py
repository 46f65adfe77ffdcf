"""A recurrent language model on ONE flat float32 parameter vector.

``lstm[:embed=E,hidden=H,layers=L]``: token embedding (V x E) -> L stacked
LSTM layers of H units -> linear layer over the vocabulary, trained with the
mean next-token cross-entropy over every position of a (batch, bptt) block.
Defaults (E=64, H=256, L=2: 879,176 parameters for the 72 characters of the
embedded corpus) learn a character model of it to a test perplexity of 5.4
in three minutes on one (shared) core, against 20.3 for the characters'
frequencies alone.

Parameters are views into the flat vector in PyTorch's names, shapes and
order (``embed.weight``, ``lstm.weight_ih_l0``, ``lstm.weight_hh_l0``,
``lstm.bias_ih_l0``, ``lstm.bias_hh_l0``, ..., ``fc.weight``, ``fc.bias``;
gate order i, f, g, o), so ``state_dict`` loads into ``torch.nn.Embedding``,
``torch.nn.LSTM(batch_first=True)`` and ``torch.nn.Linear`` unchanged.

**Truncated back-propagation through time.** ``loss_and_grad`` takes an
optional :class:`LSTMState`: the (h, c) the previous block of the same
streams ended with. The forward pass starts from it and leaves the block's
final (h, c) in it; no gradient flows into it (that is the truncation). The
caller resets it where a stream starts over (``zsgd.data.text``).

How a step runs: one product projects every time step's input at once
(``X @ W_ih.T``; for layer 0 with a vocabulary no larger than the block,
``embed.weight @ W_ih0.T``, one row per token), then one numba call per
layer walks the time steps: the (B, H) x (H, 4H) product of the recurrence
(no weight repacking per step) and two fused kernels, the gates'
non-linearities and the cell update (``zsgd.nn.lstm_kernels``). The
backward pass mirrors it and leaves the weight gradients to products over
the whole block (one pass over a layer's gate gradients gives both weight
gradients and the bias gradient). Every product, the token table's small
ones included, runs in ``zsgd.nn.lstm_gemm``'s AVX-512 tile, single
threaded, not numpy's BLAS, whose speed depends on which kernels OpenBLAS
picks (on an AMD Zen 5 whose environment sets ``OPENBLAS_CORETYPE=Haswell``,
AVX2: 126 GFLOP/s on one core against the tile's 250, 233 with its
SkylakeX kernels) and which splits even a 9 MFLOP product over its
threads: on a shared 2-core machine the step's thread then spun waiting
for the other, 6-8 ms of a training step's CPU on average.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import numpy as np

from zsgd import kernels as K
from zsgd.errors import ZsgdError
from zsgd.nn import lstm_gemm as LG
from zsgd.nn import lstm_kernels as LK
from zsgd.nn.flat import check_flat, load_flat
from zsgd.nn.layers import buffer
from zsgd.nn.lstm_spec import LSTMSpec, is_lstm_name, parse_lstm_name

__all__ = ["LSTMModel", "LSTMSpec", "LSTMState", "get_lstm", "is_lstm_name", "parse_lstm_name", "warm_up"]

#: Workspaces kept (training shape, evaluation shape, a ragged tail).
_WORKSPACES = 3


class LSTMState:
    """The (h, c) that a batch of streams carries from one block to the next.

    ``h`` and ``c`` are (layers, batch, hidden) float32; zeros after
    :meth:`reset`, which the data stream asks for at a shard's boundary.
    """

    def __init__(self, layers: int, batch: int, hidden: int) -> None:
        self.h = np.zeros((layers, batch, hidden), np.float32)
        self.c = np.zeros((layers, batch, hidden), np.float32)

    @property
    def batch(self) -> int:
        return self.h.shape[1]

    def reset(self) -> None:
        """Zero the state: the next block starts a stream afresh."""
        self.h.fill(0.0)
        self.c.fill(0.0)


class LSTMModel:
    """Embedding -> LSTM x L -> linear, with the zsgd model interface (see ``zsgd.nn.models.ModelLike``).

    Inputs are token ids, ``x`` and ``y`` of shape (batch, bptt): ``y`` is
    ``x`` shifted by one token. ``n_classes`` is the vocabulary size.
    """

    is_language_model = True

    def __init__(self, spec: LSTMSpec, vocab_size: int, seed: int = 0, bptt: int = 64) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 2:
            raise ZsgdError(f"an lstm language model needs a vocabulary of at least 2 tokens, got {vocab_size!r}")
        if isinstance(bptt, bool) or not isinstance(bptt, (int, np.integer)) or bptt < 1:
            raise ZsgdError(f"--bptt must be a positive integer, got {bptt!r}")
        self.spec = spec
        self.name = spec.name
        #: Tokens per sequence: what the training stream and the evaluation read at a time.
        self.bptt = int(bptt)
        self.vocab_size = self.n_classes = int(vocab_size)
        self.input_shape: tuple[int, ...] = ()
        E, H, V = spec.embed, spec.hidden, self.vocab_size
        specs: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (V, E))]
        for layer in range(spec.layers):
            n_in = E if layer == 0 else H
            specs += [(f"lstm.weight_ih_l{layer}", (4 * H, n_in)), (f"lstm.weight_hh_l{layer}", (4 * H, H)),
                      (f"lstm.bias_ih_l{layer}", (4 * H,)), (f"lstm.bias_hh_l{layer}", (4 * H,))]
        specs += [("fc.weight", (V, H)), ("fc.bias", (V,))]
        self._specs: list[tuple[str, tuple[int, ...], int]] = []
        off = 0
        for n, s in specs:
            self._specs.append((n, s, off))
            off += int(np.prod(s))
        self.n_params = off
        self._ws: OrderedDict[tuple[int, int], dict] = OrderedDict()

    # ------------------------------------------------------------ parameters

    def layout(self) -> list[tuple[str, tuple[int, ...], int]]:
        """(name, shape, offset into the flat vector) of every parameter, in PyTorch's order."""
        return list(self._specs)

    def init(self, seed: int = 0) -> np.ndarray:
        """PyTorch's defaults: embedding N(0, 1); LSTM U(+-1/sqrt(H)); linear U(+-1/sqrt(H)).

        Same seed, same vector, so every worker and the simulator start alike.
        """
        rng = np.random.default_rng(seed)
        w = np.empty(self.n_params, np.float32)
        bound = 1.0 / math.sqrt(self.spec.hidden)
        for n, s, o in self._specs:
            size = int(np.prod(s))
            if n == "embed.weight":
                w[o:o + size] = rng.standard_normal(size, dtype=np.float32)
            else:
                w[o:o + size] = (rng.random(size, dtype=np.float32) * 2.0 - 1.0) * np.float32(bound)
        return w

    def state_dict(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """{PyTorch name: view into ``w``} (writing to a view writes to ``w``)."""
        return self._views(self._check_w(w))

    def load_state_dict(self, sd: dict[str, Any]) -> np.ndarray:
        """A new flat vector from a ``state_dict`` (numpy arrays or CPU torch tensors)."""
        return load_flat(sd, self._specs, self.n_params, self.name)

    def _views(self, w: np.ndarray) -> dict[str, np.ndarray]:
        return {n: w[o:o + math.prod(s)].reshape(s) for n, s, o in self._specs}

    def init_state(self, batch: int) -> LSTMState:
        """A zero (h, c) for ``batch`` streams."""
        return LSTMState(self.spec.layers, int(batch), self.spec.hidden)

    # ------------------------------------------------------------ validation

    def _check_w(self, w: np.ndarray) -> np.ndarray:
        return check_flat(w, self.n_params, self.name)

    def _check_tokens(self, x: Any, what: str) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or min(x.shape) < 1 or not np.issubdtype(x.dtype, np.integer):
            raise ZsgdError(f"model '{self.name}' expects {what} as integer token ids of shape (batch, bptt), "
                            f"got {x.dtype} {x.shape}")
        tm = np.ascontiguousarray(x.T, dtype=np.int64)  # time-major: one step is one contiguous row
        bad = LK.check_tokens(tm.reshape(-1), self.vocab_size)
        if bad >= 0:
            raise ZsgdError(f"{what} holds token id {int(tm.reshape(-1)[bad])}, outside the model's vocabulary "
                            f"[0, {self.vocab_size}): the data and the model disagree on the vocabulary")
        return tm

    def _check_state(self, state: LSTMState | None, batch: int) -> LSTMState | None:
        if state is not None and (state.h.shape != (self.spec.layers, batch, self.spec.hidden)
                                  or state.c.shape != state.h.shape):
            raise ZsgdError(f"LSTM state of shape {state.h.shape} does not fit batch {batch} of model "
                            f"'{self.name}': use model.init_state({batch})")
        return state

    def _workspace(self, t: int, b: int) -> dict:
        ws = self._ws.get((t, b))
        if ws is None:
            ws = self._ws[(t, b)] = {}
            while len(self._ws) > _WORKSPACES:
                self._ws.popitem(last=False)
        else:
            self._ws.move_to_end((t, b))
        return ws

    # ------------------------------------------------------------ compute

    def _token_table(self, rows: int) -> bool:
        """Whether layer 0 reads its input projections from a (V, 4H) table instead of (rows, 4H).

        ``x_t @ W_ih0.T`` depends only on the token, so for a vocabulary no
        larger than the block's rows, ``embed.weight @ W_ih0.T`` (V rows)
        replaces the embedding lookup and the block-wide product, and the
        backward pass sums the gate gradients per token first (``S``, V
        rows): every layer-0 input gradient is then a product with ``S``.
        Same results to rounding; for a character vocabulary it removes
        three (T*B, 4H) x E products per step.
        """
        return self.vocab_size <= rows

    def _forward(self, p: dict[str, np.ndarray], tok: np.ndarray, state: LSTMState | None, ws: dict) -> np.ndarray:
        """Logits (T*B, V), time-major; keeps every activation the backward pass needs in ``ws``."""
        T, B = tok.shape
        E, H, V = self.spec.embed, self.spec.hidden, self.vocab_size
        rec = buffer(ws, "rec", (B, LG.panels(4 * H) * LG.NR))
        w_pack = buffer(ws, "w_pack_rows", (LG.panels(4 * H), H, LG.NR))
        bias = buffer(ws, "bias", (4 * H,))
        inp = None
        for layer in range(self.spec.layers):
            w_ih, w_hh = p[f"lstm.weight_ih_l{layer}"], p[f"lstm.weight_hh_l{layer}"]
            a = buffer(ws, f"a{layer}", (T, B, 4 * H))
            hs = buffer(ws, f"h{layer}", (T + 1, B, H))
            cs = buffer(ws, f"c{layer}", (T + 1, B, H))
            if layer == 0 and self._token_table(T * B):
                xp, rows = buffer(ws, "xp_table", (V, LG.panels(4 * H) * LG.NR)), tok
                ih_pack = buffer(ws, f"ih_pack_rows{E}", (LG.panels(4 * H), E, LG.NR))
                LG.pack_rows(w_ih, ih_pack)
                LG.gemm_packed(p["embed.weight"], ih_pack, xp)
            else:
                if inp is None:
                    inp = buffer(ws, "x0", (T * B, E))
                    LK.embed_gather(p["embed.weight"], tok.reshape(-1), inp)
                xp, rows = buffer(ws, f"xp{layer}", (T * B, LG.panels(4 * H) * LG.NR)), self._step_rows(T, B, ws)
                ih_pack = buffer(ws, f"ih_pack_rows{inp.shape[1]}", (LG.panels(4 * H), inp.shape[1], LG.NR))
                LG.pack_rows(w_ih, ih_pack)
                LG.gemm_packed(inp, ih_pack, xp)  # xp's padding columns past 4H are never read
            np.add(p[f"lstm.bias_ih_l{layer}"], p[f"lstm.bias_hh_l{layer}"], out=bias)
            if state is None:
                hs[0].fill(0.0)
                cs[0].fill(0.0)
            else:
                hs[0] = state.h[layer]
                cs[0] = state.c[layer]
            LG.pack_rows(w_hh, w_pack)
            LK.layer_forward(xp, rows, bias, w_pack, rec, a, cs, hs)
            if state is not None:
                state.h[layer] = hs[T]
                state.c[layer] = cs[T]
            inp = hs[1:].reshape(T * B, H)
        logits = buffer(ws, "logits", (T * B, V))
        fc_pack = buffer(ws, "fc_pack_rows", (LG.panels(V), H, LG.NR))
        wide = buffer(ws, "logits_wide", (T * B, LG.panels(V) * LG.NR))
        LG.pack_rows(p["fc.weight"], fc_pack)
        LG.gemm_packed(inp, fc_pack, wide)
        LK.narrow_add_bias(wide, p["fc.bias"], logits)
        return logits

    @staticmethod
    def _step_rows(T: int, B: int, ws: dict) -> np.ndarray:
        """(T, B) row indices 0..T*B-1: step t reads rows t*B..t*B+B-1 of a block-wide projection."""
        rows = ws.get("rows")
        if rows is None or rows.shape != (T, B):
            rows = ws["rows"] = np.arange(T * B, dtype=np.int64).reshape(T, B)
        return rows

    def loss_and_grad(self, w: np.ndarray, x: np.ndarray, y: np.ndarray, training: bool = True,
                      seed: int | None = None, out: np.ndarray | None = None,
                      state: LSTMState | None = None) -> tuple[float, np.ndarray]:
        """Mean next-token cross-entropy over the (batch, bptt) block and its gradient.

        ``state``: the streams' (h, c) to start from, updated in place to
        where this block ends (None: start from zeros, keep nothing).
        ``training`` and ``seed`` are accepted for the common interface; the
        model has no dropout, so the gradient is exact either way.
        """
        w = self._check_w(w)
        tok = self._check_tokens(x, "x")
        tgt = self._check_tokens(y, "y")
        if tgt.shape != tok.shape:
            raise ZsgdError(f"targets y {np.shape(y)} must have the shape of inputs x {np.shape(x)}")
        T, B = tok.shape
        state = self._check_state(state, B)
        grad = np.empty(self.n_params, np.float32) if out is None else out
        if grad.shape != (self.n_params,) or grad.dtype != np.float32 or not grad.flags.c_contiguous:
            raise ZsgdError(f"out must be a contiguous float32 vector of {self.n_params} parameters")
        ws = self._workspace(T, B)
        p, g = self._views(w), self._views(grad)
        logits = self._forward(p, tok, state, ws)
        dlogits = buffer(ws, "dlogits", logits.shape)
        loss = float(LK.softmax_xent(logits, tgt.reshape(-1), dlogits))
        self._backward(p, g, tok, dlogits, ws)
        return loss, grad

    def _backward(self, p: dict[str, np.ndarray], g: dict[str, np.ndarray], tok: np.ndarray,
                  dlogits: np.ndarray, ws: dict) -> None:
        T, B = tok.shape
        E, H = self.spec.embed, self.spec.hidden
        L = self.spec.layers
        top = ws[f"h{L - 1}"][1:].reshape(T * B, H)
        self._weight_grads(dlogits, [(top, g["fc.weight"])], ws)
        g["fc.bias"].fill(0.0)
        K.colsum_add(dlogits, g["fc.bias"])
        dh = buffer(ws, f"dh{L - 1}", (T * B, LG.panels(H) * LG.NR))
        fc_pack = buffer(ws, "fc_pack_cols", (LG.panels(H), self.vocab_size, LG.NR))
        LG.pack_cols(p["fc.weight"], fc_pack)
        LG.gemm_packed(dlogits, fc_pack, dh)
        carry = buffer(ws, "carry", (2, B, LG.panels(H) * LG.NR))  # d(loss)/d(c), d(loss)/d(h) flowing back in time
        w_pack = buffer(ws, "w_pack_cols", (LG.panels(H), 4 * H, LG.NR))
        for layer in range(L - 1, -1, -1):
            w_ih, w_hh = p[f"lstm.weight_ih_l{layer}"], p[f"lstm.weight_hh_l{layer}"]
            a, cs, hs = ws[f"a{layer}"], ws[f"c{layer}"], ws[f"h{layer}"]
            dh3 = dh.reshape(T, B, dh.shape[1])  # H wide from the output layer, padded to panels from a layer above
            carry.fill(0.0)
            LG.pack_cols(w_hh, w_pack)
            LK.layer_backward(a, cs, dh3, w_pack, carry)  # the gates' gradients over the gates
            dg2 = a.reshape(T * B, 4 * H)
            gw_hh = (hs[:T].reshape(T * B, H), g[f"lstm.weight_hh_l{layer}"])
            gb = g[f"lstm.bias_ih_l{layer}"]
            if layer == 0 and self._token_table(T * B):
                self._weight_grads(dg2, [gw_hh], ws)
                s = buffer(ws, "s0", (self.vocab_size, 4 * H))  # gate gradients summed per token
                s.fill(0.0)
                LK.embed_scatter_add(dg2, tok.reshape(-1), s)
                # W_ih0's and the bias's gradients from s, the embedding's s @ W_ih0: small products, kept in
                # the tile too (numpy's OpenBLAS splits them over its threads; see _forward's token table)
                self._weight_grads(s, [(p["embed.weight"], g["lstm.weight_ih_l0"])], ws, bias=gb)
                ih_pack = buffer(ws, f"ih_pack_cols{E}", (LG.panels(E), 4 * H, LG.NR))
                d_embed = buffer(ws, "d_embed", (self.vocab_size, LG.panels(E) * LG.NR))
                LG.pack_cols(w_ih, ih_pack)
                LG.gemm_packed(s, ih_pack, d_embed)
                g["embed.weight"][:] = d_embed[:, :E]
            else:
                inp = ws["x0"] if layer == 0 else ws[f"h{layer - 1}"][1:].reshape(T * B, H)
                self._weight_grads(dg2, [gw_hh, (inp, g[f"lstm.weight_ih_l{layer}"])], ws, bias=gb)
                n_in = E if layer == 0 else H
                # d(loss)/d(input) = dg @ W_ih, with the padding columns past n_in that no reader looks at
                dh = buffer(ws, f"dh{layer - 1}" if layer else "dx0", (T * B, LG.panels(n_in) * LG.NR))
                ih_pack = buffer(ws, f"ih_pack_cols{n_in}", (LG.panels(n_in), 4 * H, LG.NR))
                LG.pack_cols(w_ih, ih_pack)
                LG.gemm_packed(dg2, ih_pack, dh)
                if layer == 0:
                    g["embed.weight"].fill(0.0)
                    LK.embed_scatter_add(dh, tok.reshape(-1), g["embed.weight"])
            g[f"lstm.bias_hh_l{layer}"][:] = gb

    @staticmethod
    def _weight_grads(dg: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray]], ws: dict,
                      bias: np.ndarray | None = None) -> None:
        """``out = dg.T @ x`` for each ``(x, out)`` of ``pairs`` (one or two), and ``bias = dg.sum(0)``.

        One pass of zsgd's own product over the block's gate gradients
        (rows = time steps x streams) serves both of a layer's weight
        gradients and its bias gradient, at the rate of OpenBLAS's best
        (AVX-512) kernels whichever kernels numpy's OpenBLAS was given (see
        the module docstring). An ``x`` whose width is not
        whole panels goes through a zero-padded copy, its ``out`` through
        a padded scratch.
        """
        args, copies = [], []
        for x, out in pairs:
            n = x.shape[1]
            if n % LG.NR:
                xp = buffer(ws, f"x_pad{len(args)}", (x.shape[0], LG.panels(n) * LG.NR))
                xp[:, n:] = 0.0
                xp[:, :n] = x
                wide = buffer(ws, f"wgrad{len(args)}", (out.shape[0], xp.shape[1]))
                args += [xp, wide]
                copies.append((out, wide))
            else:
                args += [x, out]
        if len(pairs) == 1:
            args += [buffer(ws, "no_b", (dg.shape[0], 0)), buffer(ws, "no_c", (dg.shape[1], 0))]
        sums = buffer(ws, "colsum", (dg.shape[1] if bias is not None else 0,), np.float64)
        sums.fill(0.0)
        LG.gemm_at(dg, *args, sums)
        for out, wide in copies:
            out[:] = wide[:, :out.shape[1]]
        if bias is not None:
            bias[:] = sums

    def predict(self, w: np.ndarray, x: np.ndarray, state: LSTMState | None = None) -> np.ndarray:
        """Next-token logits (batch, bptt, V) for token ids ``x``; ``state`` as in :meth:`loss_and_grad`."""
        w = self._check_w(w)
        tok = self._check_tokens(x, "x")
        T, B = tok.shape
        state = self._check_state(state, B)
        logits = self._forward(self._views(w), tok, state, self._workspace(T, B))
        return logits.reshape(T, B, self.vocab_size).transpose(1, 0, 2).copy()

    def evaluate_stream(self, w: np.ndarray, tokens: np.ndarray, batch: int, bptt: int) -> tuple[float, float]:
        """(mean cross-entropy per token, next-token accuracy) over a whole token stream.

        The stream is cut into ``batch`` contiguous rows read ``bptt`` tokens
        at a time with the state carried, the way the model is trained, so
        every token but each row's first is predicted from its full past.
        """
        from zsgd.data.text import batchify

        w = self._check_w(w)
        rows = batchify(tokens, batch)
        B, n = rows.shape
        if n < 2:
            raise ZsgdError(f"a test stream of {len(tokens)} tokens is too short for {B} rows: lower the batch size")
        state = self.init_state(B)
        p = self._views(w)
        total, correct, count = 0.0, 0, 0
        for s in range(0, n - 1, bptt):
            t = min(bptt, n - 1 - s)
            tok = np.ascontiguousarray(rows[:, s:s + t].T, dtype=np.int64)
            tgt = np.ascontiguousarray(rows[:, s + 1:s + 1 + t].T, dtype=np.int64).reshape(-1)
            with np.errstate(over="ignore", invalid="ignore"):
                logits = self._forward(p, tok, state, self._workspace(t, B))
            sm, c = K.xent_sum_correct(logits, tgt)
            total += sm
            correct += c
            count += tgt.size
        return total / count, correct / count

    def __repr__(self) -> str:
        return f"LSTMModel({self.name!r}, vocab_size={self.vocab_size}, n_params={self.n_params})"


def get_lstm(name: str, vocab_size: int, seed: int = 0, bptt: int = 64) -> LSTMModel:
    """Build ``lstm[:embed=..,hidden=..,layers=..]`` for a vocabulary of ``vocab_size`` tokens."""
    return LSTMModel(parse_lstm_name(name), vocab_size, seed=seed, bptt=bptt)


def warm_up() -> None:
    """Compile (or load from numba's cache) every LSTM kernel, so a worker's first step is not a compile."""
    x = np.array([[0, 1, 2], [3, 4, 0]], np.int64)
    for vocab in (5, 7):  # 6 tokens: layer 0 from the token table, then from the block-wide projection
        m = get_lstm("lstm:embed=4,hidden=4,layers=2", vocab)
        m.loss_and_grad(m.init(0), x, x, state=m.init_state(2))
    LK.apply_elementwise(np.zeros(1, np.float32), np.zeros(1, np.float32), LK.TANH)
