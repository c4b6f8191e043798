"""Reductions over a set of axes; the reduced axes are dropped from the result."""
from __future__ import annotations

import numpy as np

from dlc.core.types import DType, ShapeError, TensorType
from dlc.core.ops.base import Kind, OpDef, register


def _check_axes(name: str, x: TensorType, axes: tuple[int, ...]) -> None:
    if len(set(axes)) != len(axes) or any(not 0 <= a < x.rank for a in axes):
        raise ShapeError(f"{name}: bad axes {list(axes)} for {x}")


def _reduced(x: TensorType, axes) -> tuple:
    return tuple(d for i, d in enumerate(x.shape) if i not in axes)


def _kept(x: TensorType, axes) -> tuple[int, ...]:
    return tuple(i for i in range(x.rank) if i not in axes)


def _reduce_infer(name):
    def infer(x: TensorType, axes: tuple[int, ...]) -> TensorType:
        _check_axes(name, x, axes)
        return x.with_shape(_reduced(x, axes))
    return infer


def _sum_vjp(b, g, y, x, axes):
    return (b.broadcast(g, x.shape, _kept(x.type, axes)),)


def _max_vjp(b, g, y, x, axes):
    # Ties share the gradient equally (as torch.amax does).
    kept = _kept(x.type, axes)
    hit = b.cast(b.eq(x, b.broadcast(y, x.shape, kept)), x.dtype)
    count = b.sum(hit, axes)
    return (hit * b.broadcast(g / count, x.shape, kept),)


REDUCE_SUM = register(OpDef("reduce_sum", Kind.REDUCE, _reduce_infer("reduce_sum"),
                            lambda x, axes: np.sum(x, axis=axes), _sum_vjp, 1, attrs=("axes",)))
REDUCE_MAX = register(OpDef("reduce_max", Kind.REDUCE, _reduce_infer("reduce_max"),
                            lambda x, axes: np.max(x, axis=axes), _max_vjp, 1, attrs=("axes",)))


def _argmax_infer(x: TensorType, axis: int) -> TensorType:
    if not 0 <= axis < x.rank:
        raise ShapeError(f"argmax: axis {axis} out of range for {x}")
    return TensorType(DType.i32, _reduced(x, (axis,)))


ARGMAX = register(OpDef("argmax", Kind.REDUCE, _argmax_infer,
                        lambda x, axis: np.argmax(x, axis=axis).astype(np.int32),
                        lambda b, g, y, x, axis: (None,), 1, attrs=("axis",)))
