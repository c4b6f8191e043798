"""Kernel IR expressions -> CUDA C statements inside one kernel.

SCALAR_OPS is the one table from the kernel IR's scalar ops to CUDA C; IX_RULES and
EX_RULES map each node class to its rendering. Values are cached per C scope by
expression identity (the kernel IR is hash-consed), so a shared subexpression is
computed once: scalar values become `const` locals (`v12`), cheap index arithmetic stays
inline and divisions, remainders, clamps and gathers become locals (`ix3`).

Numerics follow numpy (as the LLVM backend does): max/min propagate NaN, integer
division floors, sign(NaN) is NaN, `ne` is true on NaN, float -> int casts truncate and
give INT_MIN for NaN and out-of-range values (numpy on x86), transcendental functions
are CUDA's precise ones (expf, logf, tanhf, powf; no fast math), Rand is bit-exact
with dlc.core.ops.misc's murmur3 mix. Index values are `int` where their range fits 32
bits and `long long` otherwise; divisions and remainders of values known to be
non-negative use unsigned arithmetic.

The helper functions the rendered code calls are in PRELUDE (one copy per module).
"""
from __future__ import annotations

import contextlib
import math
import re

import numpy as np

from dlc.core.kernel import (hoistable, Add, Clamp, Const, Div, FreeVars, Gather, Index, Lit, Load, Mod, Mul, Op, Rand,
                             Reduce, Var)
from dlc.core.kernel.ir import INT_MAX, INT_MIN
from dlc.core.types import DType

CTYPE = {DType.f32: "float", DType.f64: "double", DType.i32: "int", DType.bool: "bool"}
MEMTYPE = {DType.f32: "float", DType.f64: "double", DType.i32: "int", DType.bool: "unsigned char"}

