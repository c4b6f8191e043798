"""The CUDA runtime's own logic, without a GPU: the real runtime.py (and the driver above
it) over a stand-in for CuPy (tests/cuda_host/fake_cupy.py: numpy memory, recorded and
replayed graphs, kernels through the host emulation). What it shows: which buffers the
step copies and launches in which order, that the graph replays the step, that device
state is shared by a session's steps and copied back whenever the driver reads it, and
that the trainer reads deferred results. What it cannot show: anything about a real
device (timing, overlap, the CUDA API's own behaviour) -- test_cuda_gpu.py covers that
where a GPU exists."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import dlc
from dlc import backends
from dlc.backends.cuda.render import LoopStep, launches_per_step
from dlc.pipeline import kernel_program, lower
from dlc.program import make_program

from cuda_host import fake_cupy
from test_backend_cpu import _example_feeds

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CUDA = backends.backend("cuda", runnable=False)
TARGET = CUDA.target({"arch": "sm_90"})


@pytest.fixture
def fake(monkeypatch):
    with fake_cupy.installed(monkeypatch) as f:
        yield f


def _step(graph, batch: int, profile: bool = False, units: int = 3):
    """The step as the backend compiles it, in `units` translation units; each unit's
    CUDA C source stands for its cubin (the fake's Module.load builds it for the host)."""
    from dlc.backends.cuda.runtime import CudaStep
    parts, layout, _ = CUDA.render_units(kernel_program(lower(graph, batch), CUDA.templates), TARGET, profile, units)
    assert len(parts) == units  # (every model here has more kernels)
    return CudaStep([source.encode() for _, source in parts], layout, TARGET)


def _calls(step) -> int:
    return sum(module.calls for module in step.modules)


def _model(name: str):
    m = dlc.load(EXAMPLES / f"{name}.dln")
    graph = m.compile_graph("train", m.train_config)
    m.ensure_state(graph)
    return m, graph


@pytest.mark.parametrize("name", ["digits_mlp", "lenet5", "rnn_digits", "char_lm"])
def test_replayed_steps_match_the_reference(fake, name):
    """Three steps: the first two capture one graph per frame, the third replays; results
    are deferred values; the host arrays change only when the state is synced."""
    from dlc.backends.cuda.runtime import DeviceValue, sync_state
    m, graph = _model(name)
    ref_state = {k: v.copy() for k, v in m.state.items()}
    state = {k: v.copy() for k, v in m.state.items()}
    ref = make_program("reference", graph, ref_state)
    step = _step(graph, 5)
    rng = np.random.default_rng(0)
    for i in range(3):
        feeds = _example_feeds(m, 5, rng)
        want, got = ref.run(feeds), step.run(state, feeds)
        assert all(isinstance(v, DeviceValue) for v in got.values())
        for k in want:
            np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-4, atol=1e-5, err_msg=f"step {i}: {k}")
    assert [f.graph.launches for f in step.frames] == [2, 1]  # captured once per frame, then replayed
    assert _calls(step) == 2 * launches_per_step(step.steps)  # kernels enqueued only while capturing
    np.testing.assert_array_equal(state["out.w"], m.state["out.w"])  # still on the "device"
    sync_state(state)
    for k in ref_state:
        np.testing.assert_allclose(state[k], ref_state[k], rtol=2e-3, atol=1e-4, err_msg=k)


def test_a_profiled_step_launches_kernel_by_kernel(fake):
    m, graph = _model("lenet5")
    step = _step(graph, 3, profile=True)
    for _ in range(2):
        step.run({k: v.copy() for k, v in m.state.items()}, _example_feeds(m, 3, np.random.default_rng(0)))
    assert all(f.graph is None for f in step.frames) and _calls(step) == 2 * len(step.launches)
    rows = step.profile_rows()
    assert len(rows) == len(step.launches) and all(sec == pytest.approx(2e-5) for _, _, sec in rows)
    assert rows[0][0] == "k0_conv" and rows[0][1] == ("lenet5.dln:5",)


def test_a_profiled_recurrent_step_sums_each_body_kernel_over_the_steps(fake):
    """rnn_digits: the loop over 8 time steps is a host loop of launches; a body kernel's
    profile row holds the time of all 8 of its launches."""
    m, graph = _model("rnn_digits")
    step = _step(graph, 3, profile=True)
    for _ in range(2):
        step.run({k: v.copy() for k, v in m.state.items()}, _example_feeds(m, 3, np.random.default_rng(0)))
    loops = [s for s in step.steps if isinstance(s, LoopStep)]
    in_loops = {id(launch) for lp in loops for launch in lp.steps}
    assert loops and all(lp.extent == 8 for lp in loops)
    assert _calls(step) == 2 * launches_per_step(step.steps) > 2 * len(step.launches)
    rows = step.profile_rows()
    assert len(rows) == len(step.launches)
    for launch, (_, _, sec) in zip(step.launches, rows):
        assert sec == pytest.approx(2e-5 * (8 if id(launch) in in_loops else 1)), launch.kernel


