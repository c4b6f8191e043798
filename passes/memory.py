"""plan_memory: where every stored value lives during a step.

Inputs, parameters and state keep their own arrays. A new value of a parameter or
state is written over the old one (in place) when the kernel that computes it is the
last reader of the old value and reads it element for element (fuse orders kernels so
that other readers run in earlier phases). Every other stored value gets an offset in
one working arena: values whose lifetimes (first to last phase using them) overlap get
disjoint bytes, and the rest share -- placed largest first at the lowest free offset.
The plan reports the arena's size against one buffer per node, the naive layout.

Loops (passes/loops.py). A scan's body is planned on its own, with its temporaries in a
region of the arena live only in the loop's phase (every iteration reuses it) and its
results left to the loop: each carry has storage of its own (T + 1 or 2 slots) from the
phase that computes its initial value (straight into its first slot) until its last
reader; the scan's results are windows of that storage (the final carry, a stacked
carry) or buffers of their own (other stacked outputs, written at [t] by each step).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dlc.core import ops
from dlc.core.graph import Graph
from dlc.core.ops.scan import signature
from dlc.core.types import nbytes
from dlc.passes.loops import Layout, layout

ALIGN = 64


@dataclass
class Buffer:
    node: int
    size: int
    start: int           # first phase that writes it
    end: int             # last phase that reads it
    offset: int = -1     # in the arena; -1 for in-place updates
    inplace: str | None = None  # the parameter/state whose array it overwrites


@dataclass
class LoopPlan:
    """A scan's memory: its body fused and planned (the body's arena offsets count from
    `offset`) and the offset of each carry's storage."""

    body: Graph
    layout: Layout
    offset: int
    storage: list[int]


@dataclass
class MemoryPlan:
    buffers: dict[int, Buffer] = field(default_factory=dict)
    arena_bytes: int = 0
    naive_bytes: int = 0      # one buffer per node, no reuse
    inplace: dict[str, int] = field(default_factory=dict)  # state name -> node
    loops: dict[int, LoopPlan] = field(default_factory=dict)  # scan node -> its plan

    @property
    def saving(self) -> float:
        return 1.0 - self.arena_bytes / self.naive_bytes if self.naive_bytes else 0.0

    def describe(self, g: Graph) -> str:
        from dlc.core.printer import node_names
        names = node_names(g)
        lines = [f"memory: working arena {self.arena_bytes:,} bytes (one buffer per node: "
                 f"{self.naive_bytes:,} bytes, {self.saving:.0%} less); "
                 f"{len(self.inplace)} values updated in place"]
        for b in sorted(self.buffers.values(), key=lambda b: (b.inplace is not None, b.offset, b.node)):
            where = f"in place of %{b.inplace}" if b.inplace else f"offset {b.offset:>9,}"
            lines.append(f"  {names[b.node]:>6} {b.size:>10,} bytes  {where}  phases {b.start}-{b.end}")
        for nid, lp in self.loops.items():
            slots = ", ".join(f"c{i} {s.slots} slots at {off:,}" for i, (s, off) in
                              enumerate(zip(lp.layout.storage, lp.storage)))
            lines.append(f"  loop {names[nid]}: body region {lp.body.meta['memory'].arena_bytes:,} bytes at "
                         f"{lp.offset:,}; carries {slots or 'none'}")
        return "\n".join(lines)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _inplace_ok(g: Graph, plan, name: str, node: int, phase_of: dict[int, int]) -> bool:
    """Every other kernel reading the old value runs in an earlier phase, and the writing
    kernel reads it only element for element (through elementwise ops of its shape)."""
    old = g.input_named(name)
    kernel = plan.group_of.get(node)
    if kernel is None or g.node(node).type != g.node(old).type:
        return False
    shape = g.node(old).type.shape
    stack = [(u, True) for u in g.users(old)]
    seen = set()
    while stack:
        u, aligned = stack.pop()
        if (u, aligned) in seen:
            continue
        seen.add((u, aligned))
        n = g.node(u)
        aligned = aligned and n.op.kind is ops.Kind.ELEMENTWISE and n.type.shape == shape
        home = plan.group_of.get(u)
        if home is None:  # recomputed where it is used: follow it
            stack.extend((w, aligned) for w in g.users(u))
        elif home == kernel:
            if not aligned:
                return False
        elif phase_of[home] >= phase_of[kernel]:
            return False
    return True


