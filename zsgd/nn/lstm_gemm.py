"""The LSTM's per-time-step matrix products: a register-blocked AVX-512 kernel over weights packed once.

Each time step of the recurrence multiplies a (B, H) state by the (4H, H)
recurrent matrix, B = 32 rows: 128 such products forward and 126 backward in
a training step of the default model. Through OpenBLAS each call repacks the
1 MB weight matrix before it computes (there is no "pack once" API), and at
32 rows that packing is about 40 % of the call (93 GFLOP/s against 160 for
the same sgemm at 2,048 rows). Here the weights are packed once per layer
and block (:func:`pack_rows`, :func:`pack_cols`: panels of :data:`NR` columns,
32 with AVX-512, each k's values contiguous), and every step's product runs
over the packed panels (:func:`gemm_packed`). The block-wide products
of ``zsgd.nn.lstm`` (input projections, input and weight gradients) use the
same tile (:func:`gemm_packed`, :func:`gemm_at`), so their speed does not
depend on which kernels numpy's OpenBLAS picks or is told to use (on an
AMD Zen 5 with ``OPENBLAS_CORETYPE=Haswell``: 126 GFLOP/s on one core,
against the tile's 250).

**The micro-kernel** keeps an 8 x 32 tile of the result in sixteen 512-bit
registers for the whole k loop: per k, two vector loads of the panel, eight
broadcasts of ``a``, sixteen fused multiply-adds, the classic BLIS/OpenBLAS
shape. Where numba compiles for a CPU without AVX-512 (16 vector registers
of 8 floats), the tile is 4 x 16 in eight 256-bit registers instead, so it
does not spill. Numba's loop vectoriser cannot express that (it keeps such
accumulators in memory, or reduces dot products horizontally, each output
paying a 16-lane sum), so the tile (``_make_tile``) is a numba ``@intrinsic`` that
emits the loop as LLVM IR with explicit ``<16 x float>`` values; LLVM then
only allocates registers. Rows that do not fill a tile use smaller ones (4,
2, 1 rows); columns are padded with zeros in the panels (the result's rows
are ``c.shape[1] >= panels * NR`` wide). ``k`` is cut into blocks of 256 so
the rows of ``a`` being broadcast stay in L1; blocks after the first add to
the tile.

**Why ``"prefer-vector-width"="512"``.** LLVM's tuning for Intel server
cores prefers 256-bit vectors (to avoid AVX-512 clock throttling on older
parts) and would split every ``<16 x float>`` in two. The functions that
run the kernel carry the attribute clang sets for
``-mprefer-vector-width=512`` (:func:`prefer_512`); other functions are
untouched, and a CPU without AVX-512 gets its widest vectors. llvmlite
accepts only the attribute names it knows, so the string attribute is added
to the set directly; should a future llvmlite refuse it, the kernels still
compile (slower, same results).

The layer loops of ``zsgd.nn.lstm_kernels`` inline :func:`gemm_packed`
(``always_inline``: a caller must never run a linked copy, see
``zsgd.jit``) and their cache entries are keyed on this file too, so an
edit here recompiles them.
"""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from zsgd.jit import always_inline  # before any @njit: LLVM options, cache keys (see zsgd.jit)

_FM = {"reassoc", "contract", "nsz", "arcp"}
_WIDE = '"prefer-vector-width"="512"'



def _vector_lanes() -> int:
    """Floats per vector register numba compiles for: 16 with AVX-512, else 8."""
    try:
        import llvmlite.binding as ll
        from numba.core import config

        features = config.CPU_FEATURES if config.CPU_FEATURES is not None else ll.get_host_cpu_features().flatten()
    except Exception:  # pragma: no cover - cannot tell: the narrow tile is safe everywhere
        return 8
    return 16 if "+avx512f" in features.split(",") else 8


_LANES = _vector_lanes()
#: Columns per panel: two vector registers.
NR = 2 * _LANES
_NV = 2
#: Rows per full tile: 2 x MR accumulators, half the vector registers (32 with AVX-512, 16 without).
MR = 8 if _LANES == 16 else 4
#: k per block: 8 rows of ``a`` x 256 floats = 8 KB broadcast from L1, a panel block of 32 KB.
KC = 256

_F32 = ir.FloatType()
_VEC = ir.VectorType(_F32, _LANES)
_SPLAT = ir.Constant(ir.VectorType(ir.IntType(32), _LANES), [0] * _LANES)


