"""The loop op (`scan`, dlc/core/ops/scan.py) through every stage of the graph level.

- generic scans (several carries, an integer carry, sequences, invariants, no sequences,
  reverse, a scan nested in a body, symbolic T and B), each against a numpy loop written
  here: shape rule, reference interpreter (f32 and f64), autodiff against central finite
  differences (f64), the native backend (a kernel-IR Loop) and the CUDA backend's code
  (a host loop of launches, emulated on the CPU) against the reference;
- the scan's vjp against the gradients of the unrolled graph (tests/unrolled.py), for
  rnn/lstm/gru layers with every option, and its shape: a reverse scan, the weight
  gradient one matmul over all steps;
- loops on the native backend: code that does not grow with T (CUDA C too), an LSTM over 1000 and 5000
  steps trained on cpu, the loop's storage (stacked or double-buffered carries);
- the graph passes on scans (pruning, merging, folding and simplifying bodies, cse,
  specialize), the printer, shape-rule errors;
- the size of the graph does not grow with T: `dlc check` of an LSTM over 100000 steps.

The recurrent layers' own rows (forward, gradient, symbolic batch, cpu) are in
tests/op_table.py.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dlc
from dlc import backends
from dlc.backends.cuda.render import LoopStep, launches_of, launches_per_step
from dlc.backends.llvm.codegen import ModuleBuilder
from dlc.backends.reference import run_graph
from dlc.core import ops
from dlc.core.builder import GraphBuilder
from dlc.core.diagnostics import DlcError
from dlc.core.graph import Graph
from dlc.core.kernel import Loop, all_kernels, check_program, format_program
from dlc.core.printer import print_graph
from dlc.core.ops.scan import signature
from dlc.core.types import DType, ShapeError, TensorType, TupleType, sym
from dlc.language import nn
from dlc.passes.autodiff import autodiff
from dlc.passes.cse import cse
from dlc.passes.dce import dce
from dlc.passes.fold_constants import fold_constants
from dlc.passes.loops import Storage
from dlc.passes.simplify import simplify
from dlc.passes.specialize import specialize
from dlc.pipeline import kernel_program, lower
from dlc.program import make_program

from cuda_host.step import HostStep
from test_backend_cpu import CPU, merge, run_cpu
from test_ops import Ctx
from unrolled import unroll_scans

ROOT = Path(__file__).resolve().parent.parent
CUDA = backends.backend("cuda", runnable=False)
F32, I32 = DType.f32, DType.i32


def f32(*shape):
    return TensorType(F32, tuple(shape))


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# --- generic scans: (build(b, inputs) -> outputs, numpy reference, input shapes) -----------------

T, B, H = 4, 3, 5


def _two_carries(reverse):
    """h' = tanh(h @ w + x_t * s), n' = n + 1 (i32); per step: h' * n' and the row sums of h'."""
    def build(b, v):
        def step(sb, cs, xs, ws):
            h, n = cs
            w, s = ws
            h2 = sb.tanh(sb.matmul(h, w) + xs[0] * sb.broadcast(s, h.shape))
            n2 = n + 1
            return [h2, n2], [h2 * sb.cast(n2, F32), sb.sum(h2, 1) + xs[1]]
        (h, n), (hs, sums) = b.scan(step, [v["h0"], b.const(0, I32)], [v["xs"], v["zs"]], [v["w"], v["s"]],
                                    reverse=reverse)
        return {"h": h, "n": n, "hs": hs, "sums": sums}

    def ref(h0, xs, zs, w, s):
        h, hs, sums = h0, [None] * T, [None] * T
        for k, t in enumerate(reversed(range(T)) if reverse else range(T)):
            h = np.tanh(h @ w + xs[t] * s)
            hs[t], sums[t] = h * (k + 1), h.sum(1) + zs[t]
        return {"h": h, "n": np.int32(T), "hs": np.stack(hs), "sums": np.stack(sums)}

    return build, ref, {"h0": (B, H), "xs": (T, B, H), "zs": (T, B), "w": (H, H), "s": ()}


def _no_sequences():
    """x' = tanh(x @ w) + c, 5 steps, no sequences: the length is given."""
    def build(b, v):
        (x,), (xs,) = b.scan(lambda sb, cs, xs, ws: ([sb.tanh(sb.matmul(cs[0], ws[0])) + ws[1]],
                                                     [cs[0] * 2.0]),
                             [v["x0"]], [], [v["w"], v["c"]], length=5)
        return {"x": x, "before": xs}

    def ref(x0, w, c):
        x, before = x0, []
        for _ in range(5):
            before.append(x * 2.0)
            x = np.tanh(x @ w) + c
        return {"x": x, "before": np.stack(before)}

    return build, ref, {"x0": (2, H), "w": (H, H), "c": (2, H)}


