"""specialize: bind the symbolic dimensions (the batch `B`, ...) to numbers everywhere.

Backends compile for concrete shapes; the reference interpreter specializes per batch
size. `bind_symbols` reads the bindings off the shapes of the actual inputs.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from dlc.core.graph import Graph
from dlc.core.ops import INPUT
from dlc.core.types import Sym, TensorType, TupleType, substitute, type_dims, unify


def bind_symbols(graph: Graph, shapes: Mapping[str, tuple]) -> dict[str, int]:
    """Symbol values implied by the shapes of the given inputs (name -> shape)."""
    bindings: dict = {}
    for nid in graph.inputs():
        a = graph.node(nid).attrs
        if a["name"] in shapes:
            err = unify(a["type"].shape, tuple(shapes[a["name"]]), bindings)
            if err:
                raise ValueError(f"input {a['name']}: {err}")
    return {k: v for k, v in bindings.items() if isinstance(v, int)}


def _subst(v, bindings):
    if isinstance(v, Sym):
        return substitute(v, bindings)
    if isinstance(v, (TensorType, TupleType)):
        return v.specialize(bindings)
    if isinstance(v, Graph):  # a loop body
        return specialize(v, bindings)
    if isinstance(v, tuple):
        return tuple(_subst(x, bindings) for x in v)
    return v


def specialize(graph: Graph, bindings: Mapping[str, int]) -> Graph:
    """A copy of the graph with every symbol in types and attributes replaced (loop bodies
    included)."""
    g = graph.copy()
    for nid in g.ids():
        n = g.node(nid)
        attrs = {k: _subst(v, bindings) for k, v in n.attrs.items()}
        g.set_node(nid, replace(n, attrs=attrs, type=n.type.specialize(bindings)))
    g.meta = dict(g.meta, bindings=dict(bindings))
    return g


def is_symbolic(graph: Graph) -> bool:
    for nid in graph.ids():
        n = graph.node(nid)
        if any(not isinstance(d, int) for d in type_dims(n.type)):
            return True
        if n.op is INPUT and any(not isinstance(d, int) for d in n.attrs["type"].shape):
            return True
        if any(isinstance(v, Sym) or (isinstance(v, Graph) and is_symbolic(v)) for v in n.attrs.values()):
            return True
    return False