def _mark_wide(builder: ir.IRBuilder) -> None:
    try:
        set.add(builder.function.attributes, _WIDE)
    except Exception:  # pragma: no cover - an llvmlite that stores attributes differently: narrower, still correct
        pass


@intrinsic
def prefer_512(typingctx):
    """Mark the calling numba function to vectorise with 512-bit registers (see the module docstring)."""
    sig = types.none()

    def codegen(context, builder, signature, args):
        _mark_wide(builder)
        return context.get_dummy_value()

    return sig, codegen


def _tile_codegen(mr: int, a_mode: str = "rows", raw_b: bool = False):
    """LLVM IR for ``c[i0:i0+mr, p*NR:(p+1)*NR] (+)= a[i0:i0+mr, k0:k1] @ panel p, rows k0:k1``.

    ``accumulate`` (0 or 1, at run time) starts the tile from ``c`` instead
    of zeros: the k blocks after the first. ``a_mode`` "rows": ``a`` is
    (M, K); "buf": the array passed holds only the tile's block of ``a``,
    transposed, (k1 - k0, w) with ``a[i0 + r, k0 + k]`` at ``[k, r]`` (see
    :func:`gemm_at`). With
    ``raw_b`` the second array is ``B`` itself, (K, N) with N whole panels,
    panel p at columns ``p * NR``, rows ``ldb = N`` floats apart.
    """

    def codegen(context, builder, sig, args):
        a, bp, c, i0, p, k0, k1, accumulate = args
        A = context.make_array(sig.args[0])(context, builder, a)
        Bp = context.make_array(sig.args[1])(context, builder, bp)
        C = context.make_array(sig.args[2])(context, builder, c)
        lda = cgutils.unpack_tuple(builder, A.shape)[1]
        kp = cgutils.unpack_tuple(builder, Bp.shape)[1]
        ldc = cgutils.unpack_tuple(builder, C.shape)[1]
        intp = lda.type
        const = lambda v: ir.Constant(intp, v)  # noqa: E731
        _mark_wide(builder)
        zero = ir.Constant(_VEC, None)
        # Row r of the tile: a[i0 + r, k0 + k] and c[i0 + r, p * NR + LANES * v].
        if a_mode == "buf":  # a[i0 + r, k0 + k] at [k, r]: row r starts at column r, steps of lda per k
            arows = [builder.gep(A.data, [const(r)]) for r in range(mr)]
        else:
            arows = [builder.gep(A.data, [builder.add(builder.mul(builder.add(i0, const(r)), lda), k0)]) for r in range(mr)]
        crows = [builder.gep(C.data, [builder.add(builder.mul(builder.add(i0, const(r)), ldc), builder.mul(p, const(NR)))])
                 for r in range(mr)]
        if raw_b:  # B[k0 + k, p * NR + j]: kp is B's row length
            panel = builder.gep(Bp.data, [builder.add(builder.mul(k0, kp), builder.mul(p, const(NR)))])
        else:
            panel = builder.gep(Bp.data, [builder.mul(builder.add(builder.mul(p, kp), k0), const(NR))])
        flag = builder.icmp_signed("!=", accumulate, ir.Constant(accumulate.type, 0))
        init = []
        for r in range(mr):
            row = []
            for v in range(_NV):
                old = builder.load(builder.bitcast(builder.gep(crows[r], [const(_LANES * v)]), _VEC.as_pointer()), typ=_VEC)
                old.align = 4
                row.append(builder.select(flag, old, zero))
            init.append(row)
        n = builder.sub(k1, k0)
        pre = builder.block
        loop = builder.append_basic_block("tile.loop")
        done = builder.append_basic_block("tile.done")
        builder.cbranch(builder.icmp_signed(">", n, const(0)), loop, done)
        builder.position_at_end(loop)
        k = builder.phi(intp)
        k.add_incoming(const(0), pre)
        acc = [[builder.phi(_VEC) for _ in range(_NV)] for _ in range(mr)]
        for r in range(mr):
            for v in range(_NV):
                acc[r][v].add_incoming(init[r][v], pre)
        bk = builder.gep(panel, [builder.mul(k, kp if raw_b else const(NR))])
        bv = []
        for v in range(_NV):
            ld = builder.load(builder.bitcast(builder.gep(bk, [const(_LANES * v)]), _VEC.as_pointer()), typ=_VEC)
            ld.align = 4
            bv.append(ld)
        ka = k if a_mode == "rows" else builder.mul(k, lda)
        new = []
        for r in range(mr):
            s = builder.load(builder.gep(arows[r], [ka]), typ=_F32)
            sv = builder.insert_element(ir.Constant(_VEC, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
            sv = builder.shuffle_vector(sv, ir.Constant(_VEC, ir.Undefined), _SPLAT)
            new.append([builder.fadd(acc[r][v], builder.fmul(sv, bv[v], flags=("contract",)), flags=("contract",))
                        for v in range(_NV)])
        k_next = builder.add(k, const(1))
        k.add_incoming(k_next, loop)
        for r in range(mr):
            for v in range(_NV):
                acc[r][v].add_incoming(new[r][v], loop)
        builder.cbranch(builder.icmp_signed("<", k_next, n), loop, done)
        builder.position_at_end(done)
        out = []
        for r in range(mr):  # every phi first: LLVM wants them at the top of the block
            row = []
            for v in range(_NV):
                ph = builder.phi(_VEC)
                ph.add_incoming(init[r][v], pre)
                ph.add_incoming(new[r][v], loop)
                row.append(ph)
            out.append(row)
        for r in range(mr):
            for v in range(_NV):
                st = builder.store(out[r][v], builder.bitcast(builder.gep(crows[r], [const(_LANES * v)]), _VEC.as_pointer()))
                st.align = 4
        return context.get_dummy_value()

    return codegen


def _make_tile(mr: int, a_mode: str = "rows", raw_b: bool = False):
    @intrinsic
    def tile(typingctx, a, bp, c, i0, p, k0, k1, accumulate):
        return (types.none(a, bp, c, types.intp, types.intp, types.intp, types.intp, types.intp),
                _tile_codegen(mr, a_mode, raw_b))

    return tile


_tile_full, _tile4, _tile2, _tile1 = (_make_tile(m) for m in (MR, 4, 2, 1))
_tile_full_t = _make_tile(MR, "buf", False)
_tile4_t, _tile2_t, _tile1_t = (_make_tile(m, "buf", True) for m in (4, 2, 1))


def panels(n: int) -> int:
    """Panels of :data:`NR` columns that hold ``n`` columns."""
    return -(-n // NR)


@njit(cache=True, fastmath=_FM, error_model="numpy")
def pack_rows(w: np.ndarray, out: np.ndarray) -> None:
    """Pack ``w`` (N, K) for ``c = a @ w.T``: ``out[p, k, j] = w[p * NR + j, k]``, zero past N."""
    N, K = w.shape
    for p in range(out.shape[0]):
        for j in range(NR):
            n = p * NR + j
            if n < N:
                src = w[n]
                for k in range(K):
                    out[p, k, j] = src[k]
            else:
                for k in range(K):
                    out[p, k, j] = 0.0


@njit(cache=True, fastmath=_FM, error_model="numpy")
def pack_cols(w: np.ndarray, out: np.ndarray) -> None:
    """Pack ``w`` (K, N) for ``c = a @ w``: ``out[p, k, j] = w[k, p * NR + j]``, zero past N."""
    K, N = w.shape
    for p in range(out.shape[0]):
        for k in range(K):
            src = w[k]
            dst = out[p, k]
            for j in range(NR):
                n = p * NR + j
                dst[j] = src[n] if n < N else 0.0


@njit(cache=True, error_model="numpy")
def gemm_packed(a: np.ndarray, bp: np.ndarray, c: np.ndarray) -> None:
    """``c[:, :P * NR] = a @ B`` with ``B`` packed in ``bp`` (P, K, NR); ``a`` (M, K); all C-contiguous float32.

    ``c`` (M, >= P * NR) must not overlap ``a`` or ``bp``; its columns past
    the packed matrix's own width come out zero (the padding).
    """
    prefer_512()
    always_inline()
    M, K = a.shape
    m_full = M - M % MR
    for k0 in range(0, max(K, 1), KC):
        k1 = min(K, k0 + KC)
        acc = 1 if k0 else 0
        for p in range(bp.shape[0]):
            for i in range(0, m_full, MR):
                _tile_full(a, bp, c, i, p, k0, k1, acc)
            i = m_full
            if MR > 4 and M - i >= 4:
                _tile4(a, bp, c, i, p, k0, k1, acc)
                i += 4
            if M - i >= 2:
                _tile2(a, bp, c, i, p, k0, k1, acc)
                i += 2
            if M - i >= 1:
                _tile1(a, bp, c, i, p, k0, k1, acc)


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _pack_b_block(b: np.ndarray, k0: int, n: int, out: np.ndarray) -> None:
    """``out[p, k, :] = b[k0 + k, p * NR:(p + 1) * NR]``: rows k0..k0+n of ``b`` as contiguous panels."""
    always_inline()
    for k in range(n):
        src = b[k0 + k]
        for p in range(out.shape[0]):
            dst = out[p, k]
            for j in range(NR):
                dst[j] = src[p * NR + j]


@njit(cache=True, error_model="numpy")
def gemm_at(at: np.ndarray, b: np.ndarray, c: np.ndarray, b2: np.ndarray, c2: np.ndarray, colsum: np.ndarray) -> None:
    """``c[:, :N] = at.T @ b`` and ``c2[:, :N2] = at.T @ b2``: ``at`` (K, M), ``b`` (K, N), ``c`` (M, >= N).

    The block's weight gradients ``dg.T @ h``: ``at`` is the gate gradients
    as stored (time steps x streams, 4H), ``b`` the layer's previous hidden
    states and ``b2`` its input (a (K, 0) ``b2`` for none): one pass over
    ``dg`` serves both, and adds its column sums (the bias gradient) to
    ``colsum`` (M,) float64 when that is not empty. N and N2 must be
    multiples of :data:`NR`; every array C-contiguous float32.

    BLIS's loop order: for each block of KC rows, ``at``'s block is packed
    tile by tile, transposed ((M / MR, KC, MR), 1 MB at the default sizes:
    each tile's broadcasts contiguous), and ``b``'s block into panels; then
    each panel (32 KB) stays in L1 while every tile of rows runs against
    it. Read in place instead, the tile's k steps in ``dg`` are 4 KB apart,
    all in one L1 set, and ``b``'s rows 1 KB apart: 200 GFLOP/s, against
    205-215 this way (255 for the tiles alone, 0.5 ms of packing for 8 MB
    of ``dg``; OpenBLAS's SkylakeX kernels take the same 5.1 ms). Rows past
    the last whole tile go through a small buffer, a tile at a time.
    """
    prefer_512()
    K, M = at.shape
    n1, n2 = b.shape[1] // NR, b2.shape[1] // NR
    full = M // MR
    apk = np.empty((full, KC, MR), np.float32)
    bpk1 = np.empty((n1, KC, NR), np.float32)
    bpk2 = np.empty((n2, KC, NR), np.float32)
    buf = np.empty((KC, MR), np.float32)
    sums = colsum.shape[0] > 0
    for k0 in range(0, max(K, 1), KC):
        k1 = min(K, k0 + KC)
        n = k1 - k0
        acc = 1 if k0 else 0
        for c0 in range(0, n, 8):  # 8 rows of at (32 KB) at a time, so the reads stay in L1
            c1 = min(n, c0 + 8)
            for t in range(full):
                dst = apk[t]
                for k in range(c0, c1):
                    src = at[k0 + k]
                    for r in range(MR):
                        dst[k, r] = src[t * MR + r]
            if sums:  # whole rows at a time: vectorised, unlike a sum per packed column (0.4-0.6 ms more)
                for k in range(c0, c1):
                    src = at[k0 + k]
                    for j in range(M):
                        colsum[j] += src[j]
        _pack_b_block(b, k0, n, bpk1)
        _pack_b_block(b2, k0, n, bpk2)
        for p in range(n1):
            for t in range(full):
                _tile_full_t(apk[t], bpk1, c, t * MR, p, 0, n, acc)
        for p in range(n2):
            for t in range(full):
                _tile_full_t(apk[t], bpk2, c2, t * MR, p, 0, n, acc)
        i = full * MR
        while i < M:  # the last rows: 4, 2, 1 at a time, from b in place
            mr = 4 if M - i >= 4 else (2 if M - i >= 2 else 1)
            for k in range(n):
                src = at[k0 + k]
                for r in range(mr):
                    buf[k, r] = src[i + r]
            for p in range(n1 + n2):
                bb, cc, q = (b, c, p) if p < n1 else (b2, c2, p - n1)
                if mr == 4:
                    _tile4_t(buf, bb, cc, i, q, k0, k1, acc)
                elif mr == 2:
                    _tile2_t(buf, bb, cc, i, q, k0, k1, acc)
                else:
                    _tile1_t(buf, bb, cc, i, q, k0, k1, acc)
            i += mr
