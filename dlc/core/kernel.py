"""Kernel IR: loop nests over buffers, shared by the code generators.

Index expressions (Ix) are integer arithmetic over loop variables; scalar expressions
(Ex) compute one element: loads, constants, scalar ops, counter-based random numbers
and reductions (a loop inside the expression). Both are hash-consed by `Exprs`, so
structurally equal expressions are the same object and code generators can cache
emitted values by identity.

A Kernel is a list of parts run one after another by every thread; each part is a
LoopNest (generic elementwise / row kernel) or a Template (matmul, conv, pool, gather)
with an optional epilogue LoopNest over the template's output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dlc.core.types import DType

# --- index expressions --------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Ix:
    kind: str          # var | const | add | mul | div | mod | shift
    args: tuple        # var: (name, extent); const: (value,); add: (a, b); mul/div/mod: (a, c);
                       # shift: (a, lo, step, n) = clamp((a - lo) // step, 0, n - 1)

    def __repr__(self) -> str:
        return format_ix(self)


def format_ix(e: Ix) -> str:
    k, a = e.kind, e.args
    if k == "var":
        return a[0]
    if k == "const":
        return str(a[0])
    if k == "add":
        return f"{format_ix(a[0])} + {format_ix(a[1])}"
    if k == "shift":
        return f"clamp(({format_ix(a[0])} - {a[1]})/{a[2]}, 0, {a[3] - 1})"
    op = {"mul": "*", "div": "/", "mod": "%"}[k]
    inner = format_ix(a[0])
    if a[0].kind == "add":
        inner = f"({inner})"
    return f"{inner}{op}{a[1]}"


def ix_vars(e: Ix) -> frozenset[str]:
    if e.kind == "var":
        return frozenset([e.args[0]])
    if e.kind == "const":
        return frozenset()
    if e.kind == "add":
        return ix_vars(e.args[0]) | ix_vars(e.args[1])
    return ix_vars(e.args[0])


def ix_bound(e: Ix) -> int:
    """An exclusive upper bound of the (non-negative) value."""
    k, a = e.kind, e.args
    if k == "var":
        return a[1]
    if k == "const":
        return a[0] + 1
    if k == "add":
        return ix_bound(a[0]) + ix_bound(a[1]) - 1
    if k == "mul":
        return (ix_bound(a[0]) - 1) * a[1] + 1
    if k == "div":
        return (ix_bound(a[0]) - 1) // a[1] + 1
    if k == "shift":
        return a[3]
    return min(a[1], ix_bound(a[0]))


# --- scalar expressions --------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Ex:
    """kind: load (buffer, index) | lit (value,) | index (ix,) | op (name, *args) |
    rand (seed, step, stream, flat) | reduce (op, vars, body, init-kind)."""

    kind: str
    args: tuple
    dtype: DType

    def __repr__(self) -> str:
        return format_ex(self)


@dataclass(frozen=True)
class Buffer:
    """A named array the kernels read or write. `kind` is input (data/label/hyper),
    state (params and state arrays), or arena (working memory at `offset` bytes)."""

    name: str
    dtype: DType
    shape: tuple
    kind: str
    offset: int = 0

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class Exprs:
    """Hash-consing constructors: equal expressions are one object."""

    def __init__(self):
        self._table: dict[tuple, Any] = {}

    def _make(self, cls, kind, args, *extra):
        key = (cls, kind, tuple(id(a) if isinstance(a, (Ix, Ex)) else a for a in args)) + extra
        hit = self._table.get(key)
        if hit is None:
            hit = cls(kind, tuple(args), *extra)
            self._table[key] = hit
        return hit

    # indices
    def var(self, name: str, extent: int) -> Ix:
        return self._make(Ix, "var", (name, extent))

    def const(self, v: int) -> Ix:
        return self._make(Ix, "const", (int(v),))

    def add(self, a: Ix, b: Ix) -> Ix:
        if a.kind == "const" and a.args[0] == 0:
            return b
        if b.kind == "const" and b.args[0] == 0:
            return a
        if a.kind == b.kind == "const":
            return self.const(a.args[0] + b.args[0])
        return self._make(Ix, "add", (a, b))

    def mul(self, a: Ix, c: int) -> Ix:
        if c == 0 or (a.kind == "const" and a.args[0] == 0):
            return self.const(0)
        if c == 1:
            return a
        if a.kind == "const":
            return self.const(a.args[0] * c)
        if a.kind == "mul":
            return self.mul(a.args[0], a.args[1] * c)
        return self._make(Ix, "mul", (a, c))

    def div(self, a: Ix, c: int) -> Ix:
        if c == 1:
            return a
        if a.kind == "const":
            return self.const(a.args[0] // c)
        if ix_bound(a) <= c:
            return self.const(0)
        if a.kind == "mul" and a.args[1] % c == 0:
            return self.mul(a.args[0], a.args[1] // c)
        if a.kind == "add":  # (x*c + y) / c = x + y / c when 0 <= y < c
            x, y = a.args
            for p, q in ((x, y), (y, x)):
                if p.kind == "mul" and p.args[1] % c == 0 and ix_bound(q) <= c:
                    return self.mul(p.args[0], p.args[1] // c)
        return self._make(Ix, "div", (a, c))

    def mod(self, a: Ix, c: int) -> Ix:
        if c == 1:
            return self.const(0)
        if a.kind == "const":
            return self.const(a.args[0] % c)
        if ix_bound(a) <= c:
            return a
        if a.kind == "mul" and a.args[1] % c == 0:
            return self.const(0)
        if a.kind == "add":  # (x*c + y) % c = y when 0 <= y < c
            x, y = a.args
            for p, q in ((x, y), (y, x)):
                if p.kind == "mul" and p.args[1] % c == 0 and ix_bound(q) <= c:
                    return q
        return self._make(Ix, "mod", (a, c))

    def shift(self, a: Ix, lo: int, step: int, n: int) -> Ix:
        if lo == 0 and step == 1 and ix_bound(a) <= n:
            return a
        return self._make(Ix, "shift", (a, lo, step, n))

    def ravel(self, index, shape) -> Ix:
        out = self.const(0)
        for i, d in zip(index, shape):
            out = self.add(self.mul(out, d), i)
        return out

    def unravel(self, flat: Ix, shape) -> tuple:
        out = []
        for d in reversed(shape):
            out.append(self.mod(flat, d))
            flat = self.div(flat, d)
        return tuple(reversed(out))

    # scalars
    def load(self, buf: Buffer, flat: Ix) -> Ex:
        return self._make(Ex, "load", (buf, flat), buf.dtype)

    def lit(self, value, dtype: DType) -> Ex:
        return self._make(Ex, "lit", (value,), dtype)

    def index(self, ix: Ix, dtype: DType) -> Ex:
        return self._make(Ex, "index", (ix,), dtype)

    def op(self, name: str, args, dtype: DType) -> Ex:
        return self._make(Ex, "op", (name,) + tuple(args), dtype)

    def rand(self, seed: Ex, step: Ex, stream: int, flat: Ix) -> Ex:
        return self._make(Ex, "rand", (seed, step, stream, flat), DType.f32)

    def reduce(self, op: str, vars_: tuple, body: Ex, dtype: DType) -> Ex:
        return self._make(Ex, "reduce", (op, tuple(vars_), body), dtype)


def format_ex(e: Ex) -> str:
    k, a = e.kind, e.args
    if k == "load":
        return f"{a[0].name}[{format_ix(a[1])}]"
    if k == "lit":
        return repr(a[0])
    if k == "index":
        return f"({e.dtype}){format_ix(a[0])}"
    if k == "op":
        return f"{a[0]}({', '.join(format_ex(x) for x in a[1:])})"
    if k == "rand":
        return f"rand(stream={a[2]}, {format_ix(a[3])})"
    vars_ = ", ".join(f"{v.args[0]}<{v.args[1]}" for v in a[1])
    return f"{a[0]}[{vars_}]({format_ex(a[2])})"


# --- kernels ---------------------------------------------------------------------------------


@dataclass
class Store:
    buf: Buffer
    flat: Ix
    value: Ex


@dataclass
class LoopNest:
    """for outer vars (flattened, shared out between threads): row stores, then for inner
    vars: stores. Values that depend only on outer vars are computed once per outer index."""

    outer: tuple                  # Ix vars, in loop order (split between threads)
    inner: tuple                  # Ix vars, in loop order
    row_stores: list[Store] = field(default_factory=list)
    stores: list[Store] = field(default_factory=list)
    serial: bool = False          # too little work to share out: thread 0 runs it


@dataclass
class Template:
    """A matmul/conv/pool/gather computed by a dedicated code template."""

    op: str                       # matmul | conv2d | conv2d_bwd_data | ... | take | scatter_add
    inputs: tuple                 # Buffers
    output: Buffer
    attrs: dict
    epilogue: LoopNest | None = None  # over the output's shape, same partition as the template


@dataclass
class Kernel:
    name: str
    phase: int
    parts: list                   # LoopNest | Template
    lines: tuple = ()             # .dln locations this kernel came from


@dataclass
class KernelProgram:
    """The whole step: buffers, kernels in phase order, where results are read."""

    kernels: list[Kernel]
    buffers: dict[str, Buffer]
    arena_bytes: int
    outputs: dict[str, Buffer]    # result name -> buffer read after the step
    copies: list[tuple[Buffer, Buffer]]  # (from, to) after the step: updates not done in place
    inputs: dict[str, Buffer]     # data/label/hyper inputs
    state: dict[str, Buffer]      # params and state


# --- text form (`dlc compile --dump-ir=kernel`) ----------------------------------------------


def _nest_lines(nest: LoopNest, indent: str, bounded: bool = False) -> list[str]:
    out = []
    outer = ", ".join(f"{v.args[0]} < {v.args[1]}" for v in nest.outer)
    share = "this thread's share of" if not bounded else "the template's share of"
    if nest.outer:
        out.append(f"{indent}for {outer}  ({'thread 0 only' if nest.serial else share + ' the rows'}):")
        indent += "  "
    for s in nest.row_stores:
        out.append(f"{indent}{s.buf.name}[{format_ix(s.flat)}] = {format_ex(s.value)}")
    if nest.stores:
        for v in (nest.inner if nest.outer else nest.inner):
            out.append(f"{indent}for {v.args[0]} < {v.args[1]}:")
            indent += "  "
        for s in nest.stores:
            out.append(f"{indent}{s.buf.name}[{format_ix(s.flat)}] = {format_ex(s.value)}")
    return out


def format_program(p: KernelProgram) -> str:
    lines = [f"program: {len(p.kernels)} kernels, arena {p.arena_bytes:,} bytes"]
    for name, buf in list(p.inputs.items()) + list(p.state.items()):
        lines.append(f"  {buf.kind:5s} {name}: {buf.dtype}{list(buf.shape)}")
    for k in p.kernels:
        lines.append(f"kernel {k.name} (phase {k.phase}; {', '.join(k.lines) or 'generated'}):")
        for part in k.parts:
            if isinstance(part, Template):
                ins = ", ".join(b.name for b in part.inputs)
                attrs = ", ".join(f"{a}={v}" for a, v in part.attrs.items() if v not in (False, None))
                lines.append(f"  {part.output.name} = {part.op}({ins}{', ' + attrs if attrs else ''})")
                if part.epilogue:
                    lines.append("  epilogue:")
                    lines += _nest_lines(part.epilogue, "    ", bounded=True)
            else:
                lines += _nest_lines(part, "  ")
    for src, dst in p.copies:
        lines.append(f"after the step: {dst.name} = {src.name}")
    for name, buf in p.outputs.items():
        lines.append(f"result {name} = {buf.name}")
    return "\n".join(lines) + "\n"
