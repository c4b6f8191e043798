"""mask_batch: make a step exact on a padded batch, so one compiled batch size serves all.

A data set rarely divides into whole batches. Instead of compiling the step again for
the last, smaller batch, the driver pads it to the full size (repeating real rows) and
feeds `valid_rows`, the number of real rows. This pass rewrites the step so that the
first `valid_rows` rows give exactly the results the unpadded batch would:

  * a sum over the batch axis adds only the valid rows (the others are selected to 0),
    a max or argmax over it sees only them (the others to -inf);
  * `size` over the batch axis (the divisor of every mean, batchnorm's n) counts only
    them;
  * a matmul contracting over the batch axis masks both operands.

Everything else a model does is row by row (elementwise ops, convolutions, pooling,
reshapes that keep the batch rows -- also one that folds later axes into the batch axis,
as an RNN's [B, T, F] -> [B*T, F], where row r owns entries [c*r, c*r + c) -- and
gathers), so a valid row never sees a padded one.
Losses and metrics are then averaged over the valid rows, batchnorm's statistics come
from the valid rows only, and autodiff (which runs after this pass) differentiates
through the selects: padded rows get zero gradients, so parameter updates are those of
the unpadded batch. Random numbers are keyed by element index, which for a leading batch
axis is the same in both batches: dropout drops the same elements of the valid rows.

The pass runs before autodiff on the symbolic graph, where the batch is the symbol of the
data input's first dimension. It proves its case first: a value whose shape holds the
batch in any other form (in two axes, behind another axis after a reshape, a concat
along it, a parameter shaped by it) leaves the graph unchanged, without `valid_rows`;
the driver then compiles the last batch at its own size, as before.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from dlc.core import ops
from dlc.core.builder import GraphBuilder
from dlc.core.graph import Graph
from dlc.core.types import DType, Sym, TensorType, dim_mul

VALID = "valid_rows"  # the i32 input: how many leading rows of the batch are real


class Unsupported(Exception):
    """A value the pass cannot prove row-aligned: the graph is left as it was."""


def batch_symbol(g: Graph) -> Sym | None:
    """The symbol of the data input's first dimension, or None for a fixed batch."""
    data = g.inputs("data")
    if not data:
        return None
    shape = g.node(data[0]).attrs["type"].shape
    d = shape[0] if shape else None
    return d if isinstance(d, Sym) and d.coeff == 1 and len(d.names) == 1 else None


def mask_batch(graph: Graph, ctx=None) -> Graph:
    bsym = batch_symbol(graph)
    if bsym is None or VALID in {graph.node(i).attrs["name"] for i in graph.inputs()}:
        return graph
    try:
        axis = _batch_axes(graph, bsym)
    except Unsupported as e:
        g = graph.copy()
        g.meta = dict(g.meta, mask_batch=f"not masked: {e}")
        return g
    return _rewrite(graph, bsym, axis)


# --- which axis of every value holds the batch rows ---------------------------------------

def _axis_of(t: TensorType, bsym: Sym, what: str):
    """The axis whose dimension is the batch (None when no dimension involves it)."""
    name = bsym.names[0]
    found = [i for i, d in enumerate(t.shape) if isinstance(d, Sym) and name in d.names]
    if not found:
        return None
    if len(found) > 1 or t.shape[found[0]].names != bsym.names:
        raise Unsupported(f"{what} has shape {t.shape}: the batch is not in one axis")
    return found[0]


def _batch_axes(g: Graph, bsym: Sym) -> dict[int, int | None]:
    """nid -> the axis of its value that holds batch row r at index r (None: the value
    does not involve the batch). Unsupported when some value mixes rows otherwise."""
    axis: dict[int, int | None] = {}
    for nid in g.toposort():
        n = g.node(nid)
        what = f"`{n.op.name}` (%{nid})"
        out = _axis_of(n.type, bsym, what)
        ins = [axis[o] for o in n.operands]
        got = _rule(g, n, ins, out, bsym, what)
        if got != out:
            raise Unsupported(f"{what} moves the batch rows (axis {got} becomes {out})")
        axis[nid] = out
    return axis


