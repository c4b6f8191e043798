"""A model's evaluation graph as an ONNX model (`dlc export`).

The graph that `dlc predict` runs (dropout off, batchnorm on running statistics) is
translated primitive by primitive, reading parameters and state from a checkpoint; they
become initializers under their dlc names (`h.w`, `c1.b`). Symbolic dimensions stay
symbolic (`B` is a `dim_param`), and shapes that depend on them are computed from the
inputs' shapes at run time.

Patterns that ONNX has one operator for are exported as that operator, so that other
tools (and `dlc import`) see layers rather than arithmetic:

  matmul + bias             Gemm
  max(x, 0)                 Relu          leaky_relu's select    LeakyRelu
  elu, selu, softplus       Elu, Selu, Softplus    layernorm     LayerNormalization
  (silu stays Sigmoid and Mul: onnxruntime 1.32 runs no Swish, ONNX's operator from opset 24)
  pools over [N, C, T]      MaxPool, AveragePool over one axis
  conv2d, conv1d (+ bias)   one Conv with group and dilations, however dlc composed the
                            layer (a composite the builder recorded: graph.meta["composites"])
  dlc's softmax/log_softmax Softmax/LogSoftmax (axis)
  sum / size                ReduceMean    flatten's reshape      Flatten
  recurrent loops           LSTM, GRU (linear_before_reset=1), RNN; a forward and a
                            reverse loop over one sequence become one bidirectional op

A loop that is not one of dlc's recurrent cells becomes an ONNX `Scan` whose body is
exported the same way. Gate orders differ: dlc's lstm packs (i, f, g, o) and ONNX's
LSTM (i, o, f, c); dlc's gru packs PyTorch's (r, z, n) and ONNX's GRU (z, r, h). A cell is
recognized only when its loop body computes that cell (checked numerically on random
values), and its input projection is a matmul by a parameter plus a bias.

Explicit broadcasts are left to ONNX's numpy-style broadcasting where an elementwise
operator reads them, and expanded (`Expand`) only where something else does.

The input normalization fitted in training (the checkpoint's `data:shift`/`data:scale`)
is part of the exported model, so it takes the same raw inputs as `dlc predict`; its
initializers are named `normalize.shift` and `normalize.scale`.

A model that carries a `state` from batch to batch (`state h: f32[B, 96]`) takes it as one
more input, `carry:h`: its value at the start of the batch (the declared initial value for
the first batch, as `dlc predict` starts). The exported output is the model's `output`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dlc import __version__
from dlc.core import ops
from dlc.core.graph import Graph
from dlc.core.types import DType, Sym, TensorType, numel
from dlc.interchange import InterchangeError, require_onnx
from dlc.language.nn import SELU_ALPHA, SELU_SCALE

OPSET_MIN = 18  # Reduce* take their axes as an input from 18 on

_ELEMENTWISE = {
    ops.NEG: "Neg", ops.EXP: "Exp", ops.LOG: "Log", ops.SQRT: "Sqrt", ops.TANH: "Tanh",
    ops.SIGMOID: "Sigmoid", ops.ABS: "Abs", ops.SIGN: "Sign",
    ops.ADD: "Add", ops.SUB: "Sub", ops.MUL: "Mul", ops.POW: "Pow", ops.MAX: "Max", ops.MIN: "Min",
    ops.LT: "Less", ops.LE: "LessOrEqual", ops.GT: "Greater", ops.GE: "GreaterOrEqual",
    ops.EQ: "Equal", ops.AND: "And", ops.WHERE: "Where",
}

# gate blocks of dlc's packing, in ONNX's order
LSTM_GATES = (0, 3, 1, 2)  # dlc (i, f, g, o) -> ONNX (i, o, f, c)
GRU_GATES = (1, 0, 2)      # dlc (r, z, n)    -> ONNX (z, r, h)


class ExportError(InterchangeError):
    kind = "export error"


def onnx_dtype(dtype: DType) -> int:
    from onnx import TensorProto
    return {DType.f32: TensorProto.FLOAT, DType.f64: TensorProto.DOUBLE,
            DType.i32: TensorProto.INT32, DType.bool: TensorProto.BOOL}[dtype]


def dim_text(d) -> str:
    return str(d)


def value_info(name: str, t: TensorType):
    from onnx import helper
    dims = [d if isinstance(d, int) else dim_text(d) for d in t.shape]
    return helper.make_tensor_value_info(name, onnx_dtype(t.dtype), dims)


@dataclass
class Recurrent:
    """A loop recognized as one of dlc's recurrent cells."""

    kind: str           # lstm | gru | rnn
    scan: int           # the scan node
    x: int              # the time-major input sequence [T, B, F]
    w: int              # the input projection's parameter [F, gates*H]
    b: int              # the input projection's bias [gates*H]
    u: int              # the recurrent matrix [H, gates*H]
    bh: int | None      # gru: the hidden-side bias
    hidden: int
    reverse: bool
    carries: tuple[int, ...]  # initial carries that are not zeros (none: all zero)
    activation: str = "tanh"  # rnn: tanh or relu
    partner: "Recurrent | None" = None  # the other direction of a bidirectional pair
    outputs: dict = field(default_factory=dict)  # scan_result index -> ONNX value


class Names:
    """Unique ONNX value and node names across a model and its loop bodies."""

    def __init__(self):
        self.used: set[str] = set()
        self.counts: dict[str, int] = {}

    def reserve(self, name: str) -> str:
        if name in self.used:
            raise AssertionError(f"the ONNX name {name} is taken")
        self.used.add(name)
        return name

    def fresh(self, hint: str) -> str:
        if hint not in self.used:
            return self.reserve(hint)
        k = self.counts.get(hint, 1)
        while f"{hint}_{k}" in self.used:
            k += 1
        self.counts[hint] = k + 1
        return self.reserve(f"{hint}_{k}")


