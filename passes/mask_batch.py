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
stacks of matrix products along the batch axis, reshapes that keep the batch rows -- also
one that folds other axes into the batch axis, as [B, T, F] -> [B*T, F], where row r
owns entries [T*r, T*r + T), or a time-major [T, B, F] -> [T*B, F], where row r's
entries repeat every B (`Rows`) -- gathers, and
loops (scans) whose body keeps rows apart and reduces nothing over them: a recurrent
layer's step), so a valid row never sees a padded one.
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

from dataclasses import dataclass, replace

import numpy as np

from dlc.core import ops
from dlc.core.builder import GraphBuilder
from dlc.core.graph import Graph
from dlc.core.ops.scan import signature
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


# --- which axis of every value holds the batch rows, and how ----------------------------------

@dataclass(frozen=True)
class Rows:
    """Where a value keeps the batch rows: in `axis`, whose dimension is outer * B * inner
    with row r's entries at o*B*inner + r*inner + i (o < outer, i < inner). A [B, T, F]
    folded to [B*T, F] has inner T; a time-major [T, B, F] folded to [T*B, F] has outer T.
    outer None: every row holds the same values (a broadcast), any layout fits."""

    axis: int
    outer: int | None = 1
    inner: int | None = 1

    @property
    def uniform(self) -> bool:
        return self.outer is None

    def moved(self, axis: int) -> "Rows":
        return replace(self, axis=axis)


def _axis_of(t: TensorType, bsym: Sym, what: str):
    """The axis whose dimension is the batch (None when no dimension involves it)."""
    name = bsym.names[0]
    found = [i for i, d in enumerate(t.shape) if isinstance(d, Sym) and name in d.names]
    if not found:
        return None
    if len(found) > 1 or t.shape[found[0]].names != bsym.names:
        raise Unsupported(f"{what} has shape {t.shape}: the batch is not in one axis")
    return found[0]


def _batch_axes(g: Graph, bsym: Sym, given: dict | None = None) -> dict[int, Rows | None]:
    """nid -> where its value holds the batch rows (None: the value does not involve the
    batch). Unsupported when some value mixes rows otherwise. `given`: the rows of a loop
    body's inputs, from the loop's operands."""
    rows: dict[int, Rows | None] = {}
    for nid in g.toposort():
        n = g.node(nid)
        what = f"`{n.op.name}` (%{nid})"
        if n.op is ops.SCAN:
            rows[nid] = _scan_rows(g, n, [rows[o] for o in n.operands], bsym, what)
            continue
        out = _axis_of(n.type, bsym, what)
        if given is not None and n.op is ops.INPUT:
            got = given[nid]
        elif n.op is ops.SCAN_RESULT:
            got = rows[n.operands[0]][n.attrs["index"]]
        else:
            got = _rule(g, n, [rows[o] for o in n.operands], out, bsym, what)
        if (got.axis if got is not None else None) != out:
            raise Unsupported(f"{what} moves the batch rows (axis {got.axis if got else None} becomes {out})")
        if got is not None and not got.uniform and got.outer * got.inner != n.type.shape[out].coeff:
            raise Unsupported(f"{what}: a compiler error in following the batch rows")
        rows[nid] = got
    return rows


def mixes_samples(graph: Graph) -> int | None:
    """A node of the model's outputs (`output` and named results; batchnorm in its
    evaluation form) that reduces over the batch -- a sample's output then depends on the
    other samples of its batch: a softmax over the batch axis, `mean(h, axis=0)` -- or None
    (also when the batch rows cannot be followed). Losses and metrics are means over the
    samples by design, and not looked at."""
    bsym = batch_symbol(graph)
    if bsym is None:
        return None
    try:
        rows = _batch_axes(graph, bsym)
    except Unsupported:
        return None
    seen = graph.ancestors(nid for key, nid in graph.outputs.items() if key == "output" or key.startswith("output:"))
    for nid in graph.toposort():
        n = graph.node(nid)
        if nid in seen and _reduces_batch(n, [rows.get(o) for o in n.operands], rows.get(nid)):
            return nid
    return None


