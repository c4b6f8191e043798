"""Backends: `reference` (numpy interpreter, the oracle) and `cpu` (native code via LLVM).

`compile_program(graph, state, target)` returns a program whose `run(feeds)` executes
one step: it reads parameters and state from the `state` arrays, writes their new
values back in place, and returns the graph's outputs.
"""
from __future__ import annotations

import numpy as np

from dlc.diagnostics import UsageError

TARGETS = ("reference",)


def compile_program(graph, state: dict[str, np.ndarray], target: str = "reference", **options):
    if target == "reference":
        from .reference import ReferenceProgram
        return ReferenceProgram(graph, state, **options)
    raise UsageError(f"unknown target `{target}`; targets: {', '.join(TARGETS)}")