class _GraphExporter:
    """One dlc graph (a model's, or a loop body) as ONNX nodes."""

    def __init__(self, g: Graph, state: dict, names: Names, recognize: bool, opset: int,
                 outer_values: dict[int, str] | None = None):
        self.g = g
        self.state = state
        self.names = names
        self.recognize = recognize
        self.opset = opset
        self.nodes: list = []
        self.initializers: list = []
        self.value: dict[int, str] = dict(outer_values or {})  # node -> ONNX value
        self.lazy: set[int] = set()   # nodes whose ONNX value only broadcasts to their type
        self.expanded: dict[int, str] = {}
        self.dims: dict[str, tuple[str, int]] = {}  # symbol -> (ONNX value, axis) it is read from
        self.plan: dict[int, tuple] = {}
        self.recurrent: dict[int, Recurrent] = {}
        self._consts: dict = {}
        self._shapes: dict = {}

    # --- small helpers --------------------------------------------------------------------------
    def node(self, nid: int):
        return self.g.node(nid)

    def is_op(self, nid: int, op) -> bool:
        return self.g.node(nid).op is op

    def emit(self, op_type: str, inputs, outputs=None, hint: str | None = None, span=None, **attrs):
        from onnx import helper
        if outputs is None:
            outputs = [self.names.fresh(hint or op_type.lower())]
        elif isinstance(outputs, int):
            outputs = [self.names.fresh(f"{hint or op_type.lower()}_{i}") for i in range(outputs)]
        n = helper.make_node(op_type, list(inputs), list(outputs), name=self.names.fresh(f"{op_type}"),
                             **attrs)
        if span is not None:
            n.doc_string = span.short
        self.nodes.append(n)
        return outputs[0] if len(outputs) == 1 else outputs

    def initializer(self, array: np.ndarray, hint: str, exact_name: bool = False) -> str:
        """exact_name: `hint` was reserved for this initializer beforehand."""
        from onnx import numpy_helper
        name = hint if exact_name else self.names.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))  # keeps rank 0
        return name

    def const(self, value, np_dtype) -> str:
        a = np.asarray(value, dtype=np_dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer(a, "const")
        return self._consts[key]

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64).reshape(-1), np.int64)

    # --- shapes at run time ---------------------------------------------------------------------
    def add_dim_sources(self, name: str, t: TensorType) -> None:
        for axis, d in enumerate(t.shape):
            if isinstance(d, Sym) and d.coeff == 1 and len(d.names) == 1 and d.names[0] not in self.dims:
                self.dims[d.names[0]] = (name, axis)

    def dim_tensor(self, d, span=None) -> str:
        """A 1-D int64 tensor [d]."""
        if isinstance(d, int):
            return self.ints([d])
        key = ("dim", d)
        if key not in self._shapes:
            parts = []
            for sym_name in d.names:
                if sym_name not in self.dims:
                    raise ExportError(f"the dimension {d} cannot be computed from the model's inputs", span)
                src, axis = self.dims[sym_name]
                parts.append(self.emit("Shape", [src], hint=f"dim_{sym_name}", start=axis, end=axis + 1))
            out = parts[0]
            for p in parts[1:]:
                out = self.emit("Mul", [out, p], hint=f"dim_{d}")
            if d.coeff != 1:
                out = self.emit("Mul", [out, self.ints([d.coeff])], hint=f"dim_{d}".replace("*", "x"))
            self._shapes[key] = out
        return self._shapes[key]

    def shape_tensor(self, shape, span=None) -> str:
        shape = tuple(shape)
        if all(isinstance(d, int) for d in shape):
            return self.ints(shape)
        if shape not in self._shapes:
            self._shapes[shape] = self.emit("Concat", [self.dim_tensor(d, span) for d in shape],
                                            hint="shape", axis=0)
        return self._shapes[shape]

    def reshape_target(self, shape, span=None) -> str:
        symbolic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
        if len(symbolic) <= 1:
            return self.ints([-1 if i in symbolic else d for i, d in enumerate(shape)])
        return self.shape_tensor(shape, span)

    # --- values ---------------------------------------------------------------------------------
    def operand(self, nid: int, lazy_ok: bool = False) -> str:
        if nid not in self.lazy or lazy_ok:
            return self.value[nid]
        if nid not in self.expanded:
            n = self.node(nid)
            self.expanded[nid] = self.emit("Expand", [self.value[nid], self.shape_tensor(n.type.shape, n.span)],
                                           hint="expand", span=n.span)
        return self.expanded[nid]

    # --- recognizing patterns -------------------------------------------------------------------
    def zero_like(self, nid: int, value: float = 0.0) -> bool:
        """A constant `value` (possibly broadcast)."""
        n = self.node(nid)
        if n.op is ops.BROADCAST:
            n = self.node(n.operands[0])
        if n.op is not ops.CONST:
            return False
        v = np.asarray(n.attrs["value"])
        return v.size == 1 and float(v.reshape(())) == value

    def scalar_const(self, nid: int):
        n = self.node(nid)
        if n.op is ops.BROADCAST:
            n = self.node(n.operands[0])
        if n.op is ops.CONST and np.asarray(n.attrs["value"]).size == 1:
            return float(np.asarray(n.attrs["value"]).reshape(()))
        return None

    def single_use(self, nid: int) -> bool:
        return len(self.g.users(nid)) == 1 and nid not in self.g.outputs.values()

    def bias_vector(self, nid: int, axis: int, rank: int):
        """broadcast(v [n], axes=(axis,)) -> v."""
        n = self.node(nid)
        if n.op is ops.BROADCAST and tuple(n.attrs["axes"]) == (axis,) and self.node(n.operands[0]).type.rank == 1 \
                and len(n.attrs["shape"]) == rank:
            return n.operands[0]
        return None

    def keepdims_reduce(self, nid: int, op, rank: int):
        """broadcast(reshape(reduce(x, (axis,))) to keepdims, axes=all) -> (reduce node, x, axis)."""
        n = self.node(nid)
        if n.op is not ops.BROADCAST or tuple(n.attrs["axes"]) != tuple(range(rank)):
            return None
        inner = n.operands[0]
        if self.is_op(inner, ops.STOP_GRADIENT):
            inner = self.node(inner).operands[0]
        if not self.is_op(inner, ops.RESHAPE):
            return None
        red = self.node(inner).operands[0]
        if not self.is_op(red, op) or len(self.node(red).attrs["axes"]) != 1:
            return None
        return red, self.node(red).operands[0], self.node(red).attrs["axes"][0]

    def shifted(self, nid: int):
        """x - stop_gradient(max(x, axis, keepdims)) -> (x, axis): dlc's stable softmax shift."""
        n = self.node(nid)
        if n.op is not ops.SUB:
            return None
        x, m = n.operands
        hit = self.keepdims_reduce(m, ops.REDUCE_MAX, n.type.rank)
        if hit is None or hit[1] != x or not self.is_op(self.node(m).operands[0], ops.STOP_GRADIENT):
            return None
        return x, hit[2]

    def composite(self, nid: int) -> tuple | None:
        """(kind, operands, attrs) where a layer composed of primitives ends at nid."""
        return self.g.meta.get("composites", {}).get(nid)

    def is_conv_layer(self, nid: int) -> bool:
        """nid ends a conv2d or conv1d layer, whatever primitives it was composed of."""
        return (self.composite(nid) or ("",))[0] in ("conv2d", "conv1d")

    def is_conv(self, nid: int) -> bool:
        return self.node(nid).op in (ops.CONV2D, ops.CONV2D_BWD_DATA) or self.is_conv_layer(nid)

    def match(self, nid: int) -> tuple | None:
        n = self.node(nid)
        op = n.op
        if self.is_conv_layer(nid):
            return ("conv", nid, None)
        if op is ops.ADD:
            for a, c in (n.operands, n.operands[::-1]):
                if self.is_op(a, ops.MATMUL) and self.single_use(a):
                    bias = self.bias_vector(c, 1, 2)
                    if bias is not None:
                        return ("gemm", a, bias)
                if self.is_conv(a) and self.single_use(a):
                    bias = self.bias_vector(c, 1, self.node(a).type.rank)
                    if bias is not None:
                        return ("conv", a, bias)
            bn = self.batchnorm(nid)
            if bn is not None:
                return bn
            hit = self.elu(nid) or self.softplus(nid) or self.layernorm(nid)
            if hit is not None:
                return hit
        if op is ops.MUL and n.type.dtype.is_float:
            for e, c in (n.operands, n.operands[::-1]):
                p = self.plan.get(e)
                if p is not None and p[0] == "elu" and np.float32(p[2]) == np.float32(SELU_ALPHA) and \
                        self.scalar_const(c) is not None and np.float32(self.scalar_const(c)) == np.float32(SELU_SCALE):
                    return ("selu", p[1])
        if op is ops.MAX and n.type.dtype.is_float:
            for a, c in (n.operands, n.operands[::-1]):
                if self.zero_like(c):
                    return ("relu", a)
        if op is ops.WHERE and n.type.dtype.is_float:
            c, x, y = n.operands
            cn, yn = self.node(c), self.node(y)
            if cn.op is ops.GT and cn.operands[0] == x and self.zero_like(cn.operands[1]) and \
                    yn.op is ops.MUL and yn.operands[0] == x and self.scalar_const(yn.operands[1]) is not None:
                return ("leaky", x, self.scalar_const(yn.operands[1]))
        if op is ops.DIV and n.type.dtype.is_float:
            e, s = n.operands
            hit = self.keepdims_reduce(s, ops.REDUCE_SUM, n.type.rank)
            if hit is not None and hit[1] == e and self.is_op(e, ops.EXP):
                sh = self.shifted(self.node(e).operands[0])
                if sh is not None and sh[1] == hit[2]:
                    return ("softmax", sh[0], sh[1])
            mean = self.mean(nid)
            if mean is not None:
                return mean
        if op is ops.SUB and n.type.dtype.is_float:
            s, lse = n.operands
            sh = self.shifted(s)
            ln = self.node(lse)
            if sh is not None and ln.op is ops.BROADCAST and tuple(ln.attrs["axes"]) == tuple(range(n.type.rank)) \
                    and self.is_op(ln.operands[0], ops.LOG):
                r = self.node(ln.operands[0]).operands[0]
                if self.is_op(r, ops.RESHAPE) and self.is_op(self.node(r).operands[0], ops.REDUCE_SUM):
                    red = self.node(self.node(r).operands[0])
                    ex = red.operands[0]
                    if tuple(red.attrs["axes"]) == (sh[1],) and self.is_op(ex, ops.EXP) and \
                            self.node(ex).operands[0] == s:
                        return ("log_softmax", sh[0], sh[1])
        if op is ops.RESHAPE and n.type.rank == 3:
            t = self.over_time(nid)
            if t is not None:
                return t
        if op is ops.RESHAPE and self.is_op(n.operands[0], ops.SLICE):
            picked = self.picked_index(nid)
            if picked is not None:
                return ("index",) + picked
        if op is ops.RESHAPE:
            x = self.node(n.operands[0]).type
            if x.rank >= 3 and n.type.rank == 2 and n.type.shape[0] == x.shape[0] and \
                    n.type.shape[1] == numel(x.shape[1:]):
                return ("flatten", n.operands[0])
        if op is ops.SCAN and self.recognize:
            rec = self.recognize_cell(nid)
            if rec is not None:
                self.recurrent[nid] = rec
                return ("recurrent", rec)
        return None

    def over_time(self, nid: int):
        """reshape(pool2d over reshape(x [N, C, T] -> [N, C, 1, T])) back to rank 3, with windows
        one row high: a pool over time -> ("pool1d", x, pool)."""
        y = self.node(nid).operands[0]
        yn = self.node(y)
        if yn.op is not ops.POOL2D or yn.type.shape[2] != 1:
            return None
        a = yn.attrs
        if (a["kernel"][0], a["stride"][0], a["pad"][0]) != (1, 1, 0):
            return None
        x4 = yn.operands[0]
        if not self.is_op(x4, ops.RESHAPE) or self.node(self.node(x4).operands[0]).type.rank != 3:
            return None
        return ("pool1d", self.node(x4).operands[0], y)

    def picked_index(self, nid: int):
        """reshape(slice(x, one index of one axis)) without that axis: x[..., i] -> (x, axis, i)."""
        n = self.node(nid)
        sl = self.node(n.operands[0])
        xt = self.node(sl.operands[0]).type
        a = sl.attrs
        cut = [i for i, (d, s, e, st) in enumerate(zip(xt.shape, a["starts"], a["stops"], a["steps"]))
               if (s, e, st) != (0, d, 1)]
        if len(cut) != 1:
            return None
        axis = cut[0]
        s, e = a["starts"][axis], a["stops"][axis]
        if e != s + 1 or tuple(n.type.shape) != tuple(d for i, d in enumerate(xt.shape) if i != axis):
            return None
        return sl.operands[0], axis, s

    def relu_of(self, nid: int):
        """max(x, 0) -> x."""
        n = self.node(nid)
        if n.op is ops.MAX:
            for x, z in (n.operands, n.operands[::-1]):
                if self.zero_like(z):
                    return x
        return None

    def elu(self, nid: int):
        """max(x, 0) + (exp(min(x, 0)) - 1) * alpha: dlc's elu."""
        for r, q in (self.node(nid).operands, self.node(nid).operands[::-1]):
            x = self.relu_of(r)
            if x is None or not self.is_op(q, ops.MUL):
                continue
            e1, a = self.node(q).operands
            alpha = self.scalar_const(a)
            if alpha is None or not self.is_op(e1, ops.SUB):
                continue
            e, one = self.node(e1).operands
            if not self.is_op(e, ops.EXP) or self.scalar_const(one) != 1.0:
                continue
            mn = self.node(self.node(e).operands[0])
            if mn.op is ops.MIN and mn.operands[0] == x and self.zero_like(mn.operands[1]):
                return ("elu", x, alpha)
        return None

    def softplus(self, nid: int):
        """max(x, 0) + log(exp(-abs(x)) + 1): dlc's softplus."""
        for r, q in (self.node(nid).operands, self.node(nid).operands[::-1]):
            x = self.relu_of(r)
            if x is None or not self.is_op(q, ops.LOG) or not self.is_op(self.node(q).operands[0], ops.ADD):
                continue
            e, one = self.node(self.node(q).operands[0]).operands
            if not self.is_op(e, ops.EXP) or self.scalar_const(one) != 1.0:
                continue
            neg = self.node(self.node(e).operands[0])
            if neg.op is ops.NEG and self.is_op(neg.operands[0], ops.ABS) and \
                    self.node(neg.operands[0]).operands[0] == x:
                return ("softplus", x)
        return None

    def layernorm(self, nid: int):
        """c / bc(sqrt(mean(c * c) + eps)) * bc(gamma) + bc(beta), c = x - bc(mean(x)), the
        means over the last axis with keepdims: dlc's layernorm."""
        n = self.node(nid)
        rank = n.type.rank
        last = rank - 1
        for p, q in (n.operands, n.operands[::-1]):
            beta = self.bias_vector(q, last, rank)
            if beta is None or not self.is_op(p, ops.MUL):
                continue
            normed, g = self.node(p).operands
            gamma = self.bias_vector(g, last, rank)
            if gamma is None or not self.is_op(normed, ops.DIV):
                continue
            c, root = self.node(normed).operands
            root = self.unbroadcast(root, rank)
            if root is None or not self.is_op(root, ops.SQRT) or not self.is_op(self.node(root).operands[0], ops.ADD):
                continue
            var, e = self.node(self.node(root).operands[0]).operands
            eps = self.scalar_const(e)
            if eps is None or not self.is_op(c, ops.SUB):
                continue
            x, m = self.node(c).operands
            sq = self.last_axis_mean(var, last)
            m = self.unbroadcast(m, rank)
            if m is None or self.last_axis_mean(m, last) != x or sq is None or not self.is_op(sq, ops.MUL) \
                    or tuple(self.node(sq).operands) != (c, c):
                continue
            return ("layernorm", x, gamma, beta, eps)
        return None

    def unbroadcast(self, nid: int, rank: int):
        """broadcast(v, axes=all) of a same-rank v -> v."""
        n = self.node(nid)
        if n.op is ops.BROADCAST and tuple(n.attrs["axes"]) == tuple(range(rank)):
            return n.operands[0]
        return None

    def last_axis_mean(self, nid: int, axis: int):
        """mean(x, axis, keepdims=true) -> x."""
        hit = self.mean(nid) if self.is_op(nid, ops.DIV) else None
        return hit[1] if hit is not None and hit[2] == (axis,) and hit[3] else None

    def batchnorm(self, nid: int):
        """(x - bc(mean)) * bc(gamma / sqrt(var + eps)) + bc(beta): batchnorm in evaluation."""
        n = self.node(nid)
        rank = n.type.rank
        if rank not in (2, 4) or not n.type.dtype.is_float:
            return None
        for p, q in (n.operands, n.operands[::-1]):
            beta = self.bias_vector(q, 1, rank)
            if beta is None or not self.is_op(p, ops.MUL):
                continue
            centered, sc = self.node(p).operands
            scale = self.bias_vector(sc, 1, rank)
            if scale is None or not self.is_op(centered, ops.SUB) or not self.is_op(scale, ops.DIV):
                continue
            x, mb = self.node(centered).operands
            mean = self.bias_vector(mb, 1, rank)
            gamma, root = self.node(scale).operands
            if mean is None or not self.is_op(root, ops.SQRT) or not self.is_op(self.node(root).operands[0], ops.ADD):
                continue
            var, e = self.node(self.node(root).operands[0]).operands
            eps = self.scalar_const(e)
            if eps is not None and all(self.node(v).type.rank == 1 for v in (gamma, var)):
                return ("batchnorm", x, gamma, beta, mean, var, eps)
        return None

    def mean(self, nid: int):
        """sum(x, axes) / size(x, axes) (keepdims or not) -> ReduceMean."""
        n = self.node(nid)
        total, count = n.operands
        cn = self.node(count)
        if cn.op is ops.BROADCAST and tuple(cn.attrs["axes"]) == ():
            count = cn.operands[0]
        if not self.is_op(count, ops.SIZE):
            return None
        keep = False
        if self.is_op(total, ops.RESHAPE):
            total, keep = self.node(total).operands[0], True
        if not self.is_op(total, ops.REDUCE_SUM):
            return None
        red, size = self.node(total), self.node(count)
        if red.operands[0] != size.operands[0] or tuple(red.attrs["axes"]) != tuple(size.attrs["axes"]):
            return None
        return ("mean", red.operands[0], tuple(red.attrs["axes"]), keep)

    # --- recurrent cells ------------------------------------------------------------------------
    def recognize_cell(self, nid: int) -> Recurrent | None:
        from dlc.core.ops.scan import signature
        n = self.node(nid)
        a = n.attrs
        body = a["body"]
        k, s = a["carries"], a["seqs"]
        inv = n.operands[k + s:]
        kind = {(2, 1, 1): "lstm", (1, 1, 2): "gru", (1, 1, 1): "rnn"}.get((k, s, len(inv)))
        if kind is None:
            return None
        sig = signature(body, k, s, len(inv))
        if len(sig.outputs) != 1 or sig.outputs[0] != sig.new_carries[0]:
            return None
        u = inv[0]
        ut = self.node(u).type
        if ut.rank != 2 or not isinstance(ut.shape[0], int):
            return None
        hidden = ut.shape[0]
        gates = {"lstm": 4, "gru": 3, "rnn": 1}[kind]
        if ut.shape[1] != gates * hidden or not self.is_param(u):
            return None
        bh = None
        if kind == "gru":
            bh = inv[1]
            if not self.is_param(bh) or self.node(bh).type.shape != (gates * hidden,):
                return None
        proj = self.projection(n.operands[k], gates * hidden)
        if proj is None:
            return None
        x, w, b = proj
        activation = self.cell_computes(kind, body, hidden, sig, n)
        if activation is None:
            return None
        carries = tuple(c for c in n.operands[:k] if not self.zero_like(c))
        if carries and len(carries) != k:
            carries = tuple(n.operands[:k])
        return Recurrent(kind, nid, x, w, b, u, bh, hidden, bool(a.get("reverse")), carries, activation)

    def is_param(self, nid: int) -> bool:
        n = self.node(nid)
        return n.op is ops.INPUT and n.attrs["role"] in ("param", "state") and n.attrs["name"] in self.state

    def projection(self, xw: int, width: int):
        """xw = reshape(reshape(x [T,B,F]) @ w) + broadcast(b): dlc's dense over a sequence."""
        n = self.node(xw)
        if n.op is not ops.ADD or n.type.rank != 3 or n.type.shape[2] != width:
            return None
        for p, q in (n.operands, n.operands[::-1]):
            b = self.bias_vector(q, 2, 3)
            if b is None or not self.is_param(b) or not self.is_op(p, ops.RESHAPE):
                continue
            mm = self.node(p).operands[0]
            mn = self.node(mm)
            if mn.op is not ops.MATMUL or mn.attrs.get("ta") or mn.attrs.get("tb") or not self.is_param(mn.operands[1]):
                continue
            flat = mn.operands[0]
            if not self.is_op(flat, ops.RESHAPE):
                continue
            x = self.node(flat).operands[0]
            xt = self.node(x).type
            if xt.rank == 3 and xt.shape[:2] == n.type.shape[:2]:
                return x, mn.operands[1], b
        return None

    def cell_computes(self, kind: str, body: Graph, hidden: int, sig, scan_node) -> str | None:
        """Run the loop body on random values and compare with the cell's equations: the
        cell's activation ("tanh", or "relu" for an rnn) when one of them matches, else None."""
        from dlc import backends
        rng = np.random.default_rng(0)
        rows = 3

        def sample(nid):
            t = body.node(nid).type
            shape = tuple(rows if not isinstance(d, int) else d for d in t.shape)
            return rng.standard_normal(shape)

        feeds = {body.node(nid).attrs["name"]: sample(nid) for nid in sig.carries + sig.seqs + sig.invariants}
        sig_ = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
        part = lambda v, j: v[:, j * hidden:(j + 1) * hidden]  # noqa: E731
        try:
            out = backends.backend("reference").run_graph(body, feeds, float_dtype=np.float64)
            h, xt, u = feeds["c0"], feeds["x0"], feeds["w0"]
            if kind == "lstm":
                z = xt + h @ u
                i, f, g, o = (part(z, j) for j in range(4))
                c2 = sig_(f) * feeds["c1"] + sig_(i) * np.tanh(g)
                want = {"c0": sig_(o) * np.tanh(c2), "c1": c2}
            elif kind == "gru":
                hu = h @ u + feeds["w1"]
                r = sig_(part(xt, 0) + part(hu, 0))
                z = sig_(part(xt, 1) + part(hu, 1))
                n = np.tanh(part(xt, 2) + r * part(hu, 2))
                want = {"c0": (1.0 - z) * n + z * h}
            else:
                z = xt + h @ u
                return next((name for name, v in (("tanh", np.tanh(z)), ("relu", np.maximum(z, 0.0)))
                             if np.shape(out["c0"]) == np.shape(v) and np.allclose(out["c0"], v, rtol=1e-7,
                                                                                   atol=1e-9)), None)
            same = all(np.shape(out[k]) == np.shape(v) and np.allclose(out[k], v, rtol=1e-7, atol=1e-9)
                       for k, v in want.items())
            return "tanh" if same else None
        except Exception:  # noqa: BLE001 - a body that does not run like the cell is not the cell
            return None

    def pair_directions(self, needed: set[int], position: dict) -> None:
        """A forward and a reverse cell of one kind and size over the same sequence: one
        bidirectional ONNX operator, emitted where the first of the two is, so both initial
        states (if any) must come before that."""
        recs = [r for r in self.recurrent.values() if r.scan in needed]
        for r in recs:
            if r.reverse or r.partner is not None:
                continue
            for q in recs:
                first = min(position[r.scan], position[q.scan])
                if q.reverse and q.partner is None and len(q.carries) == len(r.carries) and q.x == r.x \
                        and q.kind == r.kind and q.hidden == r.hidden and q.activation == r.activation \
                        and all(position[c] < first for c in r.carries + q.carries):
                    r.partner, q.partner = q, r
                    break

    # --- the walk -------------------------------------------------------------------------------
    def deps(self, nid: int) -> tuple[int, ...]:
        p = self.plan.get(nid)
        n = self.node(nid)
        if p is None:
            if n.op is ops.SIZE:
                return ()
            return n.operands
        kind = p[0]
        if kind == "conv":
            c = self.composite(p[1])
            return (c[1] if c is not None else tuple(self.node(p[1]).operands)) + ((p[2],) if p[2] is not None else ())
        if kind == "gemm":
            return tuple(self.node(p[1]).operands) + (p[2],)
        if kind in ("relu", "leaky", "elu", "selu", "softplus", "softmax", "log_softmax", "flatten", "mean", "index"):
            return (p[1],)
        if kind == "batchnorm":
            return p[1:6]
        if kind == "layernorm":
            return p[1:4]
        if kind == "pool1d":
            return (p[1],)
        if kind == "recurrent":
            r = p[1]
            extra = (r.partner.carries if r.partner else ())
            return (r.x,) + r.carries + extra
        raise AssertionError(kind)

    def run(self, roots: list[int]) -> None:
        order = self.g.toposort()
        for nid in order:
            p = self.match(nid)
            if p is not None:
                self.plan[nid] = p
        needed: set[int] = set()
        stack = list(roots)
        while stack:
            nid = stack.pop()
            if nid in needed:
                continue
            needed.add(nid)
            stack.extend(self.deps(nid))
        self.pair_directions(needed, {nid: i for i, nid in enumerate(order)})
        for nid in order:
            if nid in needed and nid not in self.value:
                self.visit(nid)

    def visit(self, nid: int) -> None:
        n = self.node(nid)
        p = self.plan.get(nid)
        out = self.value
        span = n.span
        if p is not None:
            getattr(self, f"emit_{p[0]}")(nid, *p[1:])
            return
        op = n.op
        if op is ops.INPUT and n.attrs["role"] in ("param", "state") and n.attrs["name"] in self.state:
            a = n.attrs
            out[nid] = self.initializer(np.asarray(self.state[a["name"]], dtype=a["type"].dtype.np), a["name"],
                                        exact_name=True)
            return
        if op is ops.INPUT:
            raise ExportError(f"the {n.attrs['role']} input `{n.attrs['name']}` has no value to export", span)
        if op is ops.CONST:
            v = np.asarray(n.attrs["value"]).astype(n.type.dtype.np)
            out[nid] = self.const(v, v.dtype)
        elif op is ops.BROADCAST:
            x = n.operands[0]
            xt = self.node(x).type
            shape, axes = n.attrs["shape"], tuple(n.attrs["axes"])
            v = self.operand(x, lazy_ok=True)
            if axes != tuple(range(len(shape) - xt.rank, len(shape))):
                missing = [i for i in range(len(shape)) if i not in axes]
                v = self.emit("Unsqueeze", [v, self.ints(missing)], hint="aligned", span=span)
            out[nid] = v
            self.lazy.add(nid)
        elif op is ops.STOP_GRADIENT:
            x = n.operands[0]
            out[nid] = self.value[x]
            if x in self.lazy:
                self.lazy.add(nid)
        elif op is ops.WHERE and n.type.dtype == DType.bool:
            out[nid] = self.bool_select(n.operands, span)
        elif op in _ELEMENTWISE or op in (ops.DIV, ops.NE, ops.CAST):
            args = [self.operand(o, lazy_ok=True) for o in n.operands]
            if all(o in self.lazy for o in n.operands):
                self.lazy.add(nid)
            if op is ops.CAST:
                out[nid] = self.emit("Cast", args, span=span, to=onnx_dtype(n.attrs["dtype"]))
            elif op is ops.NE:
                out[nid] = self.emit("Not", [self.emit("Equal", args, span=span)], hint="ne", span=span)
            elif op is ops.DIV and not n.type.dtype.is_float:  # dlc rounds down, ONNX's Div truncates
                mod = self.emit("Mod", args, span=span, fmod=0)
                out[nid] = self.emit("Div", [self.emit("Sub", [args[0], mod], span=span), args[1]], span=span)
            elif op is ops.DIV:
                out[nid] = self.emit("Div", args, span=span)
            else:
                out[nid] = self.emit(_ELEMENTWISE[op], args, span=span)
        elif op is ops.MATMUL:
            a, b = (self.operand(o) for o in n.operands)
            out[nid] = self.emit("Gemm", [a, b], span=span, transA=int(bool(n.attrs.get("ta"))),
                                 transB=int(bool(n.attrs.get("tb"))))
        elif op is ops.BATCH_MATMUL:  # MatMul multiplies stacks; a flag is a Transpose of each matrix
            a, b = (self.emit("Transpose", [self.operand(o)], span=span, perm=[0, 2, 1]) if n.attrs.get(flag)
                    else self.operand(o) for o, flag in zip(n.operands, ("ta", "tb")))
            out[nid] = self.emit("MatMul", [a, b], span=span)
        elif op in (ops.CONV2D, ops.CONV2D_BWD_DATA):
            self.emit_conv(nid, nid, None)
        elif op is ops.POOL2D:
            a = n.attrs
            kw = dict(kernel_shape=list(a["kernel"]), strides=list(a["stride"]), pads=list(a["pad"]) * 2)
            if a["mode"] == "max":
                out[nid] = self.emit("MaxPool", [self.operand(n.operands[0])], span=span, **kw)
            else:
                out[nid] = self.emit("AveragePool", [self.operand(n.operands[0])], span=span,
                                     count_include_pad=1, **kw)
        elif op in (ops.REDUCE_SUM, ops.REDUCE_MAX):
            x = self.operand(n.operands[0])
            out[nid] = self.emit("ReduceSum" if op is ops.REDUCE_SUM else "ReduceMax",
                                 [x, self.ints(n.attrs["axes"])], span=span, keepdims=0)
        elif op is ops.ARGMAX:
            idx = self.emit("ArgMax", [self.operand(n.operands[0])], span=span, axis=n.attrs["axis"], keepdims=0)
            out[nid] = self.emit("Cast", [idx], span=span, to=onnx_dtype(DType.i32))
        elif op is ops.SIZE:
            xt = self.node(n.operands[0]).type
            dims = [xt.shape[i] for i in n.attrs["axes"]]
            if all(isinstance(d, int) for d in dims):
                out[nid] = self.const(float(np.prod(dims)), np.float32)
            else:
                prod = self.emit("ReduceProd", [self.shape_tensor(dims, span)], span=span, keepdims=0)
                out[nid] = self.emit("Cast", [prod], span=span, to=onnx_dtype(DType.f32))
        elif op is ops.IOTA:
            a = n.attrs
            shape, axis, dtype = a["shape"], a["axis"], a["dtype"]
            length = shape[axis]
            if isinstance(length, int):
                limit = self.const(length, dtype.np)
            else:
                limit = self.emit("Cast", [self.emit("Squeeze", [self.dim_tensor(length, span), self.ints([0])],
                                                     span=span)], span=span, to=onnx_dtype(dtype))
            r = self.emit("Range", [self.const(0, dtype.np), limit, self.const(1, dtype.np)], span=span)
            target = [-1 if i == axis else 1 for i in range(len(shape))]
            out[nid] = self.emit("Reshape", [r, self.ints(target)], hint="iota", span=span)
            self.lazy.add(nid)
        elif op is ops.RESHAPE:
            x = self.operand(n.operands[0])
            out[nid] = self.emit("Reshape", [x, self.reshape_target(n.attrs["shape"], span)], span=span)
        elif op is ops.PERMUTE:
            out[nid] = self.emit("Transpose", [self.operand(n.operands[0])], span=span, perm=list(n.attrs["perm"]))
        elif op is ops.SLICE:
            self.emit_slice(nid)
        elif op is ops.PAD:
            a = n.attrs
            if any(a["interior"]):
                raise ExportError("`pad` with interior padding (a gradient's) has no ONNX operator", span)
            x = self.operand(n.operands[0])
            value = self.const(a.get("value", 0.0), n.type.dtype.np)
            out[nid] = self.emit("Pad", [x, self.ints(list(a["lo"]) + list(a["hi"])), value], span=span,
                                 mode="constant")
        elif op is ops.CONCAT:
            out[nid] = self.emit("Concat", [self.operand(o) for o in n.operands], span=span, axis=n.attrs["axis"])
        elif op is ops.TAKE:
            table, idx = (self.operand(o) for o in n.operands)
            out[nid] = self.emit("Gather", [table, idx], span=span, axis=0)
        elif op is ops.SCAN:
            self.emit_scan(nid)
        elif op is ops.SCAN_RESULT:
            src = n.operands[0]
            rec = self.recurrent.get(src)
            if rec is not None:
                out[nid] = self.recurrent_result(rec, n.attrs["index"], span)
            else:
                out[nid] = self.value[src][n.attrs["index"]]
        else:
            what = {ops.RANDOM: "random numbers (dropout while training) have no place in an exported "
                                "evaluation graph",
                    ops.SCATTER_ADD: "it is a gradient (of `take`)"}.get(op, "it has no ONNX counterpart here")
            raise ExportError(f"the primitive `{op.name}` cannot be exported to ONNX: {what}", span,
                              hint="export the model's evaluation graph (`dlc export`), which holds no gradients")

    # --- emitters for patterns ------------------------------------------------------------------
    def emit_gemm(self, nid: int, mm: int, bias: int) -> None:
        m = self.node(mm)
        a, b = (self.operand(o) for o in m.operands)
        self.value[nid] = self.emit("Gemm", [a, b, self.operand(bias)], span=self.node(nid).span,
                                    transA=int(bool(m.attrs.get("ta"))), transB=int(bool(m.attrs.get("tb"))))

    def bool_select(self, operands, span) -> str:
        """A select between bools (logical_and/or/not) as And, Or and Not: onnxruntime has no
        Where of bools. A constant side is not written."""
        c, a, b = operands
        x, y = self.scalar_const(a), self.scalar_const(b)
        if x == 1.0 and y == 0.0:
            return self.operand(c)
        if y == 0.0:
            return self.emit("And", [self.operand(c), self.operand(a)], span=span)
        if x == 1.0:
            return self.emit("Or", [self.operand(c), self.operand(b)], span=span)
        negated = self.emit("Not", [self.operand(c)], span=span)
        if x == 0.0 and y == 1.0:
            return negated
        return self.emit("Or", [self.emit("And", [self.operand(c), self.operand(a)], span=span),
                                self.emit("And", [negated, self.operand(b)], span=span)], span=span)

    def emit_conv(self, nid: int, conv: int, bias: int | None) -> None:
        """Conv for a conv2d or conv1d layer (however dlc composed it: grouped, depthwise,
        dilated), or ConvTranspose for conv2d's input gradient (`conv_transpose2d`): the same
        weight layout, the output size given by output_padding."""
        c, composite = self.node(conv), self.composite(conv)
        if composite is not None:
            kind, operands, a = composite
            stride, pad, dilation = (list(a[k]) if kind == "conv2d" else [a[k]] for k in ("stride", "pad", "dilation"))
            group = a["groups"]
        else:
            operands, a = c.operands, c.attrs
            stride, pad, dilation, group = list(a["stride"]), list(a["pad"]), list(a.get("dilation", (1, 1))), 1
        w = self.node(operands[1]).type
        kw = dict(kernel_shape=list(w.shape[2:]), strides=stride, pads=pad * 2)
        if any(d != 1 for d in dilation):
            kw["dilations"] = dilation
        if group > 1:
            kw["group"] = group
        inputs = [self.operand(o) for o in operands] + ([self.operand(bias)] if bias is not None else [])
        if c.op is ops.CONV2D_BWD_DATA:
            x = self.node(c.operands[0]).type
            kw["output_padding"] = [out - ((n - 1) * s - 2 * p + d * (k - 1) + 1) for out, n, s, p, d, k in zip(
                a["in_hw"], x.shape[2:], stride, pad, dilation, w.shape[2:])]
        self.value[nid] = self.emit("ConvTranspose" if c.op is ops.CONV2D_BWD_DATA else "Conv", inputs,
                                    span=self.node(nid).span, **kw)

    def emit_pool1d(self, nid: int, x: int, pool: int) -> None:
        a = self.node(pool).attrs
        kw = dict(kernel_shape=[a["kernel"][1]], strides=[a["stride"][1]], pads=[a["pad"][1]] * 2)
        if a["mode"] == "avg":
            kw["count_include_pad"] = 1
        self.value[nid] = self.emit("MaxPool" if a["mode"] == "max" else "AveragePool", [self.operand(x)],
                                    span=self.node(nid).span, **kw)

    def emit_relu(self, nid: int, x: int) -> None:
        self.value[nid] = self.emit("Relu", [self.operand(x)], span=self.node(nid).span)

    def emit_leaky(self, nid: int, x: int, alpha: float) -> None:
        self.value[nid] = self.emit("LeakyRelu", [self.operand(x)], span=self.node(nid).span, alpha=alpha)

    def emit_elu(self, nid: int, x: int, alpha: float) -> None:
        self.value[nid] = self.emit("Elu", [self.operand(x)], span=self.node(nid).span, alpha=alpha)

    def emit_selu(self, nid: int, x: int) -> None:
        self.value[nid] = self.emit("Selu", [self.operand(x)], span=self.node(nid).span)

    def emit_softplus(self, nid: int, x: int) -> None:
        self.value[nid] = self.emit("Softplus", [self.operand(x)], span=self.node(nid).span)

    def emit_layernorm(self, nid: int, x: int, gamma: int, beta: int, eps: float) -> None:
        self.value[nid] = self.emit("LayerNormalization", [self.operand(v) for v in (x, gamma, beta)],
                                    span=self.node(nid).span, axis=-1, epsilon=eps)

    def emit_softmax(self, nid: int, x: int, axis: int) -> None:
        self.value[nid] = self.emit("Softmax", [self.operand(x)], span=self.node(nid).span, axis=axis)

    def emit_log_softmax(self, nid: int, x: int, axis: int) -> None:
        self.value[nid] = self.emit("LogSoftmax", [self.operand(x)], span=self.node(nid).span, axis=axis)

    def emit_batchnorm(self, nid: int, x: int, gamma: int, beta: int, mean: int, var: int, eps: float) -> None:
        self.value[nid] = self.emit("BatchNormalization", [self.operand(v) for v in (x, gamma, beta, mean, var)],
                                    span=self.node(nid).span, epsilon=eps)

    def emit_index(self, nid: int, x: int, axis: int, i: int) -> None:
        self.value[nid] = self.emit("Gather", [self.operand(x), self.const(i, np.int64)], span=self.node(nid).span,
                                    axis=axis)

    def emit_flatten(self, nid: int, x: int) -> None:
        self.value[nid] = self.emit("Flatten", [self.operand(x)], span=self.node(nid).span, axis=1)

    def emit_mean(self, nid: int, x: int, axes: tuple, keep: bool) -> None:
        self.value[nid] = self.emit("ReduceMean", [self.operand(x), self.ints(axes)], span=self.node(nid).span,
                                    keepdims=int(keep))

    def emit_slice(self, nid: int) -> None:
        n = self.node(nid)
        a = n.attrs
        xt = self.node(n.operands[0]).type
        axes, starts, ends, steps = [], [], [], []
        for i, (d, s, e, st) in enumerate(zip(xt.shape, a["starts"], a["stops"], a["steps"])):
            if (s, e, st) != (0, d, 1):
                axes.append(i), starts.append(s), ends.append(e), steps.append(st)
        x = self.operand(n.operands[0])
        if not axes:
            self.value[nid] = x
            return
        self.value[nid] = self.emit("Slice", [x, self.ints(starts), self.ints(ends), self.ints(axes),
                                              self.ints(steps)], span=n.span)

    # --- loops ----------------------------------------------------------------------------------
    def emit_recurrent(self, nid: int, rec: Recurrent) -> None:
        if rec.outputs:  # emitted with its partner
            return
        n = self.node(nid)
        pair = [rec] if rec.partner is None else [rec, rec.partner]
        if rec.reverse and rec.partner is not None:
            pair = [rec.partner, rec]
        ws, rs, bs = [], [], []
        for r in pair:
            w, b, u = (self.state[self.node(i).attrs["name"]].astype(np.float32) for i in (r.w, r.b, r.u))
            h = r.hidden
            if r.kind == "lstm":
                order, bias_h = LSTM_GATES, np.zeros_like(b)
            elif r.kind == "gru":
                order, bias_h = GRU_GATES, self.state[self.node(r.bh).attrs["name"]].astype(np.float32)
            else:
                order, bias_h = (0,), np.zeros_like(b)

            def gates(m, order=order, h=h):  # [.., gates*h] in dlc's order -> ONNX's, transposed
                return np.concatenate([m[..., j * h:(j + 1) * h] for j in order], axis=-1)

            ws.append(gates(w).T)
            rs.append(gates(u).T)
            bs.append(np.concatenate([gates(b), gates(bias_h)]))
        layer, _, w_name = self.node(rec.w).attrs["name"].rpartition(".")  # h.w, h.w_l1, h.wx_l1_rev
        prefix = (layer or rec.kind) + ("_" + w_name.split("_", 1)[1] if "_" in w_name else "")
        inputs = [self.operand(rec.x),
                  self.initializer(np.stack(ws), f"{prefix}.W"),
                  self.initializer(np.stack(rs), f"{prefix}.R"),
                  self.initializer(np.stack(bs), f"{prefix}.B")]
        if rec.carries:  # initial states [directions, B, H]: each direction's stacked
            inputs.append("")  # sequence_lens
            for j in range(len(rec.carries)):
                states = [self.emit("Unsqueeze", [self.operand(r.carries[j]), self.ints([0])], span=n.span)
                          for r in pair]
                inputs.append(states[0] if len(states) == 1 else
                              self.emit("Concat", states, span=n.span, axis=0))
        op_type = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[rec.kind]
        attrs = dict(hidden_size=rec.hidden,
                     direction="bidirectional" if len(pair) == 2 else "reverse" if rec.reverse else "forward")
        if rec.kind == "gru":
            attrs["linear_before_reset"] = 1
        if rec.activation != "tanh":
            attrs["activations"] = [rec.activation.capitalize()] * len(pair)
        count = 3 if rec.kind == "lstm" else 2
        outs = self.emit(op_type, inputs, outputs=count, hint=prefix, span=n.span, **attrs)
        for k, r in enumerate(pair):
            r.outputs = {"Y": outs[0], "Y_h": outs[1], "Y_c": outs[2] if rec.kind == "lstm" else None,
                         "dir": k, "dirs": len(pair)}
            self.value[r.scan] = None

    def recurrent_result(self, rec: Recurrent, index: int, span) -> str:
        o = rec.outputs
        if rec.kind == "lstm":
            key = {0: "Y_h", 1: "Y_c", 2: "Y"}[index]
        else:
            key = {0: "Y_h", 1: "Y"}[index]
        if key == "Y":  # [T, dirs, B, H] -> [T, B, H]
            if o["dirs"] == 1:
                return self.emit("Squeeze", [o["Y"], self.ints([1])], span=span, hint="hs")
            return self.emit("Gather", [o["Y"], self.const(o["dir"], np.int64)], span=span, hint="hs", axis=1)
        if o["dirs"] == 1:
            return self.emit("Squeeze", [o[key], self.ints([0])], span=span, hint="last")
        return self.emit("Gather", [o[key], self.const(o["dir"], np.int64)], span=span, hint="last", axis=0)

    def emit_scan(self, nid: int) -> None:
        from onnx import helper
        from dlc.core.ops.scan import signature
        n = self.node(nid)
        a = n.attrs
        body, k, s = a["body"], a["carries"], a["seqs"]
        sig = signature(body, k, s)
        outer = [self.operand(o) for o in n.operands]
        # invariants are read from the enclosing graph (ONNX subgraphs see outer values)
        inner = _GraphExporter(body, {}, self.names, self.recognize, self.opset,
                               outer_values={b: outer[k + s + i] for i, b in enumerate(sig.invariants)})
        for i, b in enumerate(sig.invariants):
            inner.add_dim_sources(outer[k + s + i], body.node(b).type)
        graph_inputs = []
        for b in sig.carries + sig.seqs:
            bn = body.node(b)
            name = self.names.fresh(f"{bn.attrs['name']}")
            inner.value[b] = name
            inner.add_dim_sources(name, bn.type)
            graph_inputs.append(value_info(name, bn.type))
        for nid_, name in self.dims.items():  # symbols the body cannot see in its own inputs
            inner.dims.setdefault(nid_, name)
        results = list(sig.new_carries) + list(sig.outputs)
        inner.run(results)
        graph_outputs, seen = [], set()
        made = {o for node in inner.nodes for o in node.output}
        for r in results:
            v = inner.operand(r)
            if v in seen or v not in made:  # a repeated value, an input or an outer value
                v = inner.emit("Identity", [v], hint="result")
            seen.add(v)
            graph_outputs.append(value_info(v, body.node(r).type))
        g = helper.make_graph(inner.nodes, self.names.fresh(body.name), graph_inputs, graph_outputs,
                              initializer=inner.initializers)
        m = len(sig.outputs)
        attrs = dict(body=g, num_scan_inputs=s)
        if a.get("reverse"):
            attrs.update(scan_input_directions=[1] * s, scan_output_directions=[1] * m)
        outs = self.emit("Scan", outer[:k + s], outputs=k + m, hint="loop", span=n.span, **attrs)
        self.value[nid] = outs if isinstance(outs, list) else [outs]


