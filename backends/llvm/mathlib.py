"""Float32 math functions emitted as straight-line LLVM IR.

Every function takes an ``llvmlite.ir.IRBuilder`` and float32 values -- scalars of
``ir.FloatType()`` or vectors ``ir.VectorType(ir.FloatType(), W)`` -- emits its
instructions at the builder's position and returns the result value::

    exp(b, x)   log(b, x)   tanh(b, x)   sigmoid(b, x)   pow(b, x, y)
    sqrt(b, x)  fabs(b, x)  maximum(b, x, y)   minimum(b, x, y)   fma(b, x, y, z)

The code has no branches and calls no library function: special cases are selects, the
only calls are to the intrinsics ``llvm.fmuladd``, ``llvm.sqrt`` and ``llvm.fabs``, which
x86 lowers to instructions (fmuladd: one FMA where the target has it, else mul + add;
every use is accurate either way), and in a function compiled for AVX-512 (its
"target-features" say +avx512f) ``llvm.ldexp``, which becomes one ``vscalefps``: exp's
final scaling by 2^n, bit for bit the result of the two exact-exponent products used
elsewhere (the LSTM's gates kernel 9-11% faster). So a loop that applies these functions
elementwise is vectorized by LLVM's loop vectorizer (SSE/AVX2/AVX-512), and a caller may
also pass vectors directly.

Accuracy (float32 results against float64 numpy rounded to float32, in ulps; exp, log,
tanh and sigmoid were checked on all 2^32 float32 inputs, with and without FMA; pow on
32M random pairs; tests/test_llvm_mathlib.py repeats 1e6-point sweeps):

* exp      <= 1 ulp for every input. Results below FLT_MIN are correctly rounded
             *gradual* denormals (the final scaling is the one rounding), so exp(x) is 0
             only below ~-103.97; +inf from 88.7228394 up. exp(NaN) = NaN, exp(inf) = inf,
             exp(-inf) = 0.
* log      <= 1 ulp for every positive input, denormals included (scaled by 2^23
             first). log(+-0) = -inf, log(x < 0) = NaN, log(inf) = inf, log(NaN) = NaN.
* tanh     <= 1 ulp (2 asserted); odd (tanh(-0) = -0), exactly +-1 for |x| >= ~9.01,
             NaN -> NaN.
* sigmoid  <= 2 ulp relative for every input, very negative x included (computed as
             e^x/(1+e^x) there, never 1/(1+inf)); exactly 1 for large x, exactly 0 below
             ~-103.97 (denormal results before that), never NaN for non-NaN input.
* pow      <= 1 ulp measured (2 asserted) for x > 0 and every y, overflow and gradual
             underflow included: log|x| is evaluated in float64 and so is the reduction
             y*log|x| = n ln2 + r, so the error does not grow with the size of the result;
             only e^r (|r| <= ln2/2) uses the float32 exp polynomial. Special cases follow
             C99 and numpy's float32 ufunc: pow(x, +-0) = 1 even for NaN x, pow(1, y) = 1
             even for NaN y, pow(-1, +-inf) = 1, a negative base with an integer y gets
             the sign of its parity (pow(-0, -3) = -inf, pow(-inf, 3) = -inf), a finite
             negative base with a non-integer y gives NaN, pow(-inf, 0.5) = inf, NaN
             otherwise propagates.
* maximum / minimum: exactly numpy.maximum/minimum, NaN in either operand propagates;
             for equal operands (-0 vs +0) the second operand is returned, like numpy.

Polynomial coefficients were derived for this file with a Lawson (iteratively reweighted
least squares) minimax fit in float64 over 4000 Chebyshev points, minimising the maximum
*relative* error of the final function (see ``_fit_minimax`` below, which reproduces them;
tests/test_llvm_mathlib.py re-runs it); then rounded to float32 and verified in float32.
The float64 log series inside pow is the plain Taylor series of atanh (coefficients
1/(2k+1)). All results assume the default floating-point environment (round to nearest,
no flush-to-zero / denormals-are-zero).
"""
from __future__ import annotations

import math
import struct

from llvmlite import ir

