"""backends/llvm/mathlib.py against float64 numpy, rounded to float32.

Each function is JIT-compiled (host target machine, O3 new pass manager, MCJIT) into a
loop ``void f(float* x, float* y, float* out, i64 n)`` that LLVM vectorizes, and into an
explicit ``<8 x float>`` variant that calls the mathlib function on vector values. Dense
sweeps (1e6 points per domain) measure the max error in ulps; special values (0, -0,
+-inf, NaN, denormals, overflow/underflow boundaries) are checked exactly. A second build
with FMA turned off checks the unfused evaluation order. Run this file as a script to
print the error table and throughput against numpy.
"""
from __future__ import annotations

import ctypes
import re
import time

import llvmlite.binding as llvm
import numpy as np
import pytest
from llvmlite import ir

from dlc.backends.llvm import mathlib as ml

llvm.initialize_native_target()
llvm.initialize_native_asmprinter()

UNARY = ("exp", "log", "tanh", "sigmoid", "sqrt", "fabs")
BINARY = ("pow", "maximum", "minimum")
VW = 8                                    # lanes of the explicit-vector variants
F32 = ir.FloatType()
_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int64)
_ENGINES = []                             # keep the compiled code alive
HOST_FEATURES = llvm.get_host_cpu_features().flatten()
HAS_AVX2 = "+avx2" in HOST_FEATURES.split(",")
HAS_AVX512 = "+avx512f" in HOST_FEATURES.split(",")
N = 1_000_000


# --------------------------------------------------------------------------- the JIT
def _apply(b, name, x, y):
    fn = getattr(ml, name)
    return fn(b, x, y) if name in BINARY else fn(b, x)


def _emit_loop(module, name, elem, prefer512, features=""):
    """void <fname>(float* x, float* y, float* out, i64 n): out[i] = name(x[i], y[i]),
    over n elements of type elem (float, or <VW x float> for the explicit variant).
    `features` marks the function for those CPU features, as dlc's functions are (the
    mathlib chooses llvm.ldexp for AVX-512 functions)."""
    i64 = ir.IntType(64)
    ptr = ir.PointerType()
    fname = ("v_" if isinstance(elem, ir.VectorType) else "f_") + name
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [ptr, ptr, ptr, i64]), fname)
    for a in fn.args[:3]:
        a.add_attribute("noalias")
    fn.attributes.add("nounwind")
    if prefer512:
        # FunctionAttributes only takes enum attributes; "key"="value" goes in raw
        set.add(fn.attributes, '"prefer-vector-width"="512"')
    if features:
        set.add(fn.attributes, f'"target-features"="{features}"')
    entry, loop, done = (fn.append_basic_block(s) for s in ("entry", "loop", "done"))
    b = ir.IRBuilder(entry)
    x, y, out, n = fn.args
    b.cbranch(b.icmp_signed(">", n, ir.Constant(i64, 0)), loop, done)
    b.position_at_end(loop)
    i = b.phi(i64)
    i.add_incoming(ir.Constant(i64, 0), entry)
    xv = b.load(b.gep(x, [i], source_etype=elem), typ=elem, align=4)
    yv = b.load(b.gep(y, [i], source_etype=elem), typ=elem, align=4)
    b.store(_apply(b, name, xv, yv), b.gep(out, [i], source_etype=elem), align=4)
    inext = b.add(i, ir.Constant(i64, 1))
    i.add_incoming(inext, loop)
    b.cbranch(b.icmp_signed("<", inext, n), loop, done)
    b.position_at_end(done)
    b.ret_void()


