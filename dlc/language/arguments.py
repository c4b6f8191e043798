"""Binding call arguments to a built-in's Python signature (layers, losses, data sources,
optimizers...) and checking each against its annotation, with the argument's span."""
from __future__ import annotations

import functools
import inspect
import typing
from typing import Any

from dlc.core.builder import Value
from dlc.core.diagnostics import ArgumentError, Span, did_you_mean
from dlc.language import nn
from dlc.language.initializers import ARITY as INIT_ARITY, Init
from dlc.language.syntax import ast
from dlc.language.values import FunctionRef, describe


def bind_arguments(entry: nn.Builtin, args: list, kwargs: dict, call: ast.Call, kwspans: dict,
                   skip_ctx: bool, spans_out: dict | None = None) -> dict:
    """Bind call arguments to the entry's Python signature and check them against its annotations."""
    params, hints = _signature(entry.fn)
    params = params[1 if skip_ctx else 0:]
    names = [p.name for p in params]
    bound: dict[str, Any] = {}
    spans: dict[str, Span] = {}
    if len(args) > len(params):
        raise ArgumentError(f"`{entry.name}` takes at most {len(params)} argument(s), got {len(args)}",
                            call.span, hint=f"usage: {usage(entry)}")
    for p, a, ae in zip(params, args, call.args):
        bound[p.name], spans[p.name] = a, ae.span
    for k, v in kwargs.items():
        if k not in names:
            raise ArgumentError(f"`{entry.name}` has no argument `{k}`", kwspans[k],
                                hint=did_you_mean(k, names) or f"usage: {usage(entry)}")
        if k in bound:
            raise ArgumentError(f"argument `{k}` of `{entry.name}` is given twice", kwspans[k])
        bound[k], spans[k] = v, kwspans[k]
    for p in params:
        if p.name not in bound:
            if p.default is inspect.Parameter.empty:
                piped = " (the piped value counts as the first)" if call.piped else ""
                raise ArgumentError(f"`{entry.name}` is missing argument `{p.name}`{piped}", call.span,
                                    hint=f"usage: {usage(entry)}")
            continue
        bound[p.name] = _convert(entry.name, p.name, bound[p.name], hints.get(p.name), spans[p.name])
    if spans_out is not None:
        spans_out.update(spans)
    return bound


@functools.lru_cache(maxsize=None)
def _signature(fn) -> tuple[list[inspect.Parameter], dict]:
    """A built-in's parameters and annotations; computed once, as every call needs them."""
    return list(inspect.signature(fn).parameters.values()), typing.get_type_hints(fn)


def usage(entry: nn.Builtin) -> str:
    params, _ = _signature(entry.fn)
    if params and params[0].name == "ctx":
        params = params[1:]
    parts = [p.name if p.default is inspect.Parameter.empty else f"{p.name}={_show_default(p.default)}"
             for p in params]
    return f"{entry.name}({', '.join(parts)})"


def _show_default(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, str):
        return f'"{v}"'
    return str(v)


def _convert(fname: str, pname: str, v, hint, span: Span):
    """Check one argument against its annotation; return it in the form the function wants."""
    options = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
    for want in options:
        ok, out = _accepts(want, v)
        if ok:
            return out
    names = " or ".join(_type_name(t) for t in options if t is not type(None))
    hint = "take it apart first: `out, h = gru(x, n, return_state=true)`, `out, (h, c) = lstm(...)`" \
        if isinstance(v, tuple) else None
    raise ArgumentError(f"`{fname}`: argument `{pname}` must be {names}, got {describe(v)}", span, hint=hint)


def _accepts(want, v):
    if want is type(None):
        return v is None, v
    if want is nn.Tensor:
        return isinstance(v, Value), v
    if want is bool:
        return isinstance(v, bool), v
    if want is int:
        return isinstance(v, int) and not isinstance(v, bool), v
    if want is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool), float(v) if isinstance(v, (int, float)) else v
    if want is str:
        if isinstance(v, FunctionRef):
            return True, v.name
        return isinstance(v, str), v
    if want is nn.Pair:  # layers check that kernels and strides are positive; padding may be 0
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return True, v
        if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                        and x >= 0 for x in v):
            return True, tuple(v)
        return False, v
    if want is Init:
        if isinstance(v, FunctionRef) and v.name in INIT_ARITY and INIT_ARITY[v.name][0] == 0:
            return True, Init(v.name)
        return isinstance(v, Init), v
    if want is nn.ParamList:
        if isinstance(v, Value) and v.node.attrs.get("role") == "param":
            return True, nn.ParamList([v])
        return isinstance(v, nn.ParamList), v
    if want is list:
        return isinstance(v, list), v
    if want is nn.States:  # a tensor, or a tuple or list of tensors
        if isinstance(v, Value):
            return True, v
        if isinstance(v, (tuple, list)) and v and all(isinstance(x, Value) for x in v):
            return True, tuple(v)
        return False, v
    return False, v


def _type_name(t) -> str:
    return {nn.Tensor: "a tensor", bool: "true or false", int: "an integer", float: "a number",
            str: "a string", nn.Pair: "an integer or [h, w]", Init: "an initializer",
            nn.ParamList: "parameters (`params`, `weights` or a parameter name)", list: "a list",
            nn.States: "a tensor or a tuple of tensors"}.get(t, str(t))
