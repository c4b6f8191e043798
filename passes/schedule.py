"""schedule: lower a fused, memory-planned graph to the kernel IR (dlc/kernel.py).

Every node inside a kernel becomes a scalar expression evaluated at an index of the
kernel's loop domain; movement ops (broadcast, reshape, permute, slice, pad, concat)
only transform the index, and reductions become loops inside the expression. Values
stored by other kernels (and inputs, parameters, state) are loads from their buffers.
Row kernels loop over their kept axes outside (shared between threads) and the other
axes inside; values depending only on the kept axes are computed once per row.

A scan becomes a Loop (passes/loops.py, passes/memory.py): its body's kernels, lowered
like any graph's, over views bound at each step t -- the carry entering the step and
the one leaving it (slots of the carry's storage), the sequences' slices xs[t] and the
stacked outputs' y[t] -- while invariants are read where they are.
"""
from __future__ import annotations

from dataclasses import replace

from dlc.core import ops
from dlc.core.graph import Graph
from dlc.core.kernel import (INT_MAX, Buffer, Collective, Exprs, Kernel, KernelProgram, Loop, LoopNest, Store,
                             Template)
from dlc.core.ops.scan import signature
from dlc.core.types import DType, numel
from dlc.passes.fuse import is_anchor

# parts with fewer elements than this run on one thread: splitting would cost more
SERIAL_BELOW = 2048

# graph op -> scalar op of the kernel IR (elementwise ops map one to one)
SCALAR = {
    ops.NEG: "neg", ops.EXP: "exp", ops.LOG: "log", ops.SQRT: "sqrt", ops.TANH: "tanh",
    ops.SIGMOID: "sigmoid", ops.ABS: "abs", ops.SIGN: "sign", ops.STOP_GRADIENT: "copy",
    ops.ADD: "add", ops.SUB: "sub", ops.MUL: "mul", ops.DIV: "div", ops.POW: "pow",
    ops.MAX: "max", ops.MIN: "min", ops.LT: "lt", ops.LE: "le", ops.GT: "gt", ops.GE: "ge",
    ops.EQ: "eq", ops.NE: "ne", ops.AND: "and", ops.WHERE: "select", ops.CAST: "cast",
}
TEMPLATES = {ops.MATMUL: "matmul", ops.BATCH_MATMUL: "batch_matmul", ops.CONV2D: "conv2d",
             ops.CONV2D_BWD_DATA: "conv2d_bwd_data",
             ops.CONV2D_BWD_FILTER: "conv2d_bwd_filter", ops.POOL2D: "pool2d",
             ops.POOL2D_BWD: "pool2d_bwd", ops.TAKE: "take", ops.SCATTER_ADD: "scatter_add",
             ops.REDUCE_SUM: "colsum"}


class ScheduleError(Exception):
    """The graph contains something the kernel IR cannot express (a compiler bug)."""


