"""Small llvmlite helpers: types, counted loops (with carried values), work splitting."""
from __future__ import annotations

import contextlib

from llvmlite import ir

from dlc.core.types import DType

F32, F64 = ir.FloatType(), ir.DoubleType()
I1, I8, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64)
PTR = ir.PointerType()
VOID = ir.VoidType()
FAST = ("contract",)          # FMA contraction: never changes NaN/Inf behaviour
REDUCE = ("reassoc", "contract", "nsz")  # reductions may be reordered (and vectorized)


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


def _open_loop(b: ir.IRBuilder, lo, hi, carried, name: str):
    """Blocks and phis of `for i in [lo, hi)`; leaves the builder in the body."""
    lo = i64(lo) if isinstance(lo, int) else lo
    hi = i64(hi) if isinstance(hi, int) else hi
    fn = b.function
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
    b.branch(head)
    b.position_at_end(done)


def loop(b: ir.IRBuilder, lo, hi, carried=(), body=None, name: str = "i"):
    """for i in [lo, hi): carried = body(i, carried). Returns the carried values at exit."""
    i, phis, head, done = _open_loop(b, lo, hi, carried, name)
    new = body(i, phis) if body is not None else []
    _close_loop(b, i, phis, new, head, done, name)
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