__all__ = ["exp", "log", "tanh", "sigmoid", "pow", "sqrt", "fabs", "maximum", "minimum"]

F32 = ir.FloatType()
F64 = ir.DoubleType()
I32 = ir.IntType(32)


# --------------------------------------------------------------------------- constants
def _f32(v: float) -> float:
    """v rounded to float32 (as a Python float)."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _f32_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


LOG2E = _f32(1.0 / math.log(2.0))
# Cody-Waite split of ln 2: LN2_HI is ln 2 rounded to 12 significant bits, so n * LN2_HI
# is exact for |n| < 2^12 (exp needs |n| <= 150, log |k| <= 150); LN2_LO is the float32
# rounding of the remainder. LN2_HI + LN2_LO equals ln 2 to 1.6e-12 (2^-39).
LN2_HI = round(math.log(2.0) * 2.0**12) / 2.0**12          # 0.693115234375 (2839/4096)
LN2_LO = _f32(math.log(2.0) - LN2_HI)                        # 3.19461833e-05
# Adding 1.5 * 2^23 to a float32 |v| < 2^22 rounds it to the nearest integer (ties to
# even), which then sits in the low mantissa bits of the sum.
ROUND_MAGIC = 1.5 * 2.0**23
# The same for float64 (|v| < 2^51).
ROUND_MAGIC_D = 1.5 * 2.0**52
SQRT_HALF_BITS = _f32_bits(math.sqrt(0.5))                   # 0x3f3504f3
FLT_MIN = 2.0**-126

# e^r = 1 + r + r^2 * P(r) on |r| <= ln2/2, P(r) ~ (e^r - 1 - r)/r^2.
# _fit_minimax(expm1-based target, degree 4): max relative error of e^r 3.1e-9 (2^-28).
EXP_P = (0.4999999403953552, 0.1666652113199234, 0.04166838899254799,
         0.008368710055947304, 0.0013814610429108143)

# log(1+f) = f - f^2/2 + f^3 * P(f) on f in [sqrt(1/2)-1, sqrt(2)-1],
# P(f) ~ (log1p(f) - f + f^2/2)/f^3. Degree 7: max relative error of log1p 5.8e-9.
LOG_P = (0.3333333134651184, -0.250008225440979, 0.20001226663589478,
         -0.16623356938362122, 0.14201761782169342, -0.131601944565773,
         0.12761549651622772, -0.07634429633617401)

# tanh(x) = x + x^3 * P(x^2) on |x| < TANH_SMALL, P(z) ~ (tanh(x) - x)/x^3.
# Degree 4 in x^2: max relative error of tanh 4.4e-9. Above TANH_SMALL,
# tanh|x| = 1 - 2/(e^(2|x|) + 1): no cancellation, as 2/(e^(2|x|) + 1) < 0.45 there.
TANH_SMALL = 0.625
TANH_P = (-0.3333328068256378, 0.13331441581249237, -0.05373971536755562,
          0.02063908986747265, -0.005704990588128567)

# pow evaluates log|x| in float64 (a plain Taylor series): w = y*log|x| then needs only
# an absolute error well below 2^-24 for |w| up to ~104, i.e. a relative error of log|x|
# below ~1e-10. log(m) = 2s * sum_k s^(2k)/(2k+1), s = (m-1)/(m+1), |s| <= 0.1716: the
# terms to k = 5 leave a relative error < 5e-11. The exponential is reduced in float64
# (w = n ln2 + r, r accurate for every |w|) and finished by the float32 exp polynomial.
LOG_SERIES_D = tuple(1.0 / (2 * k + 1) for k in range(6))


def _fit_minimax(kind: str, degree: int, iters: int = 60, npts: int = 4000):
    """Re-derive a coefficient set above (needs numpy; used by the tests, not at runtime).

    kind: 'exp' | 'log' | 'tanh'. Lawson's algorithm: weighted least squares whose weights
    are multiplied by the current error each round converges to the minimax
    (equioscillating) polynomial. Returns (float64 coefficients, max weighted error).
    """
    import numpy as np
    if kind == "exp":
        lo, hi = -math.log(2) / 2, math.log(2) / 2
        target = lambda t: (np.expm1(t) - t) / t**2           # noqa: E731
        var = lambda t: t                                      # noqa: E731
        weight = lambda t: t**2 / np.exp(t)                    # error of e^r, relative
    elif kind == "log":
        lo, hi = math.sqrt(0.5) - 1, math.sqrt(2) - 1
        target = lambda t: (np.log1p(t) - t + t * t / 2) / t**3  # noqa: E731
        var = lambda t: t                                      # noqa: E731
        weight = lambda t: np.abs(t**3 / np.log1p(t))          # relative error of log1p
    elif kind == "tanh":
        lo, hi = 1e-4, TANH_SMALL
        target = lambda t: (np.tanh(t) - t) / t**3             # noqa: E731
        var = lambda t: t * t                                  # noqa: E731
        weight = lambda t: t**3 / np.tanh(t)                   # relative error of tanh
    else:
        raise ValueError(kind)
    k = np.arange(npts)
    t = (lo + hi) / 2 + (hi - lo) / 2 * np.cos(np.pi * (k + 0.5) / npts)
    y, w = target(t), weight(t)
    V = np.vander(var(t), degree + 1, increasing=True)
    lw = np.full(npts, 1.0 / npts)
    for _ in range(iters):
        s = np.sqrt(lw) * w
        c, *_ = np.linalg.lstsq(V * s[:, None], y * s, rcond=None)
        e = np.abs(w * (y - V @ c))
        lw = lw * e
        lw /= lw.sum()
    return c, float(e.max())


# --------------------------------------------------------------------------- helpers
def _check_float(v: ir.Value, what: str = "x") -> ir.Type:
    t = v.type
    if isinstance(t, ir.FloatType) or (isinstance(t, ir.VectorType)
                                       and isinstance(t.element, ir.FloatType)):
        return t
    raise TypeError(f"mathlib: {what} must be float or <W x float>, got {t}")


def _like(ty: ir.Type, elem: ir.Type) -> ir.Type:
    """The type with ty's shape (scalar or W-vector) and element type elem."""
    return ir.VectorType(elem, ty.count) if isinstance(ty, ir.VectorType) else elem


