"""Every graph pass, one small graph at a time (TVM style: `before` -> pass -> `expected`).

Each rewrite test builds a `before` graph and an `expected` graph with GraphBuilder, runs
the pass on `before` and compares the printed text (`dlc.printer.print_graph`) with the
text of `expected`; it also runs both graphs on the reference interpreter (float64) on
random inputs, and checks that the pass left its input graph untouched.

- simplify        every rule of passes/simplify.py, and a graph no rule touches
- fold_constants  constant subgraphs fold (bit for bit like the interpreter); broadcasts,
                  iota, random and results over FOLD_LIMIT elements stay; `size` folds only
                  once the shape it counts is static
- cse, dce        what merges and what does not; what dies and what stays
- specialize      symbols bound in types and attributes; bind_symbols reads the bindings
- fuse            the expected grouping of small graphs (elementwise chain, softmax,
                  matmul + bias + relu, a value read by two matmuls, multi-tensor updates)
                  and the plan's invariants (check_fusion): kernels are disjoint and cover
                  every non-free node, phases respect dependencies, kernels fit their loop,
                  values read by another kernel are stored; explain() gives a reason for
                  every producer/consumer pair split across kernels (check_reasons)
- memory          the plan's invariants (check_memory): buffers live at the same time never
                  share bytes, lifetimes cover every read, in-place updates only when every
                  other reader of the old value runs in an earlier phase, and the arena is
                  never larger than one buffer per node

check_fusion, check_reasons and check_memory are used by tests/test_pipeline.py as well.
Known bugs are tests marked xfail(strict=True) with the reason: a fix makes them XPASS,
which fails, so the mark must be removed with the fix.
"""
from __future__ import annotations

import numpy as np
import pytest

from dlc.core import ops
from dlc.backends.reference import run_graph
from dlc.core.builder import GraphBuilder, Value
from dlc.core.graph import Graph
from dlc.passes import fold_constants as fold_module
from dlc.passes.cse import cse
from dlc.passes.dce import dce
from dlc.passes.fold_constants import fold_constants
from dlc.passes.fuse import CHEAP, REDUCTIONS, Free, _reads_memory, fuse, is_anchor, kept_axes, numel
from dlc.passes.memory import nbytes, plan_memory
from dlc.passes.simplify import simplify
from dlc.passes.specialize import bind_symbols, is_symbolic, specialize
from dlc.core.printer import print_graph
from dlc.core.types import DType, TensorType, dim_mul, sym

F32, I32, BOOL = DType.f32, DType.i32, DType.bool
B = sym("B")
BATCH = 5  # the value bound to B when a symbolic graph is run


# --- building and running small graphs ---------------------------------------------------------------

def graph(build, name: str = "t") -> Graph:
    """A graph from `build(b)`, which returns a Value (the result `output`) or a dict of
    results; keys `update:<name>` become updates of the param/state input <name>."""
    g = Graph(name)
    b = GraphBuilder(g)
    results = build(b)
    if isinstance(results, Value):
        results = {"output": results}
    for key, v in results.items():
        if key.startswith("update:"):
            g.updates[key[len("update:"):]] = v.id
        else:
            g.outputs[key] = v.id
    g.verify()
    return g


def inp(b: GraphBuilder, name: str, shape=(3, 4), dtype: DType = F32, role: str = "data") -> Value:
    return b.input(name, TensorType(dtype, tuple(shape)), role)


def random_feeds(g: Graph, seed: int = 0, batch: int = BATCH) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for nid in g.inputs():
        a = g.node(nid).attrs
        shape = tuple(d if isinstance(d, int) else batch for d in a["type"].shape)
        dtype = a["type"].dtype
        if dtype.is_float:
            x = rng.standard_normal(shape)
        elif dtype == BOOL:
            x = rng.random(shape) < 0.5
        else:
            x = rng.integers(0, 4, shape)
        feeds[a["name"]] = np.asarray(x, dtype=np.float64 if dtype.is_float else dtype.np)
    return feeds


def run(g: Graph, feeds, float_dtype=np.float64) -> dict[str, np.ndarray]:
    names = {g.node(i).attrs["name"] for i in g.inputs()}
    return run_graph(g, {k: v for k, v in feeds.items() if k in names}, float_dtype=float_dtype)


def assert_same_values(before: Graph, after: Graph, rtol: float = 1e-12, seed: int = 0,
                       float_dtype=np.float64) -> None:
    """Both graphs give the same results on random inputs. float32 runs must agree bit for bit."""
    feeds = random_feeds(before, seed)
    want, got = run(before, feeds, float_dtype), run(after, feeds, float_dtype)
    assert set(got) == set(want)
    for k in want:
        if float_dtype is np.float32:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        else:
            np.testing.assert_allclose(np.asarray(got[k], np.float64), np.asarray(want[k], np.float64),
                                       rtol=rtol, atol=rtol, equal_nan=True, err_msg=k)


def assert_rewrites(pass_fn, before, expected=None, check_values: bool = True, float_dtype=np.float64) -> Graph:
    """Run pass_fn on graph(before); its text must be that of graph(expected) (default: the
    same as before: nothing changes). The input graph is left as it was, and both graphs
    give the same values (in float32 for fold_constants: it evaluates constants at the
    graph's f32 precision, which a float64 run of the unfolded graph does not)."""
    g = graph(before)
    text_before = print_graph(g)
    out = pass_fn(g)
    out.verify()
    assert print_graph(g) == text_before, "the pass changed its input graph"
    want = graph(expected if expected is not None else before)
    assert print_graph(out) == print_graph(want)
    if check_values:
        assert_same_values(g, out, float_dtype=float_dtype)
    return out


def ops_of(g: Graph) -> list[str]:
    return [g.node(n).op.name for n in g.toposort() if g.node(n).op is not ops.INPUT]


# --- simplify: one test per rule ------------------------------------------------------------------

def test_simplify_add_zero_right():
    assert_rewrites(simplify, lambda b: inp(b, "x") + 0.0, lambda b: inp(b, "x"))


def test_simplify_add_zero_left():
    assert_rewrites(simplify, lambda b: 0.0 + inp(b, "x"), lambda b: inp(b, "x"))


def test_simplify_add_zero_scalar():
    assert_rewrites(simplify, lambda b: inp(b, "x", ()) + 0.0, lambda b: inp(b, "x", ()))


def test_simplify_sub_zero():
    assert_rewrites(simplify, lambda b: inp(b, "x") - 0.0, lambda b: inp(b, "x"))


def test_simplify_zero_sub_is_neg():
    assert_rewrites(simplify, lambda b: 0.0 - inp(b, "x"), lambda b: -inp(b, "x"))


def test_simplify_mul_one_both_sides():
    assert_rewrites(simplify, lambda b: inp(b, "x") * 1.0, lambda b: inp(b, "x"))
    assert_rewrites(simplify, lambda b: 1.0 * inp(b, "x"), lambda b: inp(b, "x"))


def test_simplify_div_one():
    assert_rewrites(simplify, lambda b: inp(b, "x") / 1.0, lambda b: inp(b, "x"))


def test_simplify_one_div_x_stays():
    assert_rewrites(simplify, lambda b: 1.0 / inp(b, "x"))


def test_simplify_neg_neg():
    assert_rewrites(simplify, lambda b: -(-inp(b, "x")), lambda b: inp(b, "x"))
    # three negations leave one
    assert_rewrites(simplify, lambda b: -(-(-inp(b, "x"))), lambda b: -inp(b, "x"))


def test_simplify_pow_one():
    assert_rewrites(simplify, lambda b: inp(b, "x") ** 1.0, lambda b: inp(b, "x"))


