"""A KernelProgram as one CUDA C module and the list of launches that runs one step.

Every kernel part is one `extern "C" __global__` function (scatter_add: two), launched in
program order on one stream: stream order is the barrier between phases (and is stricter
than the contract, which lets kernels of one phase run in any order). After the last
phase the program's copies run as device-to-device copies.

Loop nests map to the grid by what they compute (`plan_nest`):

  elements     no row stores, no reduction shared by a row: one thread per element of
               the flattened outer x inner space, consecutive threads along the innermost
               axis (coalesced); reductions inside an element run in the thread.
  thread_rows  rows (outer iterations) with row stores or reductions over the row, when
               rows are short: one thread per row, the row's inner loop in order, values
               that depend on the row alone computed once before it (as on a CPU).
  block_rows   long rows (>= LONG_ROW elements or reduction terms) and not too many of
               them: one block per row. Each reduction over the row is shared by the
               block's threads (each adds a strided subset in order, then a fixed tree of
               warp shuffles and shared memory: deterministic), the row's stores are
               written by thread 0, and the inner loop is strided over the threads.

A nest whose inner iterations may depend on each other (it loads a buffer it stores at
another element, or two inner iterations store the same element) always runs as
thread_rows, in order, whatever its shape.

Buffers: the arena (and the scratch workspace after it) is one device allocation passed
as `arena`; each arena buffer is `arena + OFFSET` with the offset a constant in the
source, so a captured launch stays valid. Inputs and state arrays are one parameter each.

Loops (a recurrent layer's kernel-IR Loop) are a host loop of launches: the step list
holds a LoopStep whose body steps run once per value of its variable t (T-1 down to 0
when reversed), in order (stream order is also the barrier between iterations). A kernel
of a loop body takes the values of the enclosing loops' variables as `int` parameters
(`step_t3`; the launch argument "#t3") and computes each view it uses from them:
`base + at(t)`, its base an arena buffer, an input or state parameter, or a view of an
enclosing loop. So the source and the launches are the same for any T, and a captured
CUDA graph holds one launch per body kernel and iteration, each with its own t.

Templates use the generators of templates.py (float32 only; any other part falls back to
the kind's generic loop nests), with the kernel IR epilogue rendered through their
epilogue hook: the epilogue nest's stores for the element the template thread computed,
its loads of the template output replaced by the computed value. The output itself is
stored only when something else reads it.
"""
from __future__ import annotations

import math
import re

import numpy as np
from dataclasses import asdict, dataclass, field

from dlc.core.kernel import (Buffer, Exprs, FreeVars, Kernel, KernelProgram, Load, Loop, LoopNest, Reduce,
                             Template, all_kernels, buffers_of, viewed_buffers, walk_ex)
from dlc.core.kernel.templates import generic
from dlc.core.types import DType

from . import templates as T
from .emit import CTYPE, MEMTYPE, PRELUDE, Emitter, atom, identity

ELEMENT_THREADS = 256
ROW_THREADS = 128
LONG_ROW = 32       # rows with at least this much work share a block ...
MANY_ROWS = 4096    # ... unless there are this many rows (then a thread per row is enough)
VERY_LONG = 1024    # ... and they are shorter than this
ALIGN = 64
INT_MAX = 2**31 - 1


# --- what a step runs -------------------------------------------------------------------------------

@dataclass
class Launch:
    kernel: str            # the CUDA function
    part: str              # the kernel IR's kernel it belongs to (profiles map it to .dln lines)
    phase: int
    grid: tuple
    block: tuple
    shared: int            # static shared memory, bytes
    args: list             # "arena", or the name of an input or state buffer, per parameter

    def to_json(self) -> dict:
        return {"launch": asdict(self)}


@dataclass
class Copy:
    """nbytes from one buffer to another; a buffer is ["arena", offset] or ["slot", name]."""
    src: list
    dst: list
    nbytes: int

    def to_json(self) -> dict:
        return {"copy": asdict(self)}


@dataclass
class LoopStep:
    """A kernel-IR Loop: `steps` (launches, nested loops) once per value of `var` (t), in
    order 0..extent-1, or extent-1..0 when `reverse`; a launch argument "#<var>" is t."""
    name: str
    var: str
    extent: int
    reverse: bool
    steps: list

    def to_json(self) -> dict:
        return {"loop": {"name": self.name, "var": self.var, "extent": self.extent, "reverse": self.reverse,
                         "steps": [s.to_json() for s in self.steps]}}

    def values(self) -> range:
        return range(self.extent - 1, -1, -1) if self.reverse else range(self.extent)


VAR_ARG = "#"  # a launch argument "#t3": the value of the enclosing loop's variable t3


@dataclass
class Rendered:
    source: str
    steps: list                     # Launch | Copy | LoopStep, in order
    workspace_bytes: int = 0        # scratch after the arena (template index lists)
    plans: dict = field(default_factory=dict)  # CUDA function -> how its nest maps to the grid
    pieces: list = field(default_factory=list)  # (function, its text): the source after the prelude

    def units(self, count: int) -> list[tuple[list[str], str]]:
        """The module as up to `count` translation units of about equal size, each the
        prelude and whole kernels ((functions, source) each): NVRTC compiles them side by
        side. Every kernel is self-contained but for the prelude."""
        bins: list[list] = [[0, [], []] for _ in range(max(1, min(count, len(self.pieces))))]
        for name, text in sorted(self.pieces, key=lambda piece: -len(piece[1])):  # largest first
            smallest = min(bins, key=lambda b: b[0])
            smallest[0] += len(text)
            smallest[1].append(name)
            smallest[2].append(text)
        units = [(names, "\n".join([PRELUDE, *texts])) for _, names, texts in bins if names]
        return units or [([], PRELUDE)]  # a step with no kernels still loads a module

    @property
    def launches(self) -> list[Launch]:
        return launches_of(self.steps)


