"""The CUDA backend: the kernel IR rendered as one CUDA C module (render.py, emit.py, with the
template generators of templates.py), compiled by NVRTC to machine code for the GPU
(nvrtc.py) as translation units side by side, one per core, run through CuPy with the
model's state kept on the device and each step replayed as a CUDA graph (runtime.py).

Importing this package needs neither CuPy nor a GPU: rendering and the `cuda` dump work
anywhere, the `ptx` dump and compiling need NVRTC (pip install 'dlc[cuda]'), running
needs a GPU.
"""
from __future__ import annotations

import os
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
        rendered, layout = self._rendered(program, target, profile)
        return rendered.source, layout

    def render_units(self, program, target, profile: bool = False, count: int = 1):
        """The step's module as up to `count` translation units ([(kernels, source)]) and its
        layout, whose `meta["units"]` names each unit's kernels (a step loads one module
        per unit)."""
        rendered, layout = self._rendered(program, target, profile)
        units = rendered.units(count)
        layout.meta["units"] = [names for names, _ in units]
        return units, layout, rendered

    def _rendered(self, program, target, profile: bool):
        from dlc.core.kernel import all_kernels

        from .render import render_program
        rendered = render_program(program)
        lines = {k.name: list(k.lines) for k in all_kernels(program.kernels)}
        meta = {"arch": target.arch, "steps": [s.to_json() for s in rendered.steps], "profile": profile}
        layout = StepLayout(program.arena_bytes, rendered.workspace_bytes, layout_slots(program),
                            layout_outputs(program), [[s.part, s.phase, _lines(s.part, lines)] for s in rendered.launches],
                            meta=meta)
        return rendered, layout

    def compile(self, program, target, profile: bool = False, quick: bool = False) -> Compiled:
        return self._compile({"": program}, target, profile)[""]

    def compile_entries(self, programs: dict, target, profile: bool = False, quick: bool = False,
                        make=None) -> Compiled:
        """The programs' translation units compiled together (training and evaluation
        steps side by side); each entry's layout records its blobs in `meta["blobs"]`."""
        from dlc.backends.base import made_programs, one_unit
        compiled = self._compile(made_programs(programs, make), target, profile)
        return one_unit(compiled, next(iter(compiled.values())).timings)  # (one pool: its timings)

    def _compile(self, programs: dict, target, profile: bool) -> dict[str, Compiled]:
        """Each program rendered, its module cut into translation units, and every unit of
        every program compiled on a pool of threads, one per core (NVRTC releases the GIL:
        LeNet-5's training and evaluation steps compile in 1.06-1.14 s instead of 2.0-2.2
        on two cores). A step loads its units as modules; `meta["units"]` names each one's
        kernels."""
        from concurrent.futures import ThreadPoolExecutor

        from .render import launches_of, launches_per_step
        start = time.perf_counter()
        workers = _cores()
        made = {name: self.render_units(program, target, profile, workers) for name, program in programs.items()}
        jobs = [(name, source) for name, (units, _, _) in made.items() for _, source in units]
        rendered_at = time.perf_counter()
        with ThreadPoolExecutor(min(workers, len(jobs))) as pool:
            modules = list(pool.map(lambda job: _compile(job[1], target.arch), jobs))
        timings = {"CUDA C": rendered_at - start, "NVRTC": time.perf_counter() - rendered_at}
        out = {}
        for name, (units, layout, rendered) in made.items():
            mine = [module for (owner, _), module in zip(jobs, modules) if owner == name]
            layout.meta["arch"] = mine[0].arch
            reports = {k: r for module in mine for k, r in module.kernels.items()}
            notes = [f"cuda: {launches_per_step(rendered.steps)} launches per step, {layout.meta['arch']}, "
                     f"{len(mine)} translation units"]
            for s in launches_of(rendered.steps):
                r = reports.get(s.kernel)
                if r is not None:
                    notes.append(f"cuda: {s.kernel}: {r.registers} registers, {r.spill_stores} B spill stores, "
                                 f"{r.spill_loads} B spill loads, {r.shared_bytes} B shared memory, "
                                 f"grid {tuple(s.grid)} x block {tuple(s.block)}")
            out[name] = Compiled([module.binary for module in mine], layout, timings, notes)
        return out

    def load(self, blobs, layout: StepLayout, target):
        from .runtime import CudaStep
        return CudaStep(blobs, layout, target)

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


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _compile(source: str, arch: str):
    try:
        return nvrtc.compile_cuda(source, arch)
    except nvrtc.CudaUnavailable as e:
        raise DlcError(f"cannot compile CUDA here: {e}") from None


BACKEND = CudaBackend()