class _Lowering:
    """Lowers one graph: the step's, or a loop body's (`parent` the enclosing graph's
    lowering, `given` the buffers of the body's inputs and results, `base` the byte
    offset of the body's arena region, `prefix` before its kernels' and buffers' names)."""

    def __init__(self, g: Graph, parent: "_Lowering | None" = None, given: dict | None = None,
                 base: int = 0, prefix: str = ""):
        self.g = g
        self.plan = g.meta["fusion"]
        self.mem = g.meta["memory"]
        self.root = parent.root if parent else self
        self.x = parent.x if parent else Exprs()
        self.by_name: dict[str, Buffer] = parent.by_name if parent else {}  # every buffer of the program
        self.buffers: dict[int, Buffer] = dict(given or {})
        self.base, self.prefix = base, prefix
        self._uid = 0
        self._memo: dict = {}
        self.buckets = 1 + max((self.g.node(n).attrs.get("bucket", -1) for n in self.g.ids()
                                if self.g.node(n).op is ops.ALLREDUCE), default=-1)
        self._make_buffers()

    # --- buffers ----------------------------------------------------------------------------
    def _register(self, nid: int, buf: Buffer) -> None:
        self.buffers[nid] = buf
        self.by_name.setdefault(buf.name, buf)

    def _make_buffers(self) -> None:
        g = self.g
        for buf in self.buffers.values():
            self.by_name.setdefault(buf.name, buf)
        for nid in g.inputs():
            if nid in self.buffers:
                continue
            a = g.node(nid).attrs
            kind = "state" if a["role"] in ("param", "state") else "input"
            self._register(nid, Buffer(a["name"], a["type"].dtype, tuple(a["type"].shape), kind))
        for nid, b in self.mem.buffers.items():
            t = g.node(nid).type
            if b.inplace is not None:
                self._register(nid, self.by_name[b.inplace])
            else:
                self._register(nid, Buffer(f"{self.prefix}t{nid}", t.dtype, tuple(t.shape), "arena",
                                           self.base + b.offset))

    def buffer_of(self, nid: int) -> Buffer:
        """The memory holding nid's value; reshapes of stored values share their memory."""
        n = self.g.node(nid)
        if nid in self.buffers:
            return self.buffers[nid]
        if n.op is ops.RESHAPE:
            return replace(self.buffer_of(n.operands[0]), shape=tuple(n.type.shape))
        raise ScheduleError(f"node {nid} ({n.op.name}) has no buffer")

    # --- expressions --------------------------------------------------------------------------
    def fresh(self, extent: int, prefix: str = "r") -> object:
        self.root._uid += 1  # one numbering for the whole program: loop variables stay distinct
        return self.x.var(f"{prefix}{self.root._uid}", extent)

    def expr(self, nid: int, index: tuple, kernel: int):
        key = (nid, tuple(id(i) for i in index), kernel)
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = self._expr(nid, index, kernel)
        return hit

    def _loads_from_memory(self, nid: int, kernel: int) -> bool:
        n = self.g.node(nid)
        if n.op is ops.INPUT:
            return True
        home = self.plan.group_of.get(nid)
        if is_anchor(self.g, nid):
            return True  # computed by the template, read by the epilogue
        return nid in self.plan.materialized and home != kernel

    def _expr(self, nid: int, index: tuple, kernel: int):
        g, x = self.g, self.x
        n = g.node(nid)
        t = n.type
        if self._loads_from_memory(nid, kernel):
            return x.load(self.buffer_of(nid), x.ravel(index, t.shape))
        a = n.attrs
        if n.op is ops.CONST:
            value = a["value"]
            if value.ndim == 0:
                return x.lit(value.item(), t.dtype)
            raise ScheduleError("array constants must be folded into kernels' inputs")
        if n.op is ops.IOTA:
            return x.index(index[a["axis"]], t.dtype)
        if n.op in SCALAR:
            args = [self.expr(o, index, kernel) for o in n.operands]
            if n.op is ops.CAST:
                return x.op("cast", args, a["dtype"])
            return x.op(SCALAR[n.op], args, t.dtype)
        src = n.operands[0] if n.operands else None
        src_t = g.node(src).type if src is not None else None
        if n.op is ops.BROADCAST:
            inner = tuple(x.const(0) if d == 1 else index[ax] for d, ax in zip(src_t.shape, a["axes"]))
            return self.expr(src, inner, kernel)
        if n.op is ops.RESHAPE:
            return self.expr(src, x.unravel(x.ravel(index, t.shape), src_t.shape), kernel)
        if n.op is ops.PERMUTE:
            inner = [None] * len(index)
            for i, p in enumerate(a["perm"]):
                inner[p] = index[i]
            return self.expr(src, tuple(inner), kernel)
        if n.op is ops.SLICE:
            inner = tuple(x.add(x.const(s), x.mul(i, st)) for i, s, st in zip(index, a["starts"], a["steps"]))
            return self.expr(src, inner, kernel)
        if n.op is ops.PAD:
            return self._pad(n, index, kernel)
        if n.op is ops.RANDOM:
            seed, step = (self.expr(o, (), kernel) for o in n.operands[:2])
            flat = x.ravel(index, t.shape)
            axis = a.get("axis") or 0
            if len(n.operands) > 2 and axis == 0:  # numbered from the global index of the first row
                first = x.data_index(self.expr(n.operands[2], (), kernel), 0, INT_MAX)
                flat = x.add(x.mul(first, numel(t.shape[1:])), flat)
            elif len(n.operands) > 2:  # a slice along another axis: its length is data, so is the index
                first, total = (self.expr(o, (), kernel) for o in n.operands[2:4])
                i32 = DType.i32
                flat_ex = None
                for k, (i, d) in enumerate(zip(index, t.shape)):
                    at = x.index(i, i32)
                    if k == axis:
                        at = x.op("add", [first, at], i32)
                    if flat_ex is not None:  # i32 arithmetic wraps: the index modulo 2**32, as the op says
                        at = x.op("add", [x.op("mul", [flat_ex, total if k == axis else x.lit(d, i32)], i32), at], i32)
                    flat_ex = at
                flat = x.data_index(flat_ex)
            return x.rand(seed, step, a["stream"], flat)
        if n.op in (ops.REDUCE_SUM, ops.REDUCE_MAX, ops.ARGMAX):
            axes = a["axes"] if "axes" in a else (a["axis"],)
            vars_ = {ax: self.fresh(src_t.shape[ax]) for ax in axes}
            kept = iter(index)
            inner = tuple(vars_[i] if i in vars_ else next(kept) for i in range(src_t.rank))
            body = self.expr(src, inner, kernel)
            op = {ops.REDUCE_SUM: "sum", ops.REDUCE_MAX: "max", ops.ARGMAX: "argmax"}[n.op]
            return x.reduce(op, tuple(vars_[ax] for ax in axes), body, t.dtype)
        raise ScheduleError(f"cannot lower `{n.op.name}` inside a loop kernel")

    def _pad(self, n, index, kernel):
        x = self.x
        src = n.operands[0]
        shape = self.g.node(src).type.shape
        inner, conds = [], []
        for i, d, lo, hi, it in zip(index, shape, n.attrs["lo"], n.attrs["hi"], n.attrs["interior"]):
            inner.append(x.shift(i, lo, it + 1, d))
            if lo or hi or it:
                iv = x.index(i, DType.i32)
                conds.append(x.op("ge", [iv, x.lit(lo, DType.i32)], DType.bool))
                conds.append(x.op("lt", [iv, x.lit(lo + (d - 1) * (it + 1) + 1, DType.i32)], DType.bool))
                if it:
                    ok = x.mod(x.add(i, x.const((it + 1) * (lo // (it + 1) + 1) - lo)), it + 1)
                    conds.append(x.op("eq", [x.index(ok, DType.i32), x.lit(0, DType.i32)], DType.bool))
        value = self.expr(src, tuple(inner), kernel)
        for c in conds:
            value = x.op("select", [c, value, x.lit(n.attrs.get("value", 0.0), n.type.dtype)], n.type.dtype)
        return value

    # --- kernels ------------------------------------------------------------------------------
    def loop_nest(self, kernel_id: int, domain: tuple, keep, outputs: list[int]) -> list[LoopNest]:
        """One LoopNest over `domain` (rows over `keep`) storing `outputs`."""
        x = self.x
        rank = len(domain)
        if keep is None:  # elementwise: the last axis inside, the rest shared out (a vector: itself)
            keep = tuple(range(rank - 1)) if rank > 1 else tuple(range(rank))
        vars_ = [self.fresh(d) for d in domain]
        outer = tuple(vars_[i] for i in keep)
        inner = tuple(v for i, v in enumerate(vars_) if i not in keep)
        row_shape = tuple(domain[i] for i in keep)
        full_flat = x.ravel(vars_, domain)
        row_flat = x.ravel(outer, row_shape)
        nest = LoopNest(outer, inner)
        extra = []
        for nid in outputs:
            t = self.g.node(nid).type
            size = numel(t.shape)
            if size == numel(domain):
                index = x.unravel(full_flat, t.shape)
                nest.stores.append(Store(self.buffer_of(nid), x.ravel(index, t.shape),
                                         self.expr(nid, index, kernel_id)))
            elif size == numel(row_shape):
                index = x.unravel(row_flat, t.shape)
                nest.row_stores.append(Store(self.buffer_of(nid), x.ravel(index, t.shape),
                                             self.expr(nid, index, kernel_id)))
            else:  # a stored value of another size: a loop of its own
                extra += self.loop_nest(kernel_id, tuple(t.shape), None, [nid])
        nest.serial = numel(domain) < SERIAL_BELOW
        if not nest.stores and not nest.row_stores:
            return extra
        return [nest] + extra

    def concat_nests(self, kid: int, part) -> list[LoopNest]:
        """A concat stored piece by piece: each operand copied into its slice. The kernel's
        other outputs (values its pieces compute that later kernels read) are stored by the
        loop of the first piece that computes them over its own elements, else by a loop of
        their own."""
        x = self.x
        nid = part.anchor
        n = self.g.node(nid)
        axis, out = n.attrs["axis"], self.buffer_of(nid)
        others = [o for o in part.outputs if o != nid]
        nests, offset = [], 0
        for o in n.operands:
            shape = tuple(self.g.node(o).type.shape)
            vars_ = [self.fresh(d) for d in shape]
            at = tuple(x.add(v, x.const(offset)) if i == axis else v for i, v in enumerate(vars_))
            split = len(shape) - 1 if len(shape) > 1 else len(shape)
            nest = LoopNest(tuple(vars_[:split]), tuple(vars_[split:]))
            nest.stores.append(Store(out, x.ravel(at, n.type.shape), self.expr(o, tuple(vars_), kid)))
            computed = self._computed_by(o, kid)
            for s in [s for s in others if s in computed and tuple(self.g.node(s).type.shape) == shape]:
                # (its elements one per iteration; shared with the piece's expression where
                # the index is the same, which it is unless a permute lies between them)
                nest.stores.append(Store(self.buffer_of(s), x.ravel(vars_, shape), self.expr(s, tuple(vars_), kid)))
                others.remove(s)
            nest.serial = numel(shape) < SERIAL_BELOW
            nests.append(nest)
            offset += shape[axis]
        for s in others:
            nests += self.loop_nest(kid, tuple(self.g.node(s).type.shape), None, [s])
        return nests

    def _computed_by(self, nid: int, kid: int) -> set[int]:
        """The nodes of kernel kid that the expression of nid computes (not loads)."""
        seen, todo = set(), [nid]
        while todo:
            m = todo.pop()
            if m in seen or self._loads_from_memory(m, kid) or self.plan.group_of.get(m) != kid:
                continue
            seen.add(m)
            todo += self.g.node(m).operands
        return seen

    def template(self, kid: int, k) -> Template:
        g = self.g
        a = k.anchor
        n = g.node(a)
        inputs = tuple(self.buffer_of(o) for o in n.operands)
        attrs = dict(n.attrs)
        others = [o for o in k.outputs if o != a]
        epilogue = None
        if others:
            nests = self.loop_nest(kid, tuple(n.type.shape), None, others)
            if len(nests) != 1 or nests[0].row_stores:
                raise ScheduleError("an epilogue must be one loop over the template's output")
            epilogue = nests[0]
        return Template(TEMPLATES[n.op], inputs, self.buffer_of(a), attrs, epilogue)

    def loop(self, k) -> Loop:
        """A scan's Loop: its body lowered over views bound at each step."""
        if k.parts or any(self.g.node(n).op not in (ops.SCAN, ops.SCAN_RESULT) for n in k.nodes):
            raise ScheduleError(f"scan kernel k{k.id} holds other work: it would be lost")
        g, x = self.g, self.x
        s = k.anchor
        node = g.node(s)
        a = node.attrs
        lp = self.mem.loops[s]
        body, carries = lp.body, a["carries"]
        sig = signature(body, carries, a["seqs"])
        name = f"{self.prefix}k{k.id}"
        t = self.fresh(a["length"], "t")
        given, views = {}, []

        def view(label: str, of: Buffer, shape, at) -> Buffer:
            v = Buffer(f"{name}.{label}", of.dtype, tuple(shape), "view", base=of,
                       at=x.mul(at, numel(shape)))
            views.append(v)
            return v

        for i, st in enumerate(lp.layout.storage):
            c = body.node(sig.carries[i]).type
            storage = Buffer(f"{name}.c{i}", c.dtype, (st.slots,) + tuple(c.shape), "arena",
                             self.base + lp.storage[i])
            self.by_name.setdefault(storage.name, storage)
            given[sig.carries[i]] = view(f"c{i}.in", storage, c.shape, st.entering(x, t))
            given[sig.new_carries[i]] = view(f"c{i}.out", storage, c.shape, st.leaving(x, t))
        for j, (nid, seq) in enumerate(zip(sig.seqs, node.operands[carries:carries + a["seqs"]])):
            given[nid] = view(f"x{j}", self.buffer_of(seq), body.node(nid).type.shape, t)
        for nid, w in zip(sig.invariants, node.operands[carries + a["seqs"]:]):
            given[nid] = self.buffer_of(w)
        stacked = {g.node(r).attrs["index"] - carries: r for r in g.users(s)}
        for m, (nid, window) in enumerate(zip(sig.outputs, lp.layout.windows)):
            if window is None and m in stacked:  # (unread: kept in the body's region)
                given[nid] = view(f"y{m}", self.buffer_of(stacked[m]), body.node(nid).type.shape, t)
        sub = _Lowering(body, self, given, self.base + lp.offset, name + ".")
        kernels = [sub.kernel(bk) for bk in sub.plan.kernels]
        return Loop(f"{name}_loop", k.phase, t, bool(a["reverse"]), kernels, tuple(views), self._lines(k))

    def _lines(self, k) -> tuple:
        g = self.g
        return tuple(sorted({g.node(n).span.short.rsplit(":", 1)[0] for n in k.nodes if g.node(n).span}))

    def collective(self, k) -> Collective:
        """The allreduces of one kernel: one exchange, run by the host between phases; its
        number and the order of its buffers come from the graph (`bucket`, `part`), the
        same in every rank. (Unnumbered ones, in a job of one process: in program order.)"""
        nodes = sorted(k.nodes, key=lambda n: self.g.node(n).attrs.get("part", 0))
        sources = tuple(self.buffer_of(self.g.node(n).operands[0]) for n in nodes)
        targets = tuple(self.buffer_of(n) for n in nodes)
        number = self.g.node(nodes[0]).attrs.get("bucket", -1)
        if number < 0:
            number = self.buckets
            self.buckets += 1
        return Collective("allreduce", sources, targets, number)

    def kernel(self, k) -> Kernel | Loop:
        if k.kind == "scan":
            return self.loop(k)
        parts: list = []
        for part in (k.parts or [k]):
            if part.kind in ("elementwise", "reduce"):
                parts += self.loop_nest(k.id, tuple(part.domain), part.keep, part.outputs)
            elif part.kind == "concat":
                parts += self.concat_nests(k.id, part)
            elif part.kind == "collective":
                parts.append(self.collective(part))
            else:
                parts.append(self.template(k.id, part))
        return Kernel(f"{self.prefix}k{k.id}_{k.kind}", k.phase, parts, self._lines(k))


def schedule(graph: Graph) -> KernelProgram:
    """The kernel program of a fused, memory-planned graph. When fusion planned exchanges to
    overlap (FusionPlan.overlap), each is started where its bucket is ready and waited for
    only at the end of the phase before its first reader, so the phases between run while
    it travels."""
    low = _Lowering(graph)
    g = graph
    kernels = [low.kernel(k) for k in low.plan.kernels]
    if low.plan.overlap:
        kernels = _overlap(low, kernels)
    outputs = {name: low.buffer_of(nid) for name, nid in g.outputs.items()}
    copies = []
    for name, nid in g.updates.items():
        dst = low.by_name[name]
        src = low.buffer_of(nid)
        if src is not dst:
            copies.append((src, dst))
    inputs = {b.name: b for nid, b in low.buffers.items() if g.node(nid).op is ops.INPUT and b.kind == "input"}
    state = {b.name: b for nid, b in low.buffers.items() if g.node(nid).op is ops.INPUT and b.kind == "state"}
    return KernelProgram(kernels, dict(low.by_name), low.mem.arena_bytes, outputs, copies, inputs, state)


def _overlap(low: _Lowering, kernels: list[Kernel]) -> list[Kernel]:
    """Split each sync Collective into a start (in its phase) and a wait (at the end of the
    phase before the first kernel reading its targets), when phases lie between."""
    from dlc.passes.memory import _readers
    plan = low.plan
    phase_of = {k.id: k.phase for k in plan.kernels}
    waits = []
    for fk, k in zip(plan.kernels, kernels):
        if fk.kind != "collective":
            continue
        part = k.parts[0]
        readers = [phase_of[plan.group_of[u]] for n in fk.nodes for u in _readers(low.g, plan, n)]
        wait = min(readers, default=plan.phases) - 1
        if wait > k.phase:
            k.parts = [replace(part, mode="start")]
            waits.append(Kernel(f"{k.name}_wait", wait, [replace(part, mode="wait")], k.lines))
    return sorted(kernels + waits, key=lambda k: (k.phase, k.name.endswith("_wait")))
