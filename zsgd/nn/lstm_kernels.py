"""Numba kernels of the LSTM: every time step of a layer, and the element-wise work.

Every matrix product of the block (the recurrence's per-step products,
called from :func:`layer_forward` and :func:`layer_backward`, which walk a
whole layer through time in one call, and the block-wide input
projections, input and weight gradients called from ``zsgd.nn.lstm``) runs
in ``zsgd.nn.lstm_gemm`` (not numpy's BLAS: see ``zsgd.nn.lstm``). Numba
does everything else: embedding gather/scatter, and the fused gate non-linearities and cell update of one
time step, forward and backward. One kernel call per step replaces the
half-dozen element-wise tensor ops (each a pass over memory) an autograd
LSTM makes.

Layouts (time-major, so one time step is one contiguous block):

* gates ``(B, 4H)`` per step, PyTorch's order **i, f, g, o**: the columns of
  ``x @ weight_ih.T`` come out in that order with no reshuffling;
* cell ``c``, ``tanh(c)`` and hidden ``h``: ``(B, H)`` per step.

**Why a rational tanh.** This numba has no SVML, so ``np.exp``/``np.tanh``
in a loop are scalar libm calls (about 4 ns each): for the default sizes
that is as long as the step's recurrent sgemm. ``_tanh`` below is Eigen's
float ``ptanh`` (a 13/6-degree rational minimax fit on [-7.9, 7.9], a few
ulp from ``tanh``), which LLVM vectorises to AVX-512 like any other
multiply-add loop; ``sigmoid(x) = 0.5 + 0.5 tanh(x / 2)`` is exact algebra.
``tests/test_lstm.py`` checks both against numpy to 2e-6.

**Why one slice per gate.** The step kernels index every array by the
loop variable alone (``a[b][uh:2 * uh]`` taken once per row, then ``[j]``),
never ``row[uh + j]`` or a ``range(2 * uh, 3 * uh)`` loop: with those index
forms LLVM could not prove the accesses consecutive and vectorised them as
AVX-512 gathers and scatters (found in the assembly on an AMD Zen 5: the
gate kernel 23 us and the backward step 28.5 us at B=32, H=256; with the
slices 6.5 and 4.8 us, same results bit for bit).

**Why ``error_model="numpy"``.** Under numba's default (Python) error model
every float division checks for zero and raises ``ZeroDivisionError``; that
branch alone keeps LLVM from vectorising the loop (measured: the gate
kernel 10x slower). The denominator here is >= 4.9e-3, never zero.

Single-threaded and ``cache=True``, like every zsgd kernel. The per-step
kernels are inlined into the layer loops that call them (``always_inline``)
and LLVM is allowed more run-time overlap checks than its default 8, for
every kernel of the process (the backward step reads and writes seven
arrays: 78 -> 37 us at B=32, H=256); both are ``zsgd.jit``'s rules.
"""

from __future__ import annotations

import numpy as np
import llvmlite.ir as ir
from numba import njit, types
from numba import uint64 as u8
from numba.extending import intrinsic

from zsgd.jit import always_inline  # before any @njit: LLVM options, cache keys (see zsgd.jit)
from zsgd.nn.lstm_gemm import gemm_packed, prefer_512

_FM = {"reassoc", "contract", "nsz", "arcp"}
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)

# Eigen's generic_fast_tanh_float coefficients (numerator odd, denominator even).
_CLAMP = np.float32(7.90531110763549805)
_A1 = np.float32(4.89352455891786e-03)
_A3 = np.float32(6.37261928875436e-04)
_A5 = np.float32(1.48572235717979e-05)
_A7 = np.float32(5.12229709037114e-08)
_A9 = np.float32(-8.60467152213735e-11)
_A11 = np.float32(2.00018790482477e-13)
_A13 = np.float32(-2.76076847742355e-16)
_B0 = np.float32(4.89352518554385e-03)
_B2 = np.float32(2.26843463243900e-03)
_B4 = np.float32(1.18534705686654e-04)
_B6 = np.float32(1.19825839466702e-06)


@njit(cache=True, fastmath=_FM, error_model="numpy", inline="always")
def _tanh(x):
    """float32 tanh as a vectorisable rational function (see the module docstring)."""
    # Selects, not min/max (those compile to branches), written so NaN stays NaN.
    x = _CLAMP if x > _CLAMP else x
    x = -_CLAMP if x < -_CLAMP else x
    x2 = x * x
    p = x2 * _A13 + _A11
    p = x2 * p + _A9
    p = x2 * p + _A7
    p = x2 * p + _A5
    p = x2 * p + _A3
    p = x2 * p + _A1
    p = x * p
    q = x2 * _B6 + _B4
    q = x2 * q + _B2
    q = x2 * q + _B0
    return p / q


