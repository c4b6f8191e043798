"""An ONNX model as a readable .dln file plus a checkpoint (`dlc import`).

Operators that make up a known layer become that layer, with its weights moved into
dlc's layout and parameter names:

  Gemm, MatMul (+ Add) by a constant          dense            (w [in, units], b)
  Conv (2-D or 1-D, symmetric pads)           conv2d, conv1d   (w, b; groups, dilation)
  ConvTranspose (2-D, one group, dilated too) conv_transpose2d (w, b)
  MaxPool, AveragePool, GlobalAveragePool     maxpool, avgpool, global_avgpool (2-D or 1-D)
  BatchNormalization                          batchnorm        (gamma, beta; running_mean, running_var)
  LayerNormalization                          layernorm        (gamma, beta; over several axes too)
  Resize (nearest, whole factors)             upsample
  GroupNormalization, InstanceNormalization   groupnorm        (gamma, beta; affine=false for ones
                                                               and zeros, as PyTorch's GroupNorm writes)
  Gather from a constant table                embedding        (table)
  LSTM, GRU (linear_before_reset=1), RNN      lstm, gru, rnn   (gates reordered; bidirectional and
                                                               initial states too)
  Relu, Sigmoid, Tanh, LeakyRelu, Softmax, LogSoftmax, Gelu, Elu, Selu, Softplus,
  Flatten, Dropout                            the function of the same name (Swish: silu)
  PRelu, Softsign, HardSigmoid, HardSwish, Mish
                                              their formula (PRelu's slopes a parameter,
                                              or leaky_relu's alpha when there is one)

and the rest become primitives (`+ - * / ** @`, exp, log, sqrt, abs, erf, sign, maximum,
minimum, clip, step (a Greater cast to float), the comparisons (Not of one: the opposite one),
And/Or/Not as logical_and/or/not, `where`, sum/mean/max/min (ReduceL1/L2/SumSquare of abs or
squares; GlobalMaxPool a max), 1 / x (Reciprocal), reshape, transpose, concat, pad, indexing
and Split's pieces; a Where on a constant condition, such as a causal mask, becomes a
multiply and an add).
Shape arithmetic (Shape, Gather, Concat, ... feeding a Reshape, as PyTorch's exporter
writes it) is evaluated here, symbolically in the batch dimension (products such as
batch * heads too), and so are the output shapes ONNX's shape inference gives up on
(`infer_missing`). A constant tensor that is no layer's weight becomes a declared `param`:
trainable when it is an initializer named as a weight (`pos_emb`, `onnx::PRelu_24`: PyTorch's
parameters, reshaped ones, and its buffers, which ONNX does not tell apart), frozen
(`trainable=false`) when it was computed (a folded mask, a pool's divisors); dlc's own
export lists its trainable parameters (`dlc.trainable`). An operator with no .dln
counterpart is an error naming the operator and its node.

A `dlc export`ed model's input normalization (`normalize.shift`/`normalize.scale`)
goes back into the checkpoint, where `dlc predict` and `dlc run --resume` apply it.

The checkpoint is written through dlc.Model, so `load_weights` and `dlc run --resume`
accept it; the .dln ends with a `train` block template to fill in for fine-tuning.
"""
from __future__ import annotations

import keyword
import re
from dataclasses import dataclass, field
from functools import partial, reduce
from pathlib import Path
from typing import Any

import numpy as np

from dlc.core.types import Sym, dim_div, dim_mul
from dlc.interchange import InterchangeError, require_onnx
from dlc.interchange.onnx_export import GRU_GATES, LSTM_GATES
from dlc.language.nn import SELU_ALPHA, SELU_SCALE, pooled_size

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEYWORDS = {"model", "block", "train", "param", "return"}


class ImportError_(InterchangeError):
    kind = "import error"


# --- values ------------------------------------------------------------------------------------

@dataclass
class Layer:
    """A param-owning call whose arguments may still change (a bias found later)."""

    fn: str
    args: list            # rendered positional arguments after the piped input
    kwargs: dict          # name -> rendered value
    params: dict          # dlc parameter suffix -> array (set into the checkpoint)

    def render(self) -> str:
        parts = list(self.args) + [f"{k}={v}" for k, v in self.kwargs.items()]
        return f"{self.fn}({', '.join(parts)})" if parts else self.fn


@dataclass
class Stmt:
    target: str
    head: str                      # the first expression
    pipes: list = field(default_factory=list)  # str or Layer, each `|> f(...)`
    layer: Layer | None = None
    comment: str = ""

    def render(self) -> str:
        text = self.head + "".join(f" |> {p.render() if isinstance(p, Layer) else p}" for p in self.pipes)
        line = f"    {self.target} = {text}"
        return line + (f"   # {self.comment}" if self.comment else "")


@dataclass
class V:
    """An ONNX value seen from the .dln side."""

    shape: tuple | None           # dims: int, a symbol name (str) or None (unknown)
    dtype: str                    # f32 f64 i32 bool
    var: str | None = None        # the .dln variable holding it
    const: np.ndarray | None = None
    dims: list | None = None      # a 1-D shape tensor's entries (int or symbol), from Shape
    zeros: bool = False           # ConstantOfShape of zeros
    view: tuple | None = None     # a form that is materialized only when read as a tensor
    stmt: Stmt | None = None      # the statement that made `var`
    uses: int = 0                 # how many ONNX nodes (and outputs) read it
    hint: str = ""                # a constant's ONNX name, for the `param` it may become
    weight: bool = False          # an initializer named as a weight (PyTorch's `pos_emb`, `onnx::PRelu_24`
    #                               of a PRelu's slopes), not as a node's output: trainable here


@dataclass
class Recurrent:
    fn: str                       # lstm | gru | rnn
    hidden: int
    dirs: int
    seq: str | None               # variable of the [B, T, dirs*H] outputs
    final: str | None             # variable of the [B, dirs*H] final states
    T: Any
    B: Any
    layout: int