def test_simplify_pow_two_is_mul():
    def expected(b):
        x = inp(b, "x")
        return b.emit(ops.MUL, (x, x))
    assert_rewrites(simplify, lambda b: inp(b, "x") ** 2.0, expected)


def test_simplify_pow_half_is_sqrt():
    assert_rewrites(simplify, lambda b: inp(b, "x") ** 0.5, lambda b: b.sqrt(inp(b, "x")))


def test_simplify_pow_other_exponents_stay():
    assert_rewrites(simplify, lambda b: inp(b, "x") ** 3.0)
    assert_rewrites(simplify, lambda b: inp(b, "x") ** inp(b, "y"))
    assert_rewrites(simplify, lambda b: b.binary(ops.POW, 2.0, inp(b, "x")))  # a constant base stays


def test_simplify_drops_stop_gradient():
    assert_rewrites(simplify, lambda b: b.exp(b.stop_gradient(inp(b, "x"))), lambda b: b.exp(inp(b, "x")))


def test_simplify_cast_to_same_type():
    assert_rewrites(simplify, lambda b: b.emit(ops.CAST, (inp(b, "x"),), dtype=F32), lambda b: inp(b, "x"))


def test_simplify_cast_to_other_type_stays():
    assert_rewrites(simplify, lambda b: b.cast(inp(b, "x"), I32))


def test_simplify_where_same_branches():
    def before(b):
        c, x = inp(b, "c", dtype=BOOL), inp(b, "x")
        return b.where(c, x, x)
    def expected(b):
        inp(b, "c", dtype=BOOL)
        return inp(b, "x")
    assert_rewrites(simplify, before, expected)


@pytest.mark.parametrize("cond", [True, False])
def test_simplify_where_constant_condition(cond):
    def before(b):
        x, y = inp(b, "x"), inp(b, "y")
        return b.where(b.const(cond, BOOL), x, y)  # the scalar condition is broadcast

    def expected(b):
        x, y = inp(b, "x"), inp(b, "y")
        return x if cond else y
    assert_rewrites(simplify, before, expected)


def test_simplify_where_unknown_condition_stays():
    assert_rewrites(simplify, lambda b: b.where(inp(b, "c", dtype=BOOL), inp(b, "x"), inp(b, "y")))


def test_simplify_reshape_of_reshape():
    def before(b):
        return b.reshape(b.reshape(inp(b, "x", (2, 3, 4)), (6, 4)), (4, 6))
    assert_rewrites(simplify, before, lambda b: b.reshape(inp(b, "x", (2, 3, 4)), (4, 6)))


def test_simplify_reshape_there_and_back():
    def before(b):
        return b.exp(b.reshape(b.reshape(inp(b, "x", (2, 3, 4)), (24,)), (2, 3, 4)))
    assert_rewrites(simplify, before, lambda b: b.exp(inp(b, "x", (2, 3, 4))))


def test_simplify_reshape_to_same_shape():
    assert_rewrites(simplify, lambda b: b.emit(ops.RESHAPE, (inp(b, "x"),), shape=(3, 4)),
                    lambda b: inp(b, "x"))


def test_simplify_permute_of_permute():
    # non-commuting permutations: the composition order matters
    p1, p2 = (1, 0, 2), (0, 2, 1)
    composed = (1, 2, 0)  # transpose(transpose(x, p1), p2) == transpose(x, (1, 2, 0))
    x = np.arange(24).reshape(2, 3, 4)
    np.testing.assert_array_equal(np.transpose(np.transpose(x, p1), p2), np.transpose(x, composed))
    assert_rewrites(simplify, lambda b: b.permute(b.permute(inp(b, "x", (2, 3, 4)), p1), p2),
                    lambda b: b.permute(inp(b, "x", (2, 3, 4)), composed))


def test_simplify_permute_then_inverse():
    assert_rewrites(simplify, lambda b: b.exp(b.permute(b.permute(inp(b, "x", (2, 3, 4)), (1, 2, 0)), (2, 0, 1))),
                    lambda b: b.exp(inp(b, "x", (2, 3, 4))))


def test_simplify_broadcast_of_broadcast():
    def before(b):
        inner = b.broadcast(inp(b, "x", (4,)), (3, 4), (1,))
        return b.broadcast(inner, (2, 3, 4), (1, 2))
    assert_rewrites(simplify, before, lambda b: b.broadcast(inp(b, "x", (4,)), (2, 3, 4), (2,)))


def test_simplify_broadcast_of_broadcast_stretching_ones():
    def before(b):
        inner = b.broadcast(inp(b, "x", (1, 4)), (5, 4), (0, 1))      # stretches the 1
        return b.broadcast(inner, (5, 3, 4), (0, 2))
    assert_rewrites(simplify, before, lambda b: b.broadcast(inp(b, "x", (1, 4)), (5, 3, 4), (0, 2)))


def test_simplify_broadcast_to_same_shape():
    assert_rewrites(simplify, lambda b: b.emit(ops.BROADCAST, (inp(b, "x"),), shape=(3, 4), axes=(0, 1)),
                    lambda b: inp(b, "x"))


def test_simplify_whole_slice():
    assert_rewrites(simplify, lambda b: b.emit(ops.SLICE, (inp(b, "x"),), starts=(0, 0), stops=(3, 4),
                                               steps=(1, 1)),
                    lambda b: inp(b, "x"))


def test_simplify_partial_slice_stays():
    assert_rewrites(simplify, lambda b: b.slice(inp(b, "x"), (0, 1), (3, 4)))
    assert_rewrites(simplify, lambda b: b.slice(inp(b, "x"), (0, 0), (3, 4), (1, 2)))


def test_simplify_matmul_transposed_left():
    assert_rewrites(simplify, lambda b: b.permute(inp(b, "a", (4, 3)), (1, 0)) @ inp(b, "c", (4, 5)),
                    lambda b: b.matmul(inp(b, "a", (4, 3)), inp(b, "c", (4, 5)), ta=True))


def test_simplify_matmul_transposed_right():
    assert_rewrites(simplify, lambda b: inp(b, "a", (3, 4)) @ b.permute(inp(b, "c", (5, 4)), (1, 0)),
                    lambda b: b.matmul(inp(b, "a", (3, 4)), inp(b, "c", (5, 4)), tb=True))


def test_simplify_matmul_transposed_both_and_flag_flips_back():
    def before(b):
        a, c = inp(b, "a", (4, 3)), inp(b, "c", (5, 4))
        return b.matmul(b.permute(a, (1, 0)), b.permute(c, (1, 0)))
    assert_rewrites(simplify, before,
                    lambda b: b.matmul(inp(b, "a", (4, 3)), inp(b, "c", (5, 4)), ta=True, tb=True))

    def before2(b):  # already transposed: permute(a)^T is a itself
        a, c = inp(b, "a", (3, 4)), inp(b, "c", (4, 5))
        return b.matmul(b.permute(a, (1, 0)), c, ta=True)
    assert_rewrites(simplify, before2, lambda b: inp(b, "a", (3, 4)) @ inp(b, "c", (4, 5)))


def test_simplify_matmul_keeps_a_permute_with_other_users():
    def before(b):
        at = b.permute(inp(b, "a", (4, 3)), (1, 0))
        return {"output": at @ inp(b, "c", (4, 5)), "t": at}

    def expected(b):
        a, c = inp(b, "a", (4, 3)), inp(b, "c", (4, 5))
        t = b.permute(a, (1, 0))
        return {"output": b.matmul(a, c, ta=True), "t": t}
    assert_rewrites(simplify, before, expected)


