"""Kernel IR -> LLVM modules: one function per kernel part (rendered by emit.py, or by a
template in templates.py), and one step function per program.

The step function `dlc_step(ptr table, i32 tid, i32 nthreads)` runs every kernel part in
phase order with a barrier between phases; every thread runs it (SPMD). Its buffers are
table[0] = arena, table[1] = barrier state, table[2] = scratch, table[3] = profile
counters, then one slot per input/state buffer in `Layout.slots` order.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from llvmlite import ir

from dlc.core.kernel import Buffer, KernelProgram, LoopNest, Template
from dlc.core.kernel import buffers_of as kernel_buffers
from dlc.core.types import DType

from .emit import Emitter, emit_nest
from .irutil import I1, I8, I32, I64, PTR, VOID, byte_size, gep, i32, i64, memory_type, set_target
from .templates import emit_template

FIXED_SLOTS = 4  # arena, barrier, scratch, profile
# templates that use the per-thread scratch space (GEMM and im2col packing)
SCRATCH_TEMPLATES = frozenset({"matmul", "conv2d", "conv2d_bwd_data", "conv2d_bwd_filter"})


@dataclass
class Layout:
    """Where every buffer lives at run time."""

    slots: list[str] = field(default_factory=list)  # table slot (after FIXED_SLOTS) -> buffer name
    scratch_bytes: int = 0                          # per thread (GEMM packing)

    def slot(self, name: str) -> int:
        return FIXED_SLOTS + self.slots.index(name)


# --- the module ------------------------------------------------------------------------------------

def buffers_of(part) -> list[Buffer]:
    """The buffers a part's function takes: the kernel IR's, plus per-thread packing
    space for the GEMM."""
    out = kernel_buffers(part)
    if isinstance(part, Template) and part.op in SCRATCH_TEMPLATES:
        out.append(Buffer("__scratch__", DType.f32, (0,), "scratch"))
    return out


class ModuleBuilder:
    """Builds the LLVM modules of one KernelProgram: the kernel parts are spread over
    `pieces` modules of similar size (LLVM optimizes them in parallel, one per core);
    module 0 also holds the step function, which calls them."""

    def __init__(self, program: KernelProgram, target, name: str = "dlc", profile: bool = False,
                 pieces: int | None = None, tag: str | None = None):
        self.program = program
        self.target = target
        self.modules = []
        for i in range(max(1, pieces or target.threads)):
            mod = ir.Module(name=f"{name}.{i}")
            mod.triple = target.triple
            self.modules.append(mod)
        self.module = self.modules[0]  # the module being filled (templates add GEMMs to it)
        self._load = [0] * len(self.modules)
        self.layout = Layout(slots=list(program.inputs) + list(program.state))
        self.profile = profile
        self.parts: list[tuple[int, str, ir.Function, list[Buffer]]] = []  # (phase, kernel, fn, buffers)
        self.gemms: dict = {}  # (module index, spec) -> GemmInfo: one function per shape and module
        # kernels are external symbols (the step calls them across modules): a name unique to
        # this build keeps two programs in one process from ever binding to each other's
        self.tag = tag or uuid.uuid4().hex[:10]

    def new_function(self, name: str, buffers: list[Buffer]) -> tuple[ir.Function, ir.IRBuilder, dict]:
        ftype = ir.FunctionType(VOID, [PTR] * len(buffers) + [I32, I32])
        fn = ir.Function(self.module, ftype, name=name)
        fn.attributes.add("noinline")
        set_target(fn, self.target)
        pointers = {}
        for arg, buf in zip(fn.args, buffers):
            arg.add_attribute("noalias")
            pointers[buf.name] = arg
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        return fn, b, pointers

    def build(self) -> list[ir.Module]:
        for k in self.program.kernels:
            for j, part in enumerate(k.parts):
                index = self._load.index(min(self._load))  # the emptiest module so far
                self.module = self.modules[index]
                buffers = buffers_of(part)
                fn, b, pointers = self.new_function(f"{k.name}.{j}.{self.tag}", buffers)
                tid, nthreads = fn.args[-2], fn.args[-1]
                em = Emitter(b, pointers)
                if isinstance(part, LoopNest):
                    emit_nest(em, part, tid, nthreads)
                else:
                    emit_template(self, em, part, tid, nthreads)
                b.ret_void()
                self._load[index] = sum(len(blk.instructions) for f in self.module.functions for blk in f.blocks)
                self.parts.append((k.phase, k.name, fn, buffers))
        self.module = self.modules[0]
        self._step()
        return self.modules

    def text(self) -> str:
        return "\n".join(str(m) for m in self.modules)

    def _callee(self, fn: ir.Function) -> ir.Function:
        """fn as seen from module 0 (a declaration when it lives in another module)."""
        if fn.module is self.module:
            return fn
        decl = self.module.globals.get(fn.name)
        if decl is None:
            decl = ir.Function(self.module, fn.function_type, name=fn.name)
            for arg, orig in zip(decl.args, fn.args):
                if "noalias" in orig.attributes:
                    arg.add_attribute("noalias")
        return decl

    def _step(self) -> None:
        """dlc_step(table, tid, nthreads): every part in phase order, barriers between."""
        fn = ir.Function(self.module, ir.FunctionType(VOID, [PTR, I32, I32]), name="dlc_step")
        set_target(fn, self.target)
        table, tid, nthreads = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        slot = lambda k: b.load(gep(b, table, i64(k), PTR), typ=PTR)  # noqa: E731
        arena, barrier, scratch, counters = slot(0), slot(1), slot(2), slot(3)
        pointers = {}
        for name in self.layout.slots:
            pointers[name] = slot(self.layout.slot(name))
        for buf in self.program.buffers.values():
            if buf.kind == "arena":
                pointers[buf.name] = gep(b, arena, i64(buf.offset), I8)
        pointers["__scratch__"] = b.call(_scratch_fn(self.module), [scratch, tid, i64(self.layout.scratch_bytes)])
        barrier_fn = self.module.globals.get("dlc_barrier") or _declare_barrier(self.module)
        last_phase = None
        is_main = b.icmp_signed("==", tid, i32(0))
        for index, (phase, kname, part_fn, buffers) in enumerate(self.parts):
            if last_phase is not None and phase != last_phase:
                b.call(barrier_fn, [barrier, nthreads])
            last_phase = phase
            t0 = b.call(_cycles(self.module), []) if self.profile else None
            args = [pointers[buf.name] if buf.name in pointers else pointers["__scratch__"] for buf in buffers]
            b.call(self._callee(part_fn), args + [tid, nthreads])
            if self.profile:
                with b.if_then(is_main):
                    cell = gep(b, counters, i64(index), I64)
                    spent = b.sub(b.call(_cycles(self.module), []), t0)
                    b.store(b.add(b.load(cell, typ=I64), spent), cell)
        if self.program.copies:
            b.call(barrier_fn, [barrier, nthreads])
            with b.if_then(is_main):
                for src, dst in self.program.copies:
                    size = src.size * byte_size(memory_type(src.dtype))
                    b.call(_memcpy(self.module), [pointers[dst.name], pointers[src.name], i64(size),
                                                  ir.Constant(I1, 0)])
        b.call(barrier_fn, [barrier, nthreads])
        b.ret_void()


def _cycles(module: ir.Module) -> ir.Function:
    fn = module.globals.get("llvm.readcyclecounter")
    return fn or ir.Function(module, ir.FunctionType(I64, []), name="llvm.readcyclecounter")


def _memcpy(module: ir.Module) -> ir.Function:
    name = "llvm.memcpy.p0.p0.i64"
    return module.globals.get(name) or ir.Function(module, ir.FunctionType(VOID, [PTR, PTR, I64, I1]), name=name)


def _scratch_fn(module: ir.Module) -> ir.Function:
    """scratch + tid * bytes_per_thread"""
    fn = module.globals.get("dlc_scratch")
    if fn is None:
        fn = ir.Function(module, ir.FunctionType(PTR, [PTR, I32, I64]), name="dlc_scratch")
        fn.linkage = "internal"
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        base, tid, per = fn.args
        b.ret(gep(b, base, b.mul(b.sext(tid, I64), per), I8))
    return fn


def _declare_barrier(module: ir.Module) -> ir.Function:
    from .barrier import emit_barrier
    return emit_barrier(module)
