"""autodiff: reverse-mode differentiation as a graph transformation.

Adds `grad:<param>` results: the gradient of the scalar `loss` result with respect to
every parameter input, built from each op's vjp rule. Cotangents of values used
several times accumulate by addition. Only nodes on a path from a parameter to the
loss are differentiated; gradient nodes carry the span of the op they differentiate,
so costs and errors map back to the .dln line.
"""
from __future__ import annotations

from dlc import ops
from dlc.builder import GraphBuilder, Value
from dlc.diagnostics import DlcError
from dlc.graph import Graph, VerifyError


def _reachable(graph: Graph, starts, step) -> set[int]:
    seen, stack = set(), list(starts)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(step(n))
    return seen


def autodiff(graph: Graph, loss: str = "loss") -> Graph:
    if loss not in graph.outputs:
        raise VerifyError(f"autodiff: graph {graph.name} has no `{loss}` result")
    g = graph.copy()
    b = GraphBuilder(g)
    root = g.outputs[loss]
    params = g.inputs("param")
    # differentiate only what lies between a parameter and the loss
    needed = _reachable(g, params, g.users) & _reachable(g, [root], g.operands)

    ct: dict[int, Value] = {root: b.const(1.0, g.node(root).type.dtype)}
    for nid in reversed(g.toposort()):
        if nid not in needed or nid not in ct:
            continue
        node = g.node(nid)
        if node.op is ops.INPUT:
            continue
        if node.op.vjp is None:
            raise DlcError(f"cannot differentiate `{node.op.name}`", node.span)
        with b.at(node.span):
            try:
                cts = node.op.vjp(b, ct[nid], b.value(nid), *(b.value(o) for o in node.operands),
                                  **node.attrs)
            except NotImplementedError as e:
                raise DlcError(str(e), node.span) from None
        for operand, c in zip(node.operands, cts):
            if c is None or operand not in needed:
                continue
            want = g.node(operand).type
            if c.type != want:
                raise VerifyError(f"vjp of {node.op.name} gave {c.type} for an operand of type {want}")
            with b.at(node.span):
                ct[operand] = ct[operand] + c if operand in ct else c

    for p in params:
        node = g.node(p)
        grad = ct.get(p)
        if grad is None:  # the loss does not depend on it
            with b.at(node.span):
                grad = b.zeros_like(b.value(p))
        g.outputs[f"grad:{node.attrs['name']}"] = grad.id
    g.remove_unused()
    return g
