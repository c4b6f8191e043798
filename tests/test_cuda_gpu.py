"""The CUDA backend on a real GPU (marked `gpu`: skipped, with the reason, where there is
no GPU or no CuPy -- CI). Run them with `pytest -m gpu` on a machine with one
(benchmarks/gpu_check.sh does, with the rest of the GPU checks).

- every case of test_cuda_templates, compiled for the device and launched through CuPy,
  held to the same numpy bounds;
- the op table and every example's first training steps on `--target cuda` against the
  reference interpreter (the same tolerances as the CPU backend);
- the device state: shared by a session's steps, copied back whenever the host reads it,
  re-read after the host writes it; graph replays are deterministic; deferred results;
  profiles map kernels to .dln lines.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import dlc
import test_cuda_templates as tt
from dlc import backends
from dlc.backends.cuda import nvrtc
from dlc.backends.reference import run_graph
from dlc.pipeline import kernel_program, lower
from dlc.program import make_program

import example_models
from test_backend_cpu import _example_feeds, check_op_table
from test_cuda_backend import _chunks, _op_table_graph

pytestmark = pytest.mark.gpu
EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.dln"))


# --- the templates, launched one by one ---------------------------------------------------------------

@pytest.fixture(scope="module")
def device():
    import cupy
    arch = nvrtc.arch_for(int(cupy.cuda.Device().compute_capability))
    compiled = nvrtc.compile_cuda(tt.T.module(*tt.ALL_KERNELS), arch)
    module = cupy.cuda.function.Module()
    module.load(compiled.binary)  # a cubin, or PTX the driver compiles
    return module


def _to_device(a):
    import cupy
    if isinstance(a, np.ndarray):
        return cupy.asarray(a)
    return np.int32(a) if isinstance(a, int) else np.float32(a)


@pytest.mark.parametrize("case", tt.CASES, ids=lambda c: c.id)
def test_template_matches_numpy_on_gpu(device, case):
    launches, out, want, bound = case.make()
    for kernel, args in zip(case.kernels, launches):
        on_device = [_to_device(a) for a in args]
        device.get_function(kernel.name)(kernel.grid, kernel.block, tuple(on_device))
        for host, dev in zip(args, on_device):
            if isinstance(host, np.ndarray):
                host[...] = dev.get()
    got = np.asarray(out, dtype=np.float64)
    assert np.isfinite(got).all(), "elements left unwritten (NaN-filled output)"
    assert (np.abs(got - want) <= bound).all()


# --- whole steps -----------------------------------------------------------------------------------------

def _train_pair(path: Path, tmp_path, **options):
    m = example_models.load(path)
    graph = m.compile_graph("train", m.train_config)
    m.ensure_state(graph)
    ref_state = {k: v.copy() for k, v in m.state.items()}
    cuda_state = {k: v.copy() for k, v in m.state.items()}
    ref = make_program("reference", graph, ref_state)
    cuda = make_program("cuda", graph, cuda_state, options={"cache_dir": tmp_path, **options})
    return m, ref, cuda, ref_state, cuda_state


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_training_steps_on_gpu_match_reference(path, tmp_path):
    """Three steps at batch 13 (no warp or tile divides it), results and state."""
    m, ref, cuda, ref_state, cuda_state = _train_pair(path, tmp_path)
    rng = np.random.default_rng(0)
    for step in range(3):
        feeds = _example_feeds(m, 13, rng)
        a, b = ref.run(feeds), cuda.run(feeds)
        for k in a:
            np.testing.assert_allclose(np.asarray(b[k]), a[k], rtol=2e-4, atol=1e-5,
                                       err_msg=f"{path.stem} step {step}: {k}")
    backends.sync_state(cuda_state)
    for k in ref_state:
        np.testing.assert_allclose(cuda_state[k], ref_state[k], rtol=2e-3, atol=1e-4, err_msg=f"{path.stem}: {k}")


@pytest.mark.parametrize("rows", _chunks())
def test_op_table_on_gpu(rows):
    merged, feeds, tols = _op_table_graph(rows)
    expected = run_graph(merged, feeds)
    cuda = backends.backend("cuda")
    target = cuda.target({})
    compiled = cuda.compile(kernel_program(lower(merged, 1), cuda.templates), target)
    step = cuda.load(compiled.blobs, compiled.layout, target)
    state = {name: np.array(feeds[name], copy=True) for name, kind, _, _ in compiled.layout.slots if kind == "state"}
    actual = {k: np.asarray(v) for k, v in step.run(state, feeds).items()}
    cuda.sync_state(state)
    actual.update({f"update:{k}": v for k, v in state.items()})
    check_op_table(expected, actual, tols)


# --- device state, replays, deferred results, profiles -----------------------------------------------

def test_replays_are_deterministic(tmp_path):
    """Two programs from the same state and batches give bit-identical results and state
    (fixed-order reductions, no float atomics), captured graph or not."""
    path = EXAMPLES[0].parent / "lenet5.dln"
    runs = []
    for profile in (False, False, True):
        m, _, cuda, _, state = _train_pair(path, tmp_path / str(len(runs)), profile=profile)
        rng = np.random.default_rng(3)
        outs = [np.asarray(cuda.run(_example_feeds(m, 16, rng))["loss"]) for _ in range(4)]
        step = cuda.step_for(16)
        assert profile or (step.use_graph and all(f.graph is not None for f in step.frames)), \
            "the steps were not replayed as CUDA graphs"
        backends.sync_state(state)
        runs.append((outs, {k: v.copy() for k, v in state.items()}))
    for outs, state in runs[1:]:
        np.testing.assert_array_equal(outs, runs[0][0])
        for k in state:
            np.testing.assert_array_equal(state[k], runs[0][1][k], err_msg=k)


def test_session_keeps_state_on_the_device_and_syncs_when_read(tmp_path):
    """Training and evaluation share the device copy; Model.state reads it back; a host
    write (restoring weights) is what the next step uses."""
    m = dlc.load(EXAMPLES[0].parent / "digits_mlp.dln")
    s = m.session(m.train_config, "cuda", cache_dir=tmp_path)
    x = np.random.default_rng(0).random((32, 64), dtype=np.float32)
    y = np.arange(32, dtype=np.int32) % 10
    before = {k: v.copy() for k, v in m.state.items()}
    s.train_step(x, y, 0.05)
    after = {k: v.copy() for k, v in m.state.items()}  # read back from the device
    assert any(not np.array_equal(after[k], before[k]) for k in before)
    assert int(after["step"]) == 1
    metrics = s.evaluate(x, y, 16)                      # the eval step sees the trained weights
    m.state["out.w"][...] = 0.0                         # a host write ...
    s.train_step(x, y, 0.0)                             # ... is what the next step reads
    assert np.all(m.state["out.w"] == 0.0) and int(m.state["step"]) == 2
    assert np.isfinite(metrics["loss"])


def test_results_are_deferred_values(tmp_path):
    m, _, cuda, _, _ = _train_pair(EXAMPLES[0].parent / "digits_mlp.dln", tmp_path)
    out = cuda.run(_example_feeds(m, 8, np.random.default_rng(0)))
    loss = out["loss"]
    assert hasattr(loss, "ready") and np.isfinite(float(loss)) and loss.ready()
    assert np.asarray(loss).shape == ()


def test_fit_on_gpu_learns_and_checkpoints(tmp_path):
    m = dlc.load(EXAMPLES[0].parent / "digits_mlp.dln")
    history = m.fit(target="cuda", epochs=2, save=tmp_path / "ckpt.npz", cache_dir=tmp_path)
    assert history.test["accuracy"] > 0.8  # the test split, scored once after training
    saved = np.load(tmp_path / "ckpt.npz")
    for k, v in m.params.items():
        np.testing.assert_array_equal(saved[k], v, err_msg=k)


def test_profile_maps_kernels_to_lines(tmp_path):
    m = dlc.load(EXAMPLES[0].parent / "lenet5.dln")
    s = m.session(m.train_config, "cuda", cache_dir=tmp_path, profile=True)
    x = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)
    for _ in range(3):
        s.train_step(x, np.arange(8, dtype=np.int32) % 10, 0.01)
    rows = s.train_program.profile_rows()
    assert rows and all(sec >= 0 for _, _, sec in rows) and sum(sec for _, _, sec in rows) > 0
    assert any("lenet5.dln:5" in lines for _, lines, _ in rows)
    assert "lenet5.dln:5" in s.profile_report()
