"""Kernel IR -> LLVM IR inside one function: scalar and index expressions and loop nests.

SCALAR_OPS is the one table from the kernel IR's scalar ops to IR-builder calls;
IX_RULES and EX_RULES map each node class to its rendering. Values are cached per loop
scope by expression identity (the kernel IR is hash-consed), so a shared subexpression
is computed once; values that depend only on a row's index are computed before the
row's inner loop. Used by codegen.py (loop-nest parts) and templates.py (epilogues).

No instruction carries a fast-math flag, so every LLVM pipeline computes the same bits:
multiply-adds are fused here (mathlib.fma), and float sums are vectorized here, in one
order (Emitter._vectorizable), where LLVM would have needed `reassoc` to do it.
"""
from __future__ import annotations

import itertools
import math

from llvmlite import ir

from dlc.core.kernel import (hoistable, Add, Clamp, Const, Div, Ex, FreeVars, Gather, Index, Ix, Lit, Load, LoopNest, Mod, Mul,
                             Op, Rand, Reduce, Var, walk_ex)
from dlc.core.types import DType

from . import mathlib
from .irutil import (F32, I1, I8, I32, I64, VOID, byte_size, const_vector, gep, hsum, i32, i64, loop, memory_type,
                     smax, smin, splat, split, value_type)

GOLDEN = 0x9E3779B1
# Loads whose index grows by up to this much a lane are vectorized (strided_lane): a
# stride-s layer's input rows: a few vector loads and a shuffle for W elements.
MAX_STRIDE = 4


# --- scalar ops --------------------------------------------------------------------------------

def _arith(fop, iop):
    def emit(b, args, dtype, in_dtype):
        return (fop if in_dtype.is_float else iop)(b, *args)
    return emit


def _fadd(b, x, y): return b.fadd(x, y)
def _fsub(b, x, y): return b.fsub(x, y)
def _fmul(b, x, y): return b.fmul(x, y)
def _fdiv(b, x, y): return b.fdiv(x, y)


def _idiv(b, x, y):
    """Floor division, as numpy's // on integers."""
    q = b.sdiv(x, y)
    r = b.srem(x, y)
    adjust = b.and_(b.icmp_signed("!=", r, ir.Constant(x.type, 0)),
                    b.icmp_signed("<", b.xor(r, y), ir.Constant(x.type, 0)))
    return b.sub(q, b.zext(adjust, x.type))


def _cmp(fop: str, iop: str):
    def emit(b, args, dtype, in_dtype):
        if in_dtype.is_float:
            return b.fcmp_unordered(fop, *args) if fop == "!=" else b.fcmp_ordered(fop, *args)
        return b.icmp_signed(iop, *args)
    return emit


def _neg(b, args, dtype, in_dtype):
    return b.fneg(args[0]) if in_dtype.is_float else b.neg(args[0])


def _abs(b, args, dtype, in_dtype):
    x = args[0]
    if in_dtype.is_float:
        return mathlib.fabs(b, x)
    return b.select(b.icmp_signed("<", x, ir.Constant(x.type, 0)), b.neg(x), x)


def _sign(b, args, dtype, in_dtype):
    x = args[0]
    zero = ir.Constant(x.type, 0)
    if in_dtype.is_float:
        one = ir.Constant(x.type, 1.0)
        s = b.select(b.fcmp_ordered(">", x, zero), one,
                     b.select(b.fcmp_ordered("<", x, zero), ir.Constant(x.type, -1.0), zero))
        return b.select(b.fcmp_unordered("uno", x, x), x, s)
    return b.sub(b.zext(b.icmp_signed(">", x, zero), x.type), b.zext(b.icmp_signed("<", x, zero), x.type))


def _minmax(fn, pred):
    def emit(b, args, dtype, in_dtype):
        x, y = args
        if in_dtype.is_float:
            return fn(b, x, y)
        return b.select(b.icmp_signed(pred, x, y), x, y)
    return emit


def _cast(b, args, dtype, in_dtype):
    x = args[0]
    to = value_type(dtype)
    if in_dtype == dtype:
        return x
    if dtype == DType.bool:
        return b.fcmp_unordered("!=", x, ir.Constant(x.type, 0.0)) if in_dtype.is_float else \
            b.icmp_signed("!=", x, ir.Constant(x.type, 0))
    if in_dtype == DType.bool:
        return b.uitofp(x, to) if dtype.is_float else b.zext(x, to)
    if in_dtype.is_float and dtype.is_float:
        return b.fptrunc(x, to) if dtype == DType.f32 else b.fpext(x, to)
    if in_dtype.is_float:
        return b.fptosi(x, to)
    return b.sitofp(x, to)


def _float_fn(fn):
    def emit(b, args, dtype, in_dtype):
        return fn(b, *args)
    return emit


SCALAR_OPS = {
    "add": _arith(_fadd, lambda b, x, y: b.add(x, y)),
    "sub": _arith(_fsub, lambda b, x, y: b.sub(x, y)),
    "mul": _arith(_fmul, lambda b, x, y: b.mul(x, y)),
    "div": _arith(_fdiv, _idiv),
    "neg": _neg,
    "abs": _abs,
    "sign": _sign,
    "max": _minmax(mathlib.maximum, ">"),
    "min": _minmax(mathlib.minimum, "<"),
    "exp": _float_fn(mathlib.exp),
    "log": _float_fn(mathlib.log),
    "sqrt": _float_fn(mathlib.sqrt),
    "tanh": _float_fn(mathlib.tanh),
    "sigmoid": _float_fn(mathlib.sigmoid),
    "pow": _float_fn(mathlib.pow),
    "lt": _cmp("<", "<"), "le": _cmp("<=", "<="), "gt": _cmp(">", ">"), "ge": _cmp(">=", ">="),
    "eq": _cmp("==", "=="), "ne": _cmp("!=", "!="),
    "and": lambda b, args, dtype, in_dtype: b.and_(*args),
    "select": lambda b, args, dtype, in_dtype: b.select(*args),
    "cast": _cast,
    "copy": lambda b, args, dtype, in_dtype: args[0],
}


# --- expressions ---------------------------------------------------------------------------------

def _nonneg(*xs) -> tuple:
    """Wrap flags: values never negative may also promise no unsigned wrap."""
    return ("nuw", "nsw") if all(x.lo >= 0 for x in xs) else ("nsw",)


