"""Template kinds: what each means, and its generic lowering to plain loop nests.

A Template part names a computation a backend may render with dedicated code (a tiled
GEMM, a direct convolution). Every kind also has a generic meaning written here as a loop
nest over its output (a gather: each output element sums over what contributes to it),
so a backend renders every model with no templates at all, and adds templates only as
speed-ups. `expand_templates(program, keep)` replaces the kinds a backend does not
render by these nests. The nest computing the output has the same parallel loops (and
`serial` mark) as the template's epilogue, so each worker's epilogue reads only what the
same worker computed.

Kinds (shapes are row-major; int32 indices are clamped into range as the reference does):

  matmul            C[m,n] = op(A) @ op(B); attrs ta, tb: A is [k,m] when ta, B is [n,k] when tb
  batch_matmul      C[g,m,n] = op(A[g]) @ op(B[g]); attrs ta, tb as matmul's, per matrix g
  conv2d            y[n,o,oy,ox] = sum_{c,ky,kx} x[n,c,oy*s+ky*d-p, ox*s+kx*d-p] * w[o,c,ky,kx]
                    (x is zero outside); attrs stride (s), pad (p), dilation (d, absent: 1) per axis
  conv2d_bwd_data   dx = the gradient of conv2d with respect to x, from (dy, w); attrs in_hw, stride, pad,
                    dilation
  conv2d_bwd_filter dw = the gradient with respect to w, from (x, dy); attrs kernel, stride, pad, dilation
  pool2d            max or mean of each window (max pads with -inf; the mean divides by the
                    whole window, padding included); attrs mode, kernel, stride, pad
  pool2d_bwd        its gradient, from (x, dy): max sends each window's gradient to the window's
                    first maximum (row-major), avg spreads it evenly
  take              table[idx]: rows of a table picked by int32 indices (out: idx.shape + row shape)
  scatter_add       zeros[rows, ...] with g[i] added at row idx[i] (the gradient of take); attrs rows
  colsum            the sum over leading axes `axes` (bias gradients over many rows)
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

from dlc.core.kernel.ir import Exprs, KernelProgram, Loop, LoopNest, Store, Template
from dlc.core.types import DType


def _output_nest(x: Exprs, t: Template, value_of: Callable[[tuple], object], fresh) -> LoopNest:
    """A nest over the template's output storing value_of(index) at every element, with
    the epilogue's parallel loops when there is one."""
    shape = t.output.shape
    vars_ = tuple(fresh(d) for d in shape)
    if t.epilogue is not None:
        n_outer, serial = len(t.epilogue.outer), t.epilogue.serial
    else:
        n_outer, serial = max(len(shape) - 1, min(len(shape), 1)), False
    nest = LoopNest(vars_[:n_outer], vars_[n_outer:], serial=serial)
    nest.stores.append(Store(t.output, x.ravel(vars_, shape), value_of(vars_)))
    return nest


class _Gen:
    """Builds one template's generic expression."""

    def __init__(self, x: Exprs, fresh):
        self.x, self.fresh = x, fresh

    def i32(self, ix):
        return self.x.index(ix, DType.i32)

    def cond(self, name, a, b):
        return self.x.op(name, [a, b], DType.bool)

    def all_of(self, conds):
        out = None
        for c in conds:
            out = c if out is None else self.x.op("and", [out, c], DType.bool)
        return out

    def inside(self, ix, size: int) -> list:
        """Conditions for 0 <= ix < size (only the ones its range does not already prove)."""
        x, out = self.x, []
        if ix.lo < 0:
            out.append(self.cond("ge", self.i32(ix), x.lit(0, DType.i32)))
        if ix.hi >= size:
            out.append(self.cond("lt", self.i32(ix), x.lit(size, DType.i32)))
        return out

    def window(self, o, k, stride: int, pad: int, size: int, dilation: int = 1):
        """(clamped source index, its validity conditions) of output o, tap k."""
        x = self.x
        at = x.add(x.add(x.mul(o, stride), x.mul(k, dilation)), x.const(-pad))
        return x.clamp(at, 0, size - 1), self.inside(at, size)

    def back_window(self, i, k, stride: int, pad: int, out_size: int, dilation: int = 1):
        """The output position o with o*stride + k*dilation - pad == i: (clamped o, conditions)."""
        x = self.x
        t = x.sub(x.add(i, x.const(pad)), x.mul(k, dilation))
        o = x.div(t, stride)
        conds = []
        if t.lo < 0:
            conds.append(self.cond("ge", self.i32(t), x.lit(0, DType.i32)))
        if stride > 1:
            conds.append(self.cond("eq", self.i32(x.mod(t, stride)), x.lit(0, DType.i32)))
        if o.hi >= out_size:
            conds.append(self.cond("lt", self.i32(o), x.lit(out_size, DType.i32)))
        return x.clamp(o, 0, out_size - 1), conds

    def masked(self, conds, value, dtype, fill=0.0):
        c = self.all_of(conds)
        return value if c is None else self.x.op("select", [c, value, self.x.lit(fill, dtype)], dtype)

    def sum(self, vars_, body, dtype):
        return self.x.reduce("sum", vars_, body, dtype)

    def mul(self, a, b, dtype):
        return self.x.op("mul", [a, b], dtype)


