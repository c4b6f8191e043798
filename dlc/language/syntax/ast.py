"""The surface language as frozen dataclasses; every node carries the span it was parsed from."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Union

from dlc.core.diagnostics import Span


@dataclass(frozen=True)
class Num:
    value: int | float
    span: Span


@dataclass(frozen=True)
class Str:
    value: str
    span: Span


@dataclass(frozen=True)
class Name:
    parts: tuple[str, ...]  # `a.b.c` -> ("a", "b", "c")
    span: Span

    @property
    def text(self) -> str:
        return ".".join(self.parts)


@dataclass(frozen=True)
class ListLit:
    items: tuple["Expr", ...]
    span: Span


@dataclass(frozen=True)
class BinOp:
    op: str  # add sub mul div matmul pow, and the comparisons lt le gt ge eq ne
    lhs: "Expr"
    rhs: "Expr"
    span: Span


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    span: Span


@dataclass(frozen=True)
class Kwarg:
    name: str
    value: "Expr"
    span: Span


@dataclass(frozen=True)
class Call:
    """`f(a, k=v)`; a pipe `a |> f(b)` is a Call with `piped=True` and `a` first."""

    func: Name
    args: tuple["Expr", ...]
    kwargs: tuple[Kwarg, ...]
    span: Span
    piped: bool = False


@dataclass(frozen=True)
class Slice:
    start: "Expr | None"
    stop: "Expr | None"
    step: "Expr | None"
    span: Span


@dataclass(frozen=True)
class TupleLit:
    """`(a, b)`, or the values of `return a, b`: what a function with several results gives."""

    items: tuple["Expr", ...]
    span: Span


@dataclass(frozen=True)
class Index:
    value: "Expr"
    subscripts: tuple["Expr | Slice", ...]
    span: Span


Expr = Union[Num, Str, Name, ListLit, TupleLit, BinOp, Neg, Call, Index]


@dataclass(frozen=True)
class TypeExpr:
    dtype: str
    dims: tuple[int | str, ...]  # symbolic dims are names
    span: Span


@dataclass(frozen=True)
class NamedResult:
    """A result after the first in `-> (f32[B, 10], h: f32[B, 64])`."""

    name: str
    type: TypeExpr
    span: Span


@dataclass(frozen=True)
class Param:
    """A block or model parameter: a tensor (`x: f32[B, 3]`) or a value with a default (`k=3`)."""

    name: str
    type: TypeExpr | None
    default: Expr | None
    span: Span


@dataclass(frozen=True)
class Assign:
    target: str
    value: Expr
    span: Span


@dataclass(frozen=True)
class Unpack:
    """`out, (h, c) = expr`: targets are names or nested tuples of them."""

    targets: tuple  # of str | tuple (nested)
    value: Expr
    span: Span

    @property
    def names(self) -> list[str]:
        out: list[str] = []

        def visit(t):
            if isinstance(t, str):
                out.append(t)
            else:
                for x in t:
                    visit(x)
        visit(self.targets)
        return out


@dataclass(frozen=True)
class StateDecl:
    """`state h: f32[B, 64] = zeros`: a value carried from one batch to the next."""

    name: str
    type: TypeExpr
    init: Expr | None
    span: Span


@dataclass(frozen=True)
class ParamDecl:
    name: str
    type: TypeExpr
    init: Expr
    span: Span
    options: tuple[Option, ...] = ()  # `, trainable=false`


@dataclass(frozen=True)
class Return:
    value: Expr
    span: Span


Stmt = Union[Assign, Unpack, ParamDecl, StateDecl, Return]


@dataclass(frozen=True)
class Def:
    """A `model` (an entry point) or a `block` (a reusable layer)."""

    kind: str  # "model" | "block"
    name: str
    params: tuple[Param, ...]
    result: TypeExpr  # the first result: a model's `output`
    body: tuple[Stmt, ...]
    span: Span
    name_span: Span
    more: tuple[NamedResult, ...] = ()  # the named results after the first

    @property
    def n_results(self) -> int:
        return 1 + len(self.more)


@dataclass(frozen=True)
class Option:
    name: str
    value: Expr
    span: Span


@dataclass(frozen=True)
class Train:
    model: str
    options: tuple[Option, ...]
    span: Span
    name_span: Span


@dataclass(frozen=True)
class Program:
    defs: tuple[Def, ...]
    trains: tuple[Train, ...]


def walk(node) -> list:
    """Every AST node inside `node` (a node or a tuple of nodes), children before their parent:
    a call's arguments come before the call, in evaluation order."""
    out: list = []
    _walk(node, out)
    return out


def _walk(node, out: list) -> None:
    if isinstance(node, (list, tuple)):
        for x in node:
            _walk(x, out)
        return
    children = _CHILDREN.get(type(node))
    if children is None:  # a leaf: a number, a string, None
        return
    for f in children:
        _walk(getattr(node, f), out)
    out.append(node)


def calls(node) -> list[Call]:
    """Every call inside an expression or statement, in evaluation order (arguments first)."""
    return [n for n in walk(node) if isinstance(n, Call)]


def names(node) -> list[Name]:
    """Every name inside an expression, function names included."""
    return [n for n in walk(node) if isinstance(n, Name)]


# node class -> the fields that may hold nodes (spans never do)
_CHILDREN = {cls: tuple(f.name for f in fields(cls) if f.name not in ("span", "name_span"))
             for cls in (Num, Str, Name, ListLit, TupleLit, BinOp, Neg, Kwarg, Call, Slice, Index, TypeExpr,
                         NamedResult, Param, Assign, Unpack, ParamDecl, StateDecl, Return, Def, Option,
                         Train, Program)}
