"""Run a CUDA backend step on the CPU: the module's CUDA C source through the host
emulation (HostModule), its launch list in order over a host arena, the input arrays and
the state arrays (updated in place, as the GPU step updates its device copies).

    source, layout = BACKEND.render(program, BACKEND.target({}))
    step = HostStep(source, layout)
    results = step.run(state, feeds)

It checks what the generated code computes, launch by launch; it cannot show races
(see cuda_host.h).
"""
from __future__ import annotations

import numpy as np

from dlc.backends.cuda.render import Copy, steps_from_json
from dlc.core.types import DType

from . import HostModule

ALIGN = 64


class HostStep:
    def __init__(self, source: str, layout, build_dir=None):
        self.layout = layout
        self.module = HostModule(source, build_dir)
        self.steps = steps_from_json(layout.meta["steps"])
        size = -(-layout.arena_bytes // ALIGN) * ALIGN + layout.scratch_bytes
        self.arena = np.zeros(max(size, ALIGN), np.uint8)
        self.kinds = {name: (kind, DType(dtype).np, tuple(shape)) for name, kind, dtype, shape in layout.slots}
        self.launched = 0

    def run(self, state: dict, feeds: dict) -> dict:
        arrays = {}
        for name, (kind, dtype, shape) in self.kinds.items():
            if kind == "state":
                a = state[name]
                assert a.dtype == dtype and a.shape == shape and a.flags.c_contiguous, name
                arrays[name] = a
            else:
                arrays[name] = np.array(feeds[name], dtype=dtype, order="C").reshape(shape)
        for s in self.steps:
            if isinstance(s, Copy):
                src, dst = self._bytes(s.src, arrays), self._bytes(s.dst, arrays)
                dst[:s.nbytes] = src[:s.nbytes].copy()
                continue
            args = [self.arena if a == "arena" else arrays[a] for a in s.args]
            self.module.launch(s.kernel, s.grid, s.block, *args)
            self.launched += 1
        out = {}
        for name, (where, dtype, shape) in self.layout.outputs.items():
            dt = DType(dtype).np
            if isinstance(where, int):
                n = int(np.prod(shape)) * dt.itemsize
                out[name] = self.arena[where:where + n].view(dt).reshape(shape).copy()
            else:
                out[name] = np.array(arrays[where], copy=True)
        return out

    def _bytes(self, ref, arrays) -> np.ndarray:
        kind, at = ref
        return self.arena[at:] if kind == "arena" else arrays[at].reshape(-1).view(np.uint8)