PRELUDE = r"""// ---- dlc prelude: the kernel IR's scalar semantics (numpy's) and block reductions ----
#ifndef DLC_PRELUDE
#define DLC_PRELUDE 1
#define DLC_INF_F __int_as_float(0x7f800000)
#define DLC_NAN_F __int_as_float(0x7fc00000)
#define DLC_INF_D __longlong_as_double(0x7ff0000000000000LL)
#define DLC_NAN_D __longlong_as_double(0x7ff8000000000000LL)
#define DLC_INT_MIN (-2147483647 - 1)
#define DLC_INT_MAX 2147483647

// numpy.maximum / minimum: NaN if either is NaN, else the larger / smaller (b when equal)
template <class T> __device__ __forceinline__ T dlc_max(T a, T b) { return (a > b || a != a) ? a : b; }
template <class T> __device__ __forceinline__ T dlc_min(T a, T b) { return (a < b || a != a) ? a : b; }

// numpy.sign: -1, 0 or 1; NaN stays NaN
template <class T> __device__ __forceinline__ T dlc_sign(T a)
{
    return a > T(0) ? T(1) : a < T(0) ? T(-1) : a != a ? a : T(0);
}

// integer floor division and its remainder (Python's // and %); x // 0 is 0, as numpy gives
__device__ __forceinline__ int dlc_floordiv(int a, int b)
{
    if (b == 0) return 0;
    if (b == -1) return (int)(0u - (unsigned)a);  // INT_MIN // -1 wraps, as in numpy
    const int q = a / b, r = a % b;
    return q - (r != 0 && ((r ^ b) < 0));
}
__device__ __forceinline__ long long dlc_floordiv(long long a, long long b)
{
    const long long q = a / b, r = a % b;
    return q - (r != 0 && ((r ^ b) < 0));
}
__device__ __forceinline__ int dlc_floormod(int a, int b)
{
    const int r = a % b;
    return r != 0 && ((r ^ b) < 0) ? r + b : r;
}
__device__ __forceinline__ long long dlc_floormod(long long a, long long b)
{
    const long long r = a % b;
    return r != 0 && ((r ^ b) < 0) ? r + b : r;
}

// float -> int32 truncates; NaN and values out of range give INT_MIN (numpy on x86)
__device__ __forceinline__ int dlc_to_int(float x)
{
    return x >= -2147483648.0f && x < 2147483648.0f ? (int)x : DLC_INT_MIN;
}
__device__ __forceinline__ int dlc_to_int(double x)
{
    return x >= -2147483648.0 && x < 2147483648.0 ? (int)x : DLC_INT_MIN;
}

// 1 / (1 + e^-x) as {1, e^x} / (1 + e^-|x|): never 1/(1+inf), exact 0 and 1 at the ends
__device__ __forceinline__ float dlc_sigmoid(float x)
{
    const float z = expf(-fabsf(x));
    return (x < 0.0f ? z : 1.0f) / (1.0f + z);
}
__device__ __forceinline__ double dlc_sigmoid(double x)
{
    const double z = exp(-fabs(x));
    return (x < 0.0 ? z : 1.0) / (1.0 + z);
}

// counter-based uniforms in [0, 1): murmur3's finalizer of (seed, stream, step), then of
// the element index (bit-exact with dlc.core.ops.misc.random)
__device__ __forceinline__ unsigned dlc_fmix32(unsigned h)
{
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    return h ^ (h >> 16);
}
__device__ __forceinline__ float dlc_uniform(int seed, int step, unsigned stream, unsigned flat)
{
    const unsigned key = dlc_fmix32((unsigned)seed ^ dlc_fmix32(stream ^ dlc_fmix32((unsigned)step)));
    return (float)(dlc_fmix32(flat * 0x9e3779b1u ^ key) >> 8) * 5.9604644775390625e-08f;  // 2^-24
}

// argmax's update: the first maximum in index order wins, a NaN counts as the maximum
template <class T> __device__ __forceinline__ void dlc_argmax_step(T& best, int& at, T v, int i)
{
    if (v > best || (v != v && best == best) || ((v == best || (v != v && best != best)) && i < at)) {
        best = v;
        at = i;
    }
}

struct dlc_sum { template <class T> __device__ __forceinline__ static T apply(T a, T b) { return a + b; } };
struct dlc_maximum { template <class T> __device__ __forceinline__ static T apply(T a, T b) { return dlc_max(a, b); } };

// Every thread of the block brings a partial result; every thread gets the total back.
// The order is fixed (deterministic): a shuffle tree inside each warp, then one over the
// warps' results. blockDim.x is a power of two >= 32; smem holds 32 values; every
// thread of the block calls it.
template <class Op, class T> __device__ T dlc_block_reduce(T v, T* smem)
{
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int d = 16; d > 0; d /= 2) v = Op::apply(v, __shfl_down_sync(0xffffffffu, v, d));
    __syncthreads();  // an earlier reduction has read smem[0]
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    if (warp == 0) {
        if (lane < warps) v = smem[lane];
        for (int d = 16; d > 0; d /= 2) {
            const T o = __shfl_down_sync(0xffffffffu, v, d);
            if (lane + d < warps) v = Op::apply(v, o);
        }
        if (lane == 0) smem[0] = v;
    }
    __syncthreads();
    return smem[0];
}

// The block's argmax from each thread's (best, at): the index of the first maximum.
template <class T> __device__ int dlc_block_argmax(T best, int at, T* sv, int* si)
{
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int d = 16; d > 0; d /= 2) {
        const T v = __shfl_down_sync(0xffffffffu, best, d);
        const int i = __shfl_down_sync(0xffffffffu, at, d);
        dlc_argmax_step(best, at, v, i);
    }
    __syncthreads();
    if (lane == 0) {
        sv[warp] = best;
        si[warp] = at;
    }
    __syncthreads();
    if (warp == 0) {
        if (lane < warps) {
            best = sv[lane];
            at = si[lane];
        }
        for (int d = 16; d > 0; d /= 2) {
            const T v = __shfl_down_sync(0xffffffffu, best, d);
            const int i = __shfl_down_sync(0xffffffffu, at, d);
            if (lane + d < warps) dlc_argmax_step(best, at, v, i);
        }
        if (lane == 0) si[0] = at;
    }
    __syncthreads();
    return si[0];
}
#endif  // DLC_PRELUDE
"""


# --- literals and types --------------------------------------------------------------------------

def literal(value, dtype: DType) -> str:
    """A C literal of exactly the value the kernel IR means (floats rounded to the dtype)."""
    if dtype == DType.bool:
        return "true" if bool(value) else "false"
    if dtype == DType.i32:
        v = int(value)
        return "DLC_INT_MIN" if v == INT_MIN else f"({v})" if v < 0 else str(v)
    suffix, inf, nan = ("f", "DLC_INF_F", "DLC_NAN_F") if dtype == DType.f32 else ("", "DLC_INF_D", "DLC_NAN_D")
    v = float(np.float32(value)) if dtype == DType.f32 else float(value)
    if math.isnan(v):
        return nan
    if math.isinf(v):
        return inf if v > 0 else f"(-{inf})"
    text = str(np.float32(v)) if dtype == DType.f32 else repr(v)  # shortest round-trip form
    if not any(c in text for c in ".en"):
        text += ".0"
    return f"({text}{suffix})" if v < 0 or text.startswith("-") else f"{text}{suffix}"


