"""loops: prepare every scan to run as a sequential loop in native code, and the layout of
a loop's storage that fuse, memory and schedule share.

A scan (dlc/core/ops/scan.py) is lowered to a kernel-IR Loop around its body's kernels
(passes/fuse.py fuses the body separately, passes/memory.py plans it, passes/schedule.py
makes the Loop). Between steps a carry lives in storage of its own, `slots` copies of
the carry one after another:

  stacked   T + 1 slots, when a stacked output is the carry entering each step (the stash
            of h_{t-1} for the backward pass) or the carry after it (an rnn's outputs):
            step t reads the slot of the carry entering it and writes the next one, and
            the stacked output is the window of T slots -- no copy;
  double    2 slots otherwise: iteration i reads slot i % 2 and writes the other.

This pass makes that possible without copies inside the loop:
  - a scan has one scan_result node per result (duplicates are merged);
  - each initial carry becomes a node of its own (a `stop_gradient` copy), computed
    straight into the first slot of the storage (memory gives it that address);
  - in each body, every carry result and every stacked output that is not such a window
    is a distinct node computed by the body (a copy where it is a body input, the result
    of a nested scan, or already another result), so it can be stored straight into its
    place: the carry's next slot, or the stacked output at [t].
It runs last before `fuse` (no later pass may merge the copies away).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from dlc.core import ops
from dlc.core.builder import GraphBuilder
from dlc.core.diagnostics import DlcError
from dlc.core.graph import Graph, Node
from dlc.core.ops.scan import signature


def prepare_loops(graph: Graph, ctx=None) -> Graph:
    g = graph.copy()
    for nid in g.toposort():
        n = g.node(nid)
        if n.op is not ops.SCAN:
            continue
        a = n.attrs
        if not isinstance(a["length"], int):
            raise DlcError(f"cannot compile a loop of symbolic length {a['length']}: the number of time "
                           "steps must be known", n.span)
        results: dict[int, int] = {}
        for r in g.users(nid):  # one scan_result per result: the loop leaves it in one place
            g.replace_all_uses(r, results.setdefault(g.node(r).attrs["index"], r))
        k = a["carries"]
        inits = tuple(g.add(Node(ops.STOP_GRADIENT, (o,), {}, g.node(o).type, n.span)) for o in n.operands[:k])
        body = prepare_loops(_distinct_results(a["body"], k, a["seqs"]))
        g.set_node(nid, replace(n, operands=inits + n.operands[k:], attrs=dict(a, body=body)))
    g.remove_unused()
    return g


def _distinct_results(body: Graph, carries: int, seqs: int) -> Graph:
    """The body with every result that must be stored by the body a node of its own."""
    b = body.copy()
    sig = signature(b, carries, seqs)
    builder = GraphBuilder(b)
    taken: set[int] = set()

    def own(name: str, nid: int) -> None:
        n = b.node(nid)
        if nid in taken or n.op in (ops.INPUT, ops.SCAN_RESULT):
            with builder.at(n.span):
                nid = builder.stop_gradient(builder.value(nid)).id
            b.outputs[name] = nid
        taken.add(nid)

    for i in range(carries):
        own(f"c{i}", b.outputs[f"c{i}"])
    windows = set(sig.carries) | {b.outputs[f"c{i}"] for i in range(carries)}
    for name in [r for r in b.outputs if r.startswith("y")]:
        if b.outputs[name] not in windows:
            own(name, b.outputs[name])
    return b


@dataclass(frozen=True)
class Storage:
    """Where carry i lives between steps of a loop of `length` steps (module docstring)."""

    length: int
    reverse: bool
    stacked: bool

    @property
    def slots(self) -> int:
        return self.length + 1 if self.stacked else 2

    def entering(self, x, t):
        """The slot of the carry entering step t (an index expression of `x`, an Exprs)."""
        if self.stacked:
            return x.add(t, x.const(1)) if self.reverse else t
        return x.mod(x.sub(x.const(self.length - 1), t) if self.reverse else t, 2)

    def leaving(self, x, t):
        """The slot of the carry after step t: the one entering the next step."""
        return self.entering(x, x.add(t, x.const(-1 if self.reverse else 1)))

    def first(self) -> int:
        """The slot of the initial carry."""
        return self._at(self.length - 1 if self.reverse else 0, after=False)

    def last(self) -> int:
        """The slot of the final carry."""
        return self._at(0 if self.reverse else self.length - 1, after=True)

    def window(self, after: bool) -> int:
        """The first of the T slots holding the carry entering (or leaving) steps 0..T-1."""
        return self._at(0, after)

    def _at(self, t: int, after: bool) -> int:
        from dlc.core.kernel import Exprs
        from dlc.core.kernel.analysis import eval_ix
        x = Exprs()
        v = x.var("t", self.length + 2)
        return eval_ix((self.leaving if after else self.entering)(x, v), {"t": t})


@dataclass(frozen=True)
class Layout:
    """A scan's storage: per carry, its Storage; per stacked output, the carry whose
    storage window it is (i, after) or None (stored by the body at [t])."""

    storage: tuple[Storage, ...]
    windows: tuple[tuple[int, bool] | None, ...]


def layout(node: Node) -> Layout:
    a = node.attrs
    body, k = a["body"], a["carries"]
    sig = signature(body, k, a["seqs"])
    windows = []
    for y in sig.outputs:
        if y in sig.carries:
            windows.append((sig.carries.index(y), False))
        elif y in sig.new_carries:
            windows.append((sig.new_carries.index(y), True))
        else:
            windows.append(None)
    stacked = {w[0] for w in windows if w is not None}
    return Layout(tuple(Storage(a["length"], a["reverse"], i in stacked) for i in range(k)), tuple(windows))
