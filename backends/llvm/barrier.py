"""The barrier between the phases of a compiled step, in LLVM IR.

Every thread runs the whole step (SPMD), taking its share of each kernel and meeting
the others here between phases (the worker threads themselves live in pool.py).

barrier state: i64 count at byte 0, i64 generation at byte 64 (separate cache lines)
"""
from __future__ import annotations

from llvmlite import ir

from .irutil import I32, I64, PTR, VOID, gep, i32, i64

SPIN_BEFORE_YIELD = 4096
SPIN_BEFORE_SLEEP = 1 << 16
SLEEP_MICROSECONDS = 50


def _pause(module: ir.Module, b: ir.IRBuilder) -> None:
    if "x86" in (module.triple or ""):
        fn = module.globals.get("llvm.x86.sse2.pause") or ir.Function(
            module, ir.FunctionType(VOID, []), name="llvm.x86.sse2.pause")
        b.call(fn, [])


def _extern(module: ir.Module, name: str, ret, args) -> ir.Function:
    return module.globals.get(name) or ir.Function(module, ir.FunctionType(ret, args), name=name)


def _backoff(module: ir.Module, b: ir.IRBuilder, spins) -> ir.Value:
    """Pause; past a while yield the core; past longer, sleep. Returns spins + 1."""
    _pause(module, b)
    with b.if_then(b.icmp_unsigned(">", spins, i64(SPIN_BEFORE_YIELD))):
        with b.if_else(b.icmp_unsigned(">", spins, i64(SPIN_BEFORE_SLEEP))) as (sleep, yield_):
            with sleep:
                b.call(_extern(module, "usleep", I32, [I32]), [i32(SLEEP_MICROSECONDS)])
            with yield_:
                b.call(_extern(module, "sched_yield", I32, []), [])
    return b.add(spins, i64(1))


def _wait_while_equal(module: ir.Module, b: ir.IRBuilder, ptr, value) -> ir.Value:
    """Spin until the atomic i64 at ptr differs from value; returns the new value."""
    fn = b.function
    head = fn.append_basic_block("wait.head")
    body = fn.append_basic_block("wait.body")
    done = fn.append_basic_block("wait.done")
    pre = b.block
    b.branch(head)
    b.position_at_end(head)
    spins = b.phi(I64)
    spins.add_incoming(i64(0), pre)
    now = b.load_atomic(ptr, "acquire", 8, typ=I64)
    b.cbranch(b.icmp_unsigned("==", now, value), body, done)
    b.position_at_end(body)
    nxt = _backoff(module, b, spins)
    spins.add_incoming(nxt, b.block)
    b.branch(head)
    b.position_at_end(done)
    return now


def emit_barrier(module: ir.Module) -> ir.Function:
    fn = ir.Function(module, ir.FunctionType(VOID, [PTR, I32]), name="dlc_barrier")
    fn.attributes.add("nounwind")
    state, n = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    with b.if_then(b.icmp_signed("<=", n, i32(1))):
        b.ret_void()
    count, gen_ptr = state, gep(b, state, i64(8), I64)
    gen = b.load_atomic(gen_ptr, "acquire", 8, typ=I64)
    arrived = b.atomic_rmw("add", count, i64(1), "acq_rel")
    last = b.icmp_signed("==", arrived, b.sub(b.sext(n, I64), i64(1)))
    with b.if_else(last) as (then, otherwise):
        with then:  # reset before releasing: the next barrier counts from zero
            b.atomic_rmw("xchg", count, i64(0), "monotonic")
            b.atomic_rmw("add", gen_ptr, i64(1), "release")
        with otherwise:
            _wait_while_equal(module, b, gen_ptr, gen)
    b.ret_void()
    return fn