def _nested():
    """Each outer step runs an inner loop of 3 steps over the carry; the inner loop reads an
    outer sequence slice as an invariant."""
    def build(b, v):
        def outer(sb, cs, xs, ws):
            def inner(ib, ics, ixs, iws):
                return [ib.tanh(ib.matmul(ics[0], iws[0]) + iws[1])], []
            (h,), _ = sb.scan(inner, [cs[0]], [], [ws[0], xs[0]], length=3)
            return [h], [h * h]
        (h,), (sq,) = b.scan(outer, [v["h0"]], [v["xs"]], [v["w"]])
        return {"h": h, "sq": sq}

    def ref(h0, xs, w):
        h, sq = h0, []
        for t in range(T):
            for _ in range(3):
                h = np.tanh(h @ w + xs[t])
            sq.append(h * h)
        return {"h": h, "sq": np.stack(sq)}

    return build, ref, {"h0": (B, H), "xs": (T, B, H), "w": (H, H)}


def _lstm_like():
    """Two float carries through gate slices, reverse, an invariant bias broadcast inside."""
    def build(b, v):
        def step(sb, cs, xs, ws):
            h, c = cs
            z = xs[0] + sb.matmul(h, ws[0]) + ws[1]
            i, f = sb.sigmoid(sb.slice(z, (0, 0), (B, H))), sb.sigmoid(sb.slice(z, (0, H), (B, 2 * H)))
            c2 = f * c + i * sb.tanh(sb.slice(z, (0, 2 * H), (B, 3 * H)))
            return [sb.tanh(c2) * sb.sigmoid(sb.slice(z, (0, 3 * H), (B, 4 * H))), c2], [c2]
        (h, c), (cs,) = b.scan(step, [v["h0"], v["c0"]], [v["xs"]], [v["u"], v["bias"]], reverse=True)
        return {"h": h, "c": c, "cs": cs}

    def ref(h0, c0, xs, u, bias):
        h, c, cs = h0, c0, [None] * T
        for t in reversed(range(T)):
            z = xs[t] + h @ u + bias
            i, f, g, o = (z[:, k * H:(k + 1) * H] for k in range(4))
            c = np_sigmoid(f) * c + np_sigmoid(i) * np.tanh(g)
            h = np.tanh(c) * np_sigmoid(o)
            cs[t] = c
        return {"h": h, "c": c, "cs": np.stack(cs)}

    return build, ref, {"h0": (B, H), "c0": (B, H), "xs": (T, B, 4 * H), "u": (H, 4 * H), "bias": (4 * H,)}


CASES = {"two-carries": _two_carries(False), "two-carries-reverse": _two_carries(True),
         "no-sequences": _no_sequences(), "nested": _nested(), "lstm-like-reverse": _lstm_like()}


def _arrays(shapes, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.uniform(-1.0, 1.0, size=s).astype(np.float32) for k, s in shapes.items()}


def _graph(name, with_loss=True):
    build, ref, shapes = CASES[name]
    g = Graph(name)
    b = GraphBuilder(g)
    v = {k: b.input(k, f32(*s), "param") for k, s in shapes.items()}
    outs = build(b, v)
    for k, o in outs.items():
        g.outputs[k] = o.id
    feeds = _arrays(shapes, len(name))
    if with_loss:  # loss = sum of <result, R> over the float results, R fixed data
        rng = np.random.default_rng(7)
        loss = None
        for k, o in outs.items():
            if o.dtype.is_float:
                feeds[f"r_{k}"] = rng.normal(size=o.shape).astype(np.float32)
                term = b.sum(o * b.input(f"r_{k}", o.type, "data"))
                loss = term if loss is None else loss + term
        g.outputs["loss"] = loss.id
    return g, ref, feeds


