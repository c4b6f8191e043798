"""What every backend asks of a kernel: the loop variables an expression depends on, the
buffers a part touches, and a check of the contract in the kernel IR's docstring."""
from __future__ import annotations

from dlc.core.kernel.ir import (COLLECTIVE_MODES, Buffer, Clamp, Collective, Gather, Ix, Kernel, KernelProgram,
                                Index, Lit, Load, Loop, LoopNest, Op, Reduce, Template, Var, ex_children, ix_children)


class FreeVars:
    """Loop variables (by name) that expressions depend on, memoized by identity."""

    def __init__(self):
        self._memo: dict[int, frozenset] = {}

    def ix(self, e: Ix) -> frozenset:
        hit = self._memo.get(id(e))
        if hit is None:
            if isinstance(e, Var):
                hit = frozenset([e.name])
            elif isinstance(e, Gather):
                hit = self.ex(e.value)
            else:
                hit = frozenset().union(*(self.ix(c) for c in ix_children(e)))
            self._memo[id(e)] = hit
        return hit

    def ex(self, e) -> frozenset:
        hit = self._memo.get(id(e))
        if hit is None:
            hit = frozenset().union(*(self.ex(c) for c in ex_children(e)), *(self.ix(i) for i in _indices(e)))
            if isinstance(e, Reduce):
                hit = hit - {v.name for v in e.vars}
            self._memo[id(e)] = hit
        return hit

    __call__ = ex


def _indices(e) -> tuple:
    """Index expressions an Ex reads directly."""
    from dlc.core.kernel.ir import Index, Rand
    if isinstance(e, Load):
        return (e.index,)
    if isinstance(e, Index):
        return (e.ix,)
    if isinstance(e, Rand):
        return (e.flat,)
    return ()


def hoistable(e, bound: frozenset, free_vars, is_cached, seen: set):
    """The largest parts of e that depend only on `bound` loop variables and cost more than
    a constant: what a renderer computes once, outside the loops over the other variables.
    A generator: the caller computes each part before the next is looked for, so a part
    already computed (`is_cached`) is not descended into again. `seen` spans calls, so each
    shared subexpression is visited once (a DAG can have exponentially many paths)."""
    if isinstance(e, Lit) or id(e) in seen or is_cached(e):
        return
    seen.add(id(e))
    if free_vars(e) <= bound and not isinstance(e, Index):
        yield e
    elif isinstance(e, Op):
        for x in e.args:
            yield from hoistable(x, bound, free_vars, is_cached, seen)


def walk_ex(roots):
    """Every distinct scalar expression reachable from `roots` (and inside Gather indices),
    children before parents."""
    seen: set[int] = set()
    order = []

    def visit_ix(i: Ix):
        if isinstance(i, Gather):
            visit(i.value)
        for c in ix_children(i):
            visit_ix(c)

    def visit(e):
        if id(e) in seen:
            return
        seen.add(id(e))
        for c in ex_children(e):
            visit(c)
        for i in _indices(e):
            visit_ix(i)
        order.append(e)
    for r in roots:
        visit(r)
    return order


def nests_of(part) -> list[LoopNest]:
    if isinstance(part, LoopNest):
        return [part]
    if isinstance(part, Collective):
        return []
    return [part.epilogue] if part.epilogue else []


def collectives_of(program: KernelProgram) -> dict[int, list[Collective]]:
    """bucket -> its Collective parts (a sync part, or a start and a wait), in program order."""
    out: dict[int, list[Collective]] = {}
    for k in program.kernels:  # (never inside a loop: check_program)
        for part in ([] if isinstance(k, Loop) else k.parts):
            if isinstance(part, Collective):
                out.setdefault(part.bucket, []).append(part)
    return out


def written_by(part) -> list[Buffer]:
    """The buffers a kernel part stores into."""
    if isinstance(part, Collective):
        return list(part.targets)
    out = [part.output] if isinstance(part, Template) else []
    return out + [s.buf for nest in nests_of(part) for s in nest.row_stores + nest.stores]


def _root(buf: Buffer) -> Buffer:
    while buf.kind == "view" and buf.base is not None:
        buf = buf.base
    return buf


def buffers_of(part) -> list[Buffer]:
    """Every buffer a kernel part reads or writes, in a stable order."""
    seen: dict[str, Buffer] = {}
    if isinstance(part, Collective):
        for buf in part.sources + part.targets:
            seen.setdefault(buf.name, buf)
    if isinstance(part, Template):
        for buf in part.inputs + (part.output,):
            seen.setdefault(buf.name, buf)
    for nest in nests_of(part):
        stores = nest.row_stores + nest.stores
        for s in stores:
            seen.setdefault(s.buf.name, s.buf)
        for e in walk_ex([s.value for s in stores]):
            if isinstance(e, Load):
                seen.setdefault(e.buf.name, e.buf)
    return list(seen.values())


