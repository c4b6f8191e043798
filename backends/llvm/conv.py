"""2-D convolutions as packed GEMMs on gemm.py's register-tile microkernel.

Every convolution template is written as a matrix product whose one operand is an
im2col matrix that never exists in full: the rows of the im2col block a GEMM step needs
are packed straight from the image into the microkernel's packed layout, in the
per-thread scratch space (`__scratch__`), and reused by every register tile.

  forward     y_n[O, OH*OW] = Wf[O, K] @ col(x_n)[K, OH*OW],       K = KH*KW*C
  bwd data    dx_n[C, H*W]  = Wd[C, K] @ col(g_n)[K, H*W],         K = KH*KW*O (stride 1)
              stride s > 1: one product per output phase (ry, rx) of dx -- the rows
              ry + s*i, columns rx + s*j, a stride-1 correlation of g with the taps that
              reach that phase -- computed into scratch and interleaved into dx
  bwd filter  dw^T[K, O]    = sum_n col(x_n)[K, P] @ g_n^T[P, O],   K = KH*KW*C
              (im2col rows are the broadcast operand, read in place from a row-major
              block; g^T is packed by gemm.py's transposing packer; dw^T is transposed
              into dw at the end)

Some shapes take other forms, each where it was measured faster (the rules are next to
each form). A 3x3 stride-1 layer of 32 channels or more each way by Winograd's minimal
filtering, GEMMs over transformed tiles (_winograd: forward and data gradient;
_winograd_filter; AVX-512 or AVX2).
Directly, with no im2col and no GEMM: the forward over vectors of 16 output
channels (_direct_forward) or, for stride-1 layers whose rows fill the vectors, over
rows of positions (_planes_forward), and the stride-1 data gradient the same way, as a
correlation of g with the flipped weights (_planes_data); a strided data gradient onto
vectors of 16 input channels over rows of dx's positions (_strided_data); the filter
gradient over each plane's positions as one flat range for "same"-padded first layers
whose rows leave lanes idle (_flat_filter_gradient), for 3x3 and smaller kernels over a
window of input rows held in registers (_window_filter_gradient), over rows of positions
for first layers and rows that fill the vectors (_direct_filter_gradient) or over
vectors of 16 output channels (_vector_filter_gradient). The data gradient of a
layer whose input is much larger than g is scattered: w^T g (a GEMM reading g in
place), then col2im (_bwd_data_col2im).

K runs channel-major as the weights do (k = channel * taps + tap): the packer computes
every tap's padding masks once per 16 columns and reads each source plane for all its
taps together: a masked vector load per 16 columns when the 16 source elements are
contiguous (stride 1 and the grid as wide as the source -- "same" padding -- or the 16
columns inside one grid row), a masked gather otherwise. The weights are repacked once
per call into the microkernel's MR-row panels.

Threads share out images (forward, bwd data: each image's output, then its epilogue, is
one thread's) or, for batches smaller than twice the thread count (the run's: the code
takes it at run time), output rows of the product; the filter gradient shares out rows
of dw^T (channels x taps), each thread summing over every image. Each template's
epilogue runs over exactly the share its thread computed, so no barrier separates them
-- except in the flat and the Winograd filter gradients, whose threads share out chunks
of images and add up their sums after a barrier inside the template
(barrier.team_barrier).
"""
from __future__ import annotations

import hashlib
from dataclasses import replace

from llvmlite import ir

from dlc.core.kernel import Template

from .barrier import team_barrier, team_scratch
from .emit import emit_bounded, store_all
from .gemm import (_ADD_C, _EPILOGUE, _L2_BYTES, _MAX_ACCUMULATORS, GemmPlan, GemmSpec, _emit_kernel, _Layout,
                   _Vec, free_masks, plan_gemm, shared_pack_b)
from .irutil import (F32, I1, I8, I32, I64, PTR, VOID, const_vector, for_range, gep, hsum, i64, loop, no_unrolling,
                     set_target, smax, smin, splat, split)

_KC = {4: 256, 8: 256, 16: 384}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- geometry


class _Geom:
    """An im2col operand: rows k = s * taps + tap (S source planes of SH x SW), columns the
    positions (gy, gx) of a GH x GW grid; element = src[s, gy*sy + roff, gx*sx + coff]
    (zero outside the source) for tap (roff, coff)."""

    def __init__(self, S, SH, SW, GH, GW, sy, sx, taps):
        self.S, self.SH, self.SW, self.GH, self.GW, self.sy, self.sx = S, SH, SW, GH, GW, sy, sx
        self.taps = list(taps)
        self.K = len(self.taps) * S
        self.P = GH * GW

    @property
    def key(self) -> tuple:
        """What a packer's code depends on: not S (the rows it packs are arguments), so
        layers of one geometry share it whatever their channel counts."""
        return (self.SH, self.SW, self.GH, self.GW, self.sy, self.sx, tuple(self.taps))

    @property
    def whole_plane(self) -> bool:
        """Consecutive columns are consecutive source elements (masks aside)."""
        return self.sy == 1 and self.sx == 1 and self.GW == self.SW


class _V:
    """Vector helpers on top of gemm.py's _Vec: i32 lanes, gathers."""

    def __init__(self, b, w, fused):
        self.f = _Vec(b, w, fused=fused)
        self.b, self.w = b, w
        self.ity = ir.VectorType(I32, w)
        self.lanes = const_vector(I32, range(w))

    def isplat(self, x):
        b = self.b
        if isinstance(x, int):
            return const_vector(I32, [x] * self.w)
        if x.type == I64:
            x = b.trunc(x, I32)
        return splat(b, x, self.w)

    def below(self, x, n: int):
        """Lanes with 0 <= x < n (unsigned compare: negatives wrap high)."""
        return self.b.icmp_unsigned("<", x, self.isplat(n))

    def masked_load(self, ptr, mask, passthru):
        fn = self.f._intrinsic(f"llvm.masked.load.v{self.w}f32.p0", self.f.ty, [PTR, self.f.mty, self.f.ty])
        return self.b.call(fn, [ptr, mask, passthru])

    def gather(self, base, offsets, mask):
        b, w = self.b, self.w
        ptrs = b.gep(base, [offsets], source_etype=F32)
        ptrs.type = ir.VectorType(PTR, w)  # llvmlite types a vector GEP as a scalar pointer
        name = f"llvm.masked.gather.v{w}f32.v{w}p0"
        fn = b.module.globals.get(name)
        if fn is None:
            fn = ir.Function(b.module, ir.FunctionType(self.f.ty, [ir.VectorType(PTR, w), ir.VectorType(I1, w),
                                                                    self.f.ty]), name=name)
        return b.call(fn, [ptrs, mask, self.f.zero])


