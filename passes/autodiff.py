"""autodiff: reverse-mode differentiation as a graph transformation.

Adds `grad:<param>` results: the gradient of the scalar `loss` result with respect to
every parameter input, built from each op's vjp rule. Cotangents of values used
several times accumulate by addition. Only nodes on a path from a parameter to the
loss are differentiated; gradient nodes carry the span of the op they differentiate,
so costs and errors map back to the .dln line.
"""
from __future__ import annotations

from dlc.core import ops
from dlc.core.builder import GraphBuilder, Value
from dlc.core.diagnostics import DlcError
from dlc.core.graph import Graph, VerifyError


def _reachable(graph: Graph, starts, step) -> set[int]:
    seen, stack = set(), list(starts)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(step(n))
    return seen


def _pad_region(v: Value):
    """(axis, start, stop) when v is zero padding of a block along one axis only."""
    n = v.node
    if n.op is not ops.PAD or n.attrs.get("value", 0.0) != 0.0 or any(n.attrs["interior"]):
        return None
    axes = [i for i, (lo, hi) in enumerate(zip(n.attrs["lo"], n.attrs["hi"])) if lo or hi]
    if len(axes) != 1:
        return None
    a = axes[0]
    lo = n.attrs["lo"][a]
    return a, lo, lo + v.b.graph.node(n.operands[0]).type.shape[a]


def _combine(b: GraphBuilder, contributions: list[Value]) -> Value:
    """The sum of a value's cotangent contributions. Gradients of disjoint slices along one
    axis (an RNN's time steps, an LSTM's gates) are zero-padded blocks: they are joined
    with one concat instead of adding full-size padded tensors together."""
    if len(contributions) == 1:
        return contributions[0]
    by_axis: dict[int, list] = {}
    rest = []
    for c in contributions:
        region = _pad_region(c)
        (by_axis.setdefault(region[0], []).append((region[1], region[2], c)) if region else rest.append(c))
    for axis, blocks in by_axis.items():
        blocks.sort(key=lambda r: r[0])
        if len(blocks) < 2 or any(blocks[i][1] > blocks[i + 1][0] for i in range(len(blocks) - 1)):
            rest.extend(c for _, _, c in blocks)
            continue
        full = blocks[0][2].shape
        pieces, at = [], 0
        for start, stop, c in blocks:
            if start > at:
                pieces.append(b.full(0.0, tuple(start - at if i == axis else d for i, d in enumerate(full)),
                                     c.dtype))
            pieces.append(b.value(c.node.operands[0]))
            at = stop
        if at < full[axis]:
            pieces.append(b.full(0.0, tuple(full[axis] - at if i == axis else d for i, d in enumerate(full)),
                                 blocks[0][2].dtype))
        rest.append(b.concat(pieces, axis))
    rest = _join_matmuls(b, rest)
    total = rest[0]
    for c in rest[1:]:
        total = total + c
    return total


def _join_matmuls(b: GraphBuilder, contributions: list[Value]) -> list[Value]:
    """sum_t A_t^T B_t = [A_1; ...; A_T]^T [B_1; ...; B_T]: a weight used at every time step
    gets its gradient from one large matmul instead of T small ones and T-1 additions."""
    joinable = [c for c in contributions if c.node.op is ops.MATMUL and c.node.attrs.get("ta")
                and not c.node.attrs.get("tb")]
    if len(joinable) < 2:
        return contributions
    a = b.concat([b.value(c.node.operands[0]) for c in joinable], axis=0)
    m = b.concat([b.value(c.node.operands[1]) for c in joinable], axis=0)
    joined = b.matmul(a, m, ta=True)
    return [c for c in contributions if c not in joinable] + [joined]


def autodiff(graph: Graph, loss: str = "loss") -> Graph:
    if loss not in graph.outputs:
        raise VerifyError(f"autodiff: graph {graph.name} has no `{loss}` result")
    g = graph.copy()
    b = GraphBuilder(g)
    root = g.outputs[loss]
    params = g.inputs("param")
    # differentiate only what lies between a parameter and the loss
    needed = _reachable(g, params, g.users) & _reachable(g, [root], g.operands)

    # the cotangent contributions of each value, combined when the value is reached
    parts: dict[int, list[Value]] = {root: [b.const(1.0, g.node(root).type.dtype)]}
    ct: dict[int, Value] = {}
    for nid in reversed(g.toposort()):
        if nid not in needed or nid not in parts:
            continue
        node = g.node(nid)
        with b.at(node.span):
            ct[nid] = _combine(b, parts.pop(nid))
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
            parts.setdefault(operand, []).append(c)

    for p in params:
        node = g.node(p)
        grad = ct.get(p) if p in ct else (_combine(b, parts.pop(p)) if p in parts else None)
        if grad is None:  # the loss does not depend on it
            with b.at(node.span):
                grad = b.zeros_like(b.value(p))
        g.outputs[f"grad:{node.attrs['name']}"] = grad.id
    g.remove_unused()
    return g
