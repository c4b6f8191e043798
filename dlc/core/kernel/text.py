"""The kernel IR's text form (`dlc compile --dump-ir=kernel`).

Scalar expressions used more than once in a loop nest are printed once, let-bound
(`%3 = exp(...)`) at the outermost loop level where their variables are all bound, as
jaxpr does, instead of being repeated in every store that reads them.
"""
from __future__ import annotations

from dlc.core.kernel.analysis import FreeVars, walk_ex
from dlc.core.kernel.ir import (Add, Clamp, Collective, Const, Div, Gather, Index, KernelProgram, Lit, Load, Loop,
                                LoopNest, Mod, Mul, Op, Rand, Reduce, Template, Var, ex_children)


def format_ix(e, names: dict | None = None) -> str:
    if isinstance(e, Var):
        return e.name
    if isinstance(e, Const):
        return str(e.value)
    if isinstance(e, Add):
        right = e.b
        if isinstance(right, Const) and right.value < 0:
            return f"{format_ix(e.a, names)} - {-right.value}"
        if isinstance(right, Mul) and right.c < 0:
            return f"{format_ix(e.a, names)} - {format_ix(right.a, names) if right.c == -1 else _factor(right.a, -right.c, names)}"
        return f"{format_ix(e.a, names)} + {format_ix(right, names)}"
    if isinstance(e, Mul):
        return _factor(e.a, e.c, names)
    if isinstance(e, (Div, Mod)):
        return f"{_paren(e.a, names)}{'//' if isinstance(e, Div) else '%'}{e.c}"
    if isinstance(e, Clamp):
        return f"clamp({format_ix(e.a, names)}, {e.lo}, {e.hi})"
    if isinstance(e, Gather):
        return f"int({format_ex(e.value, names)})"
    raise TypeError(f"not an index expression: {type(e).__name__}")


def _factor(a, c: int, names) -> str:
    return f"{_paren(a, names)}*{c}"


def _paren(a, names) -> str:
    text = format_ix(a, names)
    return f"({text})" if isinstance(a, Add) else text


def format_ex(e, names: dict | None = None) -> str:
    if names and id(e) in names:
        return names[id(e)]
    if isinstance(e, Load):
        return f"{e.buf.name}[{format_ix(e.index, names)}]"
    if isinstance(e, Lit):
        return repr(e.value)
    if isinstance(e, Index):
        return f"({e.dtype}){_paren(e.ix, names)}"
    if isinstance(e, Op):
        return f"{e.name}({', '.join(format_ex(x, names) for x in e.args)})"
    if isinstance(e, Rand):
        return f"rand(stream={e.stream}, {format_ix(e.flat, names)})"
    if isinstance(e, Reduce):
        vars_ = ", ".join(f"{v.name}<{v.extent}" for v in e.vars)
        return f"{e.op}[{vars_}]({format_ex(e.body, names)})"
    raise TypeError(f"not a scalar expression: {type(e).__name__}")


def _shared(nest: LoopNest, free: FreeVars) -> list:
    """Expressions worth a let: computed (not a leaf), read more than once, and free of
    reduction variables (so they can be bound at a loop level)."""
    uses: dict[int, int] = {}
    nodes = walk_ex([s.value for s in nest.row_stores + nest.stores])
    for e in nodes:
        for c in ex_children(e):
            uses[id(c)] = uses.get(id(c), 0) + 1
    for s in nest.row_stores + nest.stores:
        uses[id(s.value)] = uses.get(id(s.value), 0) + 1
    loop_vars = {v.name for v in nest.vars}
    return [e for e in nodes if uses.get(id(e), 0) > 1 and isinstance(e, (Op, Reduce, Rand))
            and free(e) <= loop_vars]


def _nest_lines(nest: LoopNest, indent: str, counter: list, bounded: bool = False) -> list[str]:
    free = FreeVars()
    names: dict[int, str] = {}
    shared = _shared(nest, free)
    outer = {v.name for v in nest.outer}

    def lets(level_ok, ind):
        out = []
        for e in shared:
            if id(e) not in names and level_ok(free(e)):
                text = format_ex(e, names)
                counter[0] += 1
                names[id(e)] = f"%{counter[0]}"
                out.append(f"{ind}{names[id(e)]} = {text}")
        return out

    out = []
    if nest.outer:
        loops = ", ".join(f"{v.name} < {v.extent}" for v in nest.outer)
        who = "the template's share" if bounded else "one worker" if nest.serial else "shared out"
        out.append(f"{indent}for {loops}  ({who}):")
        indent += "  "
    out += lets(lambda fv: fv <= outer, indent)
    for s in nest.row_stores:
        out.append(f"{indent}{s.buf.name}[{format_ix(s.flat, names)}] = {format_ex(s.value, names)}")
    if nest.stores:
        for v in nest.inner:
            out.append(f"{indent}for {v.name} < {v.extent}:")
            indent += "  "
        out += lets(lambda fv: True, indent)
        for s in nest.stores:
            out.append(f"{indent}{s.buf.name}[{format_ix(s.flat, names)}] = {format_ex(s.value, names)}")
    return out


def format_program(p: KernelProgram) -> str:
    lines = [f"program: {len(p.kernels)} kernels, arena {p.arena_bytes:,} bytes"]
    for name, buf in list(p.inputs.items()) + list(p.state.items()):
        lines.append(f"  {buf.kind:5s} {name}: {buf.dtype}{list(buf.shape)}")
    lines += _entries(p.kernels, "")
    for src, dst in p.copies:
        lines.append(f"after the step: {dst.name} = {src.name}")
    for name, buf in p.outputs.items():
        lines.append(f"result {name} = {buf.name}")
    return "\n".join(lines) + "\n"


def _entries(entries, indent: str) -> list[str]:
    lines = []
    for k in entries:
        where = ", ".join(k.lines) or "generated"
        if isinstance(k, Loop):
            order = f"{k.var.name} = {k.var.extent - 1} down to 0" if k.reverse else f"{k.var.name} < {k.var.extent}"
            lines.append(f"{indent}loop {k.name} (phase {k.phase}; {where}): for {order}, "
                         f"{k.phases} phases, a barrier after each:")
            for v in k.views:
                lines.append(f"{indent}  view {v.name} = {v.base.name}[{format_ix(v.at)} +: {v.size}]  "
                             f"{v.dtype}{list(v.shape)}")
            lines += _entries(k.body, indent + "  ")
            continue
        lines.append(f"{indent}kernel {k.name} (phase {k.phase}; {where}):")
        counter = [0]
        ind = indent + "  "
        for part in k.parts:
            if isinstance(part, Collective):
                targets = ", ".join(b.name for b in part.targets)
                sources = ", ".join(b.name for b in part.sources)
                what = {"sync": "", "start": "start ", "wait": "wait for "}[part.mode]
                lines.append(f"{ind}{what}bucket {part.bucket} ({part.nbytes:,} bytes, by the host): "
                             f"{targets} = {part.op}({sources})")
            elif isinstance(part, Template):
                ins = ", ".join(b.name for b in part.inputs)
                attrs = ", ".join(f"{a}={v}" for a, v in part.attrs.items() if v not in (False, None))
                lines.append(f"{ind}{part.output.name} = {part.op}({ins}{', ' + attrs if attrs else ''})")
                if part.epilogue:
                    lines.append(f"{ind}epilogue:")
                    lines += _nest_lines(part.epilogue, ind + "  ", counter, bounded=True)
            else:
                lines += _nest_lines(part, ind, counter)
    return lines
