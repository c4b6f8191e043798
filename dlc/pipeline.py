"""The compiler driver: the one route from a built graph to the kernel IR, with
instruments that verify, time and dump the graph after each pass.

  step_graph       GRAPH_PASSES on the symbolic graph (the batch is still `B`), once per
                   model and mode: autodiff and the optimizer make the training step
                   (with `world` > 1 ranks, shard and allreduce make it data-parallel);
  lower            per batch size: LOWER_PASSES (bind B, fold, prepare loops, fuse, plan
                   memory);
  kernel_program   `schedule` to the kernel IR, then the template kinds the chosen backend
                   does not render expanded to plain loop nests.
Backends start from the KernelProgram; passes are plain functions `(Graph, PassContext)
-> Graph` listed once, in order. The driver never lets a pass print or time itself.
"""
from __future__ import annotations

import functools
import hashlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dlc.core.diagnostics import DlcError, UsageError
from dlc.core.graph import Graph
from dlc.core.kernel import KernelProgram, check_program, expand_templates
from dlc.language.recipe import TrainConfig


@dataclass(frozen=True)
class PassContext:
    """Options every pass may read (TVM's PassContext): explicit, never global."""

    config: TrainConfig | None = None
    batch: int | None = None
    disabled: frozenset[str] = frozenset()
    world: int = 1                   # ranks of a data-parallel job (passes/data_parallel.py)
    bucket_bytes: int | None = None  # gradient bytes per exchange (None: the default)
    overlap: bool = False            # exchanges overlap the rest of the backward pass (fuse)


@dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable[[Graph, PassContext], Graph]
    doc: str
    train_only: bool = False
    required: bool = False  # cannot be disabled: later stages depend on its result
    parallel_only: bool = False  # runs only for a job of several ranks


def _shard(g, ctx):
    from dlc.passes.data_parallel import shard
    return shard(g, ctx)


def _allreduce(g, ctx):
    from dlc.passes.data_parallel import allreduce
    return allreduce(g, ctx)


def _mask_batch(g, ctx):
    from dlc.passes.mask_batch import mask_batch
    return mask_batch(g)


def _autodiff(g, ctx):
    from dlc.passes.autodiff import autodiff
    if ctx.config.optimizer.name == "perceptron":  # the rule follows the output's error, not the loss
        from dlc.passes.optimizer import perceptron_error
        g = autodiff(perceptron_error(g, ctx.config.span("optimizer")), "perceptron_error")
        del g.outputs["perceptron_error"]  # only its gradients are used
        g.remove_unused()
        return g
    return autodiff(g)


def _optimizer(g, ctx):
    from dlc.passes.optimizer import optimizer
    c = ctx.config
    return optimizer(g, c.optimizer, c.clip, c.span("optimizer"), check_gradients=c.check_numerics)


def _simplify(g, ctx):
    from dlc.passes.simplify import simplify
    return simplify(g)


def _fold(g, ctx):
    from dlc.passes.fold_constants import fold_constants
    return fold_constants(g)


def _cse(g, ctx):
    from dlc.passes.cse import cse
    return cse(g)


def _dce(g, ctx):
    from dlc.passes.dce import dce
    return dce(g)


def _specialize(g, ctx):
    from dlc.passes.specialize import specialize
    return specialize(g, {"B": ctx.batch})


def _loops(g, ctx):
    from dlc.passes.loops import prepare_loops
    return prepare_loops(g)


def _fuse(g, ctx):
    from dlc.passes.fuse import fuse
    return fuse(g, overlap=ctx.overlap)


def _memory(g, ctx):
    from dlc.passes.memory import plan_memory
    return plan_memory(g)