@pytest.mark.parametrize("name", list(CASES))
def test_scan_forward_matches_numpy(name):
    g, ref, feeds = _graph(name, with_loss=False)
    g.verify()
    want = ref(**{k: v.astype(np.float64) for k, v in feeds.items()})
    scan = next(g.node(n) for n in g.ids() if g.node(n).op is ops.SCAN)
    assert isinstance(scan.type, TupleType)
    for precision, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        got = run_graph(g, {k: v.astype(precision) for k, v in feeds.items()}, float_dtype=precision)
        for k, w in want.items():
            assert got[k].shape == np.shape(w), k
            np.testing.assert_allclose(got[k], w, rtol=tol, atol=tol, err_msg=f"{name}: {k}")
    # the op's own numpy semantics (OpDef.ref) agree with the interpreter
    values = run_graph(g, feeds, keep_all=True)
    results = ops.SCAN.ref(*(values[o] for o in scan.operands), **scan.attrs)
    assert [np.shape(r) for r in results] == [tuple(t.shape) for t in scan.type.elements]
    for r, v in zip(results, values[next(n for n in g.ids() if g.node(n) is scan)]):
        np.testing.assert_array_equal(r, v)


@pytest.mark.parametrize("name", list(CASES))
def test_scan_gradient_matches_finite_differences(name):
    g, _, feeds = _graph(name)
    dg = autodiff(g)
    dg.verify()
    feeds = {k: v.astype(np.float64) for k, v in feeds.items()}
    grads = run_graph(dg, feeds, float_dtype=np.float64)
    rng = np.random.default_rng(1)

    def loss(k, x):
        return float(run_graph(g, {**feeds, k: x}, float_dtype=np.float64)["loss"])

    for k, x in feeds.items():
        if k.startswith("r_"):
            continue
        d = rng.normal(size=x.shape)
        fd = (loss(k, x + 1e-6 * d) - loss(k, x - 1e-6 * d)) / 2e-6
        a = float(np.sum(grads[f"grad:{k}"] * d))
        assert abs(fd - a) <= 1e-6 + 1e-5 * abs(a), f"{name}: grad:{k}: autodiff {a}, finite differences {fd}"
    # after the graph passes, the same values
    cleaned = dce(cse(fold_constants(simplify(dg))))
    cleaned.verify()
    again = run_graph(cleaned, feeds, float_dtype=np.float64)
    for k in grads:
        np.testing.assert_allclose(again[k], grads[k], rtol=1e-12, atol=1e-12, err_msg=k)


def _all_cases_merged():
    """Every case with its gradients as one graph (inputs and results prefixed r<i>.), and
    the feeds."""
    graphs, feeds = [], {}
    for i, name in enumerate(CASES):
        g, _, f = _graph(name)
        graphs.append(autodiff(g))
        feeds.update({f"r{i}.{k}": v for k, v in f.items()})
    return merge(graphs), feeds


def test_scans_on_cpu_match_reference():
    """Every case (an integer carry, reverse, no sequences, nesting: the layers' rows cover
    the rest) with its gradients, as loops on the native backend, in one module."""
    merged, feeds = _all_cases_merged()
    want = run_graph(merged, feeds)
    got = run_cpu(merged, feeds)
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w, rtol=1e-4, atol=1e-5, err_msg=k)


def test_scans_emulated_on_cuda_match_reference():
    """The same cases through the CUDA backend: each Loop a host loop of launches whose
    kernels compute their views from the loop variables (a nested loop's from both), the
    generated CUDA C run on the host (tests/cuda_host)."""
    merged, feeds = _all_cases_merged()
    want = run_graph(merged, feeds)
    source, layout = CUDA.render(kernel_program(lower(merged, 1), CUDA.templates), CUDA.target({"arch": "sm_90"}))
    step = HostStep(source, layout)
    state = {name: np.array(feeds[name], copy=True) for name, kind, _, _ in layout.slots if kind == "state"}
    got = step.run(state, feeds)
    loops = [s for s in step.steps if isinstance(s, LoopStep)]
    assert any(isinstance(s, LoopStep) for lp in loops for s in lp.steps)  # the nested case
    assert step.launched == launches_per_step(step.steps) > len(launches_of(step.steps))
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w, rtol=1e-4, atol=1e-5, err_msg=k)


