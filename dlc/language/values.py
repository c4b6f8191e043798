"""What .dln expressions evaluate to, and where names live while the frontend evaluates them.

A value is a tensor (`Value`), a number, a string, a boolean, a list, a symbolic
dimension, an initializer, or a reference to a function by name (`FunctionRef`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dlc.core.builder import Value
from dlc.core.diagnostics import Span
from dlc.core.types import Sym
from dlc.language.initializers import Init


@dataclass(frozen=True)
class FunctionRef:
    """A bare function name used as a value (`metrics = [accuracy]`, `init=he_normal`)."""

    name: str
    span: Span


@dataclass
class Scope:
    vars: dict[str, Any]
    dims: dict[str, Any]  # symbol -> int | Sym
    prefix: str           # "" for the model, "r1." inside the block instance bound to r1
    context: str          # "model" | "loss" | "option"
    rest: tuple = ()      # (body, i): its statements from i on follow the one being checked (hints)


def describe(v) -> str:
    """A value as messages name it: `a tensor f32[B, 10]`, `the integer 3`."""
    if isinstance(v, Value):
        return f"a tensor {v.type}"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return f"the integer {v}"
    if isinstance(v, float):
        return f"the number {v}"
    if isinstance(v, str):
        return f'the string "{v}"'
    if isinstance(v, Sym):
        return f"the symbolic dimension {v}"
    if isinstance(v, FunctionRef):
        return f"the function `{v.name}`"
    if isinstance(v, Init):
        return f"the initializer {v}"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, tuple):
        return f"a tuple {structure(v)}"
    return type(v).__name__


def structure(v) -> str:
    """A value's shape as unpacking sees it: `(f32[B,8], (f32[B,8], f32[B,8]))`."""
    if isinstance(v, tuple):
        return "(" + ", ".join(structure(x) for x in v) + ")"
    if isinstance(v, Value):
        return str(v.type)
    return describe(v)