class Jit:
    """All mathlib functions, as scalar loops (f_<name>) and <8 x float> loops (v_<name>)."""

    def __init__(self, extra_features: str = "", prefer512: bool = False,
                 cpu: str | None = None, marked: bool = False):
        module = ir.Module("mathlib_test")
        module.triple = llvm.get_process_triple()
        features = HOST_FEATURES + extra_features if marked else ""
        for name in UNARY + BINARY:
            _emit_loop(module, name, F32, prefer512, features)
            _emit_loop(module, name, ir.VectorType(F32, VW), prefer512, features)
        mod = llvm.parse_assembly(str(module))
        mod.verify()
        self.tm = llvm.Target.from_default_triple().create_target_machine(
            cpu=cpu or llvm.get_host_cpu_name(),
            features="" if cpu else HOST_FEATURES + extra_features, opt=3)
        pb = llvm.create_pass_builder(self.tm, llvm.create_pipeline_tuning_options(speed_level=3))
        pb.getModulePassManager().run(mod, pb)
        self.ir = str(mod)
        self.asm = self.tm.emit_assembly(mod)
        engine = llvm.create_mcjit_compiler(mod, self.tm)
        engine.finalize_object()
        _ENGINES.append(engine)
        self.fns = {fname: _FN(engine.get_function_address(fname))
                    for name in UNARY + BINARY for fname in ("f_" + name, "v_" + name)}

    def __call__(self, name, x, y=None, vector=False):
        x = np.ascontiguousarray(x, np.float32)
        y = np.zeros_like(x) if y is None else np.ascontiguousarray(y, np.float32)
        n = x.size
        if vector:       # pad to a multiple of VW lanes
            pad = -n % VW
            x, y = np.concatenate([x, np.ones(pad, np.float32)]), np.concatenate(
                [y, np.ones(pad, np.float32)])
        out = np.empty_like(x)
        self.fns[("v_" if vector else "f_") + name](
            x.ctypes.data, y.ctypes.data, out.ctypes.data, x.size // VW if vector else n)
        return out[:n]

    def function_ir(self, fname):
        start = self.ir.index(f"@{fname}(")
        return self.ir[start:self.ir.index("\n}\n", start)]

    def function_asm(self, fname):
        start = self.asm.index(f"\n{fname}:")
        end = self.asm.find(".Lfunc_end", start)
        return self.asm[start:end]


_JITS: dict = {}


def jit(kind="host"):
    if kind not in _JITS:
        _JITS[kind] = {"host": lambda: Jit(),
                       "nofma": lambda: Jit(",-fma"),
                       "zmm": lambda: Jit(prefer512=True),
                       "scalef": lambda: Jit(prefer512=True, marked=True),
                       "haswell": lambda: Jit(cpu="haswell")}[kind]()
    return _JITS[kind]


# --------------------------------------------------------------------------- references
def reference(name, x, y=None):
    """float64 numpy, rounded to float32."""
    x64 = x.astype(np.float64)
    with np.errstate(all="ignore"):
        if name == "exp":
            r = np.exp(x64)
        elif name == "log":
            r = np.log(x64)
        elif name == "tanh":
            r = np.tanh(x64)
        elif name == "sigmoid":
            e = np.exp(-np.abs(x64))
            r = np.where(x64 < 0, e, 1.0) / (1.0 + e)
        elif name == "pow":
            r = np.power(x64, y.astype(np.float64))
        else:
            raise ValueError(name)
        return r.astype(np.float32)


def ulps(got, ref):
    """Distance in float32 steps (NaN vs NaN: 0, NaN vs number: 2^40; -0 == +0)."""
    def ordered(v):
        i = v.view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)
    d = np.abs(ordered(got) - ordered(ref))
    ng, nr = np.isnan(got), np.isnan(ref)
    d = np.where(ng & nr, 0, d)
    return np.where(ng ^ nr, 2**40, d)


def max_ulps(name, x, y=None, kind="host", vector=False):
    got = jit(kind)(name, x, y, vector=vector)
    return int(ulps(got, reference(name, x, y)).max())


# --------------------------------------------------------------------------- sweeps
def _f32_by_bits(lo, hi, n, rng):
    """n floats with bit patterns uniform in [bits(lo), bits(hi)] (lo, hi >= 0):
    every binade gets its share, denormals too."""
    a, b = (np.array([lo, hi], np.float32).view(np.int32))
    return rng.integers(a, b, n, endpoint=True).astype(np.int32).view(np.float32)