def _rows_touched(GW: int, w: int) -> int:
    """The most grid rows a vector of w columns starting at a multiple of w can touch."""
    return max((first + w - 1) // GW - first // GW + 1 for first in range(0, w * GW, w))


def _pack_im2col(b, v: _V, src, g: _Geom, k_lo, k_hi, col0, ncols, dst, nvp, panel, row_stride, sink):
    """Rows [k_lo, k_hi) x columns [col0, col0 + ncols) of col(src), W columns per vector:
    row k of vector i is stored at dst + (i / nvp) * panel + (i % nvp) * W + (k - k_lo) *
    row_stride. Lanes past the last column are zeros. k_lo, k_hi, col0, ncols, nvp, panel:
    i64 values; col0 a multiple of W.

    Per vector, every tap's masks and offsets are computed once; then each source plane
    is read for all its taps together (the taps' rows are neighbours in one plane, so
    the reads stay in L1, where walking one tap over every plane would revisit planes a
    whole plane apart -- 4 KiB at 32x32, one cache set). A vector's columns lie in a few
    grid rows (segments); each segment is one masked load (stride 1: contiguous source
    elements; stride 2: two loads and an even-lane shuffle) merged into the vector
    through the load's pass-through operand. A whole-plane grid (stride 1, as wide as the
    source) is one segment whatever its rows. Larger strides use a masked gather. With
    more loads than _UNROLLED_LOADS per vector, stride-1 rows loop over taps instead
    (_rows_by_taps)."""
    w, T, f = v.w, len(g.taps), v.f
    nvec = b.udiv(b.add(ncols, i64(w - 1)), i64(w))
    end = v.isplat(b.add(col0, ncols))
    plane = g.SH * g.SW
    mode = "plane" if g.whole_plane else "rows" if g.sx <= 2 else "gather"
    segments = 1 if mode == "plane" else _rows_touched(g.GW, w)
    by_taps = mode == "rows" and g.sx == 1 and T * segments > _UNROLLED_LOADS
    evens = const_vector(I32, range(0, 2 * w, 2))
    # mask of the two loads of a stride-2 segment: element 2l of the window is lane l
    spread = [const_vector(I32, [(h * w + j) // 2 if j % 2 == 0 else w for j in range(w)])
              for h in range(2)]
    no_lanes = const_vector(I1, [0] * w)
    c_first = b.udiv(k_lo, i64(T))
    c_last = b.udiv(b.sub(k_hi, i64(1)), i64(T))
    rows = b.sub(k_hi, k_lo)

    def vector(vi, carried):
        at_panel, at_lane = carried  # (i / nvp) * panel, (i % nvp) * W, without dividing
        first = b.add(col0, b.mul(vi, i64(w)))
        pos = b.add(v.isplat(first), v.lanes)
        ok = b.icmp_signed("<", pos, end)
        gy = b.udiv(pos, v.isplat(g.GW))
        gx = b.urem(pos, v.isplat(g.GW))
        ix = b.mul(gx, v.isplat(g.sx)) if g.sx != 1 else gx
        gy0 = b.udiv(first, i64(g.GW))
        out = b.gep(dst, [b.add(at_panel, at_lane)], source_etype=F32)
        if by_taps:
            _rows_by_taps(b, v, src, g, segments, ok, gy, gx, gy0, first, out, c_first, c_last, k_lo, rows,
                          row_stride, sink)
            return advance(at_panel, at_lane)
        reads = []  # per tap: [(offset, mask)] (plane, rows) or (offsets, mask) (gather)
        for roff, coff in g.taps:
            col_ok = b.and_(ok, v.below(b.add(ix, v.isplat(coff)), g.SW))
            if mode == "plane":
                iy = b.add(gy, v.isplat(roff))
                reads.append([(b.add(first, i64(roff * g.SW + coff)), b.and_(col_ok, v.below(iy, g.SH)))])
            elif mode == "gather":
                iy = b.add(b.mul(gy, v.isplat(g.sy)), v.isplat(roff))
                offs = b.add(b.mul(iy, v.isplat(g.SW)), b.add(ix, v.isplat(coff)))
                reads.append((offs, b.and_(col_ok, v.below(iy, g.SH))))
            else:
                segs = []
                for sg in range(segments):
                    gys = b.add(gy0, i64(sg))
                    iys = b.add(b.mul(gys, i64(g.sy)), i64(roff))
                    row_ok = b.and_(b.icmp_signed(">=", iys, i64(0)), b.icmp_signed("<", iys, i64(g.SH)))
                    in_row = b.icmp_signed("==", gy, v.isplat(gys))
                    mask = b.select(row_ok, b.and_(col_ok, in_row), no_lanes)
                    # lane l reads iys*SW + sx*(first + l - gys*GW) + coff
                    at = b.add(b.mul(iys, i64(g.SW)),
                               b.add(b.mul(b.sub(first, b.mul(gys, i64(g.GW))), i64(g.sx)), i64(coff)))
                    if g.sx == 2:
                        mask = (mask, b.shuffle_vector(mask, no_lanes, spread[0]),
                                b.shuffle_vector(mask, no_lanes, spread[1]))
                    segs.append((at, mask))
                reads.append(segs)

        # one body for every channel the block touches: a tap whose row lies outside
        # [k_lo, k_hi) (a block boundary inside a channel) stores to a sink instead
        # (a copy of the body per partial channel tripled the packer's code)
        with for_range(b, c_first, b.add(c_last, i64(1)), "pc") as c:
            chan = b.gep(src, [b.mul(c, i64(plane))], source_etype=F32)
            row = b.sub(b.mul(c, i64(T)), k_lo)  # the row of tap 0
            for t in range(T):
                if mode == "gather":
                    x = v.gather(chan, reads[t][0], reads[t][1])
                else:
                    x = f.zero
                    for at, m in reads[t]:
                        ptr = b.gep(chan, [at], source_etype=F32)
                        if g.sx == 2 and mode == "rows":
                            lo = v.masked_load(ptr, m[1], f.zero)
                            hi = v.masked_load(b.gep(ptr, [i64(w)], source_etype=F32), m[2], f.zero)
                            x = b.select(m[0], b.shuffle_vector(lo, hi, evens), x)
                        else:
                            x = v.masked_load(ptr, m, x)
                r = b.add(row, i64(t))
                to = b.gep(out, [b.mul(r, i64(row_stride))], source_etype=F32)
                b.store(x, b.select(b.icmp_unsigned("<", r, rows), to, sink), align=4)
        return advance(at_panel, at_lane)

    def advance(at_panel, at_lane):
        at_lane = b.add(at_lane, i64(w))
        wrap = b.icmp_signed("==", at_lane, b.mul(nvp, i64(w)))
        return [b.select(wrap, b.add(at_panel, panel), at_panel), b.select(wrap, i64(0), at_lane)]
    loop(b, 0, nvec, (i64(0), i64(0)), vector, "pv")


# more masked loads per vector than this (a 5x5 layer whose grid is narrower than its
# source: 25 taps x 3 grid rows) and the packer loops over taps instead of unrolling them.
# Unrolled, the masks outnumber the mask registers: LLVM spent 140-250 ms on each such
# packer, and LeNet-5's LLVM time is 11% less; its training step is 3-4% slower.
_UNROLLED_LOADS = 32


def _rows_by_taps(b, v: _V, src, g: _Geom, S, ok, gy, gx, gy0, first, out, c_first, c_last, k_lo, rows,
                  row_stride, sink):
    """One vector of _pack_im2col's "rows" mode (stride 1 along the rows, any down the
    columns) as a loop over taps (their offsets from a table): each tap's S segment masks
    computed once, used for every channel."""
    w, T, f = v.w, len(g.taps), v.f
    taps = _i32_table(b.module, "im2col.taps", [x for rc in g.taps for x in rc])  # (roff, coff) pairs
    with for_range(b, 0, T, "tap") as t:
        roff = b.sext(b.load(gep(b, taps, b.mul(t, i64(2)), I32), typ=I32, align=4), I64)
        coff = b.sext(b.load(gep(b, taps, b.add(b.mul(t, i64(2)), i64(1)), I32), typ=I32, align=4), I64)
        col_ok = b.and_(ok, v.below(b.add(gx, v.isplat(coff)), g.SW))
        segs = []
        for sg in range(S):
            gys = b.add(gy0, i64(sg))
            iys = b.add(b.mul(gys, i64(g.sy)) if g.sy != 1 else gys, roff)
            row_ok = b.and_(b.icmp_signed(">=", iys, i64(0)), b.icmp_signed("<", iys, i64(g.SH)))
            mask = b.select(row_ok, b.and_(col_ok, b.icmp_signed("==", gy, v.isplat(gys))),
                            const_vector(I1, [0] * w))
            segs.append((b.add(b.mul(iys, i64(g.SW)), b.add(b.sub(first, b.mul(gys, i64(g.GW))), coff)), mask))
        with for_range(b, c_first, b.add(c_last, i64(1)), "pc") as c:
            chan = b.gep(src, [b.mul(c, i64(g.SH * g.SW))], source_etype=F32)
            x = f.zero
            for at, m in segs:
                x = v.masked_load(b.gep(chan, [at], source_etype=F32), m, x)
            r = b.add(b.sub(b.mul(c, i64(T)), k_lo), t)
            to = b.gep(out, [b.mul(r, i64(row_stride))], source_etype=F32)
            b.store(x, b.select(b.icmp_unsigned("<", r, rows), to, sink), align=4)


def _i32_table(module, prefix: str, values: list) -> ir.GlobalVariable:
    """A constant i32 array in module, named by its contents: one per module for each
    list, and functions that are the same code (a training and an evaluation step's
    forward layers) the same text, so they are built once (codegen's dedupe)."""
    name = prefix + "." + "_".join(map(str, values)).replace("-", "m")
    if len(values) > 64:  # (a table of tiles)
        name = prefix + "." + hashlib.sha256(name.encode()).hexdigest()[:20]
    table = module.globals.get(name)
    if table is None:
        table = ir.GlobalVariable(module, ir.ArrayType(I32, len(values)), name=name)
        table.initializer = ir.Constant(table.value_type, values)
        table.global_constant, table.linkage = True, "private"
    return table


def _entry(b, table: ir.GlobalVariable, i) -> ir.Value:
    """Element i of an _i32_table, as i64."""
    return b.zext(b.load(b.gep(table, [i64(0), i], source_etype=table.value_type), typ=I32, align=4), I64)


def _im2col_fn(mb, g: _Geom, row_stride: int) -> ir.Function:
    """`void pack(src, dst, i64 k_lo, k_hi, col0, ncols, nvp, panel)`: _pack_im2col as a
    function, built once per geometry and row stride and called for every K block
    (inline, each block's copy was the largest code of a convolution). The row stride
    stays a constant: as an argument (which would let a layer's forward and filter-
    gradient products share one packer) it made LeNet-5's training step 3-6% slower."""
    def build():
        w = mb.target.vector_width
        fn = ir.Function(mb.module, ir.FunctionType(VOID, [PTR, PTR] + [I64] * 6), name=mb.fresh_name("im2col"))
        set_target(fn, mb.target, w)
        fn.attributes.add("noinline")
        no_unrolling(fn)  # see _not_unrolled
        src, dst, k_lo, k_hi, col0, ncols, nvp, panel = fn.args
        src.add_attribute("noalias")
        dst.add_attribute("noalias")
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        v = _V(b, w, mb.target.has("fma"))
        sink = b.alloca(v.f.ty)
        _pack_im2col(b, v, src, g, k_lo, k_hi, col0, ncols, dst, nvp, panel, row_stride, sink)
        b.ret_void()
        return fn
    return mb.helper(("im2col", g.key, row_stride), build)


def _pack_weights_fn(mb, mr: int) -> ir.Function:
    """`void packw(W, Ap, i64 M, i64 K, i64 kc, i64 rs, i64 nt, i64 os, i32* taps)`:
    A[M, K] into MR-row panels per K block of kc (zero rows past M):
    Ap[kb*kc*Mp + r*kcur + p*mr + i] = A[r + i, kb*kc + p], where
    A[m, k] = W[m*rs + (k / nt)*os + taps[k % nt]]. Every convolution's weights, whatever
    their shape, are packed by one of these per build (inline, each layer's copy was a
    strided loop the vectorizer spent 50-100 ms on)."""
    def build():
        w = mb.target.vector_width
        fn = ir.Function(mb.module, ir.FunctionType(VOID, [PTR, PTR] + [I64] * 6 + [PTR]),
                         name=mb.fresh_name("packw"))
        set_target(fn, mb.target, w)
        fn.attributes.add("noinline")
        fn.attributes.add("optsize")
        W, Ap, M, K, kc, rs, nt, os_, taps = fn.args
        for arg in (W, Ap, taps):
            arg.add_attribute("noalias")
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        Mp = b.mul(b.udiv(b.add(M, i64(mr - 1)), i64(mr)), i64(mr))
        zero = ir.Constant(F32, 0.0)
        last = b.sub(M, i64(1))
        nkb = b.udiv(b.add(K, b.sub(kc, i64(1))), kc)
        with for_range(b, 0, nkb, "kb") as kb:
            k0 = b.mul(kb, kc)
            kcur = smin(b, kc, b.sub(K, k0))
            block = b.gep(Ap, [b.mul(k0, Mp)], source_etype=F32)
            q0, j0 = b.udiv(k0, nt), b.urem(k0, nt)
            with for_range(b, 0, Mp, "ar", step=mr) as r:
                panel = b.gep(block, [b.mul(r, kcur)], source_etype=F32)
                rows = [b.mul(smin(b, b.add(r, i64(i)), last), rs) for i in range(mr)]
                keep = [b.icmp_signed("<", b.add(r, i64(i)), M) for i in range(mr)]

                def body(p, carried):
                    q, j = carried
                    tap = b.sext(b.load(gep(b, taps, j, I32), typ=I32, align=4), I64)
                    off = b.add(b.mul(q, os_), tap)
                    out = b.gep(panel, [b.mul(p, i64(mr))], source_etype=F32)
                    for i in range(mr):
                        x = b.load(gep(b, W, b.add(rows[i], off), F32), typ=F32, align=4)
                        b.store(b.select(keep[i], x, zero), gep(b, out, i64(i), F32), align=4)
                    j1 = b.add(j, i64(1))
                    wrap = b.icmp_signed("==", j1, nt)
                    return [b.select(wrap, b.add(q, i64(1)), q), b.select(wrap, i64(0), j1)]
                loop(b, 0, kcur, (q0, j0), body, "ap")
        b.ret_void()
        return fn
    return mb.helper(("packw", mr), build)


class _Kernels:
    """The two microkernels (full, edge) for one operand layout, built once per build:
    the unpacked A's row stride and C's row stride are arguments, so layers of different
    sizes share them. `inline`: one edge kernel of this module's own, inlined where it is
    called, so that constant arguments (depth, rows, columns) fold into its code -- for
    products too short (LeNet's K=16) to hide a call and masks made at run time. (With
    AVX2's 16 registers, inlined, LeNet's data gradient ran 20% slower.)"""

    def __init__(self, mb, plan: GemmPlan, lay: _Layout, inline: bool = False):
        w = mb.target.vector_width
        spec = GemmSpec(1, 1, 1)  # no bias, no ReLU: the epilogue is the template's
        self.strides = [i64(x) for x in (None if lay.a_packed else lay.a_rs, lay.ldc) if x is not None]
        generic = replace(lay, a_rs=lay.a_rs if lay.a_packed else None, ldc=None)
        plan = replace(plan, kc=0)  # the kernel takes kc as an argument
        self.mr, self.nr = plan.mr, plan.nv * w

        def kernel(edge: bool):
            fn = _emit_kernel(mb.module, mb.fresh_name("convk"), plan, generic, spec, w, mb.target, edge=edge)
            fn.attributes.add("alwaysinline" if inline else "noinline")
            return fn
        if inline:
            self.edge, self.full = kernel(True), None
            return
        self.edge = mb.helper(("convk", plan, generic, True), lambda: kernel(True))
        # the edge kernel does every tile where masks cost nothing (gemm.free_masks)
        self.full = None if free_masks(mb.target) else mb.helper(("convk", plan, generic, False),
                                                                  lambda: kernel(False))

    def tile(self, b, ap, bp, cp, kcur, mode, rows, cols):
        null = ir.Constant(PTR, None)
        if self.full is None:
            b.call(self.edge, [ap, bp, cp, null, kcur, mode, smin(b, rows, i64(self.mr)),
                               smin(b, cols, i64(self.nr))] + self.strides)
            return
        full = b.and_(b.icmp_signed(">=", rows, i64(self.mr)), b.icmp_signed(">=", cols, i64(self.nr)))
        with b.if_else(full, likely=True) as (then, otherwise):
            with then:
                b.call(self.full, [ap, bp, cp, null, kcur, mode, i64(self.mr), i64(self.nr)] + self.strides)
            with otherwise:
                b.call(self.edge, [ap, bp, cp, null, kcur, mode, smin(b, rows, i64(self.mr)),
                                   smin(b, cols, i64(self.nr))] + self.strides)


def _plan(M, N, K, w):
    p = plan_gemm(GemmSpec(M, N, K), w, 1)
    return GemmPlan(mr=p.mr, nv=p.nv, kc=0, mc=0, nc=0, pack_a=True, pack_b=True, split="n")


def _mode(b, first):
    return b.select(first, ir.Constant(I32, _EPILOGUE), ir.Constant(I32, _ADD_C | _EPILOGUE))


# --------------------------------------------------------------------------- A @ im2col


# A 1x1 stride-1 layer's im2col is a copy of each image, which its packer reads from L3
# or memory as it goes where the batch's images outgrow L2; the product then prefetches
# the next image into L2, a share of its lines at each register tile. Of the GEMM rate on
# this Intel machine type (twenty-sixth session): 1x1 64->64 on 16x16 forward 74% ->
# 82%, data gradient 73% -> 82%; 128->128 on 8x8 91% -> 94%; 32->32 on 16x16 70% -> 72%;
# 16->32 on 32x32 50% -> 54%. A prefetch all at once per panel of columns gained nothing.
# Other layers lost (the residual network's 3x3 stride-2 forward 80% -> 72%, its 1x1
# stride-2 projection 37% -> 34%): their packers revisit each line for several taps.
def _prefetches_next(N: int, src_floats: int, out_floats: int, taps: int, stride, pad) -> bool:
    """Whether a product over images prefetches the next one's source (see above)."""
    return (taps == 1 and tuple(stride) == (1, 1) and tuple(pad) == (0, 0)
            and 4 * N * (src_floats + out_floats) > _L2_BYTES)


class _Product:
    """out[M, P] = A[M, K] @ col(src)[K, P] for one image, A packed once per call."""

    def __init__(self, mb, geom: _Geom, M: int, ldc: int):
        w = mb.target.vector_width
        self.mb, self.g, self.M, self.ldc, self.w = mb, geom, M, ldc, w
        self.plan = _plan(M, geom.P, geom.K, w)
        self.mr, self.nr = self.plan.mr, self.plan.nv * w
        nkb = max(1, _cdiv(geom.K, _KC[w]))
        self.kc = _cdiv(geom.K, nkb)
        # one register-tile panel of columns at a time: packed into a buffer that stays in
        # L1 (kc x NR floats), then used by every row tile while it is there. (A GEMM packs
        # large B blocks into L2 to amortize packing A; here A, the weights, is small and
        # packed once per call, and the im2col panel is the operand that streams.)
        self.nc = self.nr
        self.Mp = _cdiv(M, self.mr) * self.mr
        self.a_floats = self.Mp * geom.K
        self.b_floats = self.kc * self.nc
        lay = _Layout(a_rs=1, a_cs=self.mr, b_rs=self.nr, ldc=ldc, a_packed=True, b_packed=True)
        self.kern = _Kernels(mb, self.plan, lay)
        self.im2col = _im2col_fn(mb, geom, self.nr)

    def pack_a(self, b, Ap, W, rs: int, os_: int, taps: list):
        """Ap <- A[m, k] = W[m*rs + (k // len(taps))*os_ + taps[k % len(taps)]]."""
        mb = self.mb
        table = _i32_table(mb.module, "taps", taps)
        b.call(_pack_weights_fn(mb, self.mr), [W, Ap, i64(self.M), i64(self.g.K), i64(self.kc), i64(rs),
                                                i64(len(taps)), i64(os_), table])

    def run(self, b, src, Ap, Bp, C, m_lo, m_hi, next_src=None):
        """C[m, p] for rows [m_lo, m_hi) (multiples of MR but the last), all p; with
        next_src (the next image's source), a share of its cache lines prefetched into L2
        at each register tile of the first K block (see _prefetches_next)."""
        g, kc, nc, nr, mr = self.g, self.kc, self.nc, self.nr, self.mr
        K, P = g.K, g.P
        nkb = _cdiv(K, kc)
        lines = _cdiv(g.S * g.SH * g.SW, _LINE_FLOATS)
        tiles_m = _cdiv(self.M, mr)
        share = _cdiv(lines, _cdiv(P, nc) * tiles_m)
        with for_range(b, 0, P, "jc", step=nc) as jc:
            ncur = smin(b, b.sub(i64(P), jc), i64(nc))
            for kb in range(nkb):  # few K blocks: unrolled, so each has constant sizes
                k0, kcur = kb * kc, min(kc, K - kb * kc)
                b.call(self.im2col, [src, Bp, i64(k0), i64(k0 + kcur), jc, ncur, i64(self.plan.nv),
                                     i64(nr * kcur)])
                mode = ir.Constant(I32, _EPILOGUE | (_ADD_C if kb else 0))
                with for_range(b, 0, ncur, "jr", step=nr) as jr:
                    bp = b.gep(Bp, [b.mul(jr, i64(kcur))], source_etype=F32)
                    with for_range(b, m_lo, m_hi, "ir", step=mr) as ir_:
                        if next_src is not None and kb == 0:  # (past the last image: a
                            # prefetch does not fault)
                            tile = b.add(b.mul(b.udiv(jc, i64(nc)), i64(tiles_m)), b.udiv(ir_, i64(mr)))
                            first = b.mul(tile, i64(share))
                            with for_range(b, first, smin(b, b.add(first, i64(share)), i64(lines)), "line") as line:
                                _Vec(b, self.w).prefetch(b.gep(next_src, [b.mul(line, i64(_LINE_FLOATS))],
                                                               source_etype=F32), False, 2)
                        ap = b.gep(Ap, [b.add(i64(kb * kc * self.Mp), b.mul(ir_, i64(kcur)))], source_etype=F32)
                        cp = b.gep(C, [b.add(b.mul(ir_, i64(self.ldc)), b.add(jc, jr))], source_etype=F32)
                        self.kern.tile(b, ap, bp, cp, i64(kcur), mode, b.sub(m_hi, ir_), b.sub(ncur, jr))


def _scratch(mb, em, floats: int):
    mb.layout.scratch_bytes = max(mb.layout.scratch_bytes, _cdiv(floats * 4, 64) * 64)
    return em.pointers["__scratch__"]


def _carve(b, base, sizes):
    """Consecutive 64-byte aligned pieces of the scratch area."""
    out, at = [], 0
    for n in sizes:
        out.append(b.gep(base, [i64(at)], source_etype=F32))
        at += _cdiv(n, 16) * 16
    return out, at


def _zero(b, buf, floats: int) -> None:
    with for_range(b, 0, floats, "z") as i:
        b.store(ir.Constant(F32, 0.0), gep(b, buf, i, F32), align=4)


def _copy_padded(b, v: _Vec, src, dst, C: int, H: int, W: int, ph: int, pw: int, Wp: int | None = None) -> None:
    """C planes of H x W at src into the interiors of dst's (H + 2ph) x Wp planes (Wp:
    W + 2pw unless given; their borders, zeroed once per call, stay zero), a row's
    vectors at a time."""
    Hp, Wp = H + 2 * ph, Wp or W + 2 * pw
    with for_range(b, 0, C * H, "row") as cy:
        c, y = b.udiv(cy, i64(H)), b.urem(cy, i64(H))
        to = b.gep(dst, [b.add(b.mul(b.add(b.mul(c, i64(Hp)), b.add(y, i64(ph))), i64(Wp)), i64(pw))],
                   source_etype=F32)
        row = b.gep(src, [b.mul(cy, i64(W))], source_etype=F32)
        for j in range(0, W, v.w):
            mask = None if j + v.w <= W else const_vector(I1, [lane < W - j for lane in range(v.w)])
            v.store(v.load(v.at(row, j), mask), v.at(to, j), mask)


# A batch of at least this many images is split over images whatever the thread count:
# its loops over output rows keep constant bounds (a run-time choice between the two
# splits made each convolution driver cost LLVM 15-20 ms more). Up to 16 threads, that is
# the choice the run-time test makes; beyond, a thread may get one image fewer.
_IMAGES_ALWAYS_SPLIT = 32


def _share(b, N: int, rows: int, mr: int, tid, nthreads):
    """(images lo, hi, rows lo, hi) of this thread: whole images when the batch has at
    least two per thread, else MR-row units of every image. The thread count is the
    run's (the code takes it at run time), so below _IMAGES_ALWAYS_SPLIT images the
    choice is made there."""
    n_lo, n_hi = split(b, N, tid, nthreads)
    if N >= _IMAGES_ALWAYS_SPLIT:
        return n_lo, n_hi, i64(0), i64(rows)
    by_images = b.icmp_signed(">=", i64(N), b.mul(b.sext(nthreads, I64), i64(2)))
    u0, u1 = split(b, _cdiv(rows, mr), tid, nthreads)
    r_lo, r_hi = b.mul(u0, i64(mr)), smin(b, b.mul(u1, i64(mr)), i64(rows))
    return (b.select(by_images, n_lo, i64(0)), b.select(by_images, n_hi, i64(N)),
            b.select(by_images, i64(0), r_lo), b.select(by_images, i64(rows), r_hi))


def _dilation(t: Template) -> tuple[int, int]:
    return tuple(t.attrs.get("dilation", (1, 1)))


def _taps(KH: int, KW: int, pad, dilation) -> list[tuple[int, int]]:
    """The source offsets (row, column) of a kernel's taps, row-major."""
    (ph, pw), (dy, dx) = pad, dilation
    return [(ky * dy - ph, kx * dx - pw) for ky in range(KH) for kx in range(KW)]


def _direct_form(forms, mb, em, t: Template, tid, nthreads) -> bool:
    """Emits t by the first of `forms` -- (rule, emitter) pairs, tried in order -- whose
    rule gives a nonzero parameter for t on this target (the emitter's last argument);
    False where none applies. Of the direct forms the plane-wise ones and the direct
    filter gradient take dilated kernels; others leave a dilated one to the packed GEMM,
    whose im2col reads each tap at its spaced offset."""
    for rule, emit in forms:
        if _dilation(t) != (1, 1) and emit not in (_winograd_forward, _winograd_data, _winograd_filter, _planes_forward,
                                                      _planes_data, _direct_filter_gradient):
            continue
        param = rule(t, mb.target)
        if param:
            emit(mb, em, t, tid, nthreads, param)
            return True
    return False


def _epilogue(em, t: Template, n, rows: tuple) -> None:
    """The epilogue over image n, output channels [rows)."""
    if t.epilogue is None:
        return
    b = em.b
    vars_ = list(t.epilogue.outer) + list(t.epilogue.inner)
    em.push()
    emit_bounded(em, t.epilogue, {vars_[0].name: (n, b.add(n, i64(1))), vars_[1].name: rows}, vectorize=True)
    em.pop()


# --------------------------------------------------------------------------- forward


def conv2d(mb, em, t: Template, tid, nthreads) -> None:
    """y[n,o,oy,ox] = sum_{c,ky,kx} x[n,c,oy*sy+ky*dy-ph, ox*sx+kx*dx-pw] * w[o,c,ky,kx]."""
    if _direct_form([(_winograd_forward_rule, _winograd_forward), (_direct_forward_rows, _direct_forward),
                     (_planes_forward_tile, _planes_forward)],
                    mb, em, t, tid, nthreads):
        return
    b = em.b
    xb, wb = t.inputs
    N, C, H, W = xb.shape
    O, _, KH, KW = wb.shape
    _, _, OH, OW = t.output.shape
    (sy, sx), (ph, pw) = t.attrs["stride"], t.attrs["pad"]
    g = _Geom(C, H, W, OH, OW, sy, sx, _taps(KH, KW, (ph, pw), _dilation(t)))
    prod = _Product(mb, g, O, OH * OW)
    (Ap, Bp), total = _carve(b, _scratch_base(mb, em), [prod.a_floats, prod.b_floats])
    _scratch(mb, em, total)
    X, Wt, Y = em.pointers[xb.name], em.pointers[wb.name], em.pointers[t.output.name]
    T = KH * KW

    prod.pack_a(b, Ap, Wt, C * T, T, list(range(T)))  # A[o, c*T + tap] = w[o, c, tap]
    n_lo, n_hi, m_lo, m_hi = _share(b, N, O, prod.mr, tid, nthreads)
    with for_range(b, n_lo, n_hi, "img") as n:
        src = b.gep(X, [b.mul(n, i64(C * H * W))], source_etype=F32)
        out = b.gep(Y, [b.mul(n, i64(O * OH * OW))], source_etype=F32)
        prod.run(b, src, Ap, Bp, out, m_lo, m_hi, next_src=b.gep(src, [i64(C * H * W)], source_etype=F32)
                 if _prefetches_next(N, C * H * W, O * OH * OW, KH * KW, (sy, sx), (ph, pw)) else None)
        _epilogue(em, t, n, (m_lo, m_hi))


def _scratch_base(mb, em):
    return em.pointers["__scratch__"]


# A forward convolution whose output channels fill one vector (16 with AVX-512): as a
# GEMM it has 16 rows, and im2col takes a large share of its time (LeNet's 6->16 layer on
# 10-wide rows: 38%). Directly, a tile of whole output rows (up to 28 positions) keeps
# each position's vector of channels in registers over every (input channel, tap), each
# input pixel broadcast against the tap's vector of weights (packed once per call);
# 16x16 transposes turn the tile into channel planes to store. Measured on Zen 5, GFLOP/s
# as a GEMM -> directly: LeNet's 6->16 264-268 -> 384-397 (its training step -6.5%);
# 16->16 on 32x32 rows (tiles of a row's segments) 333-437 -> 419-512, but the residual
# network's step only -0.3 to -1.9% for +6% compile time: rows wider than a tile are
# left to the plane-wise form (below; it has since taken them, at 95-97% of the GEMM);
# and a 3->16 first layer (27 taps: the transposes and stores are not paid for) 311-403
# -> 286-287.
# Positions (accumulators) per tile: a kernel row's taps share pixels (tap kx at x, kx + 1
# at x - 1), which LLVM loads once and keeps live across both; past 16 accumulators that
# spilled. Of the GEMM rate on Zen 5, 16 output channels: LeNet's 6->16 (10-wide rows)
# 54-74% as 2 rows a tile -> 98% as 1; 16->16 on 8x8 57% (3 rows) -> 90% (2); 8->16 on
# 12-wide rows 51% (2) -> 93% (1); on 20- and 24-wide rows the GEMM (75-80%) beats one
# row a tile (45-58%).
_DIRECT_FWD_POSITIONS = 16
_DIRECT_FWD_MIN_TAPS = 64   # C * KH * KW at least


def _direct_forward_rows(t: Template, target) -> int:
    """Output rows per tile of the direct forward; 0 where it does not apply: no AVX-512,
    output channels other than one vector's worth, stride > 1, fewer than
    _DIRECT_FWD_MIN_TAPS taps, rows wider than a tile, or a batch the threads do not
    split by images."""
    N, C = t.inputs[0].shape[:2]
    O, _, KH, KW = t.inputs[1].shape
    OW = t.output.shape[3]
    w = target.vector_width
    if (w != 16 or O != w or tuple(t.attrs["stride"]) != (1, 1) or C * KH * KW < _DIRECT_FWD_MIN_TAPS
            or OW > _DIRECT_FWD_POSITIONS or N < _IMAGES_ALWAYS_SPLIT):
        return 0
    return _DIRECT_FWD_POSITIONS // OW


def _direct_forward(mb, em, t: Template, tid, nthreads, R: int) -> None:
    """conv2d (see _direct_forward_rows) on whole images per thread, R output rows a tile."""
    b = em.b
    xb, wb = t.inputs
    N, C, H, W = xb.shape
    O, _, KH, KW = wb.shape
    _, _, OH, OW = t.output.shape
    ph, pw = t.attrs["pad"]
    Hp, Wp = H + 2 * ph, W + 2 * pw
    K = C * KH * KW
    w = mb.target.vector_width
    v = _Vec(b, w, fused=mb.target.has("fma"))
    (Wt, Xp), total = _carve(b, _scratch_base(mb, em), [K * O, C * Hp * Wp if ph or pw else 0])
    _scratch(mb, em, total)
    X, Wg, Y = em.pointers[xb.name], em.pointers[wb.name], em.pointers[t.output.name]
    with for_range(b, 0, O, "o") as o:  # Wt[k, o] = w[o, k]: one vector of weights per tap
        with for_range(b, 0, K, "k") as k:
            x = b.load(gep(b, Wg, b.add(b.mul(o, i64(K)), k), F32), typ=F32, align=4)
            b.store(x, gep(b, Wt, b.add(b.mul(k, i64(O)), o), F32), align=4)
    if ph or pw:  # a zero-padded copy of each image: the borders stay zero
        _zero(b, Xp, C * Hp * Wp)

    def tile(src, out, y0, rows: int) -> None:
        """Output rows [y0, y0 + rows): contiguous in each channel plane."""
        def channel_row(q, acc):  # q = c * KH + ky
            c, ky = b.udiv(q, i64(KH)), b.urem(q, i64(KH))
            at = b.gep(src, [b.mul(b.add(b.mul(c, i64(Hp)), b.add(y0, ky)), i64(Wp))], source_etype=F32)
            taps = b.gep(Wt, [b.mul(q, i64(KW * O))], source_etype=F32)
            acc = list(acc)
            for kx in range(KW):
                wv = v.load(v.at(taps, kx * O))
                for j in range(rows * OW):
                    r, x = divmod(j, OW)
                    pixel = b.load(gep(b, at, i64(r * Wp + x + kx), F32), typ=F32, align=4)
                    acc[j] = v.fma(v.splat(pixel), wv, acc[j])
            return acc
        acc = loop(b, 0, C * KH, [v.zero] * (rows * OW), channel_row, name="q")
        for j0 in range(0, rows * OW, w):
            block = list(acc[j0:j0 + w])
            n = len(block)
            planes = v.transpose(block + [v.zero] * (w - n))  # planes[o]: channel o at j0..
            mask = None if n == w else const_vector(I1, [lane < n for lane in range(w)])
            for oc in range(O):
                v.store(planes[oc], v.at(out, b.add(b.mul(y0, i64(OW)), i64(oc * OH * OW + j0))), mask)

    def image(n):
        src = b.gep(X, [b.mul(n, i64(C * H * W))], source_etype=F32)
        if ph or pw:
            _copy_padded(b, v, src, Xp, C, H, W, ph, pw)
            src = Xp
        return src, b.gep(Y, [b.mul(n, i64(O * OH * OW))], source_etype=F32)
    _images_by_row_tiles(em, t, tid, nthreads, R, image, tile)


def _images_by_row_tiles(em, t: Template, tid, nthreads, R: int, image, tile) -> None:
    """A direct forward's driver: whole images per thread; per image n, (src, out) =
    image(n), then tile(src, out, first row, rows) over tiles of R output rows (the last
    shorter), then the epilogue over all of its channels."""
    b = em.b
    _, O, OH, _ = t.output.shape
    n_lo, n_hi = split(b, t.inputs[0].shape[0], tid, nthreads)
    with for_range(b, n_lo, n_hi, "img") as n:
        src, out = image(n)
        with for_range(b, 0, OH // R, "tile") as ti:
            tile(src, out, b.mul(ti, i64(R)), R)
        if OH % R:
            tile(src, out, i64(OH // R * R), OH % R)
        _epilogue(em, t, n, (i64(0), i64(O)))


# A stride-1 layer (k x k, k > 1) whose output rows fill the vectors: as a GEMM, im2col
# stores every input element once per tap, and on layers of few output channels that
# costs as much as a third of the product (16->16 on 32x32: 0.18 ms of im2col to 0.58 of
# product). Directly, a tile of R output rows of OB output channels stays in registers
# as vectors of positions (OB x R x vectors-per-row accumulators); each tap loads the R
# input rows shifted by the tap (a zero-padded copy of the image, with room past its end
# for the shifted vectors) and broadcasts each channel's weight once for the tile, so a
# tap costs R * nv loads and OB broadcasts for OB * R * nv multiply-adds; the tile shape
# is the one with the fewest of those per multiply-add. The output is stored as planes
# directly. Of the GEMM rate on Zen 5, as a GEMM -> directly: 16->16 on 32x32 77% -> 95%
# (3 rows x 4 channels), 32->32 on 16x16 88% -> 100%, 32->64 94% -> 102%, 5x5 32->32
# 88% -> 103%, 3->32 on 32x32 84% -> 93%, LeNet's 1->6 (every channel in a tile). Tiles
# of fewer than 16 accumulators (loads per multiply-add past _PLANES_MAX_LOADS) reached
# 78-80%; a 1x1 kernel gains nothing (90% either way) and stays a GEMM.
_PLANES_ACCUMULATORS = 24  # of 32 registers: the tile's input rows, a weight
# Rows of at least this many vectors are read in place; narrower ones from a zero-padded
# copy of each image. In place, a tap's shifted vector that reaches past either end of
# its row is a masked load (two of 3 x nv for a padded 3x3 kernel), and on Intel (Sapphire
# Rapids class) of the GEMM rate, copy -> in place: on 32-wide rows 16->16 80-81% ->
# 84-85% (forward and data gradient), 3->32 82% -> 86-87%; on 16-wide rows 32->32 88-89%
# -> 84-85%, 5x5 91-92% -> 83-85%; LeNet's 28-wide 1->6 75-78% either way.
_PLANES_IN_PLACE_VECTORS = 2
_PLANES_MIN_FILL = 0.75    # of the lanes of a row's vectors
_PLANES_MAX_LOADS = 0.625  # vector loads and broadcasts per multiply-add, at most


def _planes_tile(N: int, C: int, O: int, OH: int, OW: int, KH: int, KW: int, stride, w: int):
    """(R rows, OB output channels) of a plane-wise direct tile for a convolution of C
    input and O output channels onto OH x OW; 0 where it does not apply: no AVX-512, a
    stride, a 1x1 kernel, rows of positions filling less than _PLANES_MIN_FILL of their
    vectors, more than _PLANES_MAX_LOADS loads per multiply-add in the best tile, or a
    batch the threads do not split by images."""
    nv = _cdiv(OW, w)
    if (w != 16 or tuple(stride) != (1, 1) or KH * KW == 1 or OW < _PLANES_MIN_FILL * nv * w
            or N < _IMAGES_ALWAYS_SPLIT):
        return 0
    tiles = [(1 / ob + 1 / (r * nv), -ob, r) for ob in range(1, O + 1) if O % ob == 0
             for r in range(1, min(OH, _PLANES_ACCUMULATORS // (ob * nv)) + 1)]
    loads, ob, r = min(tiles, default=(1, 0, 0))
    return (r, -ob) if loads <= _PLANES_MAX_LOADS else 0


def _planes_forward_tile(t: Template, target):
    """_planes_tile of a forward convolution."""
    N, C = t.inputs[0].shape[:2]
    O, _, KH, KW = t.inputs[1].shape
    return _planes_tile(N, C, O, *t.output.shape[2:], KH, KW, t.attrs["stride"], target.vector_width)


def _planes_data_tile(t: Template, target):
    """_planes_tile of a stride-1 data gradient: the correlation of g (O channels) with
    the flipped weights onto dx (C channels); 0 for a layer padded by more than its
    kernel spans (g would be padded by a negative amount)."""
    N, O = t.inputs[0].shape[:2]
    _, C, KH, KW = t.inputs[1].shape
    if any((k - 1) * d < p for k, d, p in zip((KH, KW), _dilation(t), t.attrs["pad"])):
        return 0
    return _planes_tile(N, O, C, *t.output.shape[2:], KH, KW, t.attrs["stride"], target.vector_width)


def _planes_forward(mb, em, t: Template, tid, nthreads, shape) -> None:
    """conv2d (see _planes_tile) on whole images per thread, tiles of shape (R, OB)."""
    _planes(mb, em, t, tid, nthreads, shape, flip=False)


def _planes_data(mb, em, t: Template, tid, nthreads, shape) -> None:
    """conv2d_bwd_data, stride 1 (see _planes_tile): dx = g correlated with w flipped
    along both axes and its channels swapped, g padded by (KH - 1)·dy - ph, (KW - 1)·dx - pw."""
    _planes(mb, em, t, tid, nthreads, shape, flip=True)


def _planes(mb, em, t: Template, tid, nthreads, shape, flip: bool) -> None:
    """src = t.inputs[0] (C planes of H x W) correlated with weights [O, C, KH, KW] into
    t.output (O planes of OH x OW): the forward's own weights, or (flip) the data
    gradient's, packed once per call into scratch. The taps are dilation apart."""
    R, OB = shape
    b = em.b
    xb, wb = t.inputs
    N, C, H, W = xb.shape
    _, O, OH, OW = t.output.shape
    KH, KW = wb.shape[2:]
    ph, pw = t.attrs["pad"]
    dy, dx = _dilation(t)
    if flip:
        ph, pw = (KH - 1) * dy - ph, (KW - 1) * dx - pw
    w = mb.target.vector_width
    nv = _cdiv(OW, w)
    in_place = nv >= _PLANES_IN_PLACE_VECTORS
    Hp, Wp = H + 2 * ph, W + 2 * pw
    K, T = C * KH * KW, KH * KW
    # in place: a row of zeros for the tap rows outside the image; else the padded copy,
    # whose last row's shifted vectors read up to (KW - 1)·dx + nv * w floats from its start
    src_floats = W if in_place else C * Hp * Wp + max(0, (KW - 1) * dx + nv * w - Wp)
    (Xp, Wf), total = _carve(b, _scratch_base(mb, em), [src_floats, O * K if flip else 0])
    _scratch(mb, em, total)
    X, Wg, Y = em.pointers[xb.name], em.pointers[wb.name], em.pointers[t.output.name]
    _zero(b, Xp, src_floats)  # the zero row, or the copy's borders and tail
    if flip:  # Wf[c', o', tap] = w[o', c', T - 1 - tap]: c' a channel of dx, o' of g
        with for_range(b, 0, O * C, "oc") as oc:
            to = b.gep(Wf, [b.mul(b.add(b.mul(b.urem(oc, i64(O)), i64(C)), b.udiv(oc, i64(O))), i64(T))],
                       source_etype=F32)
            at = b.gep(Wg, [b.mul(oc, i64(T))], source_etype=F32)
            for tap in range(T):
                x = b.load(gep(b, at, i64(T - 1 - tap), F32), typ=F32, align=4)
                b.store(x, gep(b, to, i64(tap), F32), align=4)
        Wg = Wf
    geom = (C, H, W, ph, pw, O, OH, OW, KH, KW, OB, in_place) + ((dy, dx) if (dy, dx) != (1, 1) else ())

    def tile(src, out, y0, rows: int) -> None:
        b.call(_planes_tile_fn(mb, geom, rows), [src, Wg, out, y0, Xp])

    def image(n):
        x = b.gep(X, [b.mul(n, i64(C * H * W))], source_etype=F32)
        if not in_place:
            _copy_padded(b, _Vec(b, w, fused=mb.target.has("fma")), x, Xp, C, H, W, ph, pw)
        return x if in_place else Xp, b.gep(Y, [b.mul(n, i64(O * OH * OW))], source_etype=F32)
    _images_by_row_tiles(em, t, tid, nthreads, R, image, tile)


def _planes_tile_fn(mb, geom: tuple, rows: int) -> ir.Function:
    """`void tile(src, weights, out, i64 y0, zeros)`: output rows [y0, y0 + rows) of
    every output channel of _planes, OB channels at a time. From the C planes of H x W
    at src read in place (in_place), where a tap row outside the image reads the row of
    zeros instead and a shifted vector's lanes outside its row are masked off (constant
    masks); else from src's zero-padded copy of them. Built once per geometry and row
    count: a layer's forward and data gradient (same channels both ways) and the layers
    of one shape share it."""
    C, H, W, ph, pw, O, OH, OW, KH, KW, OB, in_place = geom[:12]
    dy, dx = geom[12:] or (1, 1)  # the taps' spacing
    if not in_place:  # the padded planes, read as unpadded ones
        H, W, ph, pw = H + 2 * ph, W + 2 * pw, 0, 0

    def build():
        w = mb.target.vector_width
        fn = ir.Function(mb.module, ir.FunctionType(VOID, [PTR, PTR, PTR, I64, PTR]), name=mb.fresh_name("planes"))
        set_target(fn, mb.target, w)
        fn.attributes.add("noinline")
        src, Wg, out, y0, zeros = fn.args
        for arg in (src, Wg, out):
            arg.add_attribute("noalias")
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        v = _Vec(b, w, fused=mb.target.has("fma"))
        nv, K = _cdiv(OW, w), C * KH * KW
        last = const_vector(I1, [lane < OW - (nv - 1) * w for lane in range(w)])
        # tap rows may fall outside the image (padding, or fewer rows than the taps reach)
        rows_outside = in_place and (ph > 0 or OH - 1 + (KH - 1) * dy - ph >= H)
        # lanes of the vector j of tap column kx that lie inside the row (the padded
        # copy's shifted vectors may read past a row: into the next, or the tail)
        inside = {(j, kx): [not in_place or 0 <= j * w + lane + kx * dx - pw < W for lane in range(w)]
                  for j in range(nv) for kx in range(KW)}

        def block(ob):
            weights = b.gep(Wg, [b.mul(ob, i64(OB * K))], source_etype=F32)
            to = b.gep(out, [b.add(b.mul(ob, i64(OB * OH * OW)), b.mul(y0, i64(OW)))], source_etype=F32)

            def channel_row(q, acc):  # q = c * KH + ky
                c, ky = b.udiv(q, i64(KH)), b.urem(q, i64(KH))
                row0 = b.sub(b.add(y0, b.mul(ky, i64(dy)) if dy > 1 else ky), i64(ph))  # output row y0's
                at = []
                for r in range(rows):
                    y = b.add(row0, i64(r)) if r else row0
                    row = b.gep(src, [b.mul(b.add(b.mul(c, i64(H)), y), i64(W))], source_etype=F32)
                    at.append(b.select(b.icmp_unsigned("<", y, i64(H)), row, zeros) if rows_outside else row)
                taps = b.gep(weights, [b.mul(q, i64(KW))], source_etype=F32)  # w[0, c, ky, 0]
                acc = list(acc)
                for kx in range(KW):
                    xs = [v.load(gep(b, at[r], i64(j * w + kx * dx - pw), F32), _lanes(v, inside[j, kx]))
                          for r in range(rows) for j in range(nv)]
                    for o in range(OB):
                        wv = v.splat(b.load(gep(b, taps, i64(o * K + kx), F32), typ=F32, align=4))
                        for i, x in enumerate(xs):
                            acc[o * rows * nv + i] = v.fma(x, wv, acc[o * rows * nv + i])
                return acc
            acc = loop(b, 0, C * KH, [v.zero] * (OB * rows * nv), channel_row, name="q")
            for o in range(OB):
                for r in range(rows):
                    for j in range(nv):
                        v.store(acc[(o * rows + r) * nv + j], v.at(to, i64(o * OH * OW + r * OW + j * w)),
                                last if j == nv - 1 and OW % w else None)
        if OB == O:
            block(i64(0))
        else:
            with for_range(b, 0, O // OB, "ob") as ob:
                block(ob)
        b.ret_void()
        return fn
    return mb.helper(("planes", geom, rows), build)


# --------------------------------------------------------------------------- Winograd


# A 3x3 stride-1 layer by minimal filtering (Lavin and Gray, 2015): F(m x m, 3 x 3) makes
# each m x m tile of outputs A^T [(G g G^T) . (B^T d B)] A from the (m + 2)^2 tile d of
# input under it, so with U_p = (G g G^T)_p (the weights, transformed once per call) and
# V_p = (B^T d B)_p (the input), a layer is (m + 2)^2 GEMMs, one per tile position p,
# [tiles, C] x [C, O]: per output, 16/4 (F(2x2)) or 36/16 (F(4x4)) multiply-adds per
# channel pair where the direct forms do 9. Each image is copied channels-last (16 x 16
# transposes), so that the input transform reads and writes vectors of 16 channels; per
# panel of tiles (their V and products in half of L2), gemm.py's microkernel makes the
# products and the output transform writes each tile's outputs channels-last, transposed
# into the output planes at the end. Dilation spaces a tile's elements d apart (tiles of
# each output phase), so dilated layers take it too; the data gradient is the same code
# on g with the flipped weights. The transforms cost per channel what the products save
# per channel pair, so it pays from 32 channels each way; and a panel of few tiles leaves
# the microkernel short products. Of the GEMM rate on Zen 5 (bench_conv.py, batch 64,
# forward; direct -> F(2x2) -> F(4x4)): 16->16 on 32x32 100% -> 57% -> 82-85%; 32->32
# on 32x32 83-86% -> 102-109% -> 157-172%, on 16x16 98-99% -> 117% -> 134-138%; 64->64
# on 32x32 89-93% -> 135-139% -> 201-208%, on 16x16 101% -> 137-144% -> 139-145%, on
# 8x8 95-96% -> 118-119% -> 76%; 128->128 on 16x16 101% -> 160-164% -> 151%; 256->256
# on 8x8 91% -> 121-135% -> 62-63%; 128->128 on 4x4 (4 tiles) 69% -> 64% -> 76-80%.
# Hence the larger tile that still makes 16 tiles: F(4x4) from 16x16 outputs, F(2x2)
# from 8x8. With AVX2 (8-wide code, on the same machine) the direct forms are GEMMs and
# Winograd gains more: 32->32 on 32x32 75-76% -> 206-222% (F(4x4)), 32->64 on 16x16 91%
# -> 147-162%, 64->64 on 8x8 92-94% -> 149-151%, 128->128 on 16x16 90-95% -> 179-187%
# (F(2x2); measured before F(4x4) took the 16x16 layers). F(4x4)'s transforms
# (coefficients up to 8) cost accuracy: the RMS error of a 32x32 layer's outputs,
# relative to their RMS, 1.3e-6 (32 channels) to 3.9e-6 (384) against the direct forms'
# 0.3-1.0e-6 (docs/performance.md).
# (B^T, G, A^T) of F(m x m, 3 x 3) by its output tile m
_WINO = {
    2: (((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
        ((1, 1, 1, 0), (0, 1, -1, -1))),
    4: (((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
         (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
         (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))),
}
_WINO_MIN_CHANNELS = 32
_WINO_MIN_TILES = 16


def _winograd_rule(N, C, O, OH, OW, KH, KW, stride, dilation, target) -> int:
    """The output tile m of the F(m x m, 3 x 3) a layer of C input and O output channels
    onto OH x OW takes (_winograd): with AVX-512 or AVX2, a 3x3 kernel, stride 1,
    _WINO_MIN_CHANNELS each way (whole vectors of them, at most one K block of the
    microkernel) and a batch the threads split by images, the largest m that makes
    _WINO_MIN_TILES tiles; else 0."""
    w = target.vector_width
    if (w not in (8, 16) or (KH, KW) != (3, 3) or tuple(stride) != (1, 1) or N < _IMAGES_ALWAYS_SPLIT
            or min(C, O) < _WINO_MIN_CHANNELS or C % w or O % w or C > _KC[w]):
        return 0
    for m in sorted(_WINO, reverse=True):
        ys, xs = _winograd_tiles(OH, OW, *dilation, m)
        if len(ys) * len(xs) >= _WINO_MIN_TILES:
            return m
    return 0


def _winograd_forward_rule(t: Template, target) -> int:
    N, C = t.inputs[0].shape[:2]
    O, _, KH, KW = t.inputs[1].shape
    return _winograd_rule(N, C, O, *t.output.shape[2:], KH, KW, t.attrs["stride"], _dilation(t), target)


def _winograd_data_rule(t: Template, target) -> int:
    """As _winograd_forward_rule, for the data gradient (g correlated with the flipped
    weights); 0 for a layer padded by more than its kernel spans."""
    N, O = t.inputs[0].shape[:2]
    _, C, KH, KW = t.inputs[1].shape
    if any((k - 1) * d < p for k, d, p in zip((KH, KW), _dilation(t), t.attrs["pad"])):
        return 0
    return _winograd_rule(N, O, C, *t.output.shape[2:], KH, KW, t.attrs["stride"], _dilation(t), target)


def _combine(b, matrix, xs, const) -> list:
    """[sum_j matrix[i][j] * xs[j] for each row i]: coefficients of ±1 as adds and
    subtracts, 0 skipped, others multiplied (const(c): c as xs' type)."""
    out = []
    for row in matrix:
        acc = None
        for c, x in zip(row, xs):
            if c == 0:
                continue
            term = x if abs(c) == 1 else b.fmul(x, const(abs(c)))
            if acc is None:
                acc = term if c > 0 else b.fneg(term)
            else:
                acc = b.fadd(acc, term) if c > 0 else b.fsub(acc, term)
        out.append(acc)
    return out


def _sandwich(b, L, d, const) -> list:
    """L d L^T for a square list-of-rows d, row-major flat."""
    cols = [_combine(b, L, [row[j] for row in d], const) for j in range(len(d[0]))]  # (L d)[:, j]
    return [x for r in range(len(L)) for x in _combine(b, L, [col[r] for col in cols], const)]


def _transform_tile(b, f: _Vec, L, src, steps: tuple[int, int], dst, dst_step: int, channels: int) -> None:
    """L d L^T for the tile d at src (element (i, k) at src + i * steps[0] + k * steps[1],
    channels-last), a vector of channels at a time: its element p at dst + p * dst_step."""
    n = len(L[0])
    const = lambda c: const_vector(F32, [float(c)] * f.w)  # noqa: E731
    with for_range(b, 0, channels, "c", step=f.w) as c:
        d = [[f.load(f.at(src, b.add(c, i64(i * steps[0] + k * steps[1])))) for k in range(n)] for i in range(n)]
        for p, x in enumerate(_sandwich(b, L, d, const)):
            f.store(x, f.at(dst, b.add(c, i64(p * dst_step))))


def _winograd_forward(mb, em, t: Template, tid, nthreads, m: int) -> None:
    """conv2d, 3x3 stride 1 (see _winograd_rule), whole images per thread."""
    _winograd(mb, em, t, tid, nthreads, False, m)


def _winograd_data(mb, em, t: Template, tid, nthreads, m: int) -> None:
    """conv2d_bwd_data, 3x3 stride 1: g correlated with the flipped weights, channels
    swapped, g padded by 2·d - p."""
    _winograd(mb, em, t, tid, nthreads, True, m)


def _winograd_tiles(OH: int, OW: int, dy: int, dx: int, m: int) -> tuple[list, list]:
    """The first output row and column of each tile (its outputs d apart), per axis:
    each output phase's grid, m at a time."""
    def axis(size, d):
        return [r + d * i for r in range(d) for i in range(0, _cdiv(size - r, d), m)]
    return axis(OH, dy), axis(OW, dx)


def _winograd(mb, em, t: Template, tid, nthreads, flip: bool, m: int) -> None:
    """t (see above) by F(m x m, 3 x 3), whole images per thread: the forward's weights or
    (flip) the data gradient's."""
    b = em.b
    xb, wb = t.inputs
    N, C, H, W = xb.shape
    _, O, OH, OW = t.output.shape
    ph, pw = t.attrs["pad"]
    dy, dx = _dilation(t)
    if flip:
        ph, pw = 2 * dy - ph, 2 * dx - pw
    w = mb.target.vector_width
    BT, G, AT = _WINO[m]
    a2 = len(BT) ** 2
    ys, xs = _winograd_tiles(OH, OW, dy, dx, m)
    Hp = max(H + 2 * ph, max(ys) + (m + 1) * dy + 1)
    Wp = max(W + 2 * pw, max(xs) + (m + 1) * dx + 1)
    plan = _plan(len(ys) * len(xs), O, C, w)
    mr, nr = plan.mr, plan.nv * w
    On = _cdiv(O, nr) * nr
    TP = _winograd_panel(len(ys) * len(xs), C, O, mr, a2)
    P16 = _cdiv(OH * OW, w) * w
    (Xt, U, V, M, Yt), total = _carve(b, _scratch_base(mb, em),
                                       [Hp * Wp * C, a2 * C * On, a2 * TP * C, a2 * TP * O, P16 * O])
    _scratch(mb, em, total)
    X, Wg, Y = em.pointers[xb.name], em.pointers[wb.name], em.pointers[t.output.name]
    _zero(b, Xt, Hp * Wp * C)  # the borders; each image's copy fills the interior
    if On > O:
        _zero(b, U, a2 * C * On)  # the last panel's columns past O

    # U_p[c, o] in the microkernel's packed B layout: panels of NR output channels
    with for_range(b, 0, O * C, "oc") as oc:
        o, c = b.udiv(oc, i64(C)), b.urem(oc, i64(C))
        if flip:  # w[c, o, 2 - i, 2 - j]: c a channel of g, o of dx
            at = b.gep(Wg, [b.mul(b.add(b.mul(c, i64(O)), o), i64(9))], source_etype=F32)
            g = [[b.load(gep(b, at, i64(8 - 3 * i - j), F32), typ=F32, align=4) for j in range(3)]
                 for i in range(3)]
        else:
            at = b.gep(Wg, [b.mul(oc, i64(9))], source_etype=F32)
            g = [[b.load(gep(b, at, i64(3 * i + j), F32), typ=F32, align=4) for j in range(3)] for i in range(3)]
        u = _sandwich(b, G, g, lambda c: ir.Constant(F32, c))
        to = b.add(b.mul(b.udiv(o, i64(nr)), i64(C * nr)), b.add(b.mul(c, i64(nr)), b.urem(o, i64(nr))))
        for p in range(a2):
            b.store(u[p], gep(b, U, b.add(to, i64(p * C * On)), F32), align=4)

    geom = (m, C, O, OH, OW, Hp, Wp, dy, dx, mr, plan.nv, TP, tuple(ys), tuple(xs))
    image_fn = _winograd_image_fn(mb, geom, plan)
    v = _Vec(b, w, fused=mb.target.has("fma"))
    n_lo, n_hi = split(b, N, tid, nthreads)
    with for_range(b, n_lo, n_hi, "img") as n:
        x = b.gep(X, [b.mul(n, i64(C * H * W))], source_etype=F32)
        _to_channels_last(b, v, x, Xt, C, H, W, Wp, ph, pw)
        out = b.gep(Y, [b.mul(n, i64(O * OH * OW))], source_etype=F32)
        b.call(image_fn, [Xt, U, V, M, Yt])
        _from_channels_last(b, v, Yt, out, O, OH * OW)
        _epilogue(em, t, n, (i64(0), i64(O)))


def _winograd_panel(T: int, C: int, O: int, mr: int, a2: int) -> int:
    """Tiles per panel (a multiple of MR): the panel's transformed input and products,
    a2 x tiles x (C + O) floats, in half of L2."""
    fit = max(1, _L2_BYTES // 2 // (4 * a2 * (C + O)) // mr) * mr
    return min(fit, _cdiv(T, mr) * mr)


def _to_channels_last(b, v: _Vec, src, dst, C: int, H: int, W: int, Wp: int, ph: int, pw: int) -> None:
    """C planes of H x W at src (C a multiple of the vector width) into dst's interior
    (from row ph, column pw) of rows Wp positions wide, each position's C channels
    consecutive: blocks of w channels x w positions transposed."""
    w = v.w

    def block(c0, y, x0: int, n: int):
        row = b.gep(src, [b.add(b.mul(c0, i64(H * W)), b.mul(y, i64(W)))], source_etype=F32)
        mask = None if n == w else const_vector(I1, [lane < n for lane in range(w)])
        cols = v.transpose([v.load(v.at(row, b.add(i64(i * H * W), i64(x0))), mask) for i in range(w)])
        to = b.gep(dst, [b.add(b.mul(b.add(b.mul(b.add(y, i64(ph)), i64(Wp)), i64(x0 + pw)), i64(C)), c0)],
                   source_etype=F32)
        for j in range(n):
            v.store(cols[j], v.at(to, i64(j * C)))
    with for_range(b, 0, C, "c0", step=w) as c0:
        with for_range(b, 0, H, "y") as y:
            for x0 in range(0, W, w):
                block(c0, y, x0, min(w, W - x0))


def _from_channels_last(b, v: _Vec, src, dst, O: int, P: int) -> None:
    """The reverse for the output: P positions of O channels each (O a multiple of the
    vector width; room for whole vectors of positions) into O planes of P at dst."""
    w = v.w

    def block(o0, p0, n: int):
        at = b.gep(src, [b.add(b.mul(p0, i64(O)), o0)], source_etype=F32)
        rows = v.transpose([v.load(v.at(at, i64(i * O))) for i in range(w)])
        to = b.gep(dst, [b.add(b.mul(o0, i64(P)), p0)], source_etype=F32)
        mask = None if n == w else const_vector(I1, [lane < n for lane in range(w)])
        for j in range(w):
            v.store(rows[j], v.at(to, i64(j * P)), mask)
    with for_range(b, 0, O, "o0", step=w) as o0:
        with for_range(b, 0, P // w * w, "p0", step=w) as p0:
            block(o0, p0, w)
        if P % w:
            block(o0, i64(P // w * w), P % w)


def _winograd_image_fn(mb, geom: tuple, plan) -> ir.Function:
    """`void image(xt, u, v, p, yt)`: one image of _winograd, from its channels-last
    padded copy xt and the transformed weights u, through the scratch panels v (the
    transformed input) and p (the products), into yt (channels last). Built once per
    geometry: a layer's forward and data gradient (same channels both ways) share it."""
    m, C, O, OH, OW, Hp, Wp, dy, dx, mr, nv, TP, ys, xs = geom
    BT, _, AT = _WINO[m]
    a = len(BT)

    def build():
        w = mb.target.vector_width
        nr = nv * w
        On = _cdiv(O, nr) * nr
        tiles = [(y, x) for y in ys for x in xs]
        T = len(tiles)
        fn = ir.Function(mb.module, ir.FunctionType(VOID, [PTR] * 5), name=mb.fresh_name("winograd"))
        set_target(fn, mb.target, w)
        fn.attributes.add("noinline")
        xt, u, vp, mp_, yt = fn.args
        for arg in fn.args:
            arg.add_attribute("noalias")
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        f = _Vec(b, w, fused=mb.target.has("fma"))
        lay = _Layout(a_rs=C, a_cs=1, b_rs=nr, ldc=O, a_packed=False, b_packed=True)
        kern = _Kernels(mb, plan, lay)
        at_table = _i32_table(mb.module, "wat", [y * Wp + x for y, x in tiles])
        ty_table = _i32_table(mb.module, "wty", [y for y, _ in tiles])
        tx_table = _i32_table(mb.module, "wtx", [x for _, x in tiles])
        fconst = lambda c: const_vector(F32, [float(c)] * w)  # noqa: E731

        with for_range(b, 0, T, "t0", step=TP) as t0:
            count = smin(b, b.sub(i64(T), t0), i64(TP))
            with for_range(b, 0, count, "tl") as tl:  # the input transform
                base = b.gep(xt, [b.mul(_entry(b, at_table, b.add(t0, tl)), i64(C))], source_etype=F32)
                to = b.gep(vp, [b.mul(tl, i64(C))], source_etype=F32)
                _transform_tile(b, f, BT, base, (dy * Wp * C, dx * C), to, TP * C, C)
            with for_range(b, 0, a * a, "p") as p:  # the products
                for jr in range(0, O, nr):
                    bp = b.gep(u, [b.add(b.mul(p, i64(C * On)), i64(jr * C))], source_etype=F32)
                    with for_range(b, 0, count, "ir", step=mr) as ir_:
                        ap = b.gep(vp, [b.add(b.mul(p, i64(TP * C)), b.mul(ir_, i64(C)))], source_etype=F32)
                        cp = b.gep(mp_, [b.add(b.add(b.mul(p, i64(TP * O)), b.mul(ir_, i64(O))), i64(jr))],
                                   source_etype=F32)
                        kern.tile(b, ap, bp, cp, i64(C), ir.Constant(I32, _EPILOGUE), b.sub(count, ir_),
                                  i64(min(nr, O - jr)))
            with for_range(b, 0, count, "tl") as tl:  # the output transform
                t = b.add(t0, tl)
                ty, tx = _entry(b, ty_table, t), _entry(b, tx_table, t)
                at = b.gep(mp_, [b.mul(tl, i64(O))], source_etype=F32)
                inside = [[b.and_(b.icmp_unsigned("<", b.add(ty, i64(r * dy)), i64(OH)),
                                  b.icmp_unsigned("<", b.add(tx, i64(c2 * dx)), i64(OW))) for c2 in range(m)]
                          for r in range(m)]
                to = b.gep(yt, [b.mul(b.add(b.mul(ty, i64(OW)), tx), i64(O))], source_etype=F32)
                with for_range(b, 0, O, "o", step=w) as o:
                    mp = [[f.load(f.at(at, b.add(o, i64((a * i + k) * TP * O)))) for k in range(a)]
                          for i in range(a)]
                    y = _sandwich(b, AT, mp, fconst)
                    for r in range(m):
                        for c2 in range(m):
                            with b.if_then(inside[r][c2]):
                                f.store(y[m * r + c2], f.at(to, b.add(o, i64((r * dy * OW + c2 * dx) * O))))
        b.ret_void()
        return fn
    return mb.helper(("winograd", geom), build)



# The filter gradient by the same tiles: the forward's tile is A^T [U . V] A, linear in U =
# G w G^T, so dw = G^T [sum over tiles (A g A^T) . V] G, with g's m x m tile under the
# output tile and V the input's, transformed as in the forward. Per tile position p that
# sum is a GEMM [O, tiles] x [tiles, C] whose depth is every tile of the images summed:
# panels of tiles from one image or, where an image has fewer, from several. Threads
# share out chunks of images fixed by the batch, as in the flat filter gradient: each
# chunk's sums go through G^T . G into the thread's scratch, and after a barrier each
# element of dw adds its chunks' in order, the same sums on any thread count. Of the GEMM
# rate on Zen 5 (bench_conv.py, batch 64; the direct forms -> F(2x2) everywhere -> the
# rule's tile): 32->32 on 32x32 89% -> 72% -> 190% (F(4x4)), 64->64 on 32x32 88% -> 121%
# -> 199%, 32->64 on 16x16 96% -> 112% -> 150%, 128->128 on 16x16 84% -> 145% -> 168%,
# 64->64 on 8x8 108% -> 116% (F(2x2)), 256->256 on 8x8 93% -> 131%; with AVX2 code
# 74-97% -> 123-205%. Its error, relative to the RMS of dw, 1.2-1.7e-6 (the direct
# forms' 0.3-0.8e-6).
def _winograd_filter_rule(t: Template, target) -> int:
    """As _winograd_forward_rule, for the filter gradient (x's channels in, g's out)."""
    N, C = t.inputs[0].shape[:2]
    _, O, OH, OW = t.inputs[1].shape
    _, _, KH, KW = t.output.shape
    return _winograd_rule(N, C, O, OH, OW, KH, KW, t.attrs["stride"], _dilation(t), target)


def _winograd_filter(mb, em, t: Template, tid, nthreads, m: int) -> None:
    """conv2d_bwd_filter, 3x3 stride 1, by F(m x m, 3 x 3) (see above)."""
    b = em.b
    xb, gb = t.inputs
    N, C, H, W = xb.shape
    _, O, OH, OW = gb.shape
    ph, pw = t.attrs["pad"]
    dy, dx = _dilation(t)
    w = mb.target.vector_width
    BT, G, AT = _WINO[m]
    a2 = len(BT) ** 2
    ys, xs = _winograd_tiles(OH, OW, dy, dx, m)
    T = len(ys) * len(xs)
    Hp = max(H + 2 * ph, max(ys) + (m + 1) * dy + 1)
    Wp = max(W + 2 * pw, max(xs) + (m + 1) * dx + 1)
    Hg, Wg = max(ys) + (m - 1) * dy + 1, max(xs) + (m - 1) * dx + 1  # g's tiles, zeros past OH x OW
    plan = _plan(O, C, T, w)
    per = _cdiv(N, min(N, _FLAT_CHUNKS))  # images per chunk
    chunks = _cdiv(N, per)
    TP = _winograd_panel(T, C, O, plan.mr, a2)
    group = max(1, min(TP // T, per))  # images per panel where one image's tiles leave room
    PT = group * T if T <= TP else TP  # tiles a panel holds
    E = O * 9 * C  # one chunk's sums, [o][tap][c]
    sizes = [Hp * Wp * C, Hg * Wg * O, a2 * PT * C, a2 * PT * O, a2 * O * C, C]
    (Xt, Gc, V, Gp, Macc, row), before = _carve(b, _scratch_base(mb, em), sizes)
    _scratch(mb, em, before + chunks * E)  # then its chunks' sums (maybe every chunk)
    X, Gg, DW = em.pointers[xb.name], em.pointers[gb.name], em.pointers[t.output.name]
    team = em.pointers["__team__"]
    _zero(b, Xt, Hp * Wp * C)
    _zero(b, Gc, Hg * Wg * O)
    f = _Vec(b, w, fused=mb.target.has("fma"))
    transform = _winograd_filter_tiles_fn(mb, (m, C, O, H, W, OH, OW, Hp, Wp, Hg, Wg, ph, pw, dy, dx, PT,
                                               tuple(ys), tuple(xs)))
    lay = _Layout(a_rs=1, a_cs=O, b_rs=C, ldc=C, a_packed=False, b_packed=False)
    kern = _Kernels(mb, plan, lay)
    mr, nr = kern.mr, kern.nr

    def products(depth, first):
        """Macc_p[o, c] (+)= sum over the panel's tiles of Gp_p[tile, o] * V_p[tile, c]."""
        mode = _mode(b, first)
        with for_range(b, 0, a2, "p") as p:
            for jr in range(0, C, nr):
                bp = b.gep(V, [b.add(b.mul(p, i64(PT * C)), i64(jr))], source_etype=F32)
                with for_range(b, 0, O, "ir", step=mr) as ir_:
                    ap = b.gep(Gp, [b.add(b.mul(p, i64(PT * O)), ir_)], source_etype=F32)
                    cp = b.gep(Macc, [b.add(b.mul(p, i64(O * C)), b.add(b.mul(ir_, i64(C)), i64(jr)))],
                               source_etype=F32)
                    kern.tile(b, ap, bp, cp, depth, mode, b.sub(i64(O), ir_), i64(min(nr, C - jr)))

    def image(n, t0, count, slot):
        b.call(transform, [b.gep(X, [b.mul(n, i64(C * H * W))], source_etype=F32),
                           b.gep(Gg, [b.mul(n, i64(O * OH * OW))], source_etype=F32), Xt, Gc, V, Gp,
                           t0, count, slot])

    # the chunks' sums are written through the team's pointer, as the other threads read
    # them (not through the noalias scratch argument)
    mine = b.gep(team_scratch(b, team, b.sext(tid, I64)), [i64(before * 4)], source_etype=I8)
    k_lo, k_hi = split(b, chunks, tid, nthreads)
    with for_range(b, k_lo, k_hi, "chunk") as k:
        n0, n1 = b.mul(k, i64(per)), smin(b, b.mul(b.add(k, i64(1)), i64(per)), i64(N))
        if T > TP:  # panels of one image's tiles
            with for_range(b, n0, n1, "img") as n:
                with for_range(b, 0, T, "t0", step=TP) as t0:
                    count = smin(b, b.sub(i64(T), t0), i64(TP))
                    image(n, t0, count, i64(0))
                    products(count, b.and_(b.icmp_signed("==", n, n0), b.icmp_signed("==", t0, i64(0))))
        else:  # panels of `group` images' tiles
            with for_range(b, n0, n1, "g0", step=group) as g0:
                images = smin(b, b.sub(n1, g0), i64(group))
                with for_range(b, 0, images, "j") as j:
                    image(b.add(g0, j), i64(0), i64(T), b.mul(j, i64(T)))
                products(b.mul(images, i64(T)), b.icmp_signed("==", g0, n0))
        # the chunk's dw^T: G^T Macc G, each o's rows of taps over vectors of c
        sums = b.gep(mine, [b.mul(b.sub(k, k_lo), i64(E))], source_etype=F32)
        GT = tuple(zip(*G))
        const = lambda c: const_vector(F32, [float(c)] * w)  # noqa: E731
        with for_range(b, 0, O, "o") as o:
            with for_range(b, 0, C, "c", step=w) as c:
                at = b.add(b.mul(o, i64(C)), c)
                mp = [[f.load(f.at(Macc, b.add(at, i64((len(BT) * i + j) * O * C)))) for j in range(len(BT))]
                      for i in range(len(BT))]
                for tap, x in enumerate(_sandwich(b, GT, mp, const)):
                    f.store(x, f.at(sums, b.add(b.mul(b.add(b.mul(o, i64(9)), i64(tap)), i64(C)), c)))
    team_barrier(b, team, nthreads)
    # each thread its share of dw's rows (o, tap): the sums over the chunks, in chunk order
    # (thread u's chunks in u's scratch), then dw and the epilogue element by element
    r_lo, r_hi = split(b, O * 9, tid, nthreads)
    with for_range(b, r_lo, r_hi, "r") as r:
        o, tap = b.udiv(r, i64(9)), b.urem(r, i64(9))
        with for_range(b, 0, C, "c", step=w) as c:
            total = _sum_over_chunks(b, team, nthreads, chunks, before * 4, f.zero, lambda sums, k: f.load(
                f.at(sums, b.add(b.mul(k, i64(E)), b.add(b.mul(r, i64(C)), c)))))
            f.store(total, f.at(row, c))
        with for_range(b, 0, C, "c") as c:
            x = b.load(gep(b, row, c, F32), typ=F32, align=4)
            b.store(x, gep(b, DW, b.add(b.mul(b.add(b.mul(o, i64(C)), c), i64(9)), tap), F32), align=4)
            if t.epilogue is not None:
                _filter_epilogue(em, t, o, c, b.udiv(tap, i64(3)), b.urem(tap, i64(3)))
    team_barrier(b, team, nthreads)  # no thread's scratch is reused while others read its sums


def _winograd_filter_tiles_fn(mb, geom: tuple) -> ir.Function:
    """`void tiles(x, g, xt, gc, v, gp, t0, count, slot)`: one image's tiles [t0, t0 +
    count) of _winograd_filter into the panels v (the input's, as the forward's) and gp
    (g's, A g A^T) from tile slot `slot` on, through the channels-last copies xt and gc
    (made when t0 = 0; their borders stay zero)."""
    m, C, O, H, W, OH, OW, Hp, Wp, Hg, Wg, ph, pw, dy, dx, PT, ys, xs = geom
    BT, _, AT = _WINO[m]

    def build():
        w = mb.target.vector_width
        tiles = [(y, x) for y in ys for x in xs]
        fn = ir.Function(mb.module, ir.FunctionType(VOID, [PTR] * 6 + [I64] * 3), name=mb.fresh_name("winograd_dw"))
        set_target(fn, mb.target, w)
        fn.attributes.add("noinline")
        x, g, xt, gc, vp, gp, t0, count, slot = fn.args
        for arg in fn.args[:6]:
            arg.add_attribute("noalias")
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        f = _Vec(b, w, fused=mb.target.has("fma"))
        with b.if_then(b.icmp_signed("==", t0, i64(0))):
            _to_channels_last(b, f, x, xt, C, H, W, Wp, ph, pw)
            _to_channels_last(b, f, g, gc, O, OH, OW, Wg, 0, 0)
        x_at = _i32_table(mb.module, "wat", [y * Wp + x for y, x in tiles])
        g_at = _i32_table(mb.module, "wgat", [y * Wg + x for y, x in tiles])
        A = tuple(zip(*AT))
        with for_range(b, 0, count, "tl") as tl:
            t, s = b.add(t0, tl), b.add(slot, tl)
            _transform_tile(b, f, BT, b.gep(xt, [b.mul(_entry(b, x_at, t), i64(C))], source_etype=F32),
                            (dy * Wp * C, dx * C), b.gep(vp, [b.mul(s, i64(C))], source_etype=F32), PT * C, C)
            _transform_tile(b, f, A, b.gep(gc, [b.mul(_entry(b, g_at, t), i64(O))], source_etype=F32),
                            (dy * Wg * O, dx * O), b.gep(gp, [b.mul(s, i64(O))], source_etype=F32), PT * O, O)
        b.ret_void()
        return fn
    return mb.helper(("winograd_dw", geom), build)


# --------------------------------------------------------------------------- backward data


def _phases(H, W, KH, KW, sy, sx, ph, pw, dy=1, dx=1):
    """Per output phase (ry, rx) of dx: its grid (GH, GW) and taps [(ky, kx, roff, coff)]."""
    out = []
    for ry in range(sy):
        for rx in range(sx):
            GH, GW = _cdiv(H - ry, sy), _cdiv(W - rx, sx)
            if GH <= 0 or GW <= 0:
                continue
            taps = [(ky, kx, (ry + ph - ky * dy) // sy, (rx + pw - kx * dx) // sx)
                    for ky in range(KH) if (ry + ph - ky * dy) % sy == 0
                    for kx in range(KW) if (rx + pw - kx * dx) % sx == 0]
            # in the forward's order (ascending source offsets): a stride-1 layer whose
            # gradient grid has the forward's geometry shares its im2col packer
            taps.sort(key=lambda tap: tap[2:])
            out.append((ry, rx, GH, GW, taps))
    return out


def conv2d_bwd_data(mb, em, t: Template, tid, nthreads) -> None:
    """dx[n,c,iy,ix] = sum over (o, ky, kx) with iy = oy*sy + ky*dy - ph, ix = ox*sx + kx*dx - pw
    of g[n,o,oy,ox] * w[o,c,ky,kx]."""
    b = em.b
    gb, wb = t.inputs
    N, C, H, W = t.output.shape
    O, _, KH, KW = wb.shape
    _, _, OH, OW = gb.shape
    (sy, sx), (ph, pw) = t.attrs["stride"], t.attrs["pad"]
    if (sy, sx) == (1, 1) and _dilation(t) == (1, 1) and H * W >= _COL2IM_GROWTH * OH * OW:
        _bwd_data_col2im(mb, em, t, tid, nthreads)
        return
    if _direct_form([(_winograd_data_rule, _winograd_data), (_planes_data_tile, _planes_data),
                     (_strided_data_positions, _strided_data)],
                    mb, em, t, tid, nthreads):
        return
    v = _V(b, mb.target.vector_width, mb.target.has("fma"))
    G, Wt, DX = em.pointers[gb.name], em.pointers[wb.name], em.pointers[t.output.name]
    T = KH * KW
    strided = (sy, sx) != (1, 1)
    phases = _phases(H, W, KH, KW, sy, sx, ph, pw, *_dilation(t))
    ldq = max(GH * GW for _, _, GH, GW, _ in phases)
    prods = []
    for ry, rx, GH, GW, taps in phases:
        if taps:
            geom = _Geom(O, OH, OW, GH, GW, 1, 1, [(roff, coff) for _, _, roff, coff in taps])
            prods.append(_Product(mb, geom, C, ldq if strided else H * W))
        else:
            prods.append(None)
    live = [p for p in prods if p is not None]
    mr = live[0].mr if live else 1
    sizes = [p.a_floats for p in live] + [max((p.b_floats for p in live), default=0)]
    if strided:
        sizes += [_cdiv(C, mr) * mr * ldq for _ in live]
    pieces, total = _carve(b, _scratch_base(mb, em), sizes)
    _scratch(mb, em, total)
    a_of = {id(p): piece for p, piece in zip(live, pieces)}
    Bp = pieces[len(live)]
    c_of = {id(p): piece for p, piece in zip(live, pieces[len(live) + 1:])}
    for (ry, rx, GH, GW, taps), p in zip(phases, prods):
        if p is None:
            continue

        # A[c, o*taps + j] = w[o, c, ky, kx] for the phase's tap j = (ky, kx)
        p.pack_a(b, a_of[id(p)], Wt, T, C * T, [ky * KW + kx for ky, kx, _, _ in taps])
    n_lo, n_hi, m_lo, m_hi = _share(b, N, C, mr, tid, nthreads)
    prefetch = _prefetches_next(N, O * OH * OW, C * H * W, KH * KW, (sy, sx), (ph, pw))
    with for_range(b, n_lo, n_hi, "img") as n:
        src = b.gep(G, [b.mul(n, i64(O * OH * OW))], source_etype=F32)
        out = b.gep(DX, [b.mul(n, i64(C * H * W))], source_etype=F32)
        for p in live:
            p.run(b, src, a_of[id(p)], Bp, c_of[id(p)] if strided else out, m_lo, m_hi,
                  next_src=b.gep(src, [i64(O * OH * OW)], source_etype=F32) if prefetch else None)
        if strided:
            by_phase = {(ry, rx): (GW, c_of[id(p)] if p is not None else None)
                        for (ry, rx, GH, GW, taps), p in zip(phases, prods)}
            _interleave(b, v, by_phase, out, ldq, C, H, W, sy, sx, m_lo, m_hi)
        _epilogue(em, t, n, (m_lo, m_hi))


# A strided layer's data gradient onto whole vectors of input channels (the residual
# network's 16->32 stride-2 layer: 16) as products per output phase has as many rows as
# channels, and on Intel (Sapphire Rapids class) it reached 59-61% of the GEMM rate: the
# phases' im2col, their interleave into dx and dx's stores after the products. Directly,
# a tile of consecutive positions of one row of dx -- its phases interleaved, each
# position's vector of channels in a register -- sums over every channel of g and the
# taps that reach the position's phase, each element of g broadcast against the tap's
# vector of weights; a transpose turns the tile into rows of dx's channel planes, stored
# in place. Of the GEMM rate: 16->32 on 32x32 59-61% -> 88-90%, 32->64 on 16x16 81% ->
# 104%, 64->128 84% -> 96%. Not for a 1x1 kernel: its gradient is bound by memory (the
# residual network's projection 0.177 -> 0.165 ms), and its tiles cost 10-15 ms of the
# network's compile.
_STRIDED_DATA_POSITIONS = 16  # accumulators per tile: a transpose's worth


def _strided_data_positions(t: Template, target) -> int:
    """Positions per tile of the direct strided data gradient; 0 where it does not
    apply: no AVX-512, stride 1, a 1x1 kernel, input channels not whole vectors, or a
    batch the threads do not split by images."""
    N, C = t.output.shape[:2]
    KH, KW = t.inputs[1].shape[2:]
    w = target.vector_width
    if (w != 16 or tuple(t.attrs["stride"]) == (1, 1) or KH * KW == 1 or C % w
            or N < _IMAGES_ALWAYS_SPLIT):
        return 0
    return _STRIDED_DATA_POSITIONS


def _strided_data(mb, em, t: Template, tid, nthreads, positions: int) -> None:
    """conv2d_bwd_data (see _strided_data_positions) on whole images per thread."""
    b = em.b
    gb, wb = t.inputs
    N, C, H, W = t.output.shape
    O, _, KH, KW = wb.shape
    _, _, OH, OW = gb.shape
    (sy, sx), (ph, pw) = t.attrs["stride"], t.attrs["pad"]
    w = mb.target.vector_width
    v = _Vec(b, w, fused=mb.target.has("fma"))
    T, P = KH * KW, OH * OW
    (Wt, zeros, block), total = _carve(b, _scratch_base(mb, em), [O * T * C, OW, positions * w])
    _scratch(mb, em, total)
    G, Wg, DX = em.pointers[gb.name], em.pointers[wb.name], em.pointers[t.output.name]
    with for_range(b, 0, O * C, "oc") as oc:  # Wt[(o*T + tap)*C + c] = w[o, c, tap]
        o, c = b.udiv(oc, i64(C)), b.urem(oc, i64(C))
        to = b.add(b.mul(o, i64(T * C)), c)
        for tap in range(T):
            x = b.load(gep(b, Wg, b.add(b.mul(oc, i64(T)), i64(tap)), F32), typ=F32, align=4)
            b.store(x, gep(b, Wt, b.add(to, i64(tap * C)), F32), align=4)
    _zero(b, zeros, OW)  # the row a tap row outside g reads
    reach = {(ry, rx): taps for ry, rx, _, _, taps in _phases(H, W, KH, KW, sy, sx, ph, pw)}

    def tile(gimg, out, qy, iy, ry: int, ix0: int, n: int) -> None:
        """dx[:, iy, ix0 : ix0 + n] (iy = qy * sy + ry)."""
        # per position: (tap, row offset in g, column in g) of the taps that reach it
        taps = [[(ky * KW + kx, roff, (ix0 + j) // sx + coff)
                 for ky, kx, roff, coff in reach.get((ry, (ix0 + j) % sx), ())
                 if 0 <= (ix0 + j) // sx + coff < OW] for j in range(n)]
        roffs = sorted({roff for pos in taps for _, roff, _ in pos})
        inside = {roff: b.icmp_unsigned("<", b.add(qy, i64(roff)), i64(OH)) for roff in roffs}
        row_at = {roff: b.mul(b.add(qy, i64(roff)), i64(OW)) for roff in roffs}
        used = sorted({tap for pos in taps for tap, _, _ in pos})
        with for_range(b, 0, C, "cb", step=w) as cb:

            def channel(o, acc):
                plane = b.gep(gimg, [b.mul(o, i64(P))], source_etype=F32)
                rows = {roff: b.select(inside[roff], b.gep(plane, [row_at[roff]], source_etype=F32), zeros)
                        for roff in roffs}
                weights = b.gep(Wt, [b.add(b.mul(o, i64(T * C)), cb)], source_etype=F32)
                wv = {tap: v.load(v.at(weights, tap * C)) for tap in used}
                acc = list(acc)
                for j, pos in enumerate(taps):
                    for tap, roff, col in pos:
                        pixel = b.load(gep(b, rows[roff], i64(col), F32), typ=F32, align=4)
                        acc[j] = v.fma(v.splat(pixel), wv[tap], acc[j])
                return acc
            acc = loop(b, 0, O, [v.zero] * n, channel, name="o")
            for j in range(n):
                v.store(acc[j], v.at(block, j * w))
            row = b.gep(out, [b.add(b.mul(cb, i64(H * W)), b.add(b.mul(iy, i64(W)), i64(ix0)))], source_etype=F32)
            b.call(_transpose_store_fn(mb, n), [block, row, i64(H * W)])

    n_lo, n_hi = split(b, N, tid, nthreads)
    with for_range(b, n_lo, n_hi, "img") as n:
        gimg = b.gep(G, [b.mul(n, i64(O * P))], source_etype=F32)
        out = b.gep(DX, [b.mul(n, i64(C * H * W))], source_etype=F32)
        for ry in range(min(sy, H)):
            with for_range(b, 0, _cdiv(H - ry, sy), "qy") as qy:
                iy = b.add(b.mul(qy, i64(sy)), i64(ry))
                for ix0 in range(0, W, positions):
                    tile(gimg, out, qy, iy, ry, ix0, min(positions, W - ix0))
        _epilogue(em, t, n, (i64(0), i64(C)))


def _transpose_store_fn(mb, n: int) -> ir.Function:
    """`void f(block, out, i64 ld)`: the n vectors at block (position j's W channels at
    block + j*W) transposed, channel c's n positions stored at out + c*ld. One function
    per n for the whole build: written out at every tile, the transposes were most of
    the strided data gradients' compile time."""
    def build():
        w = mb.target.vector_width
        fn = ir.Function(mb.module, ir.FunctionType(VOID, [PTR, PTR, I64]), name=mb.fresh_name("transpose"))
        set_target(fn, mb.target, w)
        fn.attributes.add("noinline")
        block, out, ld = fn.args
        for arg in (block, out):
            arg.add_attribute("noalias")
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        v = _Vec(b, w)
        planes = v.transpose([v.load(v.at(block, j * w)) for j in range(n)] + [v.zero] * (w - n))
        mask = None if n == w else const_vector(I1, [lane < n for lane in range(w)])
        for c in range(w):
            v.store(planes[c], v.at(out, b.mul(ld, i64(c))), mask)
        b.ret_void()
        return fn
    return mb.helper(("transpose_store", n), build)


# A layer whose input is much larger than its output (LeNet's unpadded 5x5 layers: 14x14
# -> 10x10) has a data gradient that, as a correlation over g, reads g padded by the
# kernel on every side: at 10x10 half the products are with zeros, and with few input
# channels the GEMM has as few rows (6: register tiles 3/4 full). Scattered instead,
# cols = w^T g has a row per (input channel, tap) and a column per position of g:
# half the products, 150 rows, and g is the GEMM's B as it is (no im2col); each tap's
# rows are then added into dx at the tap's offset (col2im).
_COL2IM_GROWTH = 1.5  # dx at least this many times larger than g (per channel)


# The cols block of one item is written by the GEMM and read back by the col2im: it
# should stay in L1 between the two (32 KiB: the smallest L1d of the x86 parts we target).
# With AVX2 (and taps with no divisor from 2 to 8), an item is a group of MR channels.
# Where a row of g's positions fits one register tile with room for two or more rows,
# tiles span it whole (LeNet's 10x10: 7 vectors; as 8 x 1-vector tiles, 100 of 112
# columns but every A element broadcast for one FMA) and as many rows as keep the block
# in L1. Measured on Zen 5, LeNet's 6->16 data gradient: 0.137 ms -> 0.103 ms (3 x 7
# tiles, 30 KB blocks); 4 x 7 (40 KB) 0.135 ms, 2 x 7 0.107 ms. With AVX2 (13 vectors)
# the GEMM's own plan stays: 3 x 2 and 3 x 4 were slower than its 6 x 2.
_COL2IM_L1_BYTES = 32 << 10
# Where g's planes are not whole vectors (LeNet's 10x10: 100 positions), the product
# reads g from a copy whose rows are padded to whole vectors (112) and writes cols' rows
# at that stride: every B load and C store of the register tiles is then aligned, and
# on this Intel machine type (Sapphire Rapids class) a 64-byte load at an unaligned
# address reads two cache lines. LeNet's 6->16 data gradient, of the GEMM rate: 58-60%
# -> 65-67% (the product alone 69% -> 85%; the rest is the col2im, whose taps' loads are
# shifted by the taps and stay unaligned); with AVX2 45% either way; LeNet-5's step 1-2%
# faster. Copied once per image, not per item, and without the C tiles' prefetches
# (below): 66-67% -> 69-71% (twenty-fifth session).
# With AVX-512, an item is one input channel: its T rows of cols are register tiles of
# MR rows (a divisor of T) by up to _COL2IM_ACCUMULATORS // MR vectors, the tiling with
# the fewest loads per multiply-add (LeNet's 25 taps: 5 x 4), and its block of cols (11
# KB for LeNet) stays in L1 beside g's copy and the weights. The last column of tiles is
# a copy of its own, its width a constant (in the loop over columns, its masks made at
# run time cost 10-15%). On this Intel machine type (twenty-sixth session), of the GEMM
# rate, three channels (75 rows) in 3 x 7 tiles -> one channel in 5 x 4 tiles: LeNet's
# 6->16 data gradient 69-70% -> 74-75% (5 x 5 tiles 60-66%); an unpadded 5x5 layer on
# 12x12 (five channels an item before) 74% -> 77-78%; a 7x7 layer on 24x24 (whose
# block, 66 KB, is past L1 either way) 51% -> 53-55%. LeNet-5's training step within
# 1-2% either way. Products spanning two images' positions (LeNet's 208 lanes for 200,
# not 224) measured the same on two threads and 2% faster on one: not kept.
_COL2IM_ACCUMULATORS = 21  # a tile's at most


def _col2im_tile(M: int, P: int, K: int, T: int, w: int) -> tuple[int, int]:
    """(MR, vectors) of the cols = w^T g register tiles (M rows, P columns, depth K) of
    a layer with T taps."""
    nv = _cdiv(P, w)
    most = _MAX_ACCUMULATORS[w]
    if 2 * nv > most:
        p0 = plan_gemm(GemmSpec(M, P, K), w, 1)
        return p0.mr, p0.nv
    return max(1, min(most // nv, _COL2IM_L1_BYTES // (4 * T * P))), nv


def _col2im_plan(C: int, T: int, P: int, O: int, w: int) -> tuple[int, int, int]:
    """(MR, vectors, input channels an item takes) of the cols = w^T g products of a
    layer with C input channels, T taps, P positions of g and O channels of g (see
    above)."""
    V = _cdiv(P, w)
    tiles = [((mr + nv) / (mr * nv), mr, nv) for mr in range(2, 9) if T % mr == 0
             for nv in [min(V, _COL2IM_ACCUMULATORS // mr)]]
    if w != 16 or not tiles:
        mr, nv = _col2im_tile(C * T, P, O, T, w)
        return mr, nv, mr
    _, mr, nv = min(tiles)
    return mr, nv, 1


def _bwd_data_col2im(mb, em, t: Template, tid, nthreads) -> None:
    """conv2d_bwd_data (stride 1) as cols = w^T g per image, then col2im. Threads share
    out (image, group of input channels) items (_col2im_plan): a group's rows are whole
    register tiles, and its channels of dx are the thread's alone (their epilogue too)."""
    b = em.b
    gb, wb = t.inputs
    N, C, H, W = t.output.shape
    O, _, KH, KW = wb.shape
    _, _, OH, OW = gb.shape
    ph, pw = t.attrs["pad"]
    w = mb.target.vector_width
    T, P = KH * KW, OH * OW
    mr, nv, cg = _col2im_plan(C, T, P, O, w)
    PS = _cdiv(P, w) * w  # g's rows in the product, and cols', padded to whole vectors (see above)
    nr = nv * w
    # cols is this thread's scratch, rewritten every item: in L1 already, where the C
    # tiles' prefetches only took load slots (21 a tile of 336 multiply-adds)
    plan = GemmPlan(mr=mr, nv=nv, kc=0, mc=0, nc=0, pack_a=True, pack_b=False, split="n", prefetch_c=False)
    kern = _Kernels(mb, plan, _Layout(a_rs=1, a_cs=mr, b_rs=PS, ldc=PS, a_packed=True, b_packed=False),
                    inline=free_masks(mb.target))
    Mp = _cdiv(C * T, mr) * mr
    group = cg * T  # rows of one item's channels
    (Ap, cols, Gs), total = _carve(b, _scratch_base(mb, em), [Mp * O, group * PS, O * PS if PS != P else 0])
    _scratch(mb, em, total)
    G, Wt, DX = em.pointers[gb.name], em.pointers[wb.name], em.pointers[t.output.name]
    # A[c*T + tap, o] = w[o, c, tap]
    b.call(_pack_weights_fn(mb, mr), [Wt, Ap, i64(C * T), i64(O), i64(O), i64(1), i64(1), i64(C * T),
                                      _i32_table(mb.module, "taps", [0])])
    v = _V(b, w, mb.target.has("fma"))
    if PS != P:
        # the rows' tails: their columns of cols are never read, but zeros keep whatever
        # the scratch held out of the multiply-adds (a denormal is slow where the step
        # does not flush them: not on x86)
        _zero(b, Gs, O * PS)
    groups = _cdiv(C, cg)
    lo, hi = split(b, N * groups, tid, nthreads)
    with for_range(b, lo, hi, "item") as item:
        n, q = b.udiv(item, i64(groups)), b.urem(item, i64(groups))
        c_lo = b.mul(q, i64(cg))
        c_hi = smin(b, b.add(c_lo, i64(cg)), i64(C))
        r_lo, r_hi = b.mul(c_lo, i64(T)), b.mul(c_hi, i64(T))
        gimg = b.gep(G, [b.mul(n, i64(O * P))], source_etype=F32)
        if PS != P:  # each channel of g a row of PS: once per image (a thread's items of
            # an image follow each other)
            with b.if_then(b.or_(b.icmp_signed("==", q, i64(0)), b.icmp_signed("==", item, lo))):
                _copy_padded(b, v.f, gimg, Gs, O, 1, P, 0, 0, Wp=PS)
            gimg = Gs
        # one K block of all O channels (a layer this path takes has few: LeNet's 16)

        def tiles(jr, ncols: int) -> None:  # a column of register tiles, ncols wide
            bp = b.gep(gimg, [jr], source_etype=F32)
            with for_range(b, r_lo, r_hi, "ir", step=mr) as ir_:
                ap = b.gep(Ap, [b.mul(ir_, i64(O))], source_etype=F32)
                cp = b.gep(cols, [b.add(b.mul(b.sub(ir_, r_lo), i64(PS)), jr)], source_etype=F32)
                rows = i64(mr) if C % cg == 0 else b.sub(r_hi, ir_)  # whole tiles: a constant
                kern.tile(b, ap, bp, cp, i64(O), ir.Constant(I32, _EPILOGUE), rows, i64(ncols))
        whole = PS // nr * nr  # the last column's width a constant too (see above)
        if whole:
            with for_range(b, 0, whole, "jr", step=nr) as jr:
                tiles(jr, nr)
        if whole < PS:
            tiles(i64(whole), PS - whole)
        with for_range(b, c_lo, c_hi, "c") as c:
            plane = b.gep(DX, [b.mul(b.add(b.mul(n, i64(C)), c), i64(H * W))], source_etype=F32)
            _col2im_channel(b, v, plane, b.gep(cols, [b.mul(b.sub(c, c_lo), i64(T * PS))], source_etype=F32),
                            PS, H, W, OH, OW, KH, KW, ph, pw)
        _epilogue(em, t, n, (c_lo, c_hi))


# A plane whose col2im takes at most this many tap loads is written out load by load:
# every tap range, offset and mask a constant (the loops' tap counts change from row to
# row). LeNet's 14x14 planes, 350 loads with AVX-512: on Zen 5 its 6->16 data gradient's
# col2im took 0.019 -> 0.011 ms, and with the product's kernel inlined (constant depth,
# rows and column masks; no call per 3 x 7 tile of 16 steps) the row 0.098-0.107 ->
# 0.085 ms, 58-62% -> 72-73% of the GEMM rate.
_COL2IM_UNROLLED_LOADS = 1024


def _col2im_unrolled(H: int, W: int, KH: int, KW: int, w: int) -> bool:
    """Written out: planes whose rows fit one vector, on AVX-512 (with AVX2, LeNet's
    rows take two vectors, and written out they ran no faster)."""
    return w == 16 and W <= w and H * KH * KW <= _COL2IM_UNROLLED_LOADS


def _col2im_channel(b, v: _V, plane, rows, rs, H, W, OH, OW, KH, KW, ph, pw) -> None:
    """plane[iy, ix] = sum over taps (ky, kx) of rows[ky*KW + kx][oy*OW + ox] (rows rs
    floats apart) where iy = oy + ky - ph and ix = ox + kx - pw: per vector of a plane
    row, the taps' shifted rows summed in a register and stored once. (Adding each
    tap's rows into the plane instead made every tap's masked load wait for the previous
    tap's masked store to the same addresses: the col2im took twice the GEMM's time.)"""
    f, w = v.f, v.w
    if _col2im_unrolled(H, W, KH, KW, w):
        in_row = [lane < W for lane in range(w)]
        for iy in range(H):
            acc = f.zero
            for ky in range(max(0, iy + ph - (OH - 1)), min(KH, iy + ph + 1)):  # 0 <= oy < OH
                for kx in range(KW):
                    ok = [lane_in and 0 <= pw - kx + lane < OW for lane, lane_in in enumerate(in_row)]
                    if any(ok):  # lane l reads ox = pw - kx + l
                        at = (ky * KW + kx) * rs + (iy + ph - ky) * OW + pw - kx
                        acc = b.fadd(acc, f.load(f.at(rows, i64(at)), _lanes(f, ok)))
            f.store(acc, f.at(plane, i64(iy * W)), _lanes(f, in_row))
        return
    with for_range(b, 0, H, "iy") as iy:
        ky_lo = smax(b, i64(0), b.sub(b.add(iy, i64(ph)), i64(OH - 1)))  # 0 <= oy = iy + ph - ky < OH
        ky_hi = smin(b, i64(KH), b.add(b.add(iy, i64(ph)), i64(1)))
        with for_range(b, 0, W, "ix", step=v.w) as ix:
            in_row = v.below(b.add(v.isplat(ix), v.lanes), W)

            def tap_row(ky, acc):
                oy = b.sub(b.add(iy, i64(ph)), ky)

                def tap(kx, acc):
                    ox0 = b.sub(b.add(ix, i64(pw)), kx)  # lane l reads ox = ox0 + l
                    ok = b.and_(in_row, v.below(b.add(v.isplat(ox0), v.lanes), OW))
                    at = b.add(b.mul(b.add(b.mul(ky, i64(KW)), kx), i64(rs)), b.add(b.mul(oy, i64(OW)), ox0))
                    return [b.fadd(acc[0], f.load(f.at(rows, at), ok))]
                return loop(b, 0, KW, acc, tap, "kx")
            [acc] = loop(b, ky_lo, ky_hi, [f.zero], tap_row, "ky")
            f.store(acc, f.at(plane, b.add(b.mul(iy, i64(W)), ix)), in_row)


def _lanes(f: _Vec, on: list):
    """A constant mask (None where every lane is on)."""
    return None if all(on) else const_vector(I1, on)


# The interleave prefetches dx's rows for writing this many rows of phases before it
# writes them: a strided data gradient's interleave stores the whole of dx (mostly zeros
# for a 1x1 stride-2 projection) and waited on each line's read for ownership. The residual network's
# 16->32 projection 182-194 -> 171-177 us (of its roofline 69% -> 73-75%); its training
# step 0.99-1.00 of before; with AVX2 its strided 3x3 layer 62% -> 64% of the GEMM rate.
_INTERLEAVE_PREFETCH_ROWS = 4


def _interleave(b, v: _V, by_phase, out, ldq, C, H, W, sy, sx, c_lo, c_hi):
    """dx[c, ry + sy*qy, rx + sx*qx] = phase (ry, rx)[c, qy*GW + qx] for channels [c_lo,
    c_hi) of one image (zeros for a phase no tap reaches); stride 2 along x interleaves
    two phase rows with vector shuffles."""
    f, w = v.f, v.w
    zero = ir.Constant(F32, 0.0)
    lo_idx = const_vector(I32, [j // 2 + (w if j % 2 else 0) for j in range(w)])
    hi_idx = const_vector(I32, [w // 2 + j // 2 + (w if j % 2 else 0) for j in range(w)])
    with for_range(b, c_lo, c_hi, "c") as c:
        for ry in range(sy):
            GH = _cdiv(H - ry, sy)
            if GH <= 0:
                continue
            with for_range(b, 0, GH, "qy") as qy:
                drow = b.gep(out, [b.add(b.mul(c, i64(H * W)), b.mul(b.add(b.mul(qy, i64(sy)), i64(ry)), i64(W)))],
                             source_etype=F32)
                for line in range(0, W, 16):  # past the plane's end: a prefetch does not fault
                    v.f.prefetch(gep(b, drow, i64(_INTERLEAVE_PREFETCH_ROWS * sy * W + line), F32), write=True)

                def qrow(rx):
                    GW, buf = by_phase.get((ry, rx), (0, None))
                    if buf is None:
                        return GW, None
                    return GW, b.gep(buf, [b.add(b.mul(c, i64(ldq)), b.mul(qy, i64(GW)))], source_etype=F32)
                if sx == 2:
                    # the row written out: every column offset and mask a constant
                    rows = [qrow(0), qrow(1)]
                    for ix0 in range(0, W, 2 * w):
                        qx0 = ix0 // 2
                        halves = [f.zero if row is None else
                                  f.load(gep(b, row, i64(qx0), F32), _lanes(f, [qx0 + j < GW for j in range(w)]))
                                  for GW, row in rows]
                        for h, idx in enumerate((lo_idx, hi_idx)):
                            at = ix0 + h * w
                            if at < W:
                                f.store(b.shuffle_vector(halves[0], halves[1], idx), gep(b, drow, i64(at), F32),
                                        _lanes(f, [at + j < W for j in range(w)]))
                else:
                    for rx in range(sx):
                        GW, row = qrow(rx)
                        GWx = _cdiv(W - rx, sx)
                        if GWx <= 0:
                            continue
                        with for_range(b, 0, GWx, "qx") as qx:
                            val = zero if row is None else b.load(b.gep(row, [qx], source_etype=F32), typ=F32, align=4)
                            b.store(val, b.gep(drow, [b.add(b.mul(qx, i64(sx)), i64(rx))], source_etype=F32), align=4)


# --------------------------------------------------------------------------- backward filter


def conv2d_bwd_filter(mb, em, t: Template, tid, nthreads) -> None:
    """dw[o,c,ky,kx] = sum_{n,oy,ox} g[n,o,oy,ox] * x[n,c,oy*sy+ky*dy-ph, ox*sx+kx*dx-pw]."""
    if _direct_form([(_winograd_filter_rule, _winograd_filter), (_flat_filter_taps, _flat_filter_gradient),
                     (_vector_filter_tile, _vector_filter_gradient),
                     (_window_channels, _window_filter_gradient), (_direct_channels, _direct_filter_gradient)],
                    mb, em, t, tid, nthreads):
        return
    b = em.b
    xb, gb = t.inputs
    N, C, H, W = xb.shape
    _, O, OH, OW = gb.shape
    O, C, KH, KW = t.output.shape
    (sy, sx), (ph, pw) = t.attrs["stride"], t.attrs["pad"]
    w = mb.target.vector_width
    g = _Geom(C, H, W, OH, OW, sy, sx, _taps(KH, KW, (ph, pw), _dilation(t)))
    K, P = g.K, g.P
    p0 = plan_gemm(GemmSpec(K, O, P), w, 1)
    mr, nv = p0.mr, p0.nv
    nr = nv * w
    kc = min(_cdiv(P, w) * w, _KC[w] // w * w)      # positions per block (the GEMM's K)
    # im2col rows a multiple of 128 bytes apart share a few L1 sets (256 positions: 1 KiB,
    # 4 of 64 sets for a thread's 72 rows): an odd number of cache lines apart they spread
    # over every set (the residual network's filter gradients 5-15% faster)
    ars = kc + w if (kc // w) % 2 == 0 else kc
    plan = GemmPlan(mr=mr, nv=nv, kc=kc, mc=0, nc=0, pack_a=False, pack_b=True, split="m")
    lay = _Layout(a_rs=ars, a_cs=1, b_rs=nr, ldc=O, a_packed=False, b_packed=True)
    kern = _Kernels(mb, plan, lay)
    # rows of dw^T (k = c*T + tap) shared out in MR units
    units = _cdiv(K, mr)
    rows_max = _cdiv(units, 1) * mr  # a thread may get every unit (one thread)
    pack_b = _pack_b_fn(mb, True)
    im2col = _im2col_fn(mb, g, ars)
    Op = _cdiv(O, nr) * nr
    (Arows, Bp, DWt), total = _carve(b, _scratch_base(mb, em), [rows_max * ars, kc * Op, rows_max * O])
    _scratch(mb, em, total)
    X, G = em.pointers[xb.name], em.pointers[gb.name]
    u0, u1 = split(b, units, tid, nthreads)
    k_lo, k_hi = b.mul(u0, i64(mr)), smin(b, b.mul(u1, i64(mr)), i64(K))
    rows = b.sub(k_hi, k_lo)
    nonempty = b.icmp_signed("<", k_lo, k_hi)
    with b.if_then(nonempty):
        with for_range(b, 0, N, "img") as n:
            src = b.gep(X, [b.mul(n, i64(C * H * W))], source_etype=F32)
            gimg = b.gep(G, [b.mul(n, i64(O * P))], source_etype=F32)
            with for_range(b, 0, P, "pb", step=kc) as pb:
                pcur = smin(b, b.sub(i64(P), pb), i64(kc))
                b.call(im2col, [src, Arows, k_lo, k_hi, pb, pcur, i64(1), i64(w)])
                b.call(pack_b, [gimg, Bp, i64(P), pb, pcur, i64(0), i64(O), i64(nr)])
                first = b.and_(b.icmp_signed("==", n, i64(0)), b.icmp_signed("==", pb, i64(0)))
                mode = _mode(b, first)
                with for_range(b, 0, O, "jr", step=nr) as jr:
                    bp = b.gep(Bp, [b.mul(jr, pcur)], source_etype=F32)
                    with for_range(b, 0, rows, "ir", step=mr) as ir_:
                        ap = b.gep(Arows, [b.mul(ir_, i64(ars))], source_etype=F32)
                        cp = b.gep(DWt, [b.add(b.mul(ir_, i64(O)), jr)], source_etype=F32)
                        kern.tile(b, ap, bp, cp, pcur, mode, b.sub(rows, ir_), b.sub(i64(O), jr))
        _store_transposed_filter(em, t, DWt, k_lo, k_hi)


def _store_transposed_filter(em, t: Template, DWt, k_lo, k_hi, o_lo=None, o_hi=None, ld=None) -> None:
    """dw[o, k] = DWt[(k - k_lo) * ld + o - o_lo] for rows [k_lo, k_hi) of dw^T and its
    columns [o_lo, o_hi) (by default all O, ld = O), and the epilogue there: along k, dw
    and the optimizer's state are contiguous (one strided read of dw^T)."""
    b = em.b
    O, C, KH, KW = t.output.shape
    K, T = C * KH * KW, KH * KW
    if o_lo is None:
        o_lo, o_hi, ld = i64(0), i64(O), O
    DW = em.pointers[t.output.name]
    with for_range(b, o_lo, o_hi, "o") as o:
        with for_range(b, k_lo, k_hi, "k") as k:
            x = b.load(gep(b, DWt, b.add(b.mul(b.sub(k, k_lo), i64(ld)), b.sub(o, o_lo)), F32), typ=F32, align=4)
            b.store(x, gep(b, DW, b.add(b.mul(o, i64(K)), k), F32), align=4)
            if t.epilogue is not None:
                c, tap = b.udiv(k, i64(T)), b.urem(k, i64(T))
                _filter_epilogue(em, t, o, c, b.udiv(tap, i64(KW)), b.urem(tap, i64(KW)))


# A filter gradient over vectors of 16 output channels (AVX-512): as a GEMM
# dw^T = col(x) g^T it broadcasts every im2col element for one multiply-add, after
# packing it; directly over output rows (below) LeNet's 6->16 on 10-wide rows leaves 3/8
# of the lanes idle. Here each position's 16 channels of g are one vector (g transposed
# per image, 16x16 blocks at a time) and a tile of (input channels x taps) accumulators
# broadcasts x from the image itself at offsets fixed by the tap: no im2col, every
# lane used. Measured on Zen 5, of the GEMM rate: LeNet's 6->16 58% (over rows) -> 90%;
# the 1x1 64->64 layer on 16x16 (which the form over rows does not take) 70% as a GEMM
# -> 80%; the residual network's 16->32 stride 2 72% -> 74%. But 16->16 on 32-wide rows
# (which the form over rows fills) 94% over rows -> 78%; and 128 or 256 channels (1x1,
# or 3x3 on 8x8) within 3% of the GEMM either way, which keeps them.
_VECTOR_FILTER_ACCUMULATORS = 28
_VECTOR_FILTER_MAX_C = 64
# Tiles of two vectors of output channels: every x element broadcast serves both, so a
# position costs T*CB broadcasts and 2 loads of g for 2*T*CB multiply-adds instead of
# T*CB + 1 for T*CB. Of the GEMM rate on Intel (Sapphire Rapids class), one vector -> two:
# the 1x1 64->64 layer 60% -> 72-74% (16 -> 8 channels a tile), the residual network's
# strided 16->32 83-86% -> 88-89% (2 -> 1), 64->64 on 8x8 98-99% -> 109-110% (2 -> 1).
# Four vectors (1x1, 4 channels a tile) measured 62-63%: the tile's rows of g^T no
# longer fit L1. Prefetching the next image into L2 (below) then took the 1x1 layer to
# 77-80% (it was 72-74%: every thread reads all of x from memory as it goes); the 1x1
# stride-2 projection, whose taps read a quarter of x, lost 6-10% to it and does not.
_VECTOR_FILTER_MAX_VECTORS = 2
_LINE_FLOATS = 16  # floats in a 64-byte cache line


def _vector_filter_tile(t: Template, target) -> tuple[int, int] | int:
    """(input channels, vectors of output channels) per tile of the vector-of-channels
    filter gradient: of 1 or 2 vectors (dividing O's), the tiling with the fewest loads
    per multiply-add (1/vectors + 1/(channels * taps); one vector on a tie), each with
    the largest divisor of C whose taps fit _VECTOR_FILTER_ACCUMULATORS. 0 where it
    does not apply: no AVX-512, output channels not whole vectors, more than
    _VECTOR_FILTER_MAX_C input channels, more taps than accumulators, or where the form
    over rows applies and fills the vectors (stride 1, a kernel wider than 1, output
    rows that fill _DIRECT_LANES of their vectors)."""
    O, C, KH, KW = t.output.shape
    OW = t.inputs[1].shape[3]
    w = target.vector_width
    T = KH * KW
    rows_fill = (OW / (_cdiv(OW, w) * w) >= _DIRECT_LANES and tuple(t.attrs["stride"]) == (1, 1)
                 and KW > 1)
    if w != 16 or O % w or C > _VECTOR_FILTER_MAX_C or T > _VECTOR_FILTER_ACCUMULATORS or rows_fill:
        return 0
    tiles = []
    for vectors in range(1, _VECTOR_FILTER_MAX_VECTORS + 1):
        most = _VECTOR_FILTER_ACCUMULATORS // (T * vectors)
        if (O // w) % vectors == 0 and most >= 1:
            cb = max(cb for cb in range(1, most + 1) if C % cb == 0)
            tiles.append((1 / vectors + 1 / (cb * T), vectors, cb))
    _, vectors, cb = min(tiles)
    return cb, vectors


def _vector_filter_gradient(mb, em, t: Template, tid, nthreads, tile: tuple[int, int]) -> None:
    """conv2d_bwd_filter (see _vector_filter_tile): threads share out tiles of OBV
    vectors of output channels by CB input channels (a block of dw^T), each summed over
    every image; tiles run block-major, so a thread packs g^T for its blocks only.

    x is read in place, padding included: a tap row above or below the image reads a row
    of zeros instead (a pointer chosen per output row), and the positions whose taps
    leave the row at either end are written out one by one with those taps left out.
    (Copying each image into zero-padded planes, as this form first did, took a third
    of the residual network's strided 16->32 layer on Intel: 57% -> 89% of the GEMM
    rate without it, where every thread copied the whole image for its tiles.)"""
    b = em.b
    xb, gb = t.inputs
    N, C, H, W = xb.shape
    _, O, OH, OW = gb.shape
    _, _, KH, KW = t.output.shape
    (sy, sx), (ph, pw) = t.attrs["stride"], t.attrs["pad"]
    w = mb.target.vector_width
    v = _Vec(b, w, fused=mb.target.has("fma"))
    T, P = KH * KW, OH * OW
    CB, OBV = tile
    per_block = C // CB  # tiles per OBV vectors of output channels
    tiles = O // w // OBV * per_block
    nacc = OBV * CB * T
    (gT, zeros, DWt), total = _carve(b, _scratch_base(mb, em), [P * O, W, tiles * nacc * w])
    _scratch(mb, em, total)
    X, G = em.pointers[xb.name], em.pointers[gb.name]
    lo, hi = split(b, tiles, tid, nthreads)
    block_lo = b.mul(b.udiv(lo, i64(per_block)), i64(OBV))
    block_hi = b.mul(b.udiv(b.add(hi, i64(per_block - 1)), i64(per_block)), i64(OBV))

    def tile_at(ti):
        """(the tile's accumulators, its first row of dw^T, its first output channel)."""
        return (v.at(DWt, b.mul(ti, i64(nacc * w))), b.mul(b.urem(ti, i64(per_block)), i64(CB * T)),
                b.mul(b.udiv(ti, i64(per_block)), i64(OBV * w)))
    with for_range(b, b.mul(lo, i64(nacc)), b.mul(hi, i64(nacc)), "a") as a:
        v.store(v.zero, v.at(DWt, b.mul(a, i64(w))))
    _zero(b, zeros, W)
    pack_gT = _pack_b_fn(mb, True)
    # the output positions whose taps all lie inside the row: a loop; the others each
    # with the taps that do
    inside = [ox for ox in range(OW) if 0 <= ox * sx - pw and (ox * sx + KW - 1 - pw) < W]
    ox_lo, ox_hi = (inside[0], inside[-1] + 1) if inside else (0, 0)
    # tap rows that lie inside the image at every output row need no choice of pointer
    rows_inside = {ky for ky in range(KH) if 0 <= ky - ph and (OH - 1) * sy + ky - ph < H}
    nonempty = b.icmp_signed("<", lo, hi)
    with b.if_then(nonempty):
        o_lo = b.mul(block_lo, i64(w))
        # the next image's x and this thread's g are prefetched into L2 while this one is
        # summed, a share of their cache lines at each output row of each tile: where the
        # inputs do not stay in L2 from call to call and the taps read all of x
        prefetch = 4 * N * (C * H * W + O * P) > _L2_BYTES and KH >= sy and KW >= sx
        if prefetch:
            out_rows = b.mul(b.sub(hi, lo), i64(OH))
            g_floats = b.mul(b.sub(block_hi, block_lo), i64(w * P))  # of g, this thread's blocks
            shares = [b.udiv(b.add(lines, b.sub(out_rows, i64(1))), out_rows)
                      for lines in (i64(_cdiv(C * H * W, _LINE_FLOATS)), b.udiv(g_floats, i64(_LINE_FLOATS)))]
        with for_range(b, 0, N, "img") as n:
            gimg = b.gep(G, [b.mul(n, i64(O * P))], source_etype=F32)
            # gT[block q][p, o] = g[q*w + o, p], this thread's blocks only
            b.call(pack_gT, [gimg, v.at(gT, b.mul(o_lo, i64(P))), i64(P), i64(0), i64(P), o_lo,
                             b.mul(b.sub(block_hi, block_lo), i64(w)), i64(w)])
            src = b.gep(X, [b.mul(n, i64(C * H * W))], source_etype=F32)
            if prefetch:
                last = b.icmp_signed("==", n, i64(N - 1))
                nexts = [b.gep(src, [i64(C * H * W)], source_etype=F32),
                         b.gep(gimg, [b.add(i64(O * P), b.mul(o_lo, i64(P)))], source_etype=F32)]
            with for_range(b, lo, hi, "tile") as ti:
                at, k0, o0 = tile_at(ti)
                plane0 = b.gep(src, [b.mul(b.udiv(k0, i64(T)), i64(H * W))], source_etype=F32)
                gblock = v.at(gT, b.mul(o0, i64(P)))

                def out_row(oy, acc):
                    if prefetch:
                        with b.if_then(b.not_(last)):
                            k = b.add(b.mul(b.sub(ti, lo), i64(OH)), oy)  # this output row's share
                            for base, share in zip(nexts, shares):
                                with for_range(b, b.mul(k, share), b.mul(b.add(k, i64(1)), share), "line") as line:
                                    v.prefetch(b.gep(base, [b.mul(line, i64(_LINE_FLOATS))], source_etype=F32),
                                               False, 2)
                    rows = {}  # (cc, ky) -> x's row of that channel and tap row, or the zeros
                    for cc in range(CB):
                        for ky in range(KH):
                            y = b.add(b.mul(oy, i64(sy)), i64(ky - ph))
                            row = b.gep(plane0, [b.add(b.mul(y, i64(W)), i64(cc * H * W))], source_etype=F32)
                            if ky not in rows_inside:
                                row = b.select(b.icmp_unsigned("<", y, i64(H)), row, zeros)
                            rows[cc, ky] = row
                    grow = v.at(gblock, b.mul(oy, i64(OW * w)))

                    def position(ox, acc, taps=range(KW)):
                        gv = [v.load(v.at(grow, b.add(b.mul(ox, i64(w)), i64(i * w * P)))) for i in range(OBV)]
                        col = b.mul(ox, i64(sx))
                        acc = list(acc)
                        for cc in range(CB):
                            for ky in range(KH):
                                base = b.gep(rows[cc, ky], [col], source_etype=F32)
                                for kx in taps:
                                    a = (cc * KH + ky) * KW + kx
                                    x = v.splat(b.load(gep(b, base, i64(kx - pw), F32), typ=F32, align=4))
                                    for i in range(OBV):
                                        acc[i * CB * T + a] = v.fma(x, gv[i], acc[i * CB * T + a])
                        return acc

                    def edge(ox, acc):
                        return position(i64(ox), acc, [kx for kx in range(KW) if 0 <= ox * sx + kx - pw < W])
                    for ox in range(ox_lo):
                        acc = edge(ox, acc)
                    acc = loop(b, ox_lo, ox_hi, acc, position, name="ox")
                    for ox in range(ox_hi, OW):
                        acc = edge(ox, acc)
                    return acc
                acc = loop(b, 0, OH, [v.load(v.at(at, a * w)) for a in range(nacc)], out_row, name="oy")
                for a in range(nacc):
                    v.store(acc[a], v.at(at, a * w))
        with for_range(b, lo, hi, "tile") as ti:
            at, k0, o0 = tile_at(ti)
            for i in range(OBV):
                oi = b.add(o0, i64(i * w))
                _store_transposed_filter(em, t, v.at(at, i * CB * T * w), k0, b.add(k0, i64(CB * T)), oi,
                                         b.add(oi, i64(w)), w)


def _filter_epilogue(em, t: Template, o, c, ky, kx) -> None:
    """The filter gradient's epilogue (an optimizer update) at dw[o, c, ky, kx]."""
    vo, vc, vky, vkx = list(t.epilogue.outer) + list(t.epilogue.inner)
    em.vars.update({vo.name: o, vc.name: c, vky.name: ky, vkx.name: kx})
    em.push()
    store_all(em, t.epilogue.row_stores + t.epilogue.stores)
    em.pop()


# A first layer's filter gradient (1 or 3 input channels) as a GEMM has K = C*KH*KW rows
# of 9-75 and O columns of 6-32: register tiles a third to a half empty and an im2col
# matrix as large as the input itself (LeNet's 1->6 5x5 layer at 12% of the GEMM rate).
# Directly, each (block of output channels, input channel, kernel row) keeps one vector
# accumulator per (channel, kernel column) in registers over every image and output row:
# per output row segment, KW shifted input rows and one g row per channel, all loads
# reused KW or OB times, and no im2col.
# With 32 vector registers (AVX-512: 9 channels per item for 3x3) that pays for wider
# layers too where the output rows fill the vectors. Of the GEMM rate, on Zen 5, as a GEMM
# -> directly: 16->16 32x32 3x3 59% -> 85%, 32->32 16x16 81% -> 95%, 5x5 32->32 85% -> 97%;
# but 64->64 8x8 (half the lanes idle) 93% -> 50% and 1x1 64->64 (no input load reused)
# 71% -> 59%. A GEMM over at most one vector of output channels is load-bound (a broadcast
# per multiply-add), so there emptier vectors win too: 6->16 on 10-wide rows 43% -> 56%
# (now 90% over vectors of channels: _vector_filter_tile, which is tried first).
# With 16 registers (AVX2: 3 channels per item) wider layers lose (35-76% of the GEMM's).
_DIRECT_MAX_C = 3
_DIRECT_LANES = 0.85         # the share of the lanes output rows must fill (wider layers)
_DIRECT_LANES_NARROW = 0.5   # the same where O fits one vector
_DIRECT_MACS_PER_BYTE = 8    # at least, per byte of accumulators through scratch (wider layers)
_DIRECT_TILE_BYTES = 256 << 10  # the images of one pass over the items (see below)
_DIRECT_ONE_IMAGE_BYTES = 16 << 10  # an image's g rows of one block: past this, one image a pass


def _direct_channels(t: Template, target) -> int:
    """How many output channels the direct filter gradient takes per item (the
    accumulators, KW input vectors and a g vector fill the vector registers); 0 where it
    does not apply: stride > 1, a kernel row too wide for the registers, or more than
    _DIRECT_MAX_C input channels with 16 registers, a 1x1 kernel, output rows that
    leave too many lanes idle or too few images in a tile (see above)."""
    O, C, _, KW = t.output.shape
    _, _, OH, OW = t.inputs[1].shape
    w = target.vector_width
    registers = 32 if w == 16 else 16
    ob = max(0, (registers - KW - 2) // KW)
    if tuple(t.attrs["stride"]) != (1, 1):
        return 0
    if C > _DIRECT_MAX_C:
        lanes = OW / (_cdiv(OW, w) * w)
        if registers < 32 or KW == 1 or lanes < (_DIRECT_LANES_NARROW if O <= w else _DIRECT_LANES):
            return 0
        # each accumulator goes to scratch and back (8w bytes) once per tile of images
        # (NB * OH * OW multiply-adds): a wide layer's tile is one image, and on 16x16
        # rows that traffic costs more than the GEMM's im2col (128->128: 93% of the GEMM
        # rate as a GEMM, 81% directly; 256->256 98% -> 48%; 64->64 on 32x32 86% -> 93%)
        if 8 * w * _DIRECT_MACS_PER_BYTE > _direct_images_per_tile(t, ob) * OH * OW:
            return 0
    return ob


def _direct_images_per_tile(t: Template, ob: int) -> int:
    """Images per pass of the direct filter gradient over its items: one where an
    image's g rows of a block of ob channels fill _DIRECT_ONE_IMAGE_BYTES (every item of
    the block then reads them from L1), else as many as keep their x planes and the
    block's g rows within _DIRECT_TILE_BYTES."""
    N, C, H, W = t.inputs[0].shape
    _, _, OH, OW = t.inputs[1].shape
    if 4 * ob * OH * OW >= _DIRECT_ONE_IMAGE_BYTES:
        return 1
    return max(1, min(N, _DIRECT_TILE_BYTES // (4 * (ob * OH * OW + C * H * W))))


def _filter_block(O: int, KW: int, ob_max: int) -> int:
    """Output channels per block of the direct filter gradient: the fewest loads and
    multiply-adds per output row over all blocks (a block's channels past O still cost
    theirs). 32 channels of 5x5 taps in 8 blocks of 4, not 7 of 5 with 3 channels idle:
    1.55-2.5 ms -> 1.43 ms on Zen 5, whose time as 7 blocks also swung with the distance
    between x and g modulo 4 KiB."""
    return min(range(1, ob_max + 1), key=lambda ob: (_cdiv(O, ob) * (ob * (KW + 1) + KW), -ob))


def _row_segments(v: _Vec, OW: int, W: int, KW: int, pw: int, dx: int = 1):
    """An output row's segments of a vector [(x0, positions)], the masks of the input
    columns x0 + lane + kx*dx - pw each segment reads (within the segment and the row)
    and of its g lanes; None where every lane is on."""
    w = v.w
    chunks = [(x0, min(w, OW - x0)) for x0 in range(0, OW, w)]
    masks = {(x0, kx): _lanes(v, [lane < n and 0 <= x0 + lane + kx * dx - pw < W for lane in range(w)])
             for x0, n in chunks for kx in range(KW)}
    return chunks, masks, {x0: _lanes(v, [lane < n for lane in range(w)]) for x0, n in chunks}


def _block_g_masks(b, w: int, gmask, OB: int, nob, short: bool) -> list:
    """The masks of a block's OB g loads: in a short last block (short: some block is),
    channel ob < nob only; its other sums go unused, but their loads would reach past
    g's last image."""
    if not short:
        return [gmask] * OB
    whole = const_vector(I1, [True] * w) if gmask is None else gmask
    return [b.select(b.icmp_signed("<", i64(ob), nob), whole, const_vector(I1, [False] * w)) for ob in range(OB)]


def _direct_filter_gradient(mb, em, t: Template, tid, nthreads, ob_max: int) -> None:
    """The filter gradient of a first layer (see _direct_channels), computed directly:
    no im2col, no GEMM. Threads share out (channel block, input channel, kernel row)
    items, each summed over every image: each dw element is one thread's, so its
    epilogue runs there. The taps are dilation apart."""
    xb, gb = t.inputs
    N, C, H, W = xb.shape
    _, O, OH, OW = gb.shape
    _, _, KH, KW = t.output.shape
    ph, pw = t.attrs["pad"]
    dy, dx = _dilation(t)
    target = mb.target
    w = target.vector_width
    OB = _filter_block(O, KW, ob_max)
    nblocks = _cdiv(O, OB)
    b = em.b
    v = _Vec(b, w, fused=target.has("fma"))
    X, G = em.pointers[xb.name], em.pointers[gb.name]
    chunks, masks, g_masks = _row_segments(v, OW, W, KW, pw, dx)
    nacc = OB * KW
    items = nblocks * C * KH
    # images in tiles whose g rows (and x planes) stay in cache while every item of the
    # thread passes over them (else each item streams all of g again: 36 passes for a
    # 3->32 layer); the accumulators wait in scratch between tiles. Where one image's g
    # rows of a block fill a good part of L1 (8 channels of 32x32), a tile of one image
    # keeps them there for every item: of the GEMM rate on Zen 5, 3->32 on 32x32 67% (5
    # images, from L2) -> 91%, 16->16 86% -> 94%, 3->64 67% -> 93%. With 16x16 rows the
    # tiles of several images measured best (32->32: 1-4 images 68%, 5-6 94-100%, 7 or
    # more 67% -- not a simple cache capacity: left as it was, 6 images).
    NB = _direct_images_per_tile(t, OB)
    (accs,), total = _carve(b, _scratch_base(mb, em), [items * nacc * w])  # a thread may get every item
    _scratch(mb, em, total)
    lo, hi = split(b, items, tid, nthreads)
    acc_at = _zeroed_accumulators(b, v, accs, lo, hi, nacc)

    def item_at(item):
        """(c, ky, first output channel, channels in the block, its accumulators' address)."""
        block, rest = b.udiv(item, i64(C * KH)), b.urem(item, i64(C * KH))
        o0 = b.mul(block, i64(OB))
        return (b.udiv(rest, i64(KH)), b.urem(rest, i64(KH)), o0, smin(b, i64(OB), b.sub(i64(O), o0)),
                acc_at(item))

    with for_range(b, 0, N, "tile", step=NB) as n0:
        n1 = smin(b, b.add(n0, i64(NB)), i64(N))
        with for_range(b, lo, hi, "item") as item:
            c, ky, o0, nob, at = item_at(item)
            ry = b.mul(ky, i64(dy)) if dy > 1 else ky  # the kernel row's offset
            # output rows whose input row y + ry - ph lies inside the image
            y_lo = smax(b, i64(0), b.sub(i64(ph), ry))
            y_hi = smin(b, i64(OH), b.sub(i64(H + ph), ry))

            def image(n, acc):
                xrow0 = b.gep(X, [b.mul(b.add(b.mul(n, i64(C)), c), i64(H * W))], source_etype=F32)
                grow0 = b.gep(G, [b.mul(b.add(b.mul(n, i64(O)), o0), i64(OH * OW))], source_etype=F32)

                def row(y, acc):
                    xrow = v.at(xrow0, b.mul(b.add(y, b.sub(ry, i64(ph))), i64(W)))
                    grow = v.at(grow0, b.mul(y, i64(OW)))
                    acc = list(acc)
                    for x0, _ in chunks:
                        xs = [v.load(v.at(xrow, x0 + kx * dx - pw), masks[x0, kx]) for kx in range(KW)]
                        gm = _block_g_masks(b, w, g_masks[x0], OB, nob, OB * nblocks > O)
                        for ob in range(OB):
                            gv = v.load(v.at(grow, ob * OH * OW + x0), gm[ob])
                            for kx in range(KW):
                                acc[ob * KW + kx] = v.fma(gv, xs[kx], acc[ob * KW + kx])
                    return acc
                return loop(b, y_lo, y_hi, acc, row, name="y")
            acc = loop(b, n0, n1, [v.load(v.at(at, a * w)) for a in range(nacc)], image, name="n")
            for a in range(nacc):
                v.store(acc[a], v.at(at, a * w))
    with for_range(b, lo, hi, "item") as item:
        c, ky, o0, nob, at = item_at(item)
        _sum_lanes_into_filter(em, t, v, at, o0, nob, c, b.mul(ky, i64(KW)), KW)


def _zeroed_accumulators(b, v: _Vec, accs, lo, hi, nacc: int):
    """at(item): the address of an item's nacc accumulator vectors in accs, where a
    thread's items [lo, hi) lie in order; every one of them zeroed here first."""
    def at(item):
        return v.at(accs, b.mul(b.sub(item, lo), i64(nacc * v.w)))
    with for_range(b, lo, hi, "item") as item:
        first = at(item)
        for a in range(nacc):
            v.store(v.zero, v.at(first, a * v.w))
    return at


def _sum_lanes_into_filter(em, t: Template, v: _Vec, at, o0, nob, c, tap0, taps: int) -> None:
    """dw[o0 + i, c, tap0 + j] = the lane sum of the accumulator at + (i * taps + j) vectors,
    for i < nob and j < taps, and the epilogue there: in a loop, not unrolled, so that
    the epilogue (an Adam update, say) is emitted once."""
    b = em.b
    O, C, KH, KW = t.output.shape
    with for_range(b, 0, b.mul(nob, i64(taps)), "a") as a:
        o, tap = b.add(o0, b.udiv(a, i64(taps))), b.add(tap0, b.urem(a, i64(taps)))
        s = hsum(b, v.load(v.at(at, b.mul(a, i64(v.w)))))
        b.store(s, gep(b, em.pointers[t.output.name], b.add(b.mul(b.add(b.mul(o, i64(C)), c), i64(KH * KW)), tap),
                       F32), align=4)
        if t.epilogue is not None:
            _filter_epilogue(em, t, o, c, b.udiv(tap, i64(KW)), b.urem(tap, i64(KW)))


# A stride-1 filter gradient whose taps fit the registers several times over (3x3:
# 9) can keep every tap's accumulator of an item in registers, an item being a block of
# OB output channels by one input channel. Down a column of vectors of the output rows,
# output row y meets input rows y - ph .. y - ph + KH - 1: the last KH - 1 of them are
# the next row's first, so they stay in registers (KW shifted vectors each) and each
# output row loads one new input row's KW vectors and OB vectors of g for OB * KH * KW
# multiply-adds (3x3, OB = 2: 5 loads for 18; over rows, 11 for 24). The row loop is
# unrolled KH times, so that the window moves by renaming, not by register copies (a loop
# of one row: 68-70%). An item reads two planes of g, which stay in L1 for the item of
# each input channel (over rows, a block of 8 planes of 32x32, 32 KiB, did not: planes
# 128 floats apart instead of 1024 measured 94%). On this Intel machine type
# (twenty-sixth session), of the GEMM rate, over rows -> window: the CIFAR CNN's 3->32
# 71-72% -> 75-76% (one thread 71% -> 77%), 3->16 on 28x28 57% -> 61%, 32->32 and 32->64
# on 16x16 79-80% -> 83-85%; other layers keep their forms: 16->16 on 32x32 85% -> 83%
# (16->32 the same), 64->64 on 16x16 87% -> 84%, 128->128 97% as a GEMM -> 77%, rows
# that leave lanes idle 60% -> 13% (6->16 on 4x4).
# In a first layer (at most _DIRECT_MAX_C input channels) few items read each block of
# g, and each item's first pass over a plane waited on it (the same loop with g's loads
# at constant addresses: 97%): each output row prefetches its share of the next image's
# block into L2. 3->32 on 32x32 70-71% -> 80-81%, 1->16 55% -> 65%, 3->16 on 28x28 62% ->
# 66%; 3->32 on 16x16 the same. Wider layers, whose blocks many items read, lost (32->32
# and 32->64 on 16x16 84% -> 80%, 82% -> 79%), and so did prefetching x too (78%).
_WINDOW_MAX_C = 32
_WINDOW_REGISTERS = 30  # accumulators and the window's vectors; a g vector and a spare


def _window_channels(t: Template, target) -> int:
    """Output channels per item of the window filter gradient (see above): as many as
    fit _WINDOW_REGISTERS with the window, at least 2; 0 where it does not apply: no
    AVX-512, a stride, a kernel of one row; or past _DIRECT_MAX_C input channels, more
    than _WINDOW_MAX_C of them or output rows that are not one vector filled to
    _DIRECT_LANES."""
    O, C, KH, KW = t.output.shape
    OW = t.inputs[1].shape[3]
    w = target.vector_width
    T = KH * KW
    ob = (_WINDOW_REGISTERS - T) // T
    lanes = OW / (_cdiv(OW, w) * w)
    if w != 16 or tuple(t.attrs["stride"]) != (1, 1) or KH == 1 or ob < 2:
        return 0
    if C > _DIRECT_MAX_C and (C > _WINDOW_MAX_C or OW > w or lanes < _DIRECT_LANES):
        return 0
    return ob


def _window_filter_gradient(mb, em, t: Template, tid, nthreads, OB: int) -> None:
    """conv2d_bwd_filter over a window of input rows (see _window_channels). Threads share
    out the items, each summed over every image: each dw element is one thread's, so its
    epilogue runs there."""
    xb, gb = t.inputs
    N, C, H, W = xb.shape
    _, O, OH, OW = gb.shape
    _, _, KH, KW = t.output.shape
    ph, pw = t.attrs["pad"]
    target = mb.target
    w = target.vector_width
    nblocks = _cdiv(O, OB)
    b = em.b
    v = _Vec(b, w, fused=target.has("fma"))
    X, G = em.pointers[xb.name], em.pointers[gb.name]
    chunks, masks, g_masks = _row_segments(v, OW, W, KW, pw)
    T = KH * KW
    nacc = OB * T
    items = nblocks * C
    prefetch = C <= _DIRECT_MAX_C  # (see above)
    share = _cdiv(_cdiv(OB * OH * OW, _LINE_FLOATS), len(chunks) * OH)  # lines an output row
    (accs, zeros), total = _carve(b, _scratch_base(mb, em), [items * nacc * w, W + 2 * w])
    _scratch(mb, em, total)
    _zero(b, zeros, W + 2 * w)
    zero_row = v.at(zeros, w)
    lo, hi = split(b, items, tid, nthreads)
    acc_at = _zeroed_accumulators(b, v, accs, lo, hi, nacc)

    def item_at(item):
        """(c, first output channel, channels in the block, its accumulators' address)."""
        o0 = b.mul(b.udiv(item, i64(C)), i64(OB))
        return b.urem(item, i64(C)), o0, smin(b, i64(OB), b.sub(i64(O), o0)), acc_at(item)

    with for_range(b, 0, N, "n") as n:
        with for_range(b, lo, hi, "item") as item:
            c, o0, nob, at = item_at(item)
            xplane = b.gep(X, [b.mul(b.add(b.mul(n, i64(C)), c), i64(H * W))], source_etype=F32)
            gplane = b.gep(G, [b.mul(b.add(b.mul(n, i64(O)), o0), i64(OH * OW))], source_etype=F32)
            acc = [v.load(v.at(at, a * w)) for a in range(nacc)]

            def x_row(r, x0):
                """The KW shifted vectors of input row r (zeros outside the image)."""
                inside = b.and_(b.icmp_signed(">=", r, i64(0)), b.icmp_signed("<", r, i64(H)))
                row = b.select(inside, v.at(xplane, b.mul(r, i64(W))), zero_row)
                return [v.load(v.at(row, x0 + kx - pw), masks[x0, kx]) for kx in range(KW)]
            next_g = b.gep(gplane, [i64(O * OH * OW)], source_etype=F32)  # (past the last image:
            # a prefetch does not fault)
            for ci, (x0, _) in enumerate(chunks):
                gm = _block_g_masks(b, w, g_masks[x0], OB, nob, OB * nblocks > O)
                window = [xv for ky in range(KH - 1) for xv in x_row(i64(ky - ph), x0)]

                def one_row(y, acc, window):
                    if prefetch:  # this output row's share of the next image's g block
                        first = b.mul(b.add(y, i64(ci * OH)), i64(share))
                        for j in range(share):
                            v.prefetch(b.gep(next_g, [b.mul(b.add(first, i64(j)), i64(_LINE_FLOATS))],
                                             source_etype=F32), False, 2)
                    xs = window + x_row(b.add(y, i64(KH - 1 - ph)), x0)
                    for ob in range(OB):
                        gv = v.load(v.at(gplane, b.add(b.mul(y, i64(OW)), i64(ob * OH * OW + x0))), gm[ob])
                        for tap in range(T):
                            acc[ob * T + tap] = v.fma(gv, xs[tap], acc[ob * T + tap])
                    return acc, xs[KW:]

                def rows(y0, carried):  # KH rows: the window back in the same registers
                    acc, window = list(carried[:nacc]), list(carried[nacc:])
                    for r in range(KH):
                        acc, window = one_row(b.add(y0, i64(r)) if r else y0, acc, window)
                    return acc + window
                carried = loop(b, 0, OH // KH * KH, acc + window, rows, name="y", step=KH)
                acc, window = list(carried[:nacc]), list(carried[nacc:])
                for y in range(OH // KH * KH, OH):
                    acc, window = one_row(i64(y), acc, window)
            for a in range(nacc):
                v.store(acc[a], v.at(at, a * w))
    with for_range(b, lo, hi, "item") as item:
        c, o0, nob, at = item_at(item)
        _sum_lanes_into_filter(em, t, v, at, o0, nob, c, i64(0), T)


# A first layer with "same" padding along x (x's rows as wide as g's) whose rows leave
# lanes idle -- LeNet's 1->6 5x5 layer on 28-wide rows, at 48-52% of the GEMM rate over
# rows -- runs over each plane's positions p = y*OW + x as one flat range: g's planes are
# whole vectors (784 = 49 x 16; aligned where the plane is), and each tap reads x at p +
# (ky - ph)*W + kx - pw, masked where that pixel leaves the image (a row end, a row above
# or below). An item is every output channel by a group of taps, in (O + 1) x taps + 1
# registers: 24 accumulators for LeNet (6 channels x 4 taps), so each x load serves 6
# multiply-adds and each g load 4 (over rows, 3 channels x 5 taps: 5 x and 3 g loads per
# 15). The masks, per vector and tap, come from a constant table (a load each, no shuffle
# on the multiply-adds' ports). Threads share out chunks of images, each summing every
# item over its own, so an image's g (6 planes, 19 KiB) stays in L1 for all its items;
# after a barrier (barrier.team_*) each thread adds up its share of dw over the chunks
# and runs the epilogue there. LeNet's layer on this Intel machine type (twenty-fifth
# session), of the GEMM rate in the same rounds: over rows 50-52%; flat, its items
# shared out by threads 66-71%; flat, chunks of images shared out 70-72% on two threads
# (75% on one). With AVX2 (16 registers, no mask registers: 2 taps a group, each
# mask a vector) 27% against 43% over rows.
_FLAT_G_BYTES = 32 << 10  # one image's g planes at most (beyond: not measured)
_FLAT_UNROLL = 2          # vectors per loop iteration (1: 67-73%, 2-4: 70-75%)
_FLAT_CHUNKS = 8          # images in at most this many chunks (see _flat_filter_gradient)


def _flat_filter_taps(t: Template, target) -> int:
    """Taps per item of the flat filter gradient (see above): (30 registers) // (output
    channels + 1), at most every tap; 0 where it does not apply: no AVX-512, stride > 1,
    x's rows not as wide as g's, rows a whole number of vectors, more than _DIRECT_MAX_C
    input channels, fewer than 2 taps an item or one image's g planes past _FLAT_G_BYTES."""
    O, C, KH, KW = t.output.shape
    _, _, OH, OW = t.inputs[1].shape
    W = t.inputs[0].shape[3]
    w = target.vector_width
    taps = (32 - 2) // (O + 1)
    if (w != 16 or tuple(t.attrs["stride"]) != (1, 1) or OW != W or OW % w == 0 or C > _DIRECT_MAX_C
            or taps < 2 or 4 * O * OH * OW > _FLAT_G_BYTES):
        return 0
    return min(taps, KH * KW)


def _tap_groups(KH: int, KW: int, B: int) -> list[list[tuple[int, int]]]:
    """The taps in groups of B: along each kernel row while B fit, then the rest (row by
    row) in runs of B. LeNet's 5x5 by 4: five groups of a row's first 4, the last column's
    first 4, its last tap."""
    groups, rest = [], []
    for ky in range(KH):
        row = [(ky, kx) for kx in range(KW)]
        whole = len(row) // B * B
        groups += [row[i:i + B] for i in range(0, whole, B)]
        rest += row[whole:]
    return groups + [rest[i:i + B] for i in range(0, len(rest), B)]


def _tap_masks(b, w: int, taps: list, P: int, OW: int, H: int, W: int, ph: int, pw: int):
    """A private constant table of w-bit lane masks, [vector][tap]: the lanes of vector vi
    (positions p = vi*w + lane < P) whose pixel for tap (ky, kx) lies inside the image;
    and per tap whether any of them leaves a lane off (else its loads are not masked)."""
    full = (1 << w) - 1
    rows = [[sum(1 << lane for lane in range(w) if (p := vi * w + lane) < P
                 and 0 <= p // OW + ky - ph < H and 0 <= p % OW + kx - pw < W) for ky, kx in taps]
            for vi in range(_cdiv(P, w))]
    flat = [m for row in rows for m in row]
    # named by its contents, like _i32_table: identical functions stay the same text
    name = f"tap_masks.{w}.{hashlib.sha1(repr(flat).encode()).hexdigest()[:16]}"
    table = b.module.globals.get(name)
    if table is None:
        mty = ir.IntType(w)
        table = ir.GlobalVariable(b.module, ir.ArrayType(mty, len(flat)), name=name)
        table.initializer = ir.Constant(table.value_type, [ir.Constant(mty, m) for m in flat])
        table.global_constant, table.linkage = True, "private"
    return table, [any(row[j] != full for row in rows) for j in range(len(taps))]


def _flat_filter_gradient(mb, em, t: Template, tid, nthreads, B: int) -> None:
    """conv2d_bwd_filter over flat planes (see above), B taps an item. The items of whole
    groups run as one loop, their taps' offsets and masks from tables (written out group
    by group, they made LeNet-5's compile 0.1 s longer)."""
    xb, gb = t.inputs
    N, C, H, W = xb.shape
    _, O, OH, OW = gb.shape
    _, _, KH, KW = t.output.shape
    ph, pw = t.attrs["pad"]
    w = mb.target.vector_width
    P, V = OH * OW, _cdiv(OH * OW, w)
    b = em.b
    v = _Vec(b, w, fused=mb.target.has("fma"))
    X, G, DW = em.pointers[xb.name], em.pointers[gb.name], em.pointers[t.output.name]
    team = em.pointers["__team__"]
    groups = _tap_groups(KH, KW, B)
    whole = [tap for grp in groups if len(grp) == B for tap in grp]  # the whole groups' taps, in order
    short = [tap for grp in groups if len(grp) < B for tap in grp]  # the last group's, if short
    nw = len(whole) // B
    whole_masks, _ = _tap_masks(b, w, whole, P, OW, H, W, ph, pw)
    short_masks, short_masked = _tap_masks(b, w, short, P, OW, H, W, ph, pw) if short else (None, [])
    offsets = _i32_table(b.module, "tap_offsets", [(ky - ph) * W + kx - pw for ky, kx in whole])
    g_tail = None if P % w == 0 else const_vector(I1, [lane < P % w for lane in range(w)])
    # accumulators, one vector per element of dw: the whole groups' items (c, group),
    # then each channel's short group; per item, output channel-major
    E = O * C * KH * KW
    items = [(c, whole[gi * B:(gi + 1) * B]) for c in range(C) for gi in range(nw)] + [(c, short) for c in range(C)
                                                                                      if short]
    where = [((o * C + c) * KH + ky) * KW + kx for c, taps in items for o in range(O) for ky, kx in taps]
    to_dw = _i32_table(b.module, "dw_elements", where)

    def plane_sums(ximg, gimg, taps, acc, mask_of):
        """acc[o * taps + j] += g[o, p] * x[p + taps[j]] over the plane's vectors."""
        def vector(vi, acc, last=False):
            acc = list(acc)
            p = b.mul(vi, i64(w))
            xs = [v.load(v.at(ximg, b.add(p, off)), mask_of(vi, j)) for j, off in enumerate(taps)]
            for o in range(O):
                gv = v.load(v.at(gimg, b.add(p, i64(o * P))), g_tail if last else None)
                for j in range(len(taps)):
                    acc[o * len(taps) + j] = v.fma(gv, xs[j], acc[o * len(taps) + j])
            return acc

        def unrolled(vi, acc):
            for u in range(_FLAT_UNROLL):
                acc = vector(b.add(vi, i64(u)), acc)
            return acc
        looped = (V - (1 if g_tail else 0)) // _FLAT_UNROLL * _FLAT_UNROLL
        acc = loop(b, i64(0), i64(looped), acc, unrolled, name="vec", step=_FLAT_UNROLL)
        for vi in range(looped, V):
            acc = vector(i64(vi), acc, last=vi == V - 1 and g_tail is not None)
        return acc

    def sums_into(block, ximg, gimg, taps, mask_of):
        acc = [v.load(v.at(block, a * w)) for a in range(O * len(taps))]
        acc = plane_sums(ximg, gimg, taps, acc, mask_of)
        for a, value in enumerate(acc):
            v.store(value, v.at(block, a * w))

    def lanes(table, row: int, first):
        """Tap j's mask for vector vi: table[vi * row + first + j]."""
        def mask_of(vi, j):
            at = b.add(b.mul(vi, i64(row)), b.add(first, i64(j)))
            return b.bitcast(b.load(b.gep(table, [i64(0), at]), typ=ir.IntType(w)), v.mty)
        return mask_of
    # images in chunks fixed by the batch: each chunk's sums (lanes added in hsum's order)
    # go to scratch, and each element of dw adds its chunks' in order -- the same sums on
    # any thread count. Each chunk costs E zeroed accumulators and E lane sums: LeNet's
    # layer at 68-70% of the GEMM rate with 16 chunks, 70-72% with 8, 73% with 4 (which
    # would leave a fifth thread idle). Adding the chunks' vectors before their lanes
    # read the other thread's scratch, 77 KB (64-67% with 16 chunks).
    per = _cdiv(N, min(N, _FLAT_CHUNKS))
    chunks = _cdiv(N, per)
    accs = _scratch_base(mb, em)
    _scratch(mb, em, E * w + chunks * E)  # the accumulators, then its chunks' sums (maybe every chunk)
    k_lo, k_hi = split(b, chunks, tid, nthreads)
    with for_range(b, k_lo, k_hi, "chunk") as k:
        with for_range(b, 0, E, "a") as a:
            v.store(v.zero, v.at(accs, b.mul(a, i64(w))))
        with for_range(b, b.mul(k, i64(per)), smin(b, b.mul(b.add(k, i64(1)), i64(per)), i64(N)), "n") as n:
            gimg = b.gep(G, [b.mul(n, i64(O * P))], source_etype=F32)
            ximgs = b.gep(X, [b.mul(n, i64(C * H * W))], source_etype=F32)
            with for_range(b, 0, C * nw, "item") as item:
                c, gi = b.udiv(item, i64(nw)), b.urem(item, i64(nw))
                taps = [b.sext(b.load(b.gep(offsets, [i64(0), b.add(b.mul(gi, i64(B)), i64(j))]), typ=I32), I64)
                        for j in range(B)]
                ximg = b.gep(ximgs, [b.mul(c, i64(H * W))], source_etype=F32)
                block = v.at(accs, b.mul(item, i64(O * B * w)))
                sums_into(block, ximg, gimg, taps, lanes(whole_masks, len(whole), b.mul(gi, i64(B))))
            if short:
                mask_of = lanes(short_masks, len(short), i64(0))
                for c in range(C):
                    ximg = b.gep(ximgs, [i64(c * H * W)], source_etype=F32)
                    block = v.at(accs, (C * nw * B + c * len(short)) * O * w)
                    sums_into(block, ximg, gimg, [i64((ky - ph) * W + kx - pw) for ky, kx in short],
                              lambda vi, j: mask_of(vi, j) if short_masked[j] else None)
        # written through the team's pointer, as the other threads read them (not through
        # the noalias scratch argument)
        sums = b.gep(team_scratch(b, team, b.sext(tid, I64)), [i64(E * w * 4)], source_etype=I8)
        sums = b.gep(sums, [b.mul(b.sub(k, k_lo), i64(E))], source_etype=F32)
        with for_range(b, 0, E, "a") as a:
            e = b.sext(b.load(b.gep(to_dw, [i64(0), a]), typ=I32), I64)
            b.store(hsum(b, v.load(v.at(accs, b.mul(a, i64(w))))), gep(b, sums, e, F32), align=4)
    team_barrier(b, team, nthreads)
    # each thread its share of dw: the element's sums over the chunks, in chunk order
    # (thread u's chunks in u's scratch), then the epilogue there
    e_lo, e_hi = split(b, E, tid, nthreads)
    with for_range(b, e_lo, e_hi, "e") as e:
        total = _sum_over_chunks(b, team, nthreads, chunks, E * w * 4, ir.Constant(F32, 0.0),
                                 lambda sums, k: b.load(gep(b, sums, b.add(b.mul(k, i64(E)), e), F32), typ=F32))
        b.store(total, gep(b, DW, e, F32), align=4)
        if t.epilogue is not None:
            kx, rest = b.urem(e, i64(KW)), b.udiv(e, i64(KW))
            ky, rest = b.urem(rest, i64(KH)), b.udiv(rest, i64(KH))
            _filter_epilogue(em, t, b.udiv(rest, i64(C)), b.urem(rest, i64(C)), ky, kx)
    team_barrier(b, team, nthreads)  # no thread's scratch is reused while others read its sums


def _sum_over_chunks(b, team, nthreads, chunks: int, offset: int, zero, load):
    """A value's sum over the chunks of images in chunk order, the same on any thread
    count: thread u's chunks (as split shares them out) keep their sums in u's scratch
    from byte `offset` on, and load(sums, k) reads the k-th of a thread's chunks."""
    def thread(u, total):
        u_lo, u_hi = split(b, chunks, b.trunc(u, I32), nthreads)
        theirs = b.gep(team_scratch(b, team, u), [i64(offset)], source_etype=I8)
        return loop(b, u_lo, u_hi, total, lambda k, total: [b.fadd(total[0], load(theirs, b.sub(k, u_lo)))],
                    name="k")
    [total] = loop(b, i64(0), b.sext(nthreads, I64), [zero], thread, name="u")
    return total


def _pack_b_fn(mb, tb: bool):
    """gemm.py's B packer, the one every GEMM and convolution of the build shares."""
    return shared_pack_b(mb.helper, mb.module, mb.fresh_name("pack_b"), tb, mb.target.vector_width, mb.target)


def _not_unrolled(emit):
    """A convolution's function with none of its loops unrolled by LLVM: their bodies are
    unrolled here already (taps, accumulators, lanes), or run once per weight (an
    optimizer's epilogue). LLVM's unrolling was 20-30% of these functions' and the
    packers' LLVM time (without it the residual network's LLVM time -10 to -22%, the
    CIFAR CNN's -4 to -9%), and left the steps as they were (within 2%, Zen 5 and AVX2)."""
    def driver(mb, em, t: Template, tid, nthreads) -> None:
        no_unrolling(em.b.function)
        emit(mb, em, t, tid, nthreads)
    return driver


EMITTERS = {name: _not_unrolled(emit) for name, emit in
            (("conv2d", conv2d), ("conv2d_bwd_data", conv2d_bwd_data), ("conv2d_bwd_filter", conv2d_bwd_filter))}