def _floor_div(b, x, c: int):
    q, r = b.sdiv(x, i64(c)), b.srem(x, i64(c))
    return b.sub(q, b.zext(b.icmp_signed("<", r, i64(0)), I64))


def _floor_mod(b, x, c: int):
    r = b.srem(x, i64(c))
    return b.add(r, b.select(b.icmp_signed("<", r, i64(0)), i64(c), i64(0)))


def _clamp(em, e: Clamp):
    v = em.ix(e.a)
    if e.a.lo < e.lo:
        v = smax(em.b, v, i64(e.lo))
    if e.a.hi > e.hi:
        v = smin(em.b, v, i64(e.hi))
    return v


# kernel-IR index node -> LLVM value (i64)
IX_RULES = {
    Var: lambda em, e: em.vars[e.name],
    Const: lambda em, e: i64(e.value),
    Add: lambda em, e: em.b.add(em.ix(e.a), em.ix(e.b), flags=_nonneg(e.a, e.b)),
    Mul: lambda em, e: em.b.mul(em.ix(e.a), i64(e.c), flags=_nonneg(e.a) if e.c >= 0 else ("nsw",)),
    Div: lambda em, e: em.b.udiv(em.ix(e.a), i64(e.c)) if e.a.lo >= 0 else _floor_div(em.b, em.ix(e.a), e.c),
    Mod: lambda em, e: em.b.urem(em.ix(e.a), i64(e.c)) if e.a.lo >= 0 else _floor_mod(em.b, em.ix(e.a), e.c),
    Clamp: _clamp,
    Gather: lambda em, e: em.b.sext(em.value(e.value), I64),
}


def _load(em, e: Load):
    if em.lane_vars & em.free_vars.ix(e.index):
        return em.lane_load(e)
    b = em.b
    t = memory_type(e.buf.dtype)
    v = b.load(gep(b, em.pointers[e.buf.name], em.ix(e.index), t), typ=t, align=byte_size(t))
    return b.trunc(v, I1) if e.buf.dtype == DType.bool else v


def _index(em, e: Index):
    b, v = em.b, em.ix(e.ix)
    if e.dtype.is_float:
        return b.sitofp(v, value_type(e.dtype))
    return b.trunc(v, I32) if e.dtype == DType.i32 else b.icmp_signed("!=", v, i64(0))


def _op(em, e: Op):
    if e.name in ("add", "sub") and e.dtype.is_float:
        fused = _fused(em, e)
        if fused is not None:
            return fused
    values = em.same_shape([em.value(x) for x in e.args])
    in_dtype = e.args[0].dtype if e.name == "cast" else e.args[1].dtype if e.name == "select" else e.args[-1].dtype
    return SCALAR_OPS[e.name](em.b, values, e.dtype, in_dtype)


def _fused(em, e: Op):
    """a*b + c, c + a*b, a*b - c or c - a*b as one fused multiply-add (mathlib.fma), as
    LLVM's `contract` would have fused them, but in every pipeline alike; None for
    another add or subtract."""
    x, y = e.args

    def mul(n):
        return isinstance(n, Op) and n.name == "mul" and n.dtype == e.dtype
    if mul(x):
        a, b, c = em.same_shape([em.value(x.args[0]), em.value(x.args[1]), em.value(y)])
        return mathlib.fma(em.b, a, b, c if e.name == "add" else em.b.fneg(c))
    if mul(y):
        a, b, c = em.same_shape([em.value(y.args[0]), em.value(y.args[1]), em.value(x)])
        return mathlib.fma(em.b, a if e.name == "add" else em.b.fneg(a), b, c)
    return None


# kernel-IR scalar node -> LLVM value
EX_RULES = {
    Load: _load,
    Lit: lambda em, e: _literal(e.value, e.dtype),
    Index: _index,
    Op: _op,
    Rand: lambda em, e: em.rand(e),
    Reduce: lambda em, e: em.reduce(e),
}


class _Lanes:
    """The IR builder inside a vectorized loop body: an operation given vectors and scalars
    splats the scalars, and a cast of a vector casts to the vector of the type asked for;
    anything else goes to the builder unchanged. The expression rules (and mathlib) then
    emit the body for W lanes as they would for one."""
    _BINARY = {"add", "sub", "mul", "sdiv", "udiv", "srem", "urem", "shl", "lshr", "ashr", "and_", "or_", "xor",
               "fadd", "fsub", "fmul", "fdiv", "frem"}
    _COMPARE = {"icmp_signed", "icmp_unsigned", "fcmp_ordered", "fcmp_unordered"}
    _CASTS = {"trunc", "zext", "sext", "fptrunc", "fpext", "bitcast", "fptoui", "uitofp", "fptosi", "sitofp"}

    def __init__(self, b: ir.IRBuilder, w: int, splat_early: bool = False):
        self.builder, self.w, self.splat_early = b, w, splat_early

    def wide(self, values: list) -> list:
        if not any(isinstance(v.type, ir.VectorType) for v in values):
            return values
        return [v if isinstance(v.type, ir.VectorType) else self._splat(v) for v in values]

    def _splat(self, x: ir.Value) -> ir.Value:
        """x in every lane; with `splat_early`, splat where x is computed, so that a value
        from outside the loop is not splat again in every iteration (Emitter.licm)."""
        if not self.splat_early or not isinstance(x, ir.Instruction) or x.parent is self.builder.block:
            return splat(self.builder, x, self.w)
        at = ir.IRBuilder(x.parent)
        if isinstance(x, ir.PhiInstr):  # after the block's phis
            at.position_before(next(i for i in x.parent.instructions if not isinstance(i, ir.PhiInstr)))
        else:
            at.position_after(x)
        return splat(at, x, self.w)

    def __getattr__(self, name: str):
        op = getattr(self.builder, name)
        if name in self._BINARY:
            return lambda x, y, *rest, **kw: op(*self.wide([x, y]), *rest, **kw)
        if name == "select":
            return lambda c, x, y, *rest, **kw: op(*self.wide([c, x, y]), *rest, **kw)
        if name in self._COMPARE:
            return lambda pred, x, y, *rest, **kw: op(pred, *self.wide([x, y]), *rest, **kw)
        if name in self._CASTS:
            def cast(x, typ, *rest, **kw):
                if isinstance(x.type, ir.VectorType) and not isinstance(typ, ir.VectorType):
                    typ = ir.VectorType(typ, x.type.count)
                return op(x, typ, *rest, **kw)
            return cast
        return op