def test_symbolic_length_and_batch():
    """T and B symbolic: the shape rule keeps T, the interpreter binds both from the inputs,
    autodiff works on the symbolic graph; a native loop needs T known."""
    t, bsym = sym("T"), sym("B")
    g = Graph("sym")
    b = GraphBuilder(g)
    xs = b.input("xs", TensorType(F32, (t, bsym, 3)), "param")
    w = b.input("w", f32(3, 3), "param")

    def step(sb, cs, x, ws):
        h = sb.tanh(sb.matmul(cs[0], ws[0]) + x[0])
        return [h], [h]

    (h,), (hs,) = b.scan(step, [b.full(0.0, (bsym, 3))], [xs], [w])
    assert hs.shape == (t, bsym, 3) and g.node(hs.node.operands[0]).attrs["length"] == t
    g.outputs["loss"] = b.sum(hs * hs).id
    dg = autodiff(g)
    dg.verify()
    rng = np.random.default_rng(0)
    for steps in (1, 6):
        feeds = {"xs": rng.normal(size=(steps, 2, 3)), "w": rng.normal(size=(3, 3)) * 0.5}
        got = run_graph(dg, feeds, float_dtype=np.float64)
        hh, total = np.zeros((2, 3)), 0.0
        for k in range(steps):
            hh = np.tanh(hh @ feeds["w"] + feeds["xs"][k])
            total += np.sum(hh * hh)
        np.testing.assert_allclose(got["loss"], total, rtol=1e-12)
        assert got["grad:xs"].shape == (steps, 2, 3)
    bound = specialize(dg, {"T": 6, "B": 2})
    bound.verify()
    assert all(isinstance(d, int) for n in bound.ids() for d in _dims(bound.node(n).type))
    with pytest.raises(DlcError, match="symbolic length T"):
        lower(dg, 2)


def _dims(t):
    return [d for e in (t.elements if isinstance(t, TupleType) else (t,)) for d in e.shape]


# --- the recurrent layers: the scan's vjp against the unrolled graph's gradients -----------------

LAYER_OPTIONS = [
    ("rnn", {}), ("lstm", {}), ("gru", {}),
    ("rnn", {"layers": 2, "bidirectional": True, "return_sequences": True}),
    ("lstm", {"layers": 2, "bidirectional": True}),
    ("gru", {"bidirectional": True, "return_sequences": True}),
    ("gru", {"layers": 3, "dropout": 0.3}),
]


def _layer_graph(layer, options, steps=5, batch=2, features=3, hidden=4, training=True):
    g = Graph(layer)
    b = GraphBuilder(g)
    x = b.input("x", f32(batch, steps, features), "param")
    ctx = Ctx(b, training)
    y = nn.BUILTINS[layer].fn(ctx, x, hidden, **options)
    g.outputs["out"] = y.id
    g.outputs["loss"] = b.sum(y * b.const(np.random.default_rng(3).normal(size=y.shape), F32)).id
    rng = np.random.default_rng(4)
    feeds = {"x": rng.normal(size=x.shape)}
    feeds.update({full: rng.uniform(-0.8, 0.8, size=v.shape) for _, full, v in ctx.created})
    if ctx._rng is not None:
        feeds.update(seed=np.int32(11), step=np.int32(4))
    return g, feeds


@pytest.mark.parametrize("layer, options", LAYER_OPTIONS,
                         ids=[f"{l}-{'-'.join(o) or 'plain'}" for l, o in LAYER_OPTIONS])
def test_scan_vjp_matches_unrolled_gradients(layer, options):
    g, feeds = _layer_graph(layer, options)
    loops = autodiff(g)
    unrolled = autodiff(unroll_scans(g))
    assert not any(unrolled.node(n).op is ops.SCAN for n in unrolled.ids())
    want = run_graph(unrolled, feeds, float_dtype=np.float64)
    got = run_graph(loops, feeds, float_dtype=np.float64)
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_lstm_backward_is_one_reverse_scan_and_one_weight_matmul():
    g, _ = _layer_graph("lstm", {}, steps=7)
    dg = dce(cse(simplify(autodiff(g))))
    scans = [dg.node(n) for n in dg.ids() if dg.node(n).op is ops.SCAN]
    assert [s.attrs["reverse"] for s in scans] == [False, True]
    forward, backward = scans
    # the forward scan stashes what the backward body reads, per step
    assert len(forward.type.elements) > 3
    assert backward.attrs["carries"] == 2  # dh, dc: no weight-gradient accumulator
    grad_u = dg.node(dg.outputs["grad:layer.u"])
    assert grad_u.op is ops.MATMUL and grad_u.attrs["ta"]
    rows = dg.node(grad_u.operands[0]).type.shape[0]
    assert rows == 7 * 2  # T * batch rows: one matmul over all steps