def _c(ty: ir.Type, value) -> ir.Constant:
    """A constant of type ty (broadcast to every lane of a vector type)."""
    return ir.Constant(ty, value)


def _intrinsic(b: ir.IRBuilder, name: str, args, ret: ir.Type | None = None, overloads: int = 1):
    """A call of intrinsic `name`, its name suffixed with the types of its first
    `overloads` arguments (llvm.fmuladd.v16f32; llvm.ldexp.v16f32.v16i32)."""
    def suffix(ty):
        if isinstance(ty, ir.VectorType):
            return f"v{ty.count}{ty.element.intrinsic_name}"
        return ty.intrinsic_name
    full = ".".join([name] + [suffix(a.type) for a in args[:overloads]])
    fn = b.module.globals.get(full)
    if fn is None:
        fn = ir.Function(b.module, ir.FunctionType(ret or args[0].type, [a.type for a in args]), full)
    return b.call(fn, list(args))


def _features(b: ir.IRBuilder) -> tuple:
    """The target features of the function being built (its "target-features")."""
    for attr in b.function.attributes:
        if attr.startswith('"target-features"='):
            return tuple(attr.split("=", 1)[1].strip('"').split(","))
    return ()


def _has_scalef(b: ir.IRBuilder) -> bool:
    """Whether the function being built is compiled for AVX-512, where LLVM lowers
    llvm.ldexp (x * 2^n, one rounding, overflow and gradual underflow included) to one
    vscalefps; elsewhere it becomes a call to the C library's ldexpf per element."""
    return "+avx512f" in _features(b)


def fma(b: ir.IRBuilder, x, y, z) -> ir.Value:
    """x*y + z with one rounding (llvm.fma) where the target has FMA; without it (SSE,
    AVX1), where llvm.fma would be a C library call per lane, a multiply and an add
    (llvm.fmuladd). Either way every LLVM pipeline computes the same bits."""
    return _intrinsic(b, "llvm.fma" if "+fma" in _features(b) else "llvm.fmuladd", [x, y, z])