GRAPH_PASSES: tuple[Pass, ...] = (
    Pass("mask_batch", _mask_batch, "reductions over the batch count only its first `valid_rows` rows "
         "(a padded last batch gives the unpadded results: one compiled batch size)"),
    Pass("shard", _shard, "data-parallel ranks: each differentiates its share of the loss; random "
         "streams follow global samples", True, True, True),
    Pass("autodiff", _autodiff, "reverse-mode gradients of the loss for every parameter", True, True),
    Pass("allreduce", _allreduce, "data-parallel ranks: gradients, loss and metrics summed over ranks, "
         "in buckets", True, True, True),
    Pass("optimizer", _optimizer, "parameter and optimizer-state updates: one training step", True, True),
    Pass("simplify", _simplify, "algebraic identities (x*1, neg(neg x), reshape of reshape, ...)"),
    Pass("fold_constants", _fold, "evaluate constant subgraphs"),
    Pass("cse", _cse, "common-subexpression elimination"),
    Pass("dce", _dce, "dead-code elimination"),
)
LOWER_PASSES: tuple[Pass, ...] = (
    Pass("specialize", _specialize, "bind the batch dimension B to the batch size", required=True),
    Pass("fold_constants", _fold, "fold what became constant (sizes, means over the batch)"),
    Pass("simplify", _simplify, "algebraic identities again, on static shapes"),
    Pass("dce", _dce, "dead-code elimination"),
    Pass("loops", _loops, "give each loop's carries storage of their own (scans run as loops)", required=True),
    Pass("fuse", _fuse, "group nodes into kernels", required=True),
    Pass("memory", _memory, "buffer lifetimes, in-place updates, arena offsets", required=True),
)

STAGES: dict[str, str] = {"ast": "the parsed program (frozen dataclasses with locations)",
                          "graph": "the model and loss as a typed graph of primitives"}
for _p in GRAPH_PASSES + LOWER_PASSES:
    STAGES.setdefault(_p.name, _p.doc)
STAGES["kernel"] = "loop nests over buffers: the kernel IR every backend renders"
PASS_NAMES = tuple(dict.fromkeys(p.name for p in GRAPH_PASSES + LOWER_PASSES))


def stages_for(backend) -> dict[str, str]:
    """The driver's stages and then the backend's own (`--dump-ir`, `--list-stages`)."""
    return {**STAGES, **backend.stages}


@dataclass
class Record:
    """What one pass did: for --time-passes, --stats and --dump-ir."""

    name: str
    seconds: float
    nodes: int
    graph: Graph

    @property
    def kernels(self) -> int | None:
        plan = self.graph.meta.get("fusion")
        return len(plan.kernels) if plan else None

    @property
    def arena_bytes(self) -> int | None:
        mem = self.graph.meta.get("memory")
        return mem.arena_bytes if mem else None


@dataclass
class Compilation:
    records: list[Record] = field(default_factory=list)

    def last(self, name: str) -> Record | None:
        return next((r for r in reversed(self.records) if r.name == name), None)


def verifying() -> bool:
    """Whether the driver re-checks the graph after every pass: with DLC_VERIFY=1 (the test
    suite sets it), for `dlc compile`'s dumps, and never otherwise -- re-inferring every
    node's type after each of a dozen passes was a third of the passes' time."""
    return os.environ.get("DLC_VERIFY", "") not in ("", "0")


def run_passes(graph: Graph, passes, ctx: PassContext, log: Compilation | None = None,
               verify: bool = True) -> Graph:
    for p in passes:
        if (p.train_only and ctx.config is None) or (p.parallel_only and ctx.world <= 1):
            continue
        if p.name in ctx.disabled and not p.required:
            continue
        start = time.perf_counter()
        try:
            graph = p.fn(graph, ctx)
        except RecursionError:
            # a pass that recursed along a chain of dependent nodes deeper than Python's stack
            # (thousands of stacked layers; recurrent layers are loops, whatever their length)
            raise too_deep_to_compile(p.name, graph) from None
        elapsed = time.perf_counter() - start
        if verify:
            graph.verify()
        if log is not None:
            log.records.append(Record(p.name, elapsed, len(graph), graph))
    return graph


def step_graph(graph: Graph, config: TrainConfig | None, log: Compilation | None = None,
               disabled=(), world: int = 1, bucket_bytes: int | None = None,
               verify: bool | None = None) -> Graph:
    """The graph passes: with a recipe, the training step (autodiff, optimizer, cleanup;
    for `world` > 1 ranks, data-parallel); without one, the evaluation graph cleaned up.
    Shapes are still symbolic."""
    ctx = PassContext(config, disabled=frozenset(disabled), world=world, bucket_bytes=bucket_bytes)
    return run_passes(graph, GRAPH_PASSES, ctx, log, verifying() if verify is None else verify)