def ix_type(e) -> str:
    """The C type of an index value: int where its range fits 32 bits."""
    return "int" if INT_MIN <= e.lo and e.hi <= INT_MAX else "long long"


def _int(v: int) -> str:
    return str(v) if INT_MIN < v <= INT_MAX else f"{v}LL"


# --- index expressions ---------------------------------------------------------------------------

def _widened(em, c, wide: bool) -> str:
    """c's C value, cast to long long when the expression around it computes in 64 bits."""
    text = em.ix(c)
    return f"(long long){atom(text)}" if wide and ix_type(c) == "int" else text


def _is_wide(e, *children) -> bool:
    return ix_type(e) != "int" or any(ix_type(c) != "int" for c in children)


def _narrow(e, text: str, wide: bool) -> str:
    return f"(int){atom(text)}" if wide and ix_type(e) == "int" else text


def atom(text: str) -> str:
    """text, parenthesized unless it is a name, a number or already one parenthesized unit."""
    if text.replace("_", "").replace(".", "").isalnum() or re.fullmatch(r"\((long long|int|unsigned)\)\w+", text):
        return text
    if text.startswith("(") and text.endswith(")"):
        depth = 0
        for i, c in enumerate(text):
            depth += c == "("
            depth -= c == ")"
            if depth == 0 and i < len(text) - 1:
                break
        else:
            return text
    return f"({text})"


def _add(em, e: Add) -> str:
    wide = _is_wide(e, e.a, e.b)
    a = _widened(em, e.a, wide)
    if isinstance(e.b, Const) and e.b.value < 0:
        text = f"{a} - {_int(-e.b.value)}"
    elif isinstance(e.b, Mul) and e.b.c == -1:
        text = f"{a} - {atom(_widened(em, e.b.a, wide))}"
    else:
        b = _widened(em, e.b, wide)
        text = f"{a} + {atom(b) if isinstance(e.b, Add) else b}"
    return _narrow(e, text, wide)


def _mul(em, e: Mul) -> str:
    wide = _is_wide(e, e.a)
    c = _int(e.c) if e.c >= 0 else f"({_int(e.c)})"
    return _narrow(e, f"{atom(_widened(em, e.a, wide))} * {c}", wide)


def _divmod(op: str, helper: str):
    def rule(em, e) -> str:
        wide = _is_wide(e, e.a)
        a = _widened(em, e.a, wide)
        if e.a.lo >= 0:  # never negative: unsigned arithmetic (cheaper; floor is truncation)
            text = f"(unsigned long long){atom(a)} {op} {e.c}ull" if wide else f"(unsigned){atom(a)} {op} {e.c}u"
        else:
            text = f"{helper}({a}, {e.c}LL)" if wide else f"{helper}({a}, {e.c})"
        return em.bind(ix_type(e), text, "ix")  # the value fits the local's type (its range)
    return rule


def _clamp(em, e: Clamp) -> str:
    wide = _is_wide(e, e.a)
    v = _widened(em, e.a, wide)
    bound = (lambda c: f"{c}LL") if wide else _int
    if e.a.lo < e.lo:
        v = f"max({v}, {bound(e.lo)})"
    if e.a.hi > e.hi:
        v = f"min({v}, {bound(e.hi)})"
    return em.bind(ix_type(e), v, "ix")


def _gather(em, e: Gather) -> str:
    v = em.value(e.value)
    return v if e.value.dtype == DType.i32 else f"dlc_to_int({v})" if e.value.dtype.is_float else f"(int){atom(v)}"


# kernel-IR index node -> C expression text
IX_RULES = {
    Var: lambda em, e: em.vars[e.name],
    Const: lambda em, e: _int(e.value) if e.value >= 0 else f"({_int(e.value)})",
    Add: _add,
    Mul: _mul,
    Div: _divmod("/", "dlc_floordiv"),
    Mod: _divmod("%", "dlc_floormod"),
    Clamp: _clamp,
    Gather: _gather,
}


# --- scalar ops ------------------------------------------------------------------------------------

def _fn(f32: str, f64: str, i32: str | None = None):
    """A function call chosen by the operand dtype."""
    def render(args, dtype, in_dtype):
        name = f32 if in_dtype == DType.f32 else f64 if in_dtype == DType.f64 else i32
        return f"{name}({', '.join(args)})"
    return render