def test_simplify_batch_matmul_transposed_stacks():
    # a stack with its matrices transposed: the flag instead
    assert_rewrites(simplify, lambda b: b.batch_matmul(b.permute(inp(b, "a", (2, 4, 3)), (0, 2, 1)),
                                                       inp(b, "c", (2, 4, 5))),
                    lambda b: b.batch_matmul(inp(b, "a", (2, 4, 3)), inp(b, "c", (2, 4, 5)), ta=True))

    # attention's keys [B, H, T, d], swapped to [B, H, d, T] and flattened to [B*H, d, T]:
    # flattened unswapped, read transposed
    def keys(b):
        q, k = inp(b, "q", (2, 3, 4, 5)), inp(b, "k", (2, 3, 4, 5))
        kt = b.reshape(b.permute(k, (0, 1, 3, 2)), (6, 5, 4))
        return b.batch_matmul(b.reshape(q, (6, 4, 5)), kt)

    def flagged(b):
        q, k = inp(b, "q", (2, 3, 4, 5)), inp(b, "k", (2, 3, 4, 5))
        return b.batch_matmul(b.reshape(q, (6, 4, 5)), b.reshape(k, (6, 4, 5)), tb=True)
    assert_rewrites(simplify, keys, flagged)

    def other_permute(b):  # not a swap of each matrix's two axes: left as it is
        q, k = inp(b, "q", (2, 4, 3, 5)), inp(b, "k", (2, 3, 4, 5))
        return b.batch_matmul(b.reshape(q, (8, 3, 5)), b.reshape(b.permute(k, (0, 2, 3, 1)), (8, 5, 3)))
    assert_rewrites(simplify, other_permute)


def test_simplify_elementwise_on_broadcast_scalars():
    assert_rewrites(simplify, lambda b: b.full(2.0, (3, 4)) * b.full(3.0, (3, 4)), lambda b: b.full(6.0, (3, 4)))


def test_simplify_elementwise_on_broadcast_scalars_chain():
    def before(b):
        x = inp(b, "x")
        k = b.exp(b.full(0.0, (3, 4))) + b.full(2.0, (3, 4))       # exp(0) + 2 = 3
        return x * k
    assert_rewrites(simplify, before, lambda b: inp(b, "x") * b.full(3.0, (3, 4)))


def test_simplify_elementwise_on_broadcast_scalars_compare_and_where():
    def before(b):
        c = b.lt(b.full(1.0, (3, 4)), b.full(2.0, (3, 4)))         # true everywhere
        return b.where(c, b.full(5.0, (3, 4)), inp(b, "x"))
    def expected(b):
        inp(b, "x")  # still an input, now unused
        return b.full(5.0, (3, 4))
    assert_rewrites(simplify, before, expected)


def test_simplify_leaves_scalar_constant_math_to_fold_constants():
    # f(c1, c2) on rank-0 constants is fold_constants' job, not simplify's
    assert_rewrites(simplify, lambda b: inp(b, "x", ()) * (b.const(2.0) * b.const(3.0)))


def test_simplify_no_rule_applies():
    def before(b):
        x, w, y = inp(b, "x", (4, 8)), inp(b, "w", (8, 3), role="param"), inp(b, "y", (4, 3))
        h = b.maximum(x @ w, 0.0)
        z = b.sum(b.exp(h) * y + b.log(y), 1)
        return {"output": b.reshape(z, (2, 2)), "t": b.permute(h, (1, 0)) / 2.0}
    g = assert_rewrites(simplify, before)
    assert len(g) == len(graph(before))


def test_simplify_is_idempotent():
    def before(b):
        x = inp(b, "x", (2, 3, 4))
        y = b.reshape(b.reshape(-(-x), (6, 4)), (4, 6)) * 1.0 + 0.0
        return b.permute(b.permute(y, (1, 0)), (1, 0)) ** 2.0
    once = simplify(graph(before))
    assert print_graph(simplify(once)) == print_graph(once)


def test_simplify_rule_table_covers_the_documented_rules():
    """The rules tested above are the rules the table holds (adding a rule means adding a test)."""
    from dlc.passes import simplify as s
    names = {fn.__name__ for rules in s.RULES.values() for fn in rules}
    assert names == {"add_zero", "sub_zero", "mul_one", "div_one", "neg_neg", "pow_small",
                     "drop_stop_gradient", "cast_same", "where_same", "reshape_reshape",
                     "permute_permute", "broadcast_broadcast", "slice_whole", "matmul_transposed",
                     "batch_matmul_transposed", "_elementwise_on_scalars"}


# --- fold_constants --------------------------------------------------------------------------------

def assert_folds(before, expected=None) -> Graph:
    return assert_rewrites(fold_constants, before, expected, float_dtype=np.float32)


def test_fold_constant_subgraph():
    def before(b):
        return inp(b, "x", ()) * (b.exp(b.const(1.0)) + 2.0)
    k = np.float32(np.exp(np.float32(1.0))) + np.float32(2.0)
    assert_folds(before, lambda b: inp(b, "x", ()) * b.const(k))


def test_fold_constants_whole_result():
    g = assert_folds(lambda b: b.sqrt(b.const(2.0)) * b.const(3.0),
                        lambda b: b.const(np.float32(np.sqrt(np.float32(2.0))) * np.float32(3.0)))
    assert ops_of(g) == ["const"]


def test_fold_constants_small_array():
    def before(b):
        parts = [b.reshape(b.const(v), (1,)) for v in (1.0, 2.0, 3.0)]
        return b.exp(b.concat(parts, 0))
    g = fold_constants(graph(before))
    (node,) = [g.node(n) for n in g.ids()]
    assert node.op is ops.CONST and node.type == TensorType(F32, (3,))
    # constants are exact (float64) until the graph's float32 result is rounded, once
    np.testing.assert_array_equal(np.float32(node.attrs["value"]), np.float32(np.exp([1.0, 2.0, 3.0])))


def test_fold_constants_matches_the_interpreter_bit_for_bit():
    """Folding evaluates with the ops' own numpy rules at the graph's precision: the folded
    graph gives exactly what the interpreter gives (float32), NaN and inf included."""
    def before(b):
        two, m3, zero = b.const(2.0), b.const(-3.0), b.const(0.0)
        vals = {"exp": b.exp(m3), "log": b.log(m3), "sqrt": b.sqrt(two), "tanh": b.tanh(m3),
                "sigmoid": b.sigmoid(m3), "abs": b.abs(m3), "sign": b.sign(m3), "neg": -two,
                "add": two + m3, "sub": two - m3, "mul": two * m3, "div": two / zero, "pow": m3 ** 0.5,
                "max": b.maximum(two, m3), "min": b.minimum(two, m3), "lt": b.lt(two, m3),
                "eq": b.eq(two, two), "cast": b.cast(m3, I32), "idiv": b.const(7, I32) / b.const(-2, I32),
                "where": b.where(b.lt(m3, two), two, m3)}
        return vals
    g = graph(before)
    folded = fold_constants(g)
    assert set(ops_of(folded)) == {"const"}
    want, got = run(g, {}, np.float32), run(folded, {}, np.float32)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        assert got[k].dtype == want[k].dtype, k


def test_fold_constants_keeps_broadcasts_of_constants():
    # broadcast(c) would become a full-size array every kernel reads: it stays
    assert_folds(lambda b: inp(b, "x") * b.full(2.0, (3, 4)))
    assert_folds(lambda b: b.full(2.0, (2, 2)))
    # ... but what it broadcasts folds
    assert_folds(lambda b: b.broadcast(b.exp(b.const(0.0)), (2, 2)), lambda b: b.full(1.0, (2, 2)))