def sweeps(name, rng=None):
    """{label: (x, y)} dense test sets, about 1e6 points each."""
    rng = rng or np.random.default_rng(1)
    f = np.float32
    if name == "exp":
        return {"normal results [-87.3, 88.72]":
                (np.concatenate([np.linspace(-87.33, 88.72, N // 2, dtype=f),
                                 rng.uniform(-87.33, 88.72, N // 2).astype(f)]), None),
                "near 0": (np.concatenate([_f32_by_bits(1e-30, 1.0, N // 4, rng),
                                           -_f32_by_bits(1e-30, 1.0, N // 4, rng)]), None),
                "denormal results [-104, -87.3]":
                (rng.uniform(-104.0, -87.33, N // 4).astype(f), None)}
    if name == "log":
        return {"all positive finite (bit-uniform)":
                (_f32_by_bits(1.4e-45, 3.4028235e38, N // 2, rng), None),
                "[0.5, 2]": (rng.uniform(0.5, 2.0, N // 4).astype(f), None),
                "1 +- 1e-3": (np.linspace(1 - 1e-3, 1 + 1e-3, N // 4, dtype=f), None)}
    if name == "tanh":
        return {"[-10, 10]": (rng.uniform(-10, 10, N // 2).astype(f), None),
                "[-1, 1]": (np.linspace(-1, 1, N // 4, dtype=f), None),
                "tiny (bit-uniform)": (np.concatenate([_f32_by_bits(1.4e-45, 1.0, N // 8, rng),
                                                       -_f32_by_bits(1.4e-45, 1.0, N // 8, rng)]),
                                       None)}
    if name == "sigmoid":
        return {"[-20, 20]": (rng.uniform(-20, 20, N // 2).astype(f), None),
                "[-87, 20] normal results": (rng.uniform(-87, 20, N // 4).astype(f), None),
                "[-104, -87] denormal results": (rng.uniform(-104, -87, N // 8).astype(f), None),
                "tiny": (np.concatenate([_f32_by_bits(1e-30, 1.0, N // 16, rng),
                                         -_f32_by_bits(1e-30, 1.0, N // 16, rng)]), None)}
    if name == "pow":
        x1 = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), N // 2)).astype(f)
        y1 = rng.uniform(-12, 12, N // 2).astype(f)
        # near-1 bases with large exponents: results across the whole range
        x2 = rng.uniform(0.5, 2.0, N // 4).astype(f)
        y2 = rng.uniform(-150, 150, N // 4).astype(f)
        # negative bases with integer exponents
        x3 = -np.exp(rng.uniform(np.log(1e-2), np.log(1e2), N // 4)).astype(f)
        y3 = rng.integers(-15, 16, N // 4).astype(f)
        return {"x in [1e-3, 1e3], y in [-12, 12]": (x1, y1),
                "x in [0.5, 2], y in [-150, 150] (to inf / denormals)": (x2, y2),
                "x < 0, integer y": (x3, y3)}
    raise ValueError(name)


# Bounds asserted (ulps of float32): what mathlib's docstring promises.
BOUNDS = {"exp": 1, "log": 1, "tanh": 2, "sigmoid": 2, "pow": 2}


@pytest.mark.parametrize("name", ["exp", "log", "tanh", "sigmoid", "pow"])
def test_accuracy_sweeps(name):
    for label, (x, y) in sweeps(name).items():
        err = max_ulps(name, x, y)
        assert err <= BOUNDS[name], f"{name} on {label}: {err} ulp"


@pytest.mark.parametrize("name", ["exp", "log", "tanh", "sigmoid", "pow"])
def test_accuracy_without_fma(name):
    """The unfused evaluation (no FMA instructions: llvm.fmuladd becomes mul + add)."""
    rng = np.random.default_rng(2)
    for label, (x, y) in sweeps(name, rng).items():
        sub = slice(0, None, 4)          # a quarter of each sweep keeps this quick
        x, y = x[sub], (None if y is None else y[sub])
        err = max_ulps(name, x, y, kind="nofma")
        assert err <= BOUNDS[name], f"{name} (no FMA) on {label}: {err} ulp"


@pytest.mark.skipif(not HAS_AVX512, reason="the host has no AVX-512 (llvm.ldexp would be a libm call)")
@pytest.mark.parametrize("name", ["exp", "tanh", "sigmoid", "pow"])
def test_avx512_scaling_is_one_vscalefps_with_the_same_results(name):
    """In a function compiled for AVX-512, exp's scaling by 2^n is llvm.ldexp (vscalefps):
    bit for bit the portable two products, overflow and gradual underflow included."""
    marked, plain = jit("scalef"), jit("zmm")
    assert "llvm.ldexp" in marked.function_ir("f_" + name)
    assert "vscalefps" in marked.function_asm("f_" + name)
    assert "llvm.ldexp" not in plain.function_ir("f_" + name)
    for label, (x, y) in sweeps(name, np.random.default_rng(4)).items():
        for vector in (False, True):
            got, want = marked(name, x, y, vector=vector), plain(name, x, y, vector=vector)
            np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32), err_msg=label)


@pytest.mark.parametrize("name", UNARY + BINARY)
def test_vector_values_match_scalar(name):
    """The mathlib functions applied to <8 x float> values give the scalar results."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(4099).astype(np.float32) * 30
    y = rng.standard_normal(4099).astype(np.float32) * 3
    if name in ("log", "sqrt", "pow"):
        x = np.abs(x)
    x[:16] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 89, -104, 88.7, -88.7,
              1, -1, 3, 1e30, -1e30]
    s, v = jit()(name, x, y), jit()(name, x, y, vector=True)
    np.testing.assert_array_equal(s.view(np.int32) | 0, v.view(np.int32) | 0)


# --------------------------------------------------------------------------- special values
INF, NAN = np.inf, np.nan
DMIN = 2.0**-149                        # smallest denormal
FMIN = 2.0**-126                        # smallest normal
REF = object()                          # "the float64 reference"


def _same(got, want):
    """Equal as floats, with the sign of zeros and NaN-ness."""
    got, want = np.float32(got), np.float32(want)
    if np.isnan(want):
        return bool(np.isnan(got))
    return bool(got == want and np.signbit(got) == np.signbit(want))


def _check(name, pairs):
    """pairs: (x, want); want REF means "the float64 reference, within BOUNDS[name]",
    anything else must match exactly (sign of zero and NaN-ness included)."""
    x = np.array([p[0] for p in pairs], np.float32)
    ref = reference(name, x)
    for vector in (False, True):
        got = jit()(name, x, vector=vector)
        for (xi, want), g, r in zip(pairs, got, ref):
            if want is REF:
                ok = ulps(np.float32([g]), np.float32([r]))[0] <= BOUNDS[name]
                want = r
            else:
                ok = _same(g, want)
            assert ok, f"{name}({xi!r}) = {g!r}, want {want!r} (vector={vector})"


def test_exp_special():
    _check("exp", [(0.0, 1.0), (-0.0, 1.0), (INF, INF), (-INF, 0.0), (NAN, NAN),
                   (1e-45, 1.0), (-1e-45, 1.0), (88.72283, REF), (88.7228, REF),
                   (88.7229, INF), (89.0, INF), (1e4, INF), (3e38, INF), (-103.9, REF),
                   (-103.97, REF), (-103.98, 0.0), (-104.0, 0.0), (-1e4, 0.0),
                   (-3e38, 0.0), (-87.33655, REF), (-87.3366, REF), (-100.0, REF)])


def test_log_special():
    _check("log", [(0.0, -INF), (-0.0, -INF), (-1.0, NAN), (-DMIN, NAN), (-INF, NAN),
                   (INF, INF), (NAN, NAN), (1.0, 0.0), (DMIN, REF), (FMIN, REF),
                   (FMIN * 0.5, REF), (FMIN * (1 - 2**-23), REF), (3.4028235e38, REF)])


def test_tanh_special():
    _check("tanh", [(0.0, 0.0), (-0.0, -0.0), (INF, 1.0), (-INF, -1.0), (NAN, NAN),
                    (DMIN, DMIN), (-DMIN, -DMIN), (1e-20, 1e-20), (-1e-20, -1e-20),
                    (9.02, 1.0), (-9.02, -1.0), (20.0, 1.0), (-100.0, -1.0), (1e30, 1.0),
                    (-3e38, -1.0)])
    x = np.linspace(9.02, 1e4, 10000, dtype=np.float32)
    assert (jit()("tanh", x) == 1).all() and (jit()("tanh", -x) == -1).all()


def test_sigmoid_special():
    _check("sigmoid", [(0.0, 0.5), (-0.0, 0.5), (INF, 1.0), (-INF, 0.0), (NAN, NAN),
                       (100.0, 1.0), (1000.0, 1.0), (-1000.0, 0.0), (3e38, 1.0),
                       (-3e38, 0.0), (17.33, 1.0), (-100.0, REF), (-103.9, REF)])
    x = np.linspace(-1e4, 1e4, 200001, dtype=np.float32)
    got = jit()("sigmoid", x)
    assert not np.isnan(got).any()
    assert ((got >= 0) & (got <= 1)).all()
    assert np.abs(got.astype(np.float64) - reference("sigmoid", x)).max() <= 1e-7


def test_pow_special():
    """Every pair of special values, against numpy's float32 ufunc (C99 semantics)."""
    sp = [NAN, INF, -INF, 0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 3.0, -3.0, 0.3,
          -8.0, 1 / 3, DMIN, -DMIN, 2.0**24, -(2.0**24), 2.0**24 + 2, 2.0**23 + 1,
          -(2.0**23 + 1), 1e10, 3.4028235e38, -3.4028235e38, 128.0, -126.0, -150.0, 89.0]
    x = np.array([a for a in sp for _ in sp], np.float32)
    y = np.array([b for _ in sp for b in sp], np.float32)
    with np.errstate(all="ignore"):
        want = np.power(x, y)              # float32 ufunc: the semantics
        want64 = reference("pow", x, y)    # float64 reference: the value
    for vector in (False, True):
        got = jit()("pow", x, y, vector=vector)
        for xi, yi, g, w, w64 in zip(x, y, got, want, want64):
            if np.isnan(w) or np.isinf(w) or w == 0 or w == 1:
                assert _same(g, w), f"pow({xi}, {yi}) = {g}, numpy {w}"
            else:
                assert ulps(np.float32([g]), np.float32([w64]))[0] <= 1 and \
                    np.signbit(g) == np.signbit(w64), f"pow({xi}, {yi}) = {g}, want {w64}"


def test_sqrt_fabs_maximum_minimum():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal(5000).astype(np.float32) * 100,
                        np.float32([0, -0.0, INF, -INF, NAN, DMIN, -DMIN, 1, 1, NAN])])
    y = np.concatenate([rng.standard_normal(5000).astype(np.float32) * 100,
                        np.float32([-0.0, 0, -INF, INF, 1, NAN, -DMIN, 1, NAN, NAN])])
    with np.errstate(all="ignore"):
        for name, want in (("sqrt", np.sqrt(x)), ("fabs", np.abs(x)),
                           ("maximum", np.maximum(x, y)), ("minimum", np.minimum(x, y))):
            for vector in (False, True):
                got = jit()(name, x, y, vector=vector)
                # bit-exact (NaN payloads aside), signed zeros included
                same = (got.view(np.int32) == want.view(np.int32)) | (
                    np.isnan(got) & np.isnan(want))
                assert same.all(), (name, x[~same][:4], y[~same][:4], got[~same][:4])


# --------------------------------------------------------------------------- the code
@pytest.mark.skipif(not HAS_AVX2, reason="needs an AVX2 host")
@pytest.mark.parametrize("name", ["exp", "log", "tanh", "sigmoid", "pow"])
def test_loop_is_vectorized(name):
    """The scalar loop is vectorized (8- or 16-wide) and calls nothing but intrinsics."""
    j = jit()
    text = j.function_ir("f_" + name)
    assert "<8 x float>" in text or "<16 x float>" in text, text[:2000]
    calls = [ln for ln in text.splitlines() if " call " in ln]
    assert all("@llvm." in ln for ln in calls), calls
    asm = j.function_asm("f_" + name)
    assert "%ymm" in asm or "%zmm" in asm
    assert not re.search(r"\bcall", asm), "the vectorized loop calls a function"


@pytest.mark.skipif(not HAS_AVX512, reason="needs an AVX-512 host")
@pytest.mark.parametrize("name", ["exp", "log", "tanh", "sigmoid"])
def test_loop_uses_zmm_when_preferred(name):
    asm = jit("zmm").function_asm("f_" + name)
    assert "%zmm" in asm


@pytest.mark.skipif(not HAS_AVX2, reason="needs an AVX2 host to run haswell code")
@pytest.mark.parametrize("name", ["exp", "log", "tanh", "sigmoid", "pow"])
def test_avx2_target(name):
    """Compiled for a plain AVX2 CPU (haswell): 8-wide ymm code, same accuracy."""
    j = jit("haswell")
    assert "<8 x float>" in j.function_ir("f_" + name)
    asm = j.function_asm("f_" + name)
    assert "%ymm" in asm and "%zmm" not in asm
    x, y = next(iter(sweeps(name).values()))
    x, y = x[::8], (None if y is None else y[::8])
    got = j(name, x, y)
    assert int(ulps(got, reference(name, x, y)).max()) <= BOUNDS[name]


def test_coefficients_reproduce():
    """The literal coefficients are what _fit_minimax gives (rounded to float32)."""
    for kind, coeffs in (("exp", ml.EXP_P), ("log", ml.LOG_P), ("tanh", ml.TANH_P)):
        c, err = ml._fit_minimax(kind, len(coeffs) - 1)
        assert np.array_equal(np.float32(c), np.float32(coeffs)), kind
        assert err < 6e-9


def test_type_errors():
    module = ir.Module()
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [ir.IntType(32)]), "g")
    b = ir.IRBuilder(fn.append_basic_block())
    with pytest.raises(TypeError):
        ml.exp(b, fn.args[0])


# --------------------------------------------------------------------------- as a script
def _report():
    print(f"host {llvm.get_host_cpu_name()}, avx512={HAS_AVX512}")
    for name in ("exp", "log", "tanh", "sigmoid", "pow"):
        for kind in ("host", "nofma"):
            for label, (x, y) in sweeps(name).items():
                print(f"{name:8s} {kind:6s} {label:55s} max {max_ulps(name, x, y, kind)} ulp")
    rng = np.random.default_rng(0)
    x = rng.uniform(-10, 10, N).astype(np.float32)
    xp = np.abs(x) + np.float32(0.1)
    y = rng.uniform(-3, 3, N).astype(np.float32)
    numpy_fns = {"exp": lambda: np.exp(x), "log": lambda: np.log(xp),
                 "tanh": lambda: np.tanh(x), "sigmoid": lambda: 1 / (1 + np.exp(-x)),
                 "pow": lambda: np.power(xp, y), "sqrt": lambda: np.sqrt(xp),
                 "maximum": lambda: np.maximum(x, y)}

    def best(f, reps=20):
        f()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return min(ts) / N * 1e9

    out = np.empty_like(x)
    print(f"\nns/element on {N} floats (best of 20): dlc host / dlc haswell (AVX2) / numpy")
    for name, npf in numpy_fns.items():
        arg = xp if name in ("log", "pow", "sqrt") else x
        times = []
        for kind in ("host", "haswell"):
            fn = jit(kind).fns["f_" + name]
            times.append(best(lambda: fn(arg.ctypes.data, y.ctypes.data, out.ctypes.data, N)))
        print(f"{name:8s} {times[0]:6.3f} {times[1]:6.3f} {best(npf):6.3f}")


if __name__ == "__main__":
    _report()
