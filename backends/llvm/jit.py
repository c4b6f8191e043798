"""LLVM services: verify and optimize a module for a Target, emit object code, and load
object code into an MCJIT engine (no recompilation: the disk cache and `dlc compile -o`
artifacts store object code)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import llvmlite.binding as llvm
from llvmlite import ir

from .target import Target, _init_llvm


@dataclass
class Compiled:
    object_code: bytes
    optimized_ir: str | None
    seconds_optimize: float
    seconds_codegen: float


def compile_module(module: ir.Module, target: Target, keep_ir: bool = False) -> Compiled:
    _init_llvm()
    llmod = llvm.parse_assembly(str(module))
    llmod.verify()
    tm = target.machine()
    start = time.perf_counter()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(llmod, pb)
    optimized = time.perf_counter()
    obj = tm.emit_object(llmod)
    done = time.perf_counter()
    return Compiled(obj, str(llmod) if keep_ir else None, optimized - start, done - optimized)


def compile_ir_text(text: str, target: Target) -> bytes:
    """Object code for a module written as LLVM IR text (the worker pool)."""
    _init_llvm()
    llmod = llvm.parse_assembly(text)
    llmod.verify()
    tm = target.machine()
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=2))
    pb.getModulePassManager().run(llmod, pb)
    return tm.emit_object(llmod)


def _optimized(module: ir.Module, target: Target):
    _init_llvm()
    llmod = llvm.parse_assembly(str(module))
    tm = target.machine()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    llvm.create_pass_builder(tm, pto).getModulePassManager().run(llmod, llvm.create_pass_builder(tm, pto))
    return llmod, tm


def optimized_ir(module: ir.Module, target: Target) -> str:
    """LLVM IR after the optimizer (`--dump-ir=llvm-opt`)."""
    return str(_optimized(module, target)[0])


def assembly(module: ir.Module, target: Target) -> str:
    """Optimized machine code as text (`--dump-ir=asm`)."""
    llmod, tm = _optimized(module, target)
    return tm.emit_assembly(llmod)


class Engine:
    """Object code loaded into an MCJIT engine; function addresses by name."""

    def __init__(self, object_code: bytes, target: Target):
        _init_llvm()
        empty = llvm.parse_assembly(f'target triple = "{target.triple}"\n')
        self._engine = llvm.create_mcjit_compiler(empty, target.machine())
        self._engine.add_object_file(llvm.ObjectFileRef.from_data(object_code))
        self._engine.finalize_object()

    def address(self, name: str) -> int:
        addr = self._engine.get_function_address(name)
        if not addr:
            raise RuntimeError(f"compiled code has no function {name!r}")
        return addr