def test_fold_constants_keeps_iota():
    def before(b):
        return b.eq(b.iota((2, 3), 1), b.full(1, (2, 3), I32))
    assert_folds(before)


def test_fold_constants_keeps_random():
    def before(b):
        return b.emit(ops.RANDOM, (b.const(1, I32), b.const(2, I32)), shape=(2, 2), stream=7)
    assert_folds(before)


@pytest.mark.parametrize("n,folds", [(fold_module.FOLD_LIMIT, True), (fold_module.FOLD_LIMIT + 1, False)])
def test_fold_constants_size_limit(n, folds):
    def before(b):
        c = b.emit(ops.CONST, value=np.arange(n, dtype=np.float32), dtype=F32)
        return b.exp(c)
    g = graph(before)
    out = fold_constants(g)
    assert ops_of(out) == (["const"] if folds else ["const", "exp"])
    assert_same_values(g, out, float_dtype=np.float32)


def test_fold_size_of_static_shape():
    def before(b):
        x, y = inp(b, "x"), inp(b, "y", (3, 4))
        return b.sum(x) / b.size(y, (0, 1))

    def expected(b):
        x, _ = inp(b, "x"), inp(b, "y", (3, 4))
        return b.sum(x) / 12.0
    assert_folds(before, expected)


def test_fold_size_waits_for_a_symbolic_shape():
    def before(b):
        x = inp(b, "x", (B, 4))
        return b.sum(x) / b.size(x, (0,))
    g = assert_folds(before)
    assert "size" in ops_of(g)
    # once B is bound it folds
    g5 = fold_constants(specialize(g, {"B": 5}))
    assert "size" not in ops_of(g5)
    assert_same_values(g, g5, float_dtype=np.float32)


def test_fold_size_of_static_axes_of_a_symbolic_tensor():
    def before(b):
        x = inp(b, "x", (B, 4))
        return b.sum(x, 1) / b.size(x, (1,))
    assert "size" not in ops_of(fold_constants(graph(before)))


# --- cse -------------------------------------------------------------------------------------------

def test_cse_merges_duplicates():
    def before(b):
        x = inp(b, "x")
        return b.exp(x) + b.exp(x)

    def expected(b):
        e = b.exp(inp(b, "x"))
        return e + e
    assert_rewrites(cse, before, expected)


def test_cse_merges_whole_chains_and_constants():
    def before(b):
        x = inp(b, "x")
        return {"a": b.log(b.exp(x) * 2.0), "b": b.log(b.exp(x) * 2.0)}

    def expected(b):
        v = b.log(b.exp(inp(b, "x")) * 2.0)
        return {"a": v, "b": v}
    g = assert_rewrites(cse, before, expected)
    assert g.outputs["a"] == g.outputs["b"]


def test_cse_keeps_different_attributes():
    def before(b):
        x, s, t = inp(b, "x", (3, 3)), inp(b, "s", (), I32), inp(b, "t", (), I32)
        return {"a": b.sum(x, 0), "b": b.sum(x, 1), "c": x @ x, "d": b.matmul(x, x, ta=True),
                "e": b.permute(x, (1, 0)),
                "f": b.emit(ops.RANDOM, (s, t), shape=(3, 3), stream=1),
                "g": b.emit(ops.RANDOM, (s, t), shape=(3, 3), stream=2)}
    g = assert_rewrites(cse, before)
    assert len(set(g.outputs.values())) == 7


def test_cse_keeps_different_constants():
    def before(b):
        x = inp(b, "x", ())
        return {"a": x * b.const(2.0), "b": x * b.const(3.0), "c": x * b.const(0.0), "d": x * b.const(-0.0),
                "e": b.cast(x, I32) * b.const(2, I32)}
    assert_rewrites(cse, before)


def test_cse_respects_operand_order():
    def before(b):
        x, y = inp(b, "x"), inp(b, "y")
        return {"a": x - y, "b": y - x}
    assert_rewrites(cse, before)


def test_cse_never_merges_inputs():
    def before(b):
        x, y = inp(b, "x"), inp(b, "y")   # same type, same role
        return {"a": b.exp(x), "b": b.exp(y)}
    g = assert_rewrites(cse, before)
    assert len(g.inputs()) == 2


# --- dce -------------------------------------------------------------------------------------------

def test_dce_removes_dead_nodes_keeps_inputs_outputs_and_updates():
    def before(b):
        x, w = inp(b, "x"), inp(b, "w", role="param")
        inp(b, "unused", (2,))                     # an input nothing reads: kept
        b.log(b.exp(x))                            # dead: reaches no result
        return {"output": b.exp(x), "update:w": w - b.tanh(x) * 0.1}

    def expected(b):
        x, w, _ = inp(b, "x"), inp(b, "w", role="param"), inp(b, "unused", (2,))
        return {"output": b.exp(x), "update:w": w - b.tanh(x) * 0.1}
    g = assert_rewrites(dce, before, expected)
    assert len(g.inputs()) == 3


def test_dce_on_a_live_graph_changes_nothing():
    assert_rewrites(dce, lambda b: {"output": b.exp(inp(b, "x")), "update:s": inp(b, "s", role="state") + 1.0})


# --- specialize and bind_symbols --------------------------------------------------------------------

def _symbolic(batch):
    """The same graph over f32[batch, 8], batch a number or the symbol B: symbols in input
    types, node types, reshape/slice/broadcast attributes, and a product dimension 4*B."""
    def build(b):
        x, w = inp(b, "x", (batch, 8)), inp(b, "w", (8, 4), role="param")
        h = b.reshape(x @ w, (batch, 2, 2))
        first = b.slice(h, (0, 0, 0), (batch, 1, 2))
        flat = b.reshape(h, (dim_mul(4, batch),))
        return {"output": b.sum(first, (1, 2)) / b.size(x, (0,)), "flat": flat,
                "wide": b.broadcast(b.sum(h, (1, 2)), (batch, 3), (0,))}
    return build


def test_specialize_binds_symbols_everywhere():
    g = graph(_symbolic(B))
    assert is_symbolic(g)
    s = specialize(g, {"B": 5})
    assert not is_symbolic(s)
    assert s.meta["bindings"] == {"B": 5}
    assert print_graph(s) == print_graph(graph(_symbolic(5)))
    assert "B" in print_graph(g)  # the input is not changed
    assert_same_values(g, s)


def test_specialize_partial_bindings_leave_other_symbols():
    def build(b):
        return b.exp(inp(b, "x", (B, sym("T"))))
    s = specialize(graph(build), {"B": 2})
    assert str(s.node(s.outputs["output"]).type) == "f32[2,T]"
    assert is_symbolic(s)


def test_bind_symbols_reads_input_shapes():
    g = graph(lambda b: {"output": b.exp(inp(b, "x", (B, 8))), "l": b.cast(inp(b, "label", (B,), I32), F32)})
    assert bind_symbols(g, {"x": (7, 8)}) == {"B": 7}
    assert bind_symbols(g, {"x": (7, 8), "label": (7,)}) == {"B": 7}
    assert bind_symbols(g, {"other": (1, 2)}) == {}
    with pytest.raises(ValueError):
        bind_symbols(g, {"x": (7, 8), "label": (6,)})  # B is 7 and 6
    with pytest.raises(ValueError):
        bind_symbols(g, {"x": (7, 9)})                 # a static dimension differs


# --- fuse: invariants ---------------------------------------------------------------------------------

