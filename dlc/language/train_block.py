"""The train block: its options checked and evaluated into a TrainConfig, and the loss
(and accuracy) built into the model's graph by the frontend that built the model."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from dlc.core.builder import Value
from dlc.core.diagnostics import ArgumentError, DlcError, NameError_, TypeError_, did_you_mean
from dlc.core.types import DType, TensorType
from dlc.language import nn
from dlc.language.arguments import bind_arguments
from dlc.language.recipe import INT_OPTION_MAX, NORMALIZE, OPTIONS, RECIPE, Spec, TrainConfig, check_augment
from dlc.language.syntax import ast
from dlc.language.values import FunctionRef, Scope, describe

if TYPE_CHECKING:
    from dlc.language.frontend import Frontend


def build_train(fe: Frontend, train: ast.Train, output: Value) -> TrainConfig:
    """Check the options and add the loss (and metrics) to the graph `fe` built the model into."""
    opts: dict[str, ast.Option] = {}
    for o in train.options:
        if o.name not in OPTIONS:
            raise NameError_(f"unknown train option `{o.name}`", o.span,
                             hint=did_you_mean(o.name, OPTIONS) or f"options: {', '.join(OPTIONS)}")
        if o.name in opts:
            raise NameError_(f"train option `{o.name}` is set twice", o.span,
                             notes=[f"first set at {opts[o.name].span}"])
        opts[o.name] = o
    for name, (_, required) in OPTIONS.items():
        if required and name not in opts:
            raise ArgumentError(f"train block for `{train.model}` has no `{name}`", train.name_span,
                                hint={"data": "for example `data = digits(test=0.2)`, or `data = arrays()` for the "
                                              "arrays given to fit(x, y) in Python",
                                      "loss": "for example `loss = cross_entropy(output, label)`"}[name])
    values: dict[str, Any] = {}
    scope = Scope({}, {}, "", "option")
    for name, o in opts.items():
        if name != "loss":
            values[name] = option_value(fe, name, o, scope)
    loss_ast = opts["loss"].value
    label = _label_input(fe, loss_ast, output)
    # the loss sees the model's output, the labels, and the model's inputs by name
    # (an autoencoder's loss is `mse(output, x)`)
    loss_scope = Scope({**fe.model_inputs, "output": output}, {}, "", "loss")
    if label is not None:
        loss_scope.vars["label"] = label
    with fe.b.at(opts["loss"].span):
        loss = fe.eval(loss_ast, loss_scope)
    if not isinstance(loss, Value) or loss.rank != 0 or not loss.dtype.is_float:
        raise TypeError_(f"the loss must be a scalar, got {describe(loss)}", loss_ast.span,
                         hint="losses like cross_entropy(...) and mean(...) give scalars")
    fe.graph.outputs["loss"] = loss.id
    if fe.loss_masks or fe.masks.get(output.id) is not None:
        # the loss keeps only some positions: per-class scores of every position would disagree
        fe.graph.meta["loss_masks_positions"] = True
    loss_fn = next((c.func.text for c in ast.calls(loss_ast) if c.func.text in nn.CLASSIFIERS), None)
    metrics = values.get("metrics")
    if metrics is None:  # (a loss that never names `label` has no labels to score against)
        metrics = ("accuracy",) if loss_fn and label is not None else ()
    for m in metrics:
        if m == "accuracy":
            if loss_fn is None:
                raise ArgumentError(f"`accuracy` needs a classification loss ({nn.CLASSIFICATION_LOSSES})",
                                    opts["metrics"].value.span,
                                    hint="drop `metrics`, or train with a classification loss")
            if label is None:
                raise ArgumentError("`accuracy` scores the output against `label`, which the loss does not use",
                                    opts["metrics"].value.span,
                                    hint="drop `metrics`, or compare the output with `label` in the loss")
            logits = any(c.func.text == "bce" and any(k.name == "from_logits" and isinstance(k.value, ast.Name)
                                                      and k.value.text == "true" for k in c.kwargs)
                         for c in ast.calls(loss_ast))
            # per position (token) when the output is a sequence; over the steps the loss kept
            mask = fe.loss_masks[0] if fe.loss_masks else fe.masks.get(output.id)
            with fe.b.at(opts["loss"].span):
                fe.graph.outputs["accuracy"] = nn.accuracy(fe.b, output, label, loss_fn, logits, mask).id
    spans = {name: o.span for name, o in opts.items()}
    shuffle = values.get("shuffle", not fe.carries)
    if fe.carries and shuffle:
        raise ArgumentError("a model with `state` reads its batches in order; shuffling would carry the "
                            "state into unrelated samples", opts["shuffle"].value.span,
                            notes=[f"`{name}` is declared at {spec.span}" for name, (spec, _) in fe.carries.items()][:1],
                            hint="drop `shuffle` (such a model does not shuffle by default)")
    return TrainConfig(model=train.model, data=values["data"], loss=loss_ast,
                       optimizer=values.get("optimizer") or RECIPE["sgd"].fn(),
                       batch=values.get("batch", 32), epochs=values.get("epochs", 10),
                       seed=values.get("seed", 0), metrics=tuple(metrics),
                       schedule=values.get("schedule") or RECIPE["constant"].fn(),
                       clip=values.get("clip"), checkpoint=values.get("checkpoint"),
                       normalize=values.get("normalize"), shuffle=shuffle,
                       validation=values.get("validation"), early_stop=values.get("early_stop"),
                       keep_best=values.get("keep_best", False),
                       check_numerics=values.get("check_numerics", False),
                       augment=values.get("augment", ()), spans=spans)


def _label_input(fe: Frontend, loss_ast, output: Value) -> Value | None:
    """Labels are integers for cross_entropy(..., label), one per position of the output
    without its class axis ([B] for [B, K], [B, T] for [B, T, K]), else shaped like the
    output; a loss that never names `label` (an autoencoder's) has no label input."""
    if not any(isinstance(n, ast.Name) and n.text == "label" for n in ast.names(loss_ast)):
        return None
    t = output.type
    for c in ast.calls(loss_ast):
        if c.func.text in ("cross_entropy", "multi_hinge") and len(c.args) > 1 and isinstance(c.args[1], ast.Name) \
                and c.args[1].text == "label":
            t = TensorType(DType.i32, output.shape[:-1] if output.rank >= 2 else output.shape[:1])
    with fe.b.at(None):
        return fe.b.input("label", t, "label")


def option_value(fe: Frontend, name: str, o: ast.Option, scope: Scope):
    kind = OPTIONS[name][0]
    e = o.value
    if kind == "normalize" and isinstance(e, ast.Name) and e.text in NORMALIZE:
        return e.text  # `normalize = standard`
    if kind in ("data", "optimizer", "schedule"):
        spec = recipe_call(fe, e, kind, scope)
        return spec
    if kind == "validation":
        return validation_value(fe, e, scope)
    if kind == "early_stop":
        return recipe_call(fe, _monitor_as_string(e), "early_stop", scope)
    if kind == "metrics":
        items = e.items if isinstance(e, ast.ListLit) else (e,)
        out = []
        for it in items:
            spec = recipe_call(fe, it, "metric", scope)
            out.append(spec.name)
        return tuple(out)
    if kind == "augment":  # `augment = [flip, crop(pad=4)]`, checked against the model's input
        out = []
        for it in e.items if isinstance(e, ast.ListLit) else (e,):
            spec = recipe_call(fe, it, "augment", scope)
            if fe.model_inputs:  # (none for a command-line override: the runtime checks it)
                name, value = next(iter(fe.model_inputs.items()))
                try:
                    check_augment(spec, name, value.type)
                except DlcError as err:
                    raise err.with_span(it.span)
            out.append(spec)
        return tuple(out)
    v = fe.eval(e, scope)
    if kind == "int":
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "seed" else 1):
            raise ArgumentError(f"`{name}` must be a {'non-negative' if name == 'seed' else 'positive'} "
                                f"integer, got {describe(v)}", e.span)
        if v > INT_OPTION_MAX:
            raise ArgumentError(f"`{name}` must be at most {INT_OPTION_MAX:,}, got {v:,}", e.span,
                                hint="it is a 32-bit integer")
        return v
    if kind == "float":
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise ArgumentError(f"`{name}` must be a positive number, got {describe(v)}", e.span)
        return float(v)
    if kind == "bool":
        if not isinstance(v, bool):
            raise ArgumentError(f"`{name}` must be true or false, got {describe(v)}", e.span)
        return v
    if kind == "str":
        if not isinstance(v, str):
            raise ArgumentError(f"`{name}` must be a string, got {describe(v)}", e.span)
        return v
    if kind == "normalize":
        if isinstance(v, FunctionRef):
            v = v.name
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return float(v)
        if v in NORMALIZE:
            return v
        raise ArgumentError(f"`normalize` must be one of {', '.join(NORMALIZE)} or a positive "
                            f"scale, got {describe(v)}", e.span)
    raise AssertionError(kind)


