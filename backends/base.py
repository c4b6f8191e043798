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
  load(blobs, layout, target) -> Step: `run(state, feeds)` and `profile_rows()`
  compile_entries(programs, target, profile) -> Compiled: several programs (a training and
                      an evaluation step) as one unit, with an `Entries` layout; the default
                      compiles each alone, a backend may share code between them
  load_entries(blobs, entries, target) -> {entry: Step}
  dump(program, stage, target) -> text of one of its stages
  check_target(saved, target)   None, or why code built for `saved` (a target's JSON)
                                cannot run on `target`

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

import json
from dataclasses import asdict, dataclass, field
from typing import Protocol


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
        return StepLayout(**json.loads(text))


@dataclass
class Entries:
    """The layout of several programs compiled as one unit: a StepLayout per entry point."""

    entries: dict            # entry -> StepLayout

    def to_json(self) -> str:
        return json.dumps({"entries": {k: asdict(v) for k, v in self.entries.items()}}, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "Entries":
        return Entries({k: StepLayout(**v) for k, v in json.loads(text)["entries"].items()})


def layout_from_json(text: str):
    """A StepLayout, or the Entries of a unit of several programs."""
    return Entries.from_json(text) if '"entries"' in text[:16] else StepLayout.from_json(text)


@dataclass
class Compiled:
    blobs: list[bytes]
    layout: StepLayout
    timings: dict = field(default_factory=dict)   # phase -> seconds, for --verbose
    stats: dict = field(default_factory=dict)     # counts worth a --verbose line (parts, shared, ...)


class Step(Protocol):
    layout: StepLayout
    calls: int

    def run(self, state: dict, feeds: dict) -> dict:
        """One step: reads parameters and state from `state` and updates them in place;
        returns copies of the results."""

    def profile_rows(self) -> list[tuple[str, tuple, float]]:
        """(kernel, .dln lines, seconds) over the calls so far (empty when not profiled)."""


class Backend:
    name: str = ""
    doc: str = ""
    stages: dict[str, str] = {}
    templates: frozenset = frozenset()
    lowers: bool = True
    object_cache = None  # the driver's compile cache, for code that belongs to no program

    def unavailable(self) -> str | None:
        return None

    def coverage(self) -> dict[str, set]:
        raise NotImplementedError

    def target(self, options: dict):
        raise NotImplementedError

    def compile(self, program, target, profile: bool = False) -> Compiled:
        raise NotImplementedError

    def load(self, blobs: list[bytes], layout: StepLayout, target) -> Step:
        raise NotImplementedError

    def compile_entries(self, programs: dict, target, profile: bool = False) -> Compiled:
        """Several programs as one unit. This default compiles each on its own; each
        entry's layout records its blobs in `meta["blobs"]` ([first, end))."""
        blobs, layouts, timings = [], {}, {}
        for name, program in programs.items():
            c = self.compile(program, target, profile)
            c.layout.meta = dict(c.layout.meta, blobs=[len(blobs), len(blobs) + len(c.blobs)])
            blobs += c.blobs
            layouts[name] = c.layout
            for k, v in c.timings.items():
                timings[k] = timings.get(k, 0.0) + v
        return Compiled(blobs, Entries(layouts), timings)

    def load_entries(self, blobs: list[bytes], entries: Entries, target) -> dict:
        return {name: self.load(blobs[slice(*layout.meta["blobs"])], layout, target)
                for name, layout in entries.entries.items()}

    def dump(self, program, stage: str, target) -> str:
        raise NotImplementedError(f"{self.name} has no stage {stage}")

    def check_target(self, saved: dict, target) -> str | None:
        return None if saved == target.to_json() else f"it was compiled for another {self.name} target"


def layout_slots(program) -> list:
    """[name, kind, dtype, shape] of every input and state buffer, inputs first."""
    return [[b.name, b.kind, b.dtype.value, list(b.shape)]
            for b in list(program.inputs.values()) + list(program.state.values())]


def layout_outputs(program) -> dict:
    """result name -> [arena offset, or the input/state buffer holding it, dtype, shape]."""
    return {name: [b.offset if b.kind == "arena" else b.name, b.dtype.value, list(b.shape)]
            for name, b in program.outputs.items()}

