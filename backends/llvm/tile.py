"""A template's elementwise epilogue applied to the GEMM's register tile.

The matmul template's epilogue (kernel IR: a loop nest over the output [m, n], rows r,
columns j) usually reads the product at the element it writes and combines it with
other buffers -- bias, activation masks, or the optimizer update of the weight whose
gradient the product is. `tile_epilogue` turns it into a gemm.py `TileEpilogue`: code
the microkernel runs on each W-wide vector of its accumulator tile in the last K block,
before (or instead of) storing it. Loads whose index moves by one element per column
become vector loads; everything that does not depend on the column is computed as a
scalar by the ordinary emitter (emit.py) and broadcast; the product itself is the tile's
register. When nothing else reads the product (a weight gradient consumed only by its
update), the tile is never stored: the gradient goes from registers into the update.

Only what renders exactly as the scalar code does is vectorized (float arithmetic,
comparisons, selects, the math library); any other epilogue returns None and runs after
the GEMM as before.
"""
from __future__ import annotations

import weakref
from dataclasses import fields, is_dataclass

from llvmlite import ir

from dlc.core.kernel import (Buffer, FreeVars, Index, KernelProgram, Load, LoopNest, Op, Template, Var, all_kernels,
                             nests_of, viewed_buffers, walk_ex)
from dlc.core.types import DType

from .emit import SCALAR_OPS, Emitter, affine_coef
from .gemm import TileEpilogue
from .irutil import F32, I32, splat

# ops whose emit.py rendering is valid on vectors as written
VECTOR_OPS = {"add", "sub", "mul", "div", "neg", "abs", "max", "min", "exp", "log", "sqrt", "tanh", "sigmoid",
              "pow", "lt", "le", "gt", "ge", "eq", "ne", "and", "select", "copy"}


lane_coef = affine_coef  # how much an index grows per column

def _read_elsewhere(program: KernelProgram, t: Template) -> bool:
    """Does anything but t's own epilogue read t's output buffer?"""
    name = t.output.name
    if t.output.kind != "arena":
        return True
    if any(b.name == name for b in program.outputs.values()) or any(s.name == name for s, _ in program.copies):
        return True
    by_templates, by_nests, viewed = _readers(program)
    return name in viewed or name in by_templates or bool(by_nests.get(name, set()) - {id(t)})


_READERS: dict = {}  # id(program) -> (a weak reference to it, what _readers found)


def _readers(program: KernelProgram) -> tuple[set, dict, set]:
    """Who reads which buffer in `program` (loop bodies' kernels too): the buffers templates
    take as inputs, {buffer: ids of the parts whose loop nests load it}, and the buffers
    loops view a step at a time. Computed once per program: asked for each matmul, the
    walk over every kernel's expressions made a deep model's build quadratic (a 100-layer
    MLP: 7 of its 11 s)."""
    ref, found = _READERS.get(id(program), (None, None))
    if ref is None or ref() is not program:  # (a program no longer alive may have had its id)
        by_templates, by_nests = set(), {}
        for k in all_kernels(program.kernels):
            for part in k.parts:
                if isinstance(part, Template):
                    by_templates.update(b.name for b in part.inputs)
                for nest in nests_of(part):
                    for e in walk_ex([s.value for s in nest.row_stores + nest.stores]):
                        if isinstance(e, Load):
                            by_nests.setdefault(e.buf.name, set()).add(id(part))
        found = (by_templates, by_nests, viewed_buffers(program.kernels))
        for key in [key for key, (r, _) in _READERS.items() if r() is None]:
            del _READERS[key]
        _READERS[id(program)] = (weakref.ref(program), found)
    return found


def _supported(epi: LoopNest, out: str, lane: str, free: FreeVars) -> bool:
    if epi.row_stores or len(epi.outer) + len(epi.inner) != 2:
        return False
    for s in epi.stores:
        if s.buf.dtype != DType.f32 or lane_coef(s.flat, lane, free) != 1:
            return False
    for e in walk_ex([s.value for s in epi.stores]):
        if lane not in free(e):
            continue  # a scalar: emit.py renders anything
        if isinstance(e, Load):
            if e.buf.dtype != DType.f32 or lane_coef(e.index, lane, free) != 1:
                return False
        elif isinstance(e, Index):
            if lane_coef(e.ix, lane, free) != 1 or e.dtype not in (DType.f32, DType.i32):
                return False
        elif isinstance(e, Op):
            if e.name == "cast":
                if not (e.dtype == DType.f32 and e.args[0].dtype in (DType.bool, DType.f32)):
                    return False
            elif e.name not in VECTOR_OPS:
                return False
            elif any(a.dtype not in (DType.f32, DType.bool) for a in e.args):
                return False
        else:
            return False  # random numbers, reductions over the column
    return True


