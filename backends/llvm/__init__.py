"""The CPU backend: the kernel IR rendered as LLVM IR (llvmlite), optimized for the host CPU
and loaded into the process as machine code; one native entry point runs the whole step
on a pool of native threads (see runtime.py)."""
from __future__ import annotations

import time

from dlc.backends.base import (Backend, Compiled, Entries, StepLayout, entries_of, layout_collectives, layout_outputs,
                               layout_slots)
from dlc.core.diagnostics import DlcError


# Optimized code is built and compiled by a forked process (jit.in_child), which sends
# back the objects and their layout: the LLVM IR is some 130,000 Python objects in
# reference cycles, which this process's cycle collector would otherwise walk and free
# right after the compile (the residual network's 130 ms on a Zen 4 machine, before its
# first step: it is ready 11% sooner, LeNet-5 8%). False: in this process (for a
# profiler, a debugger, or a test that watches the code generator).
BUILD_IN_CHILD = True


class CpuBackend(Backend):
    name = "cpu"
    doc = "native code for this machine's CPU through LLVM, on all cores (the default)"
    collectives = True
    stages = {"llvm": "LLVM IR of the whole step (before LLVM's optimizer)",
              "llvm-opt": "LLVM IR after LLVM's optimizer",
              "asm": "the host machine code"}

    @property
    def templates(self) -> frozenset:
        from .templates import EMITTERS
        return frozenset(EMITTERS)

    def unavailable(self) -> str | None:
        from .target import llvmlite_too_old
        return llvmlite_too_old()

    def coverage(self) -> dict[str, set]:
        from .emit import EX_RULES, IX_RULES, SCALAR_OPS
        return {"scalar ops": set(SCALAR_OPS), "index nodes": set(IX_RULES), "scalar nodes": set(EX_RULES)}

    def target(self, options: dict):
        from .target import Target
        return Target.host(options.get("threads"))

    def _modules(self, program, target, profile: bool, tag: str | None = None, finished=None):
        from .codegen import ModuleBuilder
        mb = ModuleBuilder(program, target, profile=profile, tag=tag)
        mb.build(finished)
        return mb

    def compile(self, program, target, profile: bool = False, quick: bool = False) -> Compiled:
        return self._compile({"": program}, target, profile, quick)

    def compile_entries(self, programs: dict, target, profile: bool = False, quick: bool = False,
                        make=None) -> Compiled:
        """One set of modules for every entry: a kernel both programs contain (identical
        code) is compiled once, and each entry gets its own step function. The entries
        made by make() are built after the others, whose code is compiled meanwhile."""
        return self._compile(programs, target, profile, quick, make)

    def _compile(self, programs: dict, target, profile: bool, quick: bool, make=None) -> Compiled:
        """quick: the modules through the quick tier's passes (jit.QUICK_PASSES), with
        `optimized` set to compile them again at O3 in a forked process. Optimized code
        is built and compiled by a forked process (BUILD_IN_CHILD): given `make`, one
        forked before make() runs here, which builds the entries at hand and compiles
        them while it waits for make()'s programs (_build)."""
        from dlc.backends.base import made_programs

        from .jit import Unsent, can_fork, in_child
        quick = quick and can_fork()  # the optimized code is compiled by a forked process
        if not quick and BUILD_IN_CHILD and can_fork():
            if make is None:
                return in_child(lambda: self._build(programs, target, profile, False))
            try:
                return in_child(lambda receive: self._build(programs, target, profile, False, receive), make)
            except Unsent as e:  # (programs that do not pickle: built in one go instead)
                made = e.value
                return in_child(lambda: self._build(made_programs(programs, lambda: made), target, profile, False))
        return self._build(made_programs(programs, make), target, profile, quick)

    def _build(self, programs: dict, target, profile: bool, quick: bool, make=None) -> Compiled:
        """The O3 modules are compiled while the rest is built (ModuleBuilder.build,
        jit.ModuleCompiler); with `make`, the modules of the entries at hand first
        (ModuleBuilder.build_first), then make()'s."""
        from .codegen import ModuleBuilder
        from .jit import ModuleCompiler
        start = time.perf_counter()
        waited = 0.0
        compiler = ModuleCompiler(target, quick=quick)
        try:
            mb = ModuleBuilder(programs, target, profile=profile)
            if make is not None:
                mb.build_first(compiler.add)
                before = time.perf_counter()
                mb.add_programs(make())
                waited = time.perf_counter() - before
            mb.build(compiler.add)
            layout = self._layout(mb.programs, mb, target)
            built = time.perf_counter()
            compiler.add(mb.modules, mb.sizes, mb.pretuned, mb.lsr)  # those `finished` did not hand over
        except BaseException:
            compiler.cancel()
            raise
        compiled = _finish(mb, layout, target, compiler.finish(order=mb.modules))
        compiled.timings = {"LLVM IR": built - start - waited, **compiled.timings}
        compiled.stats = {"parts": sum(map(len, mb.entry_parts.values())), "shared": mb.shared}
        if quick:
            compiled.optimized = lambda then: _optimize_in_child(mb, layout, target, then)
        return compiled

    @staticmethod
    def _layout(programs: dict, mb, target) -> StepLayout | Entries:
        """Each entry's layout, bound to the code (_bind_layout)."""
        from dlc.core.kernel import all_kernels

        from .threads import step_work
        layouts = {}
        for entry, program in programs.items():
            lines = {k.name: list(k.lines) for k in all_kernels(program.kernels)}
            layouts[entry] = StepLayout(
                program.arena_bytes, mb.layout.scratch_bytes, layout_slots(program), layout_outputs(program),
                [[name, phase, lines[name]] for phase, name, _, _ in mb.entry_parts[entry]], target.threads,
                {"symbol": mb.symbol(entry), "work": step_work(program)})
            collectives = layout_collectives(program)  # each bucket's buffers, for the host calls
            if collectives:
                layouts[entry].meta["collectives"] = collectives
            _bind_layout(mb.step_module, layouts[entry])
        return layouts[""] if "" in layouts else Entries(layouts)

    def replace_code(self, steps: dict, compiled: Compiled, target) -> None:
        from .jit import Engine
        self._refuse_damaged(compiled.blobs, compiled.layout, target)
        engine = Engine(compiled.blobs, target)  # one engine: the entries share functions
        for step in steps.values():
            step.use_code(engine)

    def validate(self, blobs, layout, target) -> str | None:
        """Checks the objects' symbol tables (parsed here, not by LLVM) against the layout:
        each object defines and needs what was recorded when it was compiled, nothing is
        defined twice, every entry's step function exists, the code was compiled for these
        very layouts, every
        symbol of the step is defined by one of the objects and every other one is in this
        process (MCJIT aborts the process on one it cannot resolve)."""
        from .elf import ElfError, machine_of, symbols
        from .jit import process_symbol
        if not is_elf(target.triple):
            return None  # Mach-O and COFF objects: no parser here; the checksums still hold
        tag, records = layout.meta.get("tag"), layout.meta.get("objects")
        if not isinstance(tag, str) or not tag or not isinstance(records, list):
            return "its layout does not list the objects' symbols"
        if len(records) != len(blobs):
            return f"it has {len(blobs)} object(s) where its layout lists {len(records)}"
        machine, defined = machine_of(target.triple), {}
        for i, (blob, record) in enumerate(zip(blobs, records)):
            try:
                found = symbols(blob)
            except ElfError as e:
                return f"object {i} is not valid object code ({e})"
            if machine is not None and found.machine != machine:
                return f"object {i} is machine code for ELF machine {found.machine}, not this {target.triple}"
            if record != {"defines": found.defines, "needs": found.needs}:
                return f"object {i} is not the one compiled with this layout (its symbols differ)"
            for name in found.defines:
                if name in defined:
                    return f"`{name}` is defined by objects {defined[name]} and {i}"
                defined[name] = i
        for entry in entries_of(layout).values():
            step = entry.meta.get("symbol", "dlc_step")
            if step not in defined:
                return f"no object defines the step function `{step}`"
            reason = _check_collectives(entry)
            if reason:
                return reason
            if _layout_symbol(entry) not in defined:
                return "its layout is not the one the code was compiled for"
        for i, record in enumerate(records):
            for name in record["needs"]:
                if name in defined:
                    continue
                if name.startswith("dlc_") or name.endswith("." + tag):
                    return f"object {i} calls `{name}`, which no object defines"
                if not process_symbol(name):
                    return f"object {i} needs `{name}`, which this process does not provide"
        return None

    def load(self, blobs, layout: StepLayout, target):
        from .runtime import NativeStep
        self._refuse_damaged(blobs, layout, target)
        layout.threads = threads_for(layout, target)  # the code takes the thread count at run time
        return NativeStep(blobs, layout, target, self.object_cache)

    def load_entries(self, blobs, entries: Entries, target) -> dict:
        from .jit import Engine
        from .runtime import NativeStep
        self._refuse_damaged(blobs, entries, target)
        engine = Engine(blobs, target)  # one engine: the entries share functions
        steps = {}
        for name, layout in entries.entries.items():
            layout.threads = threads_for(layout, target)
            steps[name] = NativeStep(engine, layout, target, self.object_cache)
        return steps

    def _refuse_damaged(self, blobs, layout, target) -> None:
        reason = self.validate(blobs, layout, target)
        if reason:  # the driver validates first; this keeps any other caller from crashing
            raise DlcError(f"refusing to load damaged compiled code: {reason}",
                           hint="clear the compile cache (`dlc cache clear`) or rebuild the artifact")

    def dump(self, program, stage: str, target) -> str:
        from .jit import assembly, optimized_ir
        # stable names in dumps; the modules as a compile builds them (`finished`: a no-op)
        mb = self._modules(program, target, profile=False, tag="dump", finished=lambda *_: None)
        if stage == "llvm":
            return mb.text()
        if stage == "llvm-opt":
            return optimized_ir(mb.modules, target, mb.pretuned)
        return assembly(mb.modules, target, mb.lsr, mb.pretuned)

    def check_target(self, saved: dict, target) -> str | None:
        from .target import isa
        try:
            same = (saved["cpu"], saved["features"], saved["triple"]) == (target.cpu, target.features, target.triple)
        except (KeyError, TypeError):
            return "its target description is incomplete"
        if same:
            return None
        return (f"it was compiled for a {saved['cpu']} CPU ({isa(str(saved['features']))}); this machine is a "
                f"{target.cpu} ({isa(target.features)})")


