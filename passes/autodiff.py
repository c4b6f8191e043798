"""autodiff: reverse-mode differentiation as a graph transformation.

Adds `grad:<param>` results: the gradient of the scalar `loss` result with respect to
every parameter input, built from each op's vjp rule. Cotangents of values used
several times accumulate by addition. Only nodes on a path from a parameter to the
loss are differentiated; gradient nodes carry the span of the op they differentiate,
so costs and errors map back to the .dln line.

Scans (dlc/core/ops/scan.py) are differentiated as a whole, into a reverse scan:

- The body's vjp is built by the same `backprop`, on a copy of the body with one
  cotangent input per carry (`dc<i>`) and per stacked output that has a cotangent
  (`dy<m>`), differentiating with respect to the carries and the sequences and
  invariants that need gradients.
- The forward values that vjp reads are its residuals. A body input is available as
  it is (a sequence or an invariant of the forward scan is passed to the backward scan
  too); a value computed from invariants and constants only is recomputed in the
  backward body; every other value -- the carries entering each step (h_{t-1}, c_{t-1})
  and the values the rules reuse (gate activations, tanh(c_t), ...) -- is *stashed*:
  the forward scan is replaced by one with those values as extra stacked outputs, and
  the backward scan reads them as sequences at the same time index.
- The backward scan runs in the other direction. Its carries are the carries'
  cotangents (initialized with the cotangents of the final carries, or zeros); its
  sequences are the stacked outputs' cotangents, the stash and the forward sequences it
  needs; its per-step outputs are the sequences' cotangents, stacked in time order.
- Gradients of invariants (weights) are sums over steps. They are summed after the
  loop, where the sum joins the last linear op of the per-step gradient: a weight
  gradient sum_t A_t^T G_t (matmul with ta) becomes ONE matmul of the stacked A and G
  reshaped to [T*rows, ...] (as the unrolled graph's _join_matmuls did: one large
  matmul instead of T small ones), and a bias gradient sum_t reduce_sum(G_t) becomes one
  reduction of the stacked G; additions and reshapes distribute. Any other per-step
  gradient is accumulated in an extra carry of the backward scan (no T-fold stash).
"""
from __future__ import annotations

from typing import Sequence

from dlc.core import ops
from dlc.core.builder import GraphBuilder, Value
from dlc.core.diagnostics import DlcError
from dlc.core.graph import Graph, Node, VerifyError
from dlc.core.ops.scan import carry_name, inv_name, out_name, seq_name, signature
from dlc.core.types import dim_mul


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
    seeds = {root: [b.const(1.0, g.node(root).type.dtype)]}
    grads = backprop(g, b, seeds, params)
    for p in params:
        node = g.node(p)
        grad = grads.get(p)
        if grad is None:  # the loss does not depend on it
            with b.at(node.span):
                grad = b.zeros_like(b.value(p))
        g.outputs[f"grad:{node.attrs['name']}"] = grad.id
    g.remove_unused()
    return g


def backprop(g: Graph, b: GraphBuilder, seeds: dict[int, list[Value]], wrt: Sequence[int]) -> dict[int, Value]:
    """Emit into g the cotangents of the nodes `wrt`, given cotangent contributions
    (`seeds`) of some nodes; {node: cotangent} for those reached (absent: zero)."""
    # differentiate only what lies between a `wrt` node and a seeded one
    needed = _reachable(g, wrt, g.users) & _reachable(g, list(seeds), g.operands)
    parts: dict[int, list[Value]] = {k: list(v) for k, v in seeds.items()}
    scan_parts: dict[int, dict[int, list[Value]]] = {}  # scan -> result index -> contributions
    ct: dict[int, Value] = {}
    for nid in reversed(g.toposort()):
        if nid not in needed or (nid not in parts and nid not in scan_parts):
            continue
        node = g.node(nid)
        if node.op is ops.SCAN:
            with b.at(node.span):
                results = {i: _combine(b, c) for i, c in scan_parts.pop(nid).items()}
                cts = _scan_vjp(g, b, nid, results, needed)
        else:
            with b.at(node.span):
                ct[nid] = _combine(b, parts.pop(nid))
            if node.op is ops.INPUT:
                continue
            if node.op is ops.SCAN_RESULT:
                scan_parts.setdefault(node.operands[0], {}).setdefault(node.attrs["index"], []).append(ct[nid])
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
    return {w: ct[w] for w in wrt if w in ct}


