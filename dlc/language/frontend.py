"""AST -> Graph: scopes, blocks, parameter naming, argument and shape checking with spans.

`build(program, model, mode)` gives the model's graph in "train" mode (dropout on,
batch statistics) or "eval" mode, plus the loss and metrics when a train block exists.
The program-level checks are in checks.py, argument binding in arguments.py and the
train block in train_block.py.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from dlc.core.builder import GraphBuilder, Value
from dlc.core.diagnostics import (ArgumentError, DlcError, DlcWarning, NameError_, ShapeMismatch, Span, TypeError_,
                                  did_you_mean)
from dlc.core.graph import Graph
from dlc.core.types import DType, ShapeError, Sym, TensorType, broadcast_shapes, dim_mul, prod, sym, unify
from dlc.language import nn
from dlc.language.arguments import bind_arguments
from dlc.language.checks import RESERVED, check_program, choose_model, too_deep
from dlc.language.initializers import ARITY as INIT_ARITY, Init, fans
from dlc.language.recipe import RECIPE, TrainConfig
from dlc.language.syntax import ast
from dlc.language.train_block import build_train
from dlc.language.values import FunctionRef, Scope, describe, structure

# far beyond any real model (an LSTM over 1,000 steps has ~17,000), and checked within seconds
MAX_GRAPH_NODES = 200_000


@dataclass
class ParamSpec:
    name: str
    type: TensorType
    init: Init
    fan_in: int
    fan_out: int
    role: str  # "param" | "state"
    span: Span | None
    trainable: bool = True  # False: a frozen parameter (`trainable=false`), fed to the step as state


@dataclass
class CarrySpec:
    """A model's `state NAME: type = init`: the graph input `carry:NAME`, fed with the value
    the output `carry:NAME` had after the previous batch (`value` everywhere at the start)."""

    name: str
    type: TensorType
    value: float
    span: Span | None

    @property
    def input(self) -> str:
        return f"carry:{self.name}"


@dataclass
class SummaryRow:
    name: str
    what: str
    type: TensorType
    params: int  # every float parameter and state element the row created
    span: Span
    trainable: int = 0
    value: int = -1  # the graph node of its result


@dataclass
class Built:
    graph: Graph
    params: dict[str, ParamSpec]
    summary: list[SummaryRow]
    model: ast.Def
    train: TrainConfig | None
    inputs: list[tuple[str, TensorType]]
    warnings: list = field(default_factory=list)  # DlcWarning: likely mistakes, reported by the caller
    results: list[tuple[str, TensorType]] = field(default_factory=list)  # named results after `output`
    carries: list[CarrySpec] = field(default_factory=list)  # carried from batch to batch


# --- building -------------------------------------------------------------------------------------

class _Ctx(nn.LayerContext):
    def __init__(self, fe: "Frontend", prefix: str, span: Span):
        self.fe, self.b, self.prefix, self.span = fe, fe.b, prefix, span
        self.training = fe.mode == "train"

    def param(self, name, shape, init, fan_in=0, fan_out=0):
        return self.fe.new_input(f"{self.prefix}.{name}", TensorType(DType.f32, tuple(shape)), init,
                                 "param", self.span, fan_in, fan_out)

    def state(self, name, shape, init, dtype=DType.f32):
        return self.fe.new_input(f"{self.prefix}.{name}", TensorType(dtype, tuple(shape)), init,
                                 "state", self.span)

    def update(self, state, new):
        self.fe.graph.updates[state.node.attrs["name"]] = new.id

    def rng(self):
        return self.fe.rng_inputs() + (nn.stream_id(f"{self.prefix}#{self.fe.next_stream()}"),)

    def mask_of(self, x):
        return self.fe.masks.get(x.id) if isinstance(x, Value) else None

    def set_mask(self, x, mask):
        if mask is not None:
            self.fe.masks[x.id] = mask

    def used_loss_mask(self, mask):
        self.fe.loss_masks.append(mask)


class Frontend:
    def __init__(self, program: ast.Program, mode: str = "eval"):
        self.program = program
        self.defs = {d.name: d for d in program.defs}
        self.mode = mode
        self.params: dict[str, ParamSpec] = {}
        self.input_ids: dict[str, int] = {}  # parameter or state name -> its input node
        self.param_elements = 0              # elements of every trainable parameter so far
        self.used_prefixes: set[str] = set()
        self._next_suffix: dict[str, int] = {}  # prefix base -> first `_k` that may be free
        self.elements = 0  # float elements of every parameter and state so far (the summary's counts)
        self._last_ids: set[int] = set()  # the values of the summary's latest rows (not shown twice)
        self.frozen = False  # inside a `trainable=false` call: parameters become state nothing updates
        self.softmax_outputs: dict[int, Span] = {}  # softmax results -> the call (for a warning)
        self.warnings: list = []
        self._several: dict[int, bool] = {}  # id(statement) -> it calls several layers with parameters
        self._streams = 0
        self._rng: tuple[Value, Value] | None = None
        self.masks: dict[int, Value] = {}       # value id -> bool [B, T] mask of its real steps
        self.loss_masks: list[Value] = []       # the masks the loss averaged over
        self.carries: dict[str, tuple[CarrySpec, Value]] = {}  # the model's `state`s
        self.batch_dim = None                   # axis 0 of the model's first input
        self.model_inputs: dict[str, Value] = {}  # the model's inputs by name (none for a bare option)

    # inputs owned by layers --------------------------------------------------------------------
    def new_input(self, name, type, init, role, span, fan_in=0, fan_out=0) -> Value:
        if name in self.params:
            raise NameError_(f"parameter name `{name}` is already used", span,
                             notes=[f"first created at {self.params[name].span}"],
                             hint="give the layer a different `name=`")
        size = prod(type.shape) if all(isinstance(d, int) for d in type.shape) else 0
        if size >= 2 ** 31:  # beyond 32-bit indexing (and far beyond memory, in practice)
            raise ArgumentError(f"parameter `{name}` would have {size:,} elements ({type}); "
                                "at most 2,147,483,647 are supported", span)
        if not fan_in:
            fan_in, fan_out = fans(tuple(type.shape))
        frozen = role == "param" and self.frozen
        self.params[name] = ParamSpec(name, type, init, fan_in, fan_out, role, span, trainable=not frozen)
        if role == "param" and not frozen:
            self.param_elements += size
        if type.dtype.is_float:
            self.elements += size
        with self.b.at(span):
            # autodiff and the optimizer see only "param" inputs: a frozen one gets no gradient,
            # no update and no optimizer state
            v = self.b.input(name, type, "state" if frozen else role)
        self.input_ids[name] = v.id
        return v

    def rng_inputs(self) -> tuple[Value, Value]:
        if self._rng is None:
            scalar = TensorType(DType.i32, ())
            with self.b.at(None):
                self._rng = (self.new_input("seed", scalar, Init("zeros"), "state", None),
                             self.new_input("step", scalar, Init("zeros"), "state", None))
        return self._rng

    def next_stream(self) -> int:
        self._streams += 1
        return self._streams

    # the model ----------------------------------------------------------------------------------
    def build(self, model: ast.Def, train: ast.Train | None) -> Built:
        self.graph = Graph(model.name)
        self.b = GraphBuilder(self.graph)
        self.summary: list[SummaryRow] = []
        dims: dict[str, Any] = {}
        args, inputs = [], []
        for p in model.params:
            if p.type is None:
                continue
            t = self.resolve_type(p.type, dims, bind_new=True)
            with self.b.at(p.span):
                args.append(self.b.input(p.name, t, "data"))
            inputs.append((p.name, t))
        self.batch_dim = inputs[0][1].shape[0] if inputs and inputs[0][1].rank else None
        result = self.call_def(model, args, {}, "", model.span, top=True, dims=dims)
        out, more = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        self.graph.outputs["output"] = out.id
        if out.id in self.softmax_outputs:  # its outputs are probabilities already (predict_proba)
            self.graph.meta["output_is_softmax"] = self.softmax_outputs[out.id]
        if self.mode == "eval":  # for predict and the Python API; a training step needs none of them
            for r, v in zip(model.more, more):
                self.graph.outputs[f"output:{r.name}"] = v.id
        self.model_inputs = {name: v for (name, _), v in zip(inputs, args)}
        try:
            config = build_train(self, train, out) if train is not None else None
        except RecursionError:
            raise too_deep(train.name_span) from None
        if config is not None and not any(p.role == "param" and p.trainable for p in self.params.values()):
            self.warnings.append(DlcWarning(
                f"model `{model.name}` has no trainable parameters: training leaves it as it is",
                train.name_span, hint="add a layer with weights (`dense`, `conv2d`, ...) or a `param`"))
        return Built(self.graph, self.params, self.summary, model, config, inputs, warnings=self.warnings,
                     results=[(r.name, v.type) for r, v in zip(model.more, more)],
                     carries=[spec for spec, _ in self.carries.values()])

    def resolve_type(self, t: ast.TypeExpr, dims: dict, bind_new: bool) -> TensorType:
        try:
            dtype = DType(t.dtype)
        except ValueError:
            raise TypeError_(f"unknown dtype `{t.dtype}`", t.span,
                             hint=did_you_mean(t.dtype, [d.value for d in DType]) or
                             "dtypes are f32, f64, i32, bool") from None
        shape = []
        for d in t.dims:
            if isinstance(d, int):
                if d < 1:
                    raise TypeError_(f"dimension {d} must be positive", t.span)
                shape.append(d)
            elif d in dims:
                shape.append(dims[d])
            elif bind_new:
                dims[d] = sym(d)
                shape.append(dims[d])
            else:
                raise NameError_(f"dimension `{d}` is not bound here", t.span,
                                 hint="symbolic dimensions come from the input types")
        return TensorType(dtype, tuple(shape))

    def call_def(self, d: ast.Def, args: list, kwargs: dict, prefix: str, span: Span,
                 top: bool = False, dims: dict | None = None) -> Value:
        """Run a model or block body with the given tensor arguments."""
        dims = {} if dims is None else dims
        scope = Scope({}, dims, prefix, "model")
        tensor_params = [p for p in d.params if p.type is not None]
        value_params = {p.name: p for p in d.params if p.type is None}
        if not top:
            # positional arguments: the tensors first, then the value parameters in order
            extra, args = list(args[len(tensor_params):]), list(args[:len(tensor_params)])
            if len(args) != len(tensor_params) or len(extra) > len(value_params):
                raise ArgumentError(f"block `{d.name}` takes {len(tensor_params)} tensor argument(s)"
                                    + (f" and up to {len(value_params)} value(s)" if value_params else "")
                                    + f", got {len(args) + len(extra)}", span)
            for name, v in zip(value_params, extra):
                if name in kwargs:
                    raise ArgumentError(f"argument `{name}` of block `{d.name}` is given twice", span)
                kwargs[name] = v
            for p, a in zip(tensor_params, args):
                if not isinstance(a, Value):
                    raise ArgumentError(f"block `{d.name}`: `{p.name}` must be a tensor", span)
                self._unify_arg(d, p, a, dims, span)
                scope.vars[p.name] = a
            for k in kwargs:
                if k not in value_params:
                    raise ArgumentError(f"block `{d.name}` has no parameter `{k}`", span,
                                        hint=did_you_mean(k, value_params))
        else:
            for p, a in zip(tensor_params, args):
                scope.vars[p.name] = a
        for name, p in value_params.items():
            scope.vars[name] = kwargs[name] if name in kwargs else self.eval(p.default, scope)
        for i, stmt in enumerate(d.body):
            scope.rest = (d.body, i + 1)
            if isinstance(stmt, ast.Return):
                try:
                    namer = {**self._namer(stmt, "out", scope), "targets": ["out"] + [r.name for r in d.more]}
                    with self.b.at(stmt.span):
                        value = self.eval(stmt.value, scope, namer)
                except RecursionError:
                    raise too_deep(stmt.span) from None
                outs = self._results(d, value, stmt, dims, scope.vars)
                if top:
                    self._row(stmt, "out", outs[0])
                    for r, v in zip(d.more, outs[1:]):
                        self._row(stmt, r.name, v, "result")
                    self._carry_out(scope, stmt)
                return outs[0] if len(outs) == 1 else tuple(outs)
            try:
                self.statement(stmt, scope, top)
            except RecursionError:
                raise too_deep(stmt.span) from None
        raise AssertionError("unreachable: check_program requires a return")

    def _unify_arg(self, d, p, a: Value, dims, span):
        declared = self.resolve_type(p.type, {k: v for k, v in dims.items()}, bind_new=True)
        pattern = tuple(sym(x) if isinstance(x, str) else x for x in p.type.dims)
        if a.dtype != declared.dtype:
            raise ShapeMismatch(f"block `{d.name}` expects `{p.name}` as {p.type.dtype}, got {a.type}", span)
        err = unify(pattern, a.shape, dims)
        if err:
            raise ShapeMismatch(f"block `{d.name}`: argument `{p.name}`: {err}", span,
                                notes=[f"`{p.name}` is declared at {p.span}"])

    def _results(self, d: ast.Def, value, stmt: ast.Return, dims, values) -> list[Value]:
        """The returned values, one per declared result (a tuple is flattened: `return out, (h, c)`
        gives three), each checked against its declared type."""
        flat: list = []

        def visit(v):
            if isinstance(v, tuple):
                for x in v:
                    visit(x)
            else:
                flat.append(v)
        visit(value)
        e = stmt.value
        if len(flat) != d.n_results:
            first = _type_text(d.result)
            if d.n_results == 1:
                raise TypeError_(f"{d.kind} `{d.name}` declares one result but returns {len(flat)} values "
                                 f"{structure(value)}", e.span,
                                 hint=f"return one tensor, or declare the others by name after `->`: "
                                      f"`-> ({first}, h: ...)`")
            raise TypeError_(f"{d.kind} `{d.name}` declares {d.n_results} results but returns "
                             + (f"{len(flat)} values {structure(value)}" if isinstance(value, tuple)
                                else describe(value)), e.span,
                             hint="return them in the declared order: `return "
                                  + ", ".join(["out"] + [r.name for r in d.more]) + "`")
        items = list(e.items) if isinstance(e, ast.TupleLit) and len(e.items) == len(flat) else None
        bound = dict(dims)
        for k, v in enumerate(flat):
            span = items[k].span if items else e.span
            what = "the result" if k == 0 else f"the result `{d.more[k - 1].name}`"
            if not isinstance(v, Value):
                raise TypeError_(f"{what} must be a tensor, got {describe(v)}", span)
            self._check_result(d, v, bound, stmt, values, k, span)
        return flat

    def _check_result(self, d: ast.Def, out: Value, bound, stmt, values=None, k: int = 0, span=None):
        values = values or {}
        declared_t = d.result if k == 0 else d.more[k - 1].type
        pattern = tuple(values[x] if isinstance(x, str) and isinstance(values.get(x), int) and
                        not isinstance(values.get(x), bool) else sym(x) if isinstance(x, str) else x
                        for x in declared_t.dims)
        err = unify(pattern, out.shape, bound)
        if err or out.dtype.value != declared_t.dtype:
            declared = _type_text(declared_t)
            what = f"returns {out.type}" if k == 0 else f"returns {out.type} as `{d.more[k - 1].name}`"
            raise ShapeMismatch(f"{d.kind} `{d.name}` {what} but declares {declared}",
                                span if k else stmt.span, notes=[err] if err else [],
                                hint="fix the declared result type after `->` or the last layer")

    def _carry_out(self, scope: Scope, stmt: ast.Return) -> None:
        """At the model's return: each `state`'s value there is carried to the next batch."""
        for name, (spec, start) in self.carries.items():
            v = scope.vars.get(name)
            if v is start:
                raise TypeError_(f"state `{name}` is never given a new value", spec.span,
                                 hint=f"assign `{name}` before the `return`: its value there is carried to "
                                      f"the next batch (for example `y, {name} = rnn(x, ..., initial={name}, "
                                      "return_state=true)`)")
            if not isinstance(v, Value) or v.type != spec.type:
                raise TypeError_(f"state `{name}` is declared {spec.type} but holds {describe(v)} at the "
                                 "`return`", stmt.span, notes=[f"`{name}` is declared at {spec.span}"],
                                 hint="the value carried to the next batch must keep the declared type")
            self.graph.outputs[spec.input] = v.id

    def statement(self, stmt, scope: Scope, top: bool) -> None:
        if isinstance(stmt, ast.Unpack):
            names = stmt.names
            for n in names:
                if n in RESERVED:
                    raise NameError_(f"`{n}` is reserved and cannot be assigned", stmt.span)
                if names.count(n) > 1:
                    raise NameError_(f"`{n}` appears twice in `{_targets(stmt.targets)} = ...`", stmt.span)
            namer = {**self._namer(stmt, names[0], scope), "targets": names}  # the rows of a call's results
            with self.b.at(stmt.span):
                value = self.eval(stmt.value, scope, namer)
            self._unpack(stmt.targets, value, stmt, scope, top)
        elif isinstance(stmt, ast.StateDecl):
            self._state(stmt, scope, top)
        elif isinstance(stmt, ast.Assign):
            if stmt.target in RESERVED:
                raise NameError_(f"`{stmt.target}` is reserved and cannot be assigned", stmt.span)
            with self.b.at(stmt.span):
                value = self.eval(stmt.value, scope, self._namer(stmt, stmt.target, scope))
            scope.vars[stmt.target] = value
            if top and isinstance(value, Value):
                self._row(stmt, stmt.target, value)
        elif isinstance(stmt, ast.ParamDecl):
            name = scope.prefix + stmt.name
            if stmt.name in scope.vars:
                raise NameError_(f"`{stmt.name}` is already defined", stmt.span)
            t = self.resolve_type(stmt.type, scope.dims, bind_new=False)
            if not all(isinstance(d, int) for d in t.shape):
                raise TypeError_(f"parameter `{stmt.name}` needs a shape of known numbers, got {t}",
                                 stmt.type.span, hint="parameters cannot have a batch dimension")
            init = self.eval(stmt.init, scope)
            init = self._as_init(init, stmt.init.span)
            if t.dtype != DType.f32:
                raise TypeError_(f"parameter `{stmt.name}` must be f32, got {t.dtype}", stmt.type.span)
            trainable = self._param_trainable(stmt, scope)
            self.used_prefixes.add(name)
            with self._freezing(trainable):
                scope.vars[stmt.name] = self.new_input(name, t, init, "param", stmt.span)
            if top:
                self._row(stmt, stmt.name, scope.vars[stmt.name], None if trainable else "param (frozen)")

    def _unpack(self, targets: tuple, value, stmt: ast.Unpack, scope: Scope, top: bool) -> None:
        if not isinstance(value, tuple) or len(value) != len(targets):
            got = f"{len(value)} values {structure(value)}" if isinstance(value, tuple) else describe(value)
            raise TypeError_(f"cannot unpack {got} into `{_targets(targets)}`", stmt.value.span,
                             hint="only a function with several results gives a tuple: "
                                  "`lstm(x, n, return_state=true)` gives `out, (h, c)`, "
                                  "`rnn` and `gru` give `out, h`")
        for t, v in zip(targets, value):
            if isinstance(t, tuple):
                self._unpack(t, v, stmt, scope, top)
                continue
            scope.vars[t] = v
            if top and isinstance(v, Value):
                self._row(stmt, t, v)

    def _state(self, stmt: ast.StateDecl, scope: Scope, top: bool) -> None:
        """`state h: f32[B, 64] = zeros`: the input `carry:h`, holding the value `h` had at the
        return after the previous batch (`init` at the start of each epoch and evaluation)."""
        if not top:
            raise TypeError_("`state` declares a model's carried state; a block cannot have one", stmt.span,
                             hint="pass the state to the block as an argument and return its new value")
        if stmt.name in RESERVED:
            raise NameError_(f"`{stmt.name}` is reserved and cannot name a state", stmt.span)
        if stmt.name in scope.vars:
            raise NameError_(f"`{stmt.name}` is already defined", stmt.span)
        t = self.resolve_type(stmt.type, scope.dims, bind_new=False)
        batch = self.batch_dim
        if not t.rank or batch is None or t.shape[0] != batch or \
                not all(isinstance(d, int) for d in t.shape[1:]):
            raise TypeError_(f"state `{stmt.name}` must have the batch dimension first and known numbers "
                             f"after it, like [{batch if batch is not None else 'B'}, 64]; got {t}",
                             stmt.type.span, hint="row i of a state follows row i of the batches")
        value = 0.0
        if stmt.init is not None:
            init = self._as_init(self.eval(stmt.init, scope), stmt.init.span)
            if init.name not in ("zeros", "ones", "constant"):
                raise ArgumentError(f"a state starts from a constant: zeros, ones or constant(v), got {init}",
                                    stmt.init.span)
            value = {"zeros": 0.0, "ones": 1.0}.get(init.name, init.args[0] if init.args else 0.0)
        spec = CarrySpec(stmt.name, t, value, stmt.span)
        with self.b.at(stmt.span):
            v = self.b.input(spec.input, t, "data")
        self.carries[stmt.name] = (spec, v)
        scope.vars[stmt.name] = v
        self._row(stmt, stmt.name, v, "state")

    def _row(self, stmt, name: str, value: Value, what: str | None = None):
        """A statement's own row, when the rows of its calls do not end with its value (`a + b`, a
        `param`, `dense(x, 4) * 2`, a `state`, a named result returned as it was)."""
        if value.id in self._last_ids:
            return
        self._last_ids = {value.id}
        if isinstance(stmt, ast.ParamDecl):
            n = prod(value.type.shape)
            self.summary.append(SummaryRow(name, what or "param", value.type, n, stmt.span,
                                           0 if what else n, value.id))
        else:
            self.summary.append(SummaryRow(name, what or "expression", value.type, 0, stmt.span, 0, value.id))

    def _call_row(self, name: str, what: str, out, span: Span, before: tuple[int, int], targets=None) -> None:
        """One summary row per layer or function called in the model's own body (a block call is
        one row; one with several results, one row per result, named by what they are unpacked
        into or returned as); counts are running totals, so checking stays linear in the
        statements."""
        flat = _flatten(out)
        if not flat or not all(isinstance(v, Value) for v in flat):
            return
        if len(flat) > 1:
            names = list(targets) if targets and len(targets) == len(flat) else \
                [name] + [f"{name}[{k}]" for k in range(1, len(flat))]
        else:
            names = [name]
        for k, (n, v) in enumerate(zip(names, flat)):  # the first row counts the call's parameters
            self.summary.append(SummaryRow(n, what, v.type, self.elements - before[0] if k == 0 else 0, span,
                                           self.param_elements - before[1] if k == 0 else 0, v.id))
        self._last_ids = {v.id for v in flat}

    def _namer(self, stmt, binding: str, scope: Scope):
        """Parameter-prefix policy for the calls in one statement: the binding name when the
        statement has one layer, `binding.layer` when it has several, `_2`... when taken."""
        several = self._several.get(id(stmt))
        if several is None:  # once per statement, not once per expansion of its block
            several = self._several[id(stmt)] = sum(self._owns_params(c.func.text) for c in ast.calls(stmt)) > 1
        return {"binding": scope.prefix + binding, "several": several}

    def _owns_params(self, fname: str) -> bool:
        return fname in self.defs or (fname in nn.BUILTINS and nn.BUILTINS[fname].owns_params)

    def _prefix(self, namer, fname: str, explicit: str | None, scope: Scope, span: Span) -> str:
        if explicit is not None:
            full = scope.prefix + explicit
            if full in self.used_prefixes:
                raise NameError_(f"layer name `{explicit}` is already used", span)
            self.used_prefixes.add(full)
            return full
        base = f"{namer['binding']}.{fname}" if namer and namer["several"] else (
            namer["binding"] if namer else scope.prefix + fname)
        # the first free of base, base_2, base_3, ...; names are never freed, so the search
        # resumes where the last one for this base stopped (10,000 `h = dense(h, 8)` stay linear)
        name, k = base, self._next_suffix.get(base, 2)
        while name in self.used_prefixes:
            name, k = f"{base}_{k}", k + 1
        self._next_suffix[base] = k
        self.used_prefixes.add(name)
        return name

    # expressions ---------------------------------------------------------------------------------
    def eval_tensor(self, e, scope: Scope, namer=None, what="this") -> Value:
        v = self.eval(e, scope, namer)
        if not isinstance(v, Value):
            raise TypeError_(f"{what} must be a tensor, got {describe(v)}", e.span)
        return v

    def eval(self, e, scope: Scope, namer=None):
        with self.b.at(e.span):
            if isinstance(e, ast.Num):
                return e.value
            if isinstance(e, ast.Str):
                return e.value
            if isinstance(e, ast.ListLit):
                return [self.eval(i, scope, namer) for i in e.items]
            if isinstance(e, ast.TupleLit):
                return tuple(self.eval(i, scope, namer) for i in e.items)
            if isinstance(e, ast.Name):
                return self.lookup(e, scope)
            if isinstance(e, ast.Neg):
                v = self.eval(e.operand, scope, namer)
                if isinstance(v, (Value, int, float)) and not isinstance(v, bool):
                    return -v
                raise TypeError_(f"cannot negate {describe(v)}", e.span)
            if isinstance(e, ast.BinOp):
                return self.binop(e, scope, namer)
            if isinstance(e, ast.Call):
                return self.call(e, scope, namer)
            if isinstance(e, ast.Index):
                return self.index(e, scope, namer)
        raise AssertionError(f"unknown expression {e!r}")

    def lookup(self, e: ast.Name, scope: Scope):
        name = e.text
        if name in scope.vars:
            return scope.vars[name]
        if name in scope.dims:
            return scope.dims[name]
        if name in ("true", "false"):
            return name == "true"
        if scope.context == "loss" and name in ("params", "weights"):
            specs = [p for p in self.params.values() if p.role == "param" and
                     (name == "params" or p.type.rank >= 2)]
            return nn.ParamList(self.b.value(self.input_ids[p.name]) for p in specs)
        if scope.context == "loss" and name in self.params and self.params[name].role == "param":
            return self.b.value(self.input_ids[name])
        if name in nn.BUILTINS or name in self.defs or name in RECIPE or name in INIT_ARITY:
            return FunctionRef(name, e.span)
        known = list(scope.vars) + list(scope.dims) + list(nn.BUILTINS) + list(self.defs) + list(INIT_ARITY)
        if scope.context == "loss":
            known += ["params", "weights"] + list(self.params)
        hint = did_you_mean(name, known)
        body, start = scope.rest or ((), 0)
        later = next((s for s in body[start:] if name in _assigned(s)), None)
        if later is not None:
            hint = f"`{name}` is assigned later, at line {later.span.line}: assign it before this use"
        if name in ("output", "label", "params", "weights") and scope.context != "loss":
            hint = f"`{name}` exists only in a train block's loss"
        raise NameError_(f"unknown name `{name}`", e.span, hint=hint)

    def binop(self, e: ast.BinOp, scope, namer):
        a = self.eval(e.lhs, scope, namer)
        c = self.eval(e.rhs, scope, namer)
        if e.op in COMPARISONS:
            return self._compare(e, a, c)
        sym_op = {"add": "+", "sub": "-", "mul": "*", "div": "/", "matmul": "@", "pow": "**"}[e.op]
        numbers = (int, float)
        if isinstance(a, bool) or isinstance(c, bool) or not isinstance(a, (Value, int, float, Sym)) \
                or not isinstance(c, (Value, int, float, Sym)):
            raise TypeError_(f"cannot apply `{sym_op}` to {describe(a)} and {describe(c)}", e.span)
        if isinstance(a, Sym) or isinstance(c, Sym):
            if e.op == "mul" and not isinstance(a, Value) and not isinstance(c, Value):
                return dim_mul(a if isinstance(a, (int, Sym)) else 0, c if isinstance(c, (int, Sym)) else 0)
            raise TypeError_(f"the symbolic dimension {a if isinstance(a, Sym) else c} is not a "
                             "known number here", e.span)
        if isinstance(a, numbers) and isinstance(c, numbers):
            return self._arith(e, sym_op, a, c)
        if e.op == "matmul":
            if not (isinstance(a, Value) and isinstance(c, Value)):
                raise TypeError_("`@` needs two tensors", e.span)
            if c.rank > 2:
                return self._stacked_matmul(e, a, c)
            if c.rank != 2 or a.rank < 2:
                raise ShapeMismatch(f"`@` needs a matrix on the right and rank >= 2 on the left, "
                                    f"got {a.type} @ {c.type}", e.span)
            if a.shape[-1] != c.shape[0]:
                raise ShapeMismatch(f"cannot multiply {a.type} by {c.type}: inner dimensions "
                                    f"{a.shape[-1]} and {c.shape[0]} differ", e.span)
            return self._keep_mask(nn._matmul_last(self.b, a, c), a)
        if isinstance(a, Value) and isinstance(c, Value) and a.dtype != c.dtype:
            raise TypeError_(f"cannot apply `{sym_op}` to {a.type} and {c.type}: dtypes differ", e.span)
        t = a if isinstance(a, Value) else c
        if not t.dtype.is_float and e.op == "pow":
            raise TypeError_(f"`**` needs a float tensor, got {t.type}", e.span)
        if t.dtype == DType.bool:
            raise TypeError_(f"cannot apply `{sym_op}` to {t.type}: arithmetic needs numbers", e.span,
                             hint="`where(c, 1.0, 0.0)` turns a bool tensor c into 1s and 0s")
        if e.op == "div" and not isinstance(c, Value) and c == 0:
            raise ArgumentError("division by zero", e.span)
        out = {"add": lambda: a + c, "sub": lambda: a - c, "mul": lambda: a * c,
               "div": lambda: a / c, "pow": lambda: a ** c}[e.op]()
        return self._keep_mask(out, a, c)

    def _compare(self, e: ast.BinOp, a, c):
        """`a < c` and the other comparisons: a bool tensor (numpy's broadcasting), or a bool of
        two plain numbers."""
        sym_op = COMPARISONS[e.op]
        if not all(isinstance(v, (Value, int, float)) and not isinstance(v, bool) for v in (a, c)):
            raise TypeError_(f"cannot compare {describe(a)} and {describe(c)} with `{sym_op}`", e.span)
        if not isinstance(a, Value) and not isinstance(c, Value):
            return {"lt": a < c, "le": a <= c, "gt": a > c, "ge": a >= c, "eq": a == c, "ne": a != c}[e.op]
        tensors = [v for v in (a, c) if isinstance(v, Value)]
        if any(t.dtype == DType.bool for t in tensors) or len({t.dtype for t in tensors}) > 1:
            raise TypeError_(f"cannot compare {' and '.join(str(t.type) for t in tensors)} with `{sym_op}`: "
                             "comparisons take numbers of one dtype", e.span)
        if all(isinstance(v, Value) for v in (a, c)):
            try:
                broadcast_shapes(a.shape, c.shape)
            except ShapeError as err:
                raise ShapeMismatch(f"cannot compare {a.type} and {c.type} with `{sym_op}`: {err}", e.span) from None
        with self.b.at(e.span):  # (the builder refuses a fraction for an integer tensor)
            return self._keep_mask(getattr(self.b, e.op)(a, c), a, c)

    def _stacked_matmul(self, e: ast.BinOp, a: Value, c: Value) -> Value:
        """Stacks of matrices, matrix by matrix: [..., m, k] @ [..., k, n] -> [..., m, n]."""
        if a.rank != c.rank or tuple(a.shape[:-2]) != tuple(c.shape[:-2]):
            raise ShapeMismatch(f"`@` of stacks of matrices needs the same leading axes on both sides, got "
                                f"{a.type} @ {c.type}", e.span,
                                hint="reshape or broadcast one side to the other's leading axes")
        if a.dtype != c.dtype or not a.dtype.is_float:
            raise TypeError_(f"`@` needs two float tensors of one dtype, got {a.type} @ {c.type}", e.span)
        if a.shape[-1] != c.shape[-2]:
            perm = list(range(c.rank - 2)) + [c.rank - 1, c.rank - 2]
            hint = (f"to multiply by each matrix transposed (attention's q @ kᵀ), swap the right "
                    f"side's last two axes: `q @ transpose(k, {perm})`" if a.shape[-1] == c.shape[-1] else None)
            raise ShapeMismatch(f"cannot multiply {a.type} by {c.type}: inner dimensions "
                                f"{a.shape[-1]} and {c.shape[-2]} differ", e.span, hint=hint)
        return self._keep_mask(nn._batch_matmul(self.b, a, c), a)

    def _keep_mask(self, out: Value, *sources) -> Value:
        """`out` keeps the mask of the first source that has one, if its leading axes still fit."""
        for src in sources:
            m = self.masks.get(src.id) if isinstance(src, Value) else None
            if m is not None and out.id not in self.masks and tuple(out.shape[:m.rank]) == tuple(m.shape):
                self.masks[out.id] = m
                break
        return out

    def _arith(self, e: ast.BinOp, sym_op: str, a, c):
        """Arithmetic on two plain numbers (sizes, rates): Python's, with its failures reported."""
        if e.op == "matmul":
            raise TypeError_("`@` needs tensors", e.span)
        if e.op == "div" and c == 0:
            raise ArgumentError("division by zero", e.span)
        if e.op == "pow" and a == 0 and c < 0:
            raise ArgumentError("0 cannot be raised to a negative power", e.span)
        if e.op == "pow" and isinstance(a, int) and isinstance(c, int) and abs(a) > 1 and c > 1024:
            raise ArgumentError(f"`{sym_op}` gives a number too large to use", e.span)
        try:
            out = {"add": lambda: a + c, "sub": lambda: a - c, "mul": lambda: a * c,
                   "div": lambda: a / c if (isinstance(a, float) or isinstance(c, float) or a % c) else a // c,
                   "pow": lambda: a ** c}[e.op]()
        except OverflowError:
            raise ArgumentError(f"`{sym_op}` gives a number too large to use", e.span) from None
        if isinstance(out, complex):
            raise ArgumentError(f"`{sym_op}` gives a complex number ({a} ** {c})", e.span)
        if isinstance(out, int) and out.bit_length() > 1024:  # beyond any float
            raise ArgumentError(f"`{sym_op}` gives a number too large to use", e.span)
        return out

    def index(self, e: ast.Index, scope, namer):
        x = self.eval_tensor(e.value, scope, namer, "an indexed value")
        if len(e.subscripts) > x.rank:
            raise ShapeMismatch(f"too many indices ({len(e.subscripts)}) for {x.type}", e.span)
        starts, stops, steps, drop = [], [], [], []
        for axis, d in enumerate(x.shape):
            sub = e.subscripts[axis] if axis < len(e.subscripts) else None
            if sub is None or (isinstance(sub, ast.Slice) and not (sub.start or sub.stop or sub.step)):
                starts.append(0), stops.append(d), steps.append(1)
                continue
            if not isinstance(d, int):
                raise ShapeMismatch(f"axis {axis} of {x.type} is symbolic ({d}); it can only be taken "
                                    "whole with `:`", sub.span)
            if isinstance(sub, ast.Slice):
                lo, hi, st = (self._int_or(s, scope, dflt) for s, dflt in
                              ((sub.start, 0), (sub.stop, d), (sub.step, 1)))
                if st < 1:
                    raise ArgumentError(f"slice step must be positive, got {st}", sub.span)
                lo, hi = (v + d if v < 0 else v for v in (lo, hi))
                lo, hi = max(0, min(lo, d)), max(0, min(hi, d))
                if hi <= lo:
                    raise ShapeMismatch(f"slice selects nothing from axis {axis} (size {d})", sub.span)
                starts.append(lo), stops.append(hi), steps.append(st)
            else:
                i = self._int_or(sub, scope, None)
                if not -d <= i < d:
                    raise ShapeMismatch(f"index {i} is out of range for axis {axis} (size {d})", sub.span)
                i %= d
                starts.append(i), stops.append(i + 1), steps.append(1)
                drop.append(axis)
        out = self.b.slice(x, starts, stops, steps)
        if drop:
            out = self.b.reshape(out, tuple(s for i, s in enumerate(out.shape) if i not in drop))
        return out

    def _int_or(self, e, scope, default):
        if e is None:
            return default
        v = self.eval(e, scope)
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError_(f"an index must be an integer, got {describe(v)}", e.span)
        return v

    # calls ------------------------------------------------------------------------------------
    def call(self, e: ast.Call, scope: Scope, namer):
        fname = e.func.text
        if fname in scope.vars and isinstance(scope.vars[fname], FunctionRef):
            fname = scope.vars[fname].name  # a block parameter holding a function: `act=relu`
        elif fname in scope.vars:
            raise TypeError_(f"`{fname}` is {describe(scope.vars[fname])}, not a function", e.func.span)
        args, kwargs, kwspans = self.eval_arguments(e, scope, namer)
        top = scope.context == "model" and not scope.prefix  # the model's own body: summary rows
        before = (self.elements, self.param_elements)
        if fname in self.defs and self.defs[fname].kind == "block":
            d = self.defs[fname]
            prefix = self._prefix(namer, fname, _layer_name(kwargs, kwspans), scope, e.span)
            trainable = _trainable(kwargs, kwspans, fname, True)
            with self.b.at(e.span), self._freezing(trainable):
                out = self.call_def(d, args, kwargs, prefix + ".", e.span)
            if top:
                self._call_row(prefix, fname + ("" if trainable else " (frozen)"), out, e.span, before,
                               namer.get("targets") if namer else None)
            return out
        if fname in self.defs:
            raise TypeError_(f"`{fname}` is a model; only blocks can be called", e.func.span,
                             hint=f"declare it as `block {fname}(...)`")
        if fname in INIT_ARITY:
            return self._make_init(fname, args, kwargs, e)
        entry = nn.BUILTINS.get(fname)
        if entry is None:
            if fname in RECIPE:
                raise TypeError_(f"`{fname}` can only be used in a train block option", e.func.span)
            candidates = list(nn.BUILTINS) + [d for d in self.defs if self.defs[d].kind == "block"]
            raise NameError_(f"unknown function `{fname}`", e.func.span, hint=did_you_mean(fname, candidates))
        if entry.kind == "layer" and scope.context != "model":
            where = "a loss" if scope.context == "loss" else "a train block option"
            raise TypeError_(f"layer `{fname}` cannot be used in {where}; layers belong in the model",
                             e.func.span)
        if entry.kind in ("loss", "regularizer") and scope.context != "loss":
            raise TypeError_(f"`{fname}` is a {entry.kind} and belongs in the train block's `loss`",
                             e.func.span)
        explicit = _layer_name(kwargs, kwspans) if entry.kind == "layer" else None
        trainable = _trainable(kwargs, kwspans, fname, entry.owns_params)
        prefix = self._prefix(namer, fname, explicit, scope, e.span) if entry.owns_params else (
            namer["binding"] if namer else scope.prefix + fname)
        argspans: dict[str, Span] = {}
        bound = bind_arguments(entry, args, kwargs, e, kwspans, skip_ctx=True, spans_out=argspans)
        if e.piped:  # a complaint about the piped value points at the call, not upstream
            argspans = {k: v for k, v in argspans.items() if v is not e.args[0].span}
        ctx = _Ctx(self, prefix, e.span)
        try:
            with self.b.at(e.span), self._freezing(trainable):
                out = entry.fn(ctx, **bound)
        except DlcError as err:  # point at the argument the layer complains about, if it says which
            raise err.with_span(argspans.get(getattr(err, "arg", None)) or e.span)
        self._check_size(e)
        if fname == "softmax" and isinstance(out, Value):
            self.softmax_outputs[out.id] = e.span
        if fname == "cross_entropy" and getattr(bound.get("logits"), "id", None) in self.softmax_outputs:
            self.warnings.append(DlcWarning(
                "`cross_entropy` applies log-softmax to its first argument itself, but it gets the "
                "output of `softmax`: the probabilities are squashed twice and learning slows down",
                self.softmax_outputs[bound["logits"].id],
                hint="return the logits (drop this softmax); predict_proba() gives probabilities"))
        if top:
            self._call_row(prefix if entry.owns_params else (namer["binding"] if namer else fname),
                           fname + ("" if trainable else " (frozen)"), out, e.span, before,
                           namer.get("targets") if namer else None)
        if fname in nn.KEEPS_MASK and isinstance(out, Value) and \
                (fname not in nn.AXIS_ARGUMENT or bound.get("axis", -1) % max(out.rank, 1) == out.rank - 1):
            self._keep_mask(out, bound.get("x"))
        return out

    def _param_trainable(self, stmt: ast.ParamDecl, scope) -> bool:
        """A `param` declaration's `, trainable=false` (its one option)."""
        trainable = True
        for k, o in enumerate(stmt.options):
            if o.name != "trainable":
                raise ArgumentError(f"a `param` takes one option, `trainable`; got `{o.name}`", o.span,
                                    hint=f"param {stmt.name}: ... = init, trainable=false")
            if k:
                raise ArgumentError("`trainable` is given twice", o.span)
            trainable = self.eval(o.value, scope)
            if not isinstance(trainable, bool):
                raise ArgumentError(f"`trainable` must be true or false, got {describe(trainable)}",
                                    o.value.span)
        return trainable

    @contextlib.contextmanager
    def _freezing(self, trainable: bool):
        """Parameters created inside a `trainable=false` call (and the blocks it calls) are frozen."""
        outer = self.frozen
        self.frozen = outer or not trainable
        try:
            yield
        finally:
            self.frozen = outer

    def _check_size(self, e: ast.Call) -> None:
        """Blocks are expanded at every call and recurrent layers once per time step, so a short
        program can ask for an enormous graph (blocks calling blocks twice, 40 deep): stop it."""
        if len(self.graph) > MAX_GRAPH_NODES:
            raise ArgumentError(f"the model's graph grows beyond {MAX_GRAPH_NODES:,} operations at this call",
                                e.span, hint="every block call expands the block's body again, and "
                                             "rnn/lstm repeat theirs for each time step")

    def eval_arguments(self, e: ast.Call, scope: Scope, namer=None) -> tuple[list, dict, dict]:
        """A call's positional values, keyword values and keyword spans."""
        args = [self.eval(a, scope, namer) for a in e.args]
        kwargs, kwspans = {}, {}
        for k in e.kwargs:
            if k.name in kwargs:
                raise ArgumentError(f"argument `{k.name}` is given twice", k.span)
            kwargs[k.name], kwspans[k.name] = self.eval(k.value, scope, namer), k.span
        return args, kwargs, kwspans

    def _make_init(self, fname, args, kwargs, e):
        lo, hi = INIT_ARITY[fname]
        if kwargs or not lo <= len(args) <= hi or not all(
                isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            want = "no arguments" if hi == 0 else f"{lo} to {hi} numbers" if lo != hi else f"{lo} number(s)"
            raise ArgumentError(f"initializer `{fname}` takes {want}", e.span)
        return Init(fname, tuple(float(a) for a in args))

    def _as_init(self, v, span) -> Init:
        if isinstance(v, FunctionRef) and v.name in INIT_ARITY:
            if INIT_ARITY[v.name][0] > 0:
                raise ArgumentError(f"initializer `{v.name}` needs arguments", span)
            return Init(v.name)
        if isinstance(v, Init):
            return v
        raise TypeError_(f"expected an initializer (zeros, ones, normal(m, s), uniform(a, b), "
                         f"glorot_uniform, he_normal, ...), got {describe(v)}", span)


COMPARISONS = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}


def _trainable(kwargs: dict, kwspans: dict, fname: str, owns_params: bool) -> bool:
    """The `trainable=` of a layer or block call, taken out of its keyword arguments."""
    if "trainable" not in kwargs:
        return True
    value = kwargs.pop("trainable")
    if not owns_params:
        raise ArgumentError(f"`trainable` applies to layers and blocks; `{fname}` has no parameters",
                            kwspans["trainable"])
    if not isinstance(value, bool):
        raise ArgumentError(f"`trainable` must be true or false, got {describe(value)}", kwspans["trainable"])
    return value


def _type_text(t: ast.TypeExpr) -> str:
    return f"{t.dtype}[{','.join(str(x) for x in t.dims)}]" if t.dims else t.dtype


def _flatten(value) -> list:
    """A value, or the values of a (nested) tuple of results, in order."""
    if isinstance(value, tuple):
        return [v for x in value for v in _flatten(x)]
    return [value]


def _targets(t) -> str:
    """Unpacking targets as written: `out, (h, c)`."""
    return ", ".join(x if isinstance(x, str) else f"({_targets(x)})" for x in t)


def _layer_name(kwargs: dict, kwspans: dict) -> str | None:
    """The `name=` of a layer or block call, taken out of its keyword arguments."""
    name = kwargs.pop("name", None)
    if name is not None and (not isinstance(name, str) or not name):
        raise ArgumentError("`name=` must be a non-empty string", kwspans["name"])
    return name


def build(program: ast.Program, model: str | None = None, mode: str = "eval",
          with_train: bool = True) -> Built:
    """Check the program and build one model's graph (with its train block when present)."""
    check_program(program)
    d = choose_model(program, model)
    train = next((t for t in program.trains if t.model == d.name), None) if with_train else None
    return Frontend(program, mode).build(d, train)


def eval_recipe(expr, option: str):
    """A train-option value written on the command line (`--optimizer "adam(lr=1e-3)"`,
    `--validation 0.1`), checked exactly as in a train block."""
    from dlc.language.train_block import option_value
    fe = Frontend(ast.Program((), ()))
    fe.graph = Graph("options")
    fe.b = GraphBuilder(fe.graph)
    return option_value(fe, option, ast.Option(option, expr, expr.span), Scope({}, {}, "", "option"))


def _assigned(stmt) -> list[str]:
    """The names a statement of a body assigns."""
    if isinstance(stmt, ast.Assign):
        return [stmt.target]
    if isinstance(stmt, ast.Unpack):
        return stmt.names
    return [stmt.name] if isinstance(stmt, (ast.StateDecl, ast.ParamDecl)) else []
