"""dce: dead-code elimination. Nodes that no output or update depends on are removed
(inputs stay: they are the program's interface)."""
from __future__ import annotations

from dlc.core.graph import Graph


def dce(graph: Graph, ctx=None) -> Graph:
    g = graph.copy()
    g.remove_unused()
    return g
