"""Code templates for the kernel IR's Template parts: matmul (through gemm.py), direct
2-D convolution and its two gradients, pooling and its gradient, gather and scatter, and
column sums.

Each template shares its work between threads by the leading axes of its output, and
its epilogue (elementwise ops fused after it) runs over exactly the same share, so no
barrier separates them. Inner loops run along the contiguous last axis so that LLVM
vectorizes them; window bounds are resolved outside the inner loops.
"""
from __future__ import annotations

import math

from llvmlite import ir

from dlc.core.kernel import Template

from .emit import emit_bounded, emit_nest
from .mathlib import maximum
from .gemm import GemmSpec, _Vec, emit_gemm
from .tile import _read_elsewhere, tile_epilogue
from .irutil import F32, FAST, I64, REDUCE, for_range, gep, i64, loop, smax, smin, split


def emit_template(mb, em, t: Template, tid, nthreads) -> None:
    EMITTERS[t.op](mb, em, t, tid, nthreads)


def _ptr(em, buf):
    return em.pointers[buf.name]


def _load(b, ptr, index):
    return b.load(gep(b, ptr, index, F32), typ=F32, align=4)


def _store(b, value, ptr, index):
    b.store(value, gep(b, ptr, index, F32), align=4)


def _flat(b, *terms):
    """sum of index * stride terms (i64 values or ints)."""
    out = i64(0)
    for v, stride in terms:
        v = i64(v) if isinstance(v, int) else v
        out = b.add(out, b.mul(v, i64(stride)) if stride != 1 else v)
    return out


def _epilogue(em, t: Template, bounds_by_axis: list) -> None:
    """The fused elementwise ops over this thread's share of the output."""
    if t.epilogue is None:
        return
    vars_ = list(t.epilogue.outer) + list(t.epilogue.inner)
    bounds = {v.name: r for v, r in zip(vars_, bounds_by_axis) if r is not None}
    emit_nest(em, t.epilogue, None, None, bounds=bounds)


def _share(b, t: Template, lead: int, tid, nthreads):
    """Split the first `lead` output axes (flattened) between threads; returns the flat
    range and the per-axis epilogue bounds when they are expressible as ranges."""
    shape = t.output.shape
    total = math.prod(shape[:lead])
    lo, hi = split(b, total, tid, nthreads)
    return lo, hi, total


def _each_unit(b, lo, hi, shape_lead, body):
    """for f in [lo, hi): body(*unravelled indices)"""
    def step(f, _):
        idx, rest = [], f
        for d in reversed(shape_lead):
            idx.append(b.urem(rest, i64(d)))
            rest = b.udiv(rest, i64(d))
        body(*reversed(idx))
        return []
    loop(b, lo, hi, (), step, name="unit")


def _epilogue_units(em, t, lo, hi, lead):
    """Epilogue over the same units: loop over units, then the remaining axes whole."""
    if t.epilogue is None:
        return
    b = em.b
    shape = t.output.shape
    vars_ = list(t.epilogue.outer) + list(t.epilogue.inner)

    def body(*idx):
        bounds = {v.name: (i, b.add(i, i64(1))) for v, i in zip(vars_[:lead], idx)}
        em.push()
        emit_bounded(em, t.epilogue, bounds)
        em.pop()
    _each_unit(b, lo, hi, shape[:lead], body)


# --- matmul --------------------------------------------------------------------------------------

# Below this many multiply-adds a matmul uses a compact loop nest (vectorized by LLVM)
# instead of the packed register-tiled GEMM: at these sizes the GEMM's packing does not pay,
# and its large code would dominate compile time.
SMALL_MATMUL = 1 << 20