def eval_graph(model) -> Graph:
    """The evaluation graph's part that computes the output."""
    g = model.built("eval").graph.copy()
    g.outputs = {"output": g.outputs["output"]}
    g.remove_unused(keep_inputs=False)
    return g


def export_model(model, normalizer=None, opset: int | None = None, recognize: bool = True):
    """The model's evaluation graph with its current parameters and state as an onnx.ModelProto,
    checked with onnx.checker."""
    onnx = require_onnx()
    from onnx import helper
    opset = opset or onnx.defs.onnx_opset_version()
    if not OPSET_MIN <= opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"opset {opset} is not supported: dlc exports opsets {OPSET_MIN} to "
                          f"{onnx.defs.onnx_opset_version()} (the installed onnx's newest)")
    g = eval_graph(model)
    state = model.state
    names = Names()
    ex = _GraphExporter(g, state, names, recognize, opset)
    graph_inputs = []
    data = [nid for nid in g.inputs() if g.node(nid).attrs["role"] == "data"]
    for name, t in model.input_types:  # every declared input, in order, even one the output ignores
        names.reserve(name)
        graph_inputs.append(value_info(name, t))
        ex.add_dim_sources(name, t)
    used = {g.node(nid).attrs["name"] for nid in data}
    for c in model.built("eval").carries:  # a `state`: an input holding its value at the batch's start
        if c.input in used:
            names.reserve(c.input)
            graph_inputs.append(value_info(c.input, c.type))
            ex.add_dim_sources(c.input, c.type)
    for nid in data:
        name = g.node(nid).attrs["name"]
        ex.value[nid] = name
    first = model.input_types[0] if model.input_types else None
    if normalizer is not None and normalizer.active and first is not None and first[1].dtype.is_float:
        ex_first = next((nid for nid in data if g.node(nid).attrs["name"] == first[0]), None)
        if ex_first is not None:
            ex.value[ex_first] = _normalize(ex, first[0], first[1], normalizer)
    for nid in g.inputs():  # initializers under their dlc names, made when something reads them
        a = g.node(nid).attrs
        if a["role"] in ("param", "state"):
            if a["name"] not in state:
                raise ExportError(f"no value for `{a['name']}`", g.node(nid).span)
            names.reserve(a["name"])
    out = g.outputs["output"]
    ex.run([out])
    result = ex.operand(out)
    ex.emit("Identity", [result], outputs=[names.reserve("output")])
    out_type = g.node(out).type
    graph = helper.make_graph(ex.nodes, model.name, graph_inputs, [value_info("output", out_type)],
                              initializer=ex.initializers)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="dlc",
                          producer_version=__version__)
    m.doc_string = f"model `{model.name}` from {model.source_name}, exported by dlc {__version__}"
    trainable = sorted(k for k, p in model.built("eval").params.items() if p.role == "param" and p.trainable)
    helper.set_model_props(m, {"dlc.model": model.name, "dlc.source": str(model.source_name),
                               "dlc.normalized": "yes" if normalizer is not None and normalizer.active else "no",
                               "dlc.trainable": ",".join(trainable)})  # (the importer freezes the rest)
    _simplify_output(m)
    _drop_unread_initializers(m.graph)
    try:
        onnx.checker.check_model(m, full_check=True)
    except Exception as e:  # noqa: BLE001 - onnx raises several kinds
        raise ExportError(f"the exported model does not pass onnx.checker: {e}",
                          hint="this is a bug in dlc's exporter; please report it with the .dln file") from None
    return m


