"""Movement primitives: reshape, permute, broadcast, slice, pad, concat."""
from __future__ import annotations

import numpy as np

from dlc.core.types import ShapeError, Sym, TensorType, numel, shape_str
from dlc.core.ops.base import Kind, OpDef, register


# reshape ---------------------------------------------------------------------------
def _reshape_infer(x: TensorType, shape: tuple) -> TensorType:
    if any(isinstance(d, int) and d < 1 for d in shape):
        raise ShapeError(f"cannot reshape {x} to {shape_str(shape)}: dimensions must be positive")
    if numel(x.shape) != numel(shape):
        raise ShapeError(f"cannot reshape {x} to {shape_str(shape)}: "
                         f"{numel(x.shape)} elements vs {numel(shape)}")
    return x.with_shape(shape)


RESHAPE = register(OpDef("reshape", Kind.MOVEMENT, _reshape_infer,
                         lambda x, shape: x.reshape([int(d) for d in shape]),
                         lambda b, g, y, x, shape: (b.reshape(g, x.shape),), 1, attrs=("shape",)))


# permute ----------------------------------------------------------------------------
def _permute_infer(x: TensorType, perm: tuple[int, ...]) -> TensorType:
    if sorted(perm) != list(range(x.rank)):
        raise ShapeError(f"permute: {list(perm)} is not a permutation of the {x.rank} axes of {x}")
    return x.with_shape(tuple(x.shape[p] for p in perm))


def _permute_vjp(b, g, y, x, perm):
    return (b.permute(g, tuple(int(i) for i in np.argsort(perm))),)


PERMUTE = register(OpDef("permute", Kind.MOVEMENT, _permute_infer,
                         lambda x, perm: np.transpose(x, perm), _permute_vjp, 1, attrs=("perm",)))


# broadcast --------------------------------------------------------------------------
# broadcast(x, shape, axes): operand dim i goes to output axis axes[i] and must be 1 or
# equal to it; the other output axes are new. (XLA's broadcast_in_dim.)
def _broadcast_infer(x: TensorType, shape: tuple, axes: tuple[int, ...]) -> TensorType:
    if len(axes) != x.rank or list(axes) != sorted(set(axes)) or any(not 0 <= a < len(shape) for a in axes):
        raise ShapeError(f"broadcast: bad axes {list(axes)} from {x} to {shape_str(shape)}")
    for d, a in zip(x.shape, axes):
        if d != 1 and d != shape[a]:
            raise ShapeError(f"cannot broadcast {x} to {shape_str(shape)}")
    return x.with_shape(shape)


def _broadcast_ref(x, shape, axes):
    expanded = [1] * len(shape)
    for d, a in zip(x.shape, axes):
        expanded[a] = d
    return np.broadcast_to(x.reshape(expanded), [int(d) for d in shape])


def broadcast_sum_axes(x: TensorType, shape: tuple, axes: tuple[int, ...]) -> tuple[int, ...]:
    """Output axes that a broadcast creates or stretches: its gradient sums over them."""
    stretched = {a for d, a in zip(x.shape, axes) if d == 1 and shape[a] != 1}
    return tuple(i for i in range(len(shape)) if i not in axes or i in stretched)


def _broadcast_vjp(b, g, y, x, shape, axes):
    summed = b.sum(g, broadcast_sum_axes(x.type, shape, axes))
    return (b.reshape(summed, x.shape),)


BROADCAST = register(OpDef("broadcast", Kind.MOVEMENT, _broadcast_infer, _broadcast_ref,
                           _broadcast_vjp, 1, attrs=("shape", "axes")))


