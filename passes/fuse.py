"""fuse: group the nodes of a static-shape graph into kernels.

Kinds of kernel:
  elementwise  one loop nest over a domain; producers are computed inline
  reduce       a row kernel over a domain D with kept axes K: for each index of K,
               the reductions over the other axes (with their elementwise prologue),
               row-level values, then elementwise stores over all of D (the
               epilogue) -- softmax, log-softmax + cross-entropy and its gradient,
               batchnorm statistics, loss means, bias gradients
  concat       one copy loop per piece into its slice of the output
  colsum       a sum over leading axes of many rows (bias gradients over a large
               batch or many time steps), added row by row along the contiguous axis
  matmul, conv, pool, gather
               the contraction, plus an elementwise epilogue over its output (bias,
               activation, the activation-derivative masks of the backward pass,
               even the optimizer update of the weight whose gradient it computes)
  scan         a sequential loop (passes/loops.py): the scan and its scan_result nodes,
               with the loop body fused separately, as a graph of its own (`body`); it
               reads its operands from memory and stores its results
  collective   allreduces over the ranks of a data-parallel job, from memory to memory:
               those of one bucket are one kernel (one exchange), placed in the phase
               where its last member is ready, and after the kernel of the bucket before
               (every rank must run the exchanges in the same order)

Rules, applied greedily from the results backwards (consumers before producers):
  F1 constants, broadcast constants, iota, counter-based random numbers, scalar
     arithmetic and cheap ops over those and over inputs are recomputed where used;
  F2 a node whose users are all in one kernel is computed inline there, if it fits the
     kernel's loop (as many elements as the domain, or as a row of it) -- otherwise it
     would be recomputed per element, so it is stored instead;
  F3 when the users are in several kernels over the same domain that do not depend on
     each other, those kernels merge (siblings); when they cannot, a broadcast, reshape,
     slice or pad is recomputed in each (its users read its operand through the index
     map: a depthwise convolution's shifted taps are never stored), and
     another node joins the kernel that all the others read from, if there is one, and
     is stored from there for them (a batchnorm's normalized values, computed in the
     kernel of its statistics, instead of a kernel of their own);
  F4 a reduction joins its users' kernel when it reduces that kernel's domain (or
     produces it), keeping the same axes as the kernel's other reductions;
  F5 matmul/conv/pool/gather/colsum read operands from memory, and results of the step
     are stored; a concat computes elementwise pieces in its own loops (each piece's
     loop stores it into its slice, and the values of the piece later kernels read:
     no copy, no phase of its own);
  F6 a matmul/conv/pool/colsum result read by exactly one elementwise kernel over the same shape
     takes that kernel as its epilogue, if that kernel reads each element where it is
     computed (through elementwise ops and reshapes: not a permute, slice or broadcast);
  F7 kernels are ordered in phases (a barrier between phases); in each phase,
     independent kernels over the same domain merge, and the remaining elementwise
     kernels merge into one multi-tensor kernel;
  F8 a kernel's values nest at most MAX_DEPTH deep (a longer chain of ops is stored
     every MAX_DEPTH ops, recomputed values are at most as deep, and siblings (F3) merge
     and an epilogue (F6) joins only within that depth): the expressions that scheduling
     and code generation walk recursively stay shallow whatever the program;
  F9 a data-parallel step runs its exchanges in bucket order. Where the kernels above
     cannot (a kernel that feeds one exchange also reads the same or a later one, though
     no value connects the two: the running statistics of a batchnorm(sync=true) whose
     output nothing reads, updated with the loss's finiteness, in the kernel of the
     statistics' sums), the step is fused again with each kernel's nodes depending on
     the same exchanges: a node's stage is 1 + the last bucket it depends on (0: none),
     and nodes of different stages never share a kernel.
Every producer/consumer pair left in different kernels records the rule that kept
them apart (`dlc compile --explain-fusion`). The plan is an annotation: the graph's
nodes are not changed. Code generation derives exact index maps, so these grouping
decisions affect speed, never results.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dlc.core import ops
from dlc.core.graph import Graph
from dlc.core.types import DType, TensorType, nbytes, numel

ANCHORS = {
    ops.MATMUL: "matmul", ops.BATCH_MATMUL: "matmul", ops.CONV2D: "conv", ops.CONV2D_BWD_DATA: "conv",
    ops.CONV2D_BWD_FILTER: "conv", ops.POOL2D: "pool", ops.POOL2D_BWD: "pool",
    ops.TAKE: "gather", ops.SCATTER_ADD: "gather", ops.ALLREDUCE: "collective",
    # a concat is stored piece by piece: inlined, every element would select among all pieces
    ops.CONCAT: "concat",
    ops.SCAN: "scan",
}
REDUCTIONS = {ops.REDUCE_SUM, ops.REDUCE_MAX, ops.ARGMAX}
ANCHOR_KINDS = frozenset(ANCHORS.values()) | {"colsum"}
# F8: how deep one kernel's values may nest (a chain of ops computed in one expression)
MAX_DEPTH = 64

# A sum over leading axes is a column sum: computed inline, each output element would walk
# its column with a stride of a whole row. From this many rows on, a template adds whole
# rows instead (contiguous, vectorized), once its input is in memory.
COLSUM_ROWS = 64


def anchor_kind(g: Graph, nid: int) -> str | None:
    """The template computing nid into memory (F5), or None when it is computed inline."""
    n = g.node(nid)
    if n.op is ops.REDUCE_SUM and _is_column_sum(g, n):
        return "colsum"
    return ANCHORS.get(n.op)


def is_anchor(g: Graph, nid: int) -> bool:
    return anchor_kind(g, nid) is not None


def _is_column_sum(g: Graph, n) -> bool:
    src = g.node(n.operands[0]).type
    axes = reduced_axes(n)
    return (src.dtype == DType.f32 and n.type.rank > 0 and axes == tuple(range(len(axes)))
            and numel(src.shape[:len(axes)]) >= COLSUM_ROWS)


# cheap enough to recompute per element rather than store and reload
CHEAP = {ops.ADD, ops.SUB, ops.MUL, ops.NEG, ops.MAX, ops.MIN, ops.ABS, ops.SIGN, ops.LT, ops.LE,
         ops.GT, ops.GE, ops.EQ, ops.NE, ops.AND, ops.WHERE, ops.CAST, ops.BROADCAST, ops.RESHAPE,
         ops.PERMUTE, ops.SLICE}


# movement ops that only transform the index (a pad adds a bounds check): a value read
# through one from another kernel's buffer costs nothing, where storing it would write
# (and reread) every element
INDEX_MAPS = {ops.BROADCAST, ops.RESHAPE, ops.SLICE, ops.PAD}


def reduced_axes(node) -> tuple[int, ...]:
    return tuple(node.attrs["axes"]) if "axes" in node.attrs else (node.attrs["axis"],)


def kept_axes(node) -> tuple[int, ...]:
    rank = len(node.type.shape) + len(reduced_axes(node))
    return tuple(i for i in range(rank) if i not in reduced_axes(node))


class Free:
    """F1: which nodes are recomputed in every kernel that uses them (never stored)."""

    def __init__(self, g: Graph):
        self.g = g
        self.results = set(g.roots())
        self.depth: dict[int, int] = {}  # free node -> how deep its value nests (F8)
        for nid in g.toposort():  # operands first: no recursion along long chains
            if self._free(nid):
                self.add(nid)

    def __call__(self, nid: int) -> bool:
        return nid in self.depth

    def add(self, nid: int) -> None:
        """Make nid free (F1, and F3's broadcasts and reshapes)."""
        self.depth[nid] = 1 + max((self.depth.get(o, 0) for o in self.g.operands(nid)), default=0)

    def _free(self, nid: int) -> bool:
        n = self.g.node(nid)
        if n.op is ops.INPUT or nid in self.results:
            return False
        if any(is_anchor(self.g, u) for u in self.g.users(nid)):
            # contractions read real buffers; a reshape of one is the same memory
            return n.op is ops.RESHAPE and self.g.node(n.operands[0]).op in (ops.INPUT, ops.SCAN_RESULT)
        if n.op in (ops.CONST, ops.IOTA, ops.RANDOM):
            return True
        if max((self.depth.get(o, 0) for o in n.operands), default=0) >= MAX_DEPTH:
            return False  # F8
        if n.op.kind is ops.Kind.ELEMENTWISE and n.type.rank == 0:
            return True  # scalar math: code generation hoists it out of loops
        return n.op in CHEAP and all(self.g.node(o).op is ops.INPUT or self(o) for o in n.operands)

    def users(self, nid: int) -> list[int]:
        """Users of nid, looking through free nodes (they are recomputed in their users)."""
        out, stack, seen = set(), list(self.g.users(nid)), set()
        while stack:
            u = stack.pop()
            if u not in seen:
                seen.add(u)
                if self(u):
                    stack.extend(self.g.users(u))
                else:
                    out.add(u)
        return sorted(out)


@dataclass
class Kernel:
    id: int
    kind: str                      # elementwise | reduce | matmul | conv | pool | gather
    nodes: list[int] = field(default_factory=list)
    anchor: int | None = None      # the matmul/conv/pool/gather node
    domain: tuple = ()             # the loop domain (reduce: the shape the reductions read)
    keep: tuple | None = None      # reduce kernels: the kept (outer, parallel) axes of domain
    outputs: list[int] = field(default_factory=list)  # nodes stored to memory
    phase: int = 0
    parts: list["Kernel"] = field(default_factory=list)  # a multi-tensor kernel's loop nests
    body: Graph | None = None      # scan kernels: the loop body, fused

    @property
    def row_shape(self) -> tuple:
        keep = range(len(self.domain)) if self.keep is None else self.keep
        return tuple(self.domain[i] for i in keep)


def _varies_along_reduced(k: Kernel, shape: tuple) -> bool:
    """Does a value of this shape, laid over reduce kernel k's domain axis by axis, vary
    along an axis k reduces? (Another rank: its layout is not known here, so no.)"""
    if len(shape) != len(k.domain):
        return False
    return any(shape[a] != 1 for a in range(len(shape)) if a not in k.keep)


@dataclass
class FusionPlan:
    kernels: list[Kernel]
    group_of: dict[int, int]        # node -> kernel id (free nodes and inputs absent)
    materialized: set[int]          # nodes whose values live in memory
    reasons: dict[tuple[int, int], str]
    overlap: bool = False           # collectives are started early and waited for late
    free: Free | None = None        # nodes in no kernel: recomputed in each user (F1, F3)

    @property
    def phases(self) -> int:
        return 1 + max((k.phase for k in self.kernels), default=-1)

    def describe(self, g: Graph) -> str:
        """Each kernel with its nodes' ops, what it stores and the .dln lines it came from."""
        lines = [f"fusion: {len(self.kernels)} kernels in {self.phases} phases"]
        for k in self.kernels:
            where = sorted({(g.node(n).span.short.rsplit(":", 1)[0]) for n in k.nodes if g.node(n).span},
                           key=lambda s: (s.split(":")[0], int(s.split(":")[1])))
            shape = "x".join(map(str, k.domain)) if k.domain else "scalar"
            rows = f", rows over axes {list(k.keep)}" if k.keep is not None else ""
            head = f"  k{k.id} {k.kind} phase {k.phase}"
            if k.body is not None:
                body = k.body.meta["fusion"]
                head += (f" over {g.node(k.anchor).attrs['length']} steps, a body of {len(body.kernels)} "
                         f"kernels in {body.phases} phases")
            elif not k.parts:
                head += f" over {shape}{rows}"
            else:
                head += f" ({len(k.parts)} loops)"
            lines.append(head + f": {len(k.nodes)} nodes, stores {len(k.outputs)}")
            ops_used = ", ".join(dict.fromkeys(g.node(n).op.name for n in k.nodes))
            lines.append(f"      ops: {ops_used}")
            lines.append(f"      from: {', '.join(where) or '(generated)'}")
        return "\n".join(lines)

    def explain(self, g: Graph) -> str:
        """For each producer/consumer pair in different kernels, the rule that kept them apart."""
        from dlc.core.printer import node_names
        names = node_names(g)
        out = []
        for (p, c), why in sorted(self.reasons.items()):
            if p in g and c in g and self.group_of.get(p) != self.group_of.get(c):
                kp, kc = self.group_of.get(p, "-"), self.group_of.get(c, "-")
                loc = f" ({g.node(c).span.short})" if g.node(c).span else ""
                out.append(f"{names[p]} {g.node(p).op.name} [k{kp}] -> {names[c]} {g.node(c).op.name} "
                           f"[k{kc}]{loc}: {why}")
        return "\n".join(out) + ("\n" if out else "")


class _Fuser:
    def __init__(self, g: Graph, stored: frozenset = frozenset(), body: bool = False, stages: bool = False):
        self.g = g
        self.stored = stored  # nodes a previous round found recomputed per element
        self.body = body      # a loop body: its results are stored by the kernels that use them
        self.free = Free(g)
        self.group: dict[int, int] = {}
        self.depth: dict[int, int] = {}  # placed node -> how deep it is in its kernel's values (F8)
        self.position: dict[int, int] = {}  # node -> its place in the graph's topological order
        self.kernels: dict[int, Kernel] = {}
        self.deps: dict[int, set[int]] = {}
        self.reasons: dict[tuple[int, int], str] = {}
        # F9: node -> its stage, kept apart from other stages (empty: F9 not asked for)
        self.stage: dict[int, int] = _exchange_stages(g, g.toposort()) if stages else {}
        self._next = 0

    # --- bookkeeping ---------------------------------------------------------------------------
    def new_kernel(self, nid: int) -> Kernel:
        n = self.g.node(nid)
        kind = anchor_kind(self.g, nid)
        k = Kernel(self._next, kind or "elementwise", domain=() if kind == "scan" else tuple(n.type.shape))
        if kind:
            k.anchor = nid
        elif n.op in REDUCTIONS:
            self.make_row(k, nid)
        self._next += 1
        self.kernels[k.id] = k
        self.deps[k.id] = set()
        self.add(k, nid)
        return k

    def make_row(self, k: Kernel, reduction: int) -> None:
        r = self.g.node(reduction)
        k.kind, k.domain, k.keep = "reduce", tuple(self.g.node(r.operands[0]).type.shape), kept_axes(r)

    def depth_in(self, k: Kernel, nid: int) -> int:
        """How deep nid's value would be in kernel k: below its deepest user there."""
        return 1 + max((self.depth[u] for u in self.free.users(nid) if self.group.get(u) == k.id), default=0)

    def add(self, k: Kernel, nid: int) -> None:
        self.depth[nid] = self.depth_in(k, nid)
        self.group[nid] = k.id
        k.nodes.append(nid)
        for u in self.free.users(nid):  # placed users now read from k
            gu = self.group.get(u)
            if gu is not None and gu != k.id:
                self.deps[gu].add(k.id)

    def merge(self, keep: Kernel, other: Kernel) -> None:
        for n in other.nodes:
            self.group[n] = keep.id
        keep.nodes.extend(other.nodes)
        if keep.kind == "elementwise" and other.kind == "reduce":
            keep.kind, keep.domain, keep.keep = "reduce", other.domain, other.keep
        self.deps[keep.id] |= self.deps.pop(other.id)
        del self.kernels[other.id]
        for d in self.deps.values():
            if other.id in d:
                d.discard(other.id)
                d.add(keep.id)
        self.deps[keep.id].discard(keep.id)

    def merged_depths(self, ks: list[Kernel]) -> dict[int, int]:
        """How deep each node of kernels ks would be in one kernel of them all (F8: an
        epilogue's values nest below those of the kernel it joins)."""
        depth: dict[int, int] = {}
        for n in sorted((n for k in ks for n in k.nodes), key=self.position.__getitem__, reverse=True):
            depth[n] = 1 + max((depth[u] for u in self.free.users(n) if u in depth), default=0)
        return depth

    def stages_differ(self, nodes) -> bool:
        """F9: do these nodes depend on different exchanges of a data-parallel step?"""
        return bool(self.stage) and len({self.stage[n] for n in nodes}) > 1

    def reaches_indirectly(self, a: int, b: int) -> bool:
        """Does kernel a read from b through some other kernel? (Merging a and b would then
        make a cycle; a direct read is fine: inside a kernel values are recomputed.)"""
        return any(self.reaches(d, b) for d in self.deps[a] if d != b)

    def reaches(self, a: int, b: int) -> bool:
        """Does kernel a (transitively) read from kernel b?"""
        return _reaches(self.deps, a, b)

    # --- rules ---------------------------------------------------------------------------------
    def fits(self, k: Kernel, nid: int) -> str | None:
        """None if node nid can be computed inside kernel k (F2, F4, F5), else why not."""
        n = self.g.node(nid)
        if self.stages_differ([k.nodes[0], nid]):
            return F9
        if self.depth_in(k, nid) > MAX_DEPTH:
            return f"F8: the kernel's values already nest {MAX_DEPTH} deep"
        if k.kind == "concat" and n.op not in REDUCTIONS and not is_anchor(self.g, nid) and (
                n.op.kind is ops.Kind.ELEMENTWISE or n.op in CHEAP):
            return None
        if k.kind in ANCHOR_KINDS:
            return f"F5: a {k.kind} kernel reads its operands from memory"
        if n.op in REDUCTIONS:
            shape_in = tuple(self.g.node(n.operands[0]).type.shape)
            if k.kind == "reduce":
                if (k.domain, k.keep) != (shape_in, kept_axes(n)):
                    return "F4: the kernel already reduces other axes"
                return None
            if numel(k.domain) not in (numel(shape_in), numel(n.type.shape)):
                return "F4: its users loop over a shape that is neither its input nor its output"
            return None
        size = numel(n.type.shape)
        if size == numel(k.domain) or size == numel(k.row_shape) or n.op in CHEAP:
            return None
        if numel(k.domain) % size == 0 and self.from_reduction(nid):
            return None  # a row value: the reduction it comes from will join and make rows
        return "F2: it has fewer elements than the kernel's loop, so it would be recomputed per element"

    def stray_rows(self) -> set[int]:
        """Row values admitted to kernels that never became their rows' kernels: to
        elementwise ones, or to reduce kernels over other rows, varying along an axis the
        kernel reduces (a layernorm's statistics [B, T, 1] in the kernel of a mean over T,
        keeping [B, F], which the reduction over F cannot join): computed per element."""
        out = set()
        for k in self.kernels.values():
            if k.kind not in ("elementwise", "reduce"):
                continue
            for n in k.nodes:
                node = self.g.node(n)
                if node.op in CHEAP or numel(node.type.shape) in (numel(k.domain), numel(k.row_shape)):
                    continue
                if k.kind == "elementwise" or _varies_along_reduced(k, node.type.shape):
                    out.add(n)
        return out

    def from_reduction(self, nid: int, depth: int = 6) -> bool:
        """Is nid computed (within a few steps) from a reduction?"""
        n = self.g.node(nid)
        if n.op in REDUCTIONS:
            return True
        if depth == 0 or not (n.op.kind is ops.Kind.ELEMENTWISE or n.op in (ops.RESHAPE, ops.BROADCAST)):
            return False
        return any(self.from_reduction(o, depth - 1) for o in n.operands)

    def compatible(self, a: Kernel, b: Kernel) -> bool:
        """Can a and b share one loop nest?"""
        if a.kind not in ("elementwise", "reduce") or b.kind not in ("elementwise", "reduce"):
            return False
        if a.kind == b.kind == "reduce":
            return (a.domain, a.keep) == (b.domain, b.keep)
        if a.kind == b.kind == "elementwise":
            return a.domain == b.domain
        row = a if a.kind == "reduce" else b
        other = b if row is a else a
        return numel(other.domain) in (numel(row.domain), numel(row.row_shape))

    # --- the greedy pass -----------------------------------------------------------------------
    def run(self) -> None:
        g = self.g
        order = g.toposort()
        self.position = {nid: i for i, nid in enumerate(order)}
        for nid in reversed(order):
            op = g.node(nid).op
            if op in (ops.INPUT, ops.SCAN_RESULT) or self.free(nid):
                continue  # (a scan's results are placed with it)
            if op is ops.SCAN:
                k = self.new_kernel(nid)
                k.body = fuse(g.node(nid).attrs["body"], body=True)
                for r in g.users(nid):
                    self.add(k, r)
            elif is_anchor(g, nid):
                self.new_kernel(nid)
            else:
                self.place(nid)
        self.place_epilogues()

    def place(self, nid: int) -> None:
        g = self.g
        users = [u for u in self.free.users(nid) if u in self.group]
        homes = sorted({self.group[u] for u in users})
        if nid in self.free.results and not (self.body and homes):
            # (a loop body's results -- carries, per-step values -- feed the next body
            # values: computed where they are used and stored from there, they save a phase)
            why = "F5: it is a result of the step"
        elif nid in self.stored:
            why = "F2: no reduction made its kernel a row kernel, so it would be recomputed per element"
        elif not homes:
            why = "it has no users"
        elif any(_reads_memory(g, u) for u in users):  # (each reader's edge says so itself, below)
            reader = next(g.node(u).op.name for u in users if _reads_memory(g, u))
            why = f"F5: stored for `{reader}`, which reads its operands from memory"
        elif len(homes) > 1:
            why = self.merge_siblings([self.kernels[h] for h in homes])
            if why is not None and g.node(nid).op in INDEX_MAPS:
                self.free.add(nid)  # each user reads the operand through the index map
                return
            first = self.depended_on([self.kernels[h] for h in homes]) if why is not None else None
            if first is not None and self.fits(first, nid) is None:
                self.add(first, nid)
                for u in users:
                    if self.group[u] != first.id:
                        self.reasons[(nid, u)] = ("F3: its users are in kernels that depend on each other: "
                                                  "computed in the first and stored for the others")
                return
        else:
            why = None
        if why is None:
            k = self.kernels[self.group[users[0]]]
            why = self.fits(k, nid)
            if why is None:
                if g.node(nid).op in REDUCTIONS and k.kind == "elementwise":
                    self.make_row(k, nid)
                self.add(k, nid)
                return
        self.new_kernel(nid)
        for u in users:
            self.reasons[(nid, u)] = f"F5: `{g.node(u).op.name}` reads its operands from memory" \
                if why.startswith("F5: stored for") and _reads_memory(g, u) else why

    def depended_on(self, ks: list[Kernel]) -> Kernel | None:
        """The kernel of ks that all the others read from (directly or not), if any."""
        return next((a for a in ks if all(b is a or self.reaches(b.id, a.id) for b in ks)), None)

    def merge_siblings(self, ks: list[Kernel]) -> str | None:
        """F3: merge the kernels of a node's users if they are alike and independent."""
        for i, a in enumerate(ks):
            for k in ks[i + 1:]:
                if not self.compatible(a, k):
                    return "F3: its users are in kernels over different loops (it would be recomputed)"
        for a in ks:
            for b in ks:
                if a is not b and self.reaches_indirectly(a.id, b.id):
                    return "F3: its users are in kernels that depend on each other through a third"
        if self.stages_differ([k.nodes[0] for k in ks]):
            return F9
        merged = self.merged_depths(ks)  # (one that reads another directly nests below it)
        if max(merged.values()) > MAX_DEPTH:
            return f"F8: merged, its users' kernels' values would nest over {MAX_DEPTH} deep"
        host = next((k for k in ks if k.kind == "reduce"), ks[0])
        for k in ks:
            if k is not host:
                self.merge(host, k)
        self.depth.update(merged)
        return None

    def place_epilogues(self) -> None:
        """F6: an elementwise kernel over a matmul/conv/pool's output shape that reads the
        anchor kernel becomes its epilogue (repeatedly: bias, then activation, ...)."""
        changed = True
        while changed:
            changed = False
            for k in list(self.kernels.values()):
                if k.id in self.kernels and k.anchor is not None and k.kind not in ("gather", "concat", "scan",
                                                                                     "collective"):
                    changed |= self.take_epilogue(k)

    def reads_in_order(self, e: Kernel, readers: list[int], shape: tuple) -> bool:
        """Does elementwise kernel e, over another shape of as many elements, read the anchor's
        output only through reshapes (the element its own iteration writes, in row-major
        order: an epilogue over the output can compute it)? (A layer's x @ w, reshaped to
        [T, B, 4H], plus its bias.)"""
        g = self.g
        if numel(e.domain) != numel(shape):
            return False
        # every value of e computed from the output: elementwise over e's domain, or a
        # reshape on the way (a permute or a slice would read other elements)
        stack, seen = list(readers), set()
        while stack:
            nid = stack.pop()
            if nid in seen:
                continue
            seen.add(nid)
            n = g.node(nid)
            if n.op is not ops.RESHAPE and (n.op.kind is not ops.Kind.ELEMENTWISE
                                            or tuple(n.type.shape) != e.domain):
                return False
            # (users in other kernels read what e stores)
            stack += [w for w in g.users(nid) if self.group.get(w) == e.id or self.free(w)]
        return all(g.node(u).op is ops.RESHAPE for u in readers)

    def reads_each_element_once(self, k: Kernel, e: Kernel) -> bool:
        """Does e read k's values only where its own iteration is: through elementwise ops
        and reshapes (which keep the row-major order)? A permute, slice or broadcast on the
        way reads other elements -- ones another register tile or thread computes, or none
        yet (a dense layer's [B, T, H] output permuted to an LSTM's [T, B, H] read another
        tile's rows: wrong from batch 2 on)."""
        g = self.g
        stack, seen = [u for n in k.nodes for u in g.users(n)], set()
        while stack:  # every value of e computed from k's, up to what e stores
            w = stack.pop()
            if w in seen or (self.group.get(w) != e.id and not self.free(w)):
                continue  # (another kernel reads what e stores)
            seen.add(w)
            if g.node(w).op is not ops.RESHAPE and g.node(w).op.kind is not ops.Kind.ELEMENTWISE:
                return False
            stack += g.users(w)
        return True

    def take_epilogue(self, k: Kernel) -> bool:
        g = self.g
        shape = tuple(g.node(k.anchor).type.shape)
        for e in list(self.kernels.values()):
            if k.id not in self.deps[e.id]:
                continue
            if e.kind != "elementwise":
                for n in k.nodes:
                    for u in self.free.users(n):
                        if self.group.get(u) == e.id:
                            self.reasons.setdefault((n, u), f"F6: a {e.kind} kernel reads it: the "
                                                               f"{k.kind} result is stored for it")
                continue
            reads = [(n, u) for n in k.nodes for u in self.free.users(n) if self.group.get(u) == e.id]
            if any(g.node(n).type.shape != shape for n, _ in reads) or not (
                    e.domain == shape or self.reads_in_order(e, [u for _, u in reads], shape)):
                why = "F6: the consumer is not an elementwise loop over the same shape"
            elif not self.reads_each_element_once(k, e):
                why = "F6: the consumer reads the result through a permute, slice or broadcast (other elements)"
            elif self.reaches_indirectly(e.id, k.id):
                why = "F6: the consumer also reads a kernel that depends on this one"
            elif self.stages_differ([k.nodes[0], e.nodes[0]]):
                why = F9
            elif max((merged := self.merged_depths([k, e])).values()) > MAX_DEPTH:
                why = f"F8: with it as the epilogue, the kernel's values would nest over {MAX_DEPTH} deep"
            else:
                for pair in reads:
                    self.reasons.pop(pair, None)
                self.merge(k, e)
                self.depth.update(merged)
                return True
            for pair in reads:
                self.reasons.setdefault(pair, why)
        return False


F9 = "F9: it depends on other exchanges of the data-parallel step than the kernel"


def _exchange_stages(g: Graph, order: list[int]) -> dict[int, int]:
    """F9: each node's stage, 1 + the last bucket of the exchanges it depends on (0: none);
    empty when the graph exchanges nothing. Bucket numbers follow a topological order of
    the exchanges (passes/data_parallel.py), so stages never fall along an edge and a
    bucket's own allreduces are at most at its stage: kernels of one stage cannot chain
    a later exchange into an earlier one."""
    def bucket(nid: int) -> int:
        n = g.node(nid)
        return n.attrs.get("bucket", -1) if n.op is ops.ALLREDUCE else -1
    if not any(bucket(n) >= 0 for n in order):
        return {}
    stage: dict[int, int] = {}
    for nid in order:
        stage[nid] = max((max(stage[o], bucket(o) + 1) for o in g.operands(nid)), default=0)
    return stage


def _reads_memory(g: Graph, nid: int) -> bool:
    """Does nid read its operands from memory (an anchor other than a concat)?"""
    return is_anchor(g, nid) and anchor_kind(g, nid) != "concat"


def _reaches(deps: dict[int, set[int]], a: int, b: int) -> bool:
    """Does kernel a (transitively) depend on kernel b?"""
    stack, seen = [a], set()
    while stack:
        k = stack.pop()
        if k == b:
            return True
        if k not in seen:
            seen.add(k)
            stack.extend(deps.get(k, ()))
    return False


def _war_deps(f: _Fuser) -> dict[int, set[int]]:
    """Dependencies plus write-after-read edges: the kernel writing a parameter's or state's
    new value runs after every other kernel that reads the old value, so the update can be
    done in place."""
    g = f.g
    deps = {k: set(d) for k, d in f.deps.items()}


    for name, new in g.updates.items():
        writer = f.group.get(new)
        if writer is None:
            continue
        for reader_node in f.free.users(g.input_named(name)):
            reader = f.group.get(reader_node)
            # an edge that would close a cycle is left out: memory planning then sees the
            # other reader in the same or a later phase and copies instead of updating in place
            if reader is not None and reader != writer and not _reaches(deps, reader, writer):
                deps[writer].add(reader)
    return deps


def _phases(kernels: dict[int, Kernel], deps: dict[int, set[int]]) -> None:
    """Each kernel one phase after the latest it depends on (iteratively: chains of kernels
    can be longer than Python's stack)."""
    done: dict[int, int] = {}
    for start in kernels:
        stack = [start]
        while stack:
            kid = stack[-1]
            todo = [d for d in deps[kid] if d not in done]
            if kid in done or not todo:
                done.setdefault(kid, 1 + max((done[d] for d in deps[kid]), default=-1))
                stack.pop()
            else:
                stack.extend(todo)
    for kid, k in kernels.items():
        k.phase = done[kid]


class ExchangeOrderError(ValueError):
    """The kernels cannot run the exchanges in bucket order (F9)."""


def _buckets(f: _Fuser, overlap: bool = False) -> None:
    """The allreduces of one bucket (their `bucket` attribute, set by passes/data_parallel.py)
    become one collective kernel, which runs once the last of them is ready, and bucket b+1
    runs after bucket b: in every rank, whatever its batch size, the same exchanges meet in
    the same order."""
    by_bucket: dict[int, list[Kernel]] = {}
    for k in sorted(f.kernels.values(), key=lambda k: k.id):
        if k.kind == "collective" and f.g.node(k.anchor).attrs.get("bucket", -1) >= 0:
            by_bucket.setdefault(f.g.node(k.anchor).attrs["bucket"], []).append(k)
    previous = None
    for bucket in sorted(by_bucket):
        host, *rest = by_bucket[bucket]
        for k in rest:
            if f.reaches(host.id, k.id) or f.reaches(k.id, host.id):
                raise ExchangeOrderError(f"allreduce bucket {bucket} holds values that depend on each other")
            f.merge(host, k)
        if previous is not None:
            if f.reaches(previous.id, host.id):
                raise ExchangeOrderError(f"allreduce bucket {bucket - 1} depends on bucket {bucket}")
            f.deps[host.id].add(previous.id)
        previous = host
    if overlap and previous is not None:  # every reader of a bucket after the last has started
        hosts = {by_bucket[b][0].id for b in by_bucket}
        for kid, deps in f.deps.items():
            if kid not in hosts and deps & hosts and not f.reaches(previous.id, kid):
                deps.add(previous.id)


def _merge_phases(f: _Fuser) -> list[Kernel]:
    """F7: one loop for independent alike kernels of a phase; one multi-tensor kernel for
    the other elementwise kernels of the phase."""
    by_phase: dict[int, list[Kernel]] = {}
    for k in sorted(f.kernels.values(), key=lambda k: (k.phase, k.id)):
        by_phase.setdefault(k.phase, []).append(k)
    out: list[Kernel] = []
    for phase, ks in sorted(by_phase.items()):
        loops: list[Kernel] = []
        for k in ks:
            host = next((h for h in loops if f.compatible(h, k) and h.kind == k.kind), None)
            if host is not None and k.kind in ("elementwise", "reduce"):
                host.nodes.extend(k.nodes)
            else:
                loops.append(k)
        multi = [k for k in loops if k.kind == "elementwise"]
        scalars = [k for k in multi if k.domain == ()]
        # scalar work rides along with another kernel of the phase (not a loop: its body is
        # a graph of its own, run T times)
        host = next((k for k in loops if k not in scalars and k.kind != "scan"), None)
        if len(multi) == len(scalars) and scalars and host is not None:
            host.parts = (host.parts or [Kernel(host.id, host.kind, list(host.nodes), host.anchor,
                                                host.domain, host.keep)]) + scalars
            host.nodes = host.nodes + [n for k in scalars for n in k.nodes]
            loops = [k for k in loops if k not in scalars]
            multi = []
        if len(multi) > 1:
            host = Kernel(multi[0].id, "elementwise", domain=(), phase=phase, parts=multi)
            host.nodes = [n for k in multi for n in k.nodes]
            loops = [k for k in loops if k.kind != "elementwise"] + [host]
        out.extend(sorted(loops, key=lambda k: _footprint(f.g, k)))
    return out


def _footprint(g: Graph, k: Kernel) -> int:
    """The bytes a kernel reads from memory, to order a phase's independent kernels smallest
    first: one that streams more than the cache holds evicts what the others would find
    there (the MLP at batch 8: its second layer's weight update before the first layer's,
    -15 to -21% per step). Collectives keep their place first: every rank, whatever its batch
    share, must start the same exchanges in the same order."""
    if k.kind == "collective":
        return -1
    inside = set(k.nodes)
    read = {u for n in k.nodes for u in g.operands(n) if u not in inside}
    types = [g.node(u).type for u in read]
    return sum(nbytes(t) for t in types if isinstance(t, TensorType))  # (a scan's tuple: its results)


def _greedy(g: Graph, body: bool, stages: bool = False) -> _Fuser:
    stored: frozenset = frozenset()
    while True:  # a second round stores what the first would recompute per element
        f = _Fuser(g, stored, body, stages)
        f.run()
        stray = f.stray_rows() - stored
        if not stray:
            return f
        stored |= stray


def fuse(graph: Graph, ctx=None, overlap: bool = False, body: bool = False) -> Graph:
    """Annotate a copy of the graph with its FusionPlan in graph.meta["fusion"]. With
    `overlap`, the readers of every exchange's sums run after the last exchange has started,
    so each exchange travels while the backward pass goes on (schedule.py waits for it only
    before its first reader). `body`: a loop body (its results are stored by their users)."""
    g = graph.copy()
    f = _greedy(g, body)
    try:
        _buckets(f, overlap)
    except ExchangeOrderError:  # F9: again, kernels within one stage
        f = _greedy(g, body, stages=True)
        _buckets(f, overlap)
    _phases(f.kernels, _war_deps(f))
    kernels = _merge_phases(f)
    order = {n: i for i, n in enumerate(g.toposort())}
    group_of = {}
    for new_id, k in enumerate(kernels):
        k.id = new_id
        for part in [k] + k.parts:
            part.nodes.sort(key=order.__getitem__)
        for n in k.nodes:
            group_of[n] = new_id
    # (a scan's values are its results: every one in memory, where the loop leaves it)
    materialized = set(g.roots()) | {n for n in group_of if is_anchor(g, n) and g.node(n).op is not ops.SCAN}
    materialized |= {n for n in group_of if g.node(n).op is ops.SCAN_RESULT}
    for n, kid in group_of.items():
        if g.node(n).op is not ops.SCAN and any(group_of.get(u) != kid or _reads_memory(g, u) for u in f.free.users(n)):
            materialized.add(n)
    for k in kernels:
        k.outputs = [n for n in k.nodes if n in materialized]
        for part in k.parts:
            part.outputs = [n for n in part.nodes if n in materialized]
    g.meta["fusion"] = FusionPlan(kernels, group_of, materialized, f.reasons, overlap, f.free)
    return g
