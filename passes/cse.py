"""cse: common-subexpression elimination. Two nodes with the same op, operands and
attributes compute the same value; users of the later one read the earlier one. Loop
bodies are cleaned the same way first; two scans are the same when their bodies have the
same structure (and so are their scan_result projections)."""
from __future__ import annotations

import numpy as np

from dlc.core import ops
from dlc.core.graph import Graph
from dlc.passes.scans import map_bodies


def _key(value):
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _key(v)) for k, v in value.items()))
    if isinstance(value, Graph):
        return ("graph",) + _graph_key(value)
    return value


def _graph_key(g: Graph) -> tuple:
    """The structure of a graph (ops, attributes, types, wiring, result names), not its
    node ids or spans."""
    position: dict[int, int] = {}
    nodes = []
    for nid in g.toposort():
        n = g.node(nid)
        position[nid] = len(position)
        nodes.append((n.op.name, tuple(position[o] for o in n.operands), _key(n.attrs), n.type))
    results = tuple((k, position[v]) for k, v in g.outputs.items())
    return tuple(nodes), results

def cse(graph: Graph, ctx=None) -> Graph:
    g = graph.copy()
    map_bodies(g, cse)
    seen: dict[tuple, int] = {}
    for nid in g.toposort():
        n = g.node(nid)
        if n.op is ops.INPUT:
            continue
        key = (n.op.name, n.operands, _key(n.attrs), n.type)
        if key in seen:
            g.replace_all_uses(nid, seen[key])
        else:
            seen[key] = nid
    g.remove_unused()
    return g
