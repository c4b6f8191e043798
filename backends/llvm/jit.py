"""LLVM services: verify and optimize a module for a Target, emit object code, and load
object code into an MCJIT engine (no recompilation: the disk cache and `dlc compile -o`
artifacts store object code)."""
from __future__ import annotations

import os
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


def _compile_one(module: ir.Module, target: Target) -> tuple[bytes, float, float]:
    llmod = llvm.parse_assembly(str(module))  # printing a large module takes a while: each process its own
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
    """Optimize and emit every module, one per core. llvmlite serializes its calls behind
    one lock, so threads would not overlap: the other modules go to forked processes."""
    _init_llvm()
    if len(modules) == 1 or not _can_fork():
        results = [_compile_one(m, target) for m in modules]
    else:
        results = _compile_forked(modules, target)
    return Compiled([r[0] for r in results], sum(r[1] for r in results), sum(r[2] for r in results))


def _can_fork() -> bool:
    import multiprocessing
    return "fork" in multiprocessing.get_all_start_methods()


def _compile_forked(modules: list[ir.Module], target: Target) -> list:
    """Modules 1.. in forked children (which inherit the built modules and an initialized
    LLVM, and need no imports), module 0 here meanwhile; results come back through pipes."""
    import pickle
    children = []
    for module in modules[1:]:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: compile, send, leave without running any Python cleanup
            try:
                os.close(read)
                payload = pickle.dumps(("ok", _compile_one(module, target)))
            except BaseException as e:  # noqa: BLE001 - reported by the parent
                payload = pickle.dumps(("error", repr(e)))
            with os.fdopen(write, "wb") as f:
                f.write(payload)
            os._exit(0)
        os.close(write)
        children.append((pid, read))
    results = [_compile_one(modules[0], target)]
    for pid, read in children:
        with os.fdopen(read, "rb") as f:
            data = f.read()
        os.waitpid(pid, 0)
        status, value = pickle.loads(data) if data else ("error", "the compiler process died")
        if status != "ok":
            raise RuntimeError(f"compiling a module failed: {value}")
        results.append(value)
    return results


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


_process_ready = False


def process_symbol(name: str) -> bool:
    """Whether MCJIT would find `name` in this process (the C library, mostly)."""
    global _process_ready
    if not _process_ready:  # creating an engine makes the process's own symbols searchable
        _init_llvm()
        llvm.create_mcjit_compiler(llvm.parse_assembly(""), llvm.Target.from_default_triple().create_target_machine())
        _process_ready = True
    return bool(llvm.address_of_symbol(name))


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