def _matmul(g: _Gen, t: Template):
    x, (A, B) = g.x, t.inputs
    ta, tb = t.attrs.get("ta", False), t.attrs.get("tb", False)
    m, n = t.output.shape
    k = A.shape[0] if ta else A.shape[1]
    kk = g.fresh(k)

    def value(idx):
        i, j = idx
        a = x.load(A, x.ravel((kk, i), (k, m)) if ta else x.ravel((i, kk), (m, k)))
        b = x.load(B, x.ravel((j, kk), (n, k)) if tb else x.ravel((kk, j), (k, n)))
        return g.sum((kk,), g.mul(a, b, t.output.dtype), t.output.dtype)
    return value


def _batch_matmul(g: _Gen, t: Template):
    x, (A, B) = g.x, t.inputs
    ta, tb = t.attrs.get("ta", False), t.attrs.get("tb", False)
    _, m, n = t.output.shape
    k = A.shape[1] if ta else A.shape[2]
    kk = g.fresh(k)

    def value(idx):
        s, i, j = idx
        a = x.load(A, x.ravel((s, kk, i), (A.shape[0], k, m)) if ta else x.ravel((s, i, kk), (A.shape[0], m, k)))
        b = x.load(B, x.ravel((s, j, kk), (B.shape[0], n, k)) if tb else x.ravel((s, kk, j), (B.shape[0], k, n)))
        return g.sum((kk,), g.mul(a, b, t.output.dtype), t.output.dtype)
    return value


def _conv2d(g: _Gen, t: Template):
    x, (X, W) = g.x, t.inputs
    _, C, H, Wd = X.shape
    _, _, KH, KW = W.shape
    (sh, sw), (ph, pw), (dh, dw) = t.attrs["stride"], t.attrs["pad"], t.attrs.get("dilation", (1, 1))
    c, ky, kx = g.fresh(C), g.fresh(KH), g.fresh(KW)

    def value(idx):
        n, o, oy, ox = idx
        iy, cy = g.window(oy, ky, sh, ph, H, dh)
        ix, cx = g.window(ox, kx, sw, pw, Wd, dw)
        prod = g.mul(x.load(X, x.ravel((n, c, iy, ix), X.shape)), x.load(W, x.ravel((o, c, ky, kx), W.shape)),
                     X.dtype)
        return g.sum((c, ky, kx), g.masked(cy + cx, prod, X.dtype), X.dtype)
    return value


def _conv2d_bwd_data(g: _Gen, t: Template):
    x, (G, W) = g.x, t.inputs
    O, _, KH, KW = W.shape
    _, _, OH, OW = G.shape
    (sh, sw), (ph, pw), (dh, dw) = t.attrs["stride"], t.attrs["pad"], t.attrs.get("dilation", (1, 1))
    o, ky, kx = g.fresh(O), g.fresh(KH), g.fresh(KW)

    def value(idx):
        n, c, iy, ix = idx
        oy, cy = g.back_window(iy, ky, sh, ph, OH, dh)
        ox, cx = g.back_window(ix, kx, sw, pw, OW, dw)
        prod = g.mul(x.load(G, x.ravel((n, o, oy, ox), G.shape)), x.load(W, x.ravel((o, c, ky, kx), W.shape)),
                     G.dtype)
        return g.sum((o, ky, kx), g.masked(cy + cx, prod, G.dtype), G.dtype)
    return value