def _normalize(ex: _GraphExporter, name: str, t: TensorType, normalizer) -> str:
    """(x - shift) / scale per input feature, as `dlc predict` applies it."""
    per_sample = tuple(t.shape[1:])
    shift, scale = (np.asarray(a, dtype=np.float32).reshape(-1) for a in (normalizer.shift, normalizer.scale))
    if all(isinstance(d, int) for d in per_sample) and shift.size == int(np.prod(per_sample)) and shift.size > 1:
        shift, scale = shift.reshape(per_sample), scale.reshape(per_sample)
    elif shift.size == 1:
        shift, scale = shift.reshape(()), scale.reshape(())
    else:
        raise ExportError(f"the checkpoint's normalization has {shift.size} values, but input `{name}` "
                          f"({t}) has {numel(per_sample)} features per sample")
    if t.dtype != DType.f32:
        shift, scale = shift.astype(t.dtype.np), scale.astype(t.dtype.np)
    s = ex.initializer(shift, names_reserve(ex, "normalize.shift"), exact_name=True)
    c = ex.initializer(scale, names_reserve(ex, "normalize.scale"), exact_name=True)
    centered = ex.emit("Sub", [name, s], hint=f"{name}_centered")
    return ex.emit("Div", [centered, c], hint=f"{name}_normalized")