def producers(g: Graph, free: Free, nid: int) -> set[int]:
    """The stored values node nid reads: its operands, looking through free (recomputed)
    nodes, inputs excluded."""
    out, stack = set(), list(g.operands(nid))
    while stack:
        q = stack.pop()
        if g.node(q).op is ops.INPUT:
            continue
        if free(q):
            stack.extend(g.operands(q))
        else:
            out.add(q)
    return out


def check_fusion(g: Graph) -> list[str]:
    """What is wrong with the fusion plan in g.meta["fusion"] (empty: nothing)."""
    plan = g.meta["fusion"]
    free = g.meta["fusion"].free
    problems = []
    phase = {k.id: k.phase for k in plan.kernels}
    if sorted(phase) != list(range(len(plan.kernels))):
        problems.append(f"kernel ids are not 0..{len(plan.kernels) - 1}: {sorted(phase)}")
    owner: dict[int, int] = {}
    for k in plan.kernels:
        for n in k.nodes:
            if n in owner:
                problems.append(f"node {n} is in k{owner[n]} and k{k.id}")
            owner[n] = k.id
        if k.parts and sorted(n for p in k.parts for n in p.nodes) != sorted(k.nodes):
            problems.append(f"k{k.id}: its parts do not hold its nodes")
    if owner != plan.group_of:
        problems.append("group_of disagrees with the kernels' node lists")
    for nid in g.ids():
        n = g.node(nid)
        if n.op is ops.INPUT or free(nid):
            if nid in owner:
                problems.append(f"{'input' if n.op is ops.INPUT else 'free'} node {nid} ({n.op.name}) is in k{owner[nid]}")
        elif nid not in owner:
            problems.append(f"node {nid} ({n.op.name}) is in no kernel")
    for r in g.roots():
        if g.node(r).op is not ops.INPUT and r not in plan.materialized:
            problems.append(f"result {r} is not stored")
    for c, kc in owner.items():
        for p in producers(g, free, c):
            kp = owner.get(p)
            if kp is None:
                continue
            if kp != kc:
                if phase[kp] >= phase[kc]:
                    problems.append(f"{p} ({g.node(p).op.name}, k{kp} phase {phase[kp]}) is read by {c} "
                                    f"({g.node(c).op.name}, k{kc} phase {phase[kc]}): not an earlier phase")
                if p not in plan.materialized:
                    problems.append(f"{p} is read by another kernel but not stored")
            elif _reads_memory(g, c) and p not in plan.materialized:
                problems.append(f"{g.node(c).op.name} {c} reads {p}, which is not stored")
        if _reads_memory(g, c):  # (a concat computes its pieces in its own loops)
            for o in g.operands(c):  # contractions read memory: a stored value or an input's array
                on = g.node(o)
                if not (on.op is ops.INPUT or o in plan.materialized
                        or (on.op is ops.RESHAPE and (g.node(on.operands[0]).op is ops.INPUT
                                                      or on.operands[0] in plan.materialized))):
                    problems.append(f"{g.node(c).op.name} {c} reads {o} ({on.op.name}), which has no buffer")
    for k in plan.kernels:
        stored = [n for n in k.nodes if n in plan.materialized]
        if sorted(k.outputs) != sorted(stored):
            problems.append(f"k{k.id}: outputs {k.outputs} but stores {stored}")
        if k.kind == "scan":  # a loop: the scan and its results; its body is a plan of its own
            problems += _check_scan_kernel(g, k)
            continue
        for part in k.parts or [k]:
            problems += _check_loop(g, k, part)
        if k.parts:  # the loops of a multi-tensor kernel are independent
            part_of = {n: i for i, p in enumerate(k.parts) for n in p.nodes}
            for n, i in part_of.items():
                for p in producers(g, free, n):
                    if part_of.get(p, i) != i:
                        problems.append(f"k{k.id}: loop {i} reads {p} from loop {part_of[p]} in the same phase")
    return problems


def _check_scan_kernel(g: Graph, k) -> list[str]:
    problems = []
    want = sorted([k.anchor, *g.users(k.anchor)])
    if g.node(k.anchor).op is not ops.SCAN or sorted(k.nodes) != want or k.parts:
        problems.append(f"k{k.id}: a scan kernel holds {sorted(k.nodes)}, not its scan and results {want}")
    if k.body is None or "fusion" not in k.body.meta:
        return problems + [f"k{k.id}: the loop body is not fused"]
    return problems + [f"k{k.id} body: {p}" for p in check_fusion(k.body)]


def _check_loop(g: Graph, k, part) -> list[str]:
    """Each node fits the loop it is computed in (F2, F4, F5)."""
    problems = []
    anchors = [n for n in part.nodes if is_anchor(g, n)]
    if part.kind in ("elementwise", "reduce") and anchors:
        problems.append(f"k{k.id}: a {part.kind} loop holds {g.node(anchors[0]).op.name}")
    if part.kind not in ("elementwise", "reduce"):
        if len(anchors) != 1:
            problems.append(f"k{k.id}: a {part.kind} kernel with anchors {anchors}")
        if part.anchor not in anchors:
            problems.append(f"k{k.id}: anchor {part.anchor} is not among its nodes")
    for n in part.nodes:
        node = g.node(n)
        size = numel(node.type.shape)
        if is_anchor(g, n) or node.op in CHEAP:
            continue
        if node.op in REDUCTIONS:
            shape_in = tuple(g.node(node.operands[0]).type.shape)
            if part.kind != "reduce" or (shape_in, kept_axes(node)) != (part.domain, part.keep):
                problems.append(f"k{k.id} ({part.kind} over {part.domain}, keep {part.keep}): "
                                f"{node.op.name} {n} reduces {shape_in} keeping {kept_axes(node)}")
        elif part.kind == "reduce" and size not in (numel(part.domain), numel(part.row_shape)):
            problems.append(f"k{k.id} (rows of {part.domain}): {node.op.name} {n} has {size} elements")
        elif part.kind == "elementwise" and size != numel(part.domain):
            problems.append(f"k{k.id} (elementwise over {part.domain}): {node.op.name} {n} has {size} elements")
        elif part.kind not in ("elementwise", "reduce") and size != numel(g.node(part.anchor).type.shape):
            problems.append(f"k{k.id} ({part.kind} epilogue): {node.op.name} {n} has {size} elements")
    return problems


def check_reasons(g: Graph) -> list[str]:
    """Producer/consumer pairs in different kernels for which the plan records no reason, or
    one that blames another consumer's reading from memory."""
    plan = g.meta["fusion"]
    free = g.meta["fusion"].free
    explained = plan.explain(g)
    missing = []
    for c, kc in plan.group_of.items():
        for p in sorted(producers(g, free, c)):
            why = plan.reasons.get((p, c))
            edge = f"{g.node(p).op.name} {p} [k{plan.group_of[p]}] -> {g.node(c).op.name} {c} [k{kc}]"
            if plan.group_of[p] != kc and not why:
                missing.append(edge)
            elif why and why.startswith("F5: `") and not why.startswith(f"F5: `{g.node(c).op.name}` reads"):
                missing.append(f"{edge}: the reason names another consumer: {why}")  # (it once did)
    if not explained.endswith("\n") and explained:
        missing.append("explain() text does not end with a newline")
    return missing


