"""Stable text form of a Graph. Names are given at print time, so dumps diff cleanly.

    graph mlp(%x: f32[B,64] data, %h.w: f32[64,128] param, ...) {
      %0 = matmul(%x, %h.w, ta=false, tb=false)   : f32[B,128]   # mlp.dln:3:14
      ...
      output = %9
      update %h.w = %14
    }
"""
from __future__ import annotations

import numpy as np

from dlc.core import ops
from dlc.core.graph import Graph, Node
from dlc.core.types import DType, TensorType


def format_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (DType, TensorType)):
        return str(v)
    if isinstance(v, tuple):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, np.ndarray):
        if v.ndim == 0:
            return format_scalar(v)
        if v.size <= 8:
            return "[" + ",".join(format_scalar(x) for x in v.reshape(-1)) + "]"
        return f"<{v.size} values, sum {float(np.sum(v, dtype=np.float64)):.6g}>"
    return str(v)


def format_scalar(x) -> str:
    x = np.asarray(x)
    if x.dtype == np.bool_:
        return "true" if x else "false"
    if x.dtype.kind in "iu":
        return str(int(x))
    text = str(x.astype(np.float32)) if x.dtype == np.float32 else repr(float(x))
    return text if any(c in text for c in ".ein") else text + ".0"


def _is_scalar_const(node: Node) -> bool:
    return node.op is ops.CONST and node.type.rank == 0


def node_names(graph: Graph) -> dict[int, str]:
    """Print-time names: `%name` for inputs, literals for scalar constants, `%0`, `%1`, ...
    for the rest in deterministic topological order."""
    names: dict[int, str] = {}
    counter = 0
    for nid in graph.toposort():
        n = graph.node(nid)
        if n.op is ops.INPUT:
            names[nid] = "%" + n.attrs["name"]
        elif _is_scalar_const(n):
            names[nid] = format_scalar(n.attrs["value"])
        else:
            names[nid] = f"%{counter}"
            counter += 1
    return names


def print_graph(graph: Graph) -> str:
    """The graph as text. A fusion plan in graph.meta annotates each node with its kernel
    (`k3`); plans in graph.meta that can describe themselves are appended."""
    plan = graph.meta.get("fusion")
    kernels = plan.group_of if plan is not None else None
    names = node_names(graph)
    body = []
    for nid in graph.toposort():
        n = graph.node(nid)
        if n.op is ops.INPUT or _is_scalar_const(n):
            continue
        args = [names[o] for o in n.operands]
        args += [f"{k}={format_value(n.attrs[k])}" for k in n.op.attrs
                 if n.attrs.get(k) is not None and n.attrs.get(k) is not False
                 and not isinstance(n.attrs[k], Graph)]
        text = f"{names[nid]} = {n.op.name}({', '.join(args)})"
        suffix = f": {n.type}"
        if kernels is not None and nid in kernels:
            suffix += f"  k{kernels[nid]}"
        loc = f"   # {n.span.short}" if n.span else ""
        body.append((text, suffix, loc))
        for k in n.op.attrs:  # loop bodies, nested below their node
            if isinstance(n.attrs.get(k), Graph):
                nested = print_graph(n.attrs[k]).rstrip("\n").split("\n")
                body.append(("\n".join("    " + line for line in nested), None, ""))
    rows = [r for r in body if r[1] is not None]
    width = min(max((len(t) for t, _, _ in rows), default=0), 72)
    width2 = min(max((len(s) for _, s, _ in rows), default=0), 48)  # a loop's long tuple type overflows
    lines = [f"  {t:<{width}}  {s:<{width2}}{loc}".rstrip() if s is not None else t for t, s, loc in body]

    params = []
    for nid in graph.inputs():
        a = graph.node(nid).attrs
        params.append(f"%{a['name']}: {a['type']} {a['role']}")
    head = f"graph {graph.name}(" + ", ".join(params) + ") {"
    tail = [f"  {k} = {names[v]}" for k, v in graph.outputs.items()]
    tail += [f"  update %{k} = {names[v]}" for k, v in graph.updates.items()]
    extra = [v.describe(graph) for v in graph.meta.values() if hasattr(v, "describe")]
    return "\n".join([head] + lines + tail + ["}"] + extra) + "\n"