@pytest.mark.parametrize("layer", ["rnn", "lstm", "gru"])
def test_backward_step_reads_the_weights_transposed_once_before_the_loop(layer):
    """dh = dz @ U^T in the backward body reads a transpose of U made before the loop (a
    kernel would copy U into its layout at every step), with the same gradients."""
    g, feeds = _layer_graph(layer, {}, steps=6)
    dg = autodiff(g)
    hoisted = simplify(dg)
    backward = next(hoisted.node(n) for n in hoisted.ids()
                    if hoisted.node(n).op is ops.SCAN and hoisted.node(n).attrs["reverse"])
    body = backward.attrs["body"]
    invariants = signature(body, backward.attrs["carries"], backward.attrs["seqs"]).invariants
    matmuls = [body.node(n) for n in body.ids() if body.node(n).op is ops.MATMUL]
    assert matmuls and not [m for m in matmuls if m.attrs["tb"] and m.operands[1] in invariants]
    transposed = [n for n in backward.operands if hoisted.node(n).op is ops.PERMUTE]
    weights = "layer.wh" if layer == "rnn" else "layer.u"
    assert transposed and all(hoisted.node(hoisted.operands(n)[0]).attrs.get("name") == weights
                              for n in transposed)
    want = run_graph(dg, feeds, float_dtype=np.float64)
    got = run_graph(hoisted, feeds, float_dtype=np.float64)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("layer", ["rnn", "lstm", "gru"])
def test_graph_size_does_not_grow_with_time(layer):
    sizes = []
    for steps in (3, 1000):
        g, _ = _layer_graph(layer, {"return_sequences": True}, steps=steps)
        sizes.append(len(dce(cse(simplify(autodiff(g))))))
    assert sizes[0] == sizes[1]


LONG_LSTM = """
model long(x: f32[B, 100000, 4]) -> f32[B, 3] {
    h = x |> lstm(16)
    return dense(h, 3)
}

train long {
    data = digits(test=0.2)
    loss = mse(output, label)
    optimizer = sgd(lr=0.1)
    batch = 8
    epochs = 1
}
"""


def test_check_of_an_lstm_over_100000_steps_does_not_unroll(tmp_path):
    m = dlc.load(LONG_LSTM)
    for mode in ("eval", "train"):
        graph = m.built(mode).graph
        assert len(graph) < 60, f"{mode}: {len(graph)} nodes"
        assert any(graph.node(n).op is ops.SCAN for n in graph.ids())
    train = m.compile_graph("train")  # autodiff and the graph passes: still one loop each way
    assert len(train) < 200, len(train)
    assert sum(train.node(n).op is ops.SCAN for n in train.ids()) == 2
    source = tmp_path / "long.dln"
    source.write_text(LONG_LSTM)
    r = subprocess.run([sys.executable, "-m", "dlc", "check", str(source)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, NO_COLOR="1"))
    assert r.returncode == 0, r.stderr
    assert "lstm" in r.stdout


# --- loops on the native backend --------------------------------------------------------------

def _lstm(steps: int, hidden: int = 4, features: int = 3) -> dlc.Model:
    return dlc.load(f"""
model m(x: f32[B, {steps}, {features}]) -> f32[B, 3] {{
    h = x |> lstm({hidden})
    return dense(h, 3)
}}
train m {{
    data = arrays()
    loss = cross_entropy(output, label)
    optimizer = adam(lr=1e-2)
    batch = 2
}}
""")


def test_generated_code_does_not_grow_with_time():
    """The training step of an LSTM over 8 and over 512 steps: the same loops, their bodies'
    functions instruction for instruction; kernels outside the loops, over all steps at
    once, may choose other code by size (a column sum, a GEMM, threads), no more."""
    sizes = []
    for steps in (8, 512):
        program = kernel_program(_lstm(steps).lower("train", batch=2), CPU.templates)
        check_program(program)
        loops = [k for k in program.kernels if isinstance(k, Loop)]
        assert [lp.var.extent for lp in loops] == [steps, steps] and [lp.reverse for lp in loops] == [False, True]
        mb = ModuleBuilder(program, CPU.target({"threads": 2}), tag="t")
        mb.build()
        count = {f.name: sum(len(b.instructions) for b in f.blocks) for mod in mb.modules for f in mod.functions
                 if f.blocks}
        in_loops = {k.name for lp in loops for k in all_kernels(lp.body)}
        fixed = {name: n for name, n in count.items() if name.rsplit(".", 2)[0] in in_loops}
        sizes.append(([(k.name, k.phase) for lp in loops for k in all_kernels(lp.body)] + [len(program.kernels)],
                      fixed, sum(count.values())))
    (kernels8, fixed8, total8), (kernels512, fixed512, total512) = sizes
    assert kernels8 == kernels512 and fixed8 == fixed512 and len(fixed8) >= 4
    assert total512 < 1.5 * total8, (total8, total512)


