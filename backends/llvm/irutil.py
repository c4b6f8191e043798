"""Small llvmlite helpers: types, counted loops (with carried values), work splitting."""
from __future__ import annotations

import contextlib

from llvmlite import ir

from dlc.core.types import DType

F32, F64 = ir.FloatType(), ir.DoubleType()
I1, I8, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64)
PTR = ir.PointerType()
VOID = ir.VoidType()
# No fast-math flags anywhere: LLVM may then not change a result, so code compiled with
# any pipeline computes the same bits. Multiply-adds are fused by the emitters (llvm.fma)
# and float sums vectorized by them in a fixed order (emit.py), not by `contract` and
# `reassoc` at LLVM's discretion.


def value_type(dtype: DType) -> ir.Type:
    """The type of a value in registers."""
    return {DType.f32: F32, DType.f64: F64, DType.i32: I32, DType.bool: I1}[dtype]


def memory_type(dtype: DType) -> ir.Type:
    """The type of an element in memory (bools are bytes)."""
    return I8 if dtype == DType.bool else value_type(dtype)


def byte_size(t: ir.Type) -> int:
    return {F32: 4, F64: 8, I8: 1, I32: 4, I64: 8, I1: 1}[t]


def i64(v: int) -> ir.Constant:
    return ir.Constant(I64, int(v))


def i32(v: int) -> ir.Constant:
    return ir.Constant(I32, int(v))


# LLVM fully unrolls a loop of a few iterations also when its body holds a long loop: six
# channels around a 784-element plane became six vectorized copies of the plane's loop,
# each with its remainder loops -- three times the function's LLVM time, and no faster.
# A loop around a loop of at least _LONG_TRIPS iterations (or a run-time count) is marked
# not to be unrolled.
_LONG_TRIPS = 32


class _LoopInfo:
    """What _close_loop needs to know about an open loop."""

    def __init__(self, lo, hi):
        self.trips = hi.constant - lo.constant if isinstance(lo, ir.Constant) and isinstance(hi, ir.Constant) else None
        self.holds_long = False  # a loop nested in it is long

    def long(self, step: int) -> bool:
        return self.trips is None or self.trips >= _LONG_TRIPS * step


def _open_loops(fn: ir.Function) -> list:
    """The loops being emitted in fn, outermost first."""
    if not hasattr(fn, "_dlc_open_loops"):
        fn._dlc_open_loops = []
    return fn._dlc_open_loops


def _no_unroll(module: ir.Module):
    """The module's loop ID {self, llvm.loop.unroll.disable} (one for every such loop)."""
    md = getattr(module, "_dlc_no_unroll", None)
    if md is None:
        hint = module.add_metadata([ir.MetaDataString(module, "llvm.loop.unroll.disable")])
        md = module._dlc_no_unroll = module.add_metadata([hint, hint])
        md.operands = (md, hint)  # a loop ID's first operand is itself
    return md


def no_unrolling(fn: ir.Function) -> None:
    """Mark every loop emitted in fn from now on not to be unrolled by LLVM (for code
    whose emitter unrolls what pays already)."""
    fn._dlc_no_unroll = True


def _open_loop(b: ir.IRBuilder, lo, hi, carried, name: str):
    """Blocks and phis of `for i in [lo, hi)`; leaves the builder in the body."""
    lo = i64(lo) if isinstance(lo, int) else lo
    hi = i64(hi) if isinstance(hi, int) else hi
    fn = b.function
    _open_loops(fn).append(_LoopInfo(lo, hi))
    pre = b.block
    head = fn.append_basic_block(f"{name}.head")
    body_block = fn.append_basic_block(f"{name}.body")
    done = fn.append_basic_block(f"{name}.done")
    b.branch(head)
    b.position_at_end(head)
    i = b.phi(I64, name=name)
    i.add_incoming(lo, pre)
    phis = []
    for v in carried:
        p = b.phi(v.type)
        p.add_incoming(v, pre)
        phis.append(p)
    b.cbranch(b.icmp_signed("<", i, hi), body_block, done)
    b.position_at_end(body_block)
    return i, phis, head, done


def _close_loop(b: ir.IRBuilder, i, phis, new, head, done, name: str, step: int = 1) -> None:
    latch = b.block
    i.add_incoming(b.add(i, i64(step), name=f"{name}.next"), latch)
    for p, v in zip(phis, new or []):
        p.add_incoming(v, latch)
    back = b.branch(head)
    loops = _open_loops(b.function)
    this = loops.pop()
    if this.holds_long or getattr(b.function, "_dlc_no_unroll", False):
        back.set_metadata("llvm.loop", _no_unroll(b.module))
    if loops:
        loops[-1].holds_long |= this.holds_long or this.long(step)
    b.position_at_end(done)


def loop(b: ir.IRBuilder, lo, hi, carried=(), body=None, name: str = "i", step: int = 1):
    """for i in [lo, hi) by step: carried = body(i, carried). Returns the carried values at
    exit. With a step, hi - lo must be a multiple of it."""
    i, phis, head, done = _open_loop(b, lo, hi, carried, name)
    new = body(i, phis) if body is not None else []
    _close_loop(b, i, phis, new, head, done, name, step)
    return phis


@contextlib.contextmanager
def for_range(b: ir.IRBuilder, lo, hi, name: str = "i", step: int = 1):
    """`with for_range(b, lo, hi) as i:` (i = lo, lo + step, ... < hi) -- the body is the
    with-block."""
    i, phis, head, done = _open_loop(b, lo, hi, (), name)
    yield i
    _close_loop(b, i, phis, (), head, done, name, step)


