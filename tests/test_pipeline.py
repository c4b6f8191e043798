"""The whole pass pipeline on every example, one pass at a time, against the reference.

For every program in examples/*.dln, the training step ("train") and the evaluation graph
("eval") go through dlc.pipeline.run_passes one pass at a time (GRAPH_PASSES on the
symbolic graph, then LOWER_PASSES for one batch size), keeping the graph after each
pass. Every graph is run on the reference interpreter (backends/reference.py) in float64
on the same random inputs: data and labels at batch 5 for the symbolic graphs and at the
specialized batch (3) for the lowered ones; the model's initial parameters and state,
and random non-negative values for the optimizer's moments (zeros would hide a wrong
coefficient on them). After each pass, every output and update it kept equals the value
before it, to 1e-9 relative (in float64).

Exceptions, each stated where it applies:
- autodiff adds `grad:` results: they are checked against a central difference of the
  loss along a random direction in parameter space;
- optimizer replaces the gradients by the updates: the loss and the model's own updates
  (batchnorm's running statistics) must stay; the new updates are compared elsewhere
  (tests/test_optimizers.py) against the textbook;
- fold_constants evaluates constants at the graph's precision (f32), which a float64 run
  of the unfolded graph does not (1/0.9 is 1.1111112 in f32): its float64 check has
  f32's tolerance (1e-6), and a float32 run must agree bit for bit.

Also: the driver's result (Model.lower) is the graph after the last pass; no pass changes
its input graph; the lowered graphs satisfy the fusion and memory invariants of
tests/test_passes.py; the digits MLP training step fuses to at most 12 kernels and its
memory plan saves at least 40% against one buffer per node.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

import dlc
from dlc.backends.reference import run_graph
from dlc.pipeline import GRAPH_PASSES, LOWER_PASSES, Compilation, PassContext, run_passes
from dlc.core.printer import print_graph
from dlc.passes.specialize import is_symbolic

import example_models
from test_passes import check_fusion, check_memory, check_reasons

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = sorted(p.stem for p in EXAMPLES_DIR.glob("*.dln"))
GRAPH_BATCH = 5   # the symbolic graphs run at this batch
LOWER_BATCH = 3   # the lowered graphs are specialized to this one
RTOL = 1e-9
FOLD_RTOL = 1e-6


def test_there_are_examples():
    assert "digits_mlp" in EXAMPLES and len(EXAMPLES) >= 5


# --- compiling one pass at a time --------------------------------------------------------------------

class Stage:
    def __init__(self, index: int, name: str, before, after, batch: int, lowered: bool):
        self.index, self.name, self.before, self.after = index, name, before, after
        self.batch, self.lowered = batch, lowered

    @property
    def id(self) -> str:
        return f"{self.index:02d}_{self.name}"


@functools.lru_cache(maxsize=None)
def model(example: str) -> dlc.api.Model:
    return example_models.load(EXAMPLES_DIR / f"{example}.dln")


@functools.lru_cache(maxsize=None)
def compiled(example: str, mode: str) -> tuple[list[Stage], "dlc.graph.Graph"]:
    """The stages of one compilation, each pass run alone through run_passes, and the
    graph Model.lower gives for the same batch."""
    m = model(example)
    config = m.train_config if mode == "train" else None
    graph = m.built(mode).graph
    stages: list[Stage] = []
    for passes, ctx, batch, lowered in ((GRAPH_PASSES, PassContext(config), GRAPH_BATCH, False),
                                        (LOWER_PASSES, PassContext(config, LOWER_BATCH), LOWER_BATCH, True)):
        for p in passes:
            log = Compilation()
            text = print_graph(graph)
            after = run_passes(graph, (p,), ctx, log)
            if not log.records:  # a train-only pass in eval mode
                continue
            assert log.records[-1].graph is after and log.records[-1].name == p.name
            assert print_graph(graph) == text, f"pass {p.name} changed its input graph"
            stages.append(Stage(len(stages), p.name, graph, after, batch, lowered))
            graph = after
    final = m.lower(mode, batch=LOWER_BATCH)
    m.ensure_state(final)
    return stages, final


def stage_params():
    out = []
    for ex in EXAMPLES:
        for mode in ("train", "eval"):
            names = [p.name for p in GRAPH_PASSES if (mode == "train" or not p.train_only) and not p.parallel_only]
            names += [p.name for p in LOWER_PASSES]
            for i, name in enumerate(names):
                out.append(pytest.param(ex, mode, i, id=f"{ex}-{mode}-{i:02d}_{name}"))
    return out


# --- inputs and runs ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def feeds(example: str, mode: str, batch: int) -> dict[str, np.ndarray]:
    """Random data and labels at `batch`, the model's initial state, random moments."""
    _, final = compiled(example, mode)
    m = model(example)
    rng = np.random.default_rng(sum(map(ord, example + mode)) + batch)
    classes = m.built("eval").graph.node(m.built("eval").graph.outputs["output"]).type.shape[-1]
    out = {}
    for nid in final.inputs():
        a = final.node(nid).attrs
        name, t, role = a["name"], a["type"], a["role"]
        shape = tuple(batch if not isinstance(d, int) else d for d in t.shape)
        if role == "data" and not t.dtype.is_float:  # tokens, below every example's vocabulary
            out[name] = rng.integers(0, 17, shape).astype(t.dtype.np)
        elif role == "data":  # inputs and carried states
            out[name] = rng.standard_normal(shape).astype(np.float32)
        elif role == "label":
            out[name] = (rng.standard_normal(shape).astype(np.float32) if t.dtype.is_float
                         else rng.integers(0, classes, shape).astype(t.dtype.np))
        elif name == "valid_rows":                          # mask_batch: every row is real
            out[name] = None
        elif role == "hyper":
            out[name] = np.asarray(0.01, t.dtype.np)
        elif name in m.built("train").params or name in m.built("eval").params:
            out[name] = np.asarray(m.state[name])           # initial parameters and state
        elif t.dtype.is_float:                              # optimizer moments and accumulators
            out[name] = rng.uniform(0.0, 0.1, shape).astype(t.dtype.np)
        else:
            out[name] = np.asarray(m.state[name])           # the step counter, the dropout seed
    if "valid_rows" in out:
        rows = next(len(out[final.node(i).attrs["name"]]) for i in final.inputs("data"))
        out["valid_rows"] = np.asarray(rows, np.int32)
    return out


