"""AST -> Graph: scopes, blocks, parameter naming, argument and shape checking with spans.

`build(program, model, mode)` gives the model's graph in "train" mode (dropout on,
batch statistics) or "eval" mode, plus the loss and metrics when a train block exists.
The program-level checks are in checks.py, argument binding in arguments.py and the
train block in train_block.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dlc.core.builder import GraphBuilder, Value
from dlc.core.diagnostics import ArgumentError, DlcError, NameError_, ShapeMismatch, Span, TypeError_, did_you_mean
from dlc.core.graph import Graph
from dlc.core.types import DType, Sym, TensorType, dim_mul, prod, sym, unify
from dlc.language import nn
from dlc.language.arguments import bind_arguments
from dlc.language.checks import RESERVED, check_program, choose_model, too_deep
from dlc.language.initializers import ARITY as INIT_ARITY, Init, fans
from dlc.language.recipe import RECIPE, TrainConfig
from dlc.language.syntax import ast
from dlc.language.train_block import build_train, recipe_call
from dlc.language.values import FunctionRef, Scope, describe

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


@dataclass
class SummaryRow:
    name: str
    what: str
    type: TensorType
    params: int
    span: Span


@dataclass
class Built:
    graph: Graph
    params: dict[str, ParamSpec]
    summary: list[SummaryRow]
    model: ast.Def
    train: TrainConfig | None
    inputs: list[tuple[str, TensorType]]


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
        self._summarized = 0  # param_elements at the last summary row
        self._several: dict[int, bool] = {}  # id(statement) -> it calls several layers with parameters
        self._streams = 0
        self._rng: tuple[Value, Value] | None = None

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
        self.params[name] = ParamSpec(name, type, init, fan_in, fan_out, role, span)
        if role == "param":
            self.param_elements += size
        with self.b.at(span):
            v = self.b.input(name, type, role)
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
        out = self.call_def(model, args, {}, "", model.span, top=True, dims=dims)
        self.graph.outputs["output"] = out.id
        self.model_inputs = {name: v for (name, _), v in zip(inputs, args)}
        try:
            config = build_train(self, train, out) if train is not None else None
        except RecursionError:
            raise too_deep(train.name_span) from None
        return Built(self.graph, self.params, self.summary, model, config, inputs)

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
        for stmt in d.body:
            if isinstance(stmt, ast.Return):
                try:
                    with self.b.at(stmt.span):
                        out = self.eval_tensor(stmt.value, scope, self._namer(stmt, "out", scope), "the result")
                except RecursionError:
                    raise too_deep(stmt.span) from None
                self._check_result(d, out, dims, stmt, scope.vars)
                if top:
                    self._row(stmt, "out", out)
                return out
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

    def _check_result(self, d: ast.Def, out: Value, dims, stmt, values=None):
        values = values or {}
        pattern = tuple(values[x] if isinstance(x, str) and isinstance(values.get(x), int) and
                        not isinstance(values.get(x), bool) else sym(x) if isinstance(x, str) else x
                        for x in d.result.dims)
        bound = dict(dims)
        err = unify(pattern, out.shape, bound)
        if err or out.dtype.value != d.result.dtype:
            declared = f"{d.result.dtype}[{','.join(str(x) for x in d.result.dims)}]" if d.result.dims \
                else d.result.dtype
            raise ShapeMismatch(f"{d.kind} `{d.name}` returns {out.type} but declares {declared}",
                                stmt.span, notes=[err] if err else [],
                                hint="fix the declared result type after `->` or the last layer")

    def statement(self, stmt, scope: Scope, top: bool) -> None:
        if isinstance(stmt, ast.Assign):
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
            self.used_prefixes.add(name)
            scope.vars[stmt.name] = self.new_input(name, t, init, "param", stmt.span)
            if top:
                self._row(stmt, stmt.name, scope.vars[stmt.name])

    def _row(self, stmt, name: str, value: Value):
        # running totals, not sums over every row and parameter: checking stays linear in the statements
        before = self._summarized
        self._summarized = self.param_elements
        what = " → ".join(dict.fromkeys(c.func.text for c in ast.calls(stmt))) or (
            "param" if isinstance(stmt, ast.ParamDecl) else "expression")
        self.summary.append(SummaryRow(name, what, value.type, self.param_elements - before, stmt.span))

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
        if name in ("output", "label", "params", "weights") and scope.context != "loss":
            hint = f"`{name}` exists only in a train block's loss"
        raise NameError_(f"unknown name `{name}`", e.span, hint=hint)

    def binop(self, e: ast.BinOp, scope, namer):
        a = self.eval(e.lhs, scope, namer)
        c = self.eval(e.rhs, scope, namer)
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
            if c.rank != 2 or a.rank < 2:
                raise ShapeMismatch(f"`@` needs a matrix on the right and rank >= 2 on the left, "
                                    f"got {a.type} @ {c.type}", e.span)
            if a.shape[-1] != c.shape[0]:
                raise ShapeMismatch(f"cannot multiply {a.type} by {c.type}: inner dimensions "
                                    f"{a.shape[-1]} and {c.shape[0]} differ", e.span)
            return nn._matmul_last(self.b, a, c)
        if isinstance(a, Value) and isinstance(c, Value) and a.dtype != c.dtype:
            raise TypeError_(f"cannot apply `{sym_op}` to {a.type} and {c.type}: dtypes differ", e.span)
        t = a if isinstance(a, Value) else c
        if not t.dtype.is_float and e.op == "pow":
            raise TypeError_(f"`**` needs a float tensor, got {t.type}", e.span)
        if t.dtype == DType.bool:
            raise TypeError_(f"cannot apply `{sym_op}` to {t.type}: arithmetic needs numbers", e.span)
        if e.op == "div" and not isinstance(c, Value) and c == 0:
            raise ArgumentError("division by zero", e.span)
        return {"add": lambda: a + c, "sub": lambda: a - c, "mul": lambda: a * c,
                "div": lambda: a / c, "pow": lambda: a ** c}[e.op]()

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
        if fname in self.defs and self.defs[fname].kind == "block":
            d = self.defs[fname]
            prefix = self._prefix(namer, fname, _layer_name(kwargs, kwspans), scope, e.span)
            with self.b.at(e.span):
                return self.call_def(d, args, kwargs, prefix + ".", e.span)
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
        prefix = self._prefix(namer, fname, explicit, scope, e.span) if entry.owns_params else (
            namer["binding"] if namer else scope.prefix + fname)
        argspans: dict[str, Span] = {}
        bound = bind_arguments(entry, args, kwargs, e, kwspans, skip_ctx=True, spans_out=argspans)
        if e.piped:  # a complaint about the piped value points at the call, not upstream
            argspans = {k: v for k, v in argspans.items() if v is not e.args[0].span}
        ctx = _Ctx(self, prefix, e.span)
        try:
            with self.b.at(e.span):
                out = entry.fn(ctx, **bound)
        except DlcError as err:  # point at the argument the layer complains about, if it says which
            raise err.with_span(argspans.get(getattr(err, "arg", None)) or e.span)
        self._check_size(e)
        return out

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


def eval_recipe(expr, kind: str):
    """A train-option value written on the command line (`--optimizer "adam(lr=1e-3)"`),
    checked exactly as in a train block."""
    fe = Frontend(ast.Program((), ()))
    fe.graph = Graph("options")
    fe.b = GraphBuilder(fe.graph)
    return recipe_call(fe, expr, kind, Scope({}, {}, "", "option"))