def test_device_state_is_shared_and_host_writes_reach_the_next_step(fake):
    """A train and an eval step on one state dict share one device copy. After a sync the
    host is the authority: what it writes (here the optimizer's moments, which only the
    training step uses, after an evaluation step ran) is uploaded before the next step."""
    from dlc.backends.cuda.runtime import device_state, sync_state
    m, graph = _model("digits_mlp")
    eval_graph = m.compile_graph("eval", m.train_config)
    state = {k: v.copy() for k, v in m.state.items()}
    ref_state = {k: v.copy() for k, v in m.state.items()}
    ref = make_program("reference", graph, ref_state)
    train, evaluate = _step(graph, 4), _step(eval_graph, 4)
    rng = np.random.default_rng(1)
    feeds = _example_feeds(m, 4, rng)
    train.run(state, feeds)
    ref.run(feeds)
    evaluate.run(state, {k: v for k, v in feeds.items() if k != "lr"})
    assert train._states[id(state)] is evaluate._states[id(state)] is device_state(state)
    sync_state(state)
    for k, scale in (("h.w:m", 0.0), ("h.w:v", 2.0), ("out.w", 0.5)):  # host writes after the sync
        state[k] *= scale
        ref_state[k] *= scale
    evaluate.run(state, {k: v for k, v in feeds.items() if k != "lr"})  # uploads the parameters only
    feeds = _example_feeds(m, 4, rng)
    want, got = ref.run(feeds), train.run(state, feeds)
    np.testing.assert_allclose(np.asarray(got["loss"]), want["loss"], rtol=2e-4)
    sync_state(state)
    for k in ref_state:
        np.testing.assert_allclose(state[k], ref_state[k], rtol=2e-3, atol=1e-4, err_msg=k)


def test_a_replaced_host_array_is_uploaded(fake):
    from dlc.backends.cuda.runtime import sync_state
    m, graph = _model("logreg")
    state = {k: v.copy() for k, v in m.state.items()}
    step = _step(graph, 4)
    feeds = _example_feeds(m, 4, np.random.default_rng(2))
    first = float(step.run(state, feeds)["loss"])
    name = next(k for k in state if state[k].dtype == np.float32 and state[k].size > 1)
    state[name] = np.zeros_like(state[name])  # a new object: uploaded without a sync
    second = float(step.run(state, feeds)["loss"])
    assert first != second
    sync_state(state)


def _cuda_from_source(monkeypatch):
    """The cuda backend usable here: each translation unit compiled to its CUDA C source
    (which the stand-in runs) instead of a cubin; two units a step."""
    from dlc.backends import cuda as backend
    from dlc.backends.cuda import nvrtc
    monkeypatch.setattr(CUDA, "unavailable", lambda: None)
    monkeypatch.setattr(CUDA, "target", lambda options: TARGET)
    monkeypatch.setattr(backend, "_cores", lambda: 2)
    monkeypatch.setattr(backend, "_compile", lambda source, arch: nvrtc.CudaModule(arch, source.encode(), b"", ""))


def test_training_through_the_driver(fake, monkeypatch, tmp_path):
    """Model.fit on `cuda` (compiled to source instead of a cubin): the trainer reads the
    deferred results, checkpoints and Model.state/params see the device's state, and the
    history matches training on the CPU backend."""
    _cuda_from_source(monkeypatch)
    histories = {}
    for target in ("cuda", "cpu"):
        m = dlc.load(EXAMPLES / "logreg.dln")
        histories[target] = m.fit(target=target, epochs=2, save=tmp_path / f"{target}.npz",
                                   cache_dir=tmp_path / target)
        saved = np.load(tmp_path / f"{target}.npz")
        for k, v in m.params.items():  # the checkpoint and Model.params: the state after training
            np.testing.assert_array_equal(saved[k], v, err_msg=f"{target}: {k}")
    np.testing.assert_allclose(histories["cuda"]["train_loss"], histories["cpu"]["train_loss"], rtol=1e-4)
    assert histories["cuda"].test.keys() == histories["cpu"].test.keys() == {"loss", "accuracy"}
    for key in ("loss", "accuracy"):  # the test split, scored once after training
        np.testing.assert_allclose(histories["cuda"].test[key], histories["cpu"].test[key], rtol=1e-4, err_msg=key)


def test_keep_best_copies_and_restores_the_device_state(fake, monkeypatch, tmp_path):
    """keep_best on `cuda`: the best epoch's weights are copied from the device's state, and
    the weights put back are what the later steps (the test split's evaluation), Model.params
    and the checkpoint see -- as on the CPU backend."""
    _cuda_from_source(monkeypatch)
    # min_delta 100: only the first epoch counts as an improvement, so the best epoch is not the last
    stop = dlc.EarlyStopping(monitor="val_loss", patience=10, min_delta=100)
    results = {}
    for target in ("cuda", "cpu"):
        m = dlc.load(EXAMPLES / "logreg.dln")
        firsts = {}

        def on_epoch(record, m=m, firsts=firsts):
            if record["epoch"] == 1:
                firsts.update({k: v.copy() for k, v in m.params.items()})
        history = m.fit(target=target, epochs=3, validation=0.2, early_stop=stop, keep_best=True,
                        on_epoch=on_epoch, save=tmp_path / f"{target}.npz", cache_dir=tmp_path / target)
        assert history.best_epoch == 1 and len(history) == 3, target
        saved = np.load(tmp_path / f"{target}.npz")
        for k, v in m.params.items():
            np.testing.assert_array_equal(v, firsts[k], err_msg=f"{target}: {k} is not epoch 1's")
            np.testing.assert_array_equal(saved[k], v, err_msg=f"{target}: {k}")
        results[target] = (history, m.evaluate(target=target, cache_dir=tmp_path / target))
    (cuda, cuda_eval), (cpu, cpu_eval) = results["cuda"], results["cpu"]
    np.testing.assert_allclose(cuda["val_loss"], cpu["val_loss"], rtol=1e-4)
    for key in ("loss", "accuracy"):  # scored with the weights put back
        np.testing.assert_allclose(cuda.test[key], cpu.test[key], rtol=1e-4, err_msg=key)
        np.testing.assert_allclose(cuda_eval[key], cuda.test[key], rtol=1e-6, err_msg=key)
        np.testing.assert_allclose(cpu_eval[key], cpu.test[key], rtol=1e-6, err_msg=key)
