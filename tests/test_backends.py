"""The backend interface: every registered backend honours the kernel IR's contract, every
template kind has a generic meaning that runs every example, and the compile cache is
never stale."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import dlc
from dlc import backends
from dlc.core.diagnostics import DlcWarning
from dlc.core.kernel import (MULTIPLY_ADDS, SCALAR_OPS, TEMPLATES, Buffer, Ex, Exprs, Ix, Loop, Reduce, Template,
                             all_kernels, bytes_touched, check_program, expand_templates, format_program,
                             multiply_adds, walk_ex)
from dlc.core.kernel.templates import generic
from dlc.core.types import DType
from dlc.core.kernel import ir as kernel_ir
from dlc.pipeline import kernel_program, lower
from dlc.program import make_program

import example_models
from example_models import EXAMPLES, example_feeds as _example_feeds

ROOT = Path(__file__).resolve().parent.parent
LOWERING = [name for name in backends.names() if backends.backend(name, runnable=False).lowers]


def _node_classes(base) -> set:
    return {c for c in vars(kernel_ir).values() if isinstance(c, type) and issubclass(c, base) and c is not base}


@pytest.mark.parametrize("name", LOWERING)
def test_every_backend_renders_the_whole_kernel_ir(name):
    """A backend that misses a scalar op or an IR node would fail on some model: its tables
    must cover the closed sets of the kernel IR, and its templates must be known kinds."""
    b = backends.backend(name, runnable=False)
    have = b.coverage()
    assert have["scalar ops"] == set(SCALAR_OPS), f"{name}: scalar ops"
    assert have["index nodes"] == _node_classes(Ix), f"{name}: index nodes"
    assert have["scalar nodes"] == _node_classes(Ex), f"{name}: scalar nodes"
    assert set(b.templates) <= set(TEMPLATES), f"{name} renders template kinds the IR does not define"


def test_targets_describe_themselves():
    listed = {n: (doc, why) for n, doc, why in backends.describe()}
    assert set(listed) == set(backends.names()) and all(doc for doc, _ in listed.values())
    with pytest.raises(dlc.DlcError, match="unknown target `tpu`; targets: cpu"):
        backends.backend("tpu")


def _step_programs(path: Path):
    m = example_models.load(path)
    for mode in ("train", "eval"):
        yield m, mode, lower(m.compile_graph(mode, m.train_config), 7)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_kernel_programs_keep_the_contract_with_and_without_templates(path):
    """Every kernel of every example (templates, and all of them expanded) binds its loop
    variables, stays inside its buffers, and epilogues read only their own elements."""
    for m, mode, lowered in _step_programs(path):
        program = kernel_program(lowered, TEMPLATES)
        check_program(program)
        expanded = expand_templates(program)
        check_program(expanded)
        assert not any(isinstance(p, Template) for k in all_kernels(expanded.kernels) for p in k.parts)
        assert "kernel" in format_program(expanded)
        if path.stem in ("lstm_digits", "rnn_digits"):  # recurrent layers run as loops, not unrolled
            assert any(isinstance(k, Loop) for k in program.kernels)
            assert "loop " in format_program(expanded)


def test_multiply_adds_count_the_generic_meanings_products():
    """A GEMM-like template's multiply-adds (the roofline's work) are its output's size
    times its reduction's in the generic loop nest; its bytes, every buffer's once."""
    f32 = DType.f32
    x, w = Buffer("x", f32, (2, 3, 8, 9), "arena"), Buffer("w", f32, (4, 3, 3, 5), "arena")
    y, dw = Buffer("y", f32, (2, 4, 8, 9), "arena"), Buffer("dw", f32, (4, 3, 3, 5), "arena")
    a, b, c = Buffer("a", f32, (7, 5), "arena"), Buffer("b", f32, (6, 7), "arena"), Buffer("c", f32, (5, 6), "arena")
    same = {"stride": (1, 1), "pad": (1, 2)}
    templates = [Template("conv2d", (x, w), y, same),
                 Template("conv2d_bwd_filter", (x, y), dw, {**same, "kernel": (3, 5)}),
                 Template("conv2d_bwd_data", (y, w), x, {**same, "in_hw": (8, 9)}),  # "same" padding
                 Template("matmul", (a, b), c, {"ta": True, "tb": True}),
                 Template("batch_matmul", (Buffer("sa", f32, (3, 7, 5), "arena"), Buffer("sb", f32, (3, 6, 7), "arena")),
                          Buffer("sc", f32, (3, 5, 6), "arena"), {"ta": True, "tb": True})]
    assert {t.op for t in templates} == set(MULTIPLY_ADDS)
    counter = iter(range(1000))
    ex = Exprs()
    for t in templates:
        nest = generic(t, ex, lambda extent: ex.var(f"v{next(counter)}", extent))[0]
        reduced = [v.extent for e in walk_ex([s.value for s in nest.stores]) if isinstance(e, Reduce) for v in e.vars]
        assert multiply_adds(t) == t.output.size * int(np.prod(reduced)), t.op
        assert bytes_touched(t) == 4 * sum(buf.size for buf in t.inputs + (t.output,))
    assert multiply_adds(templates[0]) == 2 * 4 * 8 * 9 * 3 * 3 * 5
    assert multiply_adds(Template("colsum", (a,), Buffer("s", f32, (5,), "arena"), {"axes": (0,)})) == 0


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_train_on_cpu_without_templates(path, tmp_path):
    """The generic loop nests alone (what a new backend starts with) give the reference's
    first training steps on every example."""
    m = example_models.load(path)
    graph = m.compile_graph("train", m.train_config)
    m.ensure_state(graph)
    ref_state = {k: v.copy() for k, v in m.state.items()}
    cpu_state = {k: v.copy() for k, v in m.state.items()}
    ref = make_program("reference", graph, ref_state)
    cpu = make_program("cpu", graph, cpu_state, options={"cache_dir": tmp_path, "templates": False})
    rng = np.random.default_rng(0)
    for step in range(2):
        feeds = _example_feeds(m, 5, rng)
        a, b = ref.run(feeds), cpu.run(feeds)
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=2e-4, atol=1e-5, err_msg=f"{path.stem} step {step}: {k}")
    for k in ref_state:
        np.testing.assert_allclose(cpu_state[k], ref_state[k], rtol=2e-3, atol=1e-4, err_msg=f"{path.stem}: {k}")


def test_index_arithmetic_keeps_ranges_and_floors():
    x = Exprs()
    i, k = x.var("i", 10), x.var("k", 3)
    t = x.sub(x.add(i, x.const(1)), k)              # i + 1 - k in [-1, 10]
    assert (t.lo, t.hi) == (-1, 10)
    q = x.div(t, 2)
    assert (q.lo, q.hi) == (-1, 5)                   # floor(-1 / 2) = -1
    assert x.div(x.add(x.mul(i, 4), x.const(3)), 4) is i
    assert x.mod(x.mul(i, 6), 3).value == 0
    assert x.clamp(i, 0, 9) is i and x.shift(i, 0, 1, 10) is i
    # equal expressions are one object, but one index clamped to two ranges is two indices
    # (a kernel reading two pads of different sizes along one axis took the first's bounds)
    d = x.div(x.sub(i, x.const(1)), 2)              # in [-1, 4]
    narrow, wide = x.clamp(d, 0, 1), x.clamp(d, 0, 2)
    assert narrow is not wide and (narrow.lo, narrow.hi, wide.hi) == (0, 1, 2)
    assert x.clamp(d, 0, 1) is narrow


def _ix_value(e, env: dict) -> int:
    """An index expression's value, as Python computes it (floor division, its remainder)."""
    ir = kernel_ir
    if isinstance(e, ir.Var):
        return env[e.name]
    if isinstance(e, ir.Const):
        return e.value
    if isinstance(e, ir.Add):
        return _ix_value(e.a, env) + _ix_value(e.b, env)
    if isinstance(e, ir.Clamp):
        return min(max(_ix_value(e.a, env), e.lo), e.hi)
    v = _ix_value(e.a, env)
    return {ir.Mul: v * e.c, ir.Div: v // e.c, ir.Mod: v % e.c}[type(e)]


def test_index_simplification_keeps_every_value():
    """Random index expressions built through Exprs's simplifying constructors take, at every
    point of their variables' ranges, the value the unsimplified arithmetic gives, within
    their stated lo..hi."""
    import itertools
    rng = np.random.default_rng(5)
    x = Exprs()
    names = {"i": 6, "j": 4, "k": 3}
    variables = [x.var(n, e) for n, e in names.items()]

    def build(depth):
        kind = rng.integers(8) if depth else rng.integers(2)
        if kind == 0:
            v = variables[rng.integers(3)]
            return v, lambda env, n=v.name: env[n]
        if kind == 1:
            c = int(rng.integers(-4, 9))
            return x.const(c), lambda env: c
        (a, fa), c = build(depth - 1), int(rng.integers(1, 7))
        if kind == 2:
            (b, fb) = build(depth - 1)
            return x.add(a, b), lambda env: fa(env) + fb(env)
        if kind == 3:
            c = int(rng.integers(-3, 13))
            return x.mul(a, c), lambda env: fa(env) * c
        if kind == 4:
            return x.div(a, c), lambda env: fa(env) // c
        if kind == 5:
            return x.mod(a, c), lambda env: fa(env) % c
        if kind == 7:  # a split index joined again (a reshape's unravel, raveled): c*(a // c) + a % c
            k = int(rng.integers(-2, 4))
            return x.add(x.mul(x.div(a, c), c * k), x.mul(x.mod(a, c), k)), lambda env: fa(env) * k
        lo = int(rng.integers(-3, 5))
        return x.clamp(a, lo, lo + c), lambda env: min(max(fa(env), lo), lo + c)

    points = [dict(zip(names, p)) for p in itertools.product(*(range(e) for e in names.values()))]
    for _ in range(400):
        e, f = build(5)
        for env in points:
            v = _ix_value(e, env)
            assert v == f(env) and e.lo <= v <= e.hi, (e, env)


def test_a_reshape_of_a_permutation_indexes_each_axis_by_its_own_variables():
    """The index of a [32, 36] tensor read as [32, 18, 2], permuted and raveled again (how a
    dilated convolution reorders an axis by phase) splits into per-axis parts: no division
    or remainder of a sum is left, and raveling an unraveled index gives it back."""
    x = Exprs()
    a, r = x.var("a", 32), x.var("r", 36)
    flat = x.ravel((a, r), (32, 36))
    half, odd = x.div(r, 2), x.mod(r, 2)
    assert x.unravel(flat, (32, 18, 2)) == (a, half, odd)
    assert x.ravel(x.unravel(flat, (32, 18, 2)), (32, 18, 2)) is flat
    row, col = x.unravel(x.ravel((a, odd, half), (32, 2, 18)), (32, 36))
    assert row is a and _ix_value(col, {"r": 5}) == 1 * 18 + 2

    def divides_a_sum(e):
        if isinstance(e, (kernel_ir.Div, kernel_ir.Mod)) and isinstance(e.a, kernel_ir.Add):
            return True
        return any(divides_a_sum(c) for c in kernel_ir.ix_children(e))
    assert not divides_a_sum(col)
    assert x.data_index(x.lit(1, DType.i32), 0, 5) is not x.data_index(x.lit(1, DType.i32), 0, 9)


# --- the compile cache is never stale ------------------------------------------------------------

SCRIPT = """
import sys, numpy as np, dlc
m = dlc.load(sys.argv[1])
s = m.session(m.train_config, "cpu", verbose=lambda msg: print(msg, file=sys.stderr))
x = np.linspace(-1, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
print(s.train_step(x, np.arange(64, dtype=np.int32) % 10, 0.01)["loss"])
"""


def test_a_changed_layer_definition_misses_the_cache(tmp_path):
    """The fingerprint covers every source file of the compiler: with relu broken on
    purpose in a copy of dlc, the same model and cache miss and train differently."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "dlc", site / "dlc", ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("passes", "backends", "grammar"):
        shutil.copytree(ROOT / sub, site / "dlc" / sub, ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(site), DLC_CACHE_DIR=str(tmp_path / "cache"), DLC_THREADS="1")
    model = str(ROOT / "examples" / "digits_mlp.dln")

    def run():
        r = subprocess.run([sys.executable, "-c", SCRIPT, model], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=600)
        assert r.returncode == 0, r.stderr
        return float(r.stdout), r.stderr

    loss1, _ = run()
    loss2, said = run()
    assert "compile cache hit" in said and loss2 == loss1
    nn = site / "dlc" / "language" / "nn.py"
    text = nn.read_text()
    assert "return ctx.b.maximum(x, 0.0)" in text
    nn.write_text(text.replace("return ctx.b.maximum(x, 0.0)", "return ctx.b.maximum(x, 0.5)"))
    loss3, said = run()
    assert "compile cache hit" not in said and "miss" in said
    assert loss3 != loss1


DIGITS_MLP = (ROOT / "examples" / "digits_mlp.dln").read_text()


def _keys(tmp_path: Path, text: str) -> tuple[str, str]:
    """The training and evaluation steps' compile-cache keys of `text`, saved as
    model.dln (the same name each time: locations name the file)."""
    folder = tmp_path / str(len(list(tmp_path.iterdir())))
    folder.mkdir()
    (folder / "model.dln").write_text(text)
    m = dlc.load(folder / "model.dln")
    return m.source_key("train", m.train_config), m.source_key("eval", None)


@pytest.mark.parametrize("old,new", [
    ("adam(lr=1e-3)", "adam(lr=0.05)"),
    ("epochs    = 30", "epochs    = 3"),
    ("seed      = 0", "seed      = 7"),
    ("digits(test=0.2)", "digits(test=0.3)"),
    ("    seed      = 0\n}\n", "    seed      = 0\n}\n# lr=0.05 was worse\n"),
])
def test_a_new_rate_epoch_count_seed_or_data_option_keeps_the_compile_cache_key(tmp_path, old, new):
    """The step takes the learning rate and the seed as inputs, and nothing else of these
    reaches the compiled code: editing them compiles nothing."""
    assert old in DIGITS_MLP
    assert _keys(tmp_path, DIGITS_MLP.replace(old, new)) == _keys(tmp_path, DIGITS_MLP)


@pytest.mark.parametrize("old,new,eval_too", [
    ("dense(128)", "dense(96)", True),
    ("dropout(h, 0.1)", "dropout(h, 0.2)", False),     # evaluation skips dropout
    ("cross_entropy(output, label)", "0.5 * cross_entropy(output, label)", True),
    ("adam(lr=1e-3)", "adam(lr=1e-3, beta1=0.8)", False),
    ("adam(lr=1e-3)", "sgd(lr=1e-3)", False),
    ("# A multi", "\n# A multi", True),                # every location moves a line
])
def test_what_changes_the_compiled_step_changes_the_compile_cache_key(tmp_path, old, new, eval_too):
    assert old in DIGITS_MLP
    train, evaluation = _keys(tmp_path, DIGITS_MLP.replace(old, new))
    base_train, base_eval = _keys(tmp_path, DIGITS_MLP)
    assert train != base_train
    assert (evaluation != base_eval) == eval_too


def test_a_run_at_a_new_learning_rate_takes_the_cached_step_and_trains_at_that_rate(tmp_path):
    """`dlc run --lr` on a cached model: a cache hit, and the same figures as a run that
    compiled the step afresh at that rate."""
    env = dict(os.environ, DLC_CACHE_DIR=str(tmp_path / "cache"))
    model = str(ROOT / "examples" / "digits_mlp.dln")

    def run(*flags):
        r = subprocess.run([sys.executable, "-m", "dlc", "run", model, "--epochs", "1", *flags], capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=600)
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()[-1], r.stdout + r.stderr

    slow, said = run("--lr", "0.001", "-v")
    assert "compiling… (cached" not in said
    fast, said = run("--lr", "0.05", "-v")
    assert "compiling… (cached" in said
    fresh, _ = run("--lr", "0.05", "--no-cache")
    assert fast.split("; after")[0] == fresh.split("; after")[0] != slow.split("; after")[0]


def test_a_stage_of_another_target_names_that_target(capsys):
    from dlc import cli
    example = str(Path(__file__).resolve().parent.parent / "examples" / "digits_mlp.dln")
    assert cli.main(["compile", example, "--dump-ir=ptx"]) == 2
    err = capsys.readouterr().err
    assert "IR stage `ptx` belongs to target `cuda`, not `cpu`" in err and "hint: add --target cuda" in err
    assert cli.main(["compile", example, "--dump-ir=nonsense"]) == 2
    assert "unknown IR stage `nonsense`" in capsys.readouterr().err


def test_the_default_compile_entries_makes_the_entries_given_as_none_first():
    """Backend.compile_entries (what a backend without a unit compiler gets): make() runs
    before anything compiles, its programs fill the entries given as None in the unit's
    order, and each entry's layout records its blobs."""
    from dlc.backends.base import Backend, Compiled, StepLayout
    events = []

    class Recording(Backend):
        def compile(self, program, target, profile=False, quick=False):
            events.append(("compile", program))
            return Compiled([program.encode()], StepLayout(0, 0, [], {}, []))

    def make():
        events.append(("make", None))
        return {"train": "T"}
    compiled = Recording().compile_entries({"train": None, "eval": "E"}, None, make=make)
    assert events == [("make", None), ("compile", "T"), ("compile", "E")]
    assert list(compiled.layout.entries) == ["train", "eval"]
    assert compiled.blobs == [b"T", b"E"]
    assert [layout.meta["blobs"] for layout in compiled.layout.entries.values()] == [[0, 1], [1, 2]]


def test_predict_without_a_train_block_runs_the_same_chunks_on_every_target():
    """A model whose output mixes the samples of a batch (a log_softmax over the batch axis)
    predicts per chunk of `batch` rows; the reference interpreter used to run all rows at
    once whatever `batch` said, and a random hunt met the difference."""
    m = dlc.load("model m(x: f32[B, 3, 5]) -> f32[B] {\n    return mean(x, axis=[1, 2]) |> log_softmax\n}\n")
    x = np.random.default_rng(0).random((5, 3, 5), dtype=np.float32)
    want = np.concatenate([m.forward(x[:2]), m.forward(x[2:4]), m.forward(x[4:])])
    assert want[-1] == 0  # a softmax over one row
    with pytest.warns(DlcWarning, match="mixes the samples of a batch here .* chunks of 2 rows") as caught:
        got = m.predict(x, target="reference", batch=2, no_cache=True)
    assert len(caught) == 1 and "<string>:2:36: warning" in str(caught[0].message)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for target in ("reference", "cpu"):
        np.testing.assert_allclose(m.predict(x, target=target, batch=2, no_cache=True), want, rtol=1e-6)
        np.testing.assert_allclose(m.predict(x, target=target, no_cache=True), m.forward(x), rtol=1e-6)


def test_predict_warns_only_about_models_that_mix_samples():
    m = dlc.load("model m(x: f32[B, 4]) -> f32[B, 3] {\n    return dense(x, 3) |> batchnorm |> softmax\n}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.predict(np.ones((5, 4), np.float32), batch=2)