class Importer:
    def __init__(self, model, path: str = "model.onnx"):
        onnx = require_onnx()
        from onnx import shape_inference
        self.onnx = onnx
        self.path = path
        try:
            self.m = shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # noqa: BLE001 - inference is a help, not a requirement
            self.m = model
        self.g = self.m.graph
        self.opset = next((o.version for o in self.m.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.values: dict[str, V] = {}
        self.stmts: list = []          # Stmt or str (a `param` line)
        self.taken: set[str] = set()
        self.symbols: dict[str, str] = {}  # ONNX dim_param -> .dln symbol
        self.params: dict[str, np.ndarray] = {}  # full dlc parameter name -> value
        self.param_decls: list[str] = []
        self.normalizer: tuple[np.ndarray, np.ndarray] | None = None
        self.warnings: list[str] = []
        self.layers_used: list[str] = []
        self.types = self._value_types()
        self.inferred: dict[str, tuple] = {}  # output shapes ONNX's inference left out (infer_missing)
        self.consumers: dict[str, int] = {}
        for n in self.g.node:
            for i in n.input:
                if i:
                    self.consumers[i] = self.consumers.get(i, 0) + 1
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    raise self.error(n, f"has a subgraph (`{a.name}`): control flow cannot be imported")
        for o in self.g.output:
            self.consumers[o.name] = self.consumers.get(o.name, 0) + 1
        from dlc.language import nn
        from dlc.language.checks import RESERVED
        from dlc.language.initializers import ARITY
        from dlc.language.recipe import RECIPE
        self.reserved = set(nn.BUILTINS) | set(RECIPE) | set(ARITY) | RESERVED | _KEYWORDS

    # --- names ---------------------------------------------------------------------------------
    def name(self, hint: str, fallback: str = "h") -> str:
        base = re.sub(r"[^A-Za-z0-9_]+", "_", hint or "").strip("_")
        if not base or not _IDENT.fullmatch(base) or keyword.iskeyword(base):
            base = fallback if not base or not base[0].isdigit() else f"{fallback}_{base}"
        base = base if base not in self.reserved else f"{base}1"
        cand, k = base, 2
        while cand in self.taken:
            cand, k = f"{base}_{k}", k + 1
        self.taken.add(cand)
        return cand

    def layer_name(self, node, weight: str | None, fallback: str) -> str:
        """From the weight's name (`fc.weight`, `h.w` -> fc, h), else the node's path
        (`/conv1/Conv` -> conv1), else `fallback` numbered."""
        if weight and "." in weight and not weight.startswith("onnx::"):
            stem = weight.rsplit(".", 1)[0]
            if stem:
                return self.name(stem, fallback)
        path = [p for p in node.name.split("/") if p]
        if len(path) > 1:
            return self.name("_".join(path[:-1]), fallback)
        k = 1
        while f"{fallback}{k}" in self.taken:
            k += 1
        return self.name(f"{fallback}{k}", fallback)

    def fail(self, node, message: str) -> ImportError_:
        """An error about a node, or (node None) about the model's output."""
        if node is not None:
            return self.error(node, message)
        return ImportError_(f"{self.path}: the output {message.replace('reads ', 'is ', 1)}")

    def error(self, node, message: str, hint: str | None = None) -> ImportError_:
        where = f"node `{node.name}` ({node.op_type})" if node.name else f"a {node.op_type} node"
        return ImportError_(f"{self.path}: {where} {message}", hint=hint)

    # --- types ---------------------------------------------------------------------------------
    def _value_types(self) -> dict:
        from onnx import TensorProto
        out = {}
        for v in list(self.g.input) + list(self.g.value_info) + list(self.g.output):
            t = v.type.tensor_type
            if not v.type.HasField("tensor_type"):
                continue
            dims = None
            if t.HasField("shape"):
                dims = tuple(d.dim_value if d.HasField("dim_value") else
                             (d.dim_param if d.HasField("dim_param") else None) for d in t.shape.dim)
            out[v.name] = (t.elem_type, dims)
        self._np_of = {TensorProto.FLOAT: "f32", TensorProto.DOUBLE: "f64", TensorProto.INT32: "i32",
                       TensorProto.INT64: "i32", TensorProto.BOOL: "bool", TensorProto.FLOAT16: "f32"}
        return out

    def dtype_of(self, name: str, default: str = "f32") -> str:
        t = self.types.get(name)
        return self._np_of.get(t[0], default) if t else default

    def dims_of(self, name: str):
        if name in self.inferred:
            return self.inferred[name]
        t = self.types.get(name)
        if not t or t[1] is None:
            return None
        return tuple(d if isinstance(d, int) and d > 0 else self.symbols.get(d) if isinstance(d, str) else None
                     for d in t[1])

    # --- reading values ------------------------------------------------------------------------
    def attrs(self, node) -> dict:
        """A node's attributes, strings (bytes in ONNX) decoded."""
        def text(v):
            return v.decode() if isinstance(v, bytes) else [text(x) for x in v] if isinstance(v, list) else v
        return {a.name: text(self.onnx.helper.get_attribute_value(a)) for a in node.attribute}

    def get(self, name: str) -> V:
        return self.values[name]

    def const_of(self, node, i: int, what: str = "this input") -> np.ndarray:
        if i >= len(node.input) or not node.input[i]:
            return None
        v = self.get(node.input[i])
        if v.const is None:
            raise self.error(node, f"needs a constant for {what} (input {i}, `{node.input[i]}`)")
        return v.const

    def text(self, v: V, node=None) -> str:
        """A .dln expression for v: a variable, a literal, or a declared parameter."""
        if v.view is not None and v.var is None:
            self.materialize(v)
        if v.var is not None:
            return v.var
        if v.const is not None:
            c = v.const
            if c.size == 1 and c.ndim <= 1 or c.ndim == 0:
                return literal(c.reshape(()).item())
            if c.dtype.kind != "f":
                raise self.fail(node, "reads an integer constant tensor, which a .dln program cannot declare")
            name = self.name(v.hint or "const", "const")
            dims = ", ".join(str(d) for d in c.shape)
            note = ""
            if np.isnan(c).any():
                raise self.fail(node, "reads a constant tensor holding NaN, which a checkpoint cannot hold")
            if np.isinf(c).any():  # an additive mask (a causal one, of a fixed length)
                c, note = finite(c), "; its infinities are written as ±1e30"
            self.param_decls.append(f"    param {name}: f32[{dims}] = zeros   # a weight of the ONNX model "
                                    "(a buffer? add `, trainable=false`)" if v.weight else
                                    f"    param {name}: f32[{dims}] = zeros, trainable=false   # a constant "
                                    f"of the ONNX model{note}")
            self.params[name] = c.astype(np.float32)
            v.var = name
            return name
        if v.zeros:
            raise self.fail(node, "reads a tensor of zeros made at run time (ConstantOfShape)")
        if v.dims is not None:  # Shape's numbers, read as data rather than as a shape
            raise self.fail(node, f"computes with the model's shape ({', '.join(map(str, v.dims))}) as a "
                                  "tensor; the importer evaluates shapes only where they feed shapes")
        raise AssertionError("a value without a form")

    def operand(self, v: V, node=None) -> str:
        t = self.text(v, node)
        return f"({t})" if t.startswith("-") else t

    # --- statements ----------------------------------------------------------------------------
    def open_stmt(self, v: V) -> Stmt | None:
        """The statement v can be piped onward in: the last one, made for v, read only here."""
        if v.stmt is not None and self.stmts and self.stmts[-1] is v.stmt and v.uses == 1 \
                and v.stmt.target == v.var:
            return v.stmt
        return None

    def pipe(self, node, x: V, call: "str | Layer", hint: str) -> V:
        """`... |> call`: appended to x's statement when it is open, else a new statement."""
        is_layer = isinstance(call, Layer)
        st = self.open_stmt(x)
        # one parameter-owning call per statement (dropout counts), so that its name is the prefix
        if st is not None and (st.layer is not None and st.layer.fn == "dropout" or
                               is_layer and (st.layer is not None or call.fn == "dropout")):
            st = None
        if st is not None:
            if is_layer:  # the statement's name becomes the layer's parameter prefix
                self.taken.discard(st.target)
                st.target = hint
                st.layer = call
            st.pipes.append(call)
            out = V(self.out_shape(node), self.dtype_of(node.output[0]), st.target, stmt=st)
        else:
            if is_layer:
                target = hint
            else:
                target = self.name("h")
            st = Stmt(target, self.text(x, node), [call], call if is_layer else None)
            self.stmts.append(st)
            out = V(self.out_shape(node), self.dtype_of(node.output[0]), target, stmt=st)
        self.bind(node.output[0], out)
        return out

    def assign(self, node, expr: str, out: int = 0, comment: str = "") -> V:
        target = self.name("h")
        st = Stmt(target, expr, comment=comment)
        self.stmts.append(st)
        v = V(self.out_shape(node, out), self.dtype_of(node.output[out]), target, stmt=st)
        self.bind(node.output[out], v)
        return v

    def new_stmt(self, target_hint: str, expr: str, shape, dtype="f32") -> V:
        target = self.name(target_hint, "h")
        st = Stmt(target, expr)
        self.stmts.append(st)
        return V(shape, dtype, target, stmt=st, uses=2)

    def bind(self, name: str, v: V) -> None:
        v.uses += self.consumers.get(name, 0)
        self.values[name] = v

    def out_shape(self, node, i: int = 0):
        return self.dims_of(node.output[i]) if i < len(node.output) else None

    # --- the walk ------------------------------------------------------------------------------
    def run(self) -> str:
        from onnx import numpy_helper
        inits = {i.name: numpy_helper.to_array(i) for i in self.g.initializer}
        inputs = [i for i in self.g.input if i.name not in inits]
        if len(self.g.output) != 1:
            raise ImportError_(f"{self.path} has {len(self.g.output)} outputs "
                               f"({', '.join(o.name for o in self.g.output)}); a dlc model has one",
                               hint="export the model with a single output")
        if not inputs:
            raise ImportError_(f"{self.path} has no inputs")
        listed = next((p.value for p in self.m.metadata_props if p.key == "dlc.trainable"), None)
        for name, a in inits.items():  # (PyTorch: `fc.weight`, `onnx::MatMul_80` a weight transposed, and a
            #                             value computed from constants named as its node's output, `/m/Add_output_0`)
            weight = name in listed.split(",") if listed is not None else not name.startswith("/")
            self.values[name] = V(a.shape, "f32", const=a, hint=name, weight=weight)
        params = []
        for k, i in enumerate(inputs):
            dims = self.types.get(i.name, (None, None))[1]
            if dims is None:
                raise ImportError_(f"{self.path}: input `{i.name}` has no shape",
                                   hint="export it with a shape (the batch dimension may be symbolic)")
            shape = []
            for axis, d in enumerate(dims):
                if isinstance(d, int) and d > 0:
                    shape.append(d)
                    continue
                key = d if isinstance(d, str) else f"?{k}.{axis}"
                if key not in self.symbols:
                    want = "B" if axis == 0 else (d if isinstance(d, str) else f"D{axis}")
                    self.symbols[key] = self.name(want, "N")
                shape.append(self.symbols[key])
            var = self.name(i.name, "x")
            dtype = self.dtype_of(i.name)
            v = V(tuple(shape), dtype, var)
            v.uses = self.consumers.get(i.name, 0)
            self.values[i.name] = v
            params.append(f"{var}: {dtype}[{', '.join(str(d) for d in shape)}]")
        self.inputs = params
        self.first_input = inputs[0].name
        nodes = list(self.g.node)
        skip = self.find_normalization(nodes, inits)
        for node in nodes:
            if id(node) in skip:
                continue
            self.convert(node)
        out = self.get(self.g.output[0].name)
        result = self.text(out)
        dims = self.dims_of(self.g.output[0].name) or out.shape
        if dims is None:
            raise ImportError_(f"{self.path}: the output's shape is unknown")
        free = iter(["K", "K2", "K3", "K4", "K5", "K6"])
        shown = [str(d) if d is not None else next(free) for d in dims]
        self.result_type = f"{out.dtype}[{', '.join(shown)}]"
        self.result = result
        self.output_dims = dims
        return result

    def find_normalization(self, nodes, inits) -> set:
        """Sub(x, normalize.shift) then Div(., normalize.scale) on the first input: dlc's own
        export of the checkpoint's normalization."""
        if "normalize.shift" not in inits or "normalize.scale" not in inits:
            return set()
        sub = next((n for n in nodes if n.op_type == "Sub" and list(n.input) == [self.first_input,
                                                                                  "normalize.shift"]), None)
        div = next((n for n in nodes if sub is not None and n.op_type == "Div"
                    and list(n.input) == [sub.output[0], "normalize.scale"]), None)
        if div is None or self.consumers.get(sub.output[0]) != 1:
            return set()
        self.normalizer = (inits["normalize.shift"].reshape(-1).astype(np.float32),
                           inits["normalize.scale"].reshape(-1).astype(np.float32))
        x = self.values[self.first_input]
        x.uses += self.consumers.get(div.output[0], 0) - 1
        self.values[div.output[0]] = x
        return {id(sub), id(div)}

    def convert(self, node) -> None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise self.error(node, f"is from the operator set `{node.domain}`, which dlc does not import")
        ins = [self.values.get(i) if i else None for i in node.input]
        missing = [i for i, v in zip(node.input, ins) if i and v is None]
        if missing:
            raise self.error(node, f"reads `{missing[0]}`, which nothing before it makes")
        handler = self.handler(op)
        if op not in _NO_FOLD and all(v is None or v.const is not None for v in ins) and node.input:
            self.fold(node)
            return
        if op in _MOVES and ins and ins[0] is not None and ins[0].zeros:  # zeros stay zeros
            self.bind(node.output[0], V(self.out_shape(node), "f32", zeros=True))
            return
        if any(o and (self.dims_of(o) is None or None in self.dims_of(o)) for o in node.output):
            self.infer_missing(node, ins)
        if handler is None:
            raise self.error(node, f"has no .dln counterpart: dlc cannot import `{op}`",
                             hint="the importer handles layers (Gemm, Conv, pools, BatchNormalization, "
                                  "LSTM/GRU/RNN, ...), activations and elementwise arithmetic")
        handler(node, ins)

    def handler(self, op: str):
        """What converts `op`: a one-line operator's from its table, else the method op_<name>."""
        if op in _UNARY:
            return partial(self.unary, fn=_UNARY[op])
        if op in _COMPARISONS:
            return partial(self.compare, sym=_COMPARISONS[op])
        return getattr(self, f"op_{op}", None)

    def fold(self, node) -> None:
        """Every input constant: computed now by onnx's reference evaluator."""
        from onnx import helper
        from onnx.reference import ReferenceEvaluator
        feeds = {i: self.values[i].const for i in node.input if i}
        g = helper.make_graph([node], "fold", [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(
            v.dtype), v.shape) for k, v in feeds.items()], [helper.make_value_info(o, helper.TypeProto())
                                                            for o in node.output if o])
        m = helper.make_model(g, opset_imports=list(self.m.opset_import))
        try:
            outs = ReferenceEvaluator(m).run(None, feeds)
        except Exception as e:  # noqa: BLE001
            raise self.error(node, f"could not be evaluated on its constant inputs: {e}") from None
        # a weight only moved (PyTorch unsqueezes a PRelu's slopes) is still a weight
        source = self.values[node.input[0]]
        moved = node.op_type in ("Unsqueeze", "Squeeze", "Reshape", "Transpose", "Identity", "Flatten") and \
            source.weight
        for name, a in zip([o for o in node.output if o], outs):
            self.bind(name, V(np.shape(a), "f32", const=np.asarray(a), hint=source.hint if moved else name,
                              weight=moved))

    def infer_missing(self, node, ins) -> None:
        """Output shapes ONNX's inference left out, found from the shapes the importer knows:
        its inference stops where a shape is computed at run time (PyTorch's multi-head
        attention reshapes to [T, B*heads, d] so), the importer evaluates such shapes."""
        from onnx import TensorProto, helper, numpy_helper, shape_inference
        if node.op_type == "Reshape" and ins[0] is not None and ins[0].shape is not None and \
                (ins[1].dims is not None or ins[1].const is not None):
            target = self.reshape_target(node, ins[0], self.dims_value(ins[1], node))
            if target.count(-1) == 1 and None not in ins[0].shape:
                known = reduce(dim_mul, (as_sym(d) for d in target if d != -1), 1)
                rest = dim_div(reduce(dim_mul, map(as_sym, ins[0].shape), 1), known)
                target = [as_dim(rest) if d == -1 and rest is not None else d for d in target]
            if -1 not in target:
                self.inferred[node.output[0]] = tuple(target)
            return
        named, inputs, inits = {}, [], []
        for name, v in zip(node.input, ins):
            if v is None:
                continue
            if v.const is not None:
                inits.append(numpy_helper.from_array(np.asarray(v.const), name))
            elif v.dims is not None and all(isinstance(d, int) for d in v.dims):
                inits.append(numpy_helper.from_array(np.array(v.dims, dtype=np.int64), name))
            else:
                shape = None if v.shape is None else [str(d) if d is not None and not isinstance(d, int) else d
                                                     for d in v.shape]
                named.update({str(d): d for d in v.shape or () if d is not None and not isinstance(d, int)})
                elem = self.types.get(name, (TensorProto.FLOAT,))[0] or TensorProto.FLOAT
                inputs.append(helper.make_tensor_value_info(name, elem, shape))
        outs = [helper.make_value_info(o, helper.TypeProto()) for o in node.output if o]
        model = helper.make_model(helper.make_graph([node], "one", inputs, outs, inits),
                                  opset_imports=list(self.m.opset_import))
        try:
            found = shape_inference.infer_shapes(model, strict_mode=True).graph
        except Exception:  # noqa: BLE001 - the handler then names the missing shape
            return
        for o in list(found.output) + list(found.value_info):
            t = o.type.tensor_type
            if o.name in node.output and t.HasField("shape"):
                self.inferred[o.name] = tuple(d.dim_value if d.HasField("dim_value") else
                                              named.get(d.dim_param) for d in t.shape.dim)

    # --- shape arithmetic ----------------------------------------------------------------------
    def op_Shape(self, node, ins):
        x = ins[0]
        shape = x.shape if x.shape is not None else self.dims_of(node.input[0])
        if shape is None or any(d is None for d in shape):
            raise self.error(node, "reads a shape that is not known here")
        start = next((a.i for a in node.attribute if a.name == "start"), 0)
        end = next((a.i for a in node.attribute if a.name == "end"), len(shape))
        dims = list(shape)[slice(start, end)]
        if all(isinstance(d, int) for d in dims):
            self.bind(node.output[0], V((len(dims),), "i32", const=np.array(dims, dtype=np.int64)))
        else:
            self.bind(node.output[0], V((len(dims),), "i32", dims=dims))

    def dims_value(self, v: V, node):
        if v.dims is not None:
            return list(v.dims)
        if v.const is not None:
            return [int(d) for d in np.asarray(v.const).reshape(-1)]
        raise self.error(node, "computes with a shape that is not known while importing")

    def shape_op(self, node, ins) -> bool:
        """Shape tensors holding symbols: Gather, Slice, Concat, Unsqueeze, Squeeze, Cast, and
        arithmetic on them."""
        if not any(v is not None and v.dims is not None for v in ins):
            return False
        op = node.op_type
        if op == "Gather":
            dims = self.dims_value(ins[0], node)
            idx = self.const_of(node, 1)
            picked = [dims[int(i)] for i in np.asarray(idx).reshape(-1)]
            out = V((), "i32", dims=picked) if np.ndim(idx) == 0 else V((len(picked),), "i32", dims=picked)
        elif op == "Concat":
            out = [d for v in ins for d in self.dims_value(v, node)]
            out = V((len(out),), "i32", dims=out)
        elif op in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
            out = V((len(self.dims_value(ins[0], node)),), "i32", dims=self.dims_value(ins[0], node))
        elif op == "Slice":
            dims = self.dims_value(ins[0], node)
            s, e = int(self.const_of(node, 1)[0]), int(self.const_of(node, 2)[0])
            step = int(self.const_of(node, 4)[0]) if len(node.input) > 4 and node.input[4] else 1
            out = V(None, "i32", dims=dims[s:e:step])
        elif op in _DIM_ARITHMETIC and all(v.dims is not None or v.const is not None for v in ins):
            # a head's width from the embedding's: E / heads
            a, b = (self.dims_value(v, node) for v in ins)
            if len(a) != len(b) and 1 not in (len(a), len(b)):
                return False
            n = max(len(a), len(b))
            dims = [self.dim_arithmetic(node, x, y) for x, y in zip(a * n if len(a) == 1 else a,
                                                                     b * n if len(b) == 1 else b)]
            out = V(ins[0].shape if len(a) == n else ins[1].shape, "i32", dims=dims)
        else:
            return False
        if all(isinstance(d, int) for d in out.dims):  # numbers after all: a constant from here on
            out = V(out.shape, "i32", const=np.array(out.dims, dtype=np.int64).reshape(
                () if out.shape == () else -1))
        self.bind(node.output[0], out)
        return True

    def dim_arithmetic(self, node, x, y):
        """One entry of shape arithmetic: numbers as ONNX computes them (Div truncates), a
        symbol kept through + 0, - 0, * 1 and / 1."""
        op = node.op_type
        if isinstance(x, int) and isinstance(y, int):
            if op in ("Div", "Mod") and y == 0:
                raise self.error(node, "divides a shape by zero")
            return _DIM_ARITHMETIC[op](x, y)
        if y == (1 if op in ("Mul", "Div") else 0) and op != "Mod":
            return x
        if op == "Mul" and x == 1:
            return y
        if op == "Mul":  # batch * heads
            return as_dim(dim_mul(as_sym(x), as_sym(y)))
        quotient = dim_div(as_sym(x), as_sym(y)) if op == "Div" else None
        if quotient is not None:
            return as_dim(quotient)
        raise self.error(node, f"computes `{x} {op} {y}` with a dimension that is known only when the "
                               "model runs; the importer evaluates shape arithmetic on numbers")

    def op_ConstantOfShape(self, node, ins):
        from onnx import numpy_helper
        value = next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"), np.zeros(1))
        dims = self.dims_value(ins[0], node)
        if all(isinstance(d, int) for d in dims):
            self.bind(node.output[0], V(tuple(dims), "f32", const=np.full(dims, value.reshape(-1)[0])))
        elif float(value.reshape(-1)[0]) == 0.0:
            self.bind(node.output[0], V(tuple(dims), "f32", zeros=True))
        else:
            raise self.error(node, "makes a constant tensor of a run-time shape")

    # --- views ---------------------------------------------------------------------------------
    def materialize(self, v: V) -> None:
        kind, *rest = v.view
        if kind == "transpose":
            base, perm = rest
            v.var = self.new_stmt("t", f"transpose({self.text(base)}, {ilist(perm)})", v.shape).var
        elif kind == "gap":
            (base,) = rest
            n, c = base.shape[:2]
            v.var = self.new_stmt("h", f"reshape({self.text(base)}, {dlist([n, c, 1, 1])})", v.shape).var
        elif kind.startswith("rec_"):
            v.var = self.rec_materialize(v)
        elif kind == "expand":  # read by other than elementwise arithmetic (which broadcasts itself)
            (base,) = rest
            if v.shape is None or None in v.shape:
                raise ImportError_(f"{self.path}: an Expand to a shape the importer does not know is read by "
                                   "other than elementwise arithmetic")
            v.var = self.new_stmt("h", f"broadcast_to({self.text(base)}, {dlist(v.shape)})", v.shape,
                                  v.dtype).var
        elif kind == "compare":
            sym, a, b = rest
            v.var = self.new_stmt("c", f"{self.operand(a)} {sym} {self.operand(b)}", v.shape, "bool").var
        else:
            raise AssertionError(kind)

    def rec_materialize(self, v: V) -> str:
        kind, r, *extra = v.view
        H, D, T, B = r.hidden, r.dirs, r.T, r.B
        if kind == "rec_seq_tm":     # [T, B, D*H]
            return self.new_stmt("hs_t", f"transpose({r.seq}, [1, 0, 2])", v.shape).var
        if kind == "rec_seq_tm_dir":  # [T, B, H] of one direction
            k = extra[0]
            part = r.seq if D == 1 else f"{r.seq}[:, :, {k * H}:{(k + 1) * H}]"
            return self.new_stmt("hs_t", f"transpose({part}, [1, 0, 2])", v.shape).var
        if kind == "rec_Y":           # ONNX's Y
            if r.layout == 1:
                return self.new_stmt("hs_y", f"reshape({r.seq}, {dlist([B, T, D, H])})", v.shape).var
            tm = f"transpose({r.seq}, [1, 0, 2])"
            if D == 1:
                return self.new_stmt("hs_y", f"reshape({tm}, {dlist([T, 1, B, H])})", v.shape).var
            return self.new_stmt("hs_y", f"transpose(reshape({tm}, {dlist([T, B, D, H])}), [0, 2, 1, 3])",
                                 v.shape).var
        if kind == "rec_Y_tbdh":
            return self.new_stmt("hs_y", f"reshape(transpose({r.seq}, [1, 0, 2]), {dlist([T, B, D, H])})",
                                 v.shape).var
        if kind == "rec_final_dir":
            k = extra[0]
            return r.final if D == 1 else self.new_stmt("last", f"{r.final}[:, {k * H}:{(k + 1) * H}]",
                                                        v.shape).var
        if kind == "rec_h":           # ONNX's Y_h [D, B, H] (layout 1: [B, D, H])
            if r.layout == 1:
                return self.new_stmt("h_n", f"reshape({r.final}, {dlist([B, D, H])})", v.shape).var
            if D == 1:
                return self.new_stmt("h_n", f"reshape({r.final}, {dlist([1, B, H])})", v.shape).var
            return self.new_stmt("h_n", f"transpose(reshape({r.final}, {dlist([B, D, H])}), [1, 0, 2])",
                                 v.shape).var
        if kind == "rec_h_bdh":
            return self.new_stmt("h_n", f"reshape({r.final}, {dlist([B, D, H])})", v.shape).var
        raise AssertionError(kind)

    def view_of(self, v: V, *kinds) -> tuple | None:
        return v.view if v.view is not None and v.view[0] in kinds else None

    def seq_value(self, r: Recurrent, shape) -> V:
        return V(shape, "f32", r.seq, uses=2)

    # --- layers --------------------------------------------------------------------------------
    def dense(self, node, x: V, w: np.ndarray, b: np.ndarray | None, weight_name: str | None):
        units = w.shape[1]
        name = self.layer_name(node, weight_name, "dense")
        params = {"w": w.astype(np.float32)}
        kwargs = {}
        if b is not None:
            params["b"] = np.broadcast_to(b.reshape(-1) if b.size != 1 else b.reshape(()), (units,)).astype(np.float32)
        else:
            kwargs["bias"] = "false"
        layer = Layer("dense", [str(units)], kwargs, params)
        self.layers_used.append("dense")
        return self.pipe(node, x, layer, name)

    def op_Gemm(self, node, ins):
        a = self.attrs(node)
        alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
        ta, tb = a.get("transA", 0), a.get("transB", 0)
        x = ins[0]
        if ins[1].const is not None:
            w = ins[1].const.T if tb else ins[1].const
            c = ins[2].const if len(ins) > 2 and ins[2] is not None else None
            if len(ins) > 2 and ins[2] is not None and c is None:
                raise self.error(node, "adds a bias that is not a constant")
            if c is not None and c.size not in (1, w.shape[1]):
                raise self.error(node, f"adds a bias of shape {list(c.shape)} to {w.shape[1]} units")
            if ta:
                x = V(None, x.dtype, self.new_stmt("t", f"transpose({self.text(x)})", None).var, uses=1)
            self.dense(node, x, w * alpha, None if c is None else c * beta, node.input[1])
            return
        left = f"transpose({self.text(x)})" if ta else self.operand(x)
        right = f"transpose({self.text(ins[1])})" if tb else self.operand(ins[1])
        expr = f"{left} @ {right}"
        if alpha != 1.0:
            expr = f"{expr} * {literal(alpha)}"
        if len(ins) > 2 and ins[2] is not None:
            c = self.operand(ins[2])
            expr = f"{expr} + {c}" if beta == 1.0 else f"{expr} + {c} * {literal(beta)}"
        self.assign(node, expr)

    def op_MatMul(self, node, ins):
        x, w = ins
        if w.const is not None and w.const.ndim == 2 and x.dtype == "f32":
            self.dense(node, x, w.const, None, node.input[1])
            return
        if w.shape is None or len(w.shape) < 2:
            raise self.error(node, "multiplies by a tensor that is not a matrix; `@` in .dln takes a matrix "
                                   "or a stack of matrices on the right")
        if len(w.shape) > 2 and (x.shape is None or list(x.shape[:-2]) != list(w.shape[:-2])):
            raise self.error(node, f"multiplies stacks of matrices whose leading axes differ ({list(x.shape or [])} "
                                   f"@ {list(w.shape)}); dlc's `@` broadcasts no stacks")
        self.assign(node, f"{self.operand(x)} @ {self.operand(w)}")

    def op_Conv(self, node, ins):
        a = self.attrs(node)
        w = self.const_of(node, 1, "the weights")
        if w.ndim not in (3, 4):
            raise self.error(node, f"is a {w.ndim - 2}-D convolution; dlc has conv1d and conv2d")
        fn = "conv2d" if w.ndim == 4 else "conv1d"
        k = list(w.shape[2:])
        stride = list(a.get("strides", [1] * len(k)))
        dilation = list(a.get("dilations", [1] * len(k)))
        pad = self.pads(node, a, [d * (n - 1) + 1 for d, n in zip(dilation, k)], stride)
        b = self.const_of(node, 2, "the bias") if len(node.input) > 2 and node.input[2] else None
        params = {"w": w.astype(np.float32)}
        kwargs = {}
        if any(s != 1 for s in stride):
            kwargs["stride"] = window_text(stride)
        if any(pad):
            kwargs["pad"] = window_text(pad)
        if any(d != 1 for d in dilation):
            kwargs["dilation"] = window_text(dilation)
        if a.get("group", 1) != 1:
            kwargs["groups"] = str(a["group"])
        if b is not None:
            params["b"] = b.astype(np.float32)
        else:
            kwargs["bias"] = "false"
        layer = Layer(fn, [str(w.shape[0]), window_text(k)], kwargs, params)
        self.layers_used.append(fn)
        self.pipe(node, ins[0], layer, self.layer_name(node, node.input[1], "conv"))

    def op_ConvTranspose(self, node, ins):
        a = self.attrs(node)
        w = self.const_of(node, 1, "the weights")
        if w.ndim != 4:
            raise self.error(node, f"is a {w.ndim - 2}-D transposed convolution; dlc has conv_transpose2d")
        if a.get("group", 1) != 1:
            raise self.error(node, "is a grouped transposed convolution, which dlc's conv_transpose2d does not do")
        if "output_shape" in a:
            raise self.error(node, "gives its output_shape; dlc's conv_transpose2d takes pads and output_padding")
        k = list(w.shape[2:])
        stride = list(a.get("strides", [1, 1]))
        if a.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"):
            raise self.error(node, "pads SAME_UPPER or SAME_LOWER; dlc's conv_transpose2d takes pads")
        pad = self.pads(node, a, k, stride)
        extra = list(a.get("output_padding", [0, 0]))
        dilation = list(a.get("dilations", [1, 1]))
        b = self.const_of(node, 2, "the bias") if len(node.input) > 2 and node.input[2] else None
        params = {"w": w.astype(np.float32)}  # (ONNX's layout [in, out, kh, kw] is dlc's)
        kwargs = {}
        for name, v in (("stride", stride), ("pad", pad), ("output_pad", extra), ("dilation", dilation)):
            if any(v) and (name not in ("stride", "dilation") or any(x != 1 for x in v)):
                kwargs[name] = window_text(v)
        if b is not None:
            params["b"] = b.astype(np.float32)
        else:
            kwargs["bias"] = "false"
        self.layers_used.append("conv_transpose2d")
        self.pipe(node, ins[0], Layer("conv_transpose2d", [str(w.shape[1]), window_text(k)], kwargs, params),
                  self.layer_name(node, node.input[1], "deconv"))

    def pads(self, node, a, k, stride) -> list:
        """The padding of each spatial axis (both sides alike), from `pads` or `auto_pad`."""
        auto = a.get("auto_pad", "NOTSET")
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            if any(s != 1 for s in stride) or any(x % 2 == 0 for x in k):
                raise self.error(node, f"pads {auto} with an even window or a stride; dlc pads symmetrically")
            return [x // 2 for x in k]
        n = len(k)
        pads = list(a.get("pads", [0] * 2 * n))
        if auto == "VALID":
            pads = [0] * 2 * n
        if pads[:n] != pads[n:]:
            raise self.error(node, f"pads asymmetrically ({pads}); dlc pads both sides alike")
        return pads[:n]

    def pool(self, node, ins, mode):
        a = self.attrs(node)
        if len(node.output) > 1 and node.output[1]:
            raise self.error(node, "also returns the indices of the maxima, which dlc does not compute")
        k = list(a["kernel_shape"])
        if len(k) not in (1, 2):
            raise self.error(node, f"pools over {len(k)} dimensions; dlc pools over 1 or 2")
        if any(d != 1 for d in a.get("dilations", [])):
            raise self.error(node, "is a dilated pooling, which dlc does not do")
        stride = list(a.get("strides", [1] * len(k)))
        pad = self.pads(node, a, k, stride)
        if any(p > w // 2 for p, w in zip(pad, k)):
            raise self.error(node, f"pads {pad} beyond half its window {k}")
        ceil = bool(a.get("ceil_mode", 0))
        x, out = ins[0], self.out_shape(node)
        if ceil and x.shape is not None and all(isinstance(d, int) for d in x.shape[2:]) and out is not None and \
                list(out[2:]) != [pooled_size(*d, True) for d in zip(x.shape[2:], k, stride, pad)]:
            raise self.error(node, f"rounds its output size up (ceil_mode=1) to {list(out[2:])}, where "
                                   "PyTorch's rule, which dlc follows, gives another size")
        args = [window_text(k)]
        kwargs = []
        if stride != k:
            kwargs.append(f"stride={window_text(stride)}")
        if any(pad):
            kwargs.append(f"pad={window_text(pad)}")
        if ceil:
            kwargs.append("ceil=true")
        if mode == "avg" and (any(pad) or ceil) and not a.get("count_include_pad", 0):
            kwargs.append("count_pad=false")
        self.pipe(node, ins[0], f"{mode}pool({', '.join(args + kwargs)})", "h")

    def op_MaxPool(self, node, ins):
        self.pool(node, ins, "max")

    def op_AveragePool(self, node, ins):
        self.pool(node, ins, "avg")

    def op_GlobalAveragePool(self, node, ins):
        x = ins[0]
        if x.shape is not None and len(x.shape) == 3:  # [N, C, T] -> [N, C, 1]
            self.assign(node, f"mean({self.text(x, node)}, axis=2, keepdims=true)")
            return
        if x.shape is None or len(x.shape) != 4:
            raise self.error(node, "pools a tensor that is neither NCHW nor [N, C, T]")
        inner = V(tuple(x.shape[:2]), x.dtype)
        self.pipe_into(node, ins[0], "global_avgpool", inner)
        self.bind(node.output[0], V(self.out_shape(node) or tuple(x.shape[:2]) + (1, 1), x.dtype,
                                    view=("gap", inner)))

    def pipe_into(self, node, x: V, call: str, out: V) -> None:
        """Like pipe, but the result goes into `out` (a value no ONNX name holds yet)."""
        st = self.open_stmt(x)
        if st is not None and (st.layer is None or st.layer.fn != "dropout"):
            st.pipes.append(call)
        else:
            st = Stmt(self.name("h"), self.text(x, node), [call])
            self.stmts.append(st)
        out.var, out.stmt, out.uses = st.target, st, 1

    def op_BatchNormalization(self, node, ins):
        a = self.attrs(node)
        if a.get("training_mode", 0):
            raise self.error(node, "normalizes in training mode; export the model in evaluation mode")
        gamma, beta, mean, var = (self.const_of(node, i, w) for i, w in
                                  ((1, "the scale"), (2, "the bias"), (3, "the mean"), (4, "the variance")))
        x = ins[0]
        if x.shape is not None and len(x.shape) not in (2, 4):
            raise self.error(node, f"normalizes a rank-{len(x.shape)} tensor; dlc's batchnorm takes [N, C] or "
                                   "[N, C, H, W]")
        kwargs = {}
        eps = a.get("epsilon", 1e-5)
        if abs(eps - 1e-5) > 1e-12:
            kwargs["eps"] = literal(float(np.float32(eps)))
        momentum = 1.0 - a.get("momentum", 0.9)
        if abs(momentum - 0.1) > 1e-6:
            kwargs["momentum"] = literal(round(float(momentum), 6))
        params = {"gamma": gamma, "beta": beta, "running_mean": mean, "running_var": var}
        layer = Layer("batchnorm", [], kwargs, {k: v.astype(np.float32) for k, v in params.items()})
        self.layers_used.append("batchnorm")
        self.pipe(node, x, layer, self.layer_name(node, node.input[1], "bn"))

    def op_LayerNormalization(self, node, ins):
        a = self.attrs(node)
        x = ins[0]
        rank = len(x.shape) if x.shape is not None else None
        axis = a.get("axis", -1)
        if rank is None:
            raise self.error(node, "normalizes a tensor of unknown rank")
        if rank > 1 and axis % rank == 0:
            raise self.error(node, f"normalizes over the axes from {axis} on, the batch axis too; dlc's "
                                   "layernorm normalizes each sample on its own")
        shape = tuple(x.shape[axis % rank:])
        if not all(isinstance(d, int) for d in shape):
            raise self.error(node, "normalizes over axes whose sizes are not known while importing")
        scale = self.const_of(node, 1, "the scale")
        bias = self.const_of(node, 2, "the bias")
        params = {"gamma": np.broadcast_to(scale, shape),
                  "beta": np.zeros(shape) if bias is None else np.broadcast_to(bias, shape)}
        eps = a.get("epsilon", 1e-5)
        kwargs = {"eps": literal(float(np.float32(eps)))} if abs(eps - 1e-5) > 1e-12 else {}
        if len(shape) > 1:
            kwargs["axis"] = str(axis % rank)
        layer = Layer("layernorm", [], kwargs, {k: v.astype(np.float32) for k, v in params.items()})
        self.layers_used.append("layernorm")
        self.pipe(node, x, layer, self.layer_name(node, node.input[1], "ln"))

    def op_InstanceNormalization(self, node, ins):  # groupnorm with a group per channel
        self.group_norm(node, ins, None)

    def op_GroupNormalization(self, node, ins):
        self.group_norm(node, ins, int(self.attrs(node)["num_groups"]))

    def group_norm(self, node, ins, groups: int | None) -> None:
        x = ins[0]
        if x.shape is None or len(x.shape) < 2 or not all(isinstance(d, int) for d in x.shape[1:]):
            raise self.error(node, "normalizes a tensor whose channels and sizes are not known while importing")
        c = x.shape[1]
        groups = c if groups is None else groups
        scale, bias = self.const_of(node, 1, "the scale"), self.const_of(node, 2, "the bias")
        if np.size(scale) == groups != c:  # GroupNormalization before opset 21: a scale per group
            scale, bias = np.repeat(scale, c // groups), np.repeat(bias, c // groups)
        eps = self.attrs(node).get("epsilon", 1e-5)
        kwargs = {"eps": literal(float(np.float32(eps)))} if abs(eps - 1e-5) > 1e-12 else {}
        params = {}
        if np.all(scale == 1) and np.all(bias == 0):
            kwargs["affine"] = "false"  # (PyTorch's GroupNorm: its weight and bias follow as Mul and Add)
        else:
            params = {"gamma": np.broadcast_to(scale, (c,)).astype(np.float32),
                      "beta": np.broadcast_to(bias, (c,)).astype(np.float32)}
        self.layers_used.append("groupnorm")
        self.pipe(node, x, Layer("groupnorm", [str(groups)], kwargs, params),
                  self.layer_name(node, node.input[1], "gn"))

    def op_Resize(self, node, ins):
        """Nearest-neighbour resizing by whole factors (nn.Upsample's default): `upsample`."""
        a = self.attrs(node)
        x = ins[0]
        mode = a.get("mode", "nearest")
        if mode != "nearest":
            raise self.error(node, f"resizes by {mode} interpolation; dlc's upsample repeats the nearest cell")
        if x.shape is None or len(x.shape) not in (3, 4) or not all(isinstance(d, int) for d in x.shape[1:]):
            raise self.error(node, "resizes a tensor that is not NCHW or [N, C, T] of known sizes")
        scales = self.const_of(node, 2, "the scales") if len(node.input) > 2 and node.input[2] else None
        if scales is None or np.size(scales) == 0:
            sizes = self.const_of(node, 3, "the sizes")
            scales = np.asarray(sizes[1:], np.float64) / np.asarray([1] + list(x.shape[1:]), np.float64)
            scales = np.concatenate([[1.0], scales])
        scales = [float(v) for v in np.asarray(scales).reshape(-1)]
        factors = [int(v) for v in scales[2:]]
        if scales[:2] != [1.0, 1.0] or factors != scales[2:] or min(factors) < 1:
            raise self.error(node, f"resizes by {scales}; dlc's upsample repeats cells by whole factors along the "
                                   "spatial axes")
        coords = a.get("coordinate_transformation_mode", "half_pixel")
        rounding = a.get("nearest_mode", "round_prefer_floor")
        # whole factors: half-pixel centres never round from a tie, and asymmetric ones repeat when floored
        if not (coords in ("half_pixel", "pytorch_half_pixel") or coords == "asymmetric" and rounding == "floor"):
            raise self.error(node, f"maps coordinates `{coords}` with `{rounding}` rounding, which does not "
                                   "repeat each cell")
        out = self.pipe(node, x, f"upsample({window_text(factors)})" if set(factors) != {2} else "upsample", "h")
        if out.shape is None or None in out.shape:  # (ONNX's inference may not follow runtime scales)
            out.shape = tuple(x.shape[:2]) + tuple(d * f for d, f in zip(x.shape[2:], factors))

    def op_Dropout(self, node, ins):
        if len(node.input) > 2 and node.input[2]:
            mode = ins[2]
            if mode.const is None or bool(mode.const):
                raise self.error(node, "runs in training mode")
        ratio = float(ins[1].const) if len(ins) > 1 and ins[1] is not None and ins[1].const is not None else 0.5
        if ratio == 0.0:
            self.alias(node, ins[0])
            return
        layer = Layer("dropout", [literal(ratio)], {}, {})
        self.pipe(node, ins[0], layer, self.name("drop", "drop"))

    def alias(self, node, v: V) -> None:
        v.uses += self.consumers.get(node.output[0], 0) - 1
        self.values[node.output[0]] = v

    def op_Identity(self, node, ins):
        self.alias(node, ins[0])

    # --- embedding, indexing -------------------------------------------------------------------
    def op_Gather(self, node, ins):
        if self.shape_op(node, ins):
            return
        a = self.attrs(node)
        axis = a.get("axis", 0)
        data, idx = ins
        if data.const is not None and data.const.ndim == 2 and axis == 0 and idx.const is None:
            table = data.const.astype(np.float32)
            layer = Layer("embedding", [str(table.shape[0]), str(table.shape[1])], {}, {"table": table})
            self.layers_used.append("embedding")
            self.pipe(node, idx, layer, self.layer_name(node, node.input[0], "embed"))
            return
        if idx.const is None or idx.const.ndim != 0:
            raise self.error(node, "gathers by indices that are not one constant number; .dln indexes with "
                                   "numbers and slices")
        k = int(idx.const)
        rec = self.gather_recurrent(node, data, axis, k)
        if rec:
            return
        rank = len(data.shape) if data.shape is not None else None
        if rank is None:
            raise self.error(node, "indexes a tensor of unknown rank")
        axis %= rank
        self.assign(node, f"{self.text(data, node)}[{', '.join([':'] * axis + [str(k)])}]")

    def op_Slice(self, node, ins):
        if self.shape_op(node, ins):
            return
        x = ins[0]
        starts, ends = self.const_of(node, 1, "starts"), self.const_of(node, 2, "ends")
        rank = len(x.shape) if x.shape is not None else None
        if rank is None:
            raise self.error(node, "slices a tensor of unknown rank")
        axes = self.const_of(node, 3, "axes") if len(node.input) > 3 and node.input[3] else np.arange(len(starts))
        steps = self.const_of(node, 4, "steps") if len(node.input) > 4 and node.input[4] else np.ones(len(starts))
        subs = [":"] * rank
        for s, e, ax, st in zip(starts, ends, axes, steps):
            ax = int(ax) % rank
            s, e, st = int(s), int(e), int(st)
            if st < 1:
                raise self.error(node, "slices with a negative step, which .dln does not have")
            d = x.shape[ax]
            big = isinstance(d, int) and e >= d or e >= 2 ** 62
            text = (str(s) if s != 0 else "") + ":" + ("" if big else str(e)) + (f":{st}" if st != 1 else "")
            subs[ax] = text
        while subs and subs[-1] == ":":
            subs.pop()
        self.assign(node, f"{self.text(x, node)}[{', '.join(subs) or ':'}]" if subs else self.text(x, node))

    def op_Split(self, node, ins):
        """Pieces along one axis: slices (PyTorch writes one for a fused q, k, v projection)."""
        x = ins[0]
        if x.shape is None:
            raise self.error(node, "splits a tensor of unknown rank")
        a = self.attrs(node)
        axis = a.get("axis", 0) % len(x.shape)
        if len(node.input) > 1 and node.input[1]:
            sizes = [int(s) for s in self.const_of(node, 1, "the sizes")]
        elif "split" in a:  # opsets before 13
            sizes = [int(s) for s in a["split"]]
        else:  # even pieces (the last may be smaller)
            d = x.shape[axis]
            if not isinstance(d, int):
                raise self.error(node, "splits an axis of unknown size into even pieces")
            per = -(-d // len(node.output))
            sizes = [min(per, d - i * per) for i in range(len(node.output))]
        start = 0
        for i, size in enumerate(sizes):
            subs = [":"] * axis + [f"{start or ''}:{start + size}"]
            self.assign(node, f"{self.text(x, node)}[{', '.join(subs)}]", out=i)
            start += size

    # --- recurrent layers ----------------------------------------------------------------------
    def recurrent(self, node, ins, fn: str):
        a = self.attrs(node)
        direction = a.get("direction", "forward")
        if direction == "reverse":
            raise self.error(node, "runs in reverse only; dlc's recurrent layers run forward, or both ways "
                                   "with bidirectional=true")
        for bad in ("clip", "activation_alpha", "activation_beta"):
            if bad in a:
                raise self.error(node, f"sets `{bad}`, which dlc's {fn} does not have")
        acts = list(a.get("activations", []))
        default = {"lstm": ["Sigmoid", "Tanh", "Tanh"], "gru": ["Sigmoid", "Tanh"], "rnn": ["Tanh"]}[fn]
        relu_rnn = fn == "rnn" and bool(acts) and set(acts) == {"Relu"}
        if acts and acts != default * (len(acts) // len(default)) and not relu_rnn:
            raise self.error(node, f"uses the activations {acts}; dlc's {fn} uses {default}"
                                   + (" or ['Relu']" if fn == "rnn" else ""))
        if a.get("input_forget", 0):
            raise self.error(node, "couples the input and forget gates (input_forget=1)")
        if fn == "gru" and not a.get("linear_before_reset", 0):
            raise self.error(node, "is a GRU with linear_before_reset=0 (Keras' convention); dlc's gru is "
                                   "PyTorch's (linear_before_reset=1)")
        layout = a.get("layout", 0)
        W, R = self.const_of(node, 1, "W"), self.const_of(node, 2, "R")
        B = self.const_of(node, 3, "B") if len(node.input) > 3 and node.input[3] else None
        if len(node.input) > 4 and node.input[4]:
            raise self.error(node, "takes sequence lengths; dlc's layers read every time step")
        # initial states [D, B, H], as dlc's `initial=` takes them (zeros: left out)
        given = [ins[i] if len(node.input) > i and node.input[i] and
                 not (ins[i].zeros or ins[i].const is not None and not np.any(ins[i].const)) else None
                 for i in ((5, 6) if fn == "lstm" else (5,))]
        if fn != "lstm" and len(node.input) > 6 and node.input[6]:
            raise self.error(node, f"has an initial cell state, which dlc's {fn} does not")
        if len(node.input) > 7 and node.input[7] and np.any(self.const_of(node, 7, "P")):
            raise self.error(node, "has peephole connections, which dlc's lstm does not")
        if fn == "lstm" and len(node.output) > 2 and node.output[2] and self.consumers.get(node.output[2]):
            raise self.error(node, "has its cell state (Y_c) read; dlc's lstm gives the hidden states only")
        H = int(a["hidden_size"])
        D = W.shape[0]
        gates = {"lstm": 4, "gru": 3, "rnn": 1}[fn]
        if B is None:
            B = np.zeros((D, 2 * gates * H), np.float32)
        x = ins[0]
        # dlc's layers take [batch, time, features]: undo the exporter's transpose, or write one
        base = self.view_of(x, "transpose")
        tm = self.view_of(x, "rec_seq_tm")
        if layout == 0:
            if base is not None and list(base[2]) == [1, 0, 2]:
                x = base[1]
            elif tm is not None:
                x = self.seq_value(tm[1], None)
                x.shape = (tm[1].B, tm[1].T, tm[1].dirs * tm[1].hidden)
            else:
                x = V(None, "f32", self.new_stmt("xs", f"transpose({self.text(x, node)}, [1, 0, 2])", None).var,
                      uses=1)
        shape = x.shape if x.shape is not None else None
        bdim, tdim = (shape[0], shape[1]) if shape else (None, None)
        if tdim is None or not isinstance(tdim, int):
            t_in = self.dims_of(node.input[0])
            tdim = (t_in[1] if layout else t_in[0]) if t_in else None
            bdim = (t_in[0] if layout else t_in[1]) if t_in else bdim
        if not isinstance(tdim, int):
            raise self.error(node, "runs over a number of time steps that is not known; dlc's layers need it")
        params = {}
        # dlc's gate j is ONNX's block inv[j]: the inverse of the exporter's permutation
        order = {"lstm": LSTM_GATES, "gru": GRU_GATES, "rnn": (0,)}[fn]
        inv = [order.index(j) for j in range(len(order))]
        for d in range(D):
            suffix = "_rev" if d == 1 else ""

            def dlc_layout(m, inv=inv):  # [gates*H, ...] in ONNX's gate order -> dlc's order
                return np.concatenate([m[j * H:(j + 1) * H] for j in inv], axis=0)

            w, u = dlc_layout(W[d]).T, dlc_layout(R[d]).T
            wb, rb = dlc_layout(B[d][:gates * H]), dlc_layout(B[d][gates * H:])
            if fn == "rnn":
                params.update({"wx" + suffix: w, "wh" + suffix: u, "b" + suffix: wb + rb})
            elif fn == "lstm":
                params.update({"w" + suffix: w, "u" + suffix: u, "b" + suffix: wb + rb})
            else:
                params.update({"w" + suffix: w, "u" + suffix: u, "b" + suffix: wb, "bh" + suffix: rb})
        params = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()}
        need_seq = bool(self.consumers.get(node.output[0])) if node.output and node.output[0] else False
        need_final = len(node.output) > 1 and bool(node.output[1]) and bool(self.consumers.get(node.output[1]))
        kwargs = {}
        if need_seq:
            kwargs["return_sequences"] = "true"
        if D == 2:
            kwargs["bidirectional"] = "true"
        if relu_rnn:
            kwargs["activation"] = '"relu"'
        if any(v is not None for v in given):
            states = [self.text(v, node) if v is not None else None for v in given]
            some = next(t for t in states if t is not None)
            states = [t if t is not None else f"0.0 * {some}" for t in states]  # the other one zeros
            kwargs["initial"] = states[0] if fn != "lstm" else f"({states[0]}, {states[1]})"
        layer = Layer(fn, [str(H)], kwargs, params)
        self.layers_used.append(fn)
        name = self.layer_name(node, node.input[1], fn)
        st = Stmt(name, self.text(x, node), [layer], layer)
        self.stmts.append(st)
        r = Recurrent(fn, H, D, name if need_seq else None, name if not need_seq else None, tdim, bdim, layout)
        if need_seq and need_final:
            last = f"{name}[:, -1]" if D == 1 else \
                f"concat([{name}[:, -1, :{H}], {name}[:, 0, {H}:]], axis=1)"
            r.final = self.new_stmt(f"{name}_last", last, (bdim, D * H)).var
        if need_seq:
            self.bind(node.output[0], V(self.out_shape(node, 0), "f32", view=("rec_Y", r)))
        if need_final:
            self.bind(node.output[1], V(self.out_shape(node, 1), "f32", view=("rec_h", r)))

    def op_LSTM(self, node, ins):
        self.recurrent(node, ins, "lstm")

    def op_GRU(self, node, ins):
        self.recurrent(node, ins, "gru")

    def op_RNN(self, node, ins):
        self.recurrent(node, ins, "rnn")

    def gather_recurrent(self, node, data: V, axis: int, k: int) -> bool:
        view = data.view
        if view is None:
            return False
        kind, r = view[0], view[1] if len(view) > 1 else None
        if kind == "rec_Y" and r.layout == 0 and axis == 1:
            self.bind(node.output[0], V(self.out_shape(node), "f32", view=("rec_seq_tm_dir", r, k % r.dirs)))
            return True
        if kind == "rec_h" and r.layout == 0 and axis == 0:
            self.bind(node.output[0], V(self.out_shape(node), "f32", view=("rec_final_dir", r, k % r.dirs)))
            return True
        return False

    # --- movement ------------------------------------------------------------------------------
    def op_Transpose(self, node, ins):
        x = ins[0]
        a = self.attrs(node)
        rank = len(x.shape) if x.shape is not None else None
        perm = list(a.get("perm", list(range(rank))[::-1] if rank else []))
        view = x.view
        if view is not None:
            kind = view[0]
            if kind == "rec_seq_tm" and perm == [1, 0, 2]:
                self.bind(node.output[0], self.seq_value(view[1], self.out_shape(node)))
                return
            if kind == "rec_Y" and view[1].layout == 0 and perm == [0, 2, 1, 3]:
                self.bind(node.output[0], V(self.out_shape(node), "f32", view=("rec_Y_tbdh", view[1])))
                return
            if kind == "rec_h" and view[1].layout == 0 and perm == [1, 0, 2]:
                self.bind(node.output[0], V(self.out_shape(node), "f32", view=("rec_h_bdh", view[1])))
                return
            if kind == "transpose" and [view[2][p] for p in perm] == list(range(len(perm))):
                self.alias(node, view[1])
                return
        self.bind(node.output[0], V(self.out_shape(node), x.dtype, view=("transpose", x, perm)))

    def reshape_target(self, node, x: V, target: list) -> list:
        out = []
        for i, d in enumerate(target):
            if d == 0:
                if x.shape is None or x.shape[i] is None:
                    raise self.error(node, f"copies dimension {i} of a tensor whose shape is not known")
                out.append(x.shape[i])
            else:
                out.append(d)
        return out

    def op_Reshape(self, node, ins):
        x = ins[0]
        target = self.reshape_target(node, x, self.dims_value(ins[1], node))
        if x.view is not None:
            kind, r = x.view[0], (x.view[1] if len(x.view) > 1 else None)
            if kind == "rec_Y_tbdh" and len(target) == 3:
                self.bind(node.output[0], V(self.out_shape(node), "f32", view=("rec_seq_tm", r)))
                return
            if kind == "rec_h_bdh" and len(target) == 2:
                self.bind(node.output[0], V(self.out_shape(node), "f32", r.final, uses=2))
                return
            if kind == "rec_Y" and r.layout == 1 and len(target) == 3:
                self.bind(node.output[0], self.seq_value(r, self.out_shape(node)))
                return
            if kind == "gap" and len(target) == 2:
                self.alias(node, x.view[1])
                return
        self.reshape_to(node, x, target)

    def reshape_to(self, node, x: V, target: list) -> None:
        if x.shape is not None and list(x.shape) == list(target) and None not in target:
            self.alias(node, x)
            return
        if x.shape is not None and len(x.shape) >= 3 and len(target) == 2 and target[0] == x.shape[0] and (
                target[1] == -1 or all(isinstance(d, int) for d in x.shape[1:]) and
                target[1] == int(np.prod(x.shape[1:]))):
            self.pipe(node, x, "flatten", "h")
            return
        if sum(1 for d in target if d == -1 or isinstance(d, Sym)) == 1:  # a product such as 2*B: -1
            target = [-1 if isinstance(d, Sym) else d for d in target]
        if None in target or sum(1 for d in target if d == -1 or isinstance(d, Sym)) > 1:
            raise self.error(node, "reshapes to a shape that is not known while importing")
        self.pipe(node, x, f"reshape({dlist(target)})", "h")

    def op_Flatten(self, node, ins):
        x = ins[0]
        a = self.attrs(node)
        axis = a.get("axis", 1)
        if x.view is not None and x.view[0] == "gap" and axis == 1:
            self.alias(node, x.view[1])
            return
        if x.shape is None:
            raise self.error(node, "flattens a tensor of unknown shape")
        axis %= max(len(x.shape), 1)
        if axis == 1 and len(x.shape) >= 3:
            self.pipe(node, x, "flatten", "h")
        elif axis == 1 and len(x.shape) == 2:
            self.alias(node, x)
        else:
            lead = x.shape[:axis]
            first = lead[0] if len(lead) == 1 else (int(np.prod(lead)) if all(isinstance(d, int) for d in lead)
                                                    else None)
            if first is None:
                raise self.error(node, f"flattens at axis {axis} across a symbolic dimension")
            self.pipe(node, x, f"reshape({dlist([first, -1])})", "h")

    def op_Squeeze(self, node, ins):
        if self.shape_op(node, ins):
            return
        x = ins[0]
        axes = self.axes(node, ins, 1)
        if x.view is not None:
            kind, r = x.view[0], (x.view[1] if len(x.view) > 1 else None)
            if kind == "rec_Y" and r.dirs == 1 and r.layout == 0 and axes == [1]:
                self.bind(node.output[0], V(self.out_shape(node), "f32", view=("rec_seq_tm", r)))
                return
            if kind == "rec_Y" and r.dirs == 1 and r.layout == 1 and axes == [2]:
                self.bind(node.output[0], self.seq_value(r, self.out_shape(node)))
                return
            if kind == "rec_h" and r.dirs == 1 and axes == [0 if r.layout == 0 else 1]:
                self.bind(node.output[0], V(self.out_shape(node), "f32", r.final, uses=2))
                return
            if kind == "gap" and sorted(a % 4 for a in axes) == [2, 3]:
                self.alias(node, x.view[1])
                return
        self.reshape_known(node, x)

    def op_Unsqueeze(self, node, ins):
        if self.shape_op(node, ins):
            return
        self.reshape_known(node, ins[0])

    def reshape_known(self, node, x: V) -> None:
        out = self.out_shape(node)
        if out is None:
            raise self.error(node, "has an output shape that shape inference could not find")
        target = [d if d is not None else -1 for d in out]
        self.reshape_to(node, x, target)

    def axes(self, node, ins, i: int) -> list:
        a = self.attrs(node)
        if "axes" in a:
            return [int(v) for v in a["axes"]]
        if len(node.input) > i and node.input[i]:
            return [int(v) for v in np.asarray(self.const_of(node, i, "the axes")).reshape(-1)]
        return []

    def op_Concat(self, node, ins):
        if self.shape_op(node, ins):
            return
        a = self.attrs(node)
        axis = a["axis"]
        views = [v.view for v in ins]
        if len(ins) == 2 and all(v is not None and v[0] == "rec_seq_tm_dir" for v in views) and \
                views[0][1] is views[1][1] and [views[0][2], views[1][2]] == [0, 1] and axis in (2, -1):
            self.bind(node.output[0], V(self.out_shape(node), "f32", view=("rec_seq_tm", views[0][1])))
            return
        if len(ins) == 2 and all(v is not None and v[0] == "rec_final_dir" for v in views) and \
                views[0][1] is views[1][1] and [views[0][2], views[1][2]] == [0, 1] and axis in (1, -1):
            self.bind(node.output[0], V(self.out_shape(node), "f32", views[0][1].final, uses=2))
            return
        parts = ", ".join(self.text(v, node) for v in ins)
        self.assign(node, f"concat([{parts}], axis={axis})")

    # --- elementwise ---------------------------------------------------------------------------
    def binary(self, node, ins, sym: str):
        if self.shape_op(node, ins):
            return
        a, b = self.unexpanded(node, ins)
        self.assign(node, f"{self.operand(a, node)} {sym} {self.operand(b, node)}")

    def unexpanded(self, node, ins) -> list:
        """Expand read by an elementwise operator: .dln broadcasts like numpy, so the
        operand before the Expand does, as long as another operand has the full shape."""
        full = [v for v in ins if v.view is None or v.view[0] != "expand"]
        if len(full) == len(ins):
            return ins
        if not full:
            raise self.error(node, "reads only Expand results; the broadcast shape is lost")
        return [v.view[1] if v.view is not None and v.view[0] == "expand" else v for v in ins]

    def op_Expand(self, node, ins):
        x, shape = ins[0], self.out_shape(node)
        if (shape is None or None in shape) and x.shape is not None and \
                (ins[1].dims is not None or ins[1].const is not None):  # (to a shape computed with the batch)
            target = self.dims_value(ins[1], node)
            if len(target) >= len(x.shape):  # numpy's broadcasting: each 1 takes the other side's size
                aligned = [1] * (len(target) - len(x.shape)) + list(x.shape)
                shape = tuple(t if d == 1 else d for d, t in zip(aligned, target))
        self.bind(node.output[0], V(shape, x.dtype, view=("expand", x)))

    def op_Add(self, node, ins):
        # MatMul by a constant, then + a constant vector: the dense layer's bias
        for x, c in (ins, ins[::-1]):
            st = self.open_stmt(x)
            if st is not None and st.layer is not None and st.layer.fn == "dense" and "bias" in st.layer.kwargs \
                    and st.pipes[-1] is st.layer and c.const is not None and c.const.size == st.layer.params[
                        "w"].shape[1] and c.const.ndim >= 1 and c.const.shape[-1] == c.const.size:
                del st.layer.kwargs["bias"]
                st.layer.params["b"] = c.const.reshape(-1).astype(np.float32)
                v = V(self.out_shape(node), x.dtype, st.target, stmt=st)
                self.bind(node.output[0], v)
                return
        self.binary(node, ins, "+")

    def op_Sub(self, node, ins):
        self.binary(node, ins, "-")

    def op_Mul(self, node, ins):
        self.binary(node, ins, "*")

    def op_Div(self, node, ins):
        if self.shape_op(node, ins):
            return
        if ins[0].dtype == "i32":
            self.warnings.append(f"node `{node.name}`: integer division rounds down in dlc but toward zero "
                                 "in ONNX")
        self.binary(node, ins, "/")

    def op_Pow(self, node, ins):
        self.binary(node, ins, "**")

    def op_Sum(self, node, ins):
        self.assign(node, " + ".join(self.operand(v, node) for v in ins))

    def op_Neg(self, node, ins):
        self.assign(node, f"-{self.operand(ins[0], node)}")

    def unary(self, node, ins, fn: str):
        self.pipe(node, ins[0], fn, "h")

    def op_LeakyRelu(self, node, ins):
        a = self.attrs(node)
        alpha = a.get("alpha", 0.01)
        self.unary(node, ins, "leaky_relu" if abs(alpha - 0.01) < 1e-9 else
                   f"leaky_relu({literal(float(np.float32(alpha)))})")

    def formula(self, node, ins, template: str, **values) -> None:
        """An activation .dln has no function for, written out: `template` with {x} its
        input (written as a name or a literal, so it may appear twice) and `values`."""
        self.assign(node, template.format(x=self.text(ins[0], node), **values))

    def op_PRelu(self, node, ins):  # its slopes become a declared parameter
        slope = ins[1]
        if slope.const is not None and slope.const.size == 1:
            self.unary(node, ins, f"leaky_relu({literal(float(slope.const.reshape(())))})")
            return
        if slope.var is None:  # `prelu_slope` for the node /prelu/PRelu, not the ONNX value's name
            slope.hint = "_".join([p for p in node.name.split("/") if p][:-1] + ["slope"])
        self.formula(node, ins, "relu({x}) + {slope} * minimum({x}, 0.0)", slope=self.operand(slope, node))

    def op_Elu(self, node, ins):
        alpha = float(np.float32(self.attrs(node).get("alpha", 1.0)))
        self.unary(node, ins, "elu" if alpha == 1.0 else f"elu({literal(alpha)})")

    def op_Selu(self, node, ins):
        a = self.attrs(node)
        alpha, gamma = a.get("alpha", SELU_ALPHA), a.get("gamma", SELU_SCALE)
        if np.float32(alpha) == np.float32(SELU_ALPHA) and np.float32(gamma) == np.float32(SELU_SCALE):
            self.unary(node, ins, "selu")
        else:
            self.formula(node, ins, "elu({x}, {alpha}) * {gamma}", alpha=literal(alpha), gamma=literal(gamma))

    def op_Swish(self, node, ins):
        alpha = float(np.float32(self.attrs(node).get("alpha", 1.0)))
        if alpha == 1.0:
            self.unary(node, ins, "silu")
        else:
            self.formula(node, ins, "{x} * sigmoid({x} * {alpha})", alpha=literal(alpha))

    def op_Softsign(self, node, ins):
        self.formula(node, ins, "{x} / (1.0 + abs({x}))")

    def op_HardSigmoid(self, node, ins):
        a = self.attrs(node)
        self.formula(node, ins, "clip({x} * {alpha} + {beta}, 0.0, 1.0)", alpha=literal(a.get("alpha", 0.2)),
                     beta=literal(a.get("beta", 0.5)))

    def op_HardSwish(self, node, ins):
        self.formula(node, ins, "{x} * clip({x} / 6.0 + 0.5, 0.0, 1.0)")

    def op_Mish(self, node, ins):
        self.formula(node, ins, "{x} * tanh(softplus({x}))")

    def softmax(self, node, ins, fn: str):
        a = self.attrs(node)
        x = ins[0]
        rank = len(x.shape) if x.shape is not None else None
        axis = a.get("axis", -1 if self.opset >= 13 else 1)
        if self.opset < 13 and rank is not None and axis % rank != rank - 1:
            raise self.error(node, f"(opset {self.opset}) normalizes over all axes from {axis} on; dlc's "
                                   f"{fn} normalizes over one axis")
        last = axis == -1 or (rank is not None and axis == rank - 1)
        self.unary(node, ins, fn if last else f"{fn}(axis={axis})")

    def op_Softmax(self, node, ins):
        self.softmax(node, ins, "softmax")

    def op_LogSoftmax(self, node, ins):
        self.softmax(node, ins, "log_softmax")

    def op_Gelu(self, node, ins):
        a = self.attrs(node)
        approx = a.get("approximate", "none")
        self.unary(node, ins, "gelu" if approx == "tanh" else 'gelu(approximate="none")')

    def op_Max(self, node, ins):
        self.minmax(node, ins, "maximum")

    def op_Min(self, node, ins):
        self.minmax(node, ins, "minimum")

    def minmax(self, node, ins, fn: str):
        if len(ins) != 2:
            raise self.error(node, f"takes {len(ins)} operands; .dln's {fn} takes two")
        a, b = ins
        if a.const is not None and b.const is None:
            a, b = b, a
        if b.const is not None and b.const.size == 1 and fn == "maximum" and float(b.const.reshape(())) == 0.0:
            self.unary(node, [a], "relu")
            return
        self.assign(node, f"{fn}({self.text(a, node)}, {self.text(b, node)})")

    def op_Clip(self, node, ins):
        x = ins[0]
        lo = self.const_of(node, 1, "the minimum") if len(node.input) > 1 and node.input[1] else None
        hi = self.const_of(node, 2, "the maximum") if len(node.input) > 2 and node.input[2] else None
        a = self.attrs(node)
        lo = lo if lo is not None else a.get("min")
        hi = hi if hi is not None else a.get("max")
        if lo is not None and hi is not None:
            self.unary(node, ins, f"clip({literal(float(np.reshape(lo, ())))}, {literal(float(np.reshape(hi, ())))})")
        elif lo is not None:
            self.unary(node, ins, f"maximum({literal(float(np.reshape(lo, ())))})")
        elif hi is not None:
            self.unary(node, ins, f"minimum({literal(float(np.reshape(hi, ())))})")
        else:
            self.alias(node, x)

    def op_Pad(self, node, ins):
        """Pad: `pad` in the same mode (an infinite value as ±1e30, as `finite` writes constants)."""
        x = ins[0]
        a = self.attrs(node)
        mode = a.get("mode", "constant")
        if mode not in ("constant", "reflect", "edge", "wrap"):
            raise self.error(node, f"pads in `{mode}` mode, which .dln's pad does not have")
        if x.shape is None:
            raise self.error(node, "pads a tensor of unknown rank")
        rank = len(x.shape)
        pads = [int(v) for v in (a["pads"] if "pads" in a else np.asarray(self.const_of(node, 1, "the pads")))]
        value = self.const_of(node, 2, "the value")
        value = 0.0 if value is None else float(np.asarray(value).reshape(-1)[0])
        axes = self.axes(node, ins, 3) or list(range(rank))
        lo, hi = [0] * rank, [0] * rank
        for i, ax in enumerate(axes):
            lo[ax % rank], hi[ax % rank] = pads[i], pads[i + len(axes)]
        if min(lo + hi) < 0:
            raise self.error(node, "crops (negative pads), which .dln writes as a slice, not a pad")
        if rank > 1 and (lo[0] or hi[0]):
            raise self.error(node, "pads the batch axis")
        value = float(finite(value)) if mode == "constant" else 0.0  # (a max pool's -inf, say)
        self.pipe(node, x, f"pad({ilist(lo)}, {ilist(hi)}" + (f", value={literal(value)}" if value else "")
                  + (f', mode="{mode}")' if mode != "constant" else ")"), "h")

    def op_Where(self, node, ins):
        """`where`; by a constant condition (a causal mask of the exported length) arithmetic
        instead: a * c + b * (1 - c), each constant part computed now."""
        cond, a, b = ins
        if cond.const is None:  # `where`, a number for an infinite constant (masked_fill(-inf))
            cond, a, b = (V(v.shape, v.dtype, const=finite(v.const), hint=v.hint, weight=v.weight)
                          if v.const is not None and v.const.dtype.kind == "f" else v
                          for v in self.unexpanded(node, ins))
            full = self.out_shape(node)
            if any(v.shape == full and not v.zeros for v in (cond, a, b)):  # zeros of the result's shape: 0.0
                a, b = (V((), "f32", const=np.float32(0.0)) if v.zeros else v for v in (a, b))
            self.assign(node, f"where({self.text(cond, node)}, {self.text(a, node)}, {self.text(b, node)})")
            return
        c = np.asarray(cond.const).astype(bool)
        fixed, terms = 0.0, []
        for v, take in ((a, c), (b, ~c)):
            if not take.any():
                continue
            if v.const is not None:
                fixed = fixed + np.where(take, v.const, 0.0)
            elif take.all():
                terms.append(self.operand(v, node))
            else:
                mask = V(take.shape, "f32", const=take.astype(np.float32), hint=f"{node.name or 'where'}_keep")
                terms.append(f"{self.operand(v, node)} * {self.text(mask, node)}")
        if np.any(fixed != 0.0):
            fixed = np.asarray(fixed, np.float32)
            terms.append(self.text(V(fixed.shape, "f32", const=fixed, hint=f"{node.name or 'where'}_fill"), node))
        self.assign(node, " + ".join(terms) if terms else "0.0")

    def compare(self, node, ins, sym: str):
        """A comparison: a bool, written where it is read (a Greater cast to float is `step`)."""
        a, b = self.unexpanded(node, ins)
        self.bind(node.output[0], V(self.out_shape(node), "bool", view=("compare", sym, a, b)))

    def op_Not(self, node, ins):
        """The negation of a comparison is the opposite comparison; of another bool, logical_not."""
        x = ins[0]
        if x.view is None or x.view[0] != "compare":
            self.assign(node, f"logical_not({self.text(x, node)})")
            return
        _, sym, a, b = x.view
        opposite = {">": "<=", "<": ">=", ">=": "<", "<=": ">", "==": "!=", "!=": "=="}[sym]
        self.bind(node.output[0], V(self.out_shape(node), "bool", view=("compare", opposite, a, b)))

    def op_And(self, node, ins):
        a, b = self.unexpanded(node, ins)
        self.assign(node, f"logical_and({self.text(a, node)}, {self.text(b, node)})")

    def op_Or(self, node, ins):
        a, b = self.unexpanded(node, ins)
        self.assign(node, f"logical_or({self.text(a, node)}, {self.text(b, node)})")

    def op_Cast(self, node, ins):
        if self.shape_op(node, ins):
            return
        want = self._np_of.get(next(a.i for a in node.attribute if a.name == "to"))
        x = ins[0]
        if x.view is not None and x.view[0] == "compare" and x.view[1] == ">" and x.view[2].dtype in ("f32", "f64") \
                and want == "f32":  # 1 where a > b, else 0
            _, _, a, b = x.view
            if b.const is not None and b.const.size == 1 and float(b.const.reshape(())) == 0.0:
                self.unary(node, [a], "step")
            else:
                self.assign(node, f"step({self.operand(a, node)} - {self.operand(b, node)})")
            return
        if x.dtype == "bool" and want in ("f32", "f64"):
            self.assign(node, f"where({self.text(x, node)}, 1.0, 0.0)")
            return
        if want == ins[0].dtype or (want in ("f32", "f64") and ins[0].dtype in ("f32", "f64")):
            self.alias(node, ins[0])
            return
        raise self.error(node, f"converts {ins[0].dtype} to {want}; .dln has no conversions")

    def reduce(self, node, ins, fn: str, of: str | None = None, wrap: str | None = None):
        a = self.attrs(node)
        axes = self.axes(node, ins, 1)
        keep = a.get("keepdims", 1)
        x = ins[0]
        if not axes and a.get("noop_with_empty_axes", 0):
            self.alias(node, x)
            return
        rank = len(x.shape) if x.shape is not None else None
        if fn == "mean" and of is None and rank == 4 and sorted(ax % 4 for ax in axes) == [2, 3]:
            if keep:
                inner = V(tuple(x.shape[:2]), x.dtype)
                self.pipe_into(node, x, "global_avgpool", inner)
                self.bind(node.output[0], V(self.out_shape(node), x.dtype, view=("gap", inner)))
            else:
                self.unary(node, ins, "global_avgpool")
            return
        args = []
        if axes:
            args.append(f"axis={axes[0] if len(axes) == 1 else ilist(axes)}")
        if keep:
            args.append("keepdims=true")
        if of is not None:  # of a function of x, and maybe in one: sqrt(sum(x * x, ...))
            reduced = f"{fn}({', '.join([of] + args)})"
            self.formula(node, ins, f"{wrap}({reduced})" if wrap else reduced)
            return
        self.unary(node, ins, f"{fn}({', '.join(args)})" if args else fn)

    def op_ReduceSum(self, node, ins):
        self.reduce(node, ins, "sum")

    def op_ReduceMin(self, node, ins):
        self.reduce(node, ins, "min")

    def op_ReduceSumSquare(self, node, ins):
        self.reduce(node, ins, "sum", of="{x} * {x}")

    def op_ReduceL1(self, node, ins):
        self.reduce(node, ins, "sum", of="abs({x})")

    def op_ReduceL2(self, node, ins):  # (torch.norm)
        self.reduce(node, ins, "sum", of="{x} * {x}", wrap="sqrt")

    def op_Reciprocal(self, node, ins):
        self.formula(node, ins, "1.0 / {x}")

    def op_GlobalMaxPool(self, node, ins):  # (AdaptiveMaxPool2d(1))
        x = ins[0]
        if x.shape is None or len(x.shape) < 3:
            raise self.error(node, "pools a tensor that is neither NCHW nor [N, C, T]")
        self.unary(node, ins, f"max(axis={ilist(list(range(2, len(x.shape))))}, keepdims=true)")

    def op_ReduceMean(self, node, ins):
        self.reduce(node, ins, "mean")

    def op_ReduceMax(self, node, ins):
        self.reduce(node, ins, "max")

    def op_Constant(self, node, ins):
        from onnx import numpy_helper
        a = node.attribute[0]
        if a.name == "value":
            arr = numpy_helper.to_array(a.t)
        elif a.name in ("value_float", "value_int"):
            arr = np.asarray(a.f if a.name == "value_float" else a.i)
        elif a.name in ("value_floats", "value_ints"):
            arr = np.asarray(list(a.floats) if a.name == "value_floats" else list(a.ints))
        else:
            raise self.error(node, f"holds a `{a.name}` constant")
        v = V(arr.shape, "f32", const=arr)
        v.hint = node.output[0]
        self.bind(node.output[0], v)


# operators that are one .dln function of their input (Sign is trained straight-through in
# dlc; Erf is how exporters before opset 20 write exact GELU), and the comparisons
_UNARY = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Exp": "exp", "Log": "log", "Sqrt": "sqrt",
          "Abs": "abs", "Sign": "sign", "Softplus": "softplus", "Erf": "erf"}
_COMPARISONS = {"Greater": ">", "Less": "<", "GreaterOrEqual": ">=", "LessOrEqual": "<=", "Equal": "=="}

_NO_FOLD = {"LSTM", "GRU", "RNN", "Constant"}
_DIM_ARITHMETIC = {"Add": lambda x, y: x + y, "Sub": lambda x, y: x - y, "Mul": lambda x, y: x * y,
                   "Div": lambda x, y: abs(x) // abs(y) * (1 if (x < 0) == (y < 0) else -1),
                   "Mod": lambda x, y: x % y}
_MOVES = {"Slice", "Gather", "Squeeze", "Unsqueeze", "Reshape", "Transpose", "Identity", "Expand", "Flatten"}


def literal(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    f = float(v)
    if f.is_integer() and abs(f) < 1e15:
        return f"{f:.1f}"
    text = str(np.float32(f)) if float(np.float32(f)) == f else repr(f)  # 0.1f -> 0.1, not 0.100000001...
    return text if any(c in text for c in ".e") or "inf" in text or "nan" in text else text + ".0"


def ilist(xs) -> str:
    return "[" + ", ".join(str(int(x)) for x in xs) + "]"


def finite(a):
    """Infinities as ±1e30 (a checkpoint holds finite numbers; exp still takes -1e30 to 0,
    and no max takes it)."""
    return np.clip(a, -1e30, 1e30)


def as_sym(d):
    """The importer's dimension (a number, a symbol's name, or a product as a Sym) as
    dlc's shape arithmetic takes it."""
    return Sym(1, (d,)) if isinstance(d, str) else d


def as_dim(d):
    """Back from dlc's shape arithmetic: a lone symbol becomes its name again."""
    return d.names[0] if isinstance(d, Sym) and d.coeff == 1 and len(d.names) == 1 else d


def dlist(xs) -> str:
    return "[" + ", ".join(str(x) for x in xs) + "]"


def window_text(v) -> str:
    """A window's sizes as conv2d/conv1d and the pools take them: one number when they are
    equal (or there is one), else [h, w]."""
    v = [int(x) for x in v]
    return str(v[0]) if len(set(v)) == 1 else f"[{v[0]}, {v[1]}]"


def _loss_for(importer: Importer, last_op: str | None) -> tuple[str, str]:
    dims = importer.output_dims
    if last_op == "Sigmoid":
        return "bce(output, label)", "the output is a probability (it ends with Sigmoid)"
    if len(dims) == 2 and last_op not in ("Softmax", "LogSoftmax"):
        return "cross_entropy(output, label)", "for class labels; mse for regression"
    return "mse(output, label)", "labels shaped like the output"


@dataclass
class Imported:
    text: str
    model_name: str
    params: dict
    normalizer: tuple | None
    warnings: list
    layers: list


def import_model(path, model_name: str | None = None, train: bool = True) -> Imported:
    """Read an ONNX file and translate it (see the module docstring)."""
    onnx = require_onnx()
    path = Path(path)
    try:
        proto = onnx.load(str(path))
    except FileNotFoundError:
        raise ImportError_(f"no such file: {path}") from None
    except Exception as e:  # noqa: BLE001 - protobuf's errors
        raise ImportError_(f"{path} is not an ONNX model: {e}") from None
    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # noqa: BLE001
        raise ImportError_(f"{path} is not a valid ONNX model: {str(e).splitlines()[0]}") from None
    imp = Importer(proto, str(path))
    imp.run()
    generic = {"main_graph", "torch_jit", "torch-jit-export", "graph", ""}
    name = imp.name(model_name or (proto.graph.name if proto.graph.name not in generic else path.stem), "net")
    last = None
    out_name = proto.graph.output[0].name
    for n in proto.graph.node:
        if out_name in n.output:
            last = n.op_type
    lines = [f"# Imported from {path.name} by `dlc import` (ONNX opset {imp.opset}"
             + (f", made by {proto.producer_name} {proto.producer_version}".rstrip() if proto.producer_name else "")
             + ").",
             "# Weights: the checkpoint written beside this file (dlc predict/eval --weights, dlc run --resume).",
             f"model {name}({', '.join(imp.inputs)}) -> {imp.result_type} {{"]
    lines += imp.param_decls
    lines += [s.render() for s in imp.stmts]
    lines.append(f"    return {imp.result}")
    lines.append("}")
    trainable = any(st.layer is not None and st.layer.params for st in imp.stmts)
    if train and not trainable:
        lines += ["", "# No train block: every weight of this model is a constant (frozen here)."]
    if train and trainable:
        loss, why = _loss_for(imp, last)
        lines += ["",
                  "# A train block to fill in for fine-tuning: point `data` at your samples (npz",
                  f"# with arrays x and y, csv, ...) and check the loss ({why}),",
                  "# then: dlc run THIS.dln --resume THIS.npz --save tuned.npz",
                  f"train {name} {{",
                  '    data      = npz("data.npz")',
                  f"    loss      = {loss}",
                  "    optimizer = adam(lr=1e-4)",
                  "    batch     = 32",
                  "    epochs    = 5",
                  "}"]
    params = {}
    for st in imp.stmts:
        if st.layer is not None:
            for k, v in st.layer.params.items():
                params[f"{st.target}.{k}"] = v
    for k, v in imp.params.items():
        params[k] = v
    return Imported("\n".join(lines) + "\n", name, params, imp.normalizer, imp.warnings, imp.layers_used)


def write(imported: Imported, dln_path, weights_path) -> "object":
    """Write the .dln and its checkpoint; returns the loaded dlc Model (checked)."""
    from dlc.api import load
    from dlc.runtime.trainer import Normalizer
    dln_path, weights_path = Path(dln_path), Path(weights_path)
    try:
        model = load(imported.text)
    except Exception as e:
        raise ImportError_(f"the .dln written for this model does not check: {e}",
                           hint="this is a bug in dlc's importer; please report it with the ONNX file") from None
    state = model.state
    for k, v in imported.params.items():
        if k not in state:
            raise ImportError_(f"internal: the model has no parameter `{k}`")
        if state[k].shape != v.shape:
            raise ImportError_(f"internal: `{k}` is {list(v.shape)} in the ONNX model but "
                               f"{list(state[k].shape)} in the .dln")
        state[k][...] = v
    if imported.normalizer is not None:
        model.normalizer = Normalizer(*imported.normalizer)
    dln_path.write_text(imported.text)
    model.save(weights_path)
    return model