@njit(cache=True, fastmath=_FM, error_model="numpy", inline="always")
def _sigmoid(x):
    return _HALF + _HALF * _tanh(_HALF * x)


# ---------------------------------------------------------------- one time step


@njit(cache=True, fastmath=_FM, error_model="numpy")
def gates_forward(xp: np.ndarray, rows: np.ndarray, rec: np.ndarray, bias: np.ndarray, a: np.ndarray) -> None:
    """Activated gates of one step: ``a[b] = act(xp[rows[b]] + rec[b] + bias)``, all rows 4H wide.

    ``xp``: input projections ``x @ weight_ih.T``, one row per (step, stream)
    or, for a small vocabulary, one row per token (``rows`` then holds the
    step's token ids: the embedding and the projection folded into one
    table); ``rec``: ``h_{t-1} @ W_hh.T``; ``bias``: ``b_ih + b_hh``.
    Sigmoid for i, f, o and tanh for g. Kept apart from the cell update so
    each loop touches few arrays: LLVM vectorises a loop only when a
    handful of run-time overlap checks between its arrays suffice.
    """
    prefer_512()
    always_inline()
    B, H4 = a.shape
    uh = u8(H4 // 4)
    for b in range(B):
        x0 = xp[rows[b]]
        r0 = rec[b]
        a0 = a[b]
        for q in range(4):  # one gate's H columns per loop, every array indexed by the loop variable alone
            lo = u8(q) * uh
            hi = lo + uh
            xs, rs, bs, ds = x0[lo:hi], r0[lo:hi], bias[lo:hi], a0[lo:hi]
            if q == 2:
                for j in range(uh):
                    ds[j] = _tanh(xs[j] + rs[j] + bs[j])
            else:
                for j in range(uh):
                    ds[j] = _sigmoid(xs[j] + rs[j] + bs[j])


@njit(cache=True, fastmath=_FM, error_model="numpy")
def cell_forward(a: np.ndarray, c_prev: np.ndarray, c: np.ndarray, h: np.ndarray) -> None:
    """The cell update of one step: ``c = f * c_prev + i * g``, ``h = o * tanh(c)``.

    ``a``: the step's activated gates (B, 4H); the others (B, H).
    """
    prefer_512()
    always_inline()
    B, H = c.shape
    uh = u8(H)
    for b in range(B):
        a0 = a[b]
        ai, af, ag, ao = a0[:uh], a0[uh:2 * uh], a0[2 * uh:3 * uh], a0[3 * uh:4 * uh]
        cp = c_prev[b]
        cr = c[b]
        hr = h[b]
        for j in range(uh):
            cv = af[j] * cp[j] + ai[j] * ag[j]
            cr[j] = cv
            hr[j] = ao[j] * _tanh(cv)


@njit(cache=True, fastmath=_FM, error_model="numpy")
def cell_backward(a: np.ndarray, cs: np.ndarray, t: int, dh_out: np.ndarray, carry: np.ndarray) -> None:
    """Gradients of step ``t``, through the cell and the gates' non-linearities, written over ``a``.

    ``a``: the step's activated gates (B, 4H), replaced by d(loss)/d(pre-activation
    gates), which the caller turns into weight, bias, input and ``carry[1]``
    gradients with products; ``cs``: every step's cell (T+1, B, H),
    ``cs[t]`` being c_{t-1} and ``cs[t + 1]`` c_t; ``dh_out``: d(loss)/d(h_t)
    from the layer above (or the output layer), (B, >= H). ``carry``
    (2, B, H) is what flows back in time: ``carry[0]`` is d(loss)/d(c_t) on
    entry and d(loss)/d(c_{t-1}) on exit, ``carry[1]`` the part of
    d(loss)/d(h_t) that came back through ``W_hh`` from step t+1.
    ``tanh(c)`` is recomputed (cheaper than storing it). The arguments are
    grouped (``cs``, ``carry``) to keep the loop to few distinct arrays,
    which is what lets LLVM vectorise it (3x faster than seven arrays).

    **Why in place.** The gates are read once, here, and nothing needs them
    afterwards; writing the gradients over them instead of into a block of
    their own halves the backward pass's element-wise memory traffic (the
    gates are 8 MB per layer at the default sizes, out of cache by then: a
    separate 8 MB output is read in before it is written). Each element's
    four gates are read before any is written, so the order is safe. Both
    layers' backward through time went from 11.5-11.9 to 10.7-11.1 ms a
    training step (thread CPU, load 8-9, AMD Zen 5), the same gradients
    bit for bit.
    """
    prefer_512()
    always_inline()
    B, H = cs.shape[1], cs.shape[2]  # dh_out may be wider (padded to whole panels by the product above)
    uh = u8(H)
    for b in range(B):
        a0 = a[b]
        ai, af, ag, ao = a0[:uh], a0[uh:2 * uh], a0[2 * uh:3 * uh], a0[3 * uh:4 * uh]
        cp = cs[t, b]
        cr = cs[t + 1, b]
        dho = dh_out[b]
        dcr = carry[0, b]
        dhr = carry[1, b]
        for j in range(uh):
            i = ai[j]
            f = af[j]
            g = ag[j]
            o = ao[j]
            th = _tanh(cr[j])
            dh = dho[j] + dhr[j]
            dcv = dcr[j] + dh * o * (_ONE - th * th)
            ai[j] = dcv * g * i * (_ONE - i)
            af[j] = dcv * cp[j] * f * (_ONE - f)
            ag[j] = dcv * i * (_ONE - g * g)
            ao[j] = dh * th * o * (_ONE - o)
            dcr[j] = dcv * f


# ---------------------------------------------------------------- a whole layer through time


@njit(cache=True, fastmath=_FM, error_model="numpy")
def layer_forward(xp: np.ndarray, rows: np.ndarray, bias: np.ndarray, w_pack: np.ndarray, rec: np.ndarray,
                  a: np.ndarray, cs: np.ndarray, hs: np.ndarray) -> None:
    """Run one LSTM layer over every time step of a block.

    ``xp`` (R, 4H) and ``rows`` (T, B): step t's input projections are
    ``xp[rows[t]]`` (see :func:`gates_forward`); ``bias`` (4H,) the two
    biases summed; ``w_pack``: ``weight_hh`` packed by
    ``lstm_gemm.pack_rows``; ``rec`` (B, >= 4H) scratch. Writes the
    activated gates ``a`` (T, B, 4H) and, from the initial ``cs[0]``,
    ``hs[0]`` (each (T+1, B, H)), every step's cell and hidden state. One
    call per layer instead of three per step keeps Python out of the loop.
    """
    prefer_512()
    for t in range(rows.shape[0]):
        gemm_packed(hs[t], w_pack, rec)
        gates_forward(xp, rows[t], rec, bias, a[t])
        cell_forward(a[t], cs[t], cs[t + 1], hs[t + 1])


@njit(cache=True, fastmath=_FM, error_model="numpy")
def layer_backward(a: np.ndarray, cs: np.ndarray, dh: np.ndarray, w_pack: np.ndarray, carry: np.ndarray) -> None:
    """Back-propagate one layer through every time step of a block.

    ``a`` (T, B, 4H): the forward pass's activated gates, replaced by
    d(loss)/d(pre-activation gates) of every step (see :func:`cell_backward`);
    ``dh`` (T, B, >= H): d(loss)/d(h_t) from above; ``w_pack``: ``weight_hh``
    packed by ``lstm_gemm.pack_cols`` (for ``dg_t @ W_hh``); ``carry``
    (2, B, >= H) zeroed by the caller.
    """
    prefer_512()
    for t in range(a.shape[0] - 1, -1, -1):
        cell_backward(a[t], cs, t, dh[t], carry)
        if t:
            gemm_packed(a[t], w_pack, carry[1])


@njit(cache=True, fastmath=_FM, error_model="numpy")
def narrow_add_bias(wide: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
    """``out = wide[:, :C] + bias`` for (R, C) ``out``: the output layer's logits out of a panel-padded product."""
    R, C = out.shape
    uc = u8(C)
    for r in range(R):
        src = wide[r]
        dst = out[r]
        for j in range(uc):
            dst[j] = src[j] + bias[j]


# ---------------------------------------------------------------- output layer

# exp(f) on [-ln2/2, ln2/2]: Cephes' expf polynomial (about 1 ulp); exp(x) = 2^n exp(x - n ln2).
_LOG2E = np.float32(1.4426950408889634)
_LN2 = np.float32(0.6931471805599453)
_EXP_LO = np.float32(-87.0)  # 2^n stays a normal float; exp(-87) = 1.6e-38, a probability of nothing
_E6 = np.float32(1.9875691500e-4)
_E5 = np.float32(1.3981999507e-3)
_E4 = np.float32(8.3334519073e-3)
_E3 = np.float32(4.1665795894e-2)
_E2 = np.float32(1.6666665459e-1)
_E1 = np.float32(5.0000001201e-1)


@intrinsic
def _pow2(typingctx, n):
    """``2.0 ** n`` as float32 for an integer ``n`` in [-126, 127]: ``n + 127`` put in the exponent bits."""
    if not isinstance(n, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        v = args[0]
        v = builder.trunc(v, i32) if v.type.width > 32 else v
        bits = builder.shl(builder.add(v, ir.Constant(i32, 127)), ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(n), codegen


@njit(cache=True, fastmath=_FM, error_model="numpy", inline="always")
def _exp_neg(x):
    """float32 ``exp(x)`` for ``x <= 0`` as a vectorisable polynomial (numba's np.exp is a scalar libm call).

    One-constant range reduction: ``n ln2`` in float32 is off by at most
    2.4e-7 at n = -126, well under the softmax's float32 rounding.
    """
    x = _EXP_LO if x < _EXP_LO else x  # a select: NaN stays NaN
    n = np.floor(x * _LOG2E + _HALF)
    f = x - n * _LN2
    p = f * _E6 + _E5
    p = f * p + _E4
    p = f * p + _E3
    p = f * p + _E2
    p = f * p + _E1
    p = f * f * p + f + _ONE
    return p * _pow2(np.int32(n))


#: The functions :func:`apply_elementwise` computes: the kernels' tanh, sigmoid, and exp for x <= 0.
TANH, SIGMOID, EXP_NEG = 0, 1, 2


@njit(cache=True, fastmath=_FM, error_model="numpy")
def apply_elementwise(x: np.ndarray, out: np.ndarray, fn: int) -> None:
    """``out = fn(x)`` elementwise with the kernels' own :data:`TANH`, :data:`SIGMOID` or :data:`EXP_NEG` (for tests)."""
    xf = x.reshape(-1)
    of = out.reshape(-1)
    for k in range(u8(xf.size)):
        v = xf[k]
        if fn == TANH:
            of[k] = _tanh(v)
        elif fn == SIGMOID:
            of[k] = _sigmoid(v)
        else:
            of[k] = _exp_neg(v)


@njit(cache=True, fastmath=_FM, error_model="numpy")
def softmax_xent(logits: np.ndarray, y: np.ndarray, dlogits: np.ndarray) -> float:
    """Mean softmax cross-entropy of (N, V) ``logits`` against ``y``; writes d(loss)/d(logits).

    ``zsgd.kernels.softmax_xent``'s result with a vectorised ``exp``
    (:func:`_exp_neg`): the library's calls ``exp`` once per logit through
    libm, 0.5 ms of a training step at 2048 rows x 72 characters (thread
    CPU, AMD Zen 5). Stable the same way: the row's max subtracted first.
    """
    prefer_512()
    N, V = logits.shape
    uv = u8(V)
    inv_n = np.float32(1.0 / N)
    total = 0.0
    for i in range(N):
        row = logits[i]
        d = dlogits[i]
        m = row[0]
        for j in range(uv):
            v = row[j]
            m = v if v > m else m
        s = 0.0  # float64, as the library's
        for j in range(uv):
            e = _exp_neg(row[j] - m)
            d[j] = e
            s += e
        total += np.log(s) + m - row[y[i]]
        inv = np.float32(1.0 / s) * inv_n
        for j in range(uv):
            d[j] *= inv
        d[y[i]] -= inv_n
    return total / N


# ---------------------------------------------------------------- embedding


@njit(cache=True, fastmath=_FM, error_model="numpy")
def embed_gather(table: np.ndarray, tokens: np.ndarray, out: np.ndarray) -> None:
    """``out[r] = table[tokens[r]]`` for flat ``tokens`` (rows) and (rows, E) ``out``."""
    E = table.shape[1]
    ue = u8(E)
    for r in range(tokens.shape[0]):
        src = table[tokens[r]]
        dst = out[r]
        for k in range(ue):
            dst[k] = src[k]


@njit(cache=True, fastmath=_FM, error_model="numpy")
def embed_scatter_add(dx: np.ndarray, tokens: np.ndarray, gtable: np.ndarray) -> None:
    """``gtable[tokens[r]] += dx[r]`` (repeated tokens accumulate), gtable zeroed by the caller."""
    E = gtable.shape[1]
    ue = u8(E)
    for r in range(tokens.shape[0]):
        dst = gtable[tokens[r]]
        src = dx[r]
        for k in range(ue):
            dst[k] += src[k]


@njit(cache=True)
def check_tokens(tokens: np.ndarray, vocab: int) -> int:
    """Index of the first token outside ``[0, vocab)``, or -1 (a bad id must not read past the table)."""
    for r in range(tokens.shape[0]):
        if tokens[r] < 0 or tokens[r] >= vocab:
            return r
    return -1