def test_generated_cuda_does_not_grow_with_time():
    """The CUDA C of an LSTM's training step over 8 and over 512 steps: the same loops with
    the same body kernels, word for word but for numbers (where a view starts depends on T:
    arena offsets, the last step's index); the launch list differs only in the loops'
    extents and in split GEMMs: at T = 512 the weight gradients, summed over B*T = 1024
    rows, split their K (a `_part` launch before each, once a step)."""
    from dlc.backends.cuda.render import render_program
    sources, shapes = [], []
    for steps in (8, 512):
        rendered = render_program(kernel_program(_lstm(steps).lower("train", batch=2), CUDA.templates))
        loops = [s for s in rendered.steps if isinstance(s, LoopStep)]
        assert [lp.extent for lp in loops] == [steps, steps] and [lp.reverse for lp in loops] == [False, True]
        bodies = {launch.kernel for lp in loops for launch in launches_of(lp.steps)}
        assert len(bodies) >= 4
        sources.append({name: re.sub(r"\d+", "N", _cuda_function(rendered.source, name)) for name in bodies})
        shapes.append([(s.name, len(s.steps)) if isinstance(s, LoopStep) else type(s).__name__
                       for s in rendered.steps if not getattr(s, "kernel", "").endswith("_part")])
    assert sources[0] == sources[1] and shapes[0] == shapes[1]


def _cuda_function(source: str, name: str) -> str:
    """The text of one kernel function of a module, from its signature to its closing brace."""
    start = source.index(f" {name}(")
    end = source.index("\n}\n", start)
    return source[source.rindex("\n", 0, start):end]


def _train_steps(m: dlc.Model, target: str, steps: int, tmp_path) -> tuple[list, dict]:
    graph = m.compile_graph("train", m.train_config)
    m.ensure_state(graph)
    state = {k: v.copy() for k, v in m.state.items()}
    program = make_program(target, graph, state, options={"cache_dir": tmp_path})
    rng = np.random.default_rng(0)
    name, t = m.input_types[0]
    out = []
    for _ in range(steps):
        feeds = {name: rng.normal(size=(2,) + tuple(t.shape[1:])).astype(np.float32),
                 "label": rng.integers(0, 3, 2).astype(np.int32), "lr": np.float32(0.01)}
        out.append(program.run(feeds))
    return out, state


def test_lstm_over_1000_steps_trains_on_cpu_like_the_reference(tmp_path):
    """Beyond the old unrolling limit: two training steps on cpu agree with the reference
    interpreter within float32 rounding over 1000 dependent steps (rtol 1e-3, atol 1e-5:
    each step's sums are ordered differently)."""
    m = _lstm(1000)
    want, ref_state = _train_steps(m, "reference", 2, tmp_path)
    got, cpu_state = _train_steps(m, "cpu", 2, tmp_path)
    for a, b in zip(want, got):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-3, atol=1e-5, err_msg=k)
    for k in ref_state:
        np.testing.assert_allclose(cpu_state[k], ref_state[k], rtol=1e-3, atol=1e-5, err_msg=k)


