"""A register-blocked AVX-512 tile with strided operands: the convolution's products without im2col.

Why: a convolution is a matrix product whose left operand (im2col's
columns) never needs to exist. With stride 1 and no padding, the im2col
row of output pixel ``(oh, ow)`` is, for each kernel row ``i``, the
``kw * C`` contiguous floats of the input at ``(oh + i, ow)``; the rows of
eight consecutive pixels are the same runs shifted by ``C``. So a tile can
read the input in place if its addresses are strides, not a dense matrix:
row ``r`` at ``a0 + r * ars``, step ``(k1, k2)`` of the inner dimension at
``k1 * ak1 + k2 * ak2`` (``k1`` over one kernel row's ``kw * C`` floats,
``k2`` over the ``kh`` kernel rows). The same two-level stride expresses
the weight gradient (the reduction runs over the output pixels: ``k1``
along a row of them, ``k2`` down the rows) and the input gradient (a
convolution of the zero-padded output gradient with the flipped weights).

The tile keeps an ``mr`` x 32 block of the result in ``2 * mr`` 512-bit
registers (``mr`` = 8: sixteen accumulators, the shape of
``zsgd.nn.lstm_gemm``'s tile, whose docstring says why numba's own
vectoriser cannot do this and why the functions carry
``"prefer-vector-width"="512"``): per step two vector loads of ``b``,
``mr`` broadcasts of ``a``, ``2 * mr`` fused multiply-adds. Without
AVX-512 the vectors are 8 floats and the tile 4 x 16 (eight registers).

The numba functions that call these tiles are compiled and cached in
``zsgd.nn.conv.direct``; their cache entries are keyed on this file too
(``zsgd.jit``), so an edit here recompiles them.
"""

from __future__ import annotations

import llvmlite.ir as ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from zsgd.nn.lstm_gemm import MR, NR

_LANES = NR // 2
_F32 = ir.FloatType()
_VEC = ir.VectorType(_F32, _LANES)
_SPLAT = ir.Constant(ir.VectorType(ir.IntType(32), _LANES), [0] * _LANES)
_WIDE = '"prefer-vector-width"="512"'
_CONTRACT = ("contract",)


def _vload(builder: ir.IRBuilder, ptr) -> ir.Instruction:
    ld = builder.load(builder.bitcast(ptr, _VEC.as_pointer()), typ=_VEC)
    ld.align = 4
    return ld


def _phis(builder: ir.IRBuilder, mr: int, *incoming) -> list[list[ir.PhiInstr]]:
    """An ``mr`` x 2 grid of vector phis, each given ``(values grid, block)`` pairs as incoming edges."""
    grid = [[builder.phi(_VEC) for _ in range(2)] for _ in range(mr)]
    _add_incoming(grid, *incoming)
    return grid


def _add_incoming(grid, *incoming) -> None:
    for values, block in incoming:
        for row, vals in zip(grid, values):
            for phi, val in zip(row, vals):
                phi.add_incoming(val, block)