def check_memory(g: Graph, given=frozenset()) -> list[str]:
    """What is wrong with the memory plan in g.meta["memory"] (empty: nothing). `given`: a
    loop body's results, which the loop's memory holds."""
    plan, mem = g.meta["fusion"], g.meta["memory"]
    free = g.meta["fusion"].free
    phase = {k.id: k.phase for k in plan.kernels}
    problems = []
    for n in plan.materialized:
        if g.node(n).op is not ops.INPUT and n not in mem.buffers and n not in given:
            problems.append(f"stored node {n} has no buffer")
    regions, windows = _loop_regions(g, plan, mem, phase, problems)
    arena = [b for b in mem.buffers.values() if b.inplace is None and b.node not in windows] + regions
    for b in mem.buffers.values():
        if b.size != nbytes(g.node(b.node).type):
            problems.append(f"buffer of {b.node}: {b.size} bytes for a {g.node(b.node).type}")
        if b.start != phase[plan.group_of[b.node]]:
            problems.append(f"buffer of {b.node} starts at phase {b.start}, written in {phase[plan.group_of[b.node]]}")
        readers = {plan.group_of[u] for u in free.users(b.node) if u in plan.group_of} - {plan.group_of[b.node]}
        for kr in readers:
            if not b.start <= phase[kr] <= b.end:
                problems.append(f"buffer of {b.node} lives {b.start}-{b.end} but k{kr} reads it in phase {phase[kr]}")
        if b.node in g.outputs.values() and b.end < plan.phases:
            problems.append(f"result {b.node} dies at phase {b.end}, before the caller reads it")
    for b in arena:
        if b.offset < 0 or b.offset % 64 or b.offset + b.size > mem.arena_bytes:
            problems.append(f"buffer of {b.node} at {b.offset} (+{b.size}) outside a {mem.arena_bytes}-byte arena")
    for i, a in enumerate(arena):
        for b in arena[i + 1:]:
            if a.start <= b.end and b.start <= a.end and a.offset < b.offset + b.size and b.offset < a.offset + a.size:
                problems.append(f"buffers of {a.node} [{a.offset}, +{a.size}) phases {a.start}-{a.end} and "
                                f"{b.node} [{b.offset}, +{b.size}) phases {b.start}-{b.end} overlap")
    for name, node in mem.inplace.items():
        if g.updates.get(name) != node:
            problems.append(f"in place of {name}: {node} is not its update")
            continue
        if g.node(node).type != g.node(g.input_named(name)).type:
            problems.append(f"in place of {name}: type differs")
        writer = plan.group_of[node]
        problems += _misaligned_reads(g, plan, name, writer)
        for u in free.users(g.input_named(name)):
            ku = plan.group_of.get(u)
            if ku is not None and ku != writer and phase[ku] >= phase[writer]:
                problems.append(f"{name} is overwritten in place by k{writer} (phase {phase[writer]}) but "
                                f"k{ku} reads the old value in phase {phase[ku]}")
    if mem.arena_bytes > mem.naive_bytes:
        problems.append(f"arena {mem.arena_bytes} > one buffer per node {mem.naive_bytes}")
    if arena and mem.arena_bytes < max(b.size for b in arena):
        problems.append("the arena is smaller than its largest buffer")
    return problems


def _loop_regions(g: Graph, plan, mem, phase: dict, problems: list) -> tuple[list, set]:
    """Each loop's memory as arena buffers (its body's region, live in the loop's phase;
    each carry's storage, live as long as any value in it) and the nodes whose buffers are
    windows of a storage (an initial carry, a final or stacked carry), each checked to lie
    inside its storage; the bodies' own plans are checked too."""
    from dlc.core.ops.scan import signature
    from dlc.passes.memory import Buffer
    regions, windows = [], set()
    for k in plan.kernels:
        if k.kind != "scan":
            continue
        node, lp = g.node(k.anchor), mem.loops.get(k.anchor)
        if lp is None:
            problems.append(f"k{k.id}: the loop has no memory plan")
            continue
        carries, lay = node.attrs["carries"], lp.layout
        regions.append(Buffer(k.anchor, lp.body.meta["memory"].arena_bytes, phase[k.id], phase[k.id], lp.offset))
        results = {g.node(r).attrs["index"]: r for r in g.users(k.anchor)}
        for i, (st, at) in enumerate(zip(lay.storage, lp.storage)):
            slot = nbytes(g.node(node.operands[i]).type)
            inside = [node.operands[i]] + [r for j, r in results.items() if j == i or (
                j >= carries and lay.windows[j - carries] is not None and lay.windows[j - carries][0] == i)]
            bufs = [mem.buffers[n] for n in inside]
            regions.append(Buffer(k.anchor, slot * st.slots, min(b.start for b in bufs),
                                  max([phase[k.id]] + [b.end for b in bufs]), at))
            for b in bufs:
                windows.add(b.node)
                if not (at <= b.offset and b.offset + b.size <= at + slot * st.slots):
                    problems.append(f"k{k.id}: {b.node} at {b.offset} (+{b.size}) is outside carry {i}'s "
                                    f"storage at {at} (+{slot * st.slots})")
        sig = signature(lp.body, carries, node.attrs["seqs"])
        read = {j - carries for j in results if j >= carries}
        given = frozenset(sig.new_carries) | {y for m, y in enumerate(sig.outputs)
                                              if m in read and lay.windows[m] is None}
        problems += [f"k{k.id} body: {p}" for p in check_memory(lp.body, given)]
    return regions, windows


def _misaligned_reads(g: Graph, plan, name: str, writer: int) -> list[str]:
    """Nodes of the writing kernel that read the old value of `name` other than element for
    element (through anything but elementwise ops of its shape): an in-place write would
    clobber elements they still need."""
    old = g.input_named(name)
    shape = g.node(old).type.shape
    problems, stack, seen = [], [(u, True) for u in g.users(old)], set()
    while stack:
        u, aligned = stack.pop()
        if (u, aligned) in seen:
            continue
        seen.add((u, aligned))
        n = g.node(u)
        aligned = aligned and n.op.kind is ops.Kind.ELEMENTWISE and n.type.shape == shape
        if u not in plan.group_of:           # free: recomputed in its users
            stack.extend((w, aligned) for w in g.users(u))
        elif plan.group_of[u] == writer and not aligned:
            problems.append(f"{name} is overwritten in place by k{writer}, whose {n.op.name} {u} reads it "
                            "other than element for element")
    return problems


def fused(build) -> Graph:
    g = plan_memory(fuse(graph(build)))
    assert check_fusion(g) == []
    assert check_memory(g) == []
    return g


def kernel_of(g: Graph, nid: int):
    plan = g.meta["fusion"]
    return plan.kernels[plan.group_of[nid]]


# --- fuse: expected grouping --------------------------------------------------------------------------

def _chain(b):
    x, y = inp(b, "x", (4, 8)), inp(b, "y", (4, 8))
    return b.maximum(b.exp(x) * b.tanh(y) + 1.0, 0.0)


def test_fuse_elementwise_chain_is_one_kernel():
    g = fused(_chain)
    plan = g.meta["fusion"]
    assert len(plan.kernels) == 1
    (k,) = plan.kernels
    assert k.kind == "elementwise" and k.domain == (4, 8) and k.phase == 0
    assert [g.node(n).op.name for n in k.nodes] == ["exp", "tanh", "mul", "add", "max"]
    assert k.outputs == [g.outputs["output"]]


def test_fuse_is_an_annotation():
    g = graph(_chain)
    f = fuse(g)
    assert f.ids() == g.ids() and all(f.node(n) is g.node(n) for n in g.ids())
    assert "fusion" not in g.meta
    assert print_graph(f).splitlines()[0] == print_graph(g).splitlines()[0]


def _softmax(b):
    x = inp(b, "x", (4, 10))
    e = b.exp(x - b.max(x, 1, keepdims=True))
    return e / b.sum(e, 1, keepdims=True)