def _scan_rows(g: Graph, n, ins: list, bsym: Sym, what: str) -> tuple:
    """The rows of each of a loop's results (per scan_result index): its body, given the
    rows of the carries, the sequences' slices and the invariants, must keep rows apart
    and leave each carry's rows where they came in; nothing in it may reduce over the batch
    (it would need masking inside the loop)."""
    a = n.attrs
    body, k, seqs = a["body"], a["carries"], a["seqs"]
    sig = signature(body, k, seqs)
    given = {}
    for nid, r in zip(sig.carries, ins[:k]):
        given[nid] = r
    for nid, r in zip(sig.seqs, ins[k:k + seqs]):
        if r is not None and r.axis == 0:
            raise Unsupported(f"{what} loops over the batch axis")
        given[nid] = r.moved(r.axis - 1) if r is not None else None
    for nid, r in zip(sig.invariants, ins[k + seqs:]):
        given[nid] = r
    while True:  # a carry that starts uniform (zeros) takes the rows of what a step makes of it
        inner = _batch_axes(body, bsym, given)
        again = False
        for i, (c, new) in enumerate(zip(sig.carries, sig.new_carries)):
            before, after = inner[c], inner[new]
            if before == after or (before is not None and after is not None and before.axis == after.axis
                                   and after.uniform):
                continue
            if before is not None and after is not None and before.axis == after.axis and before.uniform:
                given[c], again = after, True
                continue
            raise Unsupported(f"{what}: carry {i} holds the batch rows differently after a step")
        if not again:
            break
    for nid in body.ids():
        m = body.node(nid)
        if _reduces_batch(m, [inner.get(o) for o in m.operands], inner.get(nid)):
            raise Unsupported(f"the body of {what} reduces over the batch (`{m.op.name}`)")
    out = [inner[c] for c in sig.carries]
    for y in sig.outputs:
        r = inner[y]
        out.append(r.moved(r.axis + 1) if r is not None else None)  # stacked: time first
    return tuple(out)


def _reduces_batch(n, ins: list, out) -> bool:
    """Whether n (rewritten by `_rewrite`) sums, maxes, counts or contracts over the batch."""
    if n.op in (ops.REDUCE_SUM, ops.REDUCE_MAX, ops.SIZE):
        return ins[0] is not None and ins[0].axis in n.attrs["axes"]
    if n.op is ops.ARGMAX:
        return ins[0] is not None and ins[0].axis == n.attrs["axis"]
    if n.op is ops.MATMUL:
        return out is None and any(i is not None for i in ins)
    return False


def _same(ins: list, what: str):
    """The common rows of operands combined element by element (uniform ones fit any)."""
    known = [i for i in ins if i is not None]
    if not known:
        return None
    if len({i.axis for i in known}) > 1:
        raise Unsupported(f"{what} combines values batched along different axes")
    specific = {i for i in known if not i.uniform}
    if len(specific) > 1:
        raise Unsupported(f"{what} combines values whose rows are laid out differently")
    return specific.pop() if specific else known[0]


def _rule(g: Graph, n, ins: list, out, bsym: Sym, what: str):
    """Where n's result holds the batch rows, implied by its operands' (before any
    rewriting); `out` is the batch axis its type shows."""
    op, a = n.op, n.attrs
    if op is ops.INPUT:
        if out is not None and (a["role"] not in ("data", "label") or out != 0):
            raise Unsupported(f"input `{a['name']}` has the batch as axis {out}")
        return None if out is None else Rows(0)
    if op in (ops.CONST, ops.IOTA, ops.SIZE):
        # constants, and positions (the same for a valid row in either batch)
        return None if out is None else Rows(out, None, None)
    if op is ops.RANDOM:
        if out not in (None, 0):  # numbers are keyed by flat index: only a leading batch keeps them
            raise Unsupported(f"{what} draws random numbers with the batch as axis {out}")
        return None if out is None else Rows(0, 1, n.type.shape[0].coeff)
    if op.kind is ops.Kind.ELEMENTWISE:
        got = _same(ins, what)
        if got is not None and got.axis != out:
            raise Unsupported(f"{what} combines values batched along different axes")
        return got
    if op is ops.BROADCAST:
        if ins[0] is None:
            return None if out is None else Rows(out, None, None)
        return ins[0].moved(a["axes"][ins[0].axis])
    if op is ops.PERMUTE:
        return None if ins[0] is None else ins[0].moved(list(a["perm"]).index(ins[0].axis))
    if op in (ops.SLICE, ops.PAD):  # a symbolic dimension is only ever taken whole, never padded
        return ins[0]
    if op is ops.CONCAT:
        got = _same(ins, what)
        if (got.axis if got is not None else None) != out or out == a["axis"]:
            raise Unsupported(f"{what} joins along the batch axis")
        return got
    if op is ops.RESHAPE:
        return _reshape_rows(g.node(n.operands[0]).type.shape, tuple(n.type.shape), ins[0], out, what)
    if op in (ops.REDUCE_SUM, ops.REDUCE_MAX):
        r = ins[0]
        if r is None or r.axis in a["axes"]:
            return None if r is None or out is None else Rows(out, None, None)
        return r.moved(r.axis - sum(1 for ax in a["axes"] if ax < r.axis))
    if op is ops.ARGMAX:
        r = ins[0]
        if r is None or r.axis == a["axis"]:
            return None if r is None or out is None else Rows(out, None, None)
        return r.moved(r.axis - (1 if a["axis"] < r.axis else 0))
    if op is ops.MATMUL:
        ia, ib = ins
        m_axis = 1 if a["ta"] else 0   # a's rows
        n_axis = 0 if a["tb"] else 1   # b's columns
        res = None
        if ia is not None and ia.axis == m_axis:
            res = ia.moved(0)
        if ib is not None and ib.axis == n_axis:
            if res is not None:
                raise Unsupported(f"{what} multiplies batch by batch")
            res = ib.moved(1)
        return res  # a batch in the contraction is masked (res None)
    if op is ops.BATCH_MATMUL:  # G products side by side: rows kept apart along the stack axis
        if any(i is not None and i.axis != 0 for i in ins):
            raise Unsupported(f"{what} has the batch inside its matrices")
        return _same(ins, what)
    if op in (ops.CONV2D, ops.POOL2D, ops.CONV2D_BWD_DATA, ops.POOL2D_BWD):
        if any(i is not None and i != Rows(0) for i in ins) or (ins[0] != Rows(0) and out is not None):
            raise Unsupported(f"{what} has the batch off axis 0")
        return None if out is None else Rows(0)
    if op is ops.TAKE:
        if ins[0] is not None:
            raise Unsupported(f"{what} gathers rows of a batched table")
        return _same(ins[1:], what)
    if all(i is None for i in ins) and out is None:
        return None  # an op that never sees the batch
    raise Unsupported(f"{what} is not known to keep batch rows apart")