def test_lstm_over_5000_steps_compiles_and_trains_on_cpu(tmp_path):
    (first, second), state = _train_steps(_lstm(5000), "cpu", 2, tmp_path)
    assert np.isfinite(first["loss"]) and np.isfinite(second["loss"])
    assert all(np.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize("length, reverse", [(1, False), (1, True), (4, False), (5, True)])
def test_carry_storage_slots(length, reverse):
    """Where a carry lives: step t reads `entering(t)` and writes `leaving(t)`, which the next
    step reads; the initial carry is in `first`, the final one in `last`; a stacked carry
    keeps every step's (its windows are the stash), a double-buffered one alternates."""
    from dlc.core.kernel import Exprs
    from dlc.core.kernel.analysis import eval_ix
    x = Exprs()
    t = x.var("t", length)
    order = list(reversed(range(length))) if reverse else list(range(length))
    for stacked in (False, True):
        s = Storage(length, reverse, stacked)
        at = lambda f, step: eval_ix(f(x, t), {"t": step})  # noqa: E731
        assert at(s.entering, order[0]) == s.first()
        assert at(s.leaving, order[-1]) == s.last()
        for a, b in zip(order, order[1:]):
            assert at(s.leaving, a) == at(s.entering, b) != at(s.entering, a)
        assert all(0 <= at(f, step) < s.slots for f in (s.entering, s.leaving) for step in order)
        if stacked:  # the windows: slot window(after) + t holds the carry entering (leaving) step t
            assert [at(s.entering, step) for step in range(length)] == \
                [s.window(False) + step for step in range(length)]
            assert [at(s.leaving, step) for step in range(length)] == \
                [s.window(True) + step for step in range(length)]


def test_loop_in_the_kernel_ir_dump():
    m = _lstm(6)
    program = kernel_program(m.lower("train", batch=2), CPU.templates)
    text = format_program(program)
    assert "for t" in text and "down to 0" in text  # the forward loop and the reverse one
    assert ".c0.in = " in text and ".x0 = " in text  # views of the carry storage and of a sequence


# --- passes on scans -------------------------------------------------------------------------

def _rnn_graph(return_sequences):
    g = Graph("r")
    b = GraphBuilder(g)
    x = b.input("x", TensorType(F32, (sym("B"), 4, 3)), "data")
    y = nn.rnn(Ctx(b, False), x, 5, return_sequences=return_sequences)
    g.outputs["out"] = y.id
    return g


def test_dce_drops_unread_stacked_outputs_and_inputs():
    g = dce(_rnn_graph(False))
    (scan,) = [g.node(n) for n in g.ids() if g.node(n).op is ops.SCAN]
    assert len(scan.type.elements) == 1  # the final state only: the stacked states are unread
    assert list(scan.attrs["body"].outputs) == ["c0"]
    kept = dce(_rnn_graph(True))
    (scan,) = [kept.node(n) for n in kept.ids() if kept.node(n).op is ops.SCAN]
    assert len(scan.type.elements) == 2  # the carry stays: each step reads it
    assert list(scan.attrs["body"].outputs) == ["c0", "y0"]


def test_prune_merges_outputs_forwards_sequences_and_drops_dead_carries():
    g = Graph("p")
    b = GraphBuilder(g)
    xs = b.input("xs", f32(3, 2), "data")
    w = b.input("w", f32(2), "data")
    unused = b.input("unused", f32(2), "data")

    def step(sb, cs, x, ws):
        a = cs[0] + x[0]
        return [a, cs[1] * 2.0], [a, a, x[0], cs[1]]

    (c0, c1), (y0, y1, y2, y3) = b.scan(step, [w, w], [xs], [unused])
    g.outputs.update(c0=c0.id, y0=y0.id, y1=y1.id, y2=y2.id)
    feeds = {"xs": np.arange(6.0).reshape(3, 2), "w": np.ones(2), "unused": np.zeros(2)}
    want = run_graph(g, feeds)
    p = dce(g)
    p.verify()
    (scan,) = [p.node(n) for n in p.ids() if p.node(n).op is ops.SCAN]
    assert scan.attrs["carries"] == 1  # c1 is read by nothing live (y3 is unread)
    assert len(scan.type.elements) == 2  # the final c0 and one stacked `a` for y0 and y1
    assert p.outputs["y2"] == p.input_named("xs")  # a stacked sequence slice is the sequence
    assert len(scan.operands) == 2  # w and xs: `unused` is gone
    got = run_graph(p, feeds)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_cse_merges_identical_scans_and_passes_clean_bodies():
    g = Graph("c")
    b = GraphBuilder(g)
    xs = b.input("xs", f32(4, 2), "data")

    def step(sb, cs, x, ws):
        one = sb.const(1.0) * 1.0 + 0.0  # folds and simplifies away inside the body
        return [cs[0] * one + x[0]], []

    (a,), _ = b.scan(step, [b.full(0.0, (2,))], [xs])
    (c,), _ = b.scan(step, [b.full(0.0, (2,))], [xs])
    g.outputs["out"] = (a + c).id
    out = dce(cse(simplify(fold_constants(g))))
    out.verify()
    scans = [out.node(n) for n in out.ids() if out.node(n).op is ops.SCAN]
    assert len(scans) == 1
    body_ops = sorted(scans[0].attrs["body"].node(n).op.name for n in scans[0].attrs["body"].ids())
    assert body_ops == ["add", "input", "input"]
    x = np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32)
    np.testing.assert_allclose(run_graph(out, {"xs": x})["out"], 2 * x.sum(0), rtol=1e-6)


def test_specialize_binds_symbols_inside_bodies():
    g = specialize(_rnn_graph(True), {"B": 7})
    g.verify()
    (scan,) = [g.node(n) for n in g.ids() if g.node(n).op is ops.SCAN]
    body = scan.attrs["body"]
    assert all(isinstance(d, int) for n in body.ids() for d in body.node(n).type.shape)
    assert scan.type.elements[0].shape == (7, 5)