def _conv2d_bwd_filter(g: _Gen, t: Template):
    x, (X, G) = g.x, t.inputs
    N, _, H, Wd = X.shape
    _, _, OH, OW = G.shape
    (sh, sw), (ph, pw), (dh, dw) = t.attrs["stride"], t.attrs["pad"], t.attrs.get("dilation", (1, 1))
    n, oy, ox = g.fresh(N), g.fresh(OH), g.fresh(OW)

    def value(idx):
        o, c, ky, kx = idx
        iy, cy = g.window(oy, ky, sh, ph, H, dh)
        ix, cx = g.window(ox, kx, sw, pw, Wd, dw)
        prod = g.mul(x.load(X, x.ravel((n, c, iy, ix), X.shape)), x.load(G, x.ravel((n, o, oy, ox), G.shape)),
                     X.dtype)
        return g.sum((n, oy, ox), g.masked(cy + cx, prod, X.dtype), X.dtype)
    return value


def _pool2d(g: _Gen, t: Template):
    x, (X,) = g.x, t.inputs
    _, _, H, Wd = X.shape
    (kh, kw), (sh, sw), (ph, pw) = t.attrs["kernel"], t.attrs["stride"], t.attrs["pad"]
    is_max = t.attrs["mode"] == "max"
    ky, kx = g.fresh(kh), g.fresh(kw)
    dt = X.dtype

    def value(idx):
        n, c, oy, ox = idx
        iy, cy = g.window(oy, ky, sh, ph, H)
        ix, cx = g.window(ox, kx, sw, pw, Wd)
        v = x.load(X, x.ravel((n, c, iy, ix), X.shape))
        if is_max:
            return x.reduce("max", (ky, kx), g.masked(cy + cx, v, dt, -math.inf), dt)
        return g.mul(g.sum((ky, kx), g.masked(cy + cx, v, dt), dt), x.lit(1.0 / (kh * kw), dt), dt)
    return value


def _pool2d_bwd(g: _Gen, t: Template):
    x, (X, G) = g.x, t.inputs
    _, _, H, Wd = X.shape
    _, _, OH, OW = G.shape
    (kh, kw), (sh, sw), (ph, pw) = t.attrs["kernel"], t.attrs["stride"], t.attrs["pad"]
    is_max = t.attrs["mode"] == "max"
    ky, kx = g.fresh(kh), g.fresh(kw)
    dt = G.dtype

    def value(idx):
        n, c, iy, ix = idx
        oy, cy = g.back_window(iy, ky, sh, ph, OH)
        ox, cx = g.back_window(ix, kx, sw, pw, OW)
        grad = x.load(G, x.ravel((n, c, oy, ox), G.shape))
        conds = cy + cx
        if is_max:  # this tap is the first maximum of window (oy, ox)
            ky2, kx2 = g.fresh(kh), g.fresh(kw)
            sy, vy = g.window(oy, ky2, sh, ph, H)
            sx, vx = g.window(ox, kx2, sw, pw, Wd)
            v = g.masked(vy + vx, x.load(X, x.ravel((n, c, sy, sx), X.shape)), X.dtype, -math.inf)
            first = x.reduce("argmax", (ky2, kx2), v, DType.i32)
            conds = conds + [g.cond("eq", first, g.i32(x.ravel((ky, kx), (kh, kw))))]
        else:
            grad = g.mul(grad, x.lit(1.0 / (kh * kw), dt), dt)
        return g.sum((ky, kx), g.masked(conds, grad, dt), dt)
    return value


def _take(g: _Gen, t: Template):
    x, (table, idx) = g.x, t.inputs
    rank = len(idx.shape)
    width = math.prod(table.shape[1:])

    def value(out_idx):
        row = x.gather(x.load(idx, x.ravel(out_idx[:rank], idx.shape)), table.shape[0])
        return x.load(table, x.add(x.mul(row, width), x.ravel(out_idx[rank:], table.shape[1:])))
    return value