def launches_of(steps: list) -> list[Launch]:
    """Every Launch of a step list, loop bodies' too (each once), in order."""
    out = []
    for s in steps:
        if isinstance(s, LoopStep):
            out += launches_of(s.steps)
        elif isinstance(s, Launch):
            out.append(s)
    return out


def launches_per_step(steps: list) -> int:
    """How many launches one step makes (a loop's body once per iteration)."""
    return sum(s.extent * launches_per_step(s.steps) if isinstance(s, LoopStep) else isinstance(s, Launch)
               for s in steps)


def steps_from_json(items: list) -> list:
    out = []
    for d in items:
        if "launch" in d:
            out.append(Launch(**{k: tuple(v) if k in ("grid", "block") else v for k, v in d["launch"].items()}))
        elif "loop" in d:
            lp = d["loop"]
            out.append(LoopStep(lp["name"], lp["var"], lp["extent"], lp["reverse"], steps_from_json(lp["steps"])))
        else:
            out.append(Copy(**d["copy"]))
    return out


# --- buffer names --------------------------------------------------------------------------------------

class Names:
    """C identifiers of a program's buffers, and how a kernel reaches each."""

    def __init__(self, program: KernelProgram):
        self.program = program
        self.ident: dict[str, str] = {}
        self.buffers: dict[str, Buffer] = {}
        taken: set[str] = set()
        for buf in list(program.inputs.values()) + list(program.state.values()) + list(program.buffers.values()):
            if buf.name in self.ident:
                continue
            if buf.kind == "arena" and re.fullmatch(r"t\d+", buf.name):
                base = buf.name
            else:
                base = {"input": "in_", "state": "s_", "view": "w_"}.get(buf.kind, "a_") + re.sub(r"\W", "_", buf.name)
            name, n = base, 1
            while name in taken:
                n += 1
                name = f"{base}_{n}"
            taken.add(name)
            self.ident[buf.name] = name
            self.buffers[buf.name] = buf
        self.workspace_end = _align(program.arena_bytes)

    def add_workspace(self, name: str, dtype: DType, count: int) -> Buffer:
        """A scratch buffer after the arena (a template's index lists)."""
        buf = Buffer(name, dtype, (count,), "arena", self.workspace_end)
        self.workspace_end = _align(self.workspace_end + count * 4)
        self.ident[name] = re.sub(r"\W", "_", name)
        self.buffers[name] = buf
        return buf

    @property
    def workspace_bytes(self) -> int:
        return self.workspace_end - _align(self.program.arena_bytes)

    def ptype(self, buf: Buffer, written: bool) -> str:
        return f"{'' if written else 'const '}{MEMTYPE[buf.dtype]}*"

    def expr(self, buf: Buffer, written: bool) -> str:
        """A C expression for the buffer's pointer inside a kernel taking `params`."""
        if buf.kind == "arena":
            return f"({self.ptype(buf, written)})(arena + {buf.offset})"
        if buf.kind == "view":
            return f"({self.expr(buf.base, written)} + {atom(view_offset(buf))})"
        return self.ident[buf.name]

    def params(self, used, written: set) -> tuple[list[str], list[str]]:
        """(C parameter declarations, launch arguments) for a kernel using `used` buffers: the
        arena, each input or state buffer (a view's too: the buffer it is a window of), then
        the loop variables the views depend on."""
        decls, args = [], []
        roots: dict[str, Buffer] = {}
        root_written: set[str] = set()
        loop_vars: dict[str, None] = {}
        for b in used:
            root = b
            while root.kind == "view":
                loop_vars.update(dict.fromkeys(sorted(_loop_vars(root))))
                root = root.base
            roots.setdefault(root.name, root)
            if b.name in written:
                root_written.add(root.name)
        if any(b.kind == "arena" for b in roots.values()):
            decls.append("unsigned char* __restrict__ arena")
            args.append("arena")
        for b in roots.values():
            if b.kind != "arena":
                decls.append(f"{self.ptype(b, b.name in root_written)} __restrict__ {self.ident[b.name]}")
                args.append(b.name)
        for v in loop_vars:
            decls.append(f"const int {loop_var(v)}")
            args.append(VAR_ARG + v)
        return decls, args

    def bind_arena(self, em: Emitter, used, written: set) -> None:
        """Local pointers for the arena buffers and views a kernel uses."""
        for b in used:
            if b.kind in ("arena", "view"):
                t = self.ptype(b, b.name in written)
                em.line(f"{t} __restrict__ {self.ident[b.name]} = {self.expr(b, b.name in written)};")


def _loop_vars(view: Buffer) -> frozenset:
    """The loop variables a view's offset depends on (a FreeVars of its own: memos keyed by
    the identity of expressions must not outlive them)."""
    return FreeVars().ix(view.at)


def loop_var(name: str) -> str:
    """The C parameter holding a kernel-IR Loop's variable."""
    return "step_" + re.sub(r"\W", "_", name)