@functools.lru_cache(maxsize=None)
def results(example: str, mode: str, index: int, which: str, float_dtype=np.float64) -> dict[str, np.ndarray]:
    stages, _ = compiled(example, mode)
    s = stages[index]
    g = s.before if which == "before" else s.after
    f = feeds(example, mode, s.batch)
    names = {g.node(i).attrs["name"] for i in g.inputs()}
    return run_graph(g, {k: v for k, v in f.items() if k in names}, float_dtype=float_dtype)


def assert_close(got: dict, want: dict, keys, rtol: float, what: str) -> None:
    bad = []
    for k in keys:
        a, b = np.asarray(got[k]), np.asarray(want[k])
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {k} is {a.dtype}{a.shape}, was {b.dtype}{b.shape}"
        if a.dtype.kind != "f":
            if not np.array_equal(a, b):
                bad.append(f"{k}: differs")
            continue
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        err = float(np.max(np.abs(a - b))) if b.size else 0.0
        if not np.all(np.isfinite(a) == np.isfinite(b)) or err > rtol * max(scale, 1e-30):
            bad.append(f"{k}: max error {err:.3g} for values up to {scale:.3g}")
    assert not bad, f"{what}:\n  " + "\n  ".join(bad)


# --- every pass preserves every result ------------------------------------------------------------------

@pytest.mark.parametrize("example,mode,index", stage_params())
def test_pass_preserves_results(example, mode, index):
    stages, _ = compiled(example, mode)
    s = stages[index]
    before, after = results(example, mode, index, "before"), results(example, mode, index, "after")
    what = f"{example} {mode}: after {s.name} (batch {s.batch})"
    if s.name == "autodiff":
        assert set(after) == set(before) | {f"grad:{p}" for p in _params(s.before)}, what
        keys = before.keys()
    elif s.name == "optimizer":
        kept = {k for k in before if not k.startswith("grad:") and k != "output"}
        assert kept <= set(after), f"{what}: lost {kept - set(after)}"
        assert {k for k in after if k.startswith("update:")} >= {f"update:{p}" for p in _params(s.before)}
        keys = kept
    else:
        assert set(after) == set(before), what
        keys = before.keys()
    assert_close(after, before, keys, FOLD_RTOL if s.name == "fold_constants" else RTOL, what)
    if s.name == "fold_constants":  # at the graph's own precision folding is exact
        b32 = results(example, mode, index, "before", np.float32)
        a32 = results(example, mode, index, "after", np.float32)
        assert_close(a32, b32, keys, 0.0, what + " in float32")


def _params(g) -> list[str]:
    return [g.node(i).attrs["name"] for i in g.inputs("param")]