def is_elf(triple: str) -> bool:
    return not any(system in triple for system in ("darwin", "apple", "windows", "win32"))


def _check_collectives(layout: StepLayout) -> str | None:
    """The buffers of a data-parallel step's exchanges (meta "collectives", read by the
    runtime's host calls) lie in its arena or are its slots, with their dtypes and shapes."""
    import math
    from dlc.core.types import DType
    buckets = layout.meta.get("collectives", {})
    slots = {s[0]: (s[2], list(s[3])) for s in layout.slots}
    try:
        assert isinstance(buckets, dict)
        for key, (sources, targets) in buckets.items():
            assert key.isdigit() and len(sources) == len(targets)
            for where, dtype, shape in sources + targets:
                nbytes = DType(dtype).np.itemsize * math.prod(shape)
                assert all(isinstance(d, int) and d >= 0 for d in shape)
                assert (isinstance(where, int) and 0 <= where and where + nbytes <= layout.arena_bytes
                        if not isinstance(where, str) else slots.get(where) == (dtype, list(shape)))
    except (AssertionError, TypeError, ValueError, AttributeError):
        return "its layout's exchanges (collectives) do not fit its buffers"
    return None


def _layout_symbol(layout: StepLayout) -> str:
    return f"dlc_layout.{layout.code_digest()}"