def test_fuse_softmax_is_one_reduce_kernel():
    g = fused(_softmax)
    plan = g.meta["fusion"]
    assert len(plan.kernels) == 1
    (k,) = plan.kernels
    assert k.kind == "reduce" and k.domain == (4, 10) and k.keep == (0,)
    assert {"reduce_max", "reduce_sum", "exp", "div"} <= {g.node(n).op.name for n in k.nodes}
    assert k.outputs == [g.outputs["output"]]


def _dense_relu(b):
    x, w, bias = inp(b, "x", (4, 8)), inp(b, "w", (8, 16), role="param"), inp(b, "b", (16,), role="param")
    return b.maximum(x @ w + bias, 0.0)


def test_fuse_matmul_bias_relu_is_one_matmul_kernel():
    g = fused(_dense_relu)
    plan = g.meta["fusion"]
    assert len(plan.kernels) == 1
    (k,) = plan.kernels
    assert k.kind == "matmul" and g.node(k.anchor).op is ops.MATMUL
    assert [g.node(n).op.name for n in k.nodes] == ["matmul", "add", "max"]
    assert g.outputs["output"] in k.outputs and g.node(k.anchor).type.shape == (4, 16)


def _two_matmuls(b):
    x = inp(b, "x", (4, 8))
    w1, w2 = inp(b, "w1", (8, 3), role="param"), inp(b, "w2", (8, 5), role="param")
    y = b.exp(x) * 2.0
    return {"a": y @ w1, "c": y @ w2}


def test_fuse_value_read_by_two_matmuls_is_stored():
    g = fused(_two_matmuls)
    plan = g.meta["fusion"]
    mm1, mm2 = g.outputs["a"], g.outputs["c"]
    (y,) = g.operands(mm1)[:1]
    assert g.node(y).op is ops.MUL and y in plan.materialized
    ky = kernel_of(g, y)
    assert ky.kind == "elementwise" and ky.id not in (plan.group_of[mm1], plan.group_of[mm2])
    assert ky.phase < kernel_of(g, mm1).phase and ky.phase < kernel_of(g, mm2).phase
    for mm in (mm1, mm2):
        assert plan.reasons[(y, mm)].startswith("F5")
    assert "F5" in plan.explain(g)


def _sgd_updates(b):
    a, ga = inp(b, "a", (3, 4), role="param"), inp(b, "ga", (3, 4))
    c, gc = inp(b, "c", (7,), role="param"), inp(b, "gc", (7,))
    return {"update:a": a - b.tanh(ga) * 0.1, "update:c": c - b.tanh(gc) * 0.1}


def test_fuse_independent_updates_of_different_shapes_are_one_multi_tensor_kernel():
    g = fused(_sgd_updates)
    plan = g.meta["fusion"]
    assert len(plan.kernels) == 1
    (k,) = plan.kernels
    assert k.kind == "elementwise" and len(k.parts) == 2
    assert sorted(p.domain for p in k.parts) == [(3, 4), (7,)]
    assert sorted(k.outputs) == sorted(g.updates.values())
    mem = g.meta["memory"]
    assert set(mem.inplace) == {"a", "c"} and mem.arena_bytes == 0


def _mlp_like(b):
    x, w1, w2 = inp(b, "x", (4, 8)), inp(b, "w1", (8, 16), role="param"), inp(b, "w2", (16, 10), role="param")
    h = b.maximum(x @ w1, 0.0)
    logits = h @ w2
    e = b.exp(logits - b.max(logits, 1, keepdims=True))
    p = e / b.sum(e, 1, keepdims=True)
    return {"output": p, "loss": b.sum(p * logits), "update:w2": w2 - b.permute(h, (1, 0)) @ p * 0.1}


def test_fuse_phases_respect_dependencies():
    g = fused(_mlp_like)
    plan = g.meta["fusion"]
    mm1 = next(n for n in g.ids() if g.node(n).op is ops.MATMUL and g.operands(n)[0] == g.input_named("x"))
    p = g.outputs["output"]
    assert kernel_of(g, mm1).phase < kernel_of(g, p).phase < kernel_of(g, g.updates["w2"]).phase
    # the reader of the old w2 (the forward matmul) runs before the update that overwrites it
    forward = next(n for n in g.ids() if g.node(n).op is ops.MATMUL and g.operands(n)[1] == g.input_named("w2"))
    assert kernel_of(g, forward).phase < kernel_of(g, g.updates["w2"]).phase
    assert plan.phases == 1 + max(k.phase for k in plan.kernels)


def test_fuse_batchnorm_forward_is_one_kernel_and_stores_no_broadcast():
    """F3 on a batchnorm whose values the backward pass reads too: its statistics, the
    normalized values and the ReLU after it are one row kernel per batchnorm (not a chain of
    kernels, each a phase), and the per-channel scale is read through the broadcast, never
    stored as a full tensor."""
    import example_models
    from dlc.pipeline import lower
    m = example_models.load(next(p for p in example_models.EXAMPLES if p.stem == "resnet_bn"))
    g = lower(m.compile_graph("train", m.train_config), 8)
    plan = g.meta["fusion"]
    stored_maps = [n for n in plan.materialized if g.node(n).op in (ops.BROADCAST, ops.RESHAPE)
                   and numel(g.node(n).type.shape) > numel(g.node(g.node(n).operands[0]).type.shape)]
    assert stored_maps == []
    relus = [n for n in g.ids() if g.node(n).op is ops.MAX and g.node(n).type.rank == 4]
    assert len(relus) == 5  # the stem's, and each block's first layer's and output's
    for n in relus:  # each after a batchnorm (the outputs' after its sum with the shortcut)
        k = plan.kernels[plan.group_of[n]]
        sums = [x for x in k.nodes if g.node(x).op in REDUCTIONS]
        assert k.kind == "reduce" and len(sums) >= 2, f"relu {n} is not in its batchnorm's kernel"


def test_fuse_stores_no_shifted_copy_of_a_depthwise_layers_input():
    """F3 on a depthwise convolution's taps (pads of its input, shifted, which the
    forward and the filter gradient both read): no kernel stores one; each reads the
    stored input through the pad, as through a broadcast."""
    import example_models
    from dlc.pipeline import lower
    m = example_models.load(next(p for p in example_models.EXAMPLES if p.stem == "separable_digits"))
    g = lower(m.compile_graph("train", m.train_config), 8)
    plan = g.meta["fusion"]
    pads = [n for n in g.ids() if g.node(n).op is ops.PAD]
    assert len(pads) >= 16  # the taps of the two depthwise layers (the centre needs none)
    assert [n for n in plan.materialized if g.node(n).op is ops.PAD] == []


@pytest.mark.parametrize("build", [_chain, _softmax, _dense_relu, _two_matmuls, _sgd_updates, _mlp_like],
                         ids=["chain", "softmax", "dense_relu", "two_matmuls", "sgd_updates", "mlp_like"])
def test_fuse_kernels_are_disjoint_and_cover_every_non_free_node(build):
    g = fused(build)
    free = g.meta["fusion"].free
    plan = g.meta["fusion"]
    placed = [n for k in plan.kernels for n in k.nodes]
    assert len(placed) == len(set(placed))
    assert set(placed) == {n for n in g.ids() if g.node(n).op is not ops.INPUT and not free(n)}
    again = fuse(graph(build)).meta["fusion"]  # deterministic
    assert [(k.kind, k.nodes, k.phase) for k in again.kernels] == [(k.kind, k.nodes, k.phase) for k in plan.kernels]