class _VecEval:
    """Kernel-IR values at W consecutive columns: vectors, or scalars where uniform."""

    def __init__(self, em: Emitter, v, lane: str, out: str, x, mask, free: FreeVars):
        self.em, self.v, self.b, self.lane, self.out = em, v, em.b, lane, out
        self.x, self.mask, self.free = x, mask, free
        self.cache: dict[int, ir.Value] = {}

    def is_vec(self, value) -> bool:
        return isinstance(value.type, ir.VectorType)

    def splat(self, x):
        return splat(self.b, x, self.v.w)

    def vector(self, e):
        x = self.value(e)
        return x if self.is_vec(x) else self.splat(x)

    def value(self, e):
        if self.lane not in self.free(e):
            return self.em.value(e)
        hit = self.cache.get(id(e))
        if hit is None:
            hit = self.cache[id(e)] = self._value(e)
        return hit

    def pointer(self, buf, index):
        return self.b.gep(self.em.pointers[buf.name], [self.em.ix(index)], source_etype=F32)

    def _value(self, e):
        b, v = self.b, self.v
        if isinstance(e, Load):
            if e.buf.name == self.out:
                return self.x
            return v.load(self.pointer(e.buf, e.index), self.mask)
        if isinstance(e, Index):
            lanes = b.add(self.splat(self.em.ix(e.ix)), v.lanes)
            if e.dtype == DType.f32:
                return b.sitofp(lanes, v.ty)
            return b.trunc(lanes, ir.VectorType(I32, v.w))
        assert isinstance(e, Op)
        args = [self.value(a) for a in e.args]
        if e.name == "cast":
            x = args[0] if self.is_vec(args[0]) else self.splat(args[0])
            return b.uitofp(x, v.ty) if e.args[0].dtype == DType.bool else x
        if e.name == "select":
            cond, on, off = args
            if self.is_vec(cond):
                on, off = (a if self.is_vec(a) else self.splat(a) for a in (on, off))
            else:
                on, off = (a if self.is_vec(a) else self.splat(a) for a in (on, off))
            return b.select(cond, on, off)
        args = [a if self.is_vec(a) else self.splat(a) for a in args]
        in_dtype = e.args[-1].dtype
        return SCALAR_OPS[e.name](b, args, e.dtype, in_dtype)


def tile_epilogue(program: KernelProgram, t: Template) -> TileEpilogue | None:
    """The matmul template t's epilogue as register-tile code, or None when it cannot be."""
    epi = t.epilogue
    if epi is None:
        return None
    free = FreeVars()
    row, lane = (list(epi.outer) + list(epi.inner))
    out = t.output.name
    if not _supported(epi, out, lane.name, free):
        return None
    names = []
    for s in epi.stores:
        if s.buf.name != out and s.buf.name not in names:
            names.append(s.buf.name)
    for e in walk_ex([s.value for s in epi.stores]):
        if isinstance(e, Load) and e.buf.name != out and e.buf.name not in names:
            names.append(e.buf.name)
    writes_out = any(s.buf.name == out for s in epi.stores)
    store_c = writes_out or _read_elsewhere(program, t)

    def emit(b, v, ptrs: dict, row_ix, col_ix, x, mask):
        """Stores for the W columns at (row_ix, col_ix..); returns the value C gets."""
        em = Emitter(b, ptrs)
        em.vars[row.name] = row_ix
        em.vars[lane.name] = col_ix
        ev = _VecEval(em, v, lane.name, out, x, mask, free)
        values = [ev.vector(s.value) for s in epi.stores]  # every value before any store
        c_value = x
        for s, value in zip(epi.stores, values):
            if s.buf.name == out:
                c_value = value
            else:
                v.store(value, ev.pointer(s.buf, s.flat), mask)
        return c_value

    order = {name: i for i, name in enumerate(names)} | {out: "C"}
    key = (store_c, _structure([(s.buf, s.flat, s.value) for s in epi.stores], order,
                               {row.name: "row", lane.name: "lane"}, {}))

    def prefetch(b, v, ptrs, row_ix, col_ix):
        """A prefetch of each buffer the epilogue stores, at (row_ix, col_ix..)."""
        em = Emitter(b, ptrs)
        em.vars[row.name] = row_ix
        em.vars[lane.name] = col_ix
        ev = _VecEval(em, v, lane.name, out, None, None, free)
        first = {}  # buffer -> its first store
        for s in epi.stores:
            if s.buf.name != out:
                first.setdefault(s.buf.name, s)
        for s in first.values():
            v.prefetch(ev.pointer(s.buf, s.flat), write=True)

    return TileEpilogue(key=key, args=tuple(names), store_c=store_c, emit=emit, prefetch=prefetch)


def _structure(x, buffers: dict, loop_vars: dict, memo: dict):
    """What the code emitted for x depends on, as nested tuples: buffers by argument
    position (C: the product) with dtype and shape, loop variables by role, everything
    else as it is. Two epilogues with equal structure emit the same code, so they share
    one GEMM function (the evaluation step's forward layers and the training step's)."""
    if isinstance(x, Buffer):
        return ("buffer", buffers[x.name], x.dtype, x.shape)
    if isinstance(x, Var):
        return ("var", loop_vars.get(x.name, x.name), x.extent, x.lo, x.hi)
    if isinstance(x, (tuple, list)):
        return tuple(_structure(y, buffers, loop_vars, memo) for y in x)
    if is_dataclass(x):
        if id(x) not in memo:  # expressions are DAGs: each shared node once
            memo[id(x)] = (type(x).__name__,) + tuple(
                _structure(getattr(x, f.name), buffers, loop_vars, memo) for f in fields(x))
        return memo[id(x)]
    return x