def _reshape_rows(x: tuple, y: tuple, r: Rows | None, out, what: str) -> Rows | None:
    """A reshape keeps the rows' entries where row-major order puts them: the batch axis's
    entries before and after it fold into its outer and inner counts."""
    if r is None or out is None:
        if (r is None) != (out is None):
            raise Unsupported(f"{what} reshapes across the batch rows")
        return None
    if r.uniform:
        return Rows(out, None, None)
    before, after = _prod(x[:r.axis]) * r.outer, r.inner * _prod(x[r.axis + 1:])
    before_y, after_y = _prod(y[:out]), _prod(y[out + 1:])
    if not all(isinstance(d, int) for d in (before, after, before_y, after_y)) \
            or before % before_y or after % after_y:
        raise Unsupported(f"{what} reshapes across the batch rows")
    return Rows(out, before // before_y, after // after_y)


def _prod(dims):
    p = 1
    for d in dims:
        p = dim_mul(p, d)
    return p


# --- the rewrite ----------------------------------------------------------------------------

def _rewrite(graph: Graph, bsym: Sym, rows: dict) -> Graph:
    g = graph.copy()
    b = GraphBuilder(g)
    valid = b.input(VALID, TensorType(DType.i32, ()), "hyper")
    valid_f = b.cast(valid, DType.f32)
    masks: dict = {}
    changed = False

    def mask(x: int, r: Rows, fill) -> int:
        """x with the elements of padded rows replaced by fill (the batch axis holds row r's
        entries at o*B*inner + r*inner + i; a uniform value any way)."""
        t = g.node(x).type
        k, dim = r.axis, t.shape[r.axis]
        outer, inner = (1, dim.coeff) if r.uniform else (r.outer, r.inner)
        key = (t.shape, k, outer, inner)
        if key not in masks:
            if outer == 1:  # row r's entries are [inner*r, inner*r + inner)
                keep = b.lt(b.iota((dim,), 0), valid * inner if inner != 1 else valid)
            else:           # time-major: rows repeat every B entries, `outer` times
                one = b.lt(b.iota((bsym,), 0), valid)
                keep = b.reshape(b.broadcast(one, (outer, bsym, inner), (1,)), (dim,))
            masks[key] = b.broadcast(keep, t.shape, (k,))
        return b.where(masks[key], b.value(x), b.lift(fill, t.dtype)).id

    def lowest(dtype: DType):
        return -np.inf if dtype.is_float else float(np.iinfo(np.int32).min)

    for nid in [i for i in graph.toposort()]:
        n = g.node(nid)
        ins = [rows.get(o) for o in n.operands]
        if not _reduces_batch(n, ins, rows.get(nid)):
            continue
        with b.at(n.span):
            if n.op in (ops.REDUCE_SUM, ops.REDUCE_MAX):
                x = n.operands[0]
                fill = 0 if n.op is ops.REDUCE_SUM else lowest(g.node(x).type.dtype)
                g.set_node(nid, replace(n, operands=(mask(x, ins[0], fill),)))
            elif n.op is ops.ARGMAX:
                x = n.operands[0]
                g.set_node(nid, replace(n, operands=(mask(x, ins[0], lowest(g.node(x).type.dtype)),)))
            elif n.op is ops.MATMUL:
                g.set_node(nid, replace(n, operands=tuple(mask(o, i, 0) if i is not None else o
                                                          for o, i in zip(n.operands, ins))))
            else:  # SIZE
                rest = tuple(ax for ax in n.attrs["axes"] if ax != ins[0].axis)
                c = g.node(n.operands[0]).type.shape[ins[0].axis].coeff
                count = valid_f * float(c) if c != 1 else valid_f
                count = count * b.size(b.value(n.operands[0]), rest) if rest else count
                g.replace_all_uses(nid, count.id)
        changed = True
    if not changed:  # nothing reduces over the batch (an output-only graph): no input needed
        g = graph.copy()
        g.meta = dict(g.meta, mask_batch="nothing to mask")
        return g
    g.remove_unused()
    g.meta = dict(g.meta, mask_batch=VALID)
    return g
