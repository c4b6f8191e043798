"""The CUDA renderer piece by piece: each scalar op against numpy on special values (NaN,
infinities, signed zeros, negative integers), Rand bit for bit, index arithmetic on
negative ranges and 64-bit ranges, how nests map to the grid, and the block-wide
reductions (ties, NaN, many partial sums) -- run through the host emulation."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dlc import backends
from dlc.backends.cuda.emit import literal
from dlc.backends.cuda.render import plan_nest, render_program
from dlc.core.kernel import Buffer, Exprs, Kernel, KernelProgram, LoopNest, Store
from dlc.core.ops.misc import _random_ref
from dlc.core.types import DType

from cuda_host.step import HostStep

CUDA = backends.backend("cuda", runnable=False)
TARGET = CUDA.target({"arch": "sm_90"})
F32, I32, BOOL = DType.f32, DType.i32, DType.bool
INT_MIN = -2**31


def _program(nests_of, inputs: dict, outputs: dict) -> tuple[KernelProgram, dict]:
    """A one-kernel program: `inputs` name -> array, `outputs` name -> (dtype, shape);
    nests_of(x, bufs) gives the kernel's loop nests."""
    x = Exprs()
    bufs, offset = {}, 0
    for name, a in inputs.items():
        bufs[name] = Buffer(name, DType.of(a), a.shape, "input")
    for name, (dtype, shape) in outputs.items():
        bufs[name] = Buffer(name, dtype, shape, "arena", offset)
        offset += -(-(math.prod(shape) * 4) // 64) * 64
    program = KernelProgram([Kernel("k0", 0, nests_of(x, bufs))], dict(bufs), offset,
                            {n: bufs[n] for n in outputs}, [], {n: bufs[n] for n in inputs}, {})
    return program, bufs


def _run(nests_of, inputs: dict, outputs: dict) -> dict:
    program, _ = _program(nests_of, inputs, outputs)
    source, layout = CUDA.render(program, TARGET)
    return HostStep(source, layout).run({}, inputs)


def _elementwise(op: str, dtype: DType, arrays: list, out_dtype: DType | None = None):
    """out[i] = op(a0[i], a1[i], ...) for 1-D inputs."""
    n = len(arrays[0])
    inputs = {f"a{k}": a for k, a in enumerate(arrays)}

    def nests(x, bufs):
        i = x.var("i", n)
        args = [x.load(bufs[f"a{k}"], i) for k in range(len(arrays))]
        return [LoopNest((i,), (), stores=[Store(bufs["out"], i, x.op(op, args, out_dtype or dtype))])]
    return _run(nests, inputs, {"out": (out_dtype or dtype, (n,))})["out"]


SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 0.5, -2.5, 3.0, 1e-40, -7.25, 1e30, 2.0],
                   np.float32)
PAIRS = np.array(list(itertools.product(SPECIAL, SPECIAL)), np.float32).T
INTS = np.array([0, 1, -1, 7, -7, 3, -3, 2**31 - 1, INT_MIN, 100, -100], np.int32)
INT_PAIRS = np.array(list(itertools.product(INTS, INTS)), np.int32).T


