"""Text form of the AST (`dlc compile --dump-ir=ast`): one node a line, with locations."""
from __future__ import annotations

from dlc.language.syntax import ast


def _loc(node) -> str:
    return f"  @{node.span.line}:{node.span.col}"


def _type(t: ast.TypeExpr) -> str:
    return f"{t.dtype}[{', '.join(str(d) for d in t.dims)}]" if t.dims else t.dtype


def _expr(e, depth: int, out: list[str], label: str = "") -> None:
    pad = "  " * depth + label
    if isinstance(e, ast.Num):
        out.append(f"{pad}num {e.value!r}{_loc(e)}")
    elif isinstance(e, ast.Str):
        out.append(f'{pad}str "{e.value}"{_loc(e)}')
    elif isinstance(e, ast.Name):
        out.append(f"{pad}name {e.text}{_loc(e)}")
    elif isinstance(e, (ast.ListLit, ast.TupleLit)):
        out.append(f"{pad}{'list' if isinstance(e, ast.ListLit) else 'tuple'}{_loc(e)}")
        for i in e.items:
            _expr(i, depth + 1, out)
    elif isinstance(e, ast.Neg):
        out.append(f"{pad}neg{_loc(e)}")
        _expr(e.operand, depth + 1, out)
    elif isinstance(e, ast.BinOp):
        out.append(f"{pad}{e.op}{_loc(e)}")
        _expr(e.lhs, depth + 1, out)
        _expr(e.rhs, depth + 1, out)
    elif isinstance(e, ast.Call):
        out.append(f"{pad}call {e.func.text}{' (piped)' if e.piped else ''}{_loc(e)}")
        for a in e.args:
            _expr(a, depth + 1, out)
        for k in e.kwargs:
            _expr(k.value, depth + 1, out, f"{k.name}=")
    elif isinstance(e, ast.Index):
        out.append(f"{pad}index{_loc(e)}")
        _expr(e.value, depth + 1, out)
        for s in e.subscripts:
            _expr(s, depth + 1, out)
    elif isinstance(e, ast.Slice):
        out.append(f"{pad}slice{_loc(e)}")
        for part, v in (("start=", e.start), ("stop=", e.stop), ("step=", e.step)):
            if v is not None:
                _expr(v, depth + 1, out, part)
    else:
        raise AssertionError(e)


def _targets(t) -> str:
    return t if isinstance(t, str) else "(" + ", ".join(_targets(x) for x in t) + ")"


def format_ast(program: ast.Program) -> str:
    out: list[str] = []
    for d in program.defs:
        params = ", ".join(f"{p.name}: {_type(p.type)}" if p.type else f"{p.name}=…" for p in d.params)
        result = _type(d.result) if not d.more else \
            "(" + ", ".join([_type(d.result)] + [f"{r.name}: {_type(r.type)}" for r in d.more]) + ")"
        out.append(f"{d.kind} {d.name}({params}) -> {result}{_loc(d)}")
        for p in d.params:
            if p.default is not None:
                _expr(p.default, 1, out, f"default {p.name}=")
        for s in d.body:
            if isinstance(s, ast.Assign):
                out.append(f"  assign {s.target}{_loc(s)}")
                _expr(s.value, 2, out)
            elif isinstance(s, ast.Unpack):
                out.append(f"  unpack {', '.join(_targets(x) for x in s.targets)}{_loc(s)}")
                _expr(s.value, 2, out)
            elif isinstance(s, ast.ParamDecl):
                out.append(f"  param {s.name}: {_type(s.type)}{_loc(s)}")
                _expr(s.init, 2, out, "init=")
                for o in s.options:
                    _expr(o.value, 2, out, f"{o.name}=")
            elif isinstance(s, ast.StateDecl):
                out.append(f"  state {s.name}: {_type(s.type)}{_loc(s)}")
                if s.init is not None:
                    _expr(s.init, 2, out, "init=")
            else:
                out.append(f"  return{_loc(s)}")
                _expr(s.value, 2, out)
    for t in program.trains:
        out.append(f"train {t.model}{_loc(t)}")
        for o in t.options:
            out.append(f"  option {o.name}{_loc(o)}")
            _expr(o.value, 2, out)
    return "\n".join(out) + "\n"