def plan_memory(graph: Graph, ctx=None, given: frozenset = frozenset()) -> Graph:
    """given: nodes whose memory the caller provides (a loop body's results)."""
    g = graph.copy()
    plan = g.meta["fusion"]
    phase_of = {k.id: k.phase for k in plan.kernels}
    last = plan.phases
    mem = MemoryPlan()
    results = set(g.outputs.values())
    updates = {v: k for k, v in g.updates.items()}
    windows = _loop_windows(g, plan)
    for nid in plan.materialized:
        n = g.node(nid)
        if n.op is ops.INPUT or nid in given:
            continue
        start = phase_of[plan.group_of[nid]]
        readers = [plan.group_of[u] for u in _readers(g, plan, nid)]
        end = max([phase_of[k] for k in readers] + [start])
        if nid in results:
            end = last  # read by the caller after the step
        buf = Buffer(nid, nbytes(n.type), start, end)
        name = updates.get(nid)
        if name is not None and nid not in results and nid not in windows and _inplace_ok(g, plan, name, nid,
                                                                                           phase_of):
            buf.inplace = name
            mem.inplace[name] = nid
        elif name is not None:
            buf.end = last  # copied into the state array after the step
        mem.buffers[nid] = buf
    loops = _plan_loops(g, plan, mem, phase_of, windows)
    _assign_offsets([b for b in mem.buffers.values() if b.inplace is None and b.node not in windows]
                    + [b for _, _, _, region, storage in loops for b in [region, *storage]], mem)
    for nid, (storage, at) in windows.items():
        mem.buffers[nid].offset = storage.offset + at
    for s, body, lay, region, storage in loops:
        mem.loops[s] = LoopPlan(body, lay, region.offset, [b.offset for b in storage])
    mem.naive_bytes = sum(_align(nbytes(g.node(n).type)) for n in g.ids()
                          if g.node(n).op not in (ops.INPUT, ops.SCAN))
    g.meta["memory"] = mem
    return g


def _loop_windows(g: Graph, plan) -> dict[int, tuple]:
    """Nodes whose value lives in a loop's carry storage: the initial carries and the scan
    results that are windows of it; each -> None until `_plan_loops` places it."""
    out: dict[int, tuple] = {}
    for k in plan.kernels:
        if k.kind == "scan":
            node = g.node(k.anchor)
            lay, carries = layout(node), node.attrs["carries"]
            out.update({o: None for o in node.operands[:carries]})
            for r in g.users(k.anchor):
                i = g.node(r).attrs["index"]
                if i < carries or lay.windows[i - carries] is not None:
                    out[r] = None
    return out


def _plan_loops(g: Graph, plan, mem: MemoryPlan, phase_of, windows: dict) -> list[tuple]:
    """(scan, its body planned, its layout, the buffer of its body region, of each carry's
    storage) per scan, offsets still to assign; `windows` gets each window's (storage
    buffer, byte offset in it)."""
    loops = []
    for k in plan.kernels:
        if k.kind != "scan":
            continue
        s, phase = k.anchor, phase_of[k.id]
        node = g.node(s)
        lay, carries = layout(node), node.attrs["carries"]
        # the body stores its new carries and the stacked outputs someone reads in the loop's memory
        sig = signature(k.body, carries, node.attrs["seqs"])
        read = {g.node(r).attrs["index"] - carries for r in g.users(s)}
        body = plan_memory(k.body, given=frozenset(sig.new_carries) | {
            y for m, y in enumerate(sig.outputs) if m in read and lay.windows[m] is None})
        region = Buffer(s, body.meta["memory"].arena_bytes, phase, phase)
        storage = []
        for i, st in enumerate(lay.storage):
            init = node.operands[i]
            slot = nbytes(g.node(init).type)
            buf = Buffer(s, slot * st.slots, mem.buffers[init].start, phase)
            storage.append(buf)
            windows[init] = (buf, st.first() * slot)
        for r in g.users(s):
            i = g.node(r).attrs["index"]
            if i < carries:
                carry, at = i, lay.storage[i].last()
            elif lay.windows[i - carries] is not None:
                carry, after = lay.windows[i - carries]
                at = lay.storage[carry].window(after)
            else:
                continue
            windows[r] = (storage[carry], at * nbytes(g.node(node.operands[carry]).type))
        for nid in [*node.operands[:carries], *g.users(s)]:
            if nid in windows:  # the storage lives as long as any value in it
                storage_buf = windows[nid][0]
                storage_buf.start = min(storage_buf.start, mem.buffers[nid].start)
                storage_buf.end = max(storage_buf.end, mem.buffers[nid].end)
        loops.append((s, body, lay, region, storage))
    return loops


def _readers(g: Graph, plan, nid: int) -> list[int]:
    """Nodes in other kernels that load nid (looking through recomputed nodes)."""
    out, stack, seen = [], list(g.users(nid)), set()
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        if u in plan.group_of:
            out.append(u)
        else:
            stack.extend(g.users(u))
    return out


def _assign_offsets(buffers: list[Buffer], mem: MemoryPlan) -> None:
    """Largest first, each at the lowest offset clear of every placed buffer it overlaps
    in time (the greedy used by TFLite's and XLA's arena planners)."""
    placed: list[Buffer] = []
    for b in sorted(buffers, key=lambda b: (-b.size, b.start, b.node)):
        live = sorted((p for p in placed if p.start <= b.end and b.start <= p.end), key=lambda p: p.offset)
        offset = 0
        for p in live:
            if offset + _align(b.size) <= p.offset:
                break
            offset = max(offset, p.offset + _align(p.size))
        b.offset = offset
        placed.append(b)
        mem.arena_bytes = max(mem.arena_bytes, offset + _align(b.size))
