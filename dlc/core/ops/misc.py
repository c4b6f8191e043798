"""Sources (input, const, iota, size, random) and gathers (take, scatter_add)."""
from __future__ import annotations

import numpy as np

from dlc.core.types import DType, ShapeError, TensorType
from dlc.core.ops.base import Kind, OpDef, register

# input: a value supplied to the graph each run. role is one of
#   data (the batch), label, param (trained), state (running statistics, optimizer
#   moments, the step counter), hyper (the learning rate): the step writes new values
#   for params and state.
ROLES = ("data", "label", "param", "state", "hyper")


def _input_infer(name: str, role: str, type: TensorType) -> TensorType:
    if role not in ROLES:
        raise ShapeError(f"input {name}: unknown role {role!r}")
    return type


def _no_ref(**attrs):
    raise RuntimeError("inputs are supplied by the caller")


INPUT = register(OpDef("input", Kind.SOURCE, _input_infer, _no_ref, None, 0,
                       attrs=("name", "role", "type")))

# const: a literal array (a scalar unless constant folding made it bigger). Float values
# are kept in float64, so a float64 run of an f32 graph computes with the exact constant.
CONST = register(OpDef("const", Kind.SOURCE,
                       lambda value, dtype: TensorType(dtype, tuple(np.shape(value))),
                       lambda value, dtype: np.asarray(value), None, 0,
                       attrs=("value", "dtype")))


def _iota_infer(shape: tuple, axis: int, dtype: DType) -> TensorType:
    if not 0 <= axis < len(shape):
        raise ShapeError(f"iota: axis {axis} out of range for {list(shape)}")
    return TensorType(dtype, tuple(shape))


def _iota_ref(shape, axis, dtype):
    shape = [int(d) for d in shape]
    idx = np.arange(shape[axis], dtype=dtype.np).reshape([-1 if i == axis else 1 for i in range(len(shape))])
    return np.broadcast_to(idx, shape)


# iota: the index along `axis` at every position (one-hot encodings compare against it).
IOTA = register(OpDef("iota", Kind.SOURCE, _iota_infer, _iota_ref, None, 0,
                      attrs=("shape", "axis", "dtype")))


# size(x, axes): the number of elements of x along `axes`, as an f32 scalar. It reads only
# the shape, so a mean over a symbolic batch is sum / size; once shapes are known it folds.
def _size_infer(x: TensorType, axes: tuple[int, ...]) -> TensorType:
    if any(not 0 <= a < x.rank for a in axes) or len(set(axes)) != len(axes):
        raise ShapeError(f"size: bad axes {list(axes)} for {x}")
    return TensorType(DType.f32, ())


SIZE = register(OpDef("size", Kind.SOURCE, _size_infer,
                      lambda x, axes: np.array(np.prod([x.shape[a] for a in axes]), dtype=np.float32),
                      lambda b, g, y, x, axes: (None,), 1, attrs=("axes",)))


# random(seed, step[, first[, total]], shape, stream[, axis]): uniform [0, 1) from a
# counter-based hash of (seed, stream, step, element index): reproducible, and the same in
# every backend. Element indices are row-major positions in the tensor -- or, given `first`
# (an i32 scalar), in a larger tensor of which this one is the slice first.. along `axis`
# (default 0), that axis being `total` long there (an i32 scalar; needed unless axis is 0,
# where it changes nothing). A data-parallel rank that holds samples first.. of a global
# batch of `total` so draws exactly what one process draws for them.
_M1, _M2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)


def fmix32(h: np.ndarray) -> np.ndarray:
    """murmur3's finalizer: a bijective mix of 32-bit integers."""
    h = np.asarray(h, dtype=np.uint32)
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint32(16))
        h = h * _M1
        h = h ^ (h >> np.uint32(13))
        h = h * _M2
        return h ^ (h >> np.uint32(16))


GOLDEN = 0x9E3779B1


def random_key(seed, step, stream: int) -> np.uint32:
    with np.errstate(over="ignore"):
        s = np.uint32(np.int64(seed) & 0xFFFFFFFF)
        t = np.uint32(np.int64(step) & 0xFFFFFFFF)
        return fmix32(s ^ fmix32(np.uint32(stream) ^ fmix32(t)))


