"""The CUDA backend: the kernel IR rendered as one CUDA C module (render.py, emit.py, with the
template generators of templates.py), compiled by NVRTC to machine code for the GPU
(nvrtc.py), run through CuPy with the model's state kept on the device and each step
replayed as a CUDA graph (runtime.py).

Importing this package needs neither CuPy nor a GPU: rendering and the `cuda` dump work
anywhere, the `ptx` dump and compiling need NVRTC (pip install 'dlc[cuda]'), running
needs a GPU.
"""
from __future__ import annotations

import time

from dlc.backends.base import Backend, Compiled, StepLayout, layout_outputs, layout_slots
from dlc.core.diagnostics import DlcError

from . import nvrtc


class CudaBackend(Backend):
    name = "cuda"
    doc = "an NVIDIA GPU: CUDA C compiled by NVRTC, run through CuPy as CUDA graphs"
    stages = {"cuda": "the CUDA C source of the whole step (one module)",
              "ptx": "the PTX NVRTC generates from it"}

    @property
    def templates(self) -> frozenset:
        from .render import GENERATORS
        return frozenset(GENERATORS)

    def coverage(self) -> dict[str, set]:
        from .emit import EX_RULES, IX_RULES, SCALAR_OPS
        return {"scalar ops": set(SCALAR_OPS), "index nodes": set(IX_RULES), "scalar nodes": set(EX_RULES)}

    def unavailable(self) -> str | None:
        have = nvrtc.gpu_available()
        return None if have else have.reason

    def target(self, options: dict):
        from .target import CudaTarget
        return CudaTarget.detect(options.get("arch"))

    def render(self, program, target, profile: bool = False) -> tuple[str, StepLayout]:
        """The step's CUDA C source and its layout (the launch list in `meta["steps"]`),
        without compiling: what `compile` builds on, and what the host emulation runs."""
        from dlc.core.kernel import all_kernels

        from .render import render_program
        rendered = render_program(program)
        lines = {k.name: list(k.lines) for k in all_kernels(program.kernels)}
        meta = {"arch": target.arch, "steps": [s.to_json() for s in rendered.steps], "profile": profile}
        layout = StepLayout(program.arena_bytes, rendered.workspace_bytes, layout_slots(program),
                            layout_outputs(program), [[s.part, s.phase, _lines(s.part, lines)] for s in rendered.launches],
                            meta=meta)
        return rendered.source, layout

    def compile(self, program, target, profile: bool = False, quick: bool = False) -> Compiled:
        from .render import launches_of, launches_per_step, steps_from_json
        start = time.perf_counter()
        source, layout = self.render(program, target, profile)
        rendered_at = time.perf_counter()
        module = _compile(source, target.arch)
        layout.meta["arch"] = module.arch
        steps = steps_from_json(layout.meta["steps"])
        launches = launches_of(steps)
        notes = [f"cuda: {launches_per_step(steps)} launches per step, {module.arch}"]
        for s in launches:
            r = module.kernels.get(s.kernel)
            if r is not None:
                notes.append(f"cuda: {s.kernel}: {r.registers} registers, {r.spill_stores} B spill stores, "
                             f"{r.spill_loads} B spill loads, {r.shared_bytes} B shared memory, "
                             f"grid {tuple(s.grid)} x block {tuple(s.block)}")
        return Compiled([module.binary], layout, {"CUDA C": rendered_at - start,
                                                  "NVRTC": time.perf_counter() - rendered_at}, notes)

    def load(self, blobs, layout: StepLayout, target):
        from .runtime import CudaStep
        return CudaStep(blobs[0], layout, target)

    def free_memory(self, target) -> int | None:
        """The GPU's free memory: the arena and the state live there, not in the host's."""
        try:
            import cupy  # optional: only a machine with a GPU gets here
            return int(cupy.cuda.runtime.memGetInfo()[0])
        except (ImportError, RuntimeError):
            return None

    def sync_state(self, state: dict) -> None:
        from .runtime import sync_state  # a no-op unless a step has run on `state`
        sync_state(state)

    def dump(self, program, stage: str, target) -> str:
        source, _ = self.render(program, target)
        if stage == "cuda":
            return source
        return _compile(source, target.arch).ptx.decode()

    def check_target(self, saved: dict, target) -> str | None:
        try:
            arch = saved["arch"]
        except (KeyError, TypeError):
            return "its target description is incomplete"
        if arch == target.arch:
            return None
        return f"it was compiled for {arch} (NVRTC {saved.get('nvrtc', '?')}); this GPU needs {target.arch}"


def _lines(part: str, lines: dict) -> list:
    """The .dln lines of a launch's kernels ("k3_x+k4_y" when kernels of a phase share it)."""
    return sorted({line for name in part.split("+") for line in lines[name]})


def _compile(source: str, arch: str):
    try:
        return nvrtc.compile_cuda(source, arch)
    except nvrtc.CudaUnavailable as e:
        raise DlcError(f"cannot compile CUDA here: {e}") from None


BACKEND = CudaBackend()