def validation_value(fe: Frontend, e, scope: Scope):
    """`validation = 0.1` (a share of the training split) or `validation = npz("val.npz")`."""
    if isinstance(e, (ast.Call, ast.Name)) and (e.func.text if isinstance(e, ast.Call) else e.text) in RECIPE:
        return recipe_call(fe, e, "data", scope)
    v = fe.eval(e, scope)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        raise ArgumentError(f"`validation` must be a share of the training split in (0, 1) or a data "
                            f"source, got {describe(v)}", e.span, hint='for example `validation = 0.1` or '
                            '`validation = npz("val.npz")`')
    return float(v)


def _monitor_as_string(e):
    """`early_stop(monitor=val_loss)`: the metric may be written bare, like `normalize = standard`."""
    if not isinstance(e, ast.Call):
        return e
    kwargs = tuple(ast.Kwarg(k.name, ast.Str(k.value.text, k.value.span), k.span)
                   if k.name == "monitor" and isinstance(k.value, ast.Name) else k for k in e.kwargs)
    args = tuple(ast.Str(a.text, a.span) if i == 0 and isinstance(a, ast.Name) else a
                 for i, a in enumerate(e.args))
    return dataclasses.replace(e, args=args, kwargs=kwargs)


def recipe_call(fe: Frontend, e, kind: str, scope: Scope) -> Spec:
    """`adam(lr=1e-3)` or a bare `adam` -> Spec, checked against the entry's signature."""
    if isinstance(e, ast.Name):
        call = ast.Call(e, (), (), e.span)
    elif isinstance(e, ast.Call):
        call = e
    else:
        raise TypeError_(f"expected {_KIND_WORDS.get(kind, kind)} like `{_example(kind)}`, got "
                         f"{describe(fe.eval(e, scope))}", e.span)
    fname = call.func.text
    entry = RECIPE.get(fname)
    if entry is None or entry.kind != kind:
        choices = [n for n, r in RECIPE.items() if r.kind == kind]
        hint = did_you_mean(fname, choices) or f"choose one of: {', '.join(choices)}"
        other = entry.kind if entry is not None else (
            nn.BUILTINS[fname].kind if fname in nn.BUILTINS else None)
        if other is not None:
            raise TypeError_(f"`{fname}` is {_KIND_WORDS.get(other, other)}, not {_KIND_WORDS.get(kind, kind)}",
                             call.func.span, hint=hint)
        noun = {"data": "data source", "schedule": "learning-rate schedule", "augment": "augmentation"}.get(kind, kind)
        raise NameError_(f"unknown {noun} `{fname}`", call.func.span, hint=hint)
    args, kwargs, kwspans = fe.eval_arguments(call, scope)
    bound = bind_arguments(entry, args, kwargs, call, kwspans, skip_ctx=False)
    try:
        return entry.fn(**bound)
    except DlcError as err:
        raise err.with_span(call.span)


_KIND_WORDS = {"data": "a data source", "optimizer": "an optimizer", "schedule": "a learning-rate schedule",
               "metric": "a metric", "early_stop": "early stopping", "augment": "a data augmentation",
               "layer": "a layer", "activation": "an activation", "function": "a function", "loss": "a loss",
               "regularizer": "a regularizer"}


def _example(kind):
    return {"data": "digits(test=0.2)", "optimizer": "adam(lr=1e-3)", "schedule": "cosine()",
            "metric": "accuracy", "early_stop": "early_stop(monitor=val_loss, patience=5)",
            "augment": "flip"}.get(kind, kind)
