"""Step graphs on a backend: compiled once per batch size through the disk cache (or taken
from an artifact), run with `run(feeds)`.

This is where the route meets the backend: the driver lowers the graph to a KernelProgram
(dlc.pipeline), the backend compiles and loads it (dlc.backends.base). A backend that
interprets graphs (the reference) gets the graph itself.

A program may hold several entry points compiled as one unit (the training and the
evaluation step of a model: `make_programs`), so one compile serves a whole run and the
backend can share the kernels both contain. A batch smaller than the compiled size is
padded to it: the graph's `mask_batch` pass made every reduction over the batch count only
the first `valid_rows` rows, so the padded step gives the unpadded step's loss, metrics,
gradients and updates, and one compiled batch size serves the last, partial batch too.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import time
import weakref
from typing import Callable

import numpy as np

from dlc import __version__, backends
from dlc.backends.base import Entries, StepLayout, entries_of, layout_from_json, layout_slots
from dlc.cache import Cache
from dlc.core.diagnostics import ResourceError
from dlc.core.printer import print_graph
from dlc.core.types import DType

VALID = "valid_rows"  # the input the mask_batch pass adds (dlc.passes.mask_batch.VALID)
# A unit of several entries (a training and an evaluation step) is lowered later entries
# first, and the backend starts on them while the first one is lowered (Program._compile):
# on two cores, the core left idle while the training step was lowered compiles the
# evaluation step's code. The residual network's and LeNet-5's code ready 4-8% sooner
# (docs/performance.md); models whose lowering is short (the MLP, the LSTM) within noise.
# False: every entry lowered before the backend starts (for a profiler).
STAGED_LOWERING = True


def make_program(target: str, graph, state: dict, *, key: str | None = None, data_name: str | None = None,
                 preloaded: dict | None = None, options: dict | None = None):
    """A runnable step on `target`. `graph` is the symbolic step graph, or a function that
    builds it (then `key` identifies it, and a compile-cache hit never builds it).
    options: threads, no_cache, cache_dir, profile, templates (False: generic loop nests
    only), verbose (a print function)."""
    return make_programs(target, {"": graph}, state, keys={"": key} if key is not None else None,
                         data_name=data_name, preloaded=preloaded, options=options).entry("")


def make_programs(target: str, graphs: dict, state: dict, *, keys: dict | None = None, name: str | None = None,
                  data_name: str | None = None, preloaded: dict | None = None, options: dict | None = None):
    """Several entry points ({name: graph or function}) over one state, compiled together:
    `.entry(name).run(feeds)`. preloaded: batch -> (blobs, layout) from an artifact."""
    backend = backends.backend(target)
    options = dict(options or {})
    if not backend.lowers:
        backends.sync_state(state)  # an interpreter reads the host arrays
        return Interpreted(backend, graphs, state, data_name)
    return CompiledProgram(backend, graphs, state, keys=keys, name=name, data_name=data_name, preloaded=preloaded,
                           **options)


class Entry:
    """One entry point of a program: run(feeds), calls, profile_rows()."""

    def __init__(self, program, name: str):
        self.program, self.name = program, name

    def run(self, feeds: dict) -> dict:
        return self.program.run(feeds, self.name)

    @property
    def calls(self) -> int:
        return self.program.calls(self.name)

    def profile_rows(self) -> list:
        return self.program.profile_rows(self.name)

    def __getattr__(self, attr):  # compiled(), step_for(), cache, target, ... of the program
        return getattr(self.program, attr)


class Interpreted:
    """Entry points on a backend that runs graphs (the reference): one per entry."""

    def __init__(self, backend, graphs: dict, state: dict, data_name: str | None):
        self._graphs = dict(graphs)
        self._backend, self.state, self._data_name = backend, state, data_name
        self._runs: dict = {}
        self.batch = None

    def entry(self, name: str) -> Entry:
        return Entry(self, name)

    def _run(self, name: str):
        if name not in self._runs:
            g = self._graphs[name]
            self._graphs[name] = g = g() if callable(g) else g
            self._runs[name] = self._backend.interpret(g, self.state)
        return self._runs[name]

    def run(self, feeds: dict, entry: str = "") -> dict:
        r = self._run(entry)
        if VALID not in feeds and r.graph.inputs("hyper") and _has_input(r.graph, VALID):
            feeds = {**feeds, VALID: np.int32(_rows(feeds, self._data_name or _data_input(r.graph)))}
        return r.run(feeds)

    def calls(self, entry: str = "") -> int:
        return self._runs[entry].calls if entry in self._runs else 0

    def profile_rows(self, entry: str = "") -> list:
        return []


class CompiledProgram:
    def __init__(self, backend, graphs: dict, state: dict, *, keys: dict | None = None, name: str | None = None,
                 data_name: str | None = None, preloaded: dict | None = None, threads: int | None = None,
                 no_cache: bool = False, cache_dir=None, profile: bool = False, templates: bool = True,
                 verbose: Callable[[str], None] | None = None, overlap: bool = False,
                 quick_start: bool | None = None):
        self.backend = backend
        self._graphs = dict(graphs)         # entry -> symbolic graph after the graph passes (or a function)
        self.entries = tuple(graphs)
        self.keys = keys
        self.state = state
        self.target = backend.target({"threads": threads})
        self.cache = None if no_cache else Cache(cache_dir)
        if self.cache is not None:
            backend.object_cache = self.cache
        self.profile = profile
        self.templates = backend.templates if templates else frozenset()
        self.verbose = verbose
        self.overlap = overlap  # data-parallel exchanges overlap later phases (schedule.py)
        # start on quickly compiled code while the optimized code compiles (not while
        # profiling: the profile is of the optimized code)
        self.quick_start = (quick_start if quick_start is not None else quick_start_default()) and not profile
        self._optimizing: dict[int, tuple] = {}  # batch -> (Optimizing, when it started, its finalizer)
        self.batch: int | None = None       # smaller batches are padded to this size (when they can be)
        self.units: dict[int, dict] = {}    # batch -> {entry: loaded step}
        self.origins: dict[int, str] = {}   # batch -> "cache", "compiled" or "artifact" (the compiling line)
        self.preloaded = dict(preloaded or {})  # batch -> (blobs, layout) from an artifact
        self._data_name = data_name
        self._name = name
        self._compiles = 0

    def entry(self, name: str) -> Entry:
        return Entry(self, name)

    def graph(self, entry: str = ""):
        g = self._graphs[entry]
        if callable(g):
            g = self._graphs[entry] = g()
        return g

    @property
    def data_name(self) -> str:
        if self._data_name is None:
            self._data_name = _data_input(self.graph(self.entries[0]))
        return self._data_name

    @property
    def compiles(self) -> int:
        """How many times this program was compiled (cache hits excluded)."""
        return self._compiles

    def calls(self, entry: str = "") -> int:
        return sum(u[entry].calls for u in self.units.values() if entry in u)

    # --- running ----------------------------------------------------------------------------
    def run(self, feeds: dict, entry: str = "") -> dict:
        n = _rows(feeds, self.data_name)
        batch = self.batch_for(n)
        step = self.steps_for(batch)[entry]
        padded = batch != n
        if padded:
            feeds = _pad(feeds, n, batch, step.layout)
        if VALID in self._inputs(step):
            feeds = {**feeds, VALID: np.int32(n)}
        backends.sync_state(self.state, keep=self.backend)  # another backend's device copy comes back first
        if self._optimizing:
            self.use_optimized()
        out = step.run(self.state, feeds)
        if padded:  # the padding rows' results go (a GPU's deferred result is read here: last batches only)
            out = {k: _rows_of(v, n, batch) for k, v in out.items()}
        return out

    def batch_for(self, rows: int) -> int:
        """The compiled batch size that runs `rows` rows: the program's batch (padded up to
        it) when its steps take `valid_rows`, else a size of its own."""
        if rows in self.units or self.batch is None or rows > self.batch:
            return rows
        steps = self.steps_for(self.batch)
        return self.batch if all(VALID in self._inputs(s) for s in steps.values()) else rows

    @staticmethod
    def _inputs(step) -> set:
        inputs = getattr(step, "_input_names", None)
        if inputs is None:
            inputs = step._input_names = {s[0] for s in step.layout.slots if s[1] == "input"}
        return inputs

    def steps_for(self, batch: int) -> dict:
        """{entry: step} compiled for one batch size (loaded once)."""
        unit = self.units.get(batch)
        if unit is None:
            preloaded = self.preloaded.pop(batch, None)
            if preloaded:
                self.origins[batch] = "artifact"
            blobs, layout = preloaded or self.compiled(batch, quick=self.quick_start)
            self._check_memory(batch, entries_of(layout).values())
            if isinstance(layout, Entries):
                unit = self.backend.load_entries(blobs, layout, self.target)
            else:
                unit = {self.entries[0]: self.backend.load(blobs, layout, self.target)}
            self.units[batch] = unit
            for step in unit.values():
                self._create_state(step.layout)
            threads = [f"{e or 'step'} on {s.threads}" for e, s in unit.items() if getattr(s, "threads", None)]
            if threads:
                self._say(f"threads (batch {batch}): {', '.join(threads)} of {self.target.describe().split(', ')[-1]}")
        return unit

    def step_for(self, batch: int, entry: str | None = None):
        return self.steps_for(batch)[self.entries[0] if entry is None else entry]

    def profile_rows(self, entry: str = "") -> list[tuple[str, tuple, float]]:
        """(kernel, .dln lines, seconds) summed over every batch size run so far."""
        rows: dict[tuple, float] = {}
        for unit in self.units.values():
            if entry in unit:
                for name, lines, sec in unit[entry].profile_rows():
                    rows[(name, lines)] = rows.get((name, lines), 0.0) + sec
        return [(name, lines, sec) for (name, lines), sec in rows.items()]

    # --- compiling --------------------------------------------------------------------------
    def compiled(self, batch: int, quick: bool = False) -> tuple[list[bytes], StepLayout | Entries]:
        """The backend's code for one batch size, through the cache: a StepLayout for a
        single entry, Entries for several. quick: on a cache miss, the backend's quick code
        if it has a quick tier, its optimized code on the way (use_optimized swaps it in)."""
        start = time.perf_counter()
        key = self._cache_key(batch) if self.cache else None
        hit = self._cached(key, batch) if key else None
        what = f"{self.name}, batch {batch}"
        if hit is not None:
            self.origins[batch] = "cache"
            self._say(f"compile cache hit {key[:12]} ({what}): {(time.perf_counter() - start) * 1e3:.0f} ms")
            return hit
        with _collector_paused():
            compiled, timings = self._compile(batch, quick)
        self._compiles += 1
        self.origins[batch] = "compiled"
        if compiled.optimized is not None:  # quick code: the optimized code is cached where it is made
            self._start_optimizing(batch, compiled, key)
        elif self.cache:
            self.cache.put(key, compiled.blobs, compiled.layout.to_json())
        timings.update(compiled.timings)
        phases = _phases(timings)
        stats = "".join(f", {v} {k}" for k, v in compiled.stats.items())
        quick = ", quick code (the optimized code follows)" if compiled.optimized is not None else ""
        self._say(f"compile cache {'miss ' + key[:12] if key else 'off'} ({what}): "
                  f"{(time.perf_counter() - start) * 1e3:.0f} ms: {phases}{stats}{quick}")
        for note in compiled.notes:
            self._say(note)
        return compiled.blobs, compiled.layout

    def _compile(self, batch: int, quick: bool):
        """The backend's compiled code for one batch size, and the phases' seconds. Of a
        unit of several entries, the later ones (an evaluation step: short to lower) are
        lowered first and the first one while the backend starts on them (`make`)."""
        from dlc.pipeline import check_collectives, kernel_program, lower
        timings = {}

        def made(entries) -> dict:
            programs = {}
            for entry in entries:
                t0 = time.perf_counter()
                graph = self.graph(entry)
                t1 = time.perf_counter()
                lowered = lower(graph, batch, overlap=self.overlap)
                t2 = time.perf_counter()
                programs[entry] = kernel_program(lowered, self.templates)
                check_collectives(programs[entry], self.backend)
                t3 = time.perf_counter()
                for phase, t in (("graph passes", t1 - t0), ("lower", t2 - t1), ("schedule", t3 - t2)):
                    timings[phase] = timings.get(phase, 0.0) + t
            return programs

        if len(self.entries) == 1:
            program = made(self.entries)[self.entries[0]]
            self._check_memory(batch, [_planned(program)])  # before compiling it
            return self.backend.compile(program, self.target, self.profile, quick), timings
        first = self.entries[0]
        programs = {first: None, **made(self.entries[1:])}

        def make() -> dict:
            lowered = made([first])
            self._check_memory(batch, [_planned(p) for p in {**programs, **lowered}.values()])  # before loading
            return lowered
        if not STAGED_LOWERING:
            return self.backend.compile_entries({**programs, **make()}, self.target, self.profile, quick), timings
        return self.backend.compile_entries(programs, self.target, self.profile, quick, make), timings

    def _start_optimizing(self, batch: int, compiled, key: str | None) -> None:
        cache = self.cache

        def keep(optimized) -> None:  # runs where the optimized code is made
            if cache is not None:
                cache.put(key, optimized.blobs, optimized.layout.to_json())
        optimizing = compiled.optimized(keep)
        # this program gone (or the process ending) before the code is in: nothing would
        # keep code compiled for no cache; a cached one is finished by its own process
        if cache is None:
            finalizer = weakref.finalize(self, optimizing.cancel)
        else:
            finalizer = weakref.finalize(self, self.verbose or (lambda _: None),
                                         f"the optimized code of {self.name}, batch {batch} was not ready; its "
                                         "process finishes it for the compile cache")
        self._optimizing[batch] = (optimizing, time.perf_counter(), finalizer)

    def use_optimized(self, wait: bool = False) -> None:
        """Swap the optimized code in for the quick code of each loaded unit whose optimized
        code is ready (`wait`: waits for it). Runs between steps; the results do not change
        (every LLVM pipeline computes the same bits), only the speed."""
        for batch, (optimizing, started, finalizer) in list(self._optimizing.items()):
            unit = self.units.get(batch)
            if unit is None or not (wait or optimizing.ready()):
                continue
            del self._optimizing[batch]
            finalizer.detach()
            what = f"{self.name}, batch {batch}"
            try:
                optimized = optimizing.result()
                self.backend.replace_code(unit, optimized, self.target)
            except Exception as e:  # noqa: BLE001 - the quick code runs on, correct and slower
                from dlc.core.diagnostics import warn
                warn(f"compiling the optimized code of {what} failed ({e}); the quick code runs on, slower")
                continue
            self._say(f"optimized code in use ({what}) {(time.perf_counter() - started) * 1e3:.0f} ms after "
                      f"the quick code, {sum(s.calls for s in unit.values())} step(s) later: "
                      f"{_phases(optimized.timings)}")

    def _cached(self, key: str, batch: int) -> tuple[list[bytes], StepLayout | Entries] | None:
        """A cache entry that passed every check (its checksum, its layout, the backend's
        own checks of the code); a damaged one is removed and rebuilt."""
        hit, damage = self.cache.lookup(key)
        if hit is not None:
            try:
                layout = layout_from_json(hit[1])
                damage = self.backend.validate(hit[0], layout, self.target)
            except ValueError as e:
                damage = f"its layout is invalid ({e})"
            if damage is None:
                return hit[0], layout
            self.cache.discard(key)
        if damage is not None:
            self._say(f"compile cache entry {key[:12]} (batch {batch}) was damaged ({damage}); rebuilding it")
        return None

    def _check_memory(self, batch: int, layouts) -> None:
        """Refuses a unit that cannot fit in the memory left where it runs (the host's, or a
        GPU's), before allocating any of it (numpy would fail with an opaque error, or the
        system would start swapping)."""
        free = self.backend.free_memory(self.target)
        if free is None:
            return
        layouts = list(layouts)
        work = sum(lay.arena_bytes + lay.scratch_bytes * lay.threads for lay in layouts)
        new = {s[0]: s for lay in layouts for s in lay.slots if s[1] == "input" or s[0] not in self.state}
        buffers = sum(int(np.prod(shape)) * DType(dtype).np.itemsize for _, _, dtype, shape in new.values())
        if work + buffers > free:
            raise ResourceError(f"the compiled step for batch {batch} needs {format_bytes(work + buffers)} of memory "
                                f"(working memory {format_bytes(work)}, inputs and optimizer "
                                f"state {format_bytes(buffers)}), but only {format_bytes(free)} is available",
                                hint="use a smaller batch (--batch), or close other programs")

    @property
    def name(self) -> str:
        """`mlp train+eval` in messages."""
        if self._name is None:  # (a graph not built yet is not built for a message)
            self._name = getattr(self._graphs[self.entries[0]], "name", "step")
        return self._name + (" " + "+".join(self.entries) if any(self.entries) else "")

    def _cache_key(self, batch: int) -> str:
        """What the compiled code depends on: the graphs (their text, or the source they are
        built from), the batch size, every source file of the compiler, the backend and target."""
        from dlc.pipeline import compiler_fingerprint
        h = hashlib.sha256()
        for entry in self.entries:
            key = (self.keys or {}).get(entry)
            h.update(f"{entry}\0{key if key is not None else print_graph(self.graph(entry))}\0".encode())
        for part in (str(batch), __version__, compiler_fingerprint(), self.backend.name,
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


def quick_start_default() -> bool:
    """Whether programs start on quick code when not told (DLC_QUICK_START=1: yes)."""
    return os.environ.get("DLC_QUICK_START", "0") not in ("0", "")


@contextlib.contextmanager
def _collector_paused():
    """Python's cycle collector off while a compile runs: building a step allocates
    hundreds of thousands of objects (graphs, kernel IR, llvmlite's IR), which set off
    collections that walked every object of the process -- about 40% of the time spent
    building the residual network's LLVM IR. What a compile leaves behind is collected
    afterwards, as usual. (A collector the caller turned off stays off.)"""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _phases(timings: dict) -> str:
    return ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in timings.items())


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _rows_of(value, rows: int, batch: int):
    """The first `rows` rows of a result with `batch` rows; other results as they are."""
    shape = np.shape(value) if isinstance(value, np.ndarray) else getattr(value, "shape", None)
    if shape and shape[0] == batch:
        return np.asarray(value)[:rows]
    return value


def _planned(program) -> StepLayout:
    """What a kernel program will need, as a layout (for the memory check before compiling)."""
    return StepLayout(program.arena_bytes, 0, layout_slots(program), {}, [])


def _data_input(graph) -> str:
    return graph.node(graph.inputs("data")[0]).attrs["name"]


def _has_input(graph, name: str) -> bool:
    return any(graph.node(i).attrs["name"] == name for i in graph.inputs())


def _rows(feeds: dict, data_name: str) -> int:
    return len(feeds[data_name])


def _pad(feeds: dict, rows: int, batch: int, layout: StepLayout) -> dict:
    """Batch inputs padded from `rows` to `batch` rows by repeating the real ones (finite
    values, so that the zero gradients of padded rows stay zero)."""
    batched = {s[0] for s in layout.slots if s[1] == "input" and s[3] and s[3][0] == batch}
    index = np.resize(np.arange(rows), batch)
    return {k: (np.asarray(v)[index] if k in batched and v is not None and np.ndim(v) and len(v) == rows else v)
            for k, v in feeds.items()}
