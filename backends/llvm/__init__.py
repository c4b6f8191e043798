"""The CPU backend: the kernel IR rendered as LLVM IR (llvmlite), optimized for the host CPU
and loaded into the process as machine code; one native entry point runs the whole step
on a pool of native threads (see runtime.py)."""
from __future__ import annotations

import time

from dlc.backends.base import Backend, Compiled, Entries, StepLayout, layout_outputs, layout_slots


class CpuBackend(Backend):
    name = "cpu"
    doc = "native code for this machine's CPU through LLVM, on all cores (the default)"
    stages = {"llvm": "LLVM IR of the whole step (before LLVM's optimizer)",
              "llvm-opt": "LLVM IR after LLVM's optimizer",
              "asm": "the host machine code"}

    @property
    def templates(self) -> frozenset:
        from .templates import EMITTERS
        return frozenset(EMITTERS)

    def coverage(self) -> dict[str, set]:
        from .emit import EX_RULES, IX_RULES, SCALAR_OPS
        return {"scalar ops": set(SCALAR_OPS), "index nodes": set(IX_RULES), "scalar nodes": set(EX_RULES)}

    def target(self, options: dict):
        from .target import Target
        return Target.host(options.get("threads"))

    def _modules(self, program, target, profile: bool, tag: str | None = None):
        from .codegen import ModuleBuilder
        mb = ModuleBuilder(program, target, profile=profile, tag=tag)
        mb.build()
        return mb

    def compile(self, program, target, profile: bool = False) -> Compiled:
        return self._compile({"": program}, target, profile)

    def compile_entries(self, programs: dict, target, profile: bool = False) -> Compiled:
        """One set of modules for every entry: a kernel both programs contain (identical
        code) is compiled once, and each entry gets its own step function."""
        return self._compile(programs, target, profile)

    def _compile(self, programs: dict, target, profile: bool) -> Compiled:
        from .jit import compile_modules
        from .threads import step_work
        start = time.perf_counter()
        mb = self._modules(programs, target, profile)
        built = time.perf_counter()
        compiled = compile_modules(mb.modules, target)
        layouts = {}
        for entry, program in programs.items():
            lines = {k.name: list(k.lines) for k in program.kernels}
            layouts[entry] = StepLayout(
                program.arena_bytes, mb.layout.scratch_bytes, layout_slots(program), layout_outputs(program),
                [[name, phase, lines[name]] for phase, name, _, _ in mb.entry_parts[entry]], target.threads,
                {"symbol": mb.symbol(entry), "work": step_work(program)})
        layout = layouts[""] if "" in layouts else Entries(layouts)
        return Compiled(compiled.objects, layout, {"LLVM IR": built - start,
                                                   "LLVM optimize": compiled.seconds_optimize,
                                                   "machine code": compiled.seconds_codegen},
                        {"parts": sum(map(len, mb.entry_parts.values())), "shared": mb.shared})

    def load(self, blobs, layout: StepLayout, target):
        from .runtime import NativeStep
        layout.threads = threads_for(layout, target)  # the code takes the thread count at run time
        return NativeStep(blobs, layout, target, self.object_cache)

    def load_entries(self, blobs, entries: Entries, target) -> dict:
        from .jit import Engine
        from .runtime import NativeStep
        engine = Engine(blobs, target)  # one engine: the entries share functions
        steps = {}
        for name, layout in entries.entries.items():
            layout.threads = threads_for(layout, target)
            steps[name] = NativeStep(engine, layout, target, self.object_cache)
        return steps

    def dump(self, program, stage: str, target) -> str:
        from .jit import assembly, optimized_ir
        mb = self._modules(program, target, profile=False, tag="dump")  # stable names in dumps
        if stage == "llvm":
            return mb.text()
        return optimized_ir(mb.modules, target) if stage == "llvm-opt" else assembly(mb.modules, target)

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