def _rule(g: Graph, n, ins: list, out, bsym: Sym, what: str):
    """The batch axis of n's result implied by its operands' (before any rewriting)."""
    op, a = n.op, n.attrs
    if op is ops.INPUT:
        if out is not None and (a["role"] not in ("data", "label") or out != 0):
            raise Unsupported(f"input `{a['name']}` has the batch as axis {out}")
        return out
    if op in (ops.CONST, ops.IOTA, ops.SIZE):
        return out  # constants, and positions (the same for a valid row in either batch)
    if op is ops.RANDOM:
        if out not in (None, 0):  # numbers are keyed by flat index: only a leading batch keeps them
            raise Unsupported(f"{what} draws random numbers with the batch as axis {out}")
        return out
    if op.kind is ops.Kind.ELEMENTWISE:
        if any(i is not None and i != out for i in ins):
            raise Unsupported(f"{what} combines values batched along different axes")
        return out
    if op is ops.BROADCAST:
        return None if ins[0] is None and out is None else (a["axes"][ins[0]] if ins[0] is not None else out)
    if op is ops.PERMUTE:
        return None if ins[0] is None else list(a["perm"]).index(ins[0])
    if op in (ops.SLICE, ops.PAD):  # a symbolic dimension is only ever taken whole, never padded
        return ins[0]
    if op is ops.CONCAT:
        if any(i != out for i in ins) or out == a["axis"]:
            raise Unsupported(f"{what} joins along the batch axis")
        return out
    if op is ops.RESHAPE:
        x = g.node(n.operands[0]).type.shape
        if ins[0] is None or out is None:
            return out if ins[0] is None else None
        before = _prod(x[:ins[0]])
        if before != _prod(n.type.shape[:out]):
            raise Unsupported(f"{what} reshapes across the batch rows")
        return out
    if op in (ops.REDUCE_SUM, ops.REDUCE_MAX):
        k = ins[0]
        if k is None or k in a["axes"]:
            return None if k is None or out is None else out
        return k - sum(1 for ax in a["axes"] if ax < k)
    if op is ops.ARGMAX:
        k = ins[0]
        if k is None or k == a["axis"]:
            return out if k is None else None
        return k - (1 if a["axis"] < k else 0)
    if op is ops.MATMUL:
        ia, ib = ins
        m_axis = 1 if a["ta"] else 0   # a's rows
        n_axis = 0 if a["tb"] else 1   # b's columns
        res = None
        if ia is not None and ia == m_axis:
            res = 0
        if ib is not None and ib == n_axis:
            res = 1 if res is None else "both"
        if res == "both":
            raise Unsupported(f"{what} multiplies batch by batch")
        return res  # a batch in the contraction is masked (res None)
    if op in (ops.CONV2D, ops.POOL2D, ops.CONV2D_BWD_DATA, ops.POOL2D_BWD):
        if any(i not in (None, 0) for i in ins) or (ins[0] != 0 and out is not None):
            raise Unsupported(f"{what} has the batch off axis 0")
        return out
    if op is ops.TAKE:
        if ins[0] is not None:
            raise Unsupported(f"{what} gathers rows of a batched table")
        return out
    if all(i is None for i in ins) and out is None:
        return None  # an op that never sees the batch
    raise Unsupported(f"{what} is not known to keep batch rows apart")


def _prod(dims):
    p = 1
    for d in dims:
        p = dim_mul(p, d)
    return p


# --- the rewrite ----------------------------------------------------------------------------

def _rewrite(graph: Graph, bsym: Sym, axis: dict) -> Graph:
    g = graph.copy()
    b = GraphBuilder(g)
    valid = b.input(VALID, TensorType(DType.i32, ()), "hyper")
    valid_f = b.cast(valid, DType.f32)
    masks: dict = {}
    changed = False

    def mask(x: int, k: int, fill) -> int:
        """x with the elements of padded rows replaced by fill. The batch axis k has c*B
        entries, row r's at [c*r, c*r + c) (a reshape may fold later axes into it)."""
        t = g.node(x).type
        key = (t.shape, k)
        if key not in masks:
            dim = t.shape[k]
            rows = b.lt(b.iota((dim,), 0), valid * dim.coeff if dim.coeff != 1 else valid)
            masks[key] = b.broadcast(rows, t.shape, (k,))
        return b.where(masks[key], b.value(x), b.lift(fill, t.dtype)).id

    def lowest(dtype: DType):
        return -np.inf if dtype.is_float else float(np.iinfo(np.int32).min)

    for nid in [i for i in graph.toposort()]:
        n = g.node(nid)
        ins = [axis.get(o) for o in n.operands]
        with b.at(n.span):
            if n.op in (ops.REDUCE_SUM, ops.REDUCE_MAX) and ins[0] is not None and ins[0] in n.attrs["axes"]:
                x = n.operands[0]
                fill = 0 if n.op is ops.REDUCE_SUM else lowest(g.node(x).type.dtype)
                g.set_node(nid, replace(n, operands=(mask(x, ins[0], fill),)))
            elif n.op is ops.ARGMAX and ins[0] is not None and ins[0] == n.attrs["axis"]:
                x = n.operands[0]
                g.set_node(nid, replace(n, operands=(mask(x, ins[0], lowest(g.node(x).type.dtype)),)))
            elif n.op is ops.MATMUL and axis.get(nid) is None and any(i is not None for i in ins):
                g.set_node(nid, replace(n, operands=tuple(mask(o, i, 0) if i is not None else o
                                                          for o, i in zip(n.operands, ins))))
            elif n.op is ops.SIZE and ins[0] is not None and ins[0] in n.attrs["axes"]:
                rest = tuple(ax for ax in n.attrs["axes"] if ax != ins[0])
                c = g.node(n.operands[0]).type.shape[ins[0]].coeff
                count = valid_f * float(c) if c != 1 else valid_f
                count = count * b.size(b.value(n.operands[0]), rest) if rest else count
                g.replace_all_uses(nid, count.id)
            else:
                continue
        changed = True
    if not changed:  # nothing reduces over the batch (an output-only graph): no input needed
        g = graph.copy()
        g.meta = dict(g.meta, mask_batch="nothing to mask")
        return g
    g.remove_unused()
    g.meta = dict(g.meta, mask_batch=VALID)
    return g
