"""OpDef: one record per primitive holding its shape rule, numpy semantics and gradient rule."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable

from dlc.core.types import DType, ShapeError, TensorType


class Kind(enum.Enum):
    SOURCE = "source"            # input, const, iota, random: no tensor operands read
    ELEMENTWISE = "elementwise"  # out[i] = f(a[i], b[i], ...) on equal shapes
    REDUCE = "reduce"            # sum / max / argmax over axes
    MOVEMENT = "movement"        # reshape, permute, broadcast, slice, pad, concat
    MATMUL = "matmul"
    CONV = "conv"
    POOL = "pool"
    GATHER = "gather"            # take / scatter_add
    LOOP = "loop"                # scan (a body graph run T times) and scan_result
    COLLECTIVE = "collective"    # allreduce: a value summed over the processes of a job


@dataclass(frozen=True, eq=False)
class OpDef:
    """A primitive. `node.op is ops.EXP` tests identity.

    infer(*types, **attrs) -> TensorType   raises ShapeError (without a span)
    ref(*arrays, **attrs) -> ndarray        numpy semantics: the oracle
    vjp(b, g, out, *inputs, **attrs)        cotangent per input (a Value or None), built with b
    """

    name: str
    kind: Kind
    infer: Callable[..., TensorType]
    ref: Callable[..., Any]
    vjp: Callable[..., tuple] | None = None
    arity: int | None = None  # None: variadic
    doc: str = ""
    attrs: tuple[str, ...] = field(default=())  # attribute names, in print order

    def __repr__(self) -> str:
        return f"<op {self.name}>"


OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    assert op.name not in OPS, f"op {op.name} defined twice"
    OPS[op.name] = op
    return op


def same_shape(name: str, *types: TensorType) -> None:
    first = types[0]
    for t in types[1:]:
        if t.shape != first.shape:
            raise ShapeError(f"{name}: operands have different shapes {first} and {t}")


def same_dtype(name: str, *types: TensorType) -> DType:
    first = types[0].dtype
    for t in types[1:]:
        if t.dtype != first:
            raise ShapeError(f"{name}: operands have different dtypes {types[0]} and {t}")
    return first


def require_float(name: str, t: TensorType) -> None:
    if not t.dtype.is_float:
        raise ShapeError(f"{name} needs a floating-point tensor, got {t}")
