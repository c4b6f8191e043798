"""dce: dead-code elimination. Nodes that no output or update depends on are removed
(inputs stay: they are the program's interface). In loops: bodies are cleaned the same
way, and a scan's unread results and unused operands go (passes/scans.py, prune_scans)."""
from __future__ import annotations

from dlc.core.graph import Graph
from dlc.passes.scans import map_bodies, prune_scans


def dce(graph: Graph, ctx=None) -> Graph:
    g = graph.copy()
    g.remove_unused()
    map_bodies(g, dce)
    prune_scans(g)
    return g