def _fma(b, x, y, z):
    """x*y + z; fused where the target has FMA (llvm.fmuladd), else mul then add.
    Every use below is accurate either way."""
    return _intrinsic(b, "llvm.fmuladd", [x, y, z])


def _horner(b, x, coeffs):
    ty = x.type
    acc = _c(ty, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = _fma(b, acc, x, _c(ty, c))
    return acc


def _clamp(b, x, lo, hi):
    """min(max(x, lo), hi) with ordered compares, so NaN passes through."""
    ty = x.type
    x = b.select(b.fcmp_ordered(">", x, _c(ty, hi)), _c(ty, hi), x)
    return b.select(b.fcmp_ordered("<", x, _c(ty, lo)), _c(ty, lo), x)


def _or_sign(b, mag, x):
    """mag with the sign bit of x or'ed in (copysign for mag >= +0)."""
    it = _like(x.type, I32)
    sign = b.and_(b.bitcast(x, it), _c(it, 0x80000000))
    return b.bitcast(b.or_(b.bitcast(mag, it), sign), x.type)


# --------------------------------------------------------------------------- simple ops
def fabs(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """|x| (llvm.fabs: clears the sign bit)."""
    _check_float(x)
    return _intrinsic(b, "llvm.fabs", [x])


def sqrt(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """Correctly rounded square root (llvm.sqrt -> sqrtss/vsqrtps); sqrt(x<0) = NaN."""
    _check_float(x)
    return _intrinsic(b, "llvm.sqrt", [x])


def maximum(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    """numpy.maximum: NaN if either is NaN; y when x == y (so maximum(0., -0.) = -0.)."""
    _check_float(x), _check_float(y, "y")
    pick_x = b.or_(b.fcmp_ordered(">", x, y), b.fcmp_unordered("uno", x, x))
    return b.select(pick_x, x, y)


def minimum(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    """numpy.minimum: NaN if either is NaN; y when x == y."""
    _check_float(x), _check_float(y, "y")
    pick_x = b.or_(b.fcmp_ordered("<", x, y), b.fcmp_unordered("uno", x, x))
    return b.select(pick_x, x, y)


# --------------------------------------------------------------------------- exp
def exp(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """e^x, <= 1 ulp; gradual underflow to denormals, 0 below ~-103.97, inf above ~88.72.

    x = n*ln2 + r with n = round(x*log2 e) (ROUND_MAGIC trick) and r = x - n*LN2_HI -
    n*LN2_LO (the first product and difference are exact), |r| <= ln2/2;
    e^r = 1 + (r + r^2 P(r)); then scaled by 2^n in two exact-exponent factors
    2^(n>>1) * 2^(n - (n>>1)), so 2^128 (needed just below the overflow threshold) and
    2^-150 (denormal results) never have to be formed, and the last multiply is the only
    rounding of a denormal result.
    """
    ty = _check_float(x)
    it = _like(ty, I32)
    # Outside [-104, 89] the result is 0 or inf anyway; this keeps n within [-150, 129].
    xc = _clamp(b, x, -104.0, 89.0)
    t = _fma(b, xc, _c(ty, LOG2E), _c(ty, ROUND_MAGIC))
    nf = b.fsub(t, _c(ty, ROUND_MAGIC))                   # n as a float (exact)
    n = b.sub(b.bitcast(t, it), _c(it, _f32_bits(ROUND_MAGIC)))   # n as an i32
    r = _fma(b, nf, _c(ty, -LN2_HI), xc)
    r = _fma(b, nf, _c(ty, -LN2_LO), r)
    return _exp_scaled(b, n, r)


def _exp_scaled(b, n, r):
    """2^n * e^r for i32 n in [-150, 128] and float |r| <= ln2/2 (plus rounding)."""
    ty = r.type
    it = n.type
    p = _fma(b, b.fmul(r, r), _horner(b, r, EXP_P), r)    # e^r - 1
    p = b.fadd(p, _c(ty, 1.0))
    if _has_scalef(b):  # one vscalefps: the same single rounding as the two products below
        return _intrinsic(b, "llvm.ldexp", [p, n], overloads=2)
    n1 = b.ashr(n, _c(it, 1))
    n2 = b.sub(n, n1)
    s1 = b.bitcast(b.shl(b.add(n1, _c(it, 127)), _c(it, 23)), ty)
    s2 = b.bitcast(b.shl(b.add(n2, _c(it, 127)), _c(it, 23)), ty)
    return b.fmul(b.fmul(p, s1), s2)


# --------------------------------------------------------------------------- log
def _log_split(b, x):
    """x > 0 finite (normal or denormal) -> (k: i32, m: float) with x = 2^k * m,
    m in [sqrt(1/2), sqrt(2)). Garbage, but no trap, for other x."""
    ty = x.type
    it = _like(ty, I32)
    den = b.fcmp_ordered("<", x, _c(ty, FLT_MIN))
    xs = b.select(den, b.fmul(x, _c(ty, 2.0**23)), x)      # denormals -> normal, exact
    ebias = b.select(den, _c(it, -23 - 127), _c(it, -127))
    # Shift the bits so that the mantissas from sqrt(1/2) up carry into the exponent:
    # then exponent field - 127 = k and (mantissa bits + bits of sqrt(1/2)) = m.
    ix = b.add(b.bitcast(xs, it), _c(it, 0x3F800000 - SQRT_HALF_BITS))
    k = b.add(b.ashr(ix, _c(it, 23)), ebias)
    m = b.bitcast(b.add(b.and_(ix, _c(it, 0x007FFFFF)), _c(it, SQRT_HALF_BITS)), ty)
    return k, m


def log(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """Natural log, <= 1 ulp for every positive finite x (denormals included).

    x = 2^k m, f = m - 1 (exact), log x = k*LN2_HI + (f + (-f^2/2 + (f^3 P(f) + k*LN2_LO))).
    """
    ty = _check_float(x)
    k, m = _log_split(b, x)
    kf = b.sitofp(k, ty)
    f = b.fsub(m, _c(ty, 1.0))
    f2 = b.fmul(f, f)
    y = _fma(b, b.fmul(f2, f), _horner(b, f, LOG_P), b.fmul(kf, _c(ty, LN2_LO)))
    y = _fma(b, f2, _c(ty, -0.5), y)
    r = b.fadd(f, y)
    r = _fma(b, kf, _c(ty, LN2_HI), r)          # k*LN2_HI is exact, so one rounding
    # Special cases: +inf and NaN give x back, negatives NaN, +-0 -inf.
    r = b.select(b.fcmp_unordered(">=", x, _c(ty, math.inf)), x, r)
    r = b.select(b.fcmp_ordered("<", x, _c(ty, 0.0)), _c(ty, math.nan), r)
    return b.select(b.fcmp_ordered("==", x, _c(ty, 0.0)), _c(ty, -math.inf), r)


# --------------------------------------------------------------------------- tanh
def tanh(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """tanh, <= 2 ulp; odd polynomial below |x| = 0.625, 1 - 2/(e^(2|x|)+1) above
    (exactly 1 once e^(2|x|) is large or inf), sign restored from x's sign bit."""
    ty = _check_float(x)
    ax = fabs(b, x)
    z = b.fmul(ax, ax)
    small = _fma(b, b.fmul(ax, z), _horner(b, z, TANH_P), ax)
    e = exp(b, b.fadd(ax, ax))
    large = b.fsub(_c(ty, 1.0), b.fdiv(_c(ty, 2.0), b.fadd(e, _c(ty, 1.0))))
    mag = b.select(b.fcmp_ordered("<", ax, _c(ty, TANH_SMALL)), small, large)
    return _or_sign(b, mag, x)


# --------------------------------------------------------------------------- sigmoid
def sigmoid(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """1/(1+e^-x) computed as {1, e^x}/(1 + e^-|x|): the exponential never overflows,
    large x give exactly 1, very negative x give e^x correctly down to denormals and 0."""
    ty = _check_float(x)
    z = exp(b, b.fneg(fabs(b, x)))                         # in (0, 1]
    num = b.select(b.fcmp_ordered("<", x, _c(ty, 0.0)), z, _c(ty, 1.0))
    return b.fdiv(num, b.fadd(z, _c(ty, 1.0)))


# --------------------------------------------------------------------------- pow
def _log_f64(b, ax):
    """log(ax) in float64 (relative error ~1e-16) for float32 ax >= +0;
    -inf for 0, +inf for inf, NaN for NaN."""
    ty = ax.type
    dt = _like(ty, F64)
    k, m = _log_split(b, ax)
    f = b.fsub(b.fpext(m, dt), _c(dt, 1.0))               # exact
    s = b.fdiv(f, b.fadd(f, _c(dt, 2.0)))                  # (m-1)/(m+1), |s| <= 0.1716
    series = _horner(b, b.fmul(s, s), LOG_SERIES_D)
    lg = _fma(b, b.fadd(s, s), series, b.fmul(b.sitofp(k, dt), _c(dt, math.log(2.0))))
    lg = b.select(b.fcmp_unordered(">=", ax, _c(ty, math.inf)), b.fpext(ax, dt), lg)
    return b.select(b.fcmp_ordered("==", ax, _c(ty, 0.0)), _c(dt, -math.inf), lg)


def _exp_f64_to_f32(b, w, ty):
    """e^w for float64 w as float32 (type ty): the reduction w = n ln2 + r in float64,
    so r is accurate however large w is, e^r in float32."""
    dt = w.type
    wc = _clamp(b, w, -104.0, 89.0)                        # results 0 / inf beyond
    t = _fma(b, wc, _c(dt, 1.0 / math.log(2.0)), _c(dt, ROUND_MAGIC_D))
    nf = b.fsub(t, _c(dt, ROUND_MAGIC_D))
    r = _fma(b, nf, _c(dt, -math.log(2.0)), wc)
    return _exp_scaled(b, b.fptosi(nf, _like(ty, I32)), b.fptrunc(r, ty))


def pow(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:   # noqa: A001
    """x**y with numpy/C99 semantics, <= 1 ulp (float64 inside, one final rounding)."""
    ty = _check_float(x)
    if _check_float(y, "y") != ty:
        raise TypeError(f"mathlib.pow: x and y types differ ({ty} vs {y.type})")
    it = _like(ty, I32)
    dt = _like(ty, F64)
    ax = fabs(b, x)
    w = b.fmul(b.fpext(y, dt), _log_f64(b, ax))
    mag = _exp_f64_to_f32(b, w, ty)
    # |x| == 1: 1 for every y, also +-inf and NaN (C99: pow(-1, +-inf) = 1, pow(1, NaN) = 1;
    # pow(-1, NaN) becomes NaN below, as y NaN is no integer).
    mag = b.select(b.fcmp_ordered("==", ax, _c(ty, 1.0)), _c(ty, 1.0), mag)
    # Integer / odd y. Every float32 with |y| >= 2^24 is an even integer (inf counts too).
    ay = fabs(b, y)
    small = b.fcmp_ordered("<", ay, _c(ty, 2.0**24))
    ys = b.select(small, y, _c(ty, 0.0))
    iy = b.fptosi(ys, it)
    is_int = b.or_(b.and_(small, b.fcmp_ordered("==", b.sitofp(iy, ty), ys)),
                   b.fcmp_ordered(">=", ay, _c(ty, 2.0**24)))
    is_odd = b.and_(is_int, b.icmp_signed("!=", b.and_(iy, _c(it, 1)), _c(it, 0)))
    # Negative base (sign bit set, so -0 too): odd y gives the negative result.
    neg_x = b.icmp_signed("<", b.bitcast(x, it), _c(it, 0))
    res = b.select(b.and_(neg_x, is_odd), b.fneg(mag), mag)
    # Finite negative x (not -0, not -inf) with non-integer y: NaN.
    bad = b.and_(b.and_(b.fcmp_ordered("<", x, _c(ty, 0.0)),
                        b.fcmp_ordered("!=", x, _c(ty, -math.inf))),
                 b.not_(is_int))
    res = b.select(bad, _c(ty, math.nan), res)
    # pow(x, +-0) = 1 for every x, NaN included.
    return b.select(b.fcmp_ordered("==", y, _c(ty, 0.0)), _c(ty, 1.0), res)
