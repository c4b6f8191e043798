"""Program-level checks, before any graph is built: names defined once, parameter lists,
no recursion between blocks, and which model a file's entry point is."""
from __future__ import annotations

from dlc.core.diagnostics import ArgumentError, DlcError, NameError_, Span, TypeError_, UsageError, did_you_mean
from dlc.language import nn
from dlc.language.recipe import RECIPE
from dlc.language.syntax import ast

RESERVED = {"true", "false", "output", "label", "params", "weights"}


def check_program(program: ast.Program) -> None:
    seen: dict[str, ast.Def] = {}
    for d in program.defs:
        if d.name in seen:
            raise NameError_(f"{d.kind} `{d.name}` is defined twice", d.name_span,
                             notes=[f"first defined at {seen[d.name].name_span}"])
        if d.name in nn.BUILTINS or d.name in RECIPE:
            raise NameError_(f"{d.kind} `{d.name}` has the name of a built-in function", d.name_span,
                             hint="choose another name")
        seen[d.name] = d
        _check_params(d)
    trained: dict[str, ast.Train] = {}
    for t in program.trains:
        target = seen.get(t.model)
        if target is None or target.kind != "model":
            models = [d.name for d in program.defs if d.kind == "model"]
            raise NameError_(f"train block names unknown model `{t.model}`", t.name_span,
                             hint=did_you_mean(t.model, models) or (
                                 f"models in this file: {', '.join(models)}" if models else
                                 "define a `model` first"))
        if t.model in trained:
            raise NameError_(f"model `{t.model}` has two train blocks", t.name_span,
                             notes=[f"the first is at {trained[t.model].name_span}"])
        trained[t.model] = t
    _check_recursion(program, seen)


def _check_params(d: ast.Def) -> None:
    results = set()
    for r in d.more:
        if r.name in RESERVED:
            raise NameError_(f"`{r.name}` is reserved and cannot name a result", r.span,
                             hint="the first result is the `output`; name the others")
        if r.name in results:
            raise NameError_(f"result `{r.name}` appears twice in {d.kind} `{d.name}`", r.span)
        results.add(r.name)
    names = set()
    for p in d.params:
        if p.name in names:
            raise NameError_(f"parameter `{p.name}` appears twice in {d.kind} `{d.name}`", p.span)
        if p.name in RESERVED:
            raise NameError_(f"`{p.name}` is reserved and cannot name a parameter", p.span)
        names.add(p.name)
    if not any(p.type is not None for p in d.params):
        raise ArgumentError(f"{d.kind} `{d.name}` needs at least one tensor input, like `x: f32[B, 4]`",
                            d.name_span)
    if not any(isinstance(s, ast.Return) for s in d.body):
        raise ArgumentError(f"{d.kind} `{d.name}` has no `return`", d.name_span,
                            hint="end the body with `return <expression>`")


def _check_recursion(program: ast.Program, defs: dict[str, ast.Def]) -> None:
    done: set[str] = set()  # definitions whose whole call tree is known to be fine

    def visit(name, stack):
        for stmt in defs[name].body:
            try:
                calls = ast.calls(stmt)
            except RecursionError:
                raise too_deep(stmt.span) from None
            for call in calls:
                callee = call.func.text
                if callee in defs and defs[callee].kind == "model":
                    raise TypeError_(f"`{callee}` is a model; only blocks can be called", call.func.span,
                                     hint=f"declare it as `block {callee}(...)`")
                if callee in defs:
                    if callee in stack:
                        raise NameError_(f"{defs[callee].kind} `{callee}` calls itself "
                                         f"({' -> '.join(stack + [callee])})", call.func.span,
                                         hint="blocks cannot be recursive; unroll the repetition")
                    if callee not in done:
                        visit(callee, stack + [callee])
        done.add(name)
    for name in defs:
        if name not in done:
            visit(name, [name])


def too_deep(span: Span) -> DlcError:
    return TypeError_("this expression is nested too deeply", span,
                      hint="split it into several statements")


def choose_model(program: ast.Program, name: str | None) -> ast.Def:
    models = [d for d in program.defs if d.kind == "model"]
    if name is not None:
        for d in models:
            if d.name == name:
                return d
        raise UsageError(f"no model named `{name}`", None,
                         hint=did_you_mean(name, [d.name for d in models]) or
                         f"models: {', '.join(d.name for d in models) or 'none'}")
    if not models:
        first = program.defs[0] if program.defs else None
        raise NameError_("this file defines no `model`", first.name_span if first else None,
                         hint=f"declare the entry point with `model {first.name}(...)` instead of `block`"
                         if first else "add `model name(x: f32[B, n]) -> f32[B, k] { ... }`")
    if len(models) == 1:
        return models[0]
    trained = [t.model for t in program.trains]
    if len(trained) == 1:
        return next(d for d in models if d.name == trained[0])
    raise NameError_(f"this file defines {len(models)} models ({', '.join(d.name for d in models)}); "
                     "say which one", models[1].name_span,
                     hint="pass --model NAME (or `model=` to dlc.load), or give one model a train block")
