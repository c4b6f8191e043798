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
    _optimize(llmod, tm)
    optimized = time.perf_counter()
    obj = tm.emit_object(llmod)
    return obj, optimized - start, time.perf_counter() - optimized


def _optimize(llmod, tm) -> None:
    """LLVM's O3 pipeline with both vectorizers (without its loop unrolling, LLVM time is
    15% less and the MLP's training step 18% slower)."""
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(llmod, pb)


def compile_workers() -> int:
    """Processes that compile modules at once: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def compile_modules(modules: list[ir.Module], target: Target, workers: int | None = None,
                    sizes: list[int] | None = None) -> Compiled:
    """Optimize and emit every module. llvmlite serializes its calls behind one lock, so
    threads would not overlap: `workers` processes (this one and forked children) take the
    modules from a queue, the next one as each finishes, the largest (`sizes`) first --
    the modules' LLVM costs differ several-fold and are hard to predict, and a queue of
    several modules per worker keeps the workers busy until the end."""
    _init_llvm()
    workers = min(workers or compile_workers(), len(modules))
    order = sorted(range(len(modules)), key=lambda i: -sizes[i]) if sizes else list(range(len(modules)))
    if workers == 1 or not _can_fork():
        results = [_compile_one(m, target) for m in modules]
    else:
        results = _compile_forked(modules, target, workers, order)
    return Compiled([r[0] for r in results], sum(r[1] for r in results), sum(r[2] for r in results))


def _can_fork() -> bool:
    import multiprocessing
    return "fork" in multiprocessing.get_all_start_methods()


def _take_modules(queue: int, modules: list[ir.Module], target: Target) -> dict:
    """Compile module after module from the queue (a pipe of 4-byte indices, each read
    whole by one process) until it is empty: {index: result}."""
    done = {}
    while len(item := os.read(queue, 4)) == 4:
        i = int.from_bytes(item, "little")
        done[i] = _compile_one(modules[i], target)
    return done


def _compile_forked(modules: list[ir.Module], target: Target, workers: int, order: list[int]) -> list:
    """workers - 1 forked children (which inherit the built modules and an initialized LLVM,
    and need no imports) and this process take modules from one queue; the children's
    results come back through pipes."""
    import pickle
    queue, fill = os.pipe()
    os.write(fill, b"".join(i.to_bytes(4, "little") for i in order))
    os.close(fill)  # an empty queue then reads as the end
    children = []
    try:
        for _ in range(workers - 1):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: compile, send, leave without running any Python cleanup
                try:
                    os.close(read)
                    payload = pickle.dumps(("ok", _take_modules(queue, modules, target)))
                except BaseException as e:  # noqa: BLE001 - reported by the parent
                    payload = pickle.dumps(("error", repr(e)))
                with os.fdopen(write, "wb") as f:
                    f.write(payload)
                os._exit(0)
            os.close(write)
            children.append((pid, read))
        results, failure = _take_modules(queue, modules, target), None
    except Exception as e:  # noqa: BLE001 - raised once the children are collected
        results, failure = {}, repr(e)
    finally:
        os.close(queue)
    for pid, read in children:
        with os.fdopen(read, "rb") as f:
            data = f.read()
        os.waitpid(pid, 0)
        status, value = pickle.loads(data) if data else ("error", "the compiler process died")
        if status == "ok":
            results.update(value)
        else:
            failure = failure or value
    if failure is not None or len(results) != len(modules):
        raise RuntimeError(f"compiling a module failed: {failure or 'a module was not compiled'}")
    return [results[i] for i in range(len(modules))]


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
    _optimize(llmod, tm)
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