def _infix(op: str):
    return lambda args, dtype, in_dtype: f"({args[0]} {op} {args[1]})"


def _div(args, dtype, in_dtype):
    return f"({args[0]} / {args[1]})" if in_dtype.is_float else f"dlc_floordiv({args[0]}, {args[1]})"


def _cast(args, dtype, in_dtype):
    a = args[0]
    if dtype == in_dtype:
        return a
    if dtype == DType.bool:
        return f"({a} != {literal(0, in_dtype)})"  # NaN != 0: true
    if dtype == DType.i32 and in_dtype.is_float:
        return f"dlc_to_int({a})"
    return f"({CTYPE[dtype]}){atom(a)}"


SCALAR_OPS = {
    "add": _infix("+"),
    "sub": _infix("-"),
    "mul": _infix("*"),
    "div": _div,
    "neg": lambda args, dtype, in_dtype: f"(-{args[0]})",
    "abs": _fn("fabsf", "fabs", "abs"),
    "sign": lambda args, dtype, in_dtype: f"dlc_sign({args[0]})",
    "max": lambda args, dtype, in_dtype: f"dlc_max({args[0]}, {args[1]})",
    "min": lambda args, dtype, in_dtype: f"dlc_min({args[0]}, {args[1]})",
    "exp": _fn("expf", "exp"),
    "log": _fn("logf", "log"),
    "sqrt": _fn("sqrtf", "sqrt"),
    "tanh": _fn("tanhf", "tanh"),
    "sigmoid": lambda args, dtype, in_dtype: f"dlc_sigmoid({args[0]})",
    "pow": _fn("powf", "pow"),
    "lt": _infix("<"), "le": _infix("<="), "gt": _infix(">"), "ge": _infix(">="),
    "eq": _infix("=="), "ne": _infix("!="),  # C's != is true on NaN, the others false
    "and": _infix("&&"),
    "select": lambda args, dtype, in_dtype: f"({args[0]} ? {args[1]} : {args[2]})",
    "cast": _cast,
    "copy": lambda args, dtype, in_dtype: args[0],
}


def _load(em, e: Load) -> str:
    at = f"{em.pointers[e.buf.name]}[{em.ix(e.index)}]"
    return em.bind(CTYPE[e.dtype], f"{at} != 0" if e.buf.dtype == DType.bool else at)


def _index(em, e: Index) -> str:
    v = em.ix(e.ix)
    if e.dtype == DType.bool:
        return f"({v} != 0)"
    if e.dtype == DType.i32 and ix_type(e.ix) == "int":
        return v
    return f"({CTYPE[e.dtype]}){atom(v)}"


def _op(em, e: Op) -> str:
    args = [em.value(x) for x in e.args]
    in_dtype = e.args[0].dtype if e.name == "cast" else e.args[1].dtype if e.name == "select" else e.args[-1].dtype
    text = SCALAR_OPS[e.name](args, e.dtype, in_dtype)
    return text if e.name in ("copy",) else em.bind(CTYPE[e.dtype], text)


def _rand(em, e: Rand) -> str:
    flat = em.ix(e.flat)
    return em.bind("float", f"dlc_uniform({em.value(e.seed)}, {em.value(e.step)}, {e.stream & 0xFFFFFFFF}u, "
                            f"(unsigned){atom(flat)})")


# kernel-IR scalar node -> C expression text (a local's name for anything not trivial)
EX_RULES = {
    Load: _load,
    Lit: lambda em, e: literal(e.value, e.dtype),
    Index: _index,
    Op: _op,
    Rand: _rand,
    Reduce: lambda em, e: em.reduce(e),
}


# names the generated code gives its own locals: loop variables never take them
RESERVED = re.compile(r"(v|ix|acc|best|at|j)\d+|f_|row_|i_|arena|red_\w+|in_\w+|s_\w+|a_\w+|w_\w+|step_\w+|t\d+|lv_\w+")


def identity(op: str, dtype: DType) -> str:
    """The starting value of a reduction."""
    if op == "sum":
        return literal(0, dtype)
    return f"(-{literal(math.inf, dtype)})" if dtype.is_float else "DLC_INT_MIN"


# --- the emitter -----------------------------------------------------------------------------------