def names_reserve(ex: _GraphExporter, name: str) -> str:
    return ex.names.reserve(name) if name not in ex.names.used else ex.names.fresh(name)


def _drop_unread_initializers(graph) -> None:
    """Initializers no node reads (a constant side of a select written as And/Or), dropped so
    that runtimes do not warn about them; Scan bodies read the outer graph's by name."""
    def read(g) -> set:
        names = {o.name for o in g.output}
        for node in g.node:
            names.update(node.input)
            for a in node.attribute:
                if a.HasField("g"):
                    names |= read(a.g)
        return names
    used = read(graph)
    kept = [i for i in graph.initializer if i.name in used]
    if len(kept) < len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


def _simplify_output(m) -> None:
    """`output = Identity(v)` with v made by the node just before: name v `output` instead."""
    nodes = m.graph.node
    last = nodes[-1]
    if last.op_type != "Identity" or len(nodes) < 2:
        return
    src = last.input[0]
    producers = [n for n in nodes if src in n.output]
    readers = [n for n in nodes if src in n.input]
    outer = {i.name for i in m.graph.input} | {i.name for i in m.graph.initializer}
    if len(producers) != 1 or len(readers) != 1 or src in outer or _read_in_subgraph(m.graph, src):
        return
    p = producers[0]
    p.output[list(p.output).index(src)] = "output"
    nodes.remove(last)


