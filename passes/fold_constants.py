"""fold_constants: evaluate nodes whose operands are all constants, with the ops' numpy rules.

Broadcasts and iotas are not folded (they would turn a scalar into a full-size array
that every kernel then reads from memory), nor are results larger than FOLD_LIMIT
elements. `size` folds as soon as the axes it counts are static. Loop bodies are folded
the same way; scans themselves are not evaluated.
"""
from __future__ import annotations

import numpy as np

from dlc.core import ops
from dlc.core.builder import GraphBuilder
from dlc.core.graph import Graph
from dlc.core.types import is_static
from dlc.passes.scans import map_bodies

FOLD_LIMIT = 64
_KEEP = {ops.BROADCAST, ops.IOTA, ops.INPUT, ops.CONST, ops.RANDOM, ops.SCAN, ops.SCAN_RESULT,
         ops.ALLREDUCE}  # a sum over the processes of a job: not a compile-time value


def _foldable(g: Graph, nid: int) -> bool:
    n = g.node(nid)
    if n.op in _KEEP or not is_static(n.type.shape) or int(np.prod(n.type.shape)) > FOLD_LIMIT:
        return False
    if n.op is ops.SIZE:
        shape = g.node(n.operands[0]).type.shape
        return all(isinstance(shape[a], int) for a in n.attrs["axes"])
    return all(g.node(o).op is ops.CONST for o in n.operands)


def fold_constants(graph: Graph, ctx=None) -> Graph:
    g = graph.copy()
    map_bodies(g, fold_constants)
    b = GraphBuilder(g)
    for nid in g.toposort():
        if not _foldable(g, nid):
            continue
        n = g.node(nid)
        if n.op is ops.SIZE:
            shape = g.node(n.operands[0]).type.shape
            value = np.prod([shape[a] for a in n.attrs["axes"]])
        else:
            args = [g.node(o).attrs["value"] for o in n.operands]
            with np.errstate(all="ignore"):
                value = n.op.ref(*args, **n.attrs)
        with b.at(n.span):
            const = b.const(np.asarray(value, dtype=n.type.dtype.np), n.type.dtype)
        g.replace_all_uses(nid, const.id)
    g.remove_unused()
    return g
