"""Elementwise primitives: operands of equal shape (the builder inserts explicit broadcasts)."""
from __future__ import annotations

import numpy as np

from dlc.core.types import DType, ShapeError, TensorType
from dlc.core.ops.base import Kind, OpDef, register, require_float, same_dtype, same_shape


def elementwise(name: str, arity: int, ref, vjp=None, result: DType | None = None,
                float_only: bool = False, doc: str = "", operands: str = "any") -> OpDef:
    """operands: "any", "numbers" (not bool) or "bool" (logical ops)."""
    def infer(*types: TensorType) -> TensorType:
        same_shape(name, *types)
        dtype = same_dtype(name, *types)
        if float_only:
            require_float(name, types[0])
        if operands == "numbers" and dtype == DType.bool:
            raise ShapeError(f"{name} needs numbers, got {types[0]}")
        if operands == "bool" and dtype != DType.bool:
            raise ShapeError(f"{name} needs booleans, got {types[0]}")
        return TensorType(result or dtype, types[0].shape)

    return register(OpDef(name, Kind.ELEMENTWISE, infer, ref, vjp, arity, doc))


def _stable_sigmoid(x):
    return np.exp(-np.logaddexp(0, -x)).astype(x.dtype)


# Unary. Rules that can reuse the output (exp, tanh, sigmoid, sqrt) do, as JAX does.
NEG = elementwise("neg", 1, np.negative, lambda b, g, y, x: (-g,), operands="numbers")
EXP = elementwise("exp", 1, np.exp, lambda b, g, y, x: (g * y,), float_only=True)
LOG = elementwise("log", 1, np.log, lambda b, g, y, x: (g / x,), float_only=True)
SQRT = elementwise("sqrt", 1, np.sqrt, lambda b, g, y, x: (g * 0.5 / y,), float_only=True)
TANH = elementwise("tanh", 1, np.tanh, lambda b, g, y, x: (g * (1.0 - y * y),), float_only=True)
SIGMOID = elementwise("sigmoid", 1, _stable_sigmoid, lambda b, g, y, x: (g * y * (1.0 - y),),
                      float_only=True)
ABS = elementwise("abs", 1, np.abs, lambda b, g, y, x: (g * b.sign(x),))
SIGN = elementwise("sign", 1, np.sign, lambda b, g, y, x: (None,), operands="numbers")
# Identity whose gradient is zero: marks values autodiff must not differentiate through
# (the max subtracted inside log-softmax). Removed by simplify after autodiff.
STOP_GRADIENT = elementwise("stop_gradient", 1, lambda x: x, lambda b, g, y, x: (None,))


def _cast_infer(x: TensorType, dtype: DType) -> TensorType:
    return x.with_dtype(dtype)


def _cast_vjp(b, g, y, x, dtype):
    return (b.cast(g, x.dtype),) if x.dtype.is_float and dtype.is_float else (None,)


CAST = register(OpDef("cast", Kind.ELEMENTWISE, _cast_infer, lambda x, dtype: x.astype(dtype.np),
                      _cast_vjp, 1, attrs=("dtype",)))


# Binary
def _div_vjp(b, g, y, x1, x2):
    return g / x2, -(g * y) / x2


def _pow_vjp(b, g, y, x1, x2):
    # d/da a^b = b a^(b-1);  d/db a^b = a^b log a  (only built if b needs a gradient)
    return g * x2 * x1 ** (x2 - 1.0), g * y * b.log(x1)


def _max_vjp(b, g, y, x1, x2):
    # NOTE: ties send the gradient to the second operand, so relu(x) = max(x, 0) has
    # gradient 0 at x = 0, as in PyTorch. x1 > x2 exactly where max(x1, x2) > x2: asking
    # the output, which the next layer reads anyway, a ReLU's input need not be stored.
    take = b.gt(y, x2)
    zero = b.zeros_like(g)
    return b.where(take, g, zero), b.where(take, zero, g)


def _min_vjp(b, g, y, x1, x2):
    take = b.lt(y, x2)  # x1 < x2 exactly where min(x1, x2) < x2
    zero = b.zeros_like(g)
    return b.where(take, g, zero), b.where(take, zero, g)


ADD = elementwise("add", 2, np.add, lambda b, g, y, x1, x2: (g, g))
SUB = elementwise("sub", 2, np.subtract, lambda b, g, y, x1, x2: (g, -g))
MUL = elementwise("mul", 2, np.multiply, lambda b, g, y, x1, x2: (g * x2, g * x1))
DIV = elementwise("div", 2, lambda a, c: a / c if a.dtype.kind == "f" else a // c, _div_vjp)
POW = elementwise("pow", 2, np.power, _pow_vjp, float_only=True)
MAX = elementwise("max", 2, np.maximum, _max_vjp)
MIN = elementwise("min", 2, np.minimum, _min_vjp)

_no_grad2 = lambda b, g, y, x1, x2: (None, None)  # noqa: E731
LT = elementwise("lt", 2, np.less, _no_grad2, result=DType.bool)
LE = elementwise("le", 2, np.less_equal, _no_grad2, result=DType.bool)
GT = elementwise("gt", 2, np.greater, _no_grad2, result=DType.bool)
GE = elementwise("ge", 2, np.greater_equal, _no_grad2, result=DType.bool)
EQ = elementwise("eq", 2, np.equal, _no_grad2, result=DType.bool)
NE = elementwise("ne", 2, np.not_equal, _no_grad2, result=DType.bool)
AND = elementwise("and", 2, np.logical_and, _no_grad2, operands="bool")


# Ternary
def _where_infer(c: TensorType, a: TensorType, x: TensorType) -> TensorType:
    same_shape("where", c, a, x)
    if c.dtype != DType.bool:
        raise ShapeError(f"where: the condition must be bool, got {c}")
    return a.with_dtype(same_dtype("where", a, x))


def _where_vjp(b, g, y, c, x1, x2):
    zero = b.zeros_like(g)
    return None, b.where(c, g, zero), b.where(c, zero, g)


WHERE = register(OpDef("where", Kind.ELEMENTWISE, _where_infer, np.where, _where_vjp, 3))