def _scatter_add(g: _Gen, t: Template):
    x, (G, idx) = g.x, t.inputs
    rows = t.attrs["rows"]
    src = tuple(g.fresh(d) for d in idx.shape)
    rest = t.output.shape[1:]
    width = math.prod(rest)
    dt = G.dtype

    def value(out_idx):
        r, cols = out_idx[0], out_idx[1:]
        row = x.gather(x.load(idx, x.ravel(src, idx.shape)), rows)
        hit = g.cond("eq", g.i32(row), g.i32(r))
        v = x.load(G, x.add(x.mul(x.ravel(src, idx.shape), width), x.ravel(cols, rest)))
        return g.sum(src, g.masked([hit], v, dt), dt)
    return value


def _colsum(g: _Gen, t: Template):
    x, (X,) = g.x, t.inputs
    axes = tuple(t.attrs["axes"])
    red = {a: g.fresh(X.shape[a]) for a in axes}

    def value(out_idx):
        kept = iter(out_idx)
        full = tuple(red[a] if a in red else next(kept) for a in range(len(X.shape)))
        return g.sum(tuple(red[a] for a in axes), x.load(X, x.ravel(full, X.shape)), X.dtype)
    return value


TEMPLATES: dict[str, Callable] = {
    "matmul": _matmul, "batch_matmul": _batch_matmul, "conv2d": _conv2d, "conv2d_bwd_data": _conv2d_bwd_data,
    "conv2d_bwd_filter": _conv2d_bwd_filter, "pool2d": _pool2d, "pool2d_bwd": _pool2d_bwd,
    "take": _take, "scatter_add": _scatter_add, "colsum": _colsum,
}


def _conv_multiply_adds(t: Template) -> int:
    """Every output element of the forward convolution takes C*KH*KW products; both
    gradients take the same products in another order."""
    weights = t.output if t.op == "conv2d_bwd_filter" else t.inputs[1]
    grid = t.inputs[1] if t.op == "conv2d_bwd_filter" else t.inputs[0] if t.op == "conv2d_bwd_data" else t.output
    n, o, oh, ow = grid.shape
    return n * o * oh * ow * math.prod(weights.shape[1:])


def _matmul_multiply_adds(t: Template) -> int:
    a = t.inputs[0]  # [k, m] or [m, k], or a stack of those
    return math.prod(t.output.shape) * (a.shape[-2] if t.attrs.get("ta") else a.shape[-1])


# the kinds whose work is multiply-adds (the GEMM-like ones), for rooflines
MULTIPLY_ADDS: dict[str, Callable[[Template], int]] = {
    "matmul": _matmul_multiply_adds, "batch_matmul": _matmul_multiply_adds, "conv2d": _conv_multiply_adds,
    "conv2d_bwd_data": _conv_multiply_adds,
    "conv2d_bwd_filter": _conv_multiply_adds,
}


def multiply_adds(part) -> int:
    """A matmul's or convolution's multiply-adds; 0 for every other part."""
    fn = MULTIPLY_ADDS.get(part.op) if isinstance(part, Template) else None
    return fn(part) if fn else 0


def generic(t: Template, x: Exprs, fresh) -> list[LoopNest]:
    """The template as loop nests: its output, then its epilogue."""
    nest = _output_nest(x, t, TEMPLATES[t.op](_Gen(x, fresh), t), fresh)
    return [nest] + ([t.epilogue] if t.epilogue is not None else [])


def expand_templates(program: KernelProgram, keep=frozenset()) -> KernelProgram:
    """The program with every template whose kind is not in `keep` as plain loop nests
    (inside loop bodies too)."""
    x = Exprs()
    count = [0]

    def fresh(extent):
        count[0] += 1
        return x.var(f"g{count[0]}", extent)

    def expand(entries):
        out = []
        for k in entries:
            if isinstance(k, Loop):
                out.append(replace(k, body=expand(k.body)))
                continue
            parts = []
            for part in k.parts:
                if isinstance(part, Template) and part.op not in keep:
                    parts += generic(part, x, fresh)
                else:
                    parts.append(part)
            out.append(replace(k, parts=parts))
        return out

    return replace(program, kernels=expand(program.kernels))
