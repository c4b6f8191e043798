"""The compiler driver: the ordered passes from a model to a training step, run with
instruments that verify, time and dump the graph after each.

Passes are plain functions `(Graph, PassContext) -> Graph` listed once, in order, in
TRAIN_PASSES / EVAL_PASSES. The driver never lets a pass print or time itself.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .diagnostics import UsageError
from .graph import Graph
from .recipe import TrainConfig


@dataclass(frozen=True)
class PassContext:
    """Options every pass may read (TVM's PassContext): explicit, never global."""

    config: TrainConfig | None = None
    disabled: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable[[Graph, PassContext], Graph]
    doc: str
    train_only: bool = False


def _autodiff(g: Graph, ctx: PassContext) -> Graph:
    from .passes.autodiff import autodiff
    return autodiff(g)


def _optimizer(g: Graph, ctx: PassContext) -> Graph:
    from .passes.optimizer import optimizer
    c = ctx.config
    return optimizer(g, c.optimizer, c.clip, c.span("optimizer"))


TRAIN_PASSES: tuple[Pass, ...] = (
    Pass("autodiff", _autodiff, "reverse-mode gradients of the loss for every parameter", True),
    Pass("optimizer", _optimizer, "parameter and optimizer-state updates: one training step", True),
)

STAGES = {
    "ast": "the parsed program (frozen dataclasses with locations)",
    "graph": "the model and loss as a typed graph of primitives, training mode",
    **{p.name: p.doc for p in TRAIN_PASSES},
}


@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes: int
    text: str | None = None


@dataclass
class Compilation:
    """The graph after every pass, with timings (what --dump-ir and --time-passes show)."""

    records: list[PassRecord] = field(default_factory=list)


def run_passes(graph: Graph, passes, ctx: PassContext, dump: set[str] = frozenset(),
               verify: bool = True, log: Compilation | None = None) -> Graph:
    from .printer import print_graph
    for p in passes:
        if p.name in ctx.disabled:
            continue
        start = time.perf_counter()
        graph = p.fn(graph, ctx)
        elapsed = time.perf_counter() - start
        if verify:
            graph.verify()
        if log is not None:
            log.records.append(PassRecord(p.name, elapsed, len(graph),
                                          print_graph(graph) if p.name in dump else None))
    return graph


def select_stages(spec: str) -> list[str]:
    """`ast,graph` or `all` -> stage names in pipeline order."""
    if not spec:
        return []
    if spec == "all":
        return list(STAGES)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    for s in wanted:
        if s not in STAGES:
            raise UsageError(f"unknown IR stage `{s}`; stages: {', '.join(STAGES)}, all")
    return [s for s in STAGES if s in wanted]