# --- scans ------------------------------------------------------------------------------------

def _copy_nodes(dst: Graph, src: Graph, order: list[int], mapping: dict[int, int]) -> None:
    """Add the src nodes `order` (topologically sorted) to dst, reading mapped operands."""
    for nid in order:
        n = src.node(nid)
        mapping[nid] = dst.add(Node(n.op, tuple(mapping[o] for o in n.operands), n.attrs, n.type, n.span))


def _hoist(g: Graph, v: int, forward: set[int]):
    """How sum_t v_t (an invariant's per-step gradient) is computed after the loop: a tree
    of ("add", a, b), ("reshape", t, shape), ("matmul", A, G) for sum_t A_t^T G_t,
    ("sum", x, axes) for sum_t reduce_sum(x_t, axes), ("acc", v) for a carried sum."""
    n = g.node(v)
    if v not in forward:
        if n.op is ops.ADD:
            return ("add", _hoist(g, n.operands[0], forward), _hoist(g, n.operands[1], forward))
        if n.op is ops.RESHAPE:
            return ("reshape", _hoist(g, n.operands[0], forward), n.attrs["shape"])
        if n.op is ops.MATMUL and n.attrs.get("ta") and not n.attrs.get("tb"):
            return ("matmul",) + n.operands
        if n.op is ops.REDUCE_SUM:
            return ("sum", n.operands[0], n.attrs["axes"])
    return ("acc", v)


def _hoist_leaves(tree) -> list[tuple]:
    if tree[0] == "add":
        return _hoist_leaves(tree[1]) + _hoist_leaves(tree[2])
    if tree[0] == "reshape":
        return _hoist_leaves(tree[1])
    return [tree]