def split(b: ir.IRBuilder, total: int, tid, nthreads) -> tuple:
    """This thread's share [lo, hi) of range(total): contiguous, sizes differ by at most 1."""
    t, n = b.sext(tid, I64), b.sext(nthreads, I64)
    lo = b.sdiv(b.mul(t, i64(total)), n)
    hi = b.sdiv(b.mul(b.add(t, i64(1)), i64(total)), n)
    return lo, hi


def smin(b, x, y):
    return b.select(b.icmp_signed("<", x, y), x, y)


def smax(b, x, y):
    return b.select(b.icmp_signed(">", x, y), x, y)


class _Poison(ir.Constant):
    """A vector of poison lanes (llvmlite has no such constant)."""
    def _get_reference(self):
        return "poison"


class _Zero(ir.Constant):
    """A vector of zeros, as `zeroinitializer`: llvmlite writes out every lane, padded
    (the zero vectors were 17% of the residual network's IR text)."""
    def _get_reference(self):
        return "zeroinitializer"


_VECTORS: dict = {}


def const_vector(etype: ir.Type, values) -> ir.Constant:
    """The constant vector of `values`, one object per vector however often it is used:
    llvmlite prints a constant's text once per object (_StrCaching), and a vector
    constant's text element by element (a fifth of the time printing the residual
    network's modules took, when every use made its own). Keyed by the values' repr:
    -0.0 is not 0.0."""
    key = (etype, tuple(map(repr, values)))
    found = _VECTORS.get(key)
    if found is None:
        vtype = ir.VectorType(etype, len(values))
        zero = all(v in ("0", "0.0", "False") for v in key[1])  # (not -0.0)
        found = _VECTORS[key] = _Zero(vtype, None) if zero else ir.Constant(vtype, list(values))
    return found


def splat(b: ir.IRBuilder, x: ir.Value, w: int) -> ir.Value:
    """x in each of w lanes (inserted into a `poison` vector: llvmlite printed the
    zero vector it was lane by lane at every splat, 6% of the residual network's IR text)."""
    if isinstance(x, ir.Constant) and not isinstance(x.type, ir.VectorType):
        return const_vector(x.type, (x.constant,) * w)
    v = b.insert_element(_poison(ir.VectorType(x.type, w)), x, i32(0))
    return b.shuffle_vector(v, v, const_vector(I32, (0,) * w))


def _poison(vtype: ir.VectorType) -> ir.Constant:
    """The poison vector of `vtype`, one object per type (in const_vector's cache)."""
    key = ("poison", vtype)
    found = _VECTORS.get(key)
    if found is None:
        found = _VECTORS[key] = _Poison(vtype, None)
    return found


def hsum(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """The sum of a float vector's lanes, always in one order: the upper half added to the
    lower half until one lane is left (no fast-math flag lets LLVM change it)."""
    w = v.type.count
    while w > 1:
        w //= 2
        lo, hi = (b.shuffle_vector(v, v, const_vector(I32, tuple(range(at, at + w))))
                  for at in (0, w))
        v = b.fadd(lo, hi)
    return b.extract_element(v, i32(0))


def hsums(b: ir.IRBuilder, vectors: list) -> list:
    """[hsum(b, v) for v in vectors], bit for bit (each vector's lanes added in hsum's
    order), with fewer instructions: at each halving two vectors' halves share one add
    (a transpose-and-add: lanes of several vectors' partial sums side by side)."""
    w = vectors[0].type.count
    zero = const_vector(F32, [0.0] * w)
    # each entry: (vector, the owners of its groups of lanes, in order; None: padding)
    level = [(v, [i]) for i, v in enumerate(vectors)]
    while len(level[0][1]) < w:
        if len(level) % 2:
            level.append((zero, [None] * len(level[0][1])))
        half = w // len(level[0][1]) // 2  # lanes in half a group
        paired = []
        for (x, xs), (y, ys) in zip(level[::2], level[1::2]):
            groups = len(xs)
            lower = [g * 2 * half + t for g in range(groups) for t in range(half)]
            lo = [*lower, *(w + i for i in lower)]
            hi = [i + half for i in lo]
            paired.append((b.fadd(b.shuffle_vector(x, y, const_vector(I32, lo)),
                                  b.shuffle_vector(x, y, const_vector(I32, hi))), xs + ys))
        level = paired
    sums = {}
    for v, owners in level:
        for lane, owner in enumerate(owners):
            if owner is not None:
                sums[owner] = b.extract_element(v, i32(lane))
    return [sums[i] for i in range(len(vectors))]


def gep(b: ir.IRBuilder, ptr, index, etype) -> ir.Value:
    return b.gep(ptr, [index], source_etype=etype)


def set_target(fn: ir.Function, target, vector_width: int | None = None) -> None:
    """Mark a function for the target CPU (features, and 512-bit vectors when the CPU
    has them: LLVM otherwise prefers 256-bit vectors even on AVX-512 hosts)."""
    # llvmlite's FunctionAttributes accepts only enum attributes (numba/llvmlite#1348);
    # the set prints its items verbatim, so "key"="value" pairs are added directly.
    for key, value in (("target-cpu", target.cpu), ("target-features", target.features),
                       ("prefer-vector-width", str(32 * (vector_width or target.vector_width)))):
        set.add(fn.attributes, f'"{key}"="{value}"')
    fn.attributes.add("nounwind")
