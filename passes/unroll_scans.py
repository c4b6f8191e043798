"""unroll_scans: replace every scan by `length` inlined copies of its body.

A stopgap lowering for the native backend, whose kernel IR has no sequential loop yet:
it runs after `specialize` (T must be a known number) and before `fuse`. The reference
interpreter and `dlc check` never unroll: they keep the one loop node.

Step t reads xs[t] -- a slice of axis 0 -- and its outputs are joined along axis 0 again.
A few rewrites keep the unrolled graph what the layers produced when they unrolled
themselves, without transposes or copies of whole sequences:
  - a sequence that is another unrolled scan's stacked output is read piece by piece
    (the backward scan reads the forward scan's stash per step, not slices of a concat);
  - a sequence that is a permute bringing axis a to the front (a batch-major [B, T, F]
    made time-major) is sliced along axis a of the permute's operand;
  - a stacked output read only by such permutes (back to batch-major) is joined along
    the permuted axis directly, and one read only as [T*rows, ...] (the joined weight
    gradient's matmul operand) is the concatenation of its pieces;
  - products with a float zero constant -- in practice a zero initial state: h_0 @ wh and
    f * c_0 at the first step -- are not built (they are zeros; a sum with one is its other
    operand), as the layers skipped them: with non-finite weights the unrolled step gives
    0 there where the loop gives NaN.
"""
from __future__ import annotations

from dlc.core import ops
from dlc.core.builder import GraphBuilder, Value
from dlc.core.diagnostics import DlcError
from dlc.core.graph import Graph, Node
from dlc.core.ops.scan import signature
from dlc.passes.simplify import scalar_of


# Until the kernel IR runs loops, a native target holds one copy of a loop's body per step.
MAX_UNROLLED_STEPS = 1000


def unroll_scans(graph: Graph, ctx=None) -> Graph:
    g = graph.copy()
    b = GraphBuilder(g)
    while True:  # bodies may hold scans: inlined, they are unrolled in the next round
        scans = [n for n in g.toposort() if g.node(n).op is ops.SCAN]
        if not scans:
            return g
        pieces: dict[int, list[int]] = {}  # a stacked result -> its per-step values
        for nid in scans:
            _unroll(g, b, nid, pieces)
        g.remove_unused()


def _front_axis(perm: tuple[int, ...], front: int) -> int | None:
    """For a permute whose output axis `front` is its operand's axis a, with the other axes
    in their order: a (else None)."""
    rest = [p for i, p in enumerate(perm) if i != front]
    return perm[front] if rest == sorted(rest) else None


def _unroll(g: Graph, b: GraphBuilder, nid: int, pieces: dict[int, list[int]]) -> None:
    node = g.node(nid)
    a = node.attrs
    body, k, s, length = a["body"], a["carries"], a["seqs"], a["length"]
    if not isinstance(length, int):
        raise DlcError(f"cannot unroll a loop of symbolic length {length}: the number of time "
                       "steps must be known", node.span)
    if length > MAX_UNROLLED_STEPS:  # the graph would hold every step: bound time and memory
        raise DlcError(f"this target unrolls recurrent loops, and {length:,} time steps exceed its limit "
                       f"of {MAX_UNROLLED_STEPS:,}", node.span,
                       hint="use --target reference, or check the time axis (the second dimension) "
                            "of the input type")
    operands = node.operands
    sig = signature(body, k, s, len(operands) - k - s)
    order = [n for n in body.toposort() if body.node(n).op is not ops.INPUT]

    def step_slice(seq: int, t: int) -> int:
        if seq in pieces:
            return pieces[seq][t]
        src = g.node(seq)
        with b.at(node.span):
            if src.op is ops.PERMUTE and _front_axis(src.attrs["perm"], 0) is not None:
                return b.take_axis(b.value(src.operands[0]), src.attrs["perm"][0], t).id
            return b.take_axis(b.value(seq), 0, t).id

    carries = list(operands[:k])
    ys: list[list[int]] = [[0] * length for _ in sig.outputs]
    for t in (reversed(range(length)) if a["reverse"] else range(length)):
        env = dict(zip(sig.carries, carries))
        env.update({x: step_slice(seq, t) for x, seq in zip(sig.seqs, operands[k:k + s])})
        env.update(zip(sig.invariants, operands[k + s:]))
        for bn in order:
            n = body.node(bn)
            args = tuple(env[o] for o in n.operands)
            zero = ([g.node(o).type.dtype.is_float and scalar_of(g, o) == 0 for o in args]
                    if n.op in (ops.MUL, ops.MATMUL, ops.ADD) else [])
            if n.op is ops.ADD and any(zero):
                env[bn] = args[1] if zero[0] else args[0]
            elif any(zero):
                with b.at(n.span):
                    env[bn] = b.full(0.0, n.type.shape, n.type.dtype).id
            else:
                env[bn] = g.add(Node(n.op, args, n.attrs, n.type, n.span))
        carries = [env[c] for c in sig.new_carries]
        for m, y in enumerate(sig.outputs):
            ys[m][t] = env[y]

    for r in g.users(nid):
        index = g.node(r).attrs["index"]
        if index < k:
            g.replace_all_uses(r, carries[index])
            continue
        per_step = ys[index - k]
        pieces[r] = per_step
        with b.at(node.span):
            readers = g.users(r)
            perms = {g.node(u).attrs["perm"] if g.node(u).op is ops.PERMUTE else None for u in readers}
            perm = perms.pop() if len(perms) == 1 else None
            front = perm.index(0) if perm is not None else None
            t = g.node(r).type.shape
            rows = {g.node(u).type.shape if g.node(u).op is ops.RESHAPE else None for u in readers}
            if rows == {(t[0] * t[1],) + t[2:]} and len(t) >= 2:  # read as [T*rows, ...]
                joined = b.concat([b.value(v) for v in per_step], 0).id
                for u in readers:
                    g.replace_all_uses(u, joined)
            elif front is not None and _front_axis(perm, front) is not None:  # joined batch-major
                joined = _join(b, per_step, front).id
                for u in readers:
                    g.replace_all_uses(u, joined)
            else:
                joined = _join(b, per_step, 0).id
                pieces[joined] = per_step  # later scans read it as a sequence: per step
                g.replace_all_uses(r, joined)


def _join(b: GraphBuilder, per_step: list[int], axis: int) -> Value:
    values = [b.value(v) for v in per_step]
    return b.concat([b.reshape(v, v.shape[:axis] + (1,) + v.shape[axis:]) for v in values], axis)
