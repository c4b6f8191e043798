"""The barrier between the phases of a compiled step, in LLVM IR.

Every thread runs the whole step (SPMD), taking its share of each kernel and meeting
the others here between phases (the worker threads themselves live in pool.py).

barrier state: i64 count at byte 0, i64 generation at byte 64, i32 sleepers at byte 128
(separate cache lines; BARRIER_BYTES in runtime.py).

A thread that arrives before the others waits in three stages, so that a machine shared
with other processes is not made worse by waiting: it spins (pause) for SPIN_CYCLES --
phases are usually balanced to within microseconds, and a spin costs no system call --
then yields its core to other runnable threads until YIELD_CYCLES, then sleeps on a
futex on the generation word (Linux; elsewhere it sleeps in short naps). The last thread
to arrive bumps the generation and, only when someone sleeps, wakes them: with
sequentially consistent `sleepers += 1; read generation` on one side and `generation += 1;
read sleepers` on the other, a sleeper either sees the new generation or is woken, and
the futex call itself re-checks the word, so no wake-up is lost.
"""
from __future__ import annotations

import platform

from llvmlite import ir

from .irutil import I32, I64, PTR, VOID, gep, i32, i64

SPIN_CYCLES = 20_000       # about 10 microseconds of spinning
YIELD_CYCLES = 200_000     # then yielding the core, to about 100 microseconds; then sleeping
SPIN_LIMIT = 1 << 20       # iterations: the stages by count where no cycle counter ticks
SLEEP_MICROSECONDS = 50    # the nap where there is no futex
# Linux futex syscall numbers (FUTEX_WAIT_PRIVATE = 128, FUTEX_WAKE_PRIVATE = 129).
FUTEX = {"x86_64": 202, "aarch64": 98}
SLEEPERS = 128             # byte offset of the sleeper count


def futex_number() -> int | None:
    return FUTEX.get(platform.machine()) if platform.system() == "Linux" else None


def _pause(module: ir.Module, b: ir.IRBuilder) -> None:
    if "x86" in (module.triple or ""):
        fn = module.globals.get("llvm.x86.sse2.pause") or ir.Function(
            module, ir.FunctionType(VOID, []), name="llvm.x86.sse2.pause")
        b.call(fn, [])


def _extern(module: ir.Module, name: str, ret, args, var_arg: bool = False) -> ir.Function:
    return module.globals.get(name) or ir.Function(module, ir.FunctionType(ret, args, var_arg=var_arg), name=name)


def _cycles(module: ir.Module, b: ir.IRBuilder) -> ir.Value:
    return b.call(_extern(module, "llvm.readcyclecounter", I64, []), [])


def _futex(module: ir.Module, b: ir.IRBuilder, addr, op: int, value) -> None:
    number = futex_number()
    syscall = _extern(module, "syscall", I64, [I64], var_arg=True)
    b.call(syscall, [i64(number), addr, i32(op), value, ir.Constant(PTR, None)])


def _wait_while_equal(module: ir.Module, b: ir.IRBuilder, state, ptr, value) -> ir.Value:
    """Wait until the atomic i64 at ptr differs from value: spin, then yield, then sleep."""
    fn = b.function
    head = fn.append_basic_block("wait.head")
    body = fn.append_basic_block("wait.body")
    done = fn.append_basic_block("wait.done")
    pre = b.block
    t0 = _cycles(module, b)
    b.branch(head)
    b.position_at_end(head)
    spins = b.phi(I64)
    spins.add_incoming(i64(0), pre)
    now = b.load_atomic(ptr, "acquire", 8, typ=I64)
    b.cbranch(b.icmp_unsigned("==", now, value), body, done)
    b.position_at_end(body)
    _pause(module, b)
    elapsed = b.sub(_cycles(module, b), t0)
    count = b.add(spins, i64(1))
    past_spin = b.or_(b.icmp_unsigned(">", elapsed, i64(SPIN_CYCLES)),
                      b.icmp_unsigned(">", count, i64(SPIN_LIMIT // 16)))
    with b.if_then(past_spin):
        past_yield = b.or_(b.icmp_unsigned(">", elapsed, i64(YIELD_CYCLES)),
                           b.icmp_unsigned(">", count, i64(SPIN_LIMIT)))
        with b.if_else(past_yield) as (sleep, yield_):
            with sleep:
                _sleep(module, b, state, ptr, value)
            with yield_:
                b.call(_extern(module, "sched_yield", I32, []), [])
    spins.add_incoming(count, b.block)
    b.branch(head)
    b.position_at_end(done)
    return now


def _sleep(module: ir.Module, b: ir.IRBuilder, state, ptr, value) -> None:
    if futex_number() is None:
        b.call(_extern(module, "usleep", I32, [I32]), [i32(SLEEP_MICROSECONDS)])
        return
    sleepers = gep(b, state, i64(SLEEPERS // 4), I32)
    b.atomic_rmw("add", sleepers, i32(1), "seq_cst")
    again = b.load_atomic(ptr, "seq_cst", 8, typ=I64)
    with b.if_then(b.icmp_unsigned("==", again, value)):
        _futex(module, b, ptr, 128, b.trunc(value, I32))  # sleeps while the low word is unchanged
    b.atomic_rmw("sub", sleepers, i32(1), "seq_cst")


def barrier_fn(module: ir.Module) -> ir.Function:
    """dlc_barrier(state, nthreads) as module sees it: a declaration (emit_barrier defines
    it in the step's module)."""
    return module.globals.get("dlc_barrier") or ir.Function(module, ir.FunctionType(VOID, [PTR, I32]),
                                                            name="dlc_barrier")


def emit_barrier(module: ir.Module) -> ir.Function:
    fn = barrier_fn(module)
    if not fn.is_declaration:
        return fn
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
            b.atomic_rmw("add", gen_ptr, i64(1), "seq_cst")
            if futex_number() is not None:
                sleepers = b.load_atomic(gep(b, state, i64(SLEEPERS // 4), I32), "seq_cst", 4, typ=I32)
                with b.if_then(b.icmp_unsigned("!=", sleepers, i32(0))):
                    _futex(module, b, gen_ptr, 129, i32(2 ** 31 - 1))
        with otherwise:
            _wait_while_equal(module, b, state, gen_ptr, gen)
    b.ret_void()
    return fn


# The team: what a template whose threads exchange results within its part gets (the
# buffer `__team__`): three 8-byte words the step writes, [barrier state, thread 0's
# scratch, scratch bytes per thread]. Thread u's scratch is then reachable by every
# thread, and the barrier is the step's own (every thread calls every part).
def team_words(b: ir.IRBuilder, barrier, scratch, per_thread: int) -> ir.Value:
    team = b.alloca(I64, size=i64(3), name="team")
    for k, word in enumerate((b.ptrtoint(barrier, I64), b.ptrtoint(scratch, I64), i64(per_thread))):
        b.store(word, b.gep(team, [i64(k)]))
    return team


def _team_word(b: ir.IRBuilder, team, k: int) -> ir.Value:
    return b.load(gep(b, team, i64(k), I64), typ=I64)


def team_barrier(b: ir.IRBuilder, team, nthreads) -> None:
    b.call(barrier_fn(b.module), [b.inttoptr(_team_word(b, team, 0), PTR), nthreads])


def team_scratch(b: ir.IRBuilder, team, u) -> ir.Value:
    """Thread u's scratch."""
    return b.inttoptr(b.add(_team_word(b, team, 1), b.mul(u, _team_word(b, team, 2))), PTR)
