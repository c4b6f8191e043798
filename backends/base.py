"""The backend interface: what the driver asks of a code generator, and nothing more.

The driver (dlc/pipeline.py, dlc/program.py) lowers a model to a KernelProgram per batch
size (dlc/core/kernel: the contract), keeps compiled code in the disk cache and in
artifacts, and runs steps. A backend:

  name, doc           how `--target` names and describes it
  stages              IR stages it can print beyond the driver's (`--dump-ir`), name -> doc
  templates           the template kinds it renders with dedicated code; the driver expands
                      every other kind to its generic loop nests before `compile`
  coverage()          what its renderer handles: {"scalar ops": names, "index nodes": classes,
                      "scalar nodes": classes} -- a test holds it to the whole kernel IR
  unavailable()       None, or one sentence saying why it cannot run here
  target(options)     a Target for this machine: `key()` (part of every cache key),
                      `describe()`, `to_json()`
  compile(program, target, profile) -> Compiled: blobs (bytes) and a StepLayout
  validate(blobs, layout, target)  None, or one sentence saying why this code must not be
                      loaded. Code from the disk cache or an artifact has passed a checksum
                      but may still be damaged (a missing or swapped object, one from another
                      build); the driver calls this before `load` and rebuilds the code (cache)
                      or refuses the file (artifact). It must run none of the code and must
                      not crash on any input: loading is where native code starts to run.
  load(blobs, layout, target) -> Step: `run(state, feeds)` and `profile_rows()`
  compile_entries(programs, target, profile, make=None) -> Compiled: several programs (a
                      training and an evaluation step) as one unit, with an `Entries`
                      layout; the default compiles each alone, a backend may share code
                      between them. An entry whose program is None is made by `make()`
                      (the driver still lowering it): a backend may start on the others
  load_entries(blobs, entries, target) -> {entry: Step}
  dump(program, stage, target) -> text of one of its stages
  check_target(saved, target)   None, or why code built for `saved` (a target's JSON)
                                cannot run on `target`
  sync_state(state)   make the host arrays in `state` current (a backend that keeps the
                      state in a device's memory copies it back); a no-op by default
  collectives         True when its steps run the kernel IR's Collective parts (a call to
                      the host between phases: dlc.core.collective's communicator); the
                      driver refuses data-parallel programs for a backend without them

A backend that interprets graphs instead (the numpy reference) sets `lowers = False` and
implements `interpret(graph, state)`.

`object_cache` is set by the driver to its compile cache (`get(key) -> (blobs, text) | None`,
`put(key, blobs, text)`), or None: a backend may keep code there that belongs to no
program (the CPU backend's worker pool), keyed by what it depends on.

Backends import the core (dlc.core), the passes and this module; never the driver, never
each other. A new backend is a folder with a module-level `BACKEND` plus one line in the
registry (backends/__init__.py); docs/backends.md walks through it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol


@dataclass
class StepLayout:
    """Everything needed to run compiled code besides the code itself (stored beside it in
    the cache and in artifacts): buffer slots, the arena, where results are, the kernels."""

    arena_bytes: int
    scratch_bytes: int
    slots: list                      # [name, kind, dtype, shape] per input/state buffer, in table order
    outputs: dict                    # result name -> [arena offset or slot name, dtype, shape]
    kernels: list                    # [name, phase, lines] per profiled part, in call order
    threads: int = 1
    meta: dict = field(default_factory=dict)   # backend-specific

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "StepLayout":
        """ValueError unless `text` is a well-formed layout (it may come from a damaged file)."""
        try:
            raw = json.loads(text)
            assert isinstance(raw, dict) and set(raw) == _LAYOUT_FIELDS, "unexpected fields"
            layout = StepLayout(**raw)
            _check_layout(layout)
        except (ValueError, TypeError, AssertionError, RecursionError) as e:
            raise ValueError(str(e) or type(e).__name__) from None
        return layout

    def code_digest(self) -> str:
        """A digest of everything the compiled code assumes about its buffers (not the
        thread count, set at load, nor `meta`); a backend may build it into the code."""
        fixed = [self.arena_bytes, self.scratch_bytes, self.slots, self.outputs, self.kernels]
        return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:16]


_LAYOUT_FIELDS = {"arena_bytes", "scratch_bytes", "slots", "outputs", "kernels", "threads", "meta"}


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_layout(layout: StepLayout) -> None:
    from dlc.core.types import DType
    assert _count(layout.arena_bytes) and _count(layout.scratch_bytes), "bad sizes"
    assert _count(layout.threads) and layout.threads >= 1, "bad thread count"
    assert isinstance(layout.slots, list) and isinstance(layout.outputs, dict), "bad slots or outputs"
    assert isinstance(layout.kernels, list) and isinstance(layout.meta, dict), "bad kernels or meta"
    names = set()
    for name, kind, dtype, shape in layout.slots:
        assert isinstance(name, str) and name not in names and kind in ("input", "state"), f"bad slot {name!r}"
        assert isinstance(shape, list) and all(_count(d) for d in shape), f"bad shape of {name!r}"
        DType(dtype)
        names.add(name)
    for name, (where, dtype, shape) in layout.outputs.items():
        assert isinstance(shape, list) and all(_count(d) for d in shape), f"bad shape of output {name!r}"
        size = DType(dtype).np.itemsize
        for d in shape:
            size *= d
        if isinstance(where, str):
            assert where in names, f"output {name!r} names no slot"
        else:  # in the arena: wholly inside it
            assert _count(where) and where + size <= layout.arena_bytes, f"output {name!r} is outside the arena"
    for kernel in layout.kernels:
        assert isinstance(kernel, list) and len(kernel) == 3 and isinstance(kernel[0], str), "bad kernel entry"


@dataclass
class Entries:
    """The layout of several programs compiled as one unit: a StepLayout per entry point,
    and what the backend records of the unit as a whole (`meta`: its objects' symbols)."""

    entries: dict            # entry -> StepLayout
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"entries": {k: asdict(v) for k, v in self.entries.items()}, "meta": self.meta},
                          sort_keys=True)


