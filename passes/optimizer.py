"""optimizer: turn a graph with `grad:<param>` results into one training step.

Appends the parameter update rule of the chosen optimizer (sgd with momentum /
nesterov, adagrad, adadelta, rmsprop, adam, adamw, perceptron), optional weight decay and
gradient clipping by global norm. Optimizer state (moments, accumulators) becomes
`state` inputs named `<param>:<slot>` with matching updates; the step counter `step`
counts steps. The learning rate is the `lr` input (role hyper), so schedules never
recompile. When the loss is not finite the step leaves every parameter and state
unchanged, so the runtime can report the op that went wrong. With `check_gradients`
(the train block's `check_numerics`) non-finite gradients do the same, and the step
outputs `gradient_check`: 0, or NaN when some gradient element is not finite.
"""
from __future__ import annotations

import math

from dlc.core.builder import GraphBuilder, Value
from dlc.core.graph import Graph
from dlc.core.spec import Spec
from dlc.core.types import DType, TensorType
from dlc.passes.mask_batch import VALID, batch_symbol

SCALAR = TensorType(DType.f32, ())


def _slot(b: GraphBuilder, param: str, slot: str, like: Value) -> Value:
    return b.input(f"{param}:{slot}", like.type, "state")


def _sgd(b, p, g, a, lr, t, name, new):
    if a["momentum"]:
        buf = _slot(b, name, "momentum", p)
        buf_new = buf * a["momentum"] + g
        new[f"{name}:momentum"] = buf_new
        g = g + buf_new * a["momentum"] if a["nesterov"] else buf_new
    return p - g * lr


def _adagrad(b, p, g, a, lr, t, name, new):
    acc = _slot(b, name, "sum", p)
    acc_new = acc + g * g
    new[f"{name}:sum"] = acc_new
    return p - g * lr / (b.sqrt(acc_new) + a["eps"])


def _adadelta(b, p, g, a, lr, t, name, new):
    rho, eps = a["rho"], a["eps"]
    sq, acc = _slot(b, name, "square_avg", p), _slot(b, name, "acc_delta", p)
    sq_new = sq * rho + g * g * (1.0 - rho)
    delta = b.sqrt(acc + eps) / b.sqrt(sq_new + eps) * g
    new[f"{name}:square_avg"] = sq_new
    new[f"{name}:acc_delta"] = acc * rho + delta * delta * (1.0 - rho)
    return p - delta * lr


def _rmsprop(b, p, g, a, lr, t, name, new):
    alpha = a["alpha"]
    sq = _slot(b, name, "square_avg", p)
    sq_new = sq * alpha + g * g * (1.0 - alpha)
    new[f"{name}:square_avg"] = sq_new
    step = g / (b.sqrt(sq_new) + a["eps"])
    if a["momentum"]:
        buf = _slot(b, name, "momentum", p)
        step = buf * a["momentum"] + step
        new[f"{name}:momentum"] = step
    return p - step * lr


def _adam(b, p, g, a, lr, t, name, new):
    b1, b2 = a["beta1"], a["beta2"]
    m, v = _slot(b, name, "m", p), _slot(b, name, "v", p)
    m_new = m * b1 + g * (1.0 - b1)
    v_new = v * b2 + g * g * (1.0 - b2)
    new[f"{name}:m"], new[f"{name}:v"] = m_new, v_new
    # bias corrections 1 - beta^t are scalars, computed once per step
    c1 = 1.0 - b.const(b1) ** t
    c2 = 1.0 - b.const(b2) ** t
    return p - (lr / c1) * m_new / (b.sqrt(v_new) / b.sqrt(c2) + a["eps"])


def _perceptron(b, p, g, a, lr, t, name, new):
    # g is the gradient of perceptron_error: with a straight-through `step` output,
    # g = sum over the batch of (y_hat - y) * x, so this is w <- w + lr * (y - y_hat) * x
    return p - g * lr