def lower(graph: Graph, batch: int, log: Compilation | None = None, disabled=(), verify: bool | None = None,
          overlap: bool = False) -> Graph:
    """The lowering passes for one batch size: fused and memory-planned (with `overlap`,
    data-parallel exchanges are scheduled to overlap the backward pass: fuse.py)."""
    ctx = PassContext(batch=batch, disabled=frozenset(disabled), overlap=overlap)
    return run_passes(graph, LOWER_PASSES, ctx, log, verifying() if verify is None else verify)


def check_collectives(program: KernelProgram, backend) -> None:
    """A program with Collective parts (data-parallel steps, batchnorm(sync=true)) needs a
    backend that runs them."""
    from dlc.core.kernel import collectives_of
    if collectives_of(program) and not backend.collectives:
        raise UsageError(f"target `{backend.name}` cannot run collective exchanges yet (a data-parallel "
                         "step, or batchnorm(sync=true))", hint="use --target cpu")


def kernel_program(lowered: Graph, templates=frozenset()) -> KernelProgram:
    """A lowered graph scheduled to the kernel IR (the last required stage), with the
    template kinds not in `templates` (the ones the backend renders) expanded to loop nests.
    A graph lowered with `overlap` gets exchanges that start early and are waited for late."""
    from dlc.passes.schedule import schedule
    program = expand_templates(schedule(lowered), frozenset(templates))
    if verifying():  # (the tests): the kernel IR's contract, checked like every pass's graph
        check_program(program)
    return program


@functools.lru_cache(maxsize=1)
def compiler_fingerprint() -> str:
    """A hash of every source file of the installed compiler (the language, the passes, the
    backends, the runtime): compiled code from any other version of the code is never
    reused, whatever file changed."""
    import importlib
    h = hashlib.sha256()
    for name in ("dlc", "dlc.passes", "dlc.backends", "dlc.grammar"):
        root = Path(importlib.import_module(name).__file__).parent  # (dlc.__path__ lists a checkout's root too)
        for f in sorted(root.rglob("*")):
            if f.suffix in (".py", ".lark") and "__pycache__" not in f.parts:
                h.update(str(f.relative_to(root)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:20]


def too_deep_to_compile(pass_name: str, graph: Graph) -> DlcError:
    """The error for a graph whose longest chain of dependent nodes is too deep for a pass,
    located at the line making up most of that chain, or else at its middle (one of many
    stacked layers)."""
    depth: dict[int, int] = {}
    longest_from: dict[int, int] = {}  # node -> the operand its longest chain comes through
    for nid in graph.toposort():  # iterative: this must not recurse itself
        best = max(graph.operands(nid), key=depth.__getitem__, default=None)
        depth[nid] = 1 + (depth[best] if best is not None else 0)
        if best is not None:
            longest_from[nid] = best
    chain, nid = [], max(depth, key=depth.__getitem__)
    while nid is not None:
        chain.append(graph.node(nid).span)
        nid = longest_from.get(nid)
    spans = [sp for sp in chain if sp is not None]
    where, count = Counter(spans).most_common(1)[0] if spans else (None, 0)
    if count * 3 < len(chain):
        where = spans[len(spans) // 2] if spans else None
    return DlcError(f"the graph has a chain of {len(chain):,} dependent operations, too deep for "
                    f"the `{pass_name}` pass; the longest chain runs through here", where,
                    hint="use fewer stacked layers")


def check_disabled(names) -> frozenset[str]:
    names = frozenset(names or ())
    required = {p.name for p in GRAPH_PASSES + LOWER_PASSES if p.required}
    for n in names:
        if n not in PASS_NAMES:
            raise UsageError(f"unknown pass `{n}`; passes: {', '.join(PASS_NAMES)}")
        if n in required:
            raise UsageError(f"pass `{n}` cannot be disabled: later stages need its result")
    return names


def select_stages(spec: str, available=None) -> list[str]:
    """`ast,graph` or `all` -> stage names in pipeline order."""
    stages = list(available or STAGES)
    if not spec:
        return []
    if spec == "all":
        return stages
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    for s in wanted:
        if s not in stages:
            raise UsageError(f"unknown IR stage `{s}`; stages: {', '.join(stages)}, all")
    return [s for s in stages if s in wanted]