class _InlineIndex(Emitter):
    """Renders an index expression as one C expression (no locals): a view's offset."""

    def bind(self, ctype: str, text: str, prefix: str = "v") -> str:
        return f"(({ctype}){atom(text)})"


def view_offset(view: Buffer) -> str:
    """The element offset of a view in its base, in the enclosing loops' variables."""
    em = _InlineIndex({})
    em.vars = {name: loop_var(name) for name in _loop_vars(view)}
    return em.ix(view.at)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _blocks(total: int, per: int) -> int:
    return -(-total // per)


# --- loop nests ------------------------------------------------------------------------------------------

@dataclass
class NestPlan:
    kind: str             # elements | thread_rows | block_rows
    threads: int          # per block
    blocks: int
    row_reduces: list     # Reduce nodes over a row (block_rows: shared by the block)
    what: str             # one line for the source comment


def plan_nest(nest: LoopNest, free: FreeVars | None = None) -> NestPlan:
    """How a loop nest maps to the grid (see the module docstring)."""
    free = free or FreeVars()
    outer = frozenset(v.name for v in nest.outer)
    exprs = walk_ex([s.value for s in nest.row_stores + nest.stores])
    stored = {s.buf.name for s in nest.row_stores + nest.stores}
    row_reduces = [e for e in exprs if isinstance(e, Reduce) and e.vars and free(e) <= outer
                   and not _loads_any(e, stored)]
    rows = math.prod(v.extent for v in nest.outer)
    length = math.prod(v.extent for v in nest.inner)
    ordered = inner_order_matters(nest, exprs, free)
    shape = "x".join(str(v.extent) for v in nest.outer) or "1"
    inner = "x".join(str(v.extent) for v in nest.inner)
    if not nest.row_stores and not row_reduces and not ordered:
        total = rows * length
        threads = ELEMENT_THREADS if total >= ELEMENT_THREADS else max(32, _blocks(total, 32) * 32)
        return NestPlan("elements", threads, _blocks(total, threads), [],
                        f"elementwise over [{shape}{' x ' + inner if inner else ''}]: one thread per element")
    work = max([length] + [math.prod(v.extent for v in r.vars) for r in row_reduces])
    detail = f"{rows} row(s) [{shape}]" + (f" x [{inner}]" if inner else "") + \
        (f", {len(row_reduces)} reduction(s) over each row" if row_reduces else "")
    if not ordered and work >= LONG_ROW and (rows < MANY_ROWS or work >= VERY_LONG):
        threads = min(1024 if rows < 64 else 256, max(32, _pow2(work)))
        return NestPlan("block_rows", threads, rows, row_reduces, f"{detail}: one block of {threads} per row")
    threads = ROW_THREADS if rows >= ROW_THREADS else max(32, _blocks(rows, 32) * 32)
    why = ", in order (its iterations depend on each other)" if ordered else ""
    return NestPlan("thread_rows", threads, _blocks(rows, threads), row_reduces,
                    f"{detail}: one thread per row{why}")


def _loads_any(e, names: set) -> bool:
    return any(isinstance(x, Load) and x.buf.name in names for x in walk_ex([e]))


def inner_order_matters(nest: LoopNest, exprs, free: FreeVars) -> bool:
    """Whether the nest's inner iterations may depend on each other: it loads a buffer it
    stores at another element, or one element is stored by several inner iterations."""
    inner = frozenset(v.name for v in nest.inner)
    stored: dict[str, set] = {}
    for s in nest.stores:
        stored.setdefault(s.buf.name, set()).add(id(s.flat))
        if not inner <= free.ix(s.flat):
            return True
    return any(isinstance(e, Load) and e.buf.name in stored and id(e.index) not in stored[e.buf.name]
               for e in exprs)


def _unravel(em: Emitter, flat: str, vars_, u: str = "u") -> None:
    """const int v = flat / (extents after v) % extent, for each variable (`u`: the
    constants' suffix, "u" when flat is unsigned)."""
    extents = [v.extent for v in vars_]
    for k, v in enumerate(vars_):
        stride = math.prod(extents[k + 1:])
        t = "int" if v.extent <= INT_MAX else "long long"
        if v.extent == 1:
            text = "0"
        else:
            text = flat if stride == 1 else f"{flat} / {stride}{u}"
            text = text if k == 0 else f"{text} % {v.extent}{u}"
        em.line(f"const {t} {em.bind_var(v)} = {text};")


def _inner_loops(em: Emitter, nest: LoopNest, vars_) -> None:
    if not vars_:
        em.store_all(nest.stores)
        return
    with em.loop(vars_[0]):
        _inner_loops(em, nest, vars_[1:])


SMEM = {DType.f32: "red_f", DType.f64: "red_d", DType.i32: "red_i"}


def _cooperative(em: Emitter, r: Reduce, threads: int, smem: set) -> None:
    """A reduction over the row shared by the block's threads; every thread gets the result."""
    n = math.prod(v.extent for v in r.vars)
    j = em.fresh("j")
    body_t = r.body.dtype
    if r.op == "argmax":
        best, at = em.fresh("best"), em.fresh("at")
        em.line(f"{CTYPE[body_t]} {best} = {identity('max', body_t)};")
        em.line(f"int {at} = DLC_INT_MAX;")
    else:
        acc = em.fresh("acc")
        em.line(f"{CTYPE[r.dtype]} {acc} = {identity(r.op, r.dtype)};")
    with em.block(f"for (unsigned {j} = threadIdx.x; {j} < {n}u; {j} += {threads}u)"):
        _unravel(em, j, r.vars)
        v = em.value(r.body)
        if r.op == "sum":
            em.line(f"{acc} += {v};")
        elif r.op == "max":
            em.line(f"{acc} = dlc_max({acc}, {v});")
        else:
            em.line(f"dlc_argmax_step({best}, {at}, {v}, (int){j});")
    if r.op == "argmax":
        smem.update({body_t, "at"})
        out = em.bind("int", f"dlc_block_argmax({best}, {at}, {SMEM[body_t]}, red_at)")
    else:
        smem.add(r.dtype)
        op = "dlc_sum" if r.op == "sum" else "dlc_maximum"
        out = em.bind(CTYPE[r.dtype], f"dlc_block_reduce<{op}>({acc}, {SMEM[r.dtype]})")
    em.remember(r, out)


def _shared_decls(smem: set) -> list[str]:
    out = []
    for key, name, ctype in ((DType.f32, "red_f", "float"), (DType.f64, "red_d", "double"),
                             (DType.i32, "red_i", "int"), ("at", "red_at", "int")):
        if key in smem:
            out.append(f"__shared__ {ctype} {name}[32];")
    return out


def render_nest(name: str, group: list[LoopNest], names: Names, free: FreeVars) -> tuple[str, NestPlan, list, int]:
    """(source, plan, launch arguments, static shared bytes) of a loop nest, or of a group
    of elementwise nests over the same domain run by the same threads (`mergeable`)."""
    nest = group[0]
    plan = plan_nest(nest, free)
    used = list({b.name: b for n in group for b in buffers_of(n)}.values())
    written = {s.buf.name for n in group for s in n.row_stores + n.stores}
    decls, args = names.params(used, written)
    em = Emitter({b.name: names.ident[b.name] for b in used})
    names.bind_arena(em, used, written)
    outer_names = frozenset(v.name for v in nest.outer)
    smem: set = set()
    t = plan.threads
    if plan.kind == "elements":
        total = math.prod(v.extent for v in list(nest.outer) + list(nest.inner))
        ft = "unsigned" if total <= 2**32 - 1 - t else "unsigned long long"
        em.line(f"const {ft} f_ = {'(unsigned long long)' if ft != 'unsigned' else ''}blockIdx.x * {t}u + threadIdx.x;")
        em.line(f"if (f_ >= {total}u) return;")
        for k, member in enumerate(group):
            if len(group) == 1:
                _unravel(em, "f_", list(member.outer) + list(member.inner))
                em.store_all(member.stores)
                continue
            with em.block("", f"part {k + 1} of {len(group)}: its own scope, nothing cached across parts"):
                _unravel(em, "f_", list(member.outer) + list(member.inner))
                em.store_all(member.stores)
    elif plan.kind == "thread_rows":
        rows = math.prod(v.extent for v in nest.outer)
        em.line(f"const unsigned row_ = blockIdx.x * {t}u + threadIdx.x;")
        em.line(f"if (row_ >= {rows}u) return;")
        _unravel(em, "row_", nest.outer)
        for r in plan.row_reduces:  # once per row, before anything is stored
            em.value(r)
        em.store_all(nest.row_stores)
        if nest.stores:
            seen: set = set()
            for s in nest.stores:
                em.hoist(s.value, outer_names, seen)
            _inner_loops(em, nest, list(nest.inner))
    else:
        em.line("const unsigned row_ = blockIdx.x;")
        _unravel(em, "row_", nest.outer)
        if plan.row_reduces:
            em.line("// reductions over the row: each thread adds a strided share, then a fixed tree")
        for r in plan.row_reduces:
            _cooperative(em, r, t, smem)
        if nest.row_stores:
            values = [em.value(s.value) for s in nest.row_stores]
            em.line("__syncthreads();  // every thread has read what the row's stores overwrite")
            with em.block("if (threadIdx.x == 0)"):
                for s, v in zip(nest.row_stores, values):
                    v = f"(unsigned char){v}" if s.buf.dtype == DType.bool else v
                    em.line(f"{em.pointers[s.buf.name]}[{em.ix(s.flat)}] = {v};")
            em.line("__syncthreads();")
        if nest.stores:
            seen: set = set()
            for s in nest.stores:
                em.hoist(s.value, outer_names, seen)
            length = math.prod(v.extent for v in nest.inner)
            with em.block(f"for (unsigned i_ = threadIdx.x; i_ < {length}u; i_ += {t}u)"):
                _unravel(em, "i_", nest.inner)
                em.store_all(nest.stores)
    body = "\n".join(["    " + d for d in _shared_decls(smem)] + [em.text()])
    shared = sum(32 * (8 if k == DType.f64 else 4) for k in smem)
    source = (f"// {plan.what}\n"
              f"extern \"C\" __global__ void __launch_bounds__({t}) {name}({', '.join(decls)})\n"
              f"{{\n{body}\n}}\n")
    return source, plan, args, shared


# --- templates -------------------------------------------------------------------------------------------

def _supported(t: Template) -> bool:
    """Whether templates.py renders this part (float32, int32 indices, sizes below 2**31)."""
    index_inputs = {"take": (1,), "scatter_add": (1,)}.get(t.op, ())
    for i, b in enumerate(t.inputs):
        if b.dtype != (DType.i32 if i in index_inputs else DType.f32):
            return False
    if t.output.dtype != DType.f32 or any(b.size > INT_MAX or b.size == 0 for b in t.inputs + (t.output,)):
        return False
    if t.op == "colsum" and tuple(t.attrs["axes"]) != tuple(range(len(t.attrs["axes"]))):
        return False  # the generator sums leading axes only
    return t.op in GENERATORS


def _epilogue_hook(t: Template, names: Names, store_output: bool):
    """The templates.py epilogue: the output element, then the kernel IR epilogue's stores."""
    nest = t.epilogue
    written = {t.output.name} | ({s.buf.name for s in nest.stores} if nest else set())
    used = [t.output] + (buffers_of(nest) if nest else [])

    def render(index: str, value: str) -> str:
        em = Emitter({b.name: names.ident[b.name] for b in used}, indent=0)
        out_ptr = store_output or (nest is not None and t.output.name in {s.buf.name for s in nest.stores})
        local = [b for b in used if b.kind in ("arena", "view") and (b.name != t.output.name or out_ptr)]
        names.bind_arena(em, list({b.name: b for b in local}.values()), written)
        if store_output:
            em.line(f"{names.ident[t.output.name]}[{index}] = {value};")
        if nest is not None:
            vars_ = list(nest.outer) + list(nest.inner)
            assert tuple(v.extent for v in vars_) == tuple(t.output.shape), "epilogue over the output's shape"
            # signed: the index is an int >= 0 (unsigned arithmetic here made ptxas spill in a GEMM)
            _unravel(em, index, vars_, u="")
            for e in walk_ex([s.value for s in nest.stores]):
                if isinstance(e, Load) and e.buf.name == t.output.name:
                    em.remember(e, value)  # the contract: the epilogue reads its own element
            em.store_all(nest.stores)
        return em.text()
    return render


def _shape2(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _gemm_mnk(t: Template) -> tuple[int, int, int]:
    """The GEMM shape of a matmul or conv2d_bwd_filter part."""
    A, B = t.inputs
    if t.op == "matmul":
        m, n = t.output.shape
        return m, n, A.shape[0] if t.attrs.get("ta", False) else A.shape[1]
    n, c, _, _ = A.shape  # conv2d_bwd_filter: x, dy
    kh, kw = _shape2(t.attrs["kernel"])
    return B.shape[1], c * kh * kw, n * B.shape[2] * B.shape[3]


def _splits(t: Template) -> int:
    """Slices of K for a GEMM whose output alone cannot fill the GPU (T.split_k); 1: none."""
    return T.split_k(*_gemm_mnk(t)) if t.op in ("matmul", "conv2d_bwd_filter") else 1


def _split(name, t, names, params, epilogue, gemm):
    """A GEMM part as one kernel, or split: gemm(splits, part) sums slices of K into a
    workspace, then split_sum adds them in order and runs the epilogue."""
    splits = _splits(t)
    if splits == 1:
        return [gemm(name, 1, None)], []
    m, n, _ = _gemm_mnk(t)
    part = names.add_workspace(f"{name}_part", DType.f32, splits * m * n)
    kernels = [gemm(f"{name}_part", splits, names.expr(part, True)),
               T.split_sum(name, m * n, splits, part=names.expr(part, False), epilogue=epilogue, params=params)]
    return kernels, [SAME_ARGS]


def _gen_matmul(name, t, ref, params, epilogue, names):
    A, B = t.inputs
    ta, tb = t.attrs.get("ta", False), t.attrs.get("tb", False)
    m, n, k = _gemm_mnk(t)
    return _split(name, t, names, params, epilogue, lambda kname, splits, part: T.matmul(
        kname, m, n, k, a=ref(A), b=ref(B), ta=ta, tb=tb, epilogue=epilogue, params=params, splits=splits,
        part=part))


def _gen_batch_matmul(name, t, ref, params, epilogue, names):
    """The matmul kernel over a stack of products: one launch per MAX_STACK of them."""
    A, B = t.inputs
    ta, tb = t.attrs.get("ta", False), t.attrs.get("tb", False)
    stacks, m, n = t.output.shape
    k = A.shape[1] if ta else A.shape[2]
    return [T.matmul(f"{name}_{first}" if first else name, m, n, k, a=ref(A), b=ref(B), ta=ta, tb=tb,
                     epilogue=epilogue, params=params, stack=min(T.MAX_STACK, stacks - first), first=first)
            for first in range(0, stacks, T.MAX_STACK)], []


def _dilation(t) -> tuple[int, int]:
    return _shape2(t.attrs.get("dilation", (1, 1)))


def _gen_conv2d(name, t, ref, params, epilogue, names):
    X, W = t.inputs
    return [T.conv2d(name, X.shape, W.shape, _shape2(t.attrs["stride"]), _shape2(t.attrs["pad"]), _dilation(t),
                     x=ref(X), w=ref(W), epilogue=epilogue, params=params)], []


def _gen_conv2d_bwd_data(name, t, ref, params, epilogue, names):
    G, W = t.inputs
    return [T.conv2d_bwd_data(name, G.shape, W.shape, tuple(t.attrs["in_hw"]), _shape2(t.attrs["stride"]),
                              _shape2(t.attrs["pad"]), _dilation(t), dy=ref(G), w=ref(W), epilogue=epilogue, params=params)], []


def _gen_conv2d_bwd_filter(name, t, ref, params, epilogue, names):
    X, G = t.inputs
    return _split(name, t, names, params, epilogue, lambda kname, splits, part: T.conv2d_bwd_filter(
        kname, X.shape, G.shape, _shape2(t.attrs["kernel"]), _shape2(t.attrs["stride"]), _shape2(t.attrs["pad"]),
        _dilation(t), x=ref(X), dy=ref(G), epilogue=epilogue, params=params, splits=splits, part=part))


def _gen_pool2d(name, t, ref, params, epilogue, names):
    (X,) = t.inputs
    return [T.pool2d(name, X.shape, t.attrs["mode"], _shape2(t.attrs["kernel"]), _shape2(t.attrs["stride"]),
                     _shape2(t.attrs["pad"]), x=ref(X), epilogue=epilogue, params=params)], []


def _gen_pool2d_bwd(name, t, ref, params, epilogue, names):
    X, G = t.inputs
    return [T.pool2d_bwd(name, X.shape, t.attrs["mode"], _shape2(t.attrs["kernel"]), _shape2(t.attrs["stride"]),
                         _shape2(t.attrs["pad"]), x=ref(X), dy=ref(G), epilogue=epilogue, params=params)], []


def _gen_take(name, t, ref, params, epilogue, names):
    table, idx = t.inputs
    width = math.prod(table.shape[1:])
    return [T.take(name, table.shape[0], width, idx.size, table=ref(table), idx=ref(idx), epilogue=epilogue,
                   params=params)], []


def _gen_colsum(name, t, ref, params, epilogue, names):
    (X,) = t.inputs
    lead = len(t.attrs["axes"])
    return [T.colsum(name, math.prod(X.shape[:lead]), math.prod(X.shape[lead:]), x=ref(X), epilogue=epilogue,
                     params=params)], []


def _gen_scatter_add(name, t, ref, params, epilogue, names):
    """Two kernels: the index lists (pos, perm in the workspace), then the ordered sums."""
    G, idx = t.inputs
    rows, count = t.attrs["rows"], idx.size
    width = math.prod(t.output.shape[1:])
    n_pos, n_perm = T.scatter_add_workspace(rows, count)
    pos = names.add_workspace(f"{name}_pos", DType.i32, n_pos)
    perm = names.add_workspace(f"{name}_perm", DType.i32, n_perm)
    index_params, index_args = names.params([idx, pos], {pos.name, perm.name})
    threads = min(1024, max(32, _pow2(max(rows, count))))
    index = T.scatter_add_index(f"{name}_index", rows, count, idx=ref(idx), pos=names.expr(pos, True),
                                perm=names.expr(perm, True), params=index_params, threads=threads)
    gather = T.scatter_add(name, rows, width, count, g=ref(G), pos=names.expr(pos, False),
                           perm=names.expr(perm, False), epilogue=epilogue, params=params)
    return [index, gather], [index_args]


GENERATORS = {
    "matmul": _gen_matmul, "batch_matmul": _gen_batch_matmul, "conv2d": _gen_conv2d,
    "conv2d_bwd_data": _gen_conv2d_bwd_data,
    "conv2d_bwd_filter": _gen_conv2d_bwd_filter, "pool2d": _gen_pool2d, "pool2d_bwd": _gen_pool2d_bwd,
    "take": _gen_take, "scatter_add": _gen_scatter_add, "colsum": _gen_colsum,
}


SAME_ARGS = "same"  # a generator's first kernel takes the template's parameters too


def render_template(name: str, t: Template, names: Names, store_output: bool):
    """[(CudaKernel, launch arguments)] for a template part (scatter_add, a split GEMM:
    two kernels)."""
    used = buffers_of(t)
    if any(b.kind == "arena" for b in used) or t.op == "scatter_add" or _splits(t) > 1:
        used = [Buffer("arena", DType.f32, (0,), "arena")] + [b for b in used if b.kind != "arena"]
    written = {t.output.name} | ({s.buf.name for s in t.epilogue.stores} if t.epilogue else set())
    params, args = names.params(used, written)
    kernels, extra_args = GENERATORS[t.op](name, t, lambda b: names.expr(b, False), params,
                                           _epilogue_hook(t, names, store_output), names)
    return list(zip(kernels, [args if a == SAME_ARGS else a for a in extra_args] + [args]))


# --- the program ------------------------------------------------------------------------------------------

def _reads(part) -> set[str]:
    """Names of the buffers a part reads."""
    out = {b.name for b in part.inputs} if isinstance(part, Template) else set()
    nests = [part] if isinstance(part, LoopNest) else ([part.epilogue] if part.epilogue else [])
    for nest in nests:
        for e in walk_ex([s.value for s in nest.row_stores + nest.stores]):
            if isinstance(e, Load):
                out.add(e.buf.name)
    return out


class _Generic:
    """The generic loop nests of templates this backend does not render (dtypes, sizes)."""

    def __init__(self):
        self.x, self.count = Exprs(), 0

    def fresh(self, extent):
        self.count += 1
        return self.x.var(f"c{self.count}", extent)

    def __call__(self, t: Template) -> list[LoopNest]:
        return generic(t, self.x, self.fresh)


def _writes_template_input(t: Template) -> bool:
    """An epilogue that updates a buffer its template reads would race with the template's
    other threads: such an epilogue runs as its own launch after the template."""
    if t.epilogue is None:
        return False
    inputs = {b.name for b in t.inputs}
    return any(s.buf.name in inputs for s in t.epilogue.stores)


def render_program(program: KernelProgram, prefix: str = "") -> Rendered:
    """The module's source and the step's launches, in order. `prefix` starts every
    kernel's name (several programs in one module, for tests)."""
    names = Names(program)
    free = FreeVars()
    generic_nests = _Generic()
    expanded: dict[int, list] = {}  # id(kernel) -> its parts, unsupported templates expanded
    for k in all_kernels(program.kernels):
        out = []
        for part in k.parts:
            if isinstance(part, Template) and not _supported(part):
                out += generic_nests(part)
            elif isinstance(part, Template) and _writes_template_input(part):
                out += [Template(part.op, part.inputs, part.output, part.attrs, None), part.epilogue]
            else:
                out.append(part)
        expanded[id(k)] = out
    reads = {id(p): _reads(p) for parts in expanded.values() for p in parts}  # every part's, loop bodies' too
    final = {b.name for b in program.outputs.values()} | {src.name for src, _ in program.copies}
    final |= viewed_buffers(program.kernels)  # (a loop reads it, or writes it, a step at a time)
    pieces, comments, plans = [], [], {}  # comments wait for the function they precede

    def add(fn: str, text: str) -> None:
        pieces.append((fn, "\n".join([*comments, text])))
        comments.clear()
    merger = Merger(free)

    def render(entries: list) -> list:
        """The steps of one list of kernels and loops (the program's, or a loop body's)."""
        # consecutive elementwise parts over one domain (of a kernel, or of kernels of one
        # phase) share a launch where that is safe; a loop ends a run of parts
        runs: list = []
        for k in entries:
            if isinstance(k, Loop):
                runs.append(k)
                continue
            for j, part in enumerate(expanded[id(k)]):
                last = runs[-1] if runs and isinstance(runs[-1], list) else None
                if (last and isinstance(part, LoopNest) and isinstance(last[0][2], LoopNest)
                        and last[0][0].phase == k.phase and merger.mergeable([m[2] for m in last], part)):
                    last.append((k, j, part))
                else:
                    runs.append([(k, j, part)])
        steps = []
        last_kernel = None
        for group in runs:
            if isinstance(group, Loop):
                comments.append(_loop_comment(group))
                last_kernel = None
                body = render(group.body)
                steps.append(LoopStep(group.name, group.var.name, group.var.extent, group.reverse, body))
                continue
            k, j, part = group[0]
            for member, _, _ in group:
                if member is not last_kernel:
                    comments.append(_kernel_comment(member))
                    last_kernel = member
            fn = re.sub(r"\W", "_", f"{prefix}{k.name}_{j}")
            if isinstance(part, LoopNest):
                source, plan, args, shared = render_nest(fn, [m[2] for m in group], names, free)
                if plan.blocks == 0:
                    continue
                what = f"part {j}" if len(group) == 1 else "parts " + ", ".join(f"{m[0].name}.{m[1]}" for m in group)
                add(fn, f"// {what}: {source[3:]}")
                owners = "+".join(dict.fromkeys(m[0].name for m in group))
                steps.append(Launch(fn, owners, k.phase, (plan.blocks, 1, 1), (plan.threads, 1, 1), shared, args))
                plans[fn] = plan.kind if len(group) == 1 else f"{plan.kind} ({len(group)} parts)"
            else:
                out = part.output
                store = out.kind != "arena" or out.name in final or any(
                    out.name in r for q, r in reads.items() if q != id(part))
                for kern, args in render_template(fn, part, names, store):
                    add(kern.name, f"// part {j}: template {part.op}\n{kern.source}")
                    steps.append(Launch(kern.name, k.name, k.phase, kern.grid, kern.block, kern.shared_bytes, args))
                    plans[kern.name] = f"template {part.op}"
        return steps

    steps = render(program.kernels)
    for src, dst in program.copies:
        steps.append(Copy(_where(src), _where(dst), src.size * src.dtype.np.itemsize))
    source = "\n".join([PRELUDE, *(text for _, text in pieces), *comments])
    return Rendered(source, steps, names.workspace_bytes, plans, pieces)


MERGE_CHECK_LIMIT = 1 << 20  # domains up to this many elements are checked element by element


class Merger:
    """Decides which consecutive elementwise parts may share a launch (one per render:
    index values are cached by the identity of their expressions and nests)."""

    def __init__(self, free: FreeVars):
        self.free = free
        self._values: dict[tuple, np.ndarray] = {}
        self._sorted: dict[tuple, tuple] = {}
        self._accesses: dict[int, tuple] = {}

    def mergeable(self, group: list[LoopNest], nest: LoopNest) -> bool:
        """Whether `nest` can run in the same launch as `group` (consecutive parts of one
        kernel, or kernels of one phase): all are elementwise over the same extents, so
        thread f runs every member's element f in order, and no thread touches an element
        that another thread stores in another member (checked exactly, element by element).
        The members of `group` were checked against each other already."""
        shape = [v.extent for v in list(group[0].outer) + list(group[0].inner)]
        if ([v.extent for v in list(nest.outer) + list(nest.inner)] != shape
                or any(plan_nest(n, self.free).kind != "elements" for n in (group[0], nest))):
            return False
        total = math.prod(shape)
        mine = self.accesses(nest)
        for other in group:
            theirs = self.accesses(other)
            for writer, reader, stores, touched in ((other, nest, theirs, mine), (nest, other, mine, theirs)):
                written: dict[str, list] = {}
                for buf, ix in stores[0]:
                    written.setdefault(buf, []).append(ix)
                for buf, ix in touched[0] + touched[1]:
                    for stored in written.get(buf, ()):
                        if not self.own_elements(writer, stored, reader, ix, total):
                            return False
        return True

    def accesses(self, nest: LoopNest) -> tuple[list, list]:
        """([(buffer, index)] stored, [(buffer, index)] loaded) by an elementwise nest."""
        hit = self._accesses.get(id(nest))
        if hit is None:
            stored = [(st.buf.name, st.flat) for st in nest.stores]
            loaded = [(e.buf.name, e.index) for e in walk_ex([st.value for st in nest.stores]) if isinstance(e, Load)]
            hit = self._accesses[id(nest)] = (stored, loaded)
        return hit

    def own_elements(self, writer: LoopNest, stored, reader: LoopNest, ix, total: int) -> bool:
        """Whether every element that `reader`'s thread u accesses at `ix` and that `writer`
        stores at `stored` is stored by thread u itself."""
        a, b = _canonical(stored, writer), _canonical(ix, reader)
        if a is not None and a == b:
            return True  # the same element, by the same thread
        if total > MERGE_CHECK_LIMIT:
            return False
        try:
            order, ranked = self.sorted_values(stored, writer, total)
            touched = self.values(ix, reader, total)
        except LookupError:  # an index read from data
            return False
        if np.any(ranked[1:] == ranked[:-1]):
            return False  # several threads store one element
        at = np.minimum(np.searchsorted(ranked, touched), total - 1)
        hit = ranked[at] == touched
        return bool(np.all(order[at][hit] == np.arange(total)[hit]))

    def sorted_values(self, e, nest: LoopNest, total: int) -> tuple[np.ndarray, np.ndarray]:
        """(threads in the order of their index values, the sorted values)."""
        key = (id(e), id(nest))
        if key not in self._sorted:
            values = self.values(e, nest, total)
            order = np.argsort(values, kind="stable")
            self._sorted[key] = (order, values[order])
        return self._sorted[key]

    def values(self, e, nest: LoopNest, total: int) -> np.ndarray:
        """The index's value for each thread f of an elementwise nest (numpy, int64)."""
        key = (id(e), id(nest))
        if key not in self._values:
            self._values[key] = _values(e, nest, total)
        return self._values[key]


def _canonical(e, nest: LoopNest):
    """An index expression with the nest's loop variables named by position (None when it
    reads data): equal keys address the same element from the same thread."""
    from dlc.core.kernel import Add, Clamp, Const, Div, Mod, Mul, Var
    position = {v.name: k for k, v in enumerate(list(nest.outer) + list(nest.inner))}

    def key(e):
        if isinstance(e, Var):
            return ("v", position[e.name]) if e.name in position else None
        if isinstance(e, Const):
            return ("c", e.value)
        if isinstance(e, Add):
            a, b = key(e.a), key(e.b)
            return None if a is None or b is None else ("+", a, b)
        if isinstance(e, (Mul, Div, Mod)):
            a = key(e.a)
            return None if a is None else (type(e).__name__, a, e.c)
        if isinstance(e, Clamp):
            a = key(e.a)
            return None if a is None else ("clamp", a, e.lo, e.hi)
        return None
    return key(e)


def _values(e, nest: LoopNest, total: int) -> np.ndarray:
    """The index's value for each thread f of an elementwise nest (numpy, int64)."""
    from dlc.core.kernel import Add, Clamp, Const, Div, Mod, Mul, Var
    f = np.arange(total, dtype=np.int64)
    env, stride = {}, total
    for v in list(nest.outer) + list(nest.inner):
        stride //= v.extent
        env[v.name] = f // stride % v.extent

    def value(e):
        if isinstance(e, Var):
            return env[e.name]
        if isinstance(e, Const):
            return np.int64(e.value)
        if isinstance(e, Add):
            return value(e.a) + value(e.b)
        if isinstance(e, Mul):
            return value(e.a) * e.c
        if isinstance(e, Div):
            return value(e.a) // e.c
        if isinstance(e, Mod):
            return value(e.a) % e.c
        if isinstance(e, Clamp):
            return np.clip(value(e.a), e.lo, e.hi)
        raise LookupError("a data-dependent index")
    return np.ascontiguousarray(np.broadcast_to(value(e), (total,)))


def _where(buf: Buffer) -> list:
    return ["arena", buf.offset] if buf.kind == "arena" else ["slot", buf.name]


def _loop_comment(lp: Loop) -> str:
    lines = ", ".join(lp.lines) or "generated"
    order = f"{lp.var.extent - 1} down to 0" if lp.reverse else f"0 to {lp.var.extent - 1}"
    head = f"loop {lp.name} (phase {lp.phase}): {lines}"
    return (f"\n// ==== {head} " + "=" * max(4, 70 - len(head)) +
            f"\n// the launches below run once per {lp.var.name} = {order}, in order (a host loop)" +
            "".join(f"\n//   view {v.name} = {v.base.name} + {view_offset(v)}" for v in lp.views))


def _kernel_comment(k: Kernel) -> str:
    lines = ", ".join(k.lines) or "generated"
    return f"\n// ==== {k.name} (phase {k.phase}): {lines} " + "=" * max(4, 70 - len(k.name) - len(lines))