def matmul(mb, em, t: Template, tid, nthreads) -> None:
    b = em.b
    a_buf, b_buf = t.inputs
    m, n = t.output.shape
    ta, tb = t.attrs.get("ta", False), t.attrs.get("tb", False)
    k = a_buf.shape[0] if ta else a_buf.shape[1]
    if m * n * k <= SMALL_MATMUL:
        small_matmul(em, t, m, n, k, ta, tb, tid, nthreads, mb)
        return
    spec = GemmSpec(m, n, k, ta=ta, tb=tb)
    w = mb.target.vector_width
    # the epilogue on the register tile (one function per template then), else after
    tile = tile_epilogue(mb.program, t) if t.epilogue is not None else None
    key = (mb.modules.index(mb.module), spec, tile.key if tile else None)  # one function per shape and module
    if key not in mb.gemms:
        name = f"gemm.{key[0]}.{len(mb.gemms)}.{mb.tag}"
        mb.gemms[key] = emit_gemm(mb.module, name, spec, w, target=mb.target, tile=tile)
    info = mb.gemms[key]
    mb.layout.scratch_bytes = max(mb.layout.scratch_bytes, info.workspace_bytes)
    fn = mb.module.globals[info.name]
    null = ir.Constant(ir.PointerType(), None)
    extra = [em.pointers[name] for name in tile.args] if tile else []
    b.call(fn, [_ptr(em, a_buf), _ptr(em, b_buf), _ptr(em, t.output), null,
                em.pointers["__scratch__"], tid, nthreads] + extra)
    if t.epilogue is None or tile is not None:
        return
    # the epilogue covers exactly the tiles this thread computed (gemm.py's static split)
    plan = info.plan
    tile_n = info.nr if plan.split == "n" else info.mr
    units = -(-(n if plan.split == "n" else m) // tile_n)
    u0, u1 = split(b, units, tid, nthreads)
    r0, r1 = b.mul(u0, i64(tile_n)), smin(b, b.mul(u1, i64(tile_n)), i64(n if plan.split == "n" else m))
    if plan.split == "n":
        _epilogue(em, t, [(i64(0), i64(m)), (r0, r1)])
    else:
        _epilogue(em, t, [(r0, r1), (i64(0), i64(n))])


def small_matmul(em, t: Template, m, n, k, ta, tb, tid, nthreads, mb=None) -> None:
    """C = op(A) @ op(B) row by row: axpy rows of B (vectorized along n) or, for a
    transposed B, contiguous dot products (vectorized along k). Rows are shared out; the
    epilogue runs on each row as soon as it is computed (while it is in L1), and when
    nothing else reads C the row is computed in this thread's scratch space instead of C
    (a weight gradient consumed only by its optimizer update never reaches memory)."""
    b = em.b
    A, B = _ptr(em, t.inputs[0]), _ptr(em, t.inputs[1])
    out = t.output.name
    per_row = t.epilogue is not None and len(t.epilogue.outer) == 1 and not t.epilogue.row_stores
    in_scratch = per_row and mb is not None and not _read_elsewhere(mb.program, t)
    if in_scratch:
        mb.layout.scratch_bytes = max(mb.layout.scratch_bytes, -(-n * 4 // 64) * 64)
    zero = ir.Constant(F32, 0.0)

    def a_at(i, kk):
        return _load(b, A, b.add(b.mul(kk, i64(m)), i) if ta else b.add(b.mul(i, i64(k)), kk))

    lo, hi = split(b, m, tid, nthreads)
    with for_range(b, lo, hi, "mi") as i:
        if in_scratch:  # C[i, j] lives at scratch[j] for this row
            C, row = em.pointers["__scratch__"], i64(0)
        else:
            C, row = _ptr(em, t.output), b.mul(i, i64(n))
        if tb:  # C[i, j] = sum_k A[i, k] * B[j, k]
            with for_range(b, 0, n, "nj") as j:
                def dot(kk, acc):
                    prod = b.fmul(a_at(i, kk), _load(b, B, b.add(b.mul(j, i64(k)), kk)), flags=REDUCE)
                    return [b.fadd(acc[0], prod, flags=REDUCE)]
                _store(b, loop(b, 0, k, [zero], dot, name="kk")[0], C, b.add(row, j))
        else:   # C[i, :] = sum_k A[i, k] * B[k, :]
            with for_range(b, 0, n, "nj") as j:
                _store(b, zero, C, b.add(row, j))
            with for_range(b, 0, k, "kk") as kk:
                a = a_at(i, kk)
                brow = b.mul(kk, i64(n))
                with for_range(b, 0, n, "nj") as j:
                    at = b.add(row, j)
                    _store(b, b.fadd(_load(b, C, at), b.fmul(a, _load(b, B, b.add(brow, j)), flags=FAST),
                                     flags=FAST), C, at)
        if per_row:
            saved = em.pointers[out]
            if in_scratch:  # the epilogue's C[i*n + j] is scratch[j]
                em.pointers[out] = b.gep(C, [b.sub(i64(0), b.mul(i, i64(n)))], source_etype=F32)
            em.push()
            emit_bounded(em, t.epilogue, {t.epilogue.outer[0].name: (i, b.add(i, i64(1)))})
            em.pop()
            em.pointers[out] = saved
    if t.epilogue is not None and not per_row:
        _epilogue(em, t, [(lo, hi), (i64(0), i64(n))])


# --- convolution ---------------------------------------------------------------------------------

def _valid_range(b, count: int, stride: int, offset, limit: int):
    """[lo, hi) of j in [0, count) with 0 <= j*stride + offset < limit (offset: i64 value)."""
    # j >= ceil(-offset / stride), j <= floor((limit - 1 - offset) / stride)
    neg = b.sub(i64(0), offset)
    lo = smax(b, b.sdiv(b.add(neg, i64(stride - 1)), i64(stride)), i64(0))
    top = b.sub(i64(limit - 1), offset)
    hi_raw = b.add(b.sdiv(b.add(top, i64(stride * 4096)), i64(stride)), i64(1 - 4096))  # floor for top >= -4096*s
    hi = smin(b, hi_raw, i64(count))
    return lo, smax(b, hi, lo)


# --- stride-1 convolutions with vectors in registers ---------------------------------------------
# A row of the output is a few <W x float> accumulators; every kernel tap adds a masked,
# shifted load of an input row times a broadcast weight. Masks handle both the padding
# (columns outside the input) and the ragged end of the row, so no lane reads out of bounds.

def _vec(mb, em) -> _Vec:
    return _Vec(em.b, mb.target.vector_width, fused=mb.target.has("fma"))


def _window_mask(v: _Vec, start, width: int, first: int, count: int):
    """Lanes l with 0 <= start + l < width and first + l < count (start: i64 value)."""
    b = v.b
    lanes = b.add(_splat64(v, start), v.lanes)
    inside = b.and_(b.icmp_signed(">=", lanes, _splat64(v, i64(0))),
                    b.icmp_signed("<", lanes, _splat64(v, i64(width))))
    return b.and_(inside, v.mask(first, count))


def _splat64(v: _Vec, x):
    b = v.b
    t = ir.VectorType(I64, v.w)
    one = b.insert_element(ir.Constant(t, None), x, ir.Constant(ir.IntType(32), 0))
    return b.shuffle_vector(one, one, ir.Constant(ir.VectorType(ir.IntType(32), v.w), [0] * v.w))


def _clamp_row(b, row, rows: int):
    """(row clamped into [0, rows), whether it was inside)."""
    ok = b.and_(b.icmp_signed(">=", row, i64(0)), b.icmp_signed("<", row, i64(rows)))
    return smin(b, smax(b, row, i64(0)), i64(rows - 1)), ok


ROW_BLOCK = 4  # output rows computed together: each source row is loaded once for all


def _row_conv(mb, em, t, src_buf, w_buf, out_buf, lead, inner, taps_of, tid, nthreads) -> None:
    """The shared scheme of the forward pass and the input gradient: output rows in blocks
    of R, each row a few <W x float> accumulators; for every source plane, each source row
    the block touches is loaded once per tap column (a masked, shifted load) and added,
    times a broadcast weight, to every accumulator row that uses it.

    lead: the two output axes shared between threads; inner: how many source planes are
    summed; taps_of: where rows, columns, planes and weights of a tap are (see _ForwardTaps)."""
    b, v = em.b, _vec(mb, em)
    N1, N2, OH, OW = out_buf.shape
    _, _, SH, SW = src_buf.shape
    KH, KW = w_buf.shape[2], w_buf.shape[3]
    S, Wt, Y = _ptr(em, src_buf), _ptr(em, w_buf), _ptr(em, out_buf)
    lo, hi, _ = _share(b, t, 2, tid, nthreads)

    def rows(a, c, c0, masks, oy0, R):
        """Accumulate output rows oy0 .. oy0+R-1 of chunk c0 and store them."""
        span = R + KH - 1  # source rows the block touches

        def over_k(k, accs):
            accs = list(accs)
            base = taps_of.plane(b, a, c, k, SH * SW)
            weights = [[_load(b, Wt, taps_of.weight(b, a, c, k, i64(ki), j)) for j in range(KW)]
                       for ki in range(KH)]
            for d in range(span):
                row, ok = _clamp_row(b, taps_of.source_row(b, oy0, d), SH)
                start = b.add(base, b.mul(row, i64(SW)))
                loaded = []
                for j in range(KW):
                    sv = v.load(v.at(S, b.add(start, i64(c0 + taps_of.shift(j)))), masks[j])
                    loaded.append(b.select(ok, sv, v.zero))  # a row outside the source adds 0
                for r in range(R):
                    ki = taps_of.tap(r, d)
                    if 0 <= ki < KH:
                        for j in range(KW):
                            accs[r] = v.fma(v.splat(weights[ki][j]), loaded[j], accs[r])
            return accs
        accs = loop(b, 0, inner, [v.zero] * R, over_k, name="k")
        for r in range(R):
            yrow = _flat(b, (a, N2 * OH * OW), (c, OH * OW), (b.add(oy0, i64(r)), OW))
            v.store(accs[r], v.at(Y, b.add(yrow, i64(c0))), v.mask(c0, OW))

    def unit(a, c):
        for c0 in range(0, OW, v.w):
            # column masks depend only on the chunk and the tap column: computed once
            masks = [_window_mask(v, i64(c0 + taps_of.shift(j)), SW, c0, OW) for j in range(KW)]
            R = min(ROW_BLOCK, OH)
            with for_range(b, 0, OH // R, "blk") as blk:
                rows(a, c, c0, masks, b.mul(blk, i64(R)), R)
            for tail in range(OH - OH % R, OH):  # the last rows, one at a time
                rows(a, c, c0, masks, i64(tail), 1)
    _each_unit(b, lo, hi, (N1, N2), unit)
    _epilogue_units(em, t, lo, hi, 2)


class _ForwardTaps:
    """out[n,o,y,x] += in[n,c,y+i-p, x+j-p] * w[o,c,i,j]; an output block starting at row
    y0 reads source rows y0-p+d, and row y0+r uses source offset d with tap i = d - r."""

    def __init__(self, C, KH, KW, ph, pw):
        self.C, self.KH, self.KW, self.ph, self.pw = C, KH, KW, ph, pw

    def shift(self, j):
        return j - self.pw

    def source_row(self, b, y0, d):
        return b.add(y0, i64(d - self.ph))

    def tap(self, r, d):
        return d - r

    def plane(self, b, n, o, c, plane_size):
        return b.mul(b.add(b.mul(n, i64(self.C)), c), i64(plane_size))

    def weight(self, b, n, o, c, ki, j):
        return _flat(b, (o, self.C * self.KH * self.KW), (c, self.KH * self.KW), (ki, self.KW), (j, 1))


class _BackwardDataTaps(_ForwardTaps):
    """dx[n,c,y,x] += g[n,o,y-i+p, x-j+p] * w[o,c,i,j] (k runs over o): a block starting at
    row y0 reads gradient rows y0+p-(KH-1)+d, and row y0+r uses tap i = r - d + KH - 1."""

    def __init__(self, O, C, KH, KW, ph, pw):
        super().__init__(C, KH, KW, ph, pw)
        self.O = O

    def shift(self, j):
        return self.pw - j

    def source_row(self, b, y0, d):
        return b.add(y0, i64(d + self.ph - (self.KH - 1)))

    def tap(self, r, d):
        return r - d + self.KH - 1

    def plane(self, b, n, c, o, plane_size):
        return b.mul(b.add(b.mul(n, i64(self.O)), o), i64(plane_size))

    def weight(self, b, n, c, o, ki, j):
        return _flat(b, (o, self.C * self.KH * self.KW), (c, self.KH * self.KW), (ki, self.KW), (j, 1))


def conv2d_vec(mb, em, t: Template, tid, nthreads) -> None:
    """out[n,o,y,x] = sum_{c,i,j} in[n,c,y+i-p,x+j-p] * w[o,c,i,j] (stride 1)."""
    xb, wb = t.inputs
    _, O, _, _ = t.output.shape
    _, C, KH, KW = wb.shape
    taps = _ForwardTaps(C, KH, KW, *t.attrs["pad"])
    _row_conv(mb, em, t, xb, wb, t.output, 2, C, taps, tid, nthreads)


def conv2d_bwd_data_vec(mb, em, t: Template, tid, nthreads) -> None:
    """dx[n,c,y,x] = sum_{o,i,j} g[n,o,y-i+p,x-j+p] * w[o,c,i,j] (stride 1)."""
    gb, wb = t.inputs
    O, C, KH, KW = wb.shape
    taps = _BackwardDataTaps(O, C, KH, KW, *t.attrs["pad"])
    _row_conv(mb, em, t, gb, wb, t.output, 2, O, taps, tid, nthreads)


def conv2d_bwd_filter_vec(mb, em, t: Template, tid, nthreads) -> None:
    """dw[o,c,i,j] = sum_{n,y,x} g[n,o,y,x] * in[n,c,y+i-p,x+j-p] (stride 1): one vector
    accumulator per kernel tap, over every row of every image; summed across lanes last."""
    b, v = em.b, _vec(mb, em)
    xb, gb = t.inputs
    N, C, H, W = xb.shape
    _, O, OH, OW = gb.shape
    O, C, KH, KW = t.output.shape
    ph, pw = t.attrs["pad"]
    X, G, DW = _ptr(em, xb), _ptr(em, gb), _ptr(em, t.output)
    lo, hi, _ = _share(b, t, 2, tid, nthreads)
    taps = KH * KW
    zero = ir.Constant(F32, 0.0)

    def unit(o, c):
        masks = {(c0, j): _window_mask(v, i64(c0 + j - pw), W, c0, OW)
                 for c0 in range(0, OW, v.w) for j in range(KW)}

        def over_n(n, acc):
            def over_y(oy, acc):
                acc = list(acc)
                grow = _flat(b, (n, O * OH * OW), (o, OH * OW), (oy, OW))
                for c0 in range(0, OW, v.w):
                    gv = v.load(v.at(G, b.add(grow, i64(c0))), v.mask(c0, OW))
                    for i in range(KH):
                        iy, ok = _clamp_row(b, b.add(oy, i64(i - ph)), H)
                        gi = b.select(ok, gv, v.zero)  # a row outside the input adds nothing
                        xrow = _flat(b, (n, C * H * W), (c, H * W), (iy, W))
                        for j in range(KW):
                            xv = v.load(v.at(X, b.add(xrow, i64(c0 + j - pw))), masks[(c0, j)])
                            acc[i * KW + j] = v.fma(gi, xv, acc[i * KW + j])
                return acc
            return loop(b, 0, OH, acc, over_y, name="oy")
        acc = loop(b, 0, N, [v.zero] * taps, over_n, name="n")
        reduce = v._intrinsic(f"llvm.vector.reduce.fadd.v{v.w}f32", F32, [F32, v.ty])
        for k in range(taps):
            total = b.call(reduce, [zero, acc[k]], fastmath=("reassoc",))
            _store(b, total, DW, _flat(b, (o, C * taps), (c, taps), (i64(k), 1)))
    _each_unit(b, lo, hi, (O, C), unit)
    _epilogue_units(em, t, lo, hi, 2)


def conv2d(mb, em, t: Template, tid, nthreads) -> None:
    """out[n,o,y,x] = sum_{c,i,j} in[n,c,y*s+i-p,x*s+j-p] * w[o,c,i,j]; a row of out is
    accumulated in place, one (c, i, j) at a time, so the x loop vectorizes."""
    if tuple(t.attrs["stride"]) == (1, 1):
        return conv2d_vec(mb, em, t, tid, nthreads)
    b = em.b
    xb, wb = t.inputs
    N, C, H, W = xb.shape
    _, O, OH, OW = t.output.shape
    _, _, KH, KW = wb.shape
    (sh, sw), (ph, pw) = t.attrs["stride"], t.attrs["pad"]
    X, Wt, Y = _ptr(em, xb), _ptr(em, wb), _ptr(em, t.output)
    lo, hi, _ = _share(b, t, 2, tid, nthreads)

    def unit(n, o):
        with for_range(b, 0, OH, "oy") as oy:
            yrow = _flat(b, (n, O * OH * OW), (o, OH * OW), (oy, OW))
            with for_range(b, 0, OW, "ox") as ox:
                _store(b, ir.Constant(F32, 0.0), Y, b.add(yrow, ox))
            with for_range(b, 0, C, "c") as c:
                with for_range(b, 0, KH, "ki") as ki:
                    iy = b.sub(b.add(b.mul(oy, i64(sh)), ki), i64(ph))
                    ok = b.and_(b.icmp_signed(">=", iy, i64(0)), b.icmp_signed("<", iy, i64(H)))
                    with b.if_then(ok):
                        xrow = _flat(b, (n, C * H * W), (c, H * W), (iy, W))
                        with for_range(b, 0, KW, "kj") as kj:
                            wv = _load(b, Wt, _flat(b, (o, C * KH * KW), (c, KH * KW), (ki, KW), (kj, 1)))
                            off = b.sub(kj, i64(pw))
                            x0, x1 = _valid_range(b, OW, sw, off, W)
                            with for_range(b, x0, x1, "ox") as ox:
                                ix = b.add(b.mul(ox, i64(sw)), off)
                                acc = b.fadd(_load(b, Y, b.add(yrow, ox)),
                                             b.fmul(_load(b, X, b.add(xrow, ix)), wv, flags=FAST), flags=FAST)
                                _store(b, acc, Y, b.add(yrow, ox))
    _each_unit(b, lo, hi, (N, O), unit)
    _epilogue_units(em, t, lo, hi, 2)


def conv2d_bwd_data(mb, em, t: Template, tid, nthreads) -> None:
    """dx[n,c,:,:] = sum over o, i, j of g[n,o] placed at (y*s+i-p, x*s+j-p) times w[o,c,i,j]."""
    if tuple(t.attrs["stride"]) == (1, 1):
        return conv2d_bwd_data_vec(mb, em, t, tid, nthreads)
    b = em.b
    gb, wb = t.inputs
    N, C, H, W = t.output.shape
    _, O, OH, OW = gb.shape
    _, _, KH, KW = wb.shape
    (sh, sw), (ph, pw) = t.attrs["stride"], t.attrs["pad"]
    G, Wt, DX = _ptr(em, gb), _ptr(em, wb), _ptr(em, t.output)
    lo, hi, _ = _share(b, t, 2, tid, nthreads)

    def unit(n, c):
        plane = _flat(b, (n, C * H * W), (c, H * W))
        with for_range(b, 0, H * W, "z") as z:
            _store(b, ir.Constant(F32, 0.0), DX, b.add(plane, z))
        with for_range(b, 0, O, "o") as o:
            with for_range(b, 0, KH, "ki") as ki:
                with for_range(b, 0, KW, "kj") as kj:
                    wv = _load(b, Wt, _flat(b, (o, C * KH * KW), (c, KH * KW), (ki, KW), (kj, 1)))
                    off = b.sub(kj, i64(pw))
                    x0, x1 = _valid_range(b, OW, sw, off, W)
                    with for_range(b, 0, OH, "oy") as oy:
                        iy = b.sub(b.add(b.mul(oy, i64(sh)), ki), i64(ph))
                        ok = b.and_(b.icmp_signed(">=", iy, i64(0)), b.icmp_signed("<", iy, i64(H)))
                        with b.if_then(ok):
                            grow = _flat(b, (n, O * OH * OW), (o, OH * OW), (oy, OW))
                            drow = b.add(plane, b.mul(iy, i64(W)))
                            with for_range(b, x0, x1, "ox") as ox:
                                ix = b.add(b.mul(ox, i64(sw)), off)
                                acc = b.fadd(_load(b, DX, b.add(drow, ix)),
                                             b.fmul(_load(b, G, b.add(grow, ox)), wv, flags=FAST), flags=FAST)
                                _store(b, acc, DX, b.add(drow, ix))
    _each_unit(b, lo, hi, (N, C), unit)
    _epilogue_units(em, t, lo, hi, 2)


def conv2d_bwd_filter(mb, em, t: Template, tid, nthreads) -> None:
    """dw[o,c,i,j] = sum_{n,y,x} g[n,o,y,x] * in[n,c,y*s+i-p,x*s+j-p] (a vectorized dot)."""
    if tuple(t.attrs["stride"]) == (1, 1) and t.output.shape[2] * t.output.shape[3] <= 25:
        return conv2d_bwd_filter_vec(mb, em, t, tid, nthreads)
    b = em.b
    xb, gb = t.inputs
    N, C, H, W = xb.shape
    _, O, OH, OW = gb.shape
    O, C, KH, KW = t.output.shape
    (sh, sw), (ph, pw) = t.attrs["stride"], t.attrs["pad"]
    X, G, DW = _ptr(em, xb), _ptr(em, gb), _ptr(em, t.output)
    lo, hi, _ = _share(b, t, 2, tid, nthreads)

    def unit(o, c):
        with for_range(b, 0, KH, "ki") as ki:
            with for_range(b, 0, KW, "kj") as kj:
                off = b.sub(kj, i64(pw))
                x0, x1 = _valid_range(b, OW, sw, off, W)

                def over_n(n, acc):
                    def over_y(oy, acc):
                        iy = b.sub(b.add(b.mul(oy, i64(sh)), ki), i64(ph))
                        ok = b.and_(b.icmp_signed(">=", iy, i64(0)), b.icmp_signed("<", iy, i64(H)))
                        iy = smin(b, smax(b, iy, i64(0)), i64(H - 1))
                        grow = _flat(b, (n, O * OH * OW), (o, OH * OW), (oy, OW))
                        xrow = _flat(b, (n, C * H * W), (c, H * W), (iy, W))

                        def over_x(ox, acc):
                            ix = b.add(b.mul(ox, i64(sw)), off)
                            prod = b.fmul(_load(b, G, b.add(grow, ox)), _load(b, X, b.add(xrow, ix)), flags=REDUCE)
                            return [b.fadd(acc[0], prod, flags=REDUCE)]
                        row = loop(b, x0, x1, [ir.Constant(F32, 0.0)], over_x, name="ox")[0]
                        return [b.fadd(acc[0], b.select(ok, row, ir.Constant(F32, 0.0)), flags=REDUCE)]
                    return loop(b, 0, OH, acc, over_y, name="oy")
                total = loop(b, 0, N, [ir.Constant(F32, 0.0)], over_n, name="n")[0]
                _store(b, total, DW, _flat(b, (o, C * KH * KW), (c, KH * KW), (ki, KW), (kj, 1)))
    _each_unit(b, lo, hi, (O, C), unit)
    _epilogue_units(em, t, lo, hi, 2)


# --- pooling --------------------------------------------------------------------------------------

def pool2d(mb, em, t: Template, tid, nthreads) -> None:
    if pooling.pool2d(mb, em, t, tid, nthreads):
        return
    b = em.b
    (xb,) = t.inputs
    N, C, H, W = xb.shape
    _, _, OH, OW = t.output.shape
    (kh, kw), (sh, sw), (ph, pw) = t.attrs["kernel"], t.attrs["stride"], t.attrs["pad"]
    is_max = t.attrs["mode"] == "max"
    X, Y = _ptr(em, xb), _ptr(em, t.output)
    lo, hi, _ = _share(b, t, 2, tid, nthreads)

    def unit(n, c):
        plane = _flat(b, (n, C * H * W), (c, H * W))
        oplane = _flat(b, (n, C * OH * OW), (c, OH * OW))
        with for_range(b, 0, OH, "oy") as oy:
            with for_range(b, 0, OW, "ox") as ox:
                acc = ir.Constant(F32, -math.inf if is_max else 0.0)
                for i in range(kh):
                    for j in range(kw):
                        iy = b.sub(b.add(b.mul(oy, i64(sh)), i64(i)), i64(ph))
                        ix = b.sub(b.add(b.mul(ox, i64(sw)), i64(j)), i64(pw))
                        ok = b.and_(b.and_(b.icmp_signed(">=", iy, i64(0)), b.icmp_signed("<", iy, i64(H))),
                                    b.and_(b.icmp_signed(">=", ix, i64(0)), b.icmp_signed("<", ix, i64(W))))
                        at = b.add(plane, b.add(b.mul(smin(b, smax(b, iy, i64(0)), i64(H - 1)), i64(W)),
                                                smin(b, smax(b, ix, i64(0)), i64(W - 1))))
                        v = _load(b, X, at)
                        if is_max:
                            acc = b.select(ok, maximum(b, acc, v), acc)
                        else:
                            acc = b.fadd(acc, b.select(ok, v, ir.Constant(F32, 0.0)))
                if not is_max:
                    acc = b.fmul(acc, ir.Constant(F32, 1.0 / (kh * kw)))
                _store(b, acc, Y, b.add(oplane, b.add(b.mul(oy, i64(OW)), ox)))
    _each_unit(b, lo, hi, (N, C), unit)
    _epilogue_units(em, t, lo, hi, 2)


def pool2d_bwd(mb, em, t: Template, tid, nthreads) -> None:
    """Max: the gradient goes to the first maximum of each window (row-major), as the
    reference does; avg: spread evenly over the window."""
    if pooling.pool2d_bwd(mb, em, t, tid, nthreads):
        return
    b = em.b
    xb, gb = t.inputs
    N, C, H, W = xb.shape
    _, _, OH, OW = gb.shape
    (kh, kw), (sh, sw), (ph, pw) = t.attrs["kernel"], t.attrs["stride"], t.attrs["pad"]
    is_max = t.attrs["mode"] == "max"
    X, G, DX = _ptr(em, xb), _ptr(em, gb), _ptr(em, t.output)
    lo, hi, _ = _share(b, t, 2, tid, nthreads)

    def unit(n, c):
        plane = _flat(b, (n, C * H * W), (c, H * W))
        gplane = _flat(b, (n, C * OH * OW), (c, OH * OW))
        with for_range(b, 0, H * W, "z") as z:
            _store(b, ir.Constant(F32, 0.0), DX, b.add(plane, z))
        with for_range(b, 0, OH, "oy") as oy:
            with for_range(b, 0, OW, "ox") as ox:
                g = _load(b, G, b.add(gplane, b.add(b.mul(oy, i64(OW)), ox)))
                best, best_at = ir.Constant(F32, -math.inf), i64(-1)
                cells = []
                for i in range(kh):
                    for j in range(kw):
                        iy = b.sub(b.add(b.mul(oy, i64(sh)), i64(i)), i64(ph))
                        ix = b.sub(b.add(b.mul(ox, i64(sw)), i64(j)), i64(pw))
                        ok = b.and_(b.and_(b.icmp_signed(">=", iy, i64(0)), b.icmp_signed("<", iy, i64(H))),
                                    b.and_(b.icmp_signed(">=", ix, i64(0)), b.icmp_signed("<", ix, i64(W))))
                        at = b.add(plane, b.add(b.mul(iy, i64(W)), ix))
                        cells.append((ok, at))
                        if is_max:
                            safe = b.select(ok, at, plane)
                            v = _load(b, X, safe)
                            take = b.and_(ok, b.or_(b.fcmp_ordered(">", v, best),
                                                     b.icmp_signed("<", best_at, i64(0))))
                            best = b.select(take, v, best)
                            best_at = b.select(take, at, best_at)
                if is_max:
                    with b.if_then(b.icmp_signed(">=", best_at, i64(0))):
                        _store(b, b.fadd(_load(b, DX, best_at), g), DX, best_at)
                else:
                    share = b.fmul(g, ir.Constant(F32, 1.0 / (kh * kw)))
                    for ok, at in cells:
                        with b.if_then(ok):
                            _store(b, b.fadd(_load(b, DX, at), share), DX, at)
    _each_unit(b, lo, hi, (N, C), unit)
    _epilogue_units(em, t, lo, hi, 2)


# --- gather / scatter -------------------------------------------------------------------------------

def take(mb, em, t: Template, tid, nthreads) -> None:
    b = em.b
    table, idx = t.inputs
    rows = table.shape[0]
    width = math.prod(table.shape[1:])
    count = math.prod(idx.shape)
    T, I, Y = _ptr(em, table), _ptr(em, idx), _ptr(em, t.output)
    lo, hi = split(b, count, tid, nthreads)

    def row(i, _):
        r = b.sext(b.load(gep(b, I, i, ir.IntType(32)), typ=ir.IntType(32)), I64)
        r = smin(b, smax(b, r, i64(0)), i64(rows - 1))
        with for_range(b, 0, width, "j") as j:
            _store(b, _load(b, T, b.add(b.mul(r, i64(width)), j)), Y, b.add(b.mul(i, i64(width)), j))
        return []
    loop(b, lo, hi, (), row, name="row")
    _epilogue_units(em, t, lo, hi, len(idx.shape)) if len(idx.shape) == 1 else _epilogue_serial(em, t, tid)


def scatter_add(mb, em, t: Template, tid, nthreads) -> None:
    """Rows may repeat, so one thread does it all."""
    b = em.b
    g, idx = t.inputs
    rows = t.output.shape[0]
    width = math.prod(t.output.shape[1:])
    count = math.prod(idx.shape)
    Gp, I, Y = _ptr(em, g), _ptr(em, idx), _ptr(em, t.output)
    with b.if_then(b.icmp_signed("==", tid, ir.Constant(ir.IntType(32), 0))):
        with for_range(b, 0, rows * width, "z") as z:
            _store(b, ir.Constant(F32, 0.0), Y, z)
        with for_range(b, 0, count, "i") as i:
            r = b.sext(b.load(gep(b, I, i, ir.IntType(32)), typ=ir.IntType(32)), I64)
            r = smin(b, smax(b, r, i64(0)), i64(rows - 1))
            with for_range(b, 0, width, "j") as j:
                at = b.add(b.mul(r, i64(width)), j)
                _store(b, b.fadd(_load(b, Y, at), _load(b, Gp, b.add(b.mul(i, i64(width)), j))), Y, at)
    _epilogue_serial(em, t, tid)


def colsum(mb, em, t: Template, tid, nthreads) -> None:
    """out = the sum of the input's rows (over its leading axes): each thread adds whole rows
    into its share of out, along the contiguous axis, instead of walking columns."""
    b = em.b
    shape = t.output.shape
    width = math.prod(shape)
    rows = math.prod(t.inputs[0].shape) // width
    inner = width // shape[0]
    X, Y = _ptr(em, t.inputs[0]), _ptr(em, t.output)
    lo, hi = split(b, shape[0], tid, nthreads)
    first, last = b.mul(lo, i64(inner)), b.mul(hi, i64(inner))
    with for_range(b, first, last, "j") as j:
        _store(b, ir.Constant(F32, 0.0), Y, j)
    with for_range(b, 0, rows, "r") as r:
        row = b.mul(r, i64(width))
        with for_range(b, first, last, "j") as j:
            _store(b, b.fadd(_load(b, Y, j), _load(b, X, b.add(row, j)), flags=FAST), Y, j)
    _epilogue(em, t, [(lo, hi)] + [None] * (len(shape) - 1))


def _epilogue_serial(em, t: Template, tid) -> None:
    if t.epilogue is None:
        return
    b = em.b
    with b.if_then(b.icmp_signed("==", tid, ir.Constant(ir.IntType(32), 0))):
        emit_bounded(em, t.epilogue, {})


from . import conv as _conv  # noqa: E402
from . import pooling  # noqa: E402

EMITTERS = {"matmul": matmul, "conv2d": _conv.conv2d, "conv2d_bwd_data": _conv.conv2d_bwd_data,
            "conv2d_bwd_filter": _conv.conv2d_bwd_filter, "pool2d": pool2d, "pool2d_bwd": pool2d_bwd,
            "take": take, "scatter_add": scatter_add, "colsum": colsum}