def _same(got, want):
    """Equal, NaN where NaN, and the same sign of zero."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype.kind == "f":
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        ok = ~np.isnan(want)
        np.testing.assert_array_equal(got[ok], want[ok])
        np.testing.assert_array_equal(np.signbit(got[ok & (want == 0)]), np.signbit(want[ok & (want == 0)]))
    else:
        np.testing.assert_array_equal(got, want)


FLOAT_BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
                "max": np.maximum, "min": np.minimum}
COMPARE = {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
           "eq": np.equal, "ne": np.not_equal}


@pytest.mark.parametrize("op", sorted(FLOAT_BINARY))
def test_float_binary_ops_are_numpys(op):
    with np.errstate(all="ignore"):
        want = FLOAT_BINARY[op](PAIRS[0], PAIRS[1])
    _same(_elementwise(op, F32, list(PAIRS)), want)


def _within_ulps(got, want, ulps: int):
    """Specials (NaN, infinities, zeros) exactly, finite values within `ulps`."""
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    exact = ~np.isnan(want) & (~np.isfinite(want) | (want == 0))
    _same(got[exact], want[exact])
    ok = np.isfinite(want) & (want != 0)
    ulp = np.spacing(np.abs(want[ok]).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(got[ok].astype(np.float64) - want[ok]) <= ulps * ulp)


def test_pow_follows_c99_special_cases_and_is_within_two_ulp():
    """(CUDA's powf is within 2 ulp; the host emulation uses the C library's.)"""
    with np.errstate(all="ignore"):
        want = np.power(PAIRS[0].astype(np.float64), PAIRS[1].astype(np.float64)).astype(np.float32)
    _within_ulps(_elementwise("pow", F32, list(PAIRS)), want, 2)


@pytest.mark.parametrize("op", sorted(COMPARE))
def test_comparisons_are_numpys_on_nan(op):
    _same(_elementwise(op, F32, list(PAIRS), BOOL), COMPARE[op](PAIRS[0], PAIRS[1]))
    _same(_elementwise(op, I32, list(INT_PAIRS), BOOL), COMPARE[op](INT_PAIRS[0], INT_PAIRS[1]))


@pytest.mark.parametrize("op, fn", [("neg", np.negative), ("abs", np.abs), ("sign", np.sign)])
def test_exact_unary_ops(op, fn):
    _same(_elementwise(op, F32, [SPECIAL]), fn(SPECIAL))
    with np.errstate(all="ignore"):
        _same(_elementwise(op, I32, [INTS]), fn(INTS))


@pytest.mark.parametrize("op, fn", [("exp", np.exp), ("log", np.log), ("sqrt", np.sqrt), ("tanh", np.tanh),
                                    ("sigmoid", lambda v: 1 / (1 + np.exp(-v)))])
def test_transcendental_ops_within_two_ulp(op, fn):
    x = np.concatenate([SPECIAL, np.linspace(-90, 90, 301, dtype=np.float32)])
    got = _elementwise(op, F32, [x])
    with np.errstate(all="ignore"):
        want = fn(x.astype(np.float64)).astype(np.float32)
    _within_ulps(got, want, 2)


def test_integer_division_floors_and_division_by_zero_gives_zero():
    with np.errstate(all="ignore"):
        want = np.floor_divide(INT_PAIRS[0], INT_PAIRS[1])
        _same(_elementwise("div", I32, list(INT_PAIRS)), want)
        _same(_elementwise("max", I32, list(INT_PAIRS)), np.maximum(*INT_PAIRS))
        _same(_elementwise("min", I32, list(INT_PAIRS)), np.minimum(*INT_PAIRS))
        _same(_elementwise("add", I32, list(INT_PAIRS)), INT_PAIRS[0] + INT_PAIRS[1])


def test_casts_are_numpys_on_x86():
    with np.errstate(all="ignore"):
        big = np.array([3e9, -3e9, 2147483520.0, -2147483648.0, 2.9, -2.9], np.float32)
        x = np.concatenate([SPECIAL, big])
        _same(_elementwise("cast", F32, [x], I32), x.astype(np.int32))  # NaN, inf, out of range -> INT_MIN
    _same(_elementwise("cast", F32, [x], BOOL), x.astype(bool))       # NaN -> true
    _same(_elementwise("cast", I32, [INTS], F32), INTS.astype(np.float32))
    _same(_elementwise("cast", I32, [INTS], BOOL), INTS.astype(bool))
    flags = np.array([True, False, True])
    _same(_elementwise("cast", BOOL, [flags], F32), flags.astype(np.float32))
    _same(_elementwise("and", BOOL, [flags, flags[::-1].copy()]), flags & flags[::-1])


def test_select_and_copy():
    c = np.array([True, False, True, False])
    a = np.array([1.0, np.nan, -0.0, 4.0], np.float32)
    b = np.array([np.inf, 2.0, 3.0, -0.0], np.float32)
    _same(_elementwise("select", F32, [c, a, b]), np.where(c, a, b))
    _same(_elementwise("copy", F32, [a]), a)


def test_rand_is_bit_exact():
    seed, step, stream, shape = 1234567, 89, 3_000_000_001, (7, 33)

    def nests(x, bufs):
        i, j = x.var("i", 7), x.var("j", 33)
        flat = x.ravel((i, j), shape)
        r = x.rand(x.load(bufs["seed"], x.const(0)), x.load(bufs["step"], x.const(0)), stream, flat)
        return [LoopNest((i,), (j,), stores=[Store(bufs["out"], flat, r)])]
    got = _run(nests, {"seed": np.array(seed, np.int32), "step": np.array(step, np.int32)},
               {"out": (F32, shape)})["out"]
    np.testing.assert_array_equal(got, _random_ref(np.int32(seed), np.int32(step), shape, stream))


def test_index_arithmetic_on_negative_ranges_floors():
    """(i - 7) // 3 and (i - 7) % 3 for i < 15, Python's way; and a clamp."""
    def nests(x, bufs):
        i = x.var("i", 15)
        t = x.add(i, x.const(-7))
        stores = [Store(bufs["q"], i, x.index(x.div(t, 3), I32)), Store(bufs["r"], i, x.index(x.mod(t, 3), I32)),
                  Store(bufs["c"], i, x.index(x.clamp(t, -2, 4), F32))]
        return [LoopNest((i,), (), stores=stores)]
    out = _run(nests, {}, {"q": (I32, (15,)), "r": (I32, (15,)), "c": (F32, (15,))})
    t = np.arange(15) - 7
    _same(out["q"], (t // 3).astype(np.int32))
    _same(out["r"], (t % 3).astype(np.int32))
    _same(out["c"], np.clip(t, -2, 4).astype(np.float32))


def test_indices_beyond_32_bits_use_64_bit_arithmetic():
    """A buffer of 2**33 elements (never allocated: the source is only read)."""
    x = Exprs()
    big = Buffer("big", F32, (2**20, 2**13), "input")
    out = Buffer("out", F32, (2**20,), "arena", 0)
    i, j = x.var("i", 2**20), x.var("j", 2**13)
    nest = LoopNest((i,), (), row_stores=[Store(out, i, x.reduce("sum", (j,), x.load(big, x.ravel((i, j), big.shape)), F32))])
    program = KernelProgram([Kernel("k0", 0, [nest])], {"big": big, "out": out}, 2**22, {"out": out}, [],
                            {"big": big}, {})
    source = render_program(program).source
    assert "in_big[(long long)i * 8192 + (long long)j]" in source


def test_literals_are_exact():
    assert literal(0.1, F32) == "0.1f" and literal(1e-08, F32) == "1e-08f" and literal(3, F32) == "3.0f"
    assert literal(-0.0, F32) == "(-0.0f)" and literal(-2.5, DType.f64) == "(-2.5)"
    assert literal(math.inf, F32) == "DLC_INF_F" and literal(-math.inf, F32) == "(-DLC_INF_F)"
    assert literal(math.nan, F32) == "DLC_NAN_F" and literal(INT_MIN, I32) == "DLC_INT_MIN"
    assert literal(0.09999999999999998, F32) == "0.1f"  # rounded to float32 first
    assert literal(True, BOOL) == "true" and literal(-3, I32) == "(-3)"


# --- nests on the grid ------------------------------------------------------------------------------

def _row_nest(x, bufs, rows, length, op="sum", dtype=F32):
    r, j = x.var("r", rows), x.var("j", length)
    red = x.reduce(op, (j,), x.load(bufs["a"], x.ravel((r, j), (rows, length))), I32 if op == "argmax" else dtype)
    return LoopNest((r,), (), row_stores=[Store(bufs["out"], r, red)])


@pytest.mark.parametrize("rows, length, kind", [(5, 10, "thread_rows"), (3, 1000, "block_rows"),
                                                (5000, 40, "thread_rows"), (5000, 5000, "block_rows")])
def test_rows_map_to_threads_or_blocks(rows, length, kind):
    x = Exprs()
    a = Buffer("a", F32, (rows, length), "input")
    out = Buffer("out", F32, (rows,), "arena")
    assert plan_nest(_row_nest(x, {"a": a, "out": out}, rows, length)).kind == kind


def test_elementwise_nests_flatten_and_in_place_reads_elsewhere_stay_in_order():
    x = Exprs()
    a = Buffer("a", F32, (4, 300), "state")
    i, j = x.var("i", 4), x.var("j", 300)
    flat = x.ravel((i, j), (4, 300))
    plain = LoopNest((i,), (j,), stores=[Store(a, flat, x.op("neg", [x.load(a, flat)], F32))])
    assert plan_nest(plain).kind == "elements"
    shifted = x.ravel((i, x.clamp(x.add(j, x.const(1)), 0, 299)), (4, 300))
    chained = LoopNest((i,), (j,), stores=[Store(a, flat, x.load(a, shifted))])
    assert plan_nest(chained).kind == "thread_rows" and "in order" in plan_nest(chained).what


@pytest.mark.parametrize("op", ["sum", "max", "argmax"])
def test_block_reductions_match_numpy(op):
    """Rows of 1000 (one block of 1024 each): ties, -inf rows and NaN where they matter."""
    rows, length = 4, 1000
    rng = np.random.default_rng(7)
    a = rng.standard_normal((rows, length)).astype(np.float32)
    a[1] = -np.inf
    a[2, [10, 500, 999]] = 50.0          # a tie: the first wins
    a[3, [700, 900]] = np.nan            # NaN is the maximum, the first NaN wins
    dtype = I32 if op == "argmax" else F32

    def nests(x, bufs):
        return [_row_nest(x, bufs, rows, length, op)]
    program, bufs = _program(nests, {"a": a}, {"out": (dtype, (rows,))})
    assert plan_nest(program.kernels[0].parts[0]).kind == "block_rows"
    source, layout = CUDA.render(program, TARGET)
    got = HostStep(source, layout).run({}, {"a": a})["out"]
    if op == "argmax":
        _same(got, np.argmax(a, axis=1).astype(np.int32))
    elif op == "max":
        _same(got, np.max(a, axis=1))
    else:
        with np.errstate(all="ignore"):
            want = a.astype(np.float64).sum(axis=1)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        ok = np.isfinite(want)
        assert np.all(np.abs(got[ok] - want[ok]) <= 1e-5 * np.abs(a[ok]).sum(axis=1))
        assert got[1] == -np.inf


def test_row_nests_store_rows_then_elements():
    """softmax-like rows (block_rows and thread_rows): a row's max and sum, then every
    element, as numpy computes it."""
    for length in (10, 700):
        rows = 3
        a = np.random.default_rng(length).standard_normal((rows, length)).astype(np.float32)

        def nests(x, bufs):
            r, j, k, m = x.var("r", rows), x.var("j", length), x.var("k", length), x.var("m", length)
            at = lambda v: x.load(bufs["a"], x.ravel((r, v), (rows, length)))  # noqa: E731
            top = x.reduce("max", (k,), at(k), F32)
            total = x.reduce("sum", (m,), x.op("exp", [x.op("sub", [at(m), top], F32)], F32), F32)
            value = x.op("div", [x.op("exp", [x.op("sub", [at(j), top], F32)], F32), total], F32)
            return [LoopNest((r,), (j,), row_stores=[Store(bufs["s"], r, total)],
                             stores=[Store(bufs["p"], x.ravel((r, j), (rows, length)), value)])]
        out = _run(nests, {"a": a}, {"p": (F32, (rows, length)), "s": (F32, (rows,))})
        e = np.exp(a.astype(np.float64) - a.max(axis=1, keepdims=True))
        np.testing.assert_allclose(out["s"], e.sum(axis=1), rtol=1e-5)
        np.testing.assert_allclose(out["p"], e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)


def _two_part_program(shift: int):
    """part 0: t[i, j] = a[i, j] * 2; part 1: u[i, j] = t[i, clamp(j + shift)] + 1 (one kernel)."""
    a = np.arange(4 * 40, dtype=np.float32).reshape(4, 40)

    def nests(x, bufs):
        out = []
        for k in range(2):
            i, j = x.var(f"i{k}", 4), x.var(f"j{k}", 40)
            flat = x.ravel((i, j), (4, 40))
            if k == 0:
                value = x.op("mul", [x.load(bufs["a"], flat), x.lit(2.0, F32)], F32)
                out.append(LoopNest((i,), (j,), stores=[Store(bufs["t"], flat, value)]))
            else:
                src = x.ravel((i, x.clamp(x.add(j, x.const(shift)), 0, 39)), (4, 40))
                value = x.op("add", [x.load(bufs["t"], src), x.lit(1.0, F32)], F32)
                out.append(LoopNest((i,), (j,), stores=[Store(bufs["u"], flat, value)]))
        return out
    program, _ = _program(nests, {"a": a}, {"t": (F32, (4, 40)), "u": (F32, (4, 40))})
    return program, a


@pytest.mark.parametrize("shift, merged", [(0, True), (1, False)])
def test_parts_share_a_launch_only_when_each_thread_reads_its_own_elements(shift, merged):
    program, a = _two_part_program(shift)
    rendered = render_program(program)
    assert len(rendered.launches) == (1 if merged else 2)
    source, layout = CUDA.render(program, TARGET)
    out = HostStep(source, layout).run({}, {"a": a})
    t = a * 2
    _same(out["u"], t[:, np.clip(np.arange(40) + shift, 0, 39)] + 1)


def test_disjoint_slices_share_a_launch():
    """A concatenation: parts writing disjoint columns of one buffer run as one launch."""
    a = np.arange(3 * 5, dtype=np.float32).reshape(3, 5)

    def nests(x, bufs):
        out = []
        for k in range(3):
            i, j = x.var(f"i{k}", 3), x.var(f"j{k}", 5)
            value = x.op("add", [x.load(bufs["a"], x.ravel((i, j), (3, 5))), x.lit(float(k), F32)], F32)
            out.append(LoopNest((i,), (j,), stores=[Store(bufs["c"], x.ravel((i, x.add(j, x.const(5 * k))), (3, 15)),
                                                          value)]))
        return out
    program, _ = _program(nests, {"a": a}, {"c": (F32, (3, 15))})
    assert len(render_program(program).launches) == 1
    source, layout = CUDA.render(program, TARGET)
    _same(HostStep(source, layout).run({}, {"a": a})["c"], np.concatenate([a, a + 1, a + 2], axis=1))


def test_a_row_nest_never_shares_a_launch():
    """A reduction over a [3, 7] domain and an elementwise nest over [3, 7]: two launches."""
    a = np.arange(21, dtype=np.float32).reshape(3, 7)

    def nests(x, bufs):
        i, j = x.var("i", 3), x.var("j", 7)
        total = LoopNest((), (i, j), row_stores=[Store(bufs["s"], x.const(0),
                                                       x.reduce("sum", (i, j), x.load(bufs["a"], x.ravel((i, j), (3, 7))), F32))])
        p, q = x.var("p", 3), x.var("q", 7)
        flat = x.ravel((p, q), (3, 7))
        twice = LoopNest((p,), (q,), stores=[Store(bufs["d"], flat, x.op("add", [x.load(bufs["a"], flat)] * 2, F32))])
        return [total, twice]
    program, _ = _program(nests, {"a": a}, {"s": (F32, (1,)), "d": (F32, (3, 7))})
    assert len(render_program(program).launches) == 2
    source, layout = CUDA.render(program, TARGET)
    out = HostStep(source, layout).run({}, {"a": a})
    _same(out["s"], np.array([a.sum()], np.float32))
    _same(out["d"], a + a)


def test_loop_variables_named_like_the_generated_locals():
    """Rows over `row_` with inner `i_`, reductions over `v1`: renamed, not shadowed."""
    rows, length = 2, 300
    a = np.arange(rows * length, dtype=np.float32).reshape(rows, length) / 100

    def nests(x, bufs):
        r, i, v = x.var("row_", rows), x.var("i_", length), x.var("v1", length)
        at = lambda k: x.load(bufs["a"], x.ravel((r, k), (rows, length)))  # noqa: E731
        total = x.reduce("sum", (v,), at(v), F32)
        return [LoopNest((r,), (i,), stores=[Store(bufs["out"], x.ravel((r, i), (rows, length)),
                                                   x.op("sub", [at(i), total], F32))])]
    program, _ = _program(nests, {"a": a}, {"out": (F32, (rows, length))})
    assert plan_nest(program.kernels[0].parts[0]).kind == "block_rows"
    source, layout = CUDA.render(program, TARGET)
    assert "lv_row_" in source and "lv_i_" in source and "lv_v1" in source
    got = HostStep(source, layout).run({}, {"a": a})["out"]
    np.testing.assert_allclose(got, a - a.sum(axis=1, keepdims=True), rtol=1e-5)
