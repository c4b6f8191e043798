"""simplify: algebraic identities, as a table of local rewrite rules applied to a fixed point.

Each rule looks at one node and returns a replacement value (or None). Rules never
change what a graph computes, only how: x*1 -> x, neg(neg x) -> x, reshape of reshape,
permute of permute, broadcast of broadcast, elementwise ops on broadcast scalar
constants -> one broadcast constant, a transposed matmul operand (or stack of matrices)
-> a matmul flag, ...
Loop bodies are simplified the same way, a body's transposed reads of a loop invariant
read a transpose made once before the loop instead (hoist_transposed_invariants), and
scans lose what they no longer need (passes/scans.py, prune_scans).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from dlc.core import ops
from dlc.core.builder import GraphBuilder, Value
from dlc.core.graph import Graph
from dlc.passes.scans import hoist_transposed_invariants, map_bodies, prune_scans


def scalar_of(g: Graph, nid: int):
    """The value of a scalar constant, or of a broadcast of one; else None."""
    n = g.node(nid)
    if n.op is ops.BROADCAST:
        n = g.node(n.operands[0])
    if n.op is ops.CONST and n.type.rank == 0:
        return n.attrs["value"].item()
    return None


def _is(g: Graph, nid: int, value) -> bool:
    v = scalar_of(g, nid)
    return v is not None and v == value


Rule = Callable[[GraphBuilder, int], "Value | int | None"]
RULES: dict[ops.OpDef, list[Rule]] = {}


def rule(*op_defs: ops.OpDef):
    def register(fn: Rule) -> Rule:
        for op in op_defs:
            RULES.setdefault(op, []).append(fn)
        return fn
    return register


# --- identities ------------------------------------------------------------------------------

@rule(ops.ADD)
def add_zero(b, nid):
    x, y = b.graph.operands(nid)
    return x if _is(b.graph, y, 0) else y if _is(b.graph, x, 0) else None


@rule(ops.SUB)
def sub_zero(b, nid):
    x, y = b.graph.operands(nid)
    if _is(b.graph, y, 0):
        return x
    return b.emit(ops.NEG, (b.value(y),)) if _is(b.graph, x, 0) else None


@rule(ops.MUL)
def mul_one(b, nid):
    x, y = b.graph.operands(nid)
    return x if _is(b.graph, y, 1) else y if _is(b.graph, x, 1) else None


@rule(ops.DIV)
def div_one(b, nid):
    x, y = b.graph.operands(nid)
    return x if _is(b.graph, y, 1) else None


@rule(ops.NEG)
def neg_neg(b, nid):
    (x,) = b.graph.operands(nid)
    inner = b.graph.node(x)
    return inner.operands[0] if inner.op is ops.NEG else None


@rule(ops.POW)
def pow_small(b, nid):
    x, y = b.graph.operands(nid)
    e = scalar_of(b.graph, y)
    if e == 1:
        return x
    if e == 2:
        return b.emit(ops.MUL, (b.value(x), b.value(x)))
    if e == 0.5:
        return b.emit(ops.SQRT, (b.value(x),))
    return None


@rule(ops.STOP_GRADIENT)
def drop_stop_gradient(b, nid):
    # runs after autodiff, which is the only pass that reads it
    return b.graph.operands(nid)[0]


@rule(ops.CAST)
def cast_same(b, nid):
    (x,) = b.graph.operands(nid)
    return x if b.graph.node(x).type == b.graph.node(nid).type else None


@rule(ops.WHERE)
def where_same(b, nid):
    c, x, y = b.graph.operands(nid)
    if x == y:
        return x
    cv = scalar_of(b.graph, c)
    return None if cv is None else (x if cv else y)


# --- movement ----------------------------------------------------------------------------------

@rule(ops.RESHAPE)
def reshape_reshape(b, nid):
    g = b.graph
    (x,) = g.operands(nid)
    n, inner = g.node(nid), g.node(x)
    if inner.type.shape == n.type.shape:
        return x
    if inner.op is ops.RESHAPE:
        return b.reshape(b.value(inner.operands[0]), n.type.shape)
    return None


@rule(ops.PERMUTE)
def permute_permute(b, nid):
    g = b.graph
    (x,) = g.operands(nid)
    perm, inner = g.node(nid).attrs["perm"], g.node(x)
    if inner.op is ops.PERMUTE:
        composed = tuple(inner.attrs["perm"][p] for p in perm)
        return b.permute(b.value(inner.operands[0]), composed)
    return None


@rule(ops.BROADCAST)
def broadcast_broadcast(b, nid):
    g = b.graph
    (x,) = g.operands(nid)
    n, inner = g.node(nid), g.node(x)
    if inner.type.shape == n.type.shape and n.attrs["axes"] == tuple(range(inner.type.rank)):
        return x
    if inner.op is ops.BROADCAST:
        axes = tuple(n.attrs["axes"][a] for a in inner.attrs["axes"])
        return b.broadcast(b.value(inner.operands[0]), n.type.shape, axes)
    return None


@rule(ops.SLICE)
def slice_whole(b, nid):
    g = b.graph
    (x,) = g.operands(nid)
    return x if g.node(x).type == g.node(nid).type and set(g.node(nid).attrs["steps"]) <= {1} else None


@rule(ops.MATMUL)
def matmul_transposed(b, nid):
    """matmul(permute(a), b) -> matmul(a, b, ta=not ta): a kernel reads either layout."""
    g = b.graph
    n = g.node(nid)
    a, c = n.operands
    for i, flag in ((0, "ta"), (1, "tb")):
        operand = g.node(n.operands[i])
        if operand.op is ops.PERMUTE and operand.attrs["perm"] == (1, 0):
            args = [b.value(a), b.value(c)]
            args[i] = b.value(operand.operands[0])
            attrs = dict(n.attrs)
            attrs[flag] = not attrs.get(flag, False)
            return b.emit(ops.MATMUL, tuple(args), **attrs)
    return None


@rule(ops.BATCH_MATMUL)
def batch_matmul_transposed(b, nid):
    """batch_matmul(permute(a, (0, 2, 1)), b) -> batch_matmul(a, b, ta=not ta), and so for a
    stack flattened after swapping its last two axes ([B, H, T, d] -> [B, H, d, T] ->
    [B*H, d, T], attention's keys): the flattening then reads the unswapped stack."""
    g = b.graph
    n = g.node(nid)
    for i, flag in ((0, "ta"), (1, "tb")):
        unswapped = _unswapped_stack(b, n.operands[i])
        if unswapped is not None:
            args = [b.value(o) for o in n.operands]
            args[i] = unswapped
            attrs = dict(n.attrs)
            attrs[flag] = not attrs.get(flag, False)
            return b.emit(ops.BATCH_MATMUL, tuple(args), **attrs)
    return None


def _unswapped_stack(b, nid):
    """x[G, r, c] when nid is x's stack of matrices transposed ([G, c, r]), else None."""
    g = b.graph
    n = g.node(nid)
    if n.op is ops.RESHAPE:  # a flattening of leading axes of a swap: reshape first, then swap
        src = g.node(n.operands[0])
        rank = src.type.rank
        if src.op is not ops.PERMUTE or rank < 3 or tuple(src.type.shape[-2:]) != tuple(n.type.shape[1:]) \
                or src.attrs["perm"] != tuple(range(rank - 2)) + (rank - 1, rank - 2):
            return None
        x = b.value(src.operands[0])
        return b.reshape(x, (n.type.shape[0],) + tuple(x.shape[-2:]))
    if n.op is ops.PERMUTE and n.attrs["perm"] == (0, 2, 1):
        return b.value(n.operands[0])
    return None


# --- constants through broadcasts ---------------------------------------------------------------

def _elementwise_on_scalars(b, nid):
    """f(broadcast(c1), broadcast(c2)) -> broadcast(f(c1, c2)): folds scalar math without
    materializing full-size constant arrays."""
    g = b.graph
    n = g.node(nid)
    if not n.operands or n.op is ops.STOP_GRADIENT:
        return None
    scalars = [scalar_of(g, o) for o in n.operands]
    if any(s is None for s in scalars) or all(g.node(o).type.rank == 0 for o in n.operands):
        return None
    args = [np.asarray(s, dtype=g.node(o).type.dtype.np) for s, o in zip(scalars, n.operands)]
    with np.errstate(all="ignore"):
        value = np.asarray(n.op.ref(*args, **n.attrs), dtype=n.type.dtype.np)
    return b.full(value, n.type.shape, n.type.dtype)


for _op in ops.OPS.values():
    if _op.kind is ops.Kind.ELEMENTWISE:
        RULES.setdefault(_op, []).append(_elementwise_on_scalars)


def simplify(graph: Graph, ctx=None) -> Graph:
    g = graph.copy()
    map_bodies(g, simplify)
    hoist_transposed_invariants(g)
    b = GraphBuilder(g)
    changed = True
    while changed:
        changed = False
        for nid in g.toposort():
            if nid not in g:
                continue
            node = g.node(nid)
            for fn in RULES.get(node.op, ()):
                with b.at(node.span):
                    new = fn(b, nid)
                if new is None:
                    continue
                new_id = new.id if isinstance(new, Value) else new
                if new_id != nid:
                    g.replace_all_uses(nid, new_id)
                    changed = True
                    break
        g.remove_unused()
    prune_scans(g)
    return g
