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
    objects: list[bytes]
    seconds_optimize: float   # summed over the modules (they run in parallel)
    seconds_codegen: float


def _compile_one(text: str, target: Target) -> tuple[bytes, float, float]:
    llmod = llvm.parse_assembly(text)
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
    return obj, optimized - start, time.perf_counter() - optimized


def compile_modules(modules: list[ir.Module], target: Target) -> Compiled:
    """Optimize and emit every module, in parallel threads (llvmlite's calls release the
    GIL, so each core compiles one module)."""
    from concurrent.futures import ThreadPoolExecutor
    _init_llvm()
    texts = [str(m) for m in modules]
    if len(texts) == 1:
        results = [_compile_one(texts[0], target)]
    else:
        with ThreadPoolExecutor(max_workers=len(texts)) as pool:
            results = list(pool.map(lambda t: _compile_one(t, target), texts))
    return Compiled([r[0] for r in results], sum(r[1] for r in results), sum(r[2] for r in results))


def compile_ir_text(text: str, target: Target) -> bytes:
    """Object code for a module written as LLVM IR text (the worker pool)."""
    _init_llvm()
    llmod = llvm.parse_assembly(text)
    llmod.verify()
    tm = target.machine()
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=2))
    pb.getModulePassManager().run(llmod, pb)
    return tm.emit_object(llmod)


def _optimized(modules: list[ir.Module], target: Target):
    _init_llvm()
    llmod = llvm.parse_assembly(str(modules[0]))
    for m in modules[1:]:
        llmod.link_in(llvm.parse_assembly(str(m)))
    tm = target.machine()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    llvm.create_pass_builder(tm, pto).getModulePassManager().run(llmod, llvm.create_pass_builder(tm, pto))
    return llmod, tm


def optimized_ir(modules: list[ir.Module], target: Target) -> str:
    """LLVM IR after the optimizer (`--dump-ir=llvm-opt`)."""
    return str(_optimized(modules, target)[0])


def assembly(modules: list[ir.Module], target: Target) -> str:
    """Optimized machine code as text (`--dump-ir=asm`)."""
    llmod, tm = _optimized(modules, target)
    return tm.emit_assembly(llmod)


class Engine:
    """Object code loaded into an MCJIT engine; function addresses by name."""

    def __init__(self, objects, target: Target):
        _init_llvm()
        empty = llvm.parse_assembly(f'target triple = "{target.triple}"\n')
        self._engine = llvm.create_mcjit_compiler(empty, target.machine())
        objects = [objects] if isinstance(objects, bytes) else list(objects)
        # the step's object (the first) refers to the kernels in the others: load those
        # first, or MCJIT binds the calls before their definitions are known
        for obj in reversed(objects):
            self._engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        self._engine.finalize_object()

    def address(self, name: str) -> int:
        addr = self._engine.get_function_address(name)
        if not addr:
            raise RuntimeError(f"compiled code has no function {name!r}")
        return addr