@pytest.mark.parametrize("example", EXAMPLES)
def test_autodiff_gradients_match_a_central_difference(example):
    """d loss / d t along a random direction v in parameter space equals sum(grad . v)."""
    if example == "perceptron":
        pytest.skip("by design not the loss's derivative: perceptron() differentiates the output's "
                    "error through the straight-through `step` (tests/test_workflow.py checks its rule)")
    stages, _ = compiled(example, "train")
    s = next(s for s in stages if s.name == "autodiff")
    f = feeds(example, "train", s.batch)
    grads = results(example, "train", s.index, "after")
    rng = np.random.default_rng(1)
    params = _params(s.before)
    v = {p: rng.standard_normal(f[p].shape) for p in params}
    norm = np.sqrt(sum(float(np.sum(x * x)) for x in v.values()))
    v = {p: x / norm for p, x in v.items()}  # a unit step: few relu kinks are crossed
    names = {s.before.node(i).attrs["name"] for i in s.before.inputs()}
    base = {k: np.asarray(f[k], np.float64) if f[k].dtype.kind == "f" else f[k] for k in names}

    def loss(t: float) -> float:
        moved = dict(base, **{p: base[p] + t * v[p] for p in params})
        return float(run_graph(s.before, moved, float_dtype=np.float64)["loss"])

    h = 1e-6
    numeric = (loss(h) - loss(-h)) / (2 * h)
    analytic = sum(float(np.sum(grads[f"grad:{p}"] * v[p])) for p in params)
    assert abs(numeric - analytic) <= 1e-5 * max(0.1, abs(analytic)), (numeric, analytic)


@pytest.mark.parametrize("example", EXAMPLES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_driver_result_is_the_last_stage(example, mode):
    stages, final = compiled(example, mode)
    names = [s.name for s in stages]
    assert {"specialize", "fuse", "memory"} <= set(names)
    assert names.index("specialize") < names.index("fuse") < names.index("memory")
    assert print_graph(stages[-1].after) == print_graph(final)
    for s in stages:
        assert is_symbolic(s.after) == (not s.lowered), s.id
    if mode == "train":
        assert final.node(final.outputs["loss"]).type.shape == ()
        assert set(final.updates) >= set(_params(final))


# --- the lowered graphs: fusion and memory invariants ---------------------------------------------------

@pytest.mark.parametrize("example", EXAMPLES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fusion_and_memory_invariants(example, mode):
    _, final = compiled(example, mode)
    assert check_fusion(final) == []
    assert check_memory(final) == []


def test_explain_fusion_covers_every_split_pair_of_the_digits_mlp():
    _, final = compiled("digits_mlp", "train")
    assert check_reasons(final) == []


@pytest.mark.parametrize("example", EXAMPLES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_every_optional_pass_can_be_disabled(example, mode):
    """Without simplify, fold_constants, cse and dce (`--disable-pass`) the step still
    lowers to a valid plan and computes the same results."""
    optional = sorted({p.name for p in GRAPH_PASSES + LOWER_PASSES if not p.required})
    g = model(example).lower(mode, batch=LOWER_BATCH, disabled=optional)
    assert not {"simplify", "fold_constants", "cse", "dce"} - set(optional)
    assert check_fusion(g) == [] and check_memory(g) == []
    f = feeds(example, mode, LOWER_BATCH)
    names = {g.node(i).attrs["name"] for i in g.inputs()}
    got = run_graph(g, {k: v for k, v in f.items() if k in names}, float_dtype=np.float64)
    want = results(example, mode, len(compiled(example, mode)[0]) - 1, "after")
    assert set(got) == set(want)
    assert_close(got, want, want.keys(), FOLD_RTOL, f"{example} {mode} with {optional} disabled")


SCALE = """\
model scale(x: f32[B, 4]) -> f32[B, 4] {
    param a: f32[4] = normal(0, 0.1)
    param c: f32[1] = normal(0, 0.1)
    return x * a * c
}

train scale {
    data      = arrays()
    loss      = mse(output, label)
    optimizer = sgd(lr=0.1)
    batch     = 8
}
"""


def test_compiles_a_model_whose_updates_read_each_others_parameters():
    g = dlc.load(SCALE).lower("train", batch=8)
    assert check_fusion(g) == [] and check_memory(g) == []


def test_digits_mlp_training_step_fuses_to_few_kernels():
    g = model("digits_mlp").lower("train")   # the train block's batch (64)
    plan = g.meta["fusion"]
    assert len(plan.kernels) <= 12, plan.describe(g)
    assert check_fusion(g) == [] and check_memory(g) == []


def test_digits_mlp_memory_plan_saves_at_least_40_percent():
    for batch in (None, LOWER_BATCH):
        g = model("digits_mlp").lower("train", batch=batch)
        mem = g.meta["memory"]
        assert mem.saving >= 0.40, (batch, mem.arena_bytes, mem.naive_bytes)
        # every parameter and optimizer moment is updated in place
        assert set(mem.inplace) == set(g.updates), set(g.updates) - set(mem.inplace)
