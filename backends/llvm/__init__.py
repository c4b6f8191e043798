"""The CPU backend: the kernel IR rendered as LLVM IR (llvmlite), optimized for the host CPU
and loaded into the process as machine code; one native entry point runs the whole step
on a pool of native threads (see runtime.py)."""
from __future__ import annotations

import time

from dlc.backends.base import Backend, Compiled, StepLayout, layout_collectives, layout_outputs, layout_slots


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
        from .jit import compile_modules
        start = time.perf_counter()
        mb = self._modules(program, target, profile)
        built = time.perf_counter()
        compiled = compile_modules(mb.modules, target)
        lines = {k.name: list(k.lines) for k in program.kernels}
        layout = StepLayout(program.arena_bytes, mb.layout.scratch_bytes, layout_slots(program),
                            layout_outputs(program), [[name, phase, lines[name]] for phase, name, _, _ in mb.parts],
                            target.threads)
        collectives = layout_collectives(program)
        if collectives:
            layout.meta["collectives"] = collectives
        return Compiled(compiled.objects, layout, {"LLVM IR": built - start,
                                                   "LLVM optimize": compiled.seconds_optimize,
                                                   "machine code": compiled.seconds_codegen})

    def load(self, blobs, layout: StepLayout, target):
        from .runtime import NativeStep
        layout.threads = target.threads  # the code takes the thread count at run time
        return NativeStep(blobs, layout, target)

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


BACKEND = CpuBackend()