def bytes_touched(part) -> int:
    """The bytes of every buffer a part reads or writes: what it must move at least (each
    buffer once), for rooflines."""
    return sum(buf.size * buf.dtype.np.itemsize for buf in buffers_of(part))


def all_kernels(entries) -> list[Kernel]:
    """Every Kernel of a program's (or a loop body's) entries, those inside loops too, in order."""
    out = []
    for e in entries:
        out += all_kernels(e.body) if isinstance(e, Loop) else [e]
    return out


def viewed_buffers(entries) -> set[str]:
    """Names of the buffers that loops (among `entries`, nested ones too) read or write
    through views: each view's base, down to the buffer under views of views."""
    out: set[str] = set()
    for e in entries:
        if isinstance(e, Loop):
            for v in e.views:
                base = v.base
                while base is not None:
                    out.add(base.name)
                    base = base.base
            out |= viewed_buffers(e.body)
    return out


class ContractError(Exception):
    """A kernel program breaks the kernel IR's contract (a compiler bug)."""


def check_program(p: KernelProgram) -> None:
    """The structural rules a backend relies on: loop variables bound where they are used,
    template epilogues reading their template's output only at the element they write,
    every index within its buffer, no input written (a backend may read the caller's
    arrays in place), phases in order, views inside their bases for every value of the
    loop variables and used only inside the loops that bind them, and no arena buffer
    read before a kernel wrote it."""
    _check_entries(p.kernels, FreeVars(), frozenset(), {}, "program")
    for bucket, parts in collectives_of(p).items():
        _check_collective(bucket, parts)
    written = _Written()
    _check_written_before_read(p.kernels, written)
    for buf in [src for src, _ in p.copies] + list(p.outputs.values()):
        if not written.holds(buf):
            raise ContractError(f"the step reads {buf.name} after its last kernel, but no kernel wrote it")


class _Written:
    """The arena buffers written so far: by name, and the storage loops read and wrote
    through views (a scan's final carry is read from the last slot of its carry's
    storage, under another name)."""

    def __init__(self):
        self.names: set[str] = set()
        self.loop_storage: list[Buffer] = []

    def holds(self, buf: Buffer, more: frozenset = frozenset()) -> bool:
        root = _root(buf)
        if root.kind != "arena" or root.name in self.names or root.name in more:
            return True
        end = root.offset + _nbytes(root)
        return any(s.offset <= root.offset and end <= s.offset + _nbytes(s) for s in self.loop_storage)


def _nbytes(buf: Buffer) -> int:
    return buf.size * buf.dtype.np.itemsize


def _check_written_before_read(entries, written: _Written) -> None:
    """Walk the entries in order: every arena buffer read (through views too) was written
    by an earlier entry or by the kernel that reads it; a loop's body may read what its
    previous iteration wrote."""
    for e in entries:
        if isinstance(e, Loop):
            written.names |= {b.name for b in _written_in(e.body)}
            _check_written_before_read(e.body, written)
            written.loop_storage += [_root(v) for v in e.views]
            continue
        mine = frozenset(_root(b).name for part in e.parts for b in written_by(part))
        for part in e.parts:
            for buf in buffers_of(part):
                if not written.holds(buf, mine):
                    raise ContractError(f"{e.name}: reads {buf.name} before any kernel writes it")
        written.names |= mine


def _written_in(entries) -> list[Buffer]:
    """The root buffers the kernels of `entries` (and of loops among them) write."""
    out = []
    for e in entries:
        out += _written_in(e.body) if isinstance(e, Loop) else [_root(b) for part in e.parts
                                                                 for b in written_by(part)]
    return out


def _check_entries(entries, free: FreeVars, loop_vars: frozenset, views: dict, where: str) -> None:
    """loop_vars: the enclosing loops' variables; views: the views they bind, by name."""
    phase = 0
    for e in entries:
        if e.phase < phase:
            raise ContractError(f"{where}: {e.name} is in phase {e.phase} after phase {phase}")
        phase = e.phase
        if isinstance(e, Loop):
            _check_loop(e, free, loop_vars, views)
            continue
        for part in e.parts:
            if isinstance(part, Collective) and loop_vars:
                raise ContractError(f"{e.name}: a collective inside a loop body")
            for buf in buffers_of(part):
                if buf.kind == "view" and buf.name not in views:
                    raise ContractError(f"{e.name}: view {buf.name} is used outside the loop that binds it")
            for buf in written_by(part):
                if _root(buf).kind == "input":
                    raise ContractError(f"{e.name}: writes input {_root(buf).name}")
            for nest in nests_of(part):
                _check_nest(e.name, nest, free)
            if isinstance(part, Template) and part.epilogue is not None:
                _check_epilogue(e.name, part)