@pytest.mark.parametrize("build", [_two_matmuls, _sgd_updates])
def test_fuse_explain_gives_a_reason_for_each_split_pair(build):
    g = fused(build)
    assert check_reasons(g) == []
    text = g.meta["fusion"].explain(g)
    assert len(text.splitlines()) == sum(1 for (p, c) in g.meta["fusion"].reasons
                                         if g.meta["fusion"].group_of.get(p) != g.meta["fusion"].group_of.get(c))


def _matmul_softmax(b):
    x, w = inp(b, "x", (4, 8)), inp(b, "w", (8, 10), role="param")
    return _softmax_of(b, x @ w)


def _softmax_of(b, x):
    e = b.exp(x - b.max(x, 1, keepdims=True))
    return e / b.sum(e, 1, keepdims=True)


def test_fuse_explain_covers_a_matmul_read_by_a_reduction():
    g = fused(_matmul_softmax)
    mm = next(n for n in g.ids() if g.node(n).op is ops.MATMUL)
    assert kernel_of(g, mm).id != kernel_of(g, g.outputs["output"]).id  # split: the softmax rows
    assert check_reasons(g) == []


def _swap_elementwise(b):
    """Each update reads the other parameter's old value (p0 - 0.1 * relu(p1), ...)."""
    p0, p1 = inp(b, "p0", (6, 6), role="param"), inp(b, "p1", (6, 6), role="param")
    return {"update:p0": p0 - b.maximum(p1, 0.0) * 0.1, "update:p1": p1 - b.maximum(p0, 0.0) * 0.1}


def _swap_matmul(b):
    """The same through matmuls: a - (x@c)*0.1 and c - (x@a)*0.1."""
    x, a, c = inp(b, "x", (4, 4)), inp(b, "a", (4, 4), role="param"), inp(b, "c", (4, 4), role="param")
    return {"loss": b.sum(x), "update:a": a - (x @ c) * 0.1, "update:c": c - (x @ a) * 0.1}


@pytest.mark.parametrize("build", [_swap_elementwise, _swap_matmul], ids=["elementwise", "matmul"])
def test_fuse_updates_that_read_each_others_old_value(build):
    g = plan_memory(fuse(graph(build)))
    # check_memory: a parameter is overwritten in place only if no kernel reads its old value later
    assert check_fusion(g) == [] and check_memory(g) == []


def _two_sums_and_a_map(b):
    x = inp(b, "x", (4, 6))
    y = b.tanh(x)
    return {"s0": b.sum(y, 0), "s1": b.sum(y, 1), "z": y * 2.0}


def test_fuse_sibling_reductions_over_different_axes_stay_apart():
    g = plan_memory(fuse(graph(_two_sums_and_a_map)))
    assert check_fusion(g) == []


def _row_value_of_a_result(b):
    x = inp(b, "x", (8, 6))
    r = b.sum(x, 0)                     # a result: stored by its own kernel
    return {"r": r, "y": x * b.exp(r)}  # exp of that row vector, broadcast over x


def test_fuse_row_value_of_a_stored_reduction_is_not_recomputed_per_element():
    g = plan_memory(fuse(graph(_row_value_of_a_result)))
    assert check_fusion(g) == []


def _normalized_then_mean_over_time(b):
    x = inp(b, "x", (3, 8, 32))
    mu = b.reshape(b.sum(x, (2,)), (3, 8, 1)) / 32.0          # per [B, T]: a layernorm's mean
    centred = x - b.broadcast(mu, (3, 8, 32), (0, 1, 2))
    return b.sum(centred * centred, (1,))                      # a mean over T keeps [B, F]


def test_fuse_row_value_of_other_rows_is_not_recomputed_per_element():
    """A statistic per [B, T] read by a reduction over T: the kernel of that reduction keeps
    [B, F] and its reduction over F cannot join; the statistic is stored, not recomputed
    for each of the F features (a layernorm before a mean over time)."""
    g = plan_memory(fuse(graph(_normalized_then_mean_over_time)))
    assert check_fusion(g) == []


# --- memory -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [_chain, _softmax, _dense_relu, _two_matmuls, _sgd_updates, _mlp_like],
                         ids=["chain", "softmax", "dense_relu", "two_matmuls", "sgd_updates", "mlp_like"])
def test_memory_plan_invariants(build):
    g = fused(build)
    mem = g.meta["memory"]
    assert mem.arena_bytes <= mem.naive_bytes
    assert 0.0 <= mem.saving <= 1.0
    assert "memory: working arena" in print_graph(g)


def test_memory_buffers_live_together_never_share_bytes():
    """A chain of stored values (each read by a matmul): neighbours overlap in time, so they
    get disjoint bytes; values far apart in the chain may share."""
    def build(b):
        h = inp(b, "x", (8, 8))
        ws = [inp(b, f"w{i}", (8, 8), role="param") for i in range(5)]
        for w in ws:
            h = b.exp(h @ w)
        return h
    g = fused(build)
    mem = g.meta["memory"]
    arena = sorted((b for b in mem.buffers.values() if b.inplace is None), key=lambda b: b.start)
    assert len(arena) >= 5
    for a, b in zip(arena, arena[1:]):
        if a.end >= b.start:
            assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset
    assert mem.arena_bytes < sum(-(-b.size // 64) * 64 for b in arena)  # something was reused


def test_memory_update_in_place_when_the_writer_is_the_last_reader():
    def build(b):
        w, g_ = inp(b, "w", (4, 8), role="param"), inp(b, "g", (4, 8))
        return {"loss": b.sum(w * w), "update:w": w - b.exp(g_) * 0.1}
    g = fused(build)
    mem, plan = g.meta["memory"], g.meta["fusion"]
    assert mem.inplace == {"w": g.updates["w"]}
    assert mem.buffers[g.updates["w"]].inplace == "w"
    loss_kernel = kernel_of(g, g.outputs["loss"])
    assert loss_kernel.phase < kernel_of(g, g.updates["w"]).phase  # the other reader runs first
    assert plan.phases == 2


def test_memory_no_update_in_place_when_a_later_kernel_reads_the_old_value():
    def build(b):
        w = inp(b, "w", (8,), role="param")
        new = b.exp(w)
        return {"loss": b.sum(new * w), "update:w": new}   # the loss reads old w after new w exists
    g = fused(build)
    mem = g.meta["memory"]
    loss_k, new_k = kernel_of(g, g.outputs["loss"]), kernel_of(g, g.updates["w"])
    assert loss_k.id != new_k.id and loss_k.phase > new_k.phase  # the update is stored (a result)
    assert "w" not in mem.inplace
    assert mem.buffers[g.updates["w"]].offset >= 0
    assert mem.buffers[g.updates["w"]].end == g.meta["fusion"].phases  # copied after the step


def test_memory_no_update_in_place_when_the_writer_reads_the_old_value_whole():
    def build(b):
        x, w = inp(b, "x", (4, 4)), inp(b, "w", (4, 4), role="param")
        return {"loss": b.sum(x), "update:w": w - (x @ w) * 0.1}  # the matmul reads all of w
    g = fused(build)
    mem = g.meta["memory"]
    assert kernel_of(g, g.updates["w"]).kind == "matmul"
    assert "w" not in mem.inplace
    buf = mem.buffers[g.updates["w"]]
    assert buf.inplace is None and buf.offset >= 0 and buf.end == g.meta["fusion"].phases


def test_memory_results_live_to_the_end():
    g = fused(_mlp_like)
    mem, plan = g.meta["memory"], g.meta["fusion"]
    for name, nid in g.outputs.items():
        assert mem.buffers[nid].end == plan.phases, name
