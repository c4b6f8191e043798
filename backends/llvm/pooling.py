"""Vectorized 2-D pooling and its gradient (templates pool2d, pool2d_bwd).

W outputs of a row at a time: each window tap is a vector of inputs (stride 1: one masked
load; stride 2: two and an even-lane shuffle), combined in the window's row-major order
with exactly the scalar operations the reference order implies, so results are bitwise
those of the scalar templates in templates.py (which remain for other strides).

The max gradient sends each window's gradient to its first maximum (the first tap
greater than every earlier one, as templates.pool2d_bwd does). With non-overlapping
windows (kernel == stride) every input belongs to at most one window, so the gradient
plane is written once: zeros, then each window's taps (stride-2 columns interleaved back
with shuffles).
"""
from __future__ import annotations

import math

from llvmlite import ir

from dlc.core.kernel import Template

from .conv import _V
from .irutil import F32, I1, I32, const_vector, for_range, i64, split


def _fast(t: Template, backward: bool) -> bool:
    (kh, kw), (sh, sw), (ph, pw) = t.attrs["kernel"], t.attrs["stride"], t.attrs["pad"]
    if sw not in (1, 2):
        return False
    return not backward or ((kh, kw) == (sh, sw) and (ph, pw) == (0, 0))


class _Row:
    """Loads of W outputs' taps from one input row."""

    def __init__(self, b, v: _V, W: int, sw: int):
        self.b, self.v, self.W, self.sw = b, v, W, sw
        w = v.w
        self.evens = const_vector(I32, range(0, 2 * w, 2))
        no = const_vector(I1, [0] * w)
        self.spread = [const_vector(I32, [(h * w + j) // 2 if j % 2 == 0 else w for j in range(w)])
                       for h in range(2)]
        self.no = no

    def mask(self, ox0, j, pw, OW):
        """Lanes whose output exists and whose tap column lies inside the row."""
        b, v = self.b, self.v
        ox = b.add(v.isplat(ox0), v.lanes)
        ix = b.add(b.mul(ox, v.isplat(self.sw)), v.isplat(j - pw))
        return b.and_(v.below(ox, OW), v.below(ix, self.W))

    def load(self, row, ox0, j, pw, mask, fill):
        """input[row, ox*sw + j - pw] for the W outputs from ox0 (fill where masked)."""
        b, v = self.b, self.v
        first = b.add(b.mul(ox0, i64(self.sw)), i64(j - pw))
        ptr = b.gep(row, [first], source_etype=F32)
        if self.sw == 1:
            return v.masked_load(ptr, mask, fill)
        lo = v.masked_load(ptr, b.shuffle_vector(mask, self.no, self.spread[0]), v.f.zero)
        hi = v.masked_load(b.gep(ptr, [i64(v.w)], source_etype=F32), b.shuffle_vector(mask, self.no, self.spread[1]),
                           v.f.zero)
        return b.select(mask, b.shuffle_vector(lo, hi, self.evens), fill)


def _plane_epilogue(em, t: Template, p, C: int) -> None:
    """The epilogue over plane p (= image * C + channel), while the plane is in cache."""
    if t.epilogue is None:
        return
    from .emit import emit_bounded
    b = em.b
    n, c = b.udiv(p, i64(C)), b.urem(p, i64(C))
    vars_ = list(t.epilogue.outer) + list(t.epilogue.inner)
    em.push()
    emit_bounded(em, t.epilogue, {vars_[0].name: (n, b.add(n, i64(1))), vars_[1].name: (c, b.add(c, i64(1)))})
    em.pop()


def pool2d(mb, em, t: Template, tid, nthreads) -> bool:
    """The vectorized forward, or False when this shape takes the scalar template."""
    if not _fast(t, False):
        return False
    from .mathlib import maximum
    b = em.b
    v = _V(b, mb.target.vector_width, mb.target.has("fma"))
    (xb,) = t.inputs
    N, C, H, W = xb.shape
    _, _, OH, OW = t.output.shape
    (kh, kw), (sh, sw), (ph, pw) = t.attrs["kernel"], t.attrs["stride"], t.attrs["pad"]
    is_max = t.attrs["mode"] == "max"
    X, Y = em.pointers[xb.name], em.pointers[t.output.name]
    rows = _Row(b, v, W, sw)
    start = const_vector(F32, [-math.inf if is_max else 0.0] * v.w)
    lo, hi = split(b, N * C, tid, nthreads)
    with for_range(b, lo, hi, "plane") as p:
        plane = b.gep(X, [b.mul(p, i64(H * W))], source_etype=F32)
        oplane = b.gep(Y, [b.mul(p, i64(OH * OW))], source_etype=F32)
        with for_range(b, 0, OH, "oy") as oy:
            with for_range(b, 0, OW, "ox", step=v.w) as ox0:
                masks = [rows.mask(ox0, j, pw, OW) for j in range(kw)]
                acc = start
                for i in range(kh):
                    iy = b.add(b.mul(oy, i64(sh)), i64(i - ph))
                    ok = b.and_(b.icmp_signed(">=", iy, i64(0)), b.icmp_signed("<", iy, i64(H)))
                    row = b.gep(plane, [b.mul(iy, i64(W))], source_etype=F32)
                    for j in range(kw):
                        m = b.select(ok, masks[j], rows.no)
                        x = rows.load(row, ox0, j, pw, m, v.f.zero)
                        acc = b.select(m, maximum(b, acc, x) if is_max else b.fadd(acc, x), acc)
                if not is_max:
                    acc = b.fmul(acc, v.f.splat(ir.Constant(F32, 1.0 / (kh * kw))))
                at = b.gep(oplane, [b.add(b.mul(oy, i64(OW)), ox0)], source_etype=F32)
                v.f.store(acc, at, v.f.mask(ox0, i64(OW)))
        _plane_epilogue(em, t, p, C)
    return True


def pool2d_bwd(mb, em, t: Template, tid, nthreads) -> bool:
    """The vectorized gradient for non-overlapping windows, or False."""
    if not _fast(t, True):
        return False
    b = em.b
    v = _V(b, mb.target.vector_width, mb.target.has("fma"))
    f, w = v.f, v.w
    xb, gb = t.inputs
    N, C, H, W = xb.shape
    _, _, OH, OW = gb.shape
    (kh, kw), (sh, sw), _ = t.attrs["kernel"], t.attrs["stride"], t.attrs["pad"]
    is_max = t.attrs["mode"] == "max"
    X, G, DX = em.pointers[xb.name], em.pointers[gb.name], em.pointers[t.output.name]
    rows = _Row(b, v, W, sw)
    lo_idx = const_vector(I32, [j // 2 + (w if j % 2 else 0) for j in range(w)])
    hi_idx = const_vector(I32, [w // 2 + j // 2 + (w if j % 2 else 0) for j in range(w)])
    lo, hi = split(b, N * C, tid, nthreads)
    with for_range(b, lo, hi, "plane") as p:
        plane = b.gep(X, [b.mul(p, i64(H * W))], source_etype=F32)
        dplane = b.gep(DX, [b.mul(p, i64(H * W))], source_etype=F32)
        gplane = b.gep(G, [b.mul(p, i64(OH * OW))], source_etype=F32)
        with for_range(b, 0, H * W, "z", step=w) as z:  # inputs no window covers get 0
            f.store(f.zero, b.gep(dplane, [z], source_etype=F32), f.mask(z, i64(H * W)))
        with for_range(b, 0, OH, "oy") as oy:
            with for_range(b, 0, OW, "ox", step=w) as ox0:
                out_ok = f.mask(ox0, i64(OW))
                g = v.masked_load(b.gep(gplane, [b.add(b.mul(oy, i64(OW)), ox0)], source_etype=F32), out_ok, f.zero)
                masks = [rows.mask(ox0, j, 0, OW) for j in range(kw)]
                if is_max:
                    best = const_vector(F32, [-math.inf] * w)
                    best_at = const_vector(I32, [-1] * w)
                    for i in range(kh):
                        row = b.gep(plane, [b.mul(b.add(b.mul(oy, i64(sh)), i64(i)), i64(W))], source_etype=F32)
                        for j in range(kw):
                            x = rows.load(row, ox0, j, 0, masks[j], f.zero)
                            take = b.and_(masks[j], b.or_(b.fcmp_ordered(">", x, best),
                                                           b.icmp_signed("<", best_at, v.isplat(0))))
                            best = b.select(take, x, best)
                            best_at = b.select(take, v.isplat(i * kw + j), best_at)
                    share = None
                else:
                    share = b.fmul(g, f.splat(ir.Constant(F32, 1.0 / (kh * kw))))
                for i in range(kh):
                    drow = b.gep(dplane, [b.mul(b.add(b.mul(oy, i64(sh)), i64(i)), i64(W))], source_etype=F32)
                    taps = []
                    for j in range(kw):
                        if is_max:
                            hit = b.icmp_signed("==", best_at, v.isplat(i * kw + j))
                            taps.append(b.select(hit, g, f.zero))
                        else:
                            taps.append(share)
                    first = b.mul(ox0, i64(sw))  # the input column of lane 0's first tap
                    if sw == 1:
                        f.store(taps[0], b.gep(drow, [first], source_etype=F32), masks[0])
                    else:  # interleave the two taps of each window back into the row
                        for h, idx in enumerate((lo_idx, hi_idx)):
                            at = b.add(first, i64(h * w))
                            limit = smin_i64(b, b.mul(b.add(ox0, i64(w)), i64(2)), b.mul(i64(OW), i64(2)))
                            f.store(b.shuffle_vector(taps[0], taps[1], idx), b.gep(drow, [at], source_etype=F32),
                                    f.mask(at, limit))
        _plane_epilogue(em, t, p, C)
    return True


def smin_i64(b, x, y):
    return b.select(b.icmp_signed("<", x, y), x, y)