def layout_from_json(text: str) -> "StepLayout | Entries":
    """A StepLayout, or the Entries of a unit of several programs; ValueError unless `text`
    is well formed (it may come from a damaged file)."""
    try:
        raw = json.loads(text)
        if isinstance(raw, dict) and set(raw) == {"entries", "meta"}:
            assert isinstance(raw["entries"], dict) and raw["entries"] and isinstance(raw["meta"], dict), \
                "bad entries"
            return Entries({str(k): StepLayout.from_json(json.dumps(v)) for k, v in raw["entries"].items()},
                           raw["meta"])
    except (TypeError, AssertionError, RecursionError) as e:
        raise ValueError(str(e) or type(e).__name__) from None
    return StepLayout.from_json(text)


def entries_of(layout) -> dict:
    """{entry: StepLayout} of a unit ({"": layout} for a single program)."""
    return layout.entries if isinstance(layout, Entries) else {"": layout}


@dataclass
class Compiled:
    blobs: list[bytes]
    layout: StepLayout
    timings: dict = field(default_factory=dict)   # phase -> seconds, for --verbose
    notes: list[str] = field(default_factory=list)  # more lines for --verbose (registers per kernel)
    stats: dict = field(default_factory=dict)     # counts worth a --verbose line (parts, shared, ...)
    # quick code only (compile(quick=True)): optimized(then) starts making the optimized
    # code of the same layout and returns an Optimizing; then(Compiled) runs where that
    # code is made (on the CPU a forked process: the driver caches it there)
    optimized: Callable[[Callable[["Compiled"], None]], "Optimizing"] | None = None


class Optimizing(Protocol):
    """The optimized code of a step whose quick code already runs, on its way."""

    def ready(self) -> bool:
        """Whether result() would return at once."""

    def result(self) -> Compiled:
        """The optimized code (waits for it); raises RuntimeError if it failed."""

    def cancel(self) -> None:
        """Stop making it (the process is ending and nothing would keep it)."""


class Step(Protocol):
    layout: StepLayout
    calls: int

    def run(self, state: dict, feeds: dict) -> dict:
        """One step: reads parameters and state from `state` and updates them in place
        (or in a device copy, see Backend.sync_state); returns copies of the results:
        numpy arrays, or deferred values that are read on first use (`np.asarray(v)`,
        `float(v)`) and say whether that would wait (`v.ready()`), so that a caller can
        read the results of a step while later steps run."""

    def profile_rows(self) -> list[tuple[str, tuple, float]]:
        """(kernel, .dln lines, seconds) over the calls so far (empty when not profiled)."""