def _codegen(mr: int):
    """IR for ``c[r, 0:NR] (+)= sum_{k2 < n2, k1 < n1} a[a0 + r*ars + k1*ak1 + k2*ak2] * b[b0 + k1*bk1 + k2*bk2 + 0:NR]``.

    ``c``'s row ``r`` starts at ``c0 + r * crs``; ``acc`` != 0 starts the
    tile from ``c`` instead of zeros. ``a``, ``b``, ``c`` are 1-D float32
    arrays; no bounds are checked (the callers' geometry guarantees them).
    """

    def codegen(context, builder, sig, args):
        a, b, c, a0, ars, ak1, ak2, b0, bk1, bk2, c0, crs, n1, n2, acc = args
        pa = context.make_array(sig.args[0])(context, builder, a).data
        pb = context.make_array(sig.args[1])(context, builder, b).data
        pc = context.make_array(sig.args[2])(context, builder, c).data
        intp = a0.type
        const = lambda v: ir.Constant(intp, v)  # noqa: E731
        try:
            set.add(builder.function.attributes, _WIDE)
        except Exception:  # pragma: no cover - an llvmlite that stores attributes differently: narrower, still correct
            pass
        zero = ir.Constant(_VEC, None)
        arows = [builder.gep(pa, [builder.add(a0, builder.mul(const(r), ars))]) for r in range(mr)]
        crows = [builder.gep(pc, [builder.add(c0, builder.mul(const(r), crs))]) for r in range(mr)]
        pb0 = builder.gep(pb, [b0])
        flag = builder.icmp_signed("!=", acc, ir.Constant(acc.type, 0))
        init = [[builder.select(flag, _vload(builder, builder.gep(crows[r], [const(_LANES * v)])), zero)
                 for v in range(2)] for r in range(mr)]
        pre = builder.block
        head = builder.append_basic_block("tile.outer")
        inner = builder.append_basic_block("tile.inner")
        latch = builder.append_basic_block("tile.latch")
        done = builder.append_basic_block("tile.done")
        nonempty = builder.and_(builder.icmp_signed(">", n1, const(0)), builder.icmp_signed(">", n2, const(0)))
        builder.cbranch(nonempty, head, done)

        builder.position_at_end(head)
        k2 = builder.phi(intp)
        k2.add_incoming(const(0), pre)
        acc_o = _phis(builder, mr, (init, pre))
        oa = builder.mul(k2, ak2)
        ob = builder.mul(k2, bk2)
        builder.branch(inner)

        builder.position_at_end(inner)
        k1 = builder.phi(intp)
        k1.add_incoming(const(0), head)
        acc_i = _phis(builder, mr, (acc_o, head))
        offa = builder.add(oa, builder.mul(k1, ak1))
        bk = builder.gep(pb0, [builder.add(ob, builder.mul(k1, bk1))])
        bv = [_vload(builder, builder.gep(bk, [const(_LANES * v)])) for v in range(2)]
        new = []
        for r in range(mr):
            s = builder.load(builder.gep(arows[r], [offa]), typ=_F32)
            sv = builder.insert_element(ir.Constant(_VEC, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
            sv = builder.shuffle_vector(sv, ir.Constant(_VEC, ir.Undefined), _SPLAT)
            new.append([builder.fadd(acc_i[r][v], builder.fmul(sv, bv[v], flags=_CONTRACT), flags=_CONTRACT)
                        for v in range(2)])
        k1n = builder.add(k1, const(1))
        k1.add_incoming(k1n, inner)
        _add_incoming(acc_i, (new, inner))
        builder.cbranch(builder.icmp_signed("<", k1n, n1), inner, latch)

        builder.position_at_end(latch)
        k2n = builder.add(k2, const(1))
        k2.add_incoming(k2n, latch)
        _add_incoming(acc_o, (new, latch))
        builder.cbranch(builder.icmp_signed("<", k2n, n2), head, done)

        builder.position_at_end(done)
        out = _phis(builder, mr, (init, pre), (new, latch))
        for r in range(mr):
            for v in range(2):
                st = builder.store(out[r][v], builder.bitcast(builder.gep(crows[r], [const(_LANES * v)]), _VEC.as_pointer()))
                st.align = 4
        return context.get_dummy_value()

    return codegen


def _make(mr: int):
    @intrinsic
    def tile(typingctx, a, b, c, a0, ars, ak1, ak2, b0, bk1, bk2, c0, crs, n1, n2, acc):
        ip = types.intp
        return types.none(a, b, c, ip, ip, ip, ip, ip, ip, ip, ip, ip, ip, ip, ip), _codegen(mr)

    return tile


#: Tiles of MR (8 with AVX-512, else 4), 4, 2 and 1 rows, NR columns.
tile_full, tile4, tile2, tile1 = (_make(m) for m in (MR, 4, 2, 1))
