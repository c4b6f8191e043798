"""The CUDA backend without a GPU: every kernel of every example and of the op table is
rendered to CUDA C and

(a) compiled by NVRTC to PTX and to sm_90 machine code with no register spills (skipped,
    with the reason, without CuPy/NVRTC), and
(b) the same source runs on the CPU through the host emulation (tests/cuda_host: the
    step's launch list in order over a host arena and the state arrays) and matches the
    reference interpreter: the op table (forward and gradient) and the first training
    steps of every example.

Emulated sizes are small (batch 2-5); the heavier cases are marked slow.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dlc
from dlc import backends
from dlc.backends.reference import run_graph
from dlc.pipeline import kernel_program, lower
from dlc.program import make_program

from dlc.backends.cuda.render import LoopStep, launches_of, launches_per_step

from hypothesis import event, given, settings
from hypothesis import strategies as st

from cuda_host.step import HostStep
from test_fuzz import FUZZ, PLAIN_SGD, fuzz_labels, generated
from op_table import ALL
import example_models
from test_backend_cpu import _example_feeds, check_op_table, op_table_graph

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.dln"))
HEAVY = ("lstm_digits", "resnet_bn", "rnn_digits")  # the most kernels, or slow to emulate
RECURRENT = {"lstm_digits": 8, "rnn_digits": 8, "sentiment_lstm": 200, "char_lm": 40}  # example -> time steps
CUDA = backends.backend("cuda", runnable=False)
TARGET = CUDA.target({"arch": "sm_90"})
CHUNK = 24  # op-table rows per module


@pytest.fixture(scope="module")
def nvrtc():
    pytest.importorskip("cupy", reason="CuPy is not installed: pip install 'dlc[cuda]'")
    from dlc.backends.cuda import nvrtc
    have = nvrtc.nvrtc_available()
    if not have:
        pytest.skip(have.reason)
    return nvrtc


def _program(graph, batch: int):
    return kernel_program(lower(graph, batch), CUDA.templates)


def _assert_compiles_without_spills(nvrtc, source: str, layouts: list):
    """One NVRTC run: PTX with every kernel, sm_90 machine code, no spills anywhere."""
    module = nvrtc.compile_cuda(source, "sm_90")
    assert module.binary[:4] == b"\x7fELF"
    ptx = module.ptx.decode()
    kernels = [s["launch"]["kernel"] for layout in layouts for s in layout.meta["steps"] if "launch" in s]
    assert kernels and len(set(kernels)) == len(kernels)
    for name in kernels:
        assert f".entry {name}(" in ptx, name
        report = module.kernels[name]
        assert (report.spill_stores, report.spill_loads, report.stack_frame) == (0, 0, 0), report
        assert report.registers <= 255 and report.shared_bytes <= 48 * 1024, report
    return len(kernels)


def _rendered(program, prefix: str):
    from dlc.backends.cuda.render import render_program
    from dlc.backends.base import StepLayout
    r = render_program(program, prefix)
    layout = StepLayout(program.arena_bytes, r.workspace_bytes, [], {}, [],
                        meta={"steps": [s.to_json() for s in r.steps]})
    return r.source, layout


# --- (a) every kernel of every example through NVRTC ------------------------------------------------

def _example_params():
    out = []
    for p in EXAMPLES:
        for batches in ((5, 2), (64, 1)):
            slow = batches != (5, 2) or p.stem in HEAVY
            out.append(pytest.param(p, batches, id=f"{p.stem}-b{batches[0]},{batches[1]}",
                                    marks=[pytest.mark.slow] if slow else []))
    return out


@pytest.mark.parametrize("path, batches", _example_params())
def test_every_example_kernel_compiles_without_spills(nvrtc, path, batches):
    """Training and evaluation steps at two batch sizes (odd and even), all in one module."""
    m = example_models.load(path)
    sources, layouts = [], []
    for mode in ("train", "eval"):
        graph = m.compile_graph(mode, m.train_config)
        for batch in batches:
            source, layout = _rendered(_program(graph, batch), f"{mode}{batch}_")
            sources.append(source)
            layouts.append(layout)
    count = _assert_compiles_without_spills(nvrtc, "\n".join(sources), layouts)
    assert count >= 4


# --- (b) the same source, emulated, against the reference ----------------------------------------------

def _emulate_training(path: Path, batch: int, steps: int = 2):
    m = example_models.load(path)
    graph = m.compile_graph("train", m.train_config)
    m.ensure_state(graph)
    ref_state = {k: v.copy() for k, v in m.state.items()}
    cuda_state = {k: v.copy() for k, v in m.state.items()}
    ref = make_program("reference", graph, ref_state)
    source, layout = CUDA.render(_program(graph, batch), TARGET)
    step = HostStep(source, layout)
    rng = np.random.default_rng(0)
    for i in range(steps):
        feeds = _example_feeds(m, batch, rng)
        a, b = ref.run(feeds), step.run(cuda_state, feeds)
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=2e-4, atol=1e-5, err_msg=f"{path.stem} step {i}: {k}")
    for k in ref_state:
        np.testing.assert_allclose(cuda_state[k], ref_state[k], rtol=2e-3, atol=1e-4, err_msg=f"{path.stem}: {k}")
    return step


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.stem == "resnet_bn" else [])
                                  for p in EXAMPLES])
def test_example_training_steps_emulated_match_reference(path):
    """The first two training steps (batch 5) of the generated CUDA C, run on the host,
    give the reference's results and state updates. A recurrent layer is a host loop of
    launches over its time steps (with initial states, masked steps, per-step losses and a
    carried state in the sequence examples), not unrolled."""
    step = _emulate_training(path, 5)
    assert step.launched == 2 * launches_per_step(step.steps)
    loops = [s for s in step.steps if isinstance(s, LoopStep)]
    steps = RECURRENT.get(path.stem)
    if steps is not None:
        assert loops and all(s.extent == steps for s in loops)
        assert step.launched > 2 * len(launches_of(step.steps))
    else:
        assert not loops


def test_a_filter_gradient_split_over_k_matches_reference():
    """At batch 16 LeNet-5's filter gradients sum over K = 16*OH*OW, too long for their few
    blocks: the slices of K go to a workspace and split_sum adds them in order, then runs
    the epilogue (the optimizer's update)."""
    step = _emulate_training(EXAMPLES[0].parent / "lenet5.dln", 16)
    names = [launch.kernel for launch in launches_of(step.steps)]
    split = [n for n in names if n + "_part" in names]
    assert split and all(names.index(n + "_part") + 1 == names.index(n) for n in split), names
    assert "split_sum" in step.module.source


def test_a_module_splits_into_balanced_translation_units():
    """Each kernel in exactly one unit, every unit the prelude and whole kernels, no unit
    larger than the smallest plus the largest kernel; no kernels: the prelude alone."""
    from dlc.backends.cuda.emit import PRELUDE
    from dlc.backends.cuda.render import Rendered, render_program
    m = example_models.load(EXAMPLES[0].parent / "lenet5.dln")
    rendered = render_program(_program(m.compile_graph("train", m.train_config), 5))
    sizes = {name: len(text) for name, text in rendered.pieces}
    for count in (1, 2, 5, 1000):
        units = rendered.units(count)
        assert len(units) == min(count, len(sizes))
        assert sorted(n for names, _ in units for n in names) == sorted(sizes)
        assert all(src.startswith(PRELUDE) and all(f" {n}(" in src for n in names) for names, src in units)
        totals = [sum(sizes[n] for n in names) for names, _ in units]
        assert max(totals) <= min(totals) + max(sizes.values())
    assert Rendered("", []).units(4) == [([], PRELUDE)]


def test_resnet_training_steps_emulated_at_batch_2():
    _emulate_training(EXAMPLES[0].parent / "resnet_bn.dln", 2)


def _rows():
    # allreduce and batchnorm(sync=true) make Collective parts, which this backend does not
    # run (Backend.collectives is False: data-parallel jobs on it are refused)
    return [c for c in ALL if not c.xfail and c.op != "allreduce" and not c.attrs.get("sync")]


def _chunks():
    rows = _rows()
    return [pytest.param(rows[i:i + CHUNK], id=f"rows{i}-{i + len(rows[i:i + CHUNK]) - 1}")
            for i in range(0, len(rows), CHUNK)]


def _op_table_graph(rows):
    return op_table_graph(rows, salt="cuda")


@pytest.mark.parametrize("rows", _chunks())
def test_op_table_emulated_matches_reference(rows):
    """Each row's output, state updates and gradients, from the generated CUDA C on the
    host, match the reference interpreter in float32 (as on the CPU backend)."""
    merged, feeds, tols = _op_table_graph(rows)
    expected = run_graph(merged, feeds)
    source, layout = CUDA.render(_program(merged, 1), TARGET)
    step = HostStep(source, layout)
    state = {name: np.array(feeds[name], copy=True) for name, kind, _, _ in layout.slots if kind == "state"}
    actual = step.run(state, feeds)
    actual.update({f"update:{k}": v for k, v in state.items()})
    check_op_table(expected, actual, tols)


@pytest.mark.parametrize("rows", _chunks())
def test_op_table_compiles_without_spills(nvrtc, rows):
    merged, _, _ = _op_table_graph(rows)
    source, layout = _rendered(_program(merged, 1), "")
    _assert_compiles_without_spills(nvrtc, source, [layout])


@settings(FUZZ, max_examples=FUZZ.max_examples // 8)
@given(generated(mistakes=False), st.sampled_from([5, 37]))
@pytest.mark.filterwarnings("ignore::dlc.core.diagnostics.DlcWarning")
def test_generated_models_train_emulated_as_on_the_reference(case, rows):
    """The valid models of tests/test_fuzz.py's generator: three training steps of their
    CUDA C, emulated, give the reference's results (and with plain SGD its state), at a
    batch of 5 and of 37 (where the kernels' blocks and grids have several members), the
    third with two rows of padding."""
    text, dtype, in_shape, declared, vocab, bad_line = case
    if bad_line is not None:
        return
    text += PLAIN_SGD if "train net" not in text else ""
    m = dlc.load(text)
    graph = m.compile_graph("train", m.train_config)
    m.ensure_state(graph)
    ref_state = {k: v.copy() for k, v in m.state.items()}
    cuda_state = {k: v.copy() for k, v in m.state.items()}
    ref = make_program("reference", graph, ref_state)
    step = HostStep(*CUDA.render(_program(graph, rows), TARGET))
    rng = np.random.default_rng(0)
    shape = (rows,) + tuple(in_shape[1:])
    x = rng.integers(0, vocab, shape).astype(np.int32) if dtype == "i32" else rng.random(shape, dtype=np.float32)
    feeds = {m.input_types[0][0]: x, "lr": np.float32(m.train_config.optimizer.args["lr"]),
             "valid_rows": np.int32(rows)}
    y = fuzz_labels(text, declared, rows)
    if y is not None:
        feeds["label"] = y
    for c in m.built("train").carries:  # what a previous batch left in the model's `state`s
        feeds[c.input] = rng.uniform(-0.5, 0.5, (rows,) + tuple(int(d) for d in c.type.shape[1:])).astype(np.float32)
    for i in range(3):
        if i == 2:  # a short last batch: its last two rows are padding
            feeds["valid_rows"] = np.int32(rows - 2)
        want, got = ref.run(feeds), step.run(cuda_state, feeds)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-3, atol=1e-5, err_msg=f"step {i}: {k}\n{text}")
    if PLAIN_SGD in text:
        for k in ref_state:
            np.testing.assert_allclose(cuda_state[k], ref_state[k], rtol=1e-3, atol=1e-4, err_msg=f"{k}\n{text}")
    event("emulated and compared" + (" with plain SGD" if PLAIN_SGD in text else ""))


def test_check_numerics_guards_the_emulated_step():
    """check_numerics' gradient check in CUDA C: a step whose gradients are not finite (though
    its loss is) reports NaN in `gradient_check` and changes no parameter, as on the reference."""
    m = dlc.load("""\
model g(x: f32[B, 3]) -> f32[B, 2] {
    param w: f32[3, 2] = normal(0, 0.5)
    h = sqrt((x * x) @ (w * w))
    return dense(h, 2)
}
train g { data = arrays()  loss = mse(output, label)  optimizer = adam()  batch = 8  check_numerics = true }
""")
    graph = m.compile_graph("train", m.train_config)
    m.ensure_state(graph)
    ref_state = {k: v.copy() for k, v in m.state.items()}
    cuda_state = {k: v.copy() for k, v in m.state.items()}
    ref = make_program("reference", graph, ref_state)
    step = HostStep(*CUDA.render(_program(graph, 8), TARGET))
    feeds = {"x": np.ones((8, 3), np.float32), "label": np.ones((8, 2), np.float32), "lr": np.float32(0.01),
             "valid_rows": np.int32(8)}
    for x, finite in ((np.ones((8, 3), np.float32), True), (np.zeros((8, 3), np.float32), False)):
        before = {k: v.copy() for k, v in cuda_state.items()}
        want, got = ref.run({**feeds, "x": x}), step.run(cuda_state, {**feeds, "x": x})
        assert np.isfinite(want["gradient_check"]) == finite and np.isfinite(got["gradient_check"]) == finite
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
        for k in ref_state:
            np.testing.assert_allclose(cuda_state[k], ref_state[k], rtol=1e-4, atol=1e-6, err_msg=k)
            assert finite or np.array_equal(cuda_state[k], before[k]), k


# --- the command line without a GPU ---------------------------------------------------------------------

def _dlc(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dlc", *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, **(env or {})), timeout=600)


def _no_gpu():
    from dlc.backends.cuda import nvrtc
    have = nvrtc.gpu_available()
    if have:
        pytest.skip("this machine has a GPU")
    return have.reason


def test_dump_cuda_needs_no_gpu():
    r = _dlc("compile", "examples/lenet5.dln", "--dump-ir=cuda", "--target", "cuda")
    assert r.returncode == 0, r.stderr
    assert "dlc_block_reduce" in r.stdout and "// ==== k0_conv (phase 0): lenet5.dln:5" in r.stdout
    assert 'extern "C" __global__' in r.stdout


def test_dump_ptx_needs_no_gpu(nvrtc):
    r = _dlc("compile", "examples/logreg.dln", "--dump-ir=ptx", "--target", "cuda")
    assert r.returncode == 0, r.stderr
    assert ".entry k0_" in r.stdout and ".target sm_90" in r.stdout


def test_run_without_a_gpu_is_one_clear_sentence():
    reason = _no_gpu()
    r = _dlc("run", "examples/logreg.dln", "--target", "cuda", "--epochs", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: target `cuda` is unavailable: {reason}"
    r = _dlc("targets")
    assert r.returncode == 0 and f"unavailable: {reason}" in r.stdout


def test_run_without_cupy_says_how_to_install(tmp_path):
    """With CuPy hidden (an import of it fails), the sentence names the install command."""
    (tmp_path / "cupy.py").write_text("raise ImportError('hidden for this test')\n")
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = _dlc("run", "examples/logreg.dln", "--target", "cuda", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: target `cuda` is unavailable: CuPy is not installed: pip install 'dlc[cuda]'"
    r = _dlc("compile", "examples/logreg.dln", "--dump-ir=cuda", "--target", "cuda", env=env)
    assert r.returncode == 0 and "__global__" in r.stdout


# --- targets and the compile cache --------------------------------------------------------------------

def test_target_key_names_the_architecture_and_nvrtc(nvrtc):
    t = CUDA.target({"arch": "sm_90"})
    version = ".".join(map(str, nvrtc.nvrtc_version()))
    assert t.key() == f"cuda|sm_90|nvrtc {version}" and t.to_json() == {"arch": "sm_90", "nvrtc": version}
    assert CUDA.target({"arch": "sm_80"}).key() != t.key()
    assert CUDA.check_target(t.to_json(), t) is None
    why = CUDA.check_target({"arch": "sm_80", "nvrtc": version}, t)
    assert why == f"it was compiled for sm_80 (NVRTC {version}); this GPU needs sm_90"


def test_compile_gives_a_cubin_and_the_launch_list(nvrtc):
    """compile(): the blob is machine code and the layout holds every launch, in order."""
    m = dlc.load(EXAMPLES[0].parent / "logreg.dln")
    program = _program(m.compile_graph("train", m.train_config), 3)
    compiled = CUDA.compile(program, TARGET)
    assert compiled.blobs[0][:4] == b"\x7fELF" and compiled.layout.meta["arch"] == "sm_90"
    launches = [s["launch"] for s in compiled.layout.meta["steps"] if "launch" in s]
    assert [s["part"] for s in launches] == [name for name, _, _ in compiled.layout.kernels]
    assert [k.name for k in program.kernels] == list(dict.fromkeys(s["part"] for s in launches))
    assert all(len(s["grid"]) == 3 and len(s["block"]) == 3 for s in launches)
    assert any("registers" in n and "spill" in n for n in compiled.notes)