def perceptron_error(graph: Graph, span=None) -> Graph:
    """The graph with a `perceptron_error` result, E = 1/2 * sum over the batch of (output -
    label)^2: summed, not averaged, so that its gradient through a straight-through `step` is
    exactly the perceptron rule's (y - y_hat) * x per sample. `perceptron()` differentiates E
    instead of the loss, which is only reported."""
    from dlc.core.diagnostics import ArgumentError
    g = graph.copy()
    b = GraphBuilder(g)
    out = b.value(g.outputs["output"])
    labels = g.inputs("label")
    if not labels or g.node(labels[0]).type != out.type:
        raise ArgumentError(f"`perceptron()` learns from the error y - y_hat of the output ({out.type}), so it "
                            "needs labels shaped like the output", span,
                            hint="train it with `loss = mse(output, label)` (the loss is only reported)")
    with b.at(span):
        d = out - b.value(labels[0])
        valid = [i for i in g.inputs("hyper") if g.node(i).attrs["name"] == VALID]
        if valid and batch_symbol(g) is not None and out.type.shape[0] == batch_symbol(g):
            # mask_batch ran before: the rows of a padded batch past `valid_rows` add no error
            rows = b.lt(b.iota((out.type.shape[0],), 0), b.value(valid[0]))
            d = b.where(b.broadcast(rows, out.type.shape, (0,)), d, b.lift(0, out.type.dtype))
        g.outputs["perceptron_error"] = (b.sum(d * d) * 0.5).id
    return g


RULES = {"perceptron": _perceptron, "sgd": _sgd, "adagrad": _adagrad, "adadelta": _adadelta, "rmsprop": _rmsprop,
         "adam": _adam, "adamw": _adam}


def optimizer(graph: Graph, spec: Spec, clip: float | None = None, span=None,
              check_gradients: bool = False) -> Graph:
    g = graph.copy()
    b = GraphBuilder(g)
    with b.at(span):
        _append_updates(g, b, spec, clip, check_gradients)
    g.outputs.pop("output", None)
    g.remove_unused()
    return g


def _append_updates(g: Graph, b: GraphBuilder, spec: Spec, clip: float | None, check_gradients: bool) -> None:
    a = spec.args
    names = [g.node(i).attrs["name"] for i in g.inputs("param")]
    params = {n: b.value(g.input_named(n)) for n in names}
    grads = {n: b.value(g.outputs.pop(f"grad:{n}")) for n in names}

    lr = b.input("lr", SCALAR, "hyper")
    try:
        step = b.value(g.input_named("step"))
    except KeyError:
        step = b.input("step", TensorType(DType.i32, ()), "state")
    step_new = step + 1
    t = b.cast(step_new, DType.f32)
    # x * 0 is 0 for a finite x and NaN for NaN or Inf, so a sum of such products is 0 or NaN;
    # it reads every gradient before any update, so updates are no GEMM epilogues then
    check = None
    if check_gradients and grads:
        for gr in grads.values():
            probe = b.sum(gr * 0.0)
            check = probe if check is None else check + probe
        g.outputs["gradient_check"] = check.id

    if clip is not None and grads:  # scale all gradients by min(1, clip / global norm)
        total = None
        for gr in grads.values():
            sq = b.sum(gr * gr)
            total = sq if total is None else total + sq
        scale = b.minimum(b.const(clip) / (b.sqrt(total) + 1e-6), 1.0)
        grads = {n: gr * scale for n, gr in grads.items()}

    new: dict[str, Value] = {}
    rule = RULES[spec.name]
    wd = a.get("weight_decay", 0.0)
    for n in names:
        p, gr = params[n], grads[n]
        if wd and spec.name != "adamw":
            gr = gr + p * wd  # L2 penalty folded into the gradient (PyTorch's weight_decay)
        if wd and spec.name == "adamw":
            p = p * (1.0 - lr * wd)  # decoupled decay
        new[n] = rule(b, p, gr, a, lr, t, n, new)
    new["step"] = step_new

    # a non-finite loss leaves everything as it was (NaN fails every comparison); this
    # also guards updates the model made itself (batchnorm running statistics)
    loss = b.value(g.outputs["loss"])
    finite = b.lt(b.abs(loss if check is None else loss + check), math.inf)
    new.update({k: b.value(v) for k, v in g.updates.items()})
    for name, value in new.items():
        old = b.value(g.input_named(name))
        g.updates[name] = b.where(finite, value, old).id