def _bind_layout(module, layout: StepLayout) -> None:
    """A symbol named after the layout's digest: code and layout that do not belong
    together (an edited or mismatched layout) are refused before loading."""
    from llvmlite import ir
    name = _layout_symbol(layout)
    if name in module.globals:  # two entries with identical layouts
        return
    mark = ir.GlobalVariable(module, ir.IntType(8), name=name)
    mark.global_constant = True
    mark.initializer = ir.Constant(ir.IntType(8), 0)


def _finish(mb, layout, target, objects) -> Compiled:
    """The compiled modules, their layout recording what each object defines and needs
    (checked against the objects before loading them). (The optimized code's is recorded
    in the process that compiles it, on that process's copy of the layout.)"""
    if is_elf(target.triple):
        layout.meta.update({"tag": mb.tag, "objects": [_symbols(obj) for obj in objects.objects]})
    return Compiled(objects.objects, layout, {"LLVM optimize": objects.seconds_optimize,
                                              "machine code": objects.seconds_codegen})


def _optimize_in_child(mb, layout, target, then):
    """The O3 code of quick code, compiled by a forked process (jit.ForkedJob) that passes
    it to then() there and sends it back. It takes half the cores; the quick code's steps
    run on the rest (on 2 cores, one compiler process beside one-thread steps finished
    digits_mlp's run 0.08 s sooner than two compiler processes, the residual network's
    first 200 steps 0.1-0.3 s later)."""
    from .jit import ForkedJob, compile_modules, compile_workers
    workers = max(1, compile_workers() // 2)

    def work() -> Compiled:
        compiled = _finish(mb, layout, target, compile_modules(mb.modules, target, workers, mb.sizes, lsr=mb.lsr,
                                                          pretuned=mb.pretuned))
        then(compiled)
        return compiled
    return ForkedJob(work, workers)


def _symbols(obj: bytes) -> dict:
    from .elf import symbols
    found = symbols(obj)
    return {"defines": found.defines, "needs": found.needs}


def threads_for(layout: StepLayout, target) -> int:
    """The target's thread count; with `auto`, the count the step's work is fastest on
    among the cores other processes leave free (threads.py)."""
    if not target.auto:
        return target.threads
    from .threads import choose_threads, free_cores, start_probe
    free = free_cores(target.threads, start_probe().others_busy())
    work = layout.meta.get("work")
    return choose_threads(work, free) if work else free


BACKEND = CpuBackend()