def _check_loop(loop: Loop, free: FreeVars, outer_vars: frozenset, outer_views: dict) -> None:
    var = loop.var
    if not isinstance(var, Var) or var.extent < 1 or var.name in outer_vars:
        raise ContractError(f"{loop.name}: its variable must be a new Var of extent >= 1")
    loop_vars, views = outer_vars | {var.name}, dict(outer_views)
    for v in loop.views:
        if v.kind != "view" or v.base is None or v.at is None:
            raise ContractError(f"{loop.name}: {v.name} is not a view")
        if v.base.kind == "view" and v.base.name not in outer_views:
            raise ContractError(f"{loop.name}: view {v.name} is a window of {v.base.name}, which no "
                                "enclosing loop binds")
        used = free.ix(v.at)
        if not used <= loop_vars:
            raise ContractError(f"{loop.name}: view {v.name} uses unbound variables {sorted(used - loop_vars)}")
        if v.dtype != v.base.dtype or v.at.lo < 0 or v.at.hi + v.size > v.base.size:
            raise ContractError(f"{loop.name}: view {v.name} (at {v.at.lo}..{v.at.hi}, {v.size} elements) "
                                f"may leave {v.base.name} ({v.base.size} elements)")
        views[v.name] = v
    _check_entries(loop.body, free, loop_vars, views, loop.name)


def _check_collective(bucket: int, parts: list) -> None:
    modes = [c.mode for c in parts]
    if any(m not in COLLECTIVE_MODES for m in modes) or modes not in (["sync"], ["start", "wait"]):
        raise ContractError(f"collective bucket {bucket}: parts {modes}; want one sync, or a start "
                            "then a wait")
    first = parts[0]
    for c in parts:
        if c.op != "allreduce" or (c.sources, c.targets) != (first.sources, first.targets):
            raise ContractError(f"collective bucket {bucket}: its parts differ")
    if len(first.sources) != len(first.targets) or any(
            (s.dtype, s.shape) != (t.dtype, t.shape) for s, t in zip(first.sources, first.targets)):
        raise ContractError(f"collective bucket {bucket}: sources and targets differ in shape or type")


def _check_nest(kernel: str, nest: LoopNest, free: FreeVars) -> None:
    outer = {v.name for v in nest.outer}
    every = outer | {v.name for v in nest.inner}
    for stores, bound in ((nest.row_stores, outer), (nest.stores, every)):
        for s in stores:
            used = free(s.value) | free.ix(s.flat)
            if not used <= bound:
                raise ContractError(f"{kernel}: a store uses unbound loop variables {sorted(used - bound)}")
            if s.flat.lo < 0 or s.flat.hi >= s.buf.size:
                raise ContractError(f"{kernel}: store to {s.buf.name} may leave the buffer")
        for e in walk_ex([s.value for s in stores]):
            if isinstance(e, Load) and (e.index.lo < 0 or e.index.hi >= e.buf.size):
                raise ContractError(f"{kernel}: load from {e.buf.name} may leave the buffer "
                                    f"({e.index.lo}..{e.index.hi} of {e.buf.size})")


def _check_epilogue(kernel: str, t: Template) -> None:
    """Sampled: at the corners and a spread of points of the epilogue's domain, every load
    of the template's output reads the element of the iteration itself."""
    nest = t.epilogue
    vars_ = nest.vars
    loads = [e for e in walk_ex([s.value for s in nest.stores + nest.row_stores])
             if isinstance(e, Load) and e.buf.name == t.output.name]
    if not loads:
        return
    total = 1
    for v in vars_:
        total *= v.extent
    for flat in sorted({0, total - 1} | set(range(0, total, max(1, total // 61)))):
        env, rest = {}, flat
        for v in reversed(vars_):
            env[v.name], rest = rest % v.extent, rest // v.extent
        own = 0
        for v in vars_:
            own = own * v.extent + env[v.name]
        for e in loads:
            if eval_ix(e.index, env) != own:
                raise ContractError(f"{kernel}: the epilogue of {t.op} reads its output at another element")


def eval_ix(e: Ix, env: dict) -> int:
    """The value of an index expression for loop variable values `env` (no Gather)."""
    from dlc.core.kernel.ir import Add, Const, Div, Mod, Mul
    if isinstance(e, Var):
        return env[e.name]
    if isinstance(e, Const):
        return e.value
    if isinstance(e, Add):
        return eval_ix(e.a, env) + eval_ix(e.b, env)
    if isinstance(e, Mul):
        return eval_ix(e.a, env) * e.c
    if isinstance(e, Div):
        return eval_ix(e.a, env) // e.c
    if isinstance(e, Mod):
        return eval_ix(e.a, env) % e.c
    if isinstance(e, Clamp):
        return min(max(eval_ix(e.a, env), e.lo), e.hi)
    raise ContractError(f"cannot evaluate {e!r} without data")