class Backend:
    name: str = ""
    doc: str = ""
    stages: dict[str, str] = {}
    templates: frozenset = frozenset()
    lowers: bool = True
    collectives: bool = False  # can its steps run Collective parts (data-parallel jobs)?
    object_cache = None  # the driver's compile cache, for code that belongs to no program

    def unavailable(self) -> str | None:
        return None

    def coverage(self) -> dict[str, set]:
        raise NotImplementedError

    def target(self, options: dict):
        raise NotImplementedError

    def compile(self, program, target, profile: bool = False, quick: bool = False) -> Compiled:
        """quick: the caller would rather start sooner on slower code; a backend with a
        quicker first tier returns that code, with `optimized` set to make the real one."""
        raise NotImplementedError

    def validate(self, blobs: list[bytes], layout, target) -> str | None:
        """`layout`: a StepLayout, or the Entries of a unit of several programs."""
        return None

    def load(self, blobs: list[bytes], layout: StepLayout, target) -> Step:
        raise NotImplementedError

    def compile_entries(self, programs: dict, target, profile: bool = False, quick: bool = False,
                        make: Callable[[], dict] | None = None) -> Compiled:
        """Several programs as one unit ({entry: program}, in the unit's order); make()
        returns the programs of the entries given as None. This default compiles each on
        its own (with no quick tier); each entry's layout records its blobs in
        `meta["blobs"]` ([first, end))."""
        compiled = {name: self.compile(program, target, profile)
                     for name, program in made_programs(programs, make).items()}
        timings: dict = {}
        for c in compiled.values():
            for k, v in c.timings.items():
                timings[k] = timings.get(k, 0.0) + v
        return one_unit(compiled, timings)

    def load_entries(self, blobs: list[bytes], entries: Entries, target) -> dict:
        return {name: self.load(blobs[slice(*layout.meta["blobs"])], layout, target)
                for name, layout in entries.entries.items()}

    def replace_code(self, steps: dict, compiled: Compiled, target) -> None:
        """Make the loaded steps ({entry: step}) of a unit run `compiled` from their next
        call on: the optimized code of their quick code (the same layout)."""
        raise NotImplementedError(f"{self.name} has no quick tier")

    def dump(self, program, stage: str, target) -> str:
        raise NotImplementedError(f"{self.name} has no stage {stage}")

    def check_target(self, saved: dict, target) -> str | None:
        return None if saved == target.to_json() else f"it was compiled for another {self.name} target"

    def free_memory(self, target) -> int | None:
        """Bytes the step's working memory may still take where it lives (None: unknown).
        By default the host's: a backend with memory of its own (a GPU) says how much is free there."""
        return host_memory_available()

    def sync_state(self, state: dict) -> None:
        """Make the host arrays in `state` the current copy of the model's state.

        A backend whose steps keep the state elsewhere between steps (a GPU's memory, shared
        by every step that runs on the same `state` dict) copies it back here, and its next
        step re-reads the host arrays (which the caller may have changed meanwhile). The
        driver calls this before it reads or writes state arrays outside a step: checkpoints,
        restoring weights, `Model.state` and `Model.params`, a step of another backend on
        the same state. Backends that run on the host arrays in place need nothing here."""


def layout_slots(program) -> list:
    """[name, kind, dtype, shape] of every input and state buffer, inputs first."""
    return [[b.name, b.kind, b.dtype.value, list(b.shape)]
            for b in list(program.inputs.values()) + list(program.state.values())]


def layout_collectives(program) -> dict:
    """bucket (as a string: JSON keys) -> [sources, targets], each a list of [arena offset or
    the input/state buffer, dtype, shape]: what a Collective part's host call exchanges."""
    from dlc.core.kernel import collectives_of

    def spec(b):
        return [b.offset if b.kind == "arena" else b.name, b.dtype.value, list(b.shape)]
    return {str(bucket): [[spec(b) for b in parts[0].sources], [spec(b) for b in parts[0].targets]]
            for bucket, parts in collectives_of(program).items()}


def layout_outputs(program) -> dict:
    """result name -> [arena offset, or the input/state buffer holding it, dtype, shape]."""
    return {name: [b.offset if b.kind == "arena" else b.name, b.dtype.value, list(b.shape)]
            for name, b in program.outputs.items()}



def host_memory_available() -> int | None:
    """Bytes that can still be allocated without swapping: the kernel's MemAvailable, or
    what is left under this process's cgroup limit if that is less; None when unknown."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    try:  # a container's limit (cgroup v2)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = left if free is None else min(free, left)
    except (OSError, ValueError):
        pass
    return free


def one_unit(compiled: dict, timings: dict) -> Compiled:
    """Compiled programs ({entry: Compiled}) as one unit: their blobs in entry order, each
    entry's layout recording its own in `meta["blobs"]` ([first, end))."""
    blobs, layouts, notes = [], {}, []
    for name, c in compiled.items():
        c.layout.meta = dict(c.layout.meta, blobs=[len(blobs), len(blobs) + len(c.blobs)])
        blobs += c.blobs
        layouts[name] = c.layout
        notes += [f"{name}: {note}" for note in c.notes]
    return Compiled(blobs, Entries(layouts), timings, notes)


def made_programs(programs: dict, make: Callable[[], dict] | None) -> dict:
    """`programs` with the entries given as None made by make(), in their places."""
    if make is None:
        return programs
    made = make()
    return {entry: made[entry] if program is None else program for entry, program in programs.items()}