def _vector_width(fn: ir.Function) -> int:
    """The float lanes a sum in fn is vectorized for: the target's vector width."""
    for attr in fn.attributes:
        if attr.startswith('"prefer-vector-width"='):
            return int(attr.split("=", 1)[1].strip('"')) // 32
    return 1


class Emitter:
    """Emits kernel-IR expressions inside one LLVM function."""

    def __init__(self, b: ir.IRBuilder, pointers: dict[str, ir.Value]):
        self.b = b
        self.pointers = pointers          # buffer name -> pointer
        self.vars: dict[str, ir.Value] = {}
        self.scopes: list[dict[int, ir.Value]] = [{}]
        self.free_vars = FreeVars()
        self.siblings: dict[int, list] = {}  # id(sum) -> the sums to compute with it (group_sums)
        self.rewritten: dict[int, tuple] = {}  # id(sum) -> (its split form, the new sums) (group_sums)
        # inside a vectorized reduction's body (_lane_sums): its loop variables (bound to
        # vectors of W consecutive values), their first lane's value, the scopes outside it
        self.lane_vars: frozenset = frozenset()
        self.lane_base = None
        self.lane_depth = 0
        self.lane_mask = None  # the lanes inside the loop, in a last partial vector
        self.lane_live = 0  # how many of the W lanes are inside the loop
        self.substitutes: dict[int, ir.Value] = {}  # id(index node) -> its value (lane_load)
        # LLVM's loop-invariant code motion done here (hoist_out_of), for the modules
        # compiled without it (jit.PRETUNED_PASSES); O3's own gives other code (a small
        # matmul of the MLP at batch 8 was compiled differently, its step 3-5% slower)
        self.licm = False
        self.scalar_loops = 0  # sums and store loops left scalar here (codegen._pretuned)

    # scopes: a value computed in a loop body is only reused inside that body
    def push(self):
        self.scopes.append({})

    def pop(self):
        self.scopes.pop()

    def _cached(self, key):
        for s in reversed(self.scopes):
            if key in s:
                return s[key]
        return None

    def ix(self, e: Ix) -> ir.Value:
        if id(e) in self.substitutes:
            return self.substitutes[id(e)]
        hit = self._cached(id(e))
        if hit is None:
            hit = self.scopes[-1][id(e)] = IX_RULES[type(e)](self, e)
        return hit

    def hoist(self, e: Ex, bound: frozenset, seen: set) -> None:
        """Compute now (in the current scope) the parts of e that depend only on `bound`."""
        for part in hoistable(e, bound, self.free_vars, lambda x: self._cached(id(x)) is not None, seen):
            self.value(part)

    def hoist_out_of(self, exprs, inner: set) -> None:
        """With `licm`, compute now the parts of `exprs` that depend on none of the loop
        variables `inner` (those of the loops about to be entered)."""
        if not self.licm:
            return
        seen: set = set()
        for e in exprs:
            self.hoist(e, self.free_vars(e) - inner, seen)

    def value(self, e: Ex) -> ir.Value:
        hit = self._cached(id(e))
        if hit is None:
            hit = self.scopes[-1][id(e)] = EX_RULES[type(e)](self, e)
        return hit

    def same_shape(self, values: list) -> list:
        """values, each a vector where one is (in a vectorized body), else unchanged."""
        return self.b.wide(values) if isinstance(self.b, _Lanes) else values

    def _live_lanes(self, w: int, live: int | None) -> None:
        """The vector body's lanes inside the loop: all W, or the first `live` (a mask)."""
        self.lane_live = w if live is None else live
        self.lane_mask = None if live is None else const_vector(I1, [j < live for j in range(w)])

    def lane_load(self, e: Load) -> ir.Value:
        """A vector load of W consecutive elements (the index grows by 1 a lane: checked
        by _vectorizable), from where the first lane's index points. An index that grows
        by 1 a lane through a clamp (a padded axis: clamp(x, lo, hi)) loads the lanes
        inside lo..hi from there and gives the others the element at lo or at hi; one
        that grows by s a lane (a strided layer's input, maybe through a clamp) picks
        every s-th element of the run its lanes read (_strided_run); one that grows
        through x // s (a strided layer's gradient) loads the elements its lanes read
        once each and spreads them over the lanes."""
        b, w = self.b.builder, self.b.w
        var = min(self.lane_vars & self.free_vars.ix(e.index))  # (one: a body's loads use its own loop's)
        if affine_coef(e.index, var, self.free_vars) == 1:
            return self._run(e, None, {}, self.lane_mask)
        clamp = clamped_lane(e.index, var, self.free_vars)
        if clamp is not None:
            return self._run(e, clamp, {}, self.lane_mask)
        strided = strided_lane(e.index, var, self.free_vars)
        if strided is not None:
            return self._strided_run(e, *strided)
        div, clamp = divided_lane(e.index, var, self.free_vars)
        s = div.c
        a0 = self._at_first_lane(lambda: self.ix(div.a))
        q0 = _floor_div(b, a0, s)  # lane j reads element q0 + (p + j) // s of the run from q0
        p = b.sub(a0, b.mul(q0, i64(s)))
        m = const_vector(I64, range(w))  # the run's elements that live lanes read
        inside = b.icmp_signed("<", b.sub(b.mul(m, splat(b, i64(s), w)), splat(b, p, w)),
                               splat(b, i64(self.lane_live), w))
        run = self._run(e, clamp, {id(div): q0}, inside)
        out = None
        for phase in range(s):  # the spread for each value of p
            spread = b.shuffle_vector(run, run, ir.Constant(ir.VectorType(I32, w), [(phase + j) // s for j in range(w)]))
            out = spread if out is None else b.select(b.icmp_signed("==", p, i64(phase)), spread, out)
        return out

    def _run(self, e: Load, clamp, subs: dict, mask) -> ir.Value:
        """W consecutive elements of e's buffer from the first lane's index (with `subs`,
        id(index node) -> its value there), masked-off lanes reading nothing; through
        `clamp`, those outside its bounds the element at lo or at hi instead."""
        b, w = self.b.builder, self.b.w
        t = memory_type(e.buf.dtype)
        other = None
        if clamp is None:
            at = self._first_lane(e.buf, e.index, subs)
        else:
            at, rel, ends = self._clamp_ends(e, clamp, subs, 1)
            inside, other = self._clamped_lanes(clamp, rel, ends)
            mask = inside if mask is None else b.and_(inside, mask)
        v = self._masked_load(at, ir.VectorType(t, w), mask, other)
        return b.trunc(v, ir.VectorType(I1, w)) if e.buf.dtype == DType.bool else v

    def _strided_run(self, e: Load, s: int, clamp) -> ir.Value:
        """W elements s apart from the first lane's index (a stride-s layer reads every
        s-th element of its input's rows): the run of elements from there to the last
        live lane's, loaded as vectors, and every s-th picked by a shuffle. Without a
        clamp, by _covered's unmasked loads. Through `clamp` (the index is
        s * clamp(x, lo, hi) plus terms free of the lane), s loads masked to the elements
        of the lanes inside lo..hi, whose others get the element at lo or at hi as in
        _run."""
        b, w = self.b.builder, self.b.w
        live = self.lane_live
        length = s * (live - 1) + 1  # the run: from the first live lane's element to the last's
        picks = [s * j for j in range(live)]
        if clamp is None:
            return self._covered(self._first_lane(e.buf, e.index), length, picks)
        at, rel, ends = self._clamp_ends(e, clamp, {}, s)
        shift = splat(b, b.mul(rel, i32(s)), w)  # run element t is a lane's inside lo..hi where
        limit = splat(b, i32(s * (clamp.hi - clamp.lo)), w)  # 0 <= t + s*rel <= s*(hi - lo)
        pieces = []
        for start in range(0, s * w, w):
            run = const_vector(I32, range(start, start + w))
            mask = b.and_(const_vector(I1, [t < length for t in range(start, start + w)]),
                          b.icmp_unsigned("<=", b.add(run, shift), limit))
            pieces.append(self._masked_load(gep(b, at, i64(start), F32), ir.VectorType(F32, w), mask))
        v = self._picked(pieces, list(range(0, s * w, w)), w, picks)
        inside, other = self._clamped_lanes(clamp, rel, ends)
        return b.select(inside, v, other)

    def _covered(self, at, length: int, picks) -> ir.Value:
        """A vector whose lane j holds float at[picks[j]] (all below `length`; lanes past the
        picks hold any of the elements), read by vector loads of at[0 .. length - 1] only:
        as wide as fits, the last one ending at length - 1 (it may overlap the one
        before), so none needs a mask. (On Zen 5 a masked load whose masked-off lanes
        crossed into the next cache line made the MobileNet's last filter gradient 1.8x
        slower than scalar code.)"""
        b, w = self.b.builder, self.b.w
        width = w if length >= w else 1 << (length.bit_length() - 1)
        starts = list(range(0, length - width + 1, width))
        starts += [length - width] * (starts[-1] + width < length)
        pieces = [b.load(gep(b, at, i64(a), F32), typ=ir.VectorType(F32, width), align=4) for a in starts]
        return self._picked(pieces, starts, width, picks)

    def _picked(self, pieces: list, starts: list, width: int, picks) -> ir.Value:
        """The W-lane vector of run elements `picks`, from vectors `pieces` of `width`
        elements each, piece p holding elements starts[p] .. starts[p] + width - 1."""
        b, w = self.b.builder, self.b.w
        picks = list(picks)
        where = [next(p * width + t - a for p, a in enumerate(starts) if a <= t < a + width)
                 for t in picks + [0] * (w - len(picks))]
        while len(pieces) > 1:  # one vector of the pieces in order (LLVM folds the shuffles)
            pieces += [ir.Constant(pieces[0].type, ir.Undefined)] * (len(pieces) % 2)
            pieces = [b.shuffle_vector(x, y, const_vector(I32, range(2 * x.type.count)))
                      for x, y in zip(pieces[::2], pieces[1::2])]
        return b.shuffle_vector(pieces[0], pieces[0], const_vector(I32, where))

    def _clamp_ends(self, e: Load, clamp: Clamp, subs: dict, s: int):
        """For a load through clamp(x, lo, hi) (times s): (the first lane's address were
        it unclamped, x - lo at the first lane as an i32, the elements at lo and at hi).
        The address is derived from the one with the clamp at lo: the index's arithmetic
        may assume it never wraps, which holds at the clamp's bounds."""
        b = self.b.builder
        t = memory_type(e.buf.dtype)
        at_lo, at_hi = (self._first_lane(e.buf, e.index, {**subs, id(clamp): i64(end)}) for end in (clamp.lo, clamp.hi))
        rel = b.sub(self._at_first_lane(lambda: self.ix(clamp.a), subs), i64(clamp.lo))
        at = b.gep(at_lo, [b.mul(rel, i64(s)) if s != 1 else rel], source_etype=t)
        ends = [b.load(p, typ=t, align=byte_size(t)) for p in (at_lo, at_hi)]
        return at, b.trunc(rel, I32), ends

    def _clamped_lanes(self, clamp: Clamp, rel, ends):
        """(the lanes whose x lies in lo..hi, the element at lo or at hi for the others),
        from x - lo at the first lane (i32 lanes: half the vectors of i64 ones)."""
        b, w = self.b.builder, self.b.w
        x = b.add(splat(b, rel, w), const_vector(I32, range(w)))  # x - lo, lane by lane
        inside = b.icmp_unsigned("<=", x, splat(b, i32(clamp.hi - clamp.lo), w))
        below = b.icmp_signed("<", x, splat(b, i32(0), w))
        return inside, b.select(below, splat(b, ends[0], w), splat(b, ends[1], w))

    def _masked_load(self, at, vt, mask, passthru=None):
        """A vector load of type vt from `at`; with `mask`, masked-off lanes read nothing
        (they may lie past the buffer's ends) and hold `passthru` (zeros when None)."""
        b = self.b.builder
        if mask is None:
            return b.load(at, typ=vt, align=byte_size(vt.element))
        name = f"llvm.masked.load.v{vt.count}{vt.element.intrinsic_name}.p0"
        fn = b.module.globals.get(name) or ir.Function(b.module, ir.FunctionType(vt, [at.type, mask.type, vt]), name)
        zero = [0.0] * vt.count if isinstance(vt.element, ir.FloatType) else [0] * vt.count
        return b.call(fn, [at, mask, const_vector(vt.element, zero) if passthru is None else passthru])

    def _at_first_lane(self, compute, subs: dict | None = None):
        """Inside a vectorized body: compute() for the first lane, as scalar code (with
        `subs`, id(index node) -> the value to use for it)."""
        lanes = self.b
        self.substitutes = subs or {}
        saved, self.scopes = self.scopes, self.scopes[:self.lane_depth] + [{}]  # no vector values
        names = {name: self.vars[name] for name in self.lane_vars}
        self.vars.update({name: self.lane_base for name in self.lane_vars})
        self.b = lanes.builder
        try:
            return compute()
        finally:
            self.b, self.scopes, self.substitutes = lanes, saved, {}
            self.vars.update(names)

    def _first_lane(self, buf, index: Ix, subs: dict | None = None) -> ir.Value:
        """Inside a vectorized body: the address of buf[index] for the first lane (with
        `subs`, as _at_first_lane)."""
        first = self._at_first_lane(lambda: self.ix(index), subs)
        return gep(self.b.builder, self.pointers[buf.name], first, memory_type(buf.dtype))

    def rand(self, e: Rand) -> ir.Value:
        b = self.b
        key = fmix32(b, b.xor(self.value(e.seed), fmix32(b, b.xor(i32(e.stream), fmix32(b, self.value(e.step))))))
        h = fmix32(b, b.xor(b.mul(b.trunc(self.ix(e.flat), I32), i32(GOLDEN)), key))
        return b.fmul(b.uitofp(b.lshr(h, i32(8)), F32), ir.Constant(F32, 2.0 ** -24))

    def group_sums(self, exprs, bound: frozenset) -> None:
        """Let sums in `exprs` over loops of the same extents, computable where only `bound`
        variables are fixed and holding no other reduction, run as one loop (multi-output
        reduction fusion: a batchnorm gradient's sums over a channel read their operands
        once, not once each). Each is computed with the others when the first is needed.
        A sum that needs another's result is first split into sums that do not
        (_split_dependent). The new nodes live in `rewritten` as long as the emitter, so
        their ids (the caches' keys) stay theirs."""
        by_domain: dict = {}
        for x in walk_ex(exprs):
            if not (isinstance(x, Reduce) and x.op == "sum" and x.vars and self.free_vars(x) <= bound):
                continue
            sums = [x]
            if any(isinstance(y, Reduce) for y in walk_ex([x.body])):
                split = self._split_dependent(x)
                if split is None:
                    continue
                self.rewritten[id(x)] = split
                sums = split[1]
            for r in sums:
                by_domain.setdefault(tuple(v.extent for v in r.vars), []).append(r)
        for members in by_domain.values():
            if len(members) > 1:
                for r in members:
                    self.siblings[id(r)] = members

    def _split_dependent(self, r: Reduce):
        """sum_V(body) as sum_i c_i * sum_V(t_i), where each c_i is free of V and computed
        from another reduction (a batchnorm gradient's mean term: a scalar per channel
        made from the first sums) and no t_i holds one: the new sums need not wait for the
        others, so they run in their loop (a pass over the channel less). Uses x * y =
        y * x, distributivity, and select(p, c, 0) * y = c * select(p, y, 0) (they differ
        only where y is infinite or NaN on a masked row). (expression, [new sums]), or
        None when the body is not of that form."""
        own = {v.name for v in r.vars}

        def dependent(x):
            return not (self.free_vars(x) & own) and any(isinstance(y, Reduce) for y in walk_ex([x]))

        def times(c, x):  # c * x, c None for 1
            return x if c is None else Op("mul", (c, x), r.dtype)

        def negated(c):
            return Op("neg", (c,), r.dtype) if c is not None else Lit(-1.0, r.dtype)

        def terms(x):  # [(coefficient or None for 1, term)]
            if isinstance(x, Op) and x.name == "neg":
                return [(negated(c), t) for c, t in terms(x.args[0])]
            if isinstance(x, Op) and x.name in ("add", "sub"):
                right = terms(x.args[1])
                if x.name == "sub":
                    right = [(negated(c), t) for c, t in right]
                return terms(x.args[0]) + right
            if isinstance(x, Op) and x.name == "mul":
                for a, y in (x.args, x.args[::-1]):
                    if dependent(a):
                        return [(times(c, a), t) for c, t in terms(y)]
                    if isinstance(a, Op) and a.name == "select" and isinstance(a.args[2], Lit) \
                            and a.args[2].value == 0 and dependent(a.args[1]):
                        return [(times(c, a.args[1]), Op("select", (a.args[0], t, a.args[2]), t.dtype))
                                for c, t in terms(y)]
            return [(None, x)]

        if not r.dtype.is_float:
            return None
        parts = terms(r.body)
        if all(c is None for c, _ in parts) or any(any(isinstance(y, Reduce) for y in walk_ex([t]))
                                                   for _, t in parts):
            return None
        sums: dict = {}  # id(term) -> its sum (equal terms share one)
        out = None
        for c, t in parts:
            if id(t) not in sums:
                sums[id(t)] = Reduce("sum", r.vars, t, r.dtype)
            s = sums[id(t)]
            out = times(c, s) if out is None else Op("add", (out, times(c, s)), r.dtype)
        return out, list(sums.values())

    def reduce(self, e: Reduce) -> ir.Value:
        if id(e) in self.rewritten:  # see group_sums
            return self.value(self.rewritten[id(e)][0])
        if not e.vars:  # a reduction over no axes is the value itself
            return self.value(e.body)
        group = [e] + [r for r in self.siblings.get(id(e), ()) if r is not e and self._cached(id(r)) is None]
        # one loop nest for the group: loops merged only where every member's are (a
        # depthwise layer's centre tap merges its plane's rows, the shifted taps do not)
        cuts = set()
        for r in group:
            levels = self._merged(r.vars, [r.body])
            cuts.update(itertools.accumulate(len(level) for level in levels))
        bounds = [0] + sorted(cuts)
        together = [(r, [list(r.vars[i:j]) for i, j in zip(bounds, bounds[1:])]) for r in group]
        results = self._reduce_together(together)
        for (r, _), value in zip(together[1:], results[1:]):
            self.scopes[-1][id(r)] = value
        return results[0]

    def _reduce_together(self, together: list) -> list[ir.Value]:
        """[(reduction, its loops as _merged gives them)], all of one loop shape: one loop
        nest with an accumulator (two for argmax) per reduction; their values."""
        b = self.b
        init, slots = [], []
        for e, _ in together:
            t, body_t = value_type(e.dtype), value_type(e.body.dtype)
            if e.op == "sum":
                acc = [ir.Constant(t, 0.0 if e.dtype.is_float else 0)]
            elif e.op == "max":
                acc = [ir.Constant(t, -math.inf if e.dtype.is_float else -(2 ** 31))]
            else:  # argmax: (best value, its index)
                acc = [ir.Constant(body_t, -math.inf if e.body.dtype.is_float else -(2 ** 31)), i32(0)]
            slots.append(slice(len(init), len(init) + len(acc)))
            init += acc

        w = self._vectorizable(together)
        self.scalar_loops += w == 1
        last = len(together[0][1]) - 1

        def nest(level: int, carried):
            for _, loops in together:
                for outer in loops[level][:-1]:  # merged into the level's last variable (see _merged)
                    self.vars[outer.name] = i64(0)
            first = together[0][1][level]
            n = math.prod(v.extent for v in first)

            def step(i, acc):
                for _, loops in together:
                    self.vars[loops[level][-1].name] = i
                self.push()
                if level < last:
                    inner = {v.name for _, loops in together for lv in loops[level + 1:] for v in lv}
                    self.hoist_out_of([e.body for e, _ in together], inner)
                    out = nest(level + 1, acc)
                else:
                    out = []
                    for (e, _), at in zip(together, slots):
                        out += self._combine(e.op, acc[at], self.value(e.body), e.body.dtype, e.vars)
                self.pop()
                return out
            if level < last or w == 1:
                return loop(b, 0, n, carried, step, name=first[-1].name)
            # vectorized: W lanes at a time into vector accumulators, then the last lanes
            # (a vector with the lanes past the end masked off). One accumulator each:
            # four (an add's latency) made the steps no faster and the compile 10% longer.
            whole = n - n % w
            if whole:
                carried = loop(b, 0, whole, carried, lambda i, acc: self._lane_sums(together, i, acc, w),
                               name=first[-1].name + ".v", step=w)
            if whole < n:
                carried = self._lane_sums(together, i64(whole), carried, w, n - whole)
            return carried

        if w == 1:
            result = nest(0, init)
            return [result[at][0] if e.op != "argmax" else result[at][1] for (e, _), at in zip(together, slots)]
        result = nest(0, [const_vector(F32, [0.0] * w)] * len(together))
        return [hsum(b, acc) for acc in result]  # the lanes summed in one order

    def _vectorizable(self, together: list) -> int:
        """The lanes to vectorize these reductions' innermost loop by, 1 for none: float32
        sums over at least 2 elements whose body holds no reduction over their own
        variables (one that is not, a softmax's max, is computed now, before the loop), and
        whose loads depending on that loop read consecutive elements (a gather costs more
        than it saves). LLVM would vectorize them only if allowed to reorder the sum
        (`reassoc`), in an order of its choosing that differs between its pipelines."""
        w = _vector_width(self.b.function)
        if w == 1 or math.prod(v.extent for v in together[0][1][-1]) < 2:
            return 1
        for e, loops in together:
            if e.op != "sum" or e.dtype != DType.f32 \
                    or not self._lanes_ok(e.body, loops[-1][-1].name, {v.name for v in e.vars}):
                return 1
        return w

    def _lanes_ok(self, body: Ex, inner: str, own: set) -> bool:
        """Whether `body` can be computed for W consecutive values of loop variable `inner`
        at once: no reduction over the variables `own` (one that is not, a softmax's max, is
        computed now, before the loop), every load depending on `inner` reads consecutive
        elements, maybe through a clamp, or float elements up to MAX_STRIDE apart, or with
        16 lanes (AVX-512) through x // s (lane_load; a gather costs more than it saves), and no integer division (a masked-off lane
        might divide by zero). (Through x // s with AVX2's 8 lanes, the MobileNet's strided
        gradients ran 5-12% slower than scalar code; with 16, 2.5x faster.)"""
        spreads = _vector_width(self.b.function) >= 16
        for x in walk_ex([body]):
            if isinstance(x, Reduce) and self._cached(id(x)) is None:
                if self.free_vars(x) & own:
                    return False
                self.value(x)  # computed once, before the loop
            if isinstance(x, Load) and inner in self.free_vars.ix(x.index) \
                    and affine_coef(x.index, inner, self.free_vars) != 1 \
                    and clamped_lane(x.index, inner, self.free_vars) is None \
                    and not (x.buf.dtype == DType.f32 and strided_lane(x.index, inner, self.free_vars)) \
                    and not (spreads and x.buf.dtype == DType.f32 and divided_lane(x.index, inner, self.free_vars)):
                return False
            if isinstance(x, Op) and x.name == "div" and not x.dtype.is_float:
                return False
        return True

    def store_lanes(self, stores, var, n: int) -> int:
        """The lanes to vectorize a loop of n iterations of `var` around `stores` by, 1 for
        none: float32 stores to consecutive elements, whose values _lanes_ok allows, which
        read no stored buffer but at the element stored (W lanes read before any is
        written) and use no index of `var` but an affine one."""
        w = _vector_width(self.b.function)
        if w == 1 or n < 2:
            return 1
        stored = {s.buf.name: s.flat for s in stores}
        for s in stores:
            if s.buf.dtype != DType.f32 or affine_coef(s.flat, var.name, self.free_vars) != 1 \
                    or not self._lanes_ok(s.value, var.name, {var.name}):
                return 1
            for x in walk_ex([s.value]):
                if isinstance(x, Load) and x.buf.name in stored and x.index != stored[x.buf.name]:
                    return 1
                if isinstance(x, Index) and affine_coef(x.ix, var.name, self.free_vars) is None \
                        and not _lanes_divide(x.ix, var.name, self.free_vars):
                    return 1  # (a clamped lane index: left to scalar code)
        return w

    def lane_stores(self, stores, var, i, w: int, live: int | None = None) -> None:
        """The stores for the W values of `var` from i on (store_lanes allowed them): each
        value computed for every lane, then stored as one vector (with `live`, only the
        first `live` lanes are in the loop: the others load and store nothing)."""
        b = self.b
        self.lane_vars, self.lane_base, self.lane_depth = frozenset({var.name}), i, len(self.scopes)
        self._live_lanes(w, live)
        self.vars[var.name] = b.add(splat(b, i, w), const_vector(I64, range(w)))
        self.push()
        self.b = _Lanes(b, w, self.licm)
        values = [self.value(s.value) for s in stores]  # all before any store, as store_all
        for s, v in zip(stores, values):
            v = v if isinstance(v.type, ir.VectorType) else splat(b, v, w)
            at = self._first_lane(s.buf, s.flat)
            if self.lane_mask is None:
                b.store(v, at, align=4)
            else:
                name = f"llvm.masked.store.v{w}f32.p0"
                fn = b.module.globals.get(name) or ir.Function(
                    b.module, ir.FunctionType(VOID, [v.type, at.type, self.lane_mask.type]), name)
                b.call(fn, [v, at, self.lane_mask])
        self.b = b
        self.pop()
        self.lane_vars, self.lane_mask = frozenset(), None

    def _lane_sums(self, together: list, i, acc: list, w: int, live: int | None = None) -> list:
        """One step of a vectorized sum: each reduction's body for the W values of its
        innermost variable from i on, added lane by lane to its accumulator. With `live`,
        only the first `live` lanes are in the loop: the others load nothing and add 0."""
        b = self.b
        self.lane_vars = frozenset(loops[-1][-1].name for _, loops in together)
        self.lane_base, self.lane_depth = i, len(self.scopes)
        self._live_lanes(w, live)
        lanes = b.add(splat(b, i, w), const_vector(I64, range(w)))
        for name in self.lane_vars:
            self.vars[name] = lanes
        self.push()
        self.b = _Lanes(b, w, self.licm)
        out = []
        for a, (e, _) in zip(acc, together):
            v = self.b.wide([self.value(e.body), a])[0]
            if self.lane_mask is not None:
                v = b.select(self.lane_mask, v, const_vector(v.type.element, [0.0] * w))
            out.append(b.fadd(a, v))
        self.b = b
        self.pop()
        self.lane_vars, self.lane_mask = frozenset(), None
        return out

    def _merged(self, vars_, exprs, flats=()) -> list[list]:
        """Loops over `vars_` (of a reduction, or of stores at `flats` of `exprs`), adjacent
        variables merged into one loop where every index uses them only as a * extent(b)
        + b (a contiguous run, like the H and W of a plane): the merged loop binds b to
        0 .. extent(a)*extent(b)-1 and a to 0, which addresses the same elements in the
        same order, in one long loop that vectorizes (with one horizontal reduction at its
        end instead of one per row)."""
        indices = list(flats)
        for x in walk_ex(exprs):
            if isinstance(x, Load):
                indices.append(x.index)
            elif isinstance(x, Index):
                indices.append(x.ix)
            elif isinstance(x, Rand):
                indices.append(x.flat)
        groups = [[vars_[0]]]
        for var in vars_[1:]:
            outer = groups[-1][-1]
            ok = True
            for ix in indices:
                a = affine_coef(ix, outer.name, self.free_vars)
                c = affine_coef(ix, var.name, self.free_vars)
                if a is None or c is None or a != var.extent * c:
                    ok = False
                    break
            if ok:
                groups[-1].append(var)
            else:
                groups.append([var])
        return groups

    def _combine(self, op, acc, v, dtype: DType, vars_):
        b = self.b
        if op == "sum":
            return [b.fadd(acc[0], v) if dtype.is_float else b.add(acc[0], v)]
        if op == "max":
            return [SCALAR_OPS["max"](b, [acc[0], v], dtype, dtype)]
        best, idx = acc
        flat = i64(0)
        for var in vars_:
            flat = b.add(b.mul(flat, i64(var.extent)), self.vars[var.name])
        if dtype.is_float:  # the first maximum wins; a NaN counts as the maximum (numpy)
            take = b.or_(b.fcmp_ordered(">", v, best),
                         b.and_(b.fcmp_unordered("uno", v, v), b.fcmp_ordered("ord", best, best)))
        else:
            take = b.icmp_signed(">", v, best)
        return [b.select(take, v, best), b.select(take, b.trunc(flat, I32), idx)]


def affine_coef(e: Ix, name: str, free) -> int | None:
    """How much index e grows per step of loop variable `name`: an int, or None when e
    is not affine in it (it appears under a division, modulo, clamp or gather)."""
    if name not in free.ix(e):
        return 0
    if isinstance(e, Var):
        return 1
    if isinstance(e, Add):
        a, b = affine_coef(e.a, name, free), affine_coef(e.b, name, free)
        return None if a is None or b is None else a + b
    if isinstance(e, Mul):
        a = affine_coef(e.a, name, free)
        return None if a is None else a * e.c
    return None


def _lane_term(e: Ix, name: str, free) -> Ix | None:
    """The one term of the sum e that holds loop variable `name`; None if none or several do."""
    if name not in free.ix(e):
        return None
    while isinstance(e, Add):
        in_a, in_b = name in free.ix(e.a), name in free.ix(e.b)
        if in_a == in_b:
            return None
        e = e.a if in_a else e.b
    return e


def clamped_lane(e: Ix, name: str, free) -> Clamp | None:
    """The clamp through which index e grows by 1 per step of loop variable `name`, if e
    is a sum of terms free of it and one clamp(x, lo, hi) with x growing by 1 (a padded
    axis's source index: a vector of lanes reads x's elements inside lo..hi in a row);
    else None."""
    t = _lane_term(e, name, free)
    return t if isinstance(t, Clamp) and affine_coef(t.a, name, free) == 1 else None


def strided_lane(e: Ix, name: str, free) -> tuple[int, Clamp | None] | None:
    """(s, c) where index e grows by s (2..MAX_STRIDE) per step of loop variable `name`:
    affinely (c None), or as a sum of terms free of it and s * clamp(x, lo, hi) with x
    growing by 1 (a strided layer's padded input); else None."""
    coef = affine_coef(e, name, free)
    if coef is not None:
        return (coef, None) if 2 <= coef <= MAX_STRIDE else None
    s, t = 1, _lane_term(e, name, free)
    while isinstance(t, Mul):
        s, t = s * t.c, _lane_term(t.a, name, free)
    if isinstance(t, Clamp) and affine_coef(t.a, name, free) == 1 and 2 <= s <= MAX_STRIDE:
        return s, t
    return None


def divided_lane(e: Ix, name: str, free) -> tuple[Div, Clamp | None] | None:
    """(d, c) where index e is a sum of terms free of loop variable `name` and one that
    is d = x // s (x growing by 1 a step, s > 1: a strided layer's gradient reads
    element x // s for position x) or a clamp c of a sum of free terms and d; else None."""
    t = _lane_term(e, name, free)
    clamp = t if isinstance(t, Clamp) else None
    d = _lane_term(t.a, name, free) if clamp is not None else t
    if isinstance(d, Div) and d.c > 1 and affine_coef(d.a, name, free) == 1:
        return d, clamp
    return None


def _lanes_divide(e: Ix, name: str, free) -> bool:
    """Whether loop variable `name` reaches index e only through divisions and moduli by
    constants (of x growing by 1 a step): a lane index computed as vectors."""
    if name not in free.ix(e):
        return True
    if isinstance(e, (Div, Mod)):
        return affine_coef(e.a, name, free) == 1
    if isinstance(e, Add):
        return _lanes_divide(e.a, name, free) and _lanes_divide(e.b, name, free)
    if isinstance(e, (Mul, Clamp)):
        return _lanes_divide(e.a, name, free)
    return False


def _literal(value, dtype: DType) -> ir.Constant:
    t = value_type(dtype)
    if dtype == DType.bool:
        return ir.Constant(I1, int(bool(value)))
    if dtype.is_float:
        return ir.Constant(t, float(value))
    return ir.Constant(t, int(value))


def fmix32(b: ir.IRBuilder, h: ir.Value) -> ir.Value:
    """murmur3's finalizer (the same mix as dlc.ops.misc.fmix32)."""
    h = b.xor(h, b.lshr(h, i32(16)))
    h = b.mul(h, i32(0x85EBCA6B))
    h = b.xor(h, b.lshr(h, i32(13)))
    h = b.mul(h, i32(0xC2B2AE35))
    return b.xor(h, b.lshr(h, i32(16)))


# --- loop nests ----------------------------------------------------------------------------------

def store_all(em: Emitter, stores) -> None:
    """Compute every value first, then store: an in-place update never reads a value
    this iteration has already overwritten."""
    b = em.b
    values = [em.value(s.value) for s in stores]
    for s, v in zip(stores, values):
        t = memory_type(s.buf.dtype)
        if s.buf.dtype == DType.bool:
            v = b.zext(v, I8)
        b.store(v, gep(b, em.pointers[s.buf.name], em.ix(s.flat), t), align=byte_size(t))


def emit_nest(em: Emitter, nest: LoopNest, tid, nthreads, bounds: dict | None = None,
              vectorize: bool = False) -> None:
    """Emit a LoopNest; its outer iterations are shared between threads unless `bounds`
    (var name -> (lo, hi) values) fixes them, as for a template's epilogue. `vectorize`:
    its innermost store loop vectorized here where it can be (_merged_loops)."""
    b = em.b
    if bounds is not None:
        emit_bounded(em, nest, bounds)
        return
    extents = [v.extent for v in nest.outer]
    total = math.prod(extents)
    if nest.serial or not nest.outer:
        lo, hi = i64(0), b.select(b.icmp_signed("==", tid, i32(0)), i64(total), i64(0))
    else:
        lo, hi = split(b, total, tid, nthreads)
    outer_names = frozenset(v.name for v in nest.outer)
    if not nest.inner and not any(isinstance(x, Reduce) for x in walk_ex([s.value for s in nest.row_stores])):
        em.scalar_loops += 1  # elementwise over the outer loop: LLVM vectorizes that one

    def body(f, _):
        for v, idx in zip(nest.outer, _unravel(b, f, extents)):
            em.vars[v.name] = idx
        em.push()
        em.group_sums([st.value for st in nest.row_stores + nest.stores], outer_names)
        store_all(em, nest.row_stores)
        if nest.stores:
            seen: set = set()
            for s in nest.stores:
                em.hoist(s.value, outer_names, seen)
            _merged_loops(em, list(nest.inner), nest.stores, {}, vectorize)
        em.pop()
        return []
    loop(b, lo, hi, (), body, name="p")


def _unravel(b, f, extents):
    out = []
    for e in reversed(extents):
        out.append(b.urem(f, i64(e)) if len(extents) > 1 else f)
        f = b.udiv(f, i64(e))
    return list(reversed(out))


def emit_bounded(em: Emitter, nest: LoopNest, bounds: dict, vectorize: bool = False) -> None:
    """All loops of the nest with explicit ranges (epilogues over a template's share);
    `vectorize`: its innermost full-range loop vectorized here where it can be (the
    convolutions', whose modules LLVM compiles without its vectorizer: codegen._pretuned)."""
    _merged_loops(em, list(nest.outer) + list(nest.inner), nest.row_stores + nest.stores, bounds, vectorize)


def _merged_loops(em: Emitter, vars_, stores, bounds: dict, vectorize: bool = False) -> None:
    """Loops over `vars_` around `stores`, those in `bounds` (var name -> (lo, hi) values)
    over their ranges; the full-range loops after the last bounded one are merged where
    they address memory contiguously (an 8x8 or 10x10 plane: one loop of 64 or 100,
    which vectorizes at full width, rather than rows of 8 or 10, which do not). With
    `vectorize`, the innermost of those runs W lanes at a time here (Emitter.store_lanes)."""
    n_bounded = max((k + 1 for k, v in enumerate(vars_) if v.name in bounds), default=0)
    groups = [[v] for v in vars_[:n_bounded]]
    if n_bounded < len(vars_):
        groups += em._merged(vars_[n_bounded:], [s.value for s in stores], [s.flat for s in stores])

    def level(k):
        if k == len(groups):
            store_all(em, stores)
            return
        *merged, var = groups[k]
        for outer in merged:  # merged into `var`'s loop (see Emitter._merged)
            em.vars[outer.name] = i64(0)
        n = math.prod(v.extent for v in groups[k])
        w = em.store_lanes(stores, var, n) if vectorize and k == len(groups) - 1 and var.name not in bounds else 1
        em.scalar_loops += w == 1 and k == len(groups) - 1 and n > 1
        if w > 1:
            whole = n - n % w
            if whole:
                loop(em.b, 0, whole, (), lambda i, _: em.lane_stores(stores, var, i, w) or [], name=var.name + ".v",
                     step=w)
            if whole < n:
                em.lane_stores(stores, var, i64(whole), w, n - whole)
            return
        lo, hi = bounds.get(var.name, (i64(0), i64(n)))

        def body(i, _):
            em.vars[var.name] = i
            em.push()
            if k + 1 < len(groups):
                em.hoist_out_of([s.value for s in stores], {v.name for g in groups[k + 1:] for v in g})
            level(k + 1)
            em.pop()
            return []
        loop(em.b, lo, hi, (), body, name=var.name)
    level(0)
