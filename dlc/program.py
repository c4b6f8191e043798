"""A step graph on a backend: one compiled specialization per batch size, compiled on
first use through the disk cache (or taken from an artifact), run with `run(feeds)`.

This is where the route meets the backend: the driver lowers the graph to a KernelProgram
(dlc.pipeline), the backend compiles and loads it (dlc.backends.base). A backend that
interprets graphs (the reference) gets the graph itself.
"""
from __future__ import annotations

import hashlib
import time
from typing import Callable

import numpy as np

from dlc import __version__, backends
from dlc.backends.base import StepLayout, layout_slots
from dlc.cache import Cache
from dlc.core.diagnostics import ResourceError
from dlc.core.printer import print_graph
from dlc.core.types import DType


def make_program(target: str, graph, state: dict, *, key: str | None = None, data_name: str | None = None,
                 preloaded: dict | None = None, options: dict | None = None):
    """A runnable step on `target`. `graph` is the symbolic step graph, or a function that
    builds it (then `key` identifies it, and a compile-cache hit never builds it).
    options: threads, no_cache, cache_dir, profile, templates (False: generic loop nests
    only), verbose (a print function)."""
    backend = backends.backend(target)
    options = dict(options or {})
    if not backend.lowers:
        backends.sync_state(state)  # an interpreter reads the host arrays
        return backend.interpret(graph() if callable(graph) else graph, state)
    return CompiledProgram(backend, graph, state, key=key, data_name=data_name, preloaded=preloaded, **options)


