"""cse: common-subexpression elimination. Two nodes with the same op, operands and
attributes compute the same value; users of the later one read the earlier one."""
from __future__ import annotations

import numpy as np

from dlc.core import ops
from dlc.core.graph import Graph


def _key(value):
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _key(v)) for k, v in value.items()))
    return value


def cse(graph: Graph, ctx=None) -> Graph:
    g = graph.copy()
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