def uniform_bits(key: np.uint32, n: int, start: int = 0) -> np.ndarray:
    """Bits of elements start .. start + n - 1 (indices taken modulo 2**32)."""
    return bits_at(key, np.arange(n, dtype=np.int64) + int(start))


def bits_at(key: np.uint32, index: np.ndarray) -> np.ndarray:
    """Bits of the elements numbered `index` (taken modulo 2**32)."""
    with np.errstate(over="ignore"):
        idx = (np.asarray(index, np.int64) & 0xFFFFFFFF).astype(np.uint32) * np.uint32(GOLDEN)
        return fmix32(idx ^ key)


def _random_infer(seed: TensorType, step: TensorType, *place: TensorType, shape: tuple,
                  stream: int, axis: int = 0) -> TensorType:
    scalar = TensorType(DType.i32, ())
    if seed != scalar or step != scalar:
        raise ShapeError("random: seed and step must be i32 scalars")
    if len(place) > 2 or any(t != scalar for t in place):
        raise ShapeError("random: the first index and the total length of the slice axis must be i32 scalars")
    if (place or axis) and not 0 <= axis < len(shape):
        raise ShapeError(f"random: slice axis {axis} out of range for {list(shape)}")
    if axis and len(place) < 2:
        raise ShapeError("random: a slice along an axis other than 0 needs the axis's total length")
    return TensorType(DType.f32, tuple(shape))


def _random_ref(seed, step, *place, shape=None, stream=None, axis=0):
    if shape is None:  # called as (seed, step, shape, stream), without a slice
        (shape, stream), place = place, ()
    shape = [int(d) for d in shape]
    key = random_key(seed, step, stream)
    if not place:
        bits = uniform_bits(key, int(np.prod(shape)))
    else:
        index = np.indices(shape, dtype=np.int64)
        index[axis] += int(place[0])
        whole = list(shape)
        if len(place) > 1:
            whole[axis] = int(place[1])
        flat = np.zeros(shape, np.int64)
        for i, d in zip(index, whole):
            flat = flat * d + i
        bits = bits_at(key, flat)
    return ((bits >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)).reshape(shape)


RANDOM = register(OpDef("random", Kind.SOURCE, _random_infer, _random_ref,
                        lambda b, g, y, seed, step, *place, **a: (None, None) + (None,) * len(place), None,
                        attrs=("shape", "stream", "axis")))


# take(table, idx) = table[idx]: rows of `table` picked by integer indices (embedding).
def _take_infer(table: TensorType, idx: TensorType) -> TensorType:
    if idx.dtype != DType.i32 or table.rank < 1:
        raise ShapeError(f"take: needs a table and i32 indices, got {table} and {idx}")
    return table.with_shape(tuple(idx.shape) + tuple(table.shape[1:]))


def _take_vjp(b, g, y, table, idx):
    return b.emit(SCATTER_ADD, (g, idx), rows=table.shape[0]), None


TAKE = register(OpDef("take", Kind.GATHER, _take_infer,
                      lambda table, idx: table[np.clip(idx, 0, table.shape[0] - 1)], _take_vjp, 2))


# scatter_add(g, idx, rows): zeros[rows, ...] with g[i] added at row idx[i].
def _scatter_infer(g: TensorType, idx: TensorType, rows: int) -> TensorType:
    if idx.dtype != DType.i32 or tuple(g.shape[:idx.rank]) != tuple(idx.shape):
        raise ShapeError(f"scatter_add: values {g} do not match indices {idx}")
    return g.with_shape((rows,) + tuple(g.shape[idx.rank:]))


def _scatter_ref(g, idx, rows):
    out = np.zeros((rows,) + g.shape[idx.ndim:], dtype=g.dtype)
    np.add.at(out, np.clip(idx, 0, rows - 1), g)
    return out


SCATTER_ADD = register(OpDef("scatter_add", Kind.GATHER, _scatter_infer, _scatter_ref,
                             lambda b, c, y, g, idx, rows: (b.emit(TAKE, (c, idx)), None), 2,
                             attrs=("rows",)))