def _scan_vjp(g: Graph, b: GraphBuilder, nid: int, cts: dict[int, Value], needed: set[int]) -> list:
    """Cotangents of a scan's operands (None where not needed), given those of its results
    (by index). Replaces the scan by one that also stashes the backward pass's residuals."""
    node = g.node(nid)
    a = node.attrs
    body, k, s, length = a["body"], a["carries"], a["seqs"], a["length"]
    operands = node.operands
    n_inv = len(operands) - k - s
    sig = signature(body, k, s, n_inv)
    btype = lambda i: body.node(i).type  # noqa: E731
    diff_carries = [i for i in range(k) if btype(sig.carries[i]).dtype.is_float]
    want_seq = [j for j in range(s) if operands[k + j] in needed and btype(sig.seqs[j]).dtype.is_float]
    want_inv = [l for l in range(n_inv) if operands[k + s + l] in needed
                and btype(sig.invariants[l]).dtype.is_float]
    result: list = [None] * len(operands)
    if not (want_seq or want_inv or any(operands[i] in needed for i in diff_carries)):
        return result

    # 1. the body's vjp, next to a copy of the body
    g2 = body.copy()
    b2 = GraphBuilder(g2)
    b2.span = b.span
    original = set(g2.ids())
    dc = {i: b2.input(f"dc{i}", btype(sig.carries[i]), "data") for i in diff_carries}
    dy = {m: b2.input(f"dy{m}", btype(y), "data") for m, y in enumerate(sig.outputs) if k + m in cts}
    seeds: dict[int, list[Value]] = {}
    for i, v in dc.items():
        seeds.setdefault(sig.new_carries[i], []).append(v)
    for m, v in dy.items():
        seeds.setdefault(sig.outputs[m], []).append(v)
    wrt = ([sig.carries[i] for i in diff_carries] + [sig.seqs[j] for j in want_seq]
           + [sig.invariants[l] for l in want_inv])
    grads = backprop(g2, b2, seeds, wrt)
    # forward: the body's nodes, and the stashing scans that replaced scans nested in it
    cotangent = _reachable(g2, [v.id for v in list(dc.values()) + list(dy.values())], g2.users)
    forward = original | {n for n in g2.ids() if n not in cotangent and n not in original
                          and g2.node(n).op in (ops.SCAN, ops.SCAN_RESULT)}

    def grad_of(input_id: int) -> int:
        v = grads.get(input_id)
        return (v if v is not None else b2.zeros_like(b2.value(input_id))).id

    d_carry = {i: grad_of(sig.carries[i]) for i in diff_carries}
    d_seq = {j: grad_of(sig.seqs[j]) for j in want_seq}
    hoisted = {l: _hoist(g2, grads[sig.invariants[l]].id, forward) for l in want_inv
               if sig.invariants[l] in grads}
    accs = list(dict.fromkeys(leaf[1] for tree in hoisted.values() for leaf in _hoist_leaves(tree)
                              if leaf[0] == "acc"))
    stepwise = list(dict.fromkeys(
        list(d_seq.values()) + [x for tree in hoisted.values() for leaf in _hoist_leaves(tree)
                                if leaf[0] in ("matmul", "sum") for x in leaf[1:2 if leaf[0] == "sum" else 3]]))

    # 2. what the backward body computes, and which forward values it reads
    roots = list(d_carry.values()) + accs + stepwise
    live, reads, stack = set(), set(), list(roots)
    while stack:
        n = stack.pop()
        if n in forward:
            reads.add(n)
        elif n not in live:
            live.add(n)
            stack.extend(g2.operands(n))
    varying: dict[int, bool] = {}  # forward node -> depends on a carry or a sequence slice
    for n in g2.toposort():
        if n in forward:
            varying[n] = n in sig.carries or n in sig.seqs or any(varying[o] for o in g2.operands(n))
    fwd_seq = {sig.seqs[j]: k + j for j in range(s)}
    fwd_inv = {sig.invariants[l]: k + s + l for l in range(n_inv)}
    stash = [n for n in sorted(reads) if n not in fwd_seq and n not in fwd_inv and varying[n]]
    recompute, inv_reads = set(), {n for n in reads if n in fwd_inv}
    stack = [n for n in reads if not varying[n] and n not in fwd_inv]
    while stack:  # computed from invariants and constants only: recomputed, not stashed
        n = stack.pop()
        if n in fwd_inv:
            inv_reads.add(n)
        elif n not in recompute:
            recompute.add(n)
            stack.extend(g2.operands(n))

    # 3. the forward scan, stashing per step what the backward body reads
    stash_index = {}
    if stash:
        fbody = g2.copy()  # the body, with any scans nested in it replaced by stashing ones
        ys = list(fbody.outputs.values())[k:]
        for n in stash:
            if n not in ys:
                fbody.outputs[out_name(len(ys))] = n
                ys.append(n)
            stash_index[n] = k + ys.index(n)
        fbody.remove_unused()
        for v in list(dc.values()) + list(dy.values()):
            fbody.remove(v.id)
        fwd = b.emit(ops.SCAN, tuple(b.value(o) for o in operands), **dict(a, body=fbody))
        g.replace_all_uses(nid, fwd.id)
        stash_outer = {n: b.emit(ops.SCAN_RESULT, (fwd,), index=i) for n, i in stash_index.items()}
    else:
        stash_outer = {}

    # 4. the backward body
    bwd = Graph(f"{body.name}_vjp")
    bb = GraphBuilder(bwd)
    bb.span = b.span
    mapping: dict[int, int] = {}
    carry_init: list[Value] = []
    for c, i in enumerate(diff_carries):
        mapping[dc[i].id] = bb.input(carry_name(c), btype(sig.carries[i]), "data").id
        carry_init.append(cts.get(i) if i in cts else b.zeros_like(b.value(operands[i])))
    acc_in = {}
    for v in accs:
        t = g2.node(v).type
        acc_in[v] = bb.input(carry_name(len(carry_init)), t, "data")
        carry_init.append(b.full(0.0, t.shape, t.dtype))
    seq_outer: list[Value] = []
    seq_of_outer: dict[int, int] = {}  # backward body input -> the outer sequence it slices

    def add_seq(src: int, outer: Value) -> None:
        mapping[src] = bb.input(seq_name(len(seq_outer)), g2.node(src).type, "data").id
        seq_of_outer[mapping[src]] = outer.id
        seq_outer.append(outer)

    for m, v in dy.items():
        add_seq(v.id, cts[k + m])
    for n in stash:
        add_seq(n, stash_outer[n])
    for n in sorted(reads):
        if n in fwd_seq:
            add_seq(n, b.value(operands[fwd_seq[n]]))
    inv_outer: list[Value] = []
    for n in sorted(inv_reads):
        mapping[n] = bb.input(inv_name(len(inv_outer)), g2.node(n).type, "data").id
        inv_outer.append(b.value(operands[fwd_inv[n]]))
    order = g2.toposort()
    _copy_nodes(bwd, g2, [n for n in order if n in recompute and n not in mapping], mapping)
    _copy_nodes(bwd, g2, [n for n in order if n in live and n not in mapping], mapping)
    for c, i in enumerate(diff_carries):
        bwd.outputs[carry_name(c)] = mapping[d_carry[i]]
    for c, v in enumerate(accs, start=len(diff_carries)):
        bwd.outputs[carry_name(c)] = (acc_in[v] + bb.value(mapping[v])).id
    out_index: dict[int, int] = {}  # backward body node -> index of its stacked output
    for v in stepwise:
        if mapping[v] not in seq_of_outer and mapping[v] not in out_index:
            out_index[mapping[v]] = len(carry_init) + len(out_index)
            bwd.outputs[out_name(len(out_index) - 1)] = mapping[v]

    # 5. the backward scan, and the operands' cotangents
    rev = b.emit(ops.SCAN, tuple(carry_init + seq_outer + inv_outer), body=bwd, length=length,
                 reverse=not a["reverse"], carries=len(carry_init), seqs=len(seq_outer))

    def stacked(v: int) -> Value:
        if mapping[v] in seq_of_outer:
            return b.value(seq_of_outer[mapping[v]])
        return b.emit(ops.SCAN_RESULT, (rev,), index=out_index[mapping[v]])

    for c, i in enumerate(diff_carries):
        if operands[i] in needed:
            result[i] = b.emit(ops.SCAN_RESULT, (rev,), index=c)
    for j in want_seq:
        result[k + j] = stacked(d_seq[j])

    def total(tree) -> Value:
        kind = tree[0]
        if kind == "add":
            return total(tree[1]) + total(tree[2])
        if kind == "reshape":
            return b.reshape(total(tree[1]), tree[2])
        if kind == "acc":
            return b.emit(ops.SCAN_RESULT, (rev,), index=len(diff_carries) + accs.index(tree[1]))
        if kind == "sum":
            return b.sum(stacked(tree[1]), (0,) + tuple(x + 1 for x in tree[2]))
        xs, gs = stacked(tree[1]), stacked(tree[2])  # sum_t A_t^T G_t: one matmul over all steps
        rows = dim_mul(length, xs.shape[1])
        return b.matmul(b.reshape(xs, (rows, xs.shape[2])), b.reshape(gs, (rows, gs.shape[2])), ta=True)

    for l, tree in hoisted.items():
        result[k + s + l] = total(tree)
    return result