# slice ------------------------------------------------------------------------------
def _slice_len(start: int, stop: int, step: int) -> int:
    return max(0, -(-(stop - start) // step))


def _slice_infer(x: TensorType, starts: tuple, stops: tuple, steps: tuple) -> TensorType:
    if not len(starts) == len(stops) == len(steps) == x.rank:
        raise ShapeError(f"slice: need one start/stop/step per axis of {x}")
    out = []
    for d, s, e, st in zip(x.shape, starts, stops, steps):
        if not isinstance(d, int):
            if (s, e, st) != (0, d, 1):
                raise ShapeError(f"slice: the symbolic dimension {d} of {x} can only be taken whole")
            out.append(d)
            continue
        if st < 1 or not 0 <= s < e <= d:
            raise ShapeError(f"slice {s}:{e}:{st} is empty or out of range for dimension {d} of {x}")
        out.append(_slice_len(s, e, st))
    return x.with_shape(tuple(out))


def _slice_ref(x, starts, stops, steps):
    return x[tuple(slice(int(s), int(e), int(st)) for s, e, st in zip(starts, stops, steps))]


def _slice_vjp(b, g, y, x, starts, stops, steps):
    his = tuple(d - s - (n - 1) * st - 1 if isinstance(d, int) else 0
                for d, n, s, st in zip(x.shape, y.shape, starts, steps))
    return (b.pad(g, tuple(starts), his, tuple(st - 1 for st in steps)),)


SLICE = register(OpDef("slice", Kind.MOVEMENT, _slice_infer, _slice_ref, _slice_vjp, 1,
                       attrs=("starts", "stops", "steps")))


# pad --------------------------------------------------------------------------------
# pad(x, lo, hi, interior, value): `interior` elements between neighbours, then lo/hi
# at the ends (XLA's pad without negative amounts). The gradient of a strided slice.
def _pad_infer(x: TensorType, lo: tuple, hi: tuple, interior: tuple, value: float = 0.0) -> TensorType:
    if not len(lo) == len(hi) == len(interior) == x.rank or min(lo + hi + interior, default=0) < 0:
        raise ShapeError(f"pad: need non-negative lo/hi/interior per axis of {x}")
    out = []
    for d, l, h, i in zip(x.shape, lo, hi, interior):
        if not isinstance(d, int):
            if (l, h, i) != (0, 0, 0):
                raise ShapeError(f"pad: the symbolic dimension {d} of {x} cannot be padded")
            out.append(d)
        else:
            out.append(l + h + d + max(d - 1, 0) * i)
    return x.with_shape(tuple(out))


def _pad_ref(x, lo, hi, interior, value=0.0):
    shape = [l + h + d + max(d - 1, 0) * i for d, l, h, i in zip(x.shape, lo, hi, interior)]
    out = np.full(shape, value, dtype=x.dtype)
    out[tuple(slice(l, l + (d - 1) * (i + 1) + 1 if d else l, i + 1)
              for d, l, i in zip(x.shape, lo, interior))] = x
    return out


def _pad_vjp(b, g, y, x, lo, hi, interior, value=0.0):
    stops = tuple(l + (d - 1) * (i + 1) + 1 if isinstance(d, int) else d
                  for d, l, i in zip(x.shape, lo, interior))
    return (b.slice(g, tuple(lo), stops, tuple(i + 1 for i in interior)),)


PAD = register(OpDef("pad", Kind.MOVEMENT, _pad_infer, _pad_ref, _pad_vjp, 1,
                     attrs=("lo", "hi", "interior", "value")))


# concat -----------------------------------------------------------------------------
def _dim_sum(dims: list) -> object:
    """Sum of static dims, or of multiples of one symbol product (B + B = 2*B); else None."""
    if all(isinstance(d, int) for d in dims):
        return sum(dims)
    if all(isinstance(d, Sym) for d in dims) and len({d.names for d in dims}) == 1:
        return Sym(sum(d.coeff for d in dims), dims[0].names)
    return None


def _concat_infer(*xs: TensorType, axis: int) -> TensorType:
    if not xs:
        raise ShapeError("concat needs at least one operand")
    first = xs[0]
    if not 0 <= axis < first.rank:
        raise ShapeError(f"concat: axis {axis} out of range for {first}")
    for t in xs:
        if t.dtype != first.dtype or t.rank != first.rank or any(
                a != c for i, (a, c) in enumerate(zip(t.shape, first.shape)) if i != axis):
            raise ShapeError(f"concat: cannot join {first} and {t} along axis {axis}")
    total = _dim_sum([t.shape[axis] for t in xs])
    if total is None:
        raise ShapeError(f"concat: cannot join {', '.join(str(t.shape[axis]) for t in xs)} along axis {axis}")
    shape = list(first.shape)
    shape[axis] = total
    return first.with_shape(tuple(shape))


def _concat_vjp(b, g, y, *xs, axis):
    out, offset = [], 0
    for x in xs:
        n = x.shape[axis]
        starts = tuple(offset if i == axis else 0 for i in range(y.type.rank))
        stops = tuple(offset + n if i == axis else d for i, d in enumerate(y.shape))
        out.append(b.slice(g, starts, stops, (1,) * y.type.rank))
        offset += n
    return tuple(out)


CONCAT = register(OpDef("concat", Kind.MOVEMENT, _concat_infer,
                        lambda *xs, axis: np.concatenate(xs, axis=axis), _concat_vjp, None,
                        attrs=("axis",)))