def test_printer_nests_the_body():
    text = print_graph(_rnn_graph(False))
    assert "scan(" in text and "length=4" in text and "carries=1" in text
    assert "    graph rnn_step(%c0: f32[B,5] data, %x0: f32[B,5] data, %w0: f32[5,5] data) {" in text
    assert "      c0 = " in text and "scan_result(" in text


def test_unroll_gives_no_loops_and_the_same_values():
    g = Graph("u")
    b = GraphBuilder(g)
    x = b.input("x", f32(2, 4, 3), "param")
    ctx = Ctx(b, False)
    g.outputs["out"] = nn.lstm(ctx, x, 3, return_sequences=True, bidirectional=True).id
    rng = np.random.default_rng(2)
    feeds = {"x": rng.normal(size=(2, 4, 3))}
    feeds.update({full: rng.normal(size=v.shape) for _, full, v in ctx.created})
    u = unroll_scans(g)
    u.verify()
    assert not any(u.node(n).op in (ops.SCAN, ops.SCAN_RESULT) for n in u.ids())
    np.testing.assert_allclose(run_graph(u, feeds, float_dtype=np.float64)["out"],
                               run_graph(g, feeds, float_dtype=np.float64)["out"], rtol=1e-12, atol=1e-14)


# --- shape rule and builder errors ------------------------------------------------------------

def _body(inputs, outputs):
    body = Graph("body")
    bb = GraphBuilder(body)
    v = {name: bb.input(name, t, "data") for name, t in inputs.items()}
    for name, src in outputs.items():
        body.outputs[name] = (v[src] if isinstance(src, str) else src(bb, v)).id
    return body


BAD_SCANS = {
    "carry-type-changes": ([f32(2)], _body({"c0": f32(2)}, {"c0": lambda bb, v: bb.sum(v["c0"])}),
                           dict(length=3, carries=1, seqs=0)),
    "carry-operand-differs": ([f32(3)], _body({"c0": f32(2)}, {"c0": "c0"}), dict(length=3, carries=1, seqs=0)),
    "sequence-length": ([f32(2), f32(4, 2)], _body({"c0": f32(2), "x0": f32(2)}, {"c0": "x0"}),
                        dict(length=3, carries=1, seqs=1)),
    "sequence-step-type": ([f32(2), f32(3, 5)], _body({"c0": f32(2), "x0": f32(2)}, {"c0": "x0"}),
                           dict(length=3, carries=1, seqs=1)),
    "badly-named-input": ([f32(2)], _body({"h": f32(2)}, {"c0": "h"}), dict(length=3, carries=1, seqs=0)),
    "missing-carry-result": ([f32(2)], _body({"c0": f32(2)}, {"y0": "c0"}), dict(length=3, carries=1, seqs=0)),
    "zero-length": ([f32(2)], _body({"c0": f32(2)}, {"c0": "c0"}), dict(length=0, carries=1, seqs=0)),
    "too-few-operands": ([], _body({"c0": f32(2)}, {"c0": "c0"}), dict(length=2, carries=1, seqs=0)),
}


@pytest.mark.parametrize("name", list(BAD_SCANS))
def test_bad_scan_is_a_shape_error(name):
    types, body, attrs = BAD_SCANS[name]
    with pytest.raises(ShapeError):
        ops.SCAN.infer(*types, body=body, **attrs)


def test_scan_result_needs_a_scan_and_an_index_in_range():
    with pytest.raises(ShapeError):
        ops.SCAN_RESULT.infer(f32(2), index=0)
    with pytest.raises(ShapeError):
        ops.SCAN_RESULT.infer(TupleType((f32(2),)), index=1)


def test_a_body_cannot_read_the_enclosing_graph():
    g = Graph("g")
    b = GraphBuilder(g)
    w = b.input("w", f32(2, 2), "data")
    with pytest.raises(ValueError, match="belongs to graph"):
        b.scan(lambda sb, cs, xs, ws: ([sb.matmul(cs[0], w)], []), [b.full(0.0, (1, 2))], [], [], length=2)


@pytest.mark.parametrize("layer", ["rnn", "lstm", "gru"])
def test_layer_option_errors(layer):
    g = Graph("g")
    b = GraphBuilder(g)
    x = b.input("x", f32(2, 3, 4), "data")
    for kwargs in ({"layers": 0}, {"dropout": 1.0}, {"dropout": -0.1}, {"hidden": 0}):
        args = dict({"hidden": 2}, **kwargs)
        with pytest.raises(DlcError):
            nn.BUILTINS[layer].fn(Ctx(b, True), x, **args)