def _read_in_subgraph(graph, name: str) -> bool:
    for n in graph.node:
        for a in n.attribute:
            if a.g is not None and a.g.node:
                if any(name in sn.input for sn in a.g.node) or _read_in_subgraph(a.g, name):
                    return True
    return False


def summary(m) -> str:
    """`model mlp, opset 28, inputs x f32[B,64], output f32[B,10]; 3 nodes: Gemm 2, Relu 1`."""
    from collections import Counter
    ops_used = Counter(n.op_type for n in m.graph.node)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), "?")

    def shape(v):
        t = v.type.tensor_type
        from onnx import helper
        dtype = {"FLOAT": "f32", "DOUBLE": "f64", "INT32": "i32", "BOOL": "bool"}.get(
            helper.tensor_dtype_to_string(t.elem_type).replace("TensorProto.", ""), "?")
        return dtype + "[" + ",".join(d.dim_param or str(d.dim_value) for d in t.shape.dim) + "]"

    ins = ", ".join(f"{v.name} {shape(v)}" for v in m.graph.input)
    outs = ", ".join(shape(v) for v in m.graph.output)
    return (f"model {m.graph.name}, opset {opset}, inputs {ins}, output {outs}; {len(m.graph.node)} nodes: "
            + ", ".join(f"{k} {v}" for k, v in sorted(ops_used.items(), key=lambda kv: (-kv[1], kv[0]))))
