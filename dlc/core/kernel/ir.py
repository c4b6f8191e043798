"""The kernel IR: loop nests over buffers, the contract between the driver and every backend.

The driver lowers a fused, memory-planned graph to a KernelProgram (passes/schedule.py);
a backend renders and runs it and knows nothing else of the compiler. What a backend
must honour:

Buffers. Every array the step touches is a Buffer: an `input` (data, labels, hyper-
parameters such as the learning rate; read only), `state` (parameters and optimizer
state, updated in place) or `arena` (working memory at a byte `offset` of one arena of
`KernelProgram.arena_bytes`). Elements are in row-major order; bools are one byte.

Index expressions (Ix) are integers over loop variables: Var, Const, Add, Mul (by an
integer constant, either sign), Div and Mod (floor division and its remainder by a
positive constant, as Python's // and %), Clamp (to a constant range) and Gather (an
integer scalar expression used as an index: the rows of an embedding). Each node knows
the range of values it can take (`lo`..`hi`), so a renderer can use unsigned
arithmetic where values are never negative. Every index used to address memory is
within its buffer.

Scalar expressions (Ex) compute one element: Load (a buffer at an index), Lit (a
constant), Index (an index expression's value as a scalar), Op (one of SCALAR_OPS, the
closed set every backend renders: a test fails when a registered backend misses one),
Rand (counter-based uniform random numbers in [0, 1): murmur3's finalizer of the seed,
step, stream and element index — bit-exact with dlc.core.ops.misc) and Reduce (sum, max
or argmax of a body over reduction variables; argmax gives the first maximum in
row-major order of the variables, and a NaN counts as the maximum).

Both kinds are hash-consed by `Exprs`: structurally equal expressions are one object,
so a renderer can cache emitted values by identity (`id(e)`).

Kernels. A Kernel is a list of parts that every worker runs in order; kernels of the
same `phase` are independent, and a barrier separates phases (all of phase p completes
before any of phase p+1 starts). A part is a LoopNest, a Template (kernel/templates.py)
or a Collective.
Two parts of one kernel may depend on each other only element by element over the same
domain (a template's epilogue reads the template's output at the element it writes, and
runs over the same share of the work).

A LoopNest states its parallel axes: the `outer` loops' flattened iteration space is
divided between workers (a CPU thread takes a contiguous range; a GPU maps it to the
grid); the `inner` loops run in order inside each outer iteration. `row_stores` run once
per outer iteration (their index depends on outer variables only), `stores` once per
inner iteration. A nest with no outer loops, or marked `serial` (too little work to share
out), runs on one worker. Within one iteration every value is computed before anything is
stored, so an in-place update never reads a value the same iteration overwrote.

A Collective is an exchange between the processes of a data-parallel job (steps compiled
for several ranks have them, and so does batchnorm(sync=true)). It runs no loops: one
worker (worker 0) hands it to the host runtime -- a call back into the process that runs
the step, with the part's `bucket` number (the runtime learns the buffers of each bucket
from the program) -- and the other workers skip it. "allreduce" writes to each
`targets[i]` the element-wise sum over the ranks of `sources[i]` (dlc/core/collective.py:
in rank order, bit-identical in every rank; in a job of one process, the value itself).
In mode "sync" the targets are valid when the call returns. In mode "start" the call only
begins the exchange, and a later part of the same bucket in mode "wait" (in the same or a
later phase) finishes it: the start reads the sources (their memory may hold other values
after the start's phase: a host that sends later keeps a copy), and the targets are valid
only after the wait. Every rank runs a program with the same buckets in the same order
(whatever its batch size), so the exchanges meet one to one. A backend that cannot call
its host from a step leaves `Backend.collectives` False, and the driver refuses
data-parallel jobs on it with a message.

Loops. An entry of `KernelProgram.kernels` is a Kernel or a Loop: the sequential loop of
a recurrent layer (a `scan`). A Loop has a phase like a Kernel and runs as one unit in it
(other entries of its phase are independent of it). Its `var` is the time index t, a Var
of extent T bound by the loop, not by a nest: t takes the values 0, 1, ..., T-1, or
T-1, ..., 0 when `reverse`. Each iteration runs the loop's `body` -- Kernels and nested
Loops, phases numbered from 0 within the body -- in phase order with a barrier between
phases, and a barrier ends every iteration (the next one reads what this one wrote):

    for t in (reversed(range(T)) if reverse else range(T)):
        bind every view in `views` at t
        body phase 0 | barrier | body phase 1 | ... | barrier

t appears only in the `at` of views, so body kernels are ordinary kernels over ordinary
buffers: a renderer computes each view's address once per iteration (a pointer argument
on the CPU; on a GPU each launch passes t and the kernel adds at(t) to the base), and
every part -- templates too -- is rendered as outside a loop. A view is a Buffer of kind
`view`: the window of `shape` starting at element `at` of its `base` buffer (an index
expression over the variables of the loops enclosing the view's use; the base may be a
view of an enclosing loop). A loop lists its views in `views`; a view's window is inside
its base for every t. A loop body holds no Collective. Through
views an iteration reads this step's slice xs[t] of a time-major sequence, the carry
written by the previous iteration, and writes the carry for the next one and its per-step
outputs at [t]; the body's own temporaries are arena buffers reused by every iteration.

After the last phase the program's `copies` run (updates that could not be planned in
place), then `outputs` are read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dlc.core.types import DType

INT_MIN, INT_MAX = -(2 ** 31), 2 ** 31 - 1


# --- index expressions --------------------------------------------------------------------

class Ix:
    """An integer index expression; `lo`/`hi`: the smallest and largest value it takes."""

    __slots__ = ()
    lo: int
    hi: int

    def __repr__(self) -> str:
        from dlc.core.kernel.text import format_ix
        return format_ix(self)


def _node(cls):
    """A hash-consed IR node: no structural __eq__ (identity is equality), slots, frozen."""
    return dataclass(frozen=True, eq=False, slots=True, repr=False)(cls)


@_node
class Var(Ix):
    name: str
    extent: int
    lo: int = 0
    hi: int = 0


@_node
class Const(Ix):
    value: int
    lo: int = 0
    hi: int = 0


@_node
class Add(Ix):
    a: Ix
    b: Ix
    lo: int = 0
    hi: int = 0


@_node
class Mul(Ix):
    a: Ix
    c: int
    lo: int = 0
    hi: int = 0


@_node
class Div(Ix):
    """floor(a / c), c > 0"""
    a: Ix
    c: int
    lo: int = 0
    hi: int = 0


@_node
class Mod(Ix):
    """a - c * floor(a / c), in [0, c)"""
    a: Ix
    c: int
    lo: int = 0
    hi: int = 0


@_node
class Clamp(Ix):
    """min(max(a, lo), hi)"""
    a: Ix
    lo: int = 0
    hi: int = 0


@_node
class Gather(Ix):
    """An integer scalar expression used as an index (its value is data)."""
    value: "Ex"
    lo: int = INT_MIN
    hi: int = INT_MAX


def _linear(*parts: Ix) -> tuple[list, int]:
    """The sum of the parts as ([(atom, coefficient), ...] in the order met, constant), its
    atoms the subexpressions that are not Add, Mul or Const."""
    coef: dict[int, list] = {}
    const = 0

    def walk(e: Ix, k: int) -> None:
        nonlocal const
        if isinstance(e, Add):
            walk(e.a, k)
            walk(e.b, k)
        elif isinstance(e, Mul):
            walk(e.a, k * e.c)
        elif isinstance(e, Const):
            const += k * e.value
        else:
            coef.setdefault(id(e), [e, 0])[1] += k
    for part in parts:
        walk(part, 1)
    return [(e, k) for e, k in coef.values() if k], const


def ix_children(e: Ix) -> tuple:
    if isinstance(e, (Add,)):
        return (e.a, e.b)
    if isinstance(e, (Mul, Div, Mod, Clamp)):
        return (e.a,)
    return ()


# --- scalar expressions -------------------------------------------------------------------

class Ex:
    """A scalar expression of one dtype."""

    __slots__ = ()
    dtype: DType

    def __repr__(self) -> str:
        from dlc.core.kernel.text import format_ex
        return format_ex(self)


@dataclass(frozen=True)
class Buffer:
    """A named array the kernels read or write (see the module docstring for `kind`):
    input, state, arena (at byte `offset`), or view (inside a loop body: the window at
    element `at` of `base`)."""

    name: str
    dtype: DType
    shape: tuple
    kind: str
    offset: int = 0
    base: "Buffer | None" = None
    at: "Ix | None" = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@_node
class Load(Ex):
    buf: Buffer
    index: Ix
    dtype: DType = DType.f32


@_node
class Lit(Ex):
    value: Any
    dtype: DType = DType.f32


@_node
class Index(Ex):
    """The value of an index expression, as a scalar of `dtype` (i32, f32, bool: != 0)."""
    ix: Ix
    dtype: DType = DType.i32


@_node
class Op(Ex):
    name: str              # a key of SCALAR_OPS
    args: tuple
    dtype: DType = DType.f32


@_node
class Rand(Ex):
    seed: Ex               # i32 scalar
    step: Ex               # i32 scalar
    stream: int
    flat: Ix               # the element's index in the random tensor
    dtype: DType = DType.f32


@_node
class Reduce(Ex):
    op: str                # sum | max | argmax
    vars: tuple            # Var, outermost first
    body: Ex
    dtype: DType = DType.f32


def ex_children(e: Ex) -> tuple:
    """Sub-expressions (scalar ones) an expression reads."""
    if isinstance(e, Op):
        return e.args
    if isinstance(e, Rand):
        return (e.seed, e.step)
    if isinstance(e, Reduce):
        return (e.body,)
    return ()


@dataclass(frozen=True)
class ScalarOp:
    arity: int
    meaning: str


# The closed set of scalar operations. Semantics follow numpy on the operands' dtype
# (`in` below: the dtype of the last operand; of the 2nd and 3rd for select).
SCALAR_OPS: dict[str, ScalarOp] = {
    "add": ScalarOp(2, "a + b"),
    "sub": ScalarOp(2, "a - b"),
    "mul": ScalarOp(2, "a * b"),
    "div": ScalarOp(2, "a / b; floor division for integers"),
    "neg": ScalarOp(1, "-a"),
    "abs": ScalarOp(1, "|a|"),
    "sign": ScalarOp(1, "-1, 0 or 1 (NaN stays NaN)"),
    "max": ScalarOp(2, "numpy.maximum: NaN if either is NaN"),
    "min": ScalarOp(2, "numpy.minimum: NaN if either is NaN"),
    "exp": ScalarOp(1, "e^a (float)"),
    "log": ScalarOp(1, "natural logarithm (float)"),
    "sqrt": ScalarOp(1, "square root (float)"),
    "tanh": ScalarOp(1, "hyperbolic tangent (float)"),
    "sigmoid": ScalarOp(1, "1 / (1 + e^-a) (float)"),
    "pow": ScalarOp(2, "a ** b (float)"),
    "lt": ScalarOp(2, "a < b -> bool"),
    "le": ScalarOp(2, "a <= b -> bool"),
    "gt": ScalarOp(2, "a > b -> bool"),
    "ge": ScalarOp(2, "a >= b -> bool"),
    "eq": ScalarOp(2, "a == b -> bool"),
    "ne": ScalarOp(2, "a != b -> bool (true when either is NaN)"),
    "and": ScalarOp(2, "a and b (bools)"),
    "select": ScalarOp(3, "b if a else c"),
    "cast": ScalarOp(1, "a converted to the expression's dtype (float -> int truncates)"),
    "copy": ScalarOp(1, "a"),
}


class Exprs:
    """Hash-consing constructors with local simplification: equal expressions are one
    object, and index arithmetic is folded where its ranges allow."""

    def __init__(self):
        self._table: dict[tuple, Any] = {}

    def _make(self, cls, *args, lo=None, hi=None):
        # (the bounds are part of the key: clamp(x, 0, 1) and clamp(x, 0, 2) are two indices)
        key = (cls, lo, hi) + tuple(id(a) if isinstance(a, (Ix, Ex)) else a for a in args)
        hit = self._table.get(key)
        if hit is None:
            extra = {} if lo is None else {"lo": lo, "hi": hi}
            hit = self._table[key] = cls(*args, **extra)
        return hit

    # --- indices
    def var(self, name: str, extent: int) -> Var:
        return self._make(Var, name, int(extent), lo=0, hi=int(extent) - 1)

    def const(self, v: int) -> Const:
        v = int(v)
        return self._make(Const, v, lo=v, hi=v)

    def add(self, a: Ix, b: Ix, regroup: bool = True) -> Ix:
        if isinstance(a, Const) and isinstance(b, Const):
            return self.const(a.value + b.value)
        if isinstance(a, Const) and a.value == 0:
            return b
        if isinstance(b, Const) and b.value == 0:
            return a
        if isinstance(b, Const) and isinstance(a, Add) and isinstance(a.b, Const):  # (x + c1) + c2
            return self.add(a.a, self.const(a.b.value + b.value))
        if regroup and any(isinstance(e, Mod) or (isinstance(e, Mul) and isinstance(e.a, Mod)) for e in (a, b)):
            joined = self._regroup(a, b)
            if joined is not None:
                return joined
        return self._make(Add, a, b, lo=a.lo + b.lo, hi=a.hi + b.hi)

    def _regroup(self, a: Ix, b: Ix) -> Ix | None:
        """a + b with every k*c*(y // c) + k*(y % c) in the sum joined into k*y (a reshape's
        unravel, raveled again: the index it started from); None when there is none."""
        terms, const = _linear(a, b)
        coef = {id(e): [e, k] for e, k in terms}
        joined = False
        while (hit := self._joinable(coef)) is not None:
            mod, k, quotient, rest = hit
            for q, _ in quotient:
                del coef[id(q)]
            del coef[id(mod)]
            whole, extra = _linear(mod.a)  # k*y, where y = c*(y // c) + y % c
            const += k * (extra - mod.c * rest)
            for y, ky in whole:
                coef.setdefault(id(y), [y, 0])[1] += k * ky
            joined = True
        return self._sum([(e, k) for e, k in coef.values() if k], const) if joined else None

    def _joinable(self, coef: dict):
        """A term k*(y % c) of the sum {id: [atom, coefficient]} whose k*c*(y // c) is in it too:
        (the Mod, k, the terms of y // c, its constant), or None."""
        for e, k in coef.values():
            if isinstance(e, Mod) and k:
                quotient, rest = _linear(self.div(e.a, e.c))
                if all(id(q) in coef and coef[id(q)][1] == k * e.c * kq for q, kq in quotient):
                    return e, k, quotient, rest
        return None

    def mul(self, a: Ix, c: int) -> Ix:
        c = int(c)
        if c == 0 or (isinstance(a, Const) and a.value == 0):
            return self.const(0)
        if c == 1:
            return a
        if isinstance(a, Const):
            return self.const(a.value * c)
        if isinstance(a, Mul):
            return self.mul(a.a, a.c * c)
        lo, hi = sorted((a.lo * c, a.hi * c))
        return self._make(Mul, a, c, lo=lo, hi=hi)

    def sub(self, a: Ix, b: Ix) -> Ix:
        return self.add(a, self.mul(b, -1))

    def div(self, a: Ix, c: int) -> Ix:
        if c == 1:
            return a
        if isinstance(a, Const):
            return self.const(a.value // c)
        if a.lo >= 0 and a.hi < c:
            return self.const(0)
        if isinstance(a, Mul) and a.c % c == 0:
            return self.mul(a.a, a.c // c)
        if isinstance(a, Div):  # (x // c1) // c = x // (c1*c)
            return self.div(a.a, a.c * c)
        split = self._split(a, c)
        if split is not None:  # (c*q + r) // c = q + r // c (floor division, any integers)
            return self.add(split[0], self.div(split[1], c))
        return self._make(Div, a, c, lo=a.lo // c, hi=a.hi // c)

    def mod(self, a: Ix, c: int) -> Ix:
        if c == 1:
            return self.const(0)
        if isinstance(a, Const):
            return self.const(a.value % c)
        if a.lo >= 0 and a.hi < c:
            return a
        if isinstance(a, Mul) and a.c % c == 0:
            return self.const(0)
        if isinstance(a, Mod) and a.c % c == 0:  # (x % (k*c)) % c = x % c
            return self.mod(a.a, c)
        split = self._split(a, c)
        if split is not None:  # (c*q + r) % c = r % c
            return self.mod(split[1], c)
        return self._make(Mod, a, c, lo=0, hi=c - 1)

    def _split(self, a: Ix, c: int):
        """a as c*q + r: q the terms of a's sum whose coefficients c divides, over c (and the
        constant's multiple of c), r the rest; None when q would be 0. A reshape's index
        (a raveled permutation of an unraveled index) is such a sum, and splitting it lets
        the range rules drop the parts a division or remainder cannot see."""
        terms, const = _linear(a)
        q = [(atom, k // c) for atom, k in terms if k % c == 0]
        if not q and const // c == 0:
            return None
        r = [(atom, k) for atom, k in terms if k % c]
        return self._sum(q, const // c), self._sum(r, const % c)

    def _sum(self, terms, const: int) -> Ix:
        out = self.const(0)
        for atom, k in terms:
            out = self.add(out, self.mul(atom, k), regroup=False)
        return self.add(out, self.const(const), regroup=False)

    def clamp(self, a: Ix, lo: int, hi: int) -> Ix:
        if a.lo >= lo and a.hi <= hi:
            return a
        if isinstance(a, Const):
            return self.const(min(max(a.value, lo), hi))
        return self._make(Clamp, a, lo=lo, hi=hi)

    def shift(self, a: Ix, lo: int, step: int, n: int) -> Ix:
        """clamp((a - lo) // step, 0, n - 1): the source index of a padded or dilated axis."""
        return self.clamp(self.div(self.add(a, self.const(-lo)), step), 0, n - 1)

    def gather(self, value: "Ex", rows: int) -> Ix:
        """An index read from data, clamped into [0, rows)."""
        return self.clamp(self._make(Gather, value, lo=INT_MIN, hi=INT_MAX), 0, rows - 1)

    def data_index(self, value: "Ex", lo: int = INT_MIN, hi: int = INT_MAX) -> Ix:
        """An integer scalar expression's value as an index, unclamped: the caller knows
        it lies in lo..hi (a random tensor's first global row, say)."""
        return self._make(Gather, value, lo=lo, hi=hi)

    def ravel(self, index, shape) -> Ix:
        out = self.const(0)
        for i, d in zip(index, shape):
            out = self.add(self.mul(out, d), i)
        return out

    def unravel(self, flat: Ix, shape) -> tuple:
        out = []
        for d in reversed(shape):
            out.append(self.mod(flat, d))
            flat = self.div(flat, d)
        return tuple(reversed(out))

    # --- scalars
    def load(self, buf: Buffer, flat: Ix) -> Load:
        return self._make(Load, buf, flat, buf.dtype)

    def lit(self, value, dtype: DType) -> Lit:
        return self._make(Lit, value, dtype)

    def index(self, ix: Ix, dtype: DType) -> Index:
        return self._make(Index, ix, dtype)

    def op(self, name: str, args, dtype: DType) -> Op:
        spec = SCALAR_OPS[name]
        if len(args) != spec.arity:
            raise ValueError(f"scalar op {name} takes {spec.arity} operands, got {len(args)}")
        return self._make(Op, name, tuple(args), dtype)

    def rand(self, seed: Ex, step: Ex, stream: int, flat: Ix) -> Rand:
        return self._make(Rand, seed, step, stream, flat, DType.f32)

    def reduce(self, op: str, vars_: tuple, body: Ex, dtype: DType) -> Reduce:
        return self._make(Reduce, op, tuple(vars_), body, dtype)


# --- kernels ---------------------------------------------------------------------------------

@dataclass
class Store:
    buf: Buffer
    flat: Ix
    value: Ex


@dataclass
class LoopNest:
    """See the module docstring: `outer` loops are shared out between workers, `inner`
    loops run in order inside each; row stores once per outer iteration."""

    outer: tuple                  # Var, in loop order
    inner: tuple                  # Var, in loop order
    row_stores: list[Store] = field(default_factory=list)
    stores: list[Store] = field(default_factory=list)
    serial: bool = False          # too little work to share out: one worker runs it

    @property
    def vars(self) -> tuple:
        return tuple(self.outer) + tuple(self.inner)


@dataclass
class Template:
    """A part with a documented meaning (kernel/templates.py: TEMPLATES) that a backend may
    render with dedicated code; `expand_templates` gives every kind as plain loop nests."""

    op: str                       # a key of TEMPLATES
    inputs: tuple                 # Buffers
    output: Buffer
    attrs: dict
    epilogue: LoopNest | None = None  # elementwise over the output's shape, after it


@dataclass
class Collective:
    """An exchange between the ranks of a data-parallel job (see the module docstring)."""

    op: str                       # allreduce
    sources: tuple                # Buffers
    targets: tuple                # Buffers, of the sources' shapes and dtypes
    bucket: int                   # the host call's argument: which exchange of the program
    mode: str = "sync"            # sync | start | wait

    @property
    def nbytes(self) -> int:
        return sum(b.size * b.dtype.np.itemsize for b in self.sources)


COLLECTIVE_MODES = ("sync", "start", "wait")


@dataclass
class Kernel:
    name: str
    phase: int
    parts: list                   # LoopNest | Template | Collective
    lines: tuple = ()             # .dln locations this kernel came from


@dataclass
class Loop:
    """A sequential loop (see the module docstring): for each value of `var` in order
    (descending when `reverse`), the `views` bound at it, then the `body` in phase order
    with a barrier after every phase."""

    name: str
    phase: int
    var: Var                      # the time index t, extent T
    reverse: bool
    body: list                    # Kernel | Loop, phases numbered from 0
    views: tuple = ()             # Buffers of kind "view" the body uses
    lines: tuple = ()

    @property
    def phases(self) -> int:
        return 1 + max((k.phase for k in self.body), default=-1)


@dataclass
class KernelProgram:
    """The whole step: buffers, kernels and loops in phase order, where results are read."""

    kernels: list                 # Kernel | Loop
    buffers: dict[str, Buffer]
    arena_bytes: int
    outputs: dict[str, Buffer]    # result name -> buffer read after the step
    copies: list[tuple[Buffer, Buffer]]  # (from, to) after the step: updates not done in place
    inputs: dict[str, Buffer]     # data/label/hyper inputs
    state: dict[str, Buffer]      # params and state
