"""GraphBuilder: typed node construction with implicit broadcasting made explicit.

Composites (layers, losses, optimizers) and gradient rules are written against this
API with ordinary operators on `Value`s: `g * (1.0 - y * y)`.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np

from dlc.core import ops
from dlc.core.diagnostics import ShapeMismatch, Span, TypeError_
from dlc.core.graph import Graph, Node
from dlc.core.types import DType, ShapeError, TensorType, broadcast_shapes, normalize_axis



class Value:
    """A handle on one graph node, with arithmetic that emits nodes."""

    __slots__ = ("b", "id")

    def __init__(self, builder: "GraphBuilder", nid: int):
        self.b = builder
        self.id = nid

    @property
    def node(self) -> Node:
        return self.b.graph.node(self.id)

    @property
    def type(self) -> TensorType:
        return self.node.type

    @property
    def shape(self) -> tuple:
        return self.type.shape

    @property
    def dtype(self) -> DType:
        return self.type.dtype

    @property
    def rank(self) -> int:
        return self.type.rank

    def __repr__(self) -> str:
        return f"Value(%{self.id}: {self.type})"

    def __add__(self, o): return self.b.binary(ops.ADD, self, o)
    def __radd__(self, o): return self.b.binary(ops.ADD, o, self)
    def __sub__(self, o): return self.b.binary(ops.SUB, self, o)
    def __rsub__(self, o): return self.b.binary(ops.SUB, o, self)
    def __mul__(self, o): return self.b.binary(ops.MUL, self, o)
    def __rmul__(self, o): return self.b.binary(ops.MUL, o, self)
    def __truediv__(self, o): return self.b.binary(ops.DIV, self, o)
    def __rtruediv__(self, o): return self.b.binary(ops.DIV, o, self)
    def __pow__(self, o): return self.b.binary(ops.POW, self, o)
    def __rpow__(self, o): return self.b.binary(ops.POW, o, self)
    def __neg__(self): return self.b.emit(ops.NEG, (self,))
    def __matmul__(self, o): return self.b.matmul(self, o)


class GraphBuilder:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.span: Span | None = None

    @contextlib.contextmanager
    def at(self, span: Span | None):
        """Nodes emitted inside carry this source span."""
        saved, self.span = self.span, span if span is not None else self.span
        try:
            yield
        finally:
            self.span = saved

    def value(self, nid: int) -> Value:
        return Value(self, nid)

    def emit(self, op: ops.OpDef, operands: Sequence[Value] = (), **attrs) -> Value:
        for v in operands:
            if v.b.graph is not self.graph:  # e.g. a loop body reading the enclosing graph
                raise ValueError(f"{op.name}: operand {v} belongs to graph {v.b.graph.name}, "
                                 f"not {self.graph.name}")
        try:
            t = op.infer(*(v.type for v in operands), **attrs)
        except ShapeError as e:
            raise ShapeMismatch(str(e), self.span) from None
        return Value(self, self.graph.add(Node(op, tuple(v.id for v in operands), attrs, t, self.span)))

    # --- sources ---------------------------------------------------------------------------
    def input(self, name: str, type: TensorType, role: str) -> Value:
        return self.emit(ops.INPUT, name=name, role=role, type=type)

    def const(self, value, dtype: DType = DType.f32) -> Value:
        # floats are stored in float64 (exact in a float64 run; rounded when compiled)
        store = np.float64 if dtype.is_float else dtype.np
        return self.emit(ops.CONST, value=np.asarray(value, dtype=store), dtype=dtype)

    def full(self, value, shape, dtype: DType = DType.f32) -> Value:
        return self.broadcast(self.const(value, dtype), tuple(shape))

    def zeros_like(self, x: Value) -> Value:
        return self.full(0, x.shape, x.dtype)

    def iota(self, shape, axis: int, dtype: DType = DType.i32) -> Value:
        return self.emit(ops.IOTA, shape=tuple(shape), axis=axis, dtype=dtype)

    def size(self, x: Value, axes: Sequence[int]) -> Value:
        return self.emit(ops.SIZE, (x,), axes=tuple(axes))

    # --- elementwise -----------------------------------------------------------------------
    def lift(self, x, dtype: DType) -> Value:
        if isinstance(x, Value):
            return x
        if not dtype.is_float and isinstance(x, float) and not x.is_integer():
            raise TypeError_(f"cannot combine {dtype} values with the fraction {x}", self.span,
                             hint="integer tensors take whole numbers; use an f32 tensor")
        try:
            return self.const(x, dtype)
        except (OverflowError, ValueError):  # 2**40 into i32, 10**400 into f32, inf into i32
            shown = repr(x) if len(repr(x)) <= 24 else repr(x)[:12] + "..."
            raise TypeError_(f"the number {shown} does not fit in {dtype}", self.span) from None

    def binary(self, op: ops.OpDef, x, y) -> Value:
        if not isinstance(x, Value) and not isinstance(y, Value):
            raise TypeError("binary op needs at least one tensor")
        dtype = (x if isinstance(x, Value) else y).dtype
        x, y = self.lift(x, dtype), self.lift(y, dtype)
        try:
            shape = broadcast_shapes(x.shape, y.shape)
        except ShapeError as e:
            raise ShapeMismatch(f"cannot {op.name} {x.type} and {y.type}: {e}", self.span) from None
        return self.emit(op, (self.broadcast(x, shape), self.broadcast(y, shape)))

    def unary(self, op: ops.OpDef, x: Value) -> Value:
        return self.emit(op, (x,))

    def exp(self, x): return self.unary(ops.EXP, x)
    def log(self, x): return self.unary(ops.LOG, x)
    def sqrt(self, x): return self.unary(ops.SQRT, x)
    def tanh(self, x): return self.unary(ops.TANH, x)
    def sigmoid(self, x): return self.unary(ops.SIGMOID, x)
    def abs(self, x): return self.unary(ops.ABS, x)
    def sign(self, x): return self.unary(ops.SIGN, x)
    def stop_gradient(self, x): return self.unary(ops.STOP_GRADIENT, x)
    def maximum(self, x, y): return self.binary(ops.MAX, x, y)
    def minimum(self, x, y): return self.binary(ops.MIN, x, y)
    def lt(self, x, y): return self.binary(ops.LT, x, y)
    def le(self, x, y): return self.binary(ops.LE, x, y)
    def gt(self, x, y): return self.binary(ops.GT, x, y)
    def ge(self, x, y): return self.binary(ops.GE, x, y)
    def eq(self, x, y): return self.binary(ops.EQ, x, y)
    def ne(self, x, y): return self.binary(ops.NE, x, y)

    def where(self, cond: Value, x, y) -> Value:
        dtype = (x if isinstance(x, Value) else y).dtype
        x, y = self.lift(x, dtype), self.lift(y, dtype)
        try:
            shape = broadcast_shapes(broadcast_shapes(cond.shape, x.shape), y.shape)
        except ShapeError as e:
            raise ShapeMismatch(f"cannot select between {x.type} and {y.type} by {cond.type}: {e}",
                                self.span) from None
        return self.emit(ops.WHERE, (self.broadcast(cond, shape), self.broadcast(x, shape),
                                     self.broadcast(y, shape)))

    def cast(self, x: Value, dtype: DType) -> Value:
        return x if x.dtype == dtype else self.emit(ops.CAST, (x,), dtype=dtype)

    # --- reductions ------------------------------------------------------------------------
    def _axes(self, x: Value, axes) -> tuple[int, ...]:
        if axes is None:
            return tuple(range(x.rank))
        if isinstance(axes, int):
            axes = (axes,)
        try:
            return tuple(sorted({normalize_axis(a, x.rank) for a in axes}))
        except ShapeError as e:
            raise ShapeMismatch(f"{e} ({x.type})", self.span) from None

    def _keep(self, x: Value, out: Value, axes, keepdims: bool) -> Value:
        if not keepdims:
            return out
        return self.reshape(out, tuple(1 if i in axes else d for i, d in enumerate(x.shape)))

    def sum(self, x: Value, axes=None, keepdims: bool = False) -> Value:
        axes = self._axes(x, axes)
        out = self.emit(ops.REDUCE_SUM, (x,), axes=axes) if axes else x
        return self._keep(x, out, axes, keepdims)

    def max(self, x: Value, axes=None, keepdims: bool = False) -> Value:
        axes = self._axes(x, axes)
        out = self.emit(ops.REDUCE_MAX, (x,), axes=axes) if axes else x
        return self._keep(x, out, axes, keepdims)

    def mean(self, x: Value, axes=None, keepdims: bool = False) -> Value:
        axes = self._axes(x, axes)
        return self.sum(x, axes, keepdims) / self.size(x, axes)

    def argmax(self, x: Value, axis: int = -1) -> Value:
        return self.emit(ops.ARGMAX, (x,), axis=self._axes(x, axis)[0])

    # --- movement --------------------------------------------------------------------------
    def broadcast(self, x: Value, shape: tuple, axes: tuple[int, ...] | None = None) -> Value:
        shape = tuple(shape)
        if axes is None:  # numpy: right-aligned
            axes = tuple(range(len(shape) - x.rank, len(shape)))
        if x.shape == shape and tuple(axes) == tuple(range(len(shape))):
            return x
        return self.emit(ops.BROADCAST, (x,), shape=shape, axes=tuple(axes))

    def reshape(self, x: Value, shape: tuple) -> Value:
        shape = tuple(shape)
        return x if x.shape == shape else self.emit(ops.RESHAPE, (x,), shape=shape)

    def permute(self, x: Value, perm: Sequence[int]) -> Value:
        perm = tuple(perm)
        return x if perm == tuple(range(x.rank)) else self.emit(ops.PERMUTE, (x,), perm=perm)

    def slice(self, x: Value, starts, stops, steps=None) -> Value:
        steps = tuple(steps) if steps is not None else (1,) * x.rank
        if tuple(starts) == (0,) * x.rank and tuple(stops) == tuple(x.shape) and steps == (1,) * x.rank:
            return x
        return self.emit(ops.SLICE, (x,), starts=tuple(starts), stops=tuple(stops), steps=steps)

    def pad(self, x: Value, lo, hi, interior=None, value: float = 0.0) -> Value:
        interior = tuple(interior) if interior is not None else (0,) * x.rank
        if not any(lo) and not any(hi) and not any(interior):
            return x
        return self.emit(ops.PAD, (x,), lo=tuple(lo), hi=tuple(hi), interior=interior, value=value)

    def composite(self, result: Value, kind: str, operands: Sequence[Value], **attrs) -> None:
        """Records that `result` is one `kind` of `operands` (a layer composed of primitives,
        as StableHLO's composite ops), so ONNX export can write it as one operator."""
        self.graph.meta.setdefault("composites", {})[result.id] = (kind, tuple(o.id for o in operands), attrs)

    def concat(self, xs: Sequence[Value], axis: int) -> Value:
        return xs[0] if len(xs) == 1 else self.emit(ops.CONCAT, tuple(xs), axis=axis)

    def take_axis(self, x: Value, axis: int, index: int) -> Value:
        """x[..., index, ...] with that axis dropped."""
        starts = tuple(index if i == axis else 0 for i in range(x.rank))
        stops = tuple(index + 1 if i == axis else d for i, d in enumerate(x.shape))
        part = self.slice(x, starts, stops)
        return self.reshape(part, tuple(d for i, d in enumerate(x.shape) if i != axis))

    # --- loops ------------------------------------------------------------------------------
    def scan(self, step, carries: Sequence[Value], seqs: Sequence[Value] = (),
             invariants: Sequence[Value] = (), length=None, reverse: bool = False,
             name: str = "body") -> tuple[list[Value], list[Value]]:
        """A `scan` (see dlc/core/ops/scan.py): `step(b, cs, xs, ws) -> (new cs, ys)` builds
        the body with its own builder `b`, from the carries `cs`, this step's slices `xs` of
        the (time-major) sequences and the invariants `ws` -- never from values of this graph.
        Returns (final carries, stacked per-step outputs [T, ...])."""
        from dlc.core.ops.scan import carry_name, inv_name, out_name, seq_name
        carries, seqs, invariants = list(carries), list(seqs), list(invariants)
        if length is None:
            if not seqs:
                raise ValueError("scan: without sequences the length must be given")
            length = seqs[0].shape[0]
        body = Graph(name)
        bb = GraphBuilder(body)
        bb.span = self.span
        cs = [bb.input(carry_name(i), v.type, "data") for i, v in enumerate(carries)]
        xs = [bb.input(seq_name(j), v.type.with_shape(v.shape[1:]), "data") for j, v in enumerate(seqs)]
        ws = [bb.input(inv_name(k), v.type, "data") for k, v in enumerate(invariants)]
        new, ys = step(bb, cs, xs, ws)
        new, ys = list(new), list(ys)
        if len(new) != len(carries) or any(v.b is not bb for v in new + ys):
            raise ValueError("scan: the step must return one new value per carry, built in the body")
        for i, v in enumerate(new):
            body.outputs[carry_name(i)] = v.id
        for m, v in enumerate(ys):
            body.outputs[out_name(m)] = v.id
        s = self.emit(ops.SCAN, tuple(carries + seqs + invariants), body=body, length=length,
                      reverse=reverse, carries=len(carries), seqs=len(seqs))
        results = [self.emit(ops.SCAN_RESULT, (s,), index=i) for i in range(len(new) + len(ys))]
        return results[:len(new)], results[len(new):]

    # --- contractions ----------------------------------------------------------------------
    def matmul(self, a: Value, b: Value, ta: bool = False, tb: bool = False) -> Value:
        return self.emit(ops.MATMUL, (a, b), ta=ta, tb=tb)

    def batch_matmul(self, a: Value, b: Value, ta: bool = False, tb: bool = False) -> Value:
        return self.emit(ops.BATCH_MATMUL, (a, b), ta=ta, tb=tb)