class Emitter:
    """Emits kernel-IR expressions as C statements, in nested C scopes."""

    def __init__(self, pointers: dict[str, str], indent: int = 1):
        self.pointers = pointers          # buffer name -> C identifier
        self.lines: list[str] = []
        self.depth = indent
        self.vars: dict[str, str] = {}    # loop variable -> C identifier
        self.scopes: list[dict[int, str]] = [{}]
        self.free_vars = FreeVars()
        self._count = 0

    # --- text
    def line(self, text: str) -> None:
        self.lines.append("    " * self.depth + text)

    def text(self) -> str:
        return "\n".join(self.lines)

    def fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def bind(self, ctype: str, text: str, prefix: str = "v") -> str:
        name = self.fresh(prefix)
        self.line(f"const {ctype} {name} = {text};")
        return name

    @contextlib.contextmanager
    def block(self, head: str, comment: str = ""):
        """`head {` ... `}`: a C scope, and a cache scope (values computed inside stay inside)."""
        self.line((f"{head} {{" if head else "{") + (f"  // {comment}" if comment else ""))
        self.depth += 1
        self.scopes.append({})
        try:
            yield
        finally:
            self.scopes.pop()
            self.depth -= 1
            self.line("}")

    def loop(self, var: Var, start: str = "0", step: str = "1"):
        """for (int var = start; var < extent; var += step), with the variable bound."""
        t = "int" if var.extent <= INT_MAX else "long long"
        name = self.bind_var(var)
        inc = f"++{name}" if step == "1" else f"{name} += {step}"
        return self.block(f"for ({t} {name} = {start}; {name} < {_int(var.extent)}; {inc})")

    def bind_var(self, var: Var) -> str:
        """The C name of a loop variable (its own name unless that could be one of ours)."""
        name = var.name
        if not name.isidentifier() or RESERVED.fullmatch(name):
            name = "lv_" + re.sub(r"\W", "_", name)
        self.vars[var.name] = name
        return name

    # --- values
    def cached(self, key: int) -> str | None:
        for s in reversed(self.scopes):
            if key in s:
                return s[key]
        return None

    def remember(self, e, text: str) -> None:
        """Make `text` the value of e in the current scope (e.g. a template's output element)."""
        self.scopes[-1][id(e)] = text

    def ix(self, e) -> str:
        hit = self.cached(id(e))
        if hit is None:
            hit = self.scopes[-1][id(e)] = IX_RULES[type(e)](self, e)
        return hit

    def value(self, e) -> str:
        hit = self.cached(id(e))
        if hit is None:
            hit = self.scopes[-1][id(e)] = EX_RULES[type(e)](self, e)
        return hit

    def hoist(self, e, bound: frozenset, seen: set) -> None:
        """Compute now, in the current scope, the parts of e that depend only on `bound`."""
        for part in hoistable(e, bound, self.free_vars, lambda x: self.cached(id(x)) is not None, seen):
            self.value(part)

    def reduce(self, e: Reduce) -> str:
        """A reduction computed by this thread alone, in row-major order of its variables."""
        if not e.vars:
            return self.value(e.body)
        if e.op == "argmax":
            best, at = self.fresh("best"), self.fresh("at")
            self.line(f"{CTYPE[e.body.dtype]} {best} = {identity('max', e.body.dtype)};")
            self.line(f"int {at} = DLC_INT_MAX;")
        else:
            acc = self.fresh("acc")
            self.line(f"{CTYPE[e.dtype]} {acc} = {identity(e.op, e.dtype)};")
        with contextlib.ExitStack() as loops:
            for v in e.vars:
                loops.enter_context(self.loop(v))
            v = self.value(e.body)
            if e.op == "sum":
                self.line(f"{acc} += {v};")
            elif e.op == "max":
                self.line(f"{acc} = dlc_max({acc}, {v});")
            else:
                self.line(f"dlc_argmax_step({best}, {at}, {v}, {flat_of(self, e.vars)});")
        return at if e.op == "argmax" else acc

    def store_all(self, stores) -> None:
        """Compute every value first, then store: an in-place update never reads a value
        this iteration has already overwritten."""
        values = [self.value(s.value) for s in stores]
        for s, v in zip(stores, values):
            if s.buf.dtype == DType.bool:
                v = f"(unsigned char){v}"
            self.line(f"{self.pointers[s.buf.name]}[{self.ix(s.flat)}] = {v};")


def flat_of(em: Emitter, vars_) -> str:
    """The row-major flat index of loop variables (as argmax reports it)."""
    out = ""
    for v in vars_:
        out = em.vars[v.name] if not out else f"({out}) * {v.extent} + {em.vars[v.name]}"
    return out