class CompiledProgram:
    def __init__(self, backend, graph, state: dict, *, key: str | None = None, data_name: str | None = None,
                 preloaded: dict | None = None, threads: int | None = None, no_cache: bool = False,
                 cache_dir=None, profile: bool = False, templates: bool = True,
                 verbose: Callable[[str], None] | None = None, overlap: bool = False):
        self.backend = backend
        self._graph = graph                 # symbolic, after the graph passes (or a function)
        self.key = key
        self.state = state
        self.target = backend.target({"threads": threads})
        self.cache = None if no_cache else Cache(cache_dir)
        self.profile = profile
        self.templates = backend.templates if templates else frozenset()
        self.verbose = verbose
        self.overlap = overlap  # data-parallel exchanges overlap later phases (schedule.py)
        self.steps: dict[int, object] = {}
        self.preloaded = dict(preloaded or {})  # batch -> (blobs, layout) from an artifact
        self._data_name = data_name

    @property
    def graph(self):
        if callable(self._graph):
            self._graph = self._graph()
        return self._graph

    @property
    def data_name(self) -> str:
        if self._data_name is None:
            self._data_name = self.graph.node(self.graph.inputs("data")[0]).attrs["name"]
        return self._data_name

    @property
    def calls(self) -> int:
        return sum(s.calls for s in self.steps.values())

    def run(self, feeds: dict) -> dict:
        batch = len(feeds[self.data_name])
        step = self.steps.get(batch) or self.step_for(batch)
        backends.sync_state(self.state, keep=self.backend)  # another backend's device copy comes back first
        return step.run(self.state, feeds)

    def step_for(self, batch: int):
        step = self.steps.get(batch)
        if step is None:
            blobs, layout = self.preloaded.pop(batch, None) or self.compiled(batch)
            self._check_memory(batch, layout.arena_bytes, layout.scratch_bytes * layout.threads, layout.slots)
            step = self.steps[batch] = self.backend.load(blobs, layout, self.target)
            self._create_state(layout)
        return step

    def profile_rows(self) -> list[tuple[str, tuple, float]]:
        """(kernel, .dln lines, seconds) summed over every batch size run so far."""
        rows: dict[tuple, float] = {}
        for step in self.steps.values():
            for name, lines, sec in step.profile_rows():
                rows[(name, lines)] = rows.get((name, lines), 0.0) + sec
        return [(name, lines, sec) for (name, lines), sec in rows.items()]

    def compiled(self, batch: int) -> tuple[list[bytes], StepLayout]:
        """The backend's code for one batch size, through the cache."""
        from dlc.pipeline import check_collectives, kernel_program, lower
        start = time.perf_counter()
        key = self._cache_key(batch) if self.cache else None
        hit = self._cached(key, batch) if key else None
        if hit is not None:
            self._say(f"compile cache hit {key[:12]} (batch {batch}): {(time.perf_counter() - start) * 1e3:.0f} ms")
            return hit
        program = kernel_program(lower(self.graph, batch, overlap=self.overlap), self.templates)
        check_collectives(program, self.backend)
        self._check_memory(batch, program.arena_bytes, 0, layout_slots(program))  # before compiling it
        lowered = time.perf_counter()
        compiled = self.backend.compile(program, self.target, profile=self.profile)
        if self.cache:
            self.cache.put(key, compiled.blobs, compiled.layout.to_json())
        phases = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in compiled.timings.items())
        self._say(f"compile cache {'miss ' + key[:12] if key else 'off'} ({self.graph.name}, batch {batch}): "
                  f"passes {(lowered - start) * 1e3:.0f} ms, {phases}")
        for note in compiled.notes:
            self._say(note)
        return compiled.blobs, compiled.layout

    def _cached(self, key: str, batch: int) -> tuple[list[bytes], StepLayout] | None:
        """A cache entry that passed every check (its checksum, its layout, the backend's
        own checks of the code); a damaged one is removed and rebuilt."""
        hit, damage = self.cache.lookup(key)
        if hit is not None:
            try:
                layout = StepLayout.from_json(hit[1])
                damage = self.backend.validate(hit[0], layout, self.target)
            except ValueError as e:
                damage = f"its layout is invalid ({e})"
            if damage is None:
                return hit[0], layout
            self.cache.discard(key)
        if damage is not None:
            self._say(f"compile cache entry {key[:12]} (batch {batch}) was damaged ({damage}); rebuilding it")
        return None

    def _check_memory(self, batch: int, arena: int, scratch: int, slots: list) -> None:
        """Refuses a step that cannot fit in the memory left where it runs (the host's, or
        a GPU's), before allocating any of it (numpy would fail with an opaque error, or
        the system would start swapping). `scratch`: all workers' scratch space together."""
        free = self.backend.free_memory(self.target)
        new = [s for s in slots if s[1] == "input" or s[0] not in self.state]  # parameters exist already
        buffers = sum(int(np.prod(shape)) * DType(dtype).np.itemsize for _, _, dtype, shape in new)
        needed = arena + scratch + buffers
        if free is not None and needed > free:
            raise ResourceError(f"the compiled step for batch {batch} needs {format_bytes(needed)} of memory (working "
                                f"memory {format_bytes(arena + scratch)}, inputs and optimizer "
                                f"state {format_bytes(buffers)}), but only {format_bytes(free)} is available",
                                hint="use a smaller batch (--batch), or close other programs")

    def _cache_key(self, batch: int) -> str:
        """What the compiled code depends on: the graph (its text, or the source it is built
        from), the batch size, every source file of the compiler, the backend and target."""
        from dlc.pipeline import compiler_fingerprint
        h = hashlib.sha256()
        what = self.key if self.key is not None else print_graph(self.graph)
        for part in (what, str(batch), __version__, compiler_fingerprint(), self.backend.name,
                     self.target.key(), str(self.profile), ",".join(sorted(self.templates)),
                     "overlap" if self.overlap else ""):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()

    def _create_state(self, layout: StepLayout) -> None:
        """Optimizer state the passes added starts at zero (checkpoints may restore it)."""
        for name, kind, dtype, shape in layout.slots:
            if kind == "state" and name not in self.state:
                self.state[name] = np.zeros(tuple(shape), dtype=DType(dtype).np)

    def _say(self, msg: str) -> None:
        if self.verbose:
            self.verbose(msg)


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
