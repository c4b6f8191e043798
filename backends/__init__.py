"""Backends: `reference` (numpy interpreter, the oracle) and `cpu` (native code via LLVM).

`compile_program(graph, state, target)` returns a program whose `run(feeds)` executes
one step: it reads parameters and state from the `state` arrays, writes their new
values back in place, and returns the graph's outputs.
"""
from __future__ import annotations

import numpy as np

from dlc.core.diagnostics import UsageError

TARGETS = ("cpu", "reference")


def compile_program(graph, state: dict[str, np.ndarray], target: str = "cpu", **options):
    """`graph` is the symbolic step graph, or a function building it (then `key` must
    identify it, and a compile-cache hit never builds it)."""
    if target == "reference":
        from .reference import ReferenceProgram
        return ReferenceProgram(graph() if callable(graph) else graph, state)
    if target == "cpu":
        from .llvm.cache import Cache
        from .llvm.runtime import CpuProgram
        from .llvm.target import Target
        cache = None if options.get("no_cache") else Cache(options.get("cache_dir"))
        return CpuProgram(graph, state, options.get("cpu") or Target.host(options.get("threads")),
                          cache=cache, verbose=options.get("verbose"), profile=options.get("profile", False),
                          key=options.get("key"), data_name=options.get("data_name"),
                          preloaded=options.get("preloaded"))
    raise UsageError(f"unknown target `{target}`; targets: {', '.join(TARGETS)}")
