"""Tensor types: dtypes, shapes with symbolic dimensions, broadcasting and unification."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Union

import numpy as np


class DType(enum.Enum):
    f32 = "f32"
    f64 = "f64"
    i32 = "i32"
    bool = "bool"

    @property
    def np(self) -> np.dtype:
        return np.dtype({"f32": np.float32, "f64": np.float64, "i32": np.int32, "bool": np.bool_}[self.value])

    @property
    def is_float(self) -> bool:
        return self in (DType.f32, DType.f64)

    def __str__(self) -> str:
        return self.value

    @staticmethod
    def of(array: np.ndarray) -> "DType":
        kind = np.asarray(array).dtype
        if kind == np.bool_:
            return DType.bool
        if kind.kind in "iu":
            return DType.i32
        if kind == np.float64:
            return DType.f64
        return DType.f32


@dataclass(frozen=True, order=True)
class Sym:
    """A symbolic dimension: `coeff * name1 * name2 ...` (names sorted), e.g. `B` or `8*B`."""

    coeff: int
    names: tuple[str, ...]

    def __str__(self) -> str:
        body = "*".join(self.names)
        return body if self.coeff == 1 else f"{self.coeff}*{body}"


Dim = Union[int, Sym]
Shape = tuple  # tuple[Dim, ...]


def sym(name: str) -> Sym:
    return Sym(1, (name,))


FLOAT32_MAX = float(np.finfo(np.float32).max)


def dim_mul(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    ca, na = (a, ()) if isinstance(a, int) else (a.coeff, a.names)
    cb, nb = (b, ()) if isinstance(b, int) else (b.coeff, b.names)
    if ca * cb == 0:
        return 0
    return Sym(ca * cb, tuple(sorted(na + nb)))


def dim_div(a: Dim, b: Dim) -> Dim | None:
    """Exact quotient a / b, or None when it is not a whole dimension."""
    ca, na = (a, ()) if isinstance(a, int) else (a.coeff, a.names)
    cb, nb = (b, ()) if isinstance(b, int) else (b.coeff, b.names)
    if cb == 0 or ca % cb:
        return None
    rest = list(na)
    for n in nb:
        if n not in rest:
            return None
        rest.remove(n)
    return ca // cb if not rest else Sym(ca // cb, tuple(rest))


def numel(shape: Shape) -> Dim:
    total: Dim = 1
    for d in shape:
        total = dim_mul(total, d)
    return total


def is_static(shape: Shape) -> bool:
    return all(isinstance(d, int) for d in shape)


def substitute(d: Dim, bindings: dict[str, int]) -> Dim:
    """Replace bound symbols by their values."""
    if isinstance(d, int):
        return d
    out: Dim = d.coeff
    for n in d.names:
        out = dim_mul(out, bindings.get(n, sym(n)))
    return out


def shape_str(shape: Shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


class ShapeError(Exception):
    """A shape or dtype rule was violated. The frontend attaches the source span."""


@dataclass(frozen=True)
class TensorType:
    dtype: DType
    shape: Shape

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}{shape_str(self.shape)}" if self.shape else str(self.dtype)

    def with_shape(self, shape: Shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(dtype, self.shape)

    def specialize(self, bindings: dict[str, int]) -> "TensorType":
        return TensorType(self.dtype, tuple(substitute(d, bindings) for d in self.shape))


@dataclass(frozen=True)
class TupleType:
    """The type of a node with several results (a `scan`): never read as a tensor, only
    through projections (`scan_result`), each typed by one element."""

    elements: tuple[TensorType, ...]

    def __str__(self) -> str:
        return "(" + ", ".join(str(t) for t in self.elements) + ")"

    def specialize(self, bindings: dict[str, int]) -> "TupleType":
        return TupleType(tuple(t.specialize(bindings) for t in self.elements))


def type_dims(t: "TensorType | TupleType") -> tuple:
    """Every dimension a node's type mentions (all elements of a tuple)."""
    if isinstance(t, TupleType):
        return tuple(d for e in t.elements for d in e.shape)
    return tuple(t.shape)


def broadcast_shapes(a: Shape, b: Shape) -> Shape:
    """numpy broadcasting (right-aligned, size 1 stretches); ShapeError names both shapes."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else 1
        db = b[-i] if i <= len(b) else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            raise ShapeError(f"dimensions {da} and {db} differ (shapes broadcast when trailing "
                             f"dimensions are equal or 1)")
    return tuple(reversed(out))


def normalize_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise ShapeError(f"axis {axis} is out of range for a rank-{rank} tensor")
    return axis % rank if rank else 0


def unify(pattern: Shape, actual: Shape, bindings: dict[str, Dim]) -> str | None:
    """Bind the symbols of a declared shape to an actual shape.

    Returns None on success (bindings updated), else a message naming the mismatch.
    """
    if len(pattern) != len(actual):
        return f"expected rank {len(pattern)} {shape_str(pattern)}, got rank {len(actual)} {shape_str(actual)}"
    for p, a in zip(pattern, actual):
        if isinstance(p, Sym) and p.coeff == 1 and len(p.names) == 1:
            name = p.names[0]
            if name in bindings and bindings[name] != a:
                return f"dimension {name} is {bindings[name]} here but {a} elsewhere"
            bindings[name] = a
        elif p != a:
            return f"expected {shape_str(pattern)}, got {shape_str(actual)}"
    return None


def nbytes(t: "TensorType") -> int:
    """The bytes of a tensor of type t (a static shape)."""
    return t.dtype.np.itemsize * numel(t.shape)


def static_numel(shape: Shape) -> int:
    n = numel(shape)
    if not isinstance(n, int):
        raise ShapeError(f"shape {shape_str(shape)} is not static")
    return n


def prod(xs) -> int:
    return math.prod(xs)
