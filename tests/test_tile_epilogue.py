"""The CPU backend's fused weight updates against the reference interpreter.

A dense layer's weight gradient is a matmul whose epilogue is the optimizer update. Large
products run it on the GEMM's register tile (backends/llvm/tile.py: the gradient goes from
registers into the update and, read by nothing else, is never stored); small ones run it
row by row as each gradient row is computed (in scratch when nothing else reads it).
Every optimizer of tests/test_optimizers.py trains a model that takes both paths for a
few steps, on cpu and on the reference, and the parameters and optimizer state must
agree; the module is checked to use the register-tile path at all.
"""
from __future__ import annotations

import numpy as np
import pytest

import dlc
from dlc import backends
from dlc.backends.llvm.codegen import ModuleBuilder
from dlc.pipeline import kernel_program, lower
from dlc.program import make_program

from test_optimizers import CASES

# dense(640) over 200 inputs at batch 9: 200*640*9 multiply-adds, above SMALL_MATMUL (GEMM
# with the tile epilogue); the 640 -> 10 layer's gradient is a small matmul (row path).
SOURCE = """\
model m(x: f32[B, {inputs}]) -> f32[B, 10] {{
    h = x |> dense({hidden}) |> relu
    return dense(h, 10)
}}

train m {{
    data = arrays()
    loss = cross_entropy(output, label)
    optimizer = {optimizer}
    batch = {batch}{extra}
}}
"""
FAST = {"sgd_momentum", "adam", "adamw_clip", "rmsprop_momentum", "sgd_nesterov_weight_decay"}
CPU = backends.backend("cpu")


def _model(tmp_path, name, inputs: int = 200, hidden: int = 640, batch: int = 9) -> dlc.Model:
    opt, clip = CASES[name]
    path = tmp_path / "m.dln"
    path.write_text(SOURCE.format(optimizer=opt, extra=f"\n    clip = {clip}" if clip is not None else "",
                                  inputs=inputs, hidden=hidden, batch=batch))
    return dlc.load(path)


def test_the_update_runs_on_the_register_tile(tmp_path):
    """The weight gradient's GEMM takes the update's buffers (the tile epilogue is used)."""
    m = _model(tmp_path, "adam")
    graph = m.compile_graph("train", m.train_config)
    mb = ModuleBuilder(kernel_program(lower(graph, 9), CPU.templates), CPU.target({"threads": 2}))
    mb.build()
    extra = {info.spec: len(mb.modules[key[0]].globals[info.name].args) - 7 for key, info in mb.gemms.items()}
    grads = [spec for spec in extra if spec.ta and (spec.m, spec.n) == (200, 640)]
    assert grads and extra[grads[0]] >= 3, extra  # weight, two moments (+ lr, step...)
    # ... and its microkernel prefetches what the update stores (the weight and the two
    # moments, every vector of the tile) while its K loop runs
    key, info = next((key, info) for key, info in mb.gemms.items() if info.spec == grads[0])
    kernel = next(f for f in mb.modules[key[0]].functions if f.name.startswith(info.name + ".kernel"))
    prefetches = str(kernel).count("call void @\"llvm.prefetch")
    assert prefetches >= 3 * info.plan.mr * info.plan.nv, prefetches


def test_a_small_batch_through_a_wide_layer_takes_the_gemm(tmp_path):
    """200 -> 300 inputs into dense(256) at batch 9: 691,200 multiply-adds, under
    SMALL_MATMUL, but a weight of 76,800 elements (templates.uses_gemm): the forward
    product and the weight gradient (with its update on the register tile) are GEMMs,
    and training matches the reference; the 256 -> 10 layer's stay compact loops."""
    from dlc.backends.llvm.templates import SMALL_MATMUL, uses_gemm
    assert 9 * 256 * 300 <= SMALL_MATMUL and uses_gemm(9, 256, 300) and not uses_gemm(1, 1024, 1024)
    m = _model(tmp_path, "sgd_momentum", inputs=300, hidden=256)
    graph = m.compile_graph("train", m.train_config)
    mb = ModuleBuilder(kernel_program(lower(graph, 9), CPU.templates), CPU.target({"threads": 2}))
    mb.build()
    shapes = {(key[1].m, key[1].n, key[1].k, key[1].ta) for key in mb.gemms}
    assert shapes == {(9, 256, 300, False), (300, 256, 9, True)}, shapes
    for name in ("sgd_momentum", "adam"):
        _check_against_reference(tmp_path, name, 2, inputs=300, hidden=256)


def test_one_sample_through_a_wide_layer_takes_the_compact_loops(tmp_path):
    """At batch 1 every product of a 600 -> 2048 layer (1.2 M multiply-adds, over
    SMALL_MATMUL) is a vector-matrix product: no GEMM is built, and training matches the
    reference."""
    from dlc.backends.llvm.templates import SMALL_MATMUL, uses_gemm
    assert 600 * 2048 > SMALL_MATMUL and not uses_gemm(1, 2048, 600) and uses_gemm(2, 2048, 600)
    m = _model(tmp_path, "sgd_momentum", inputs=600, hidden=2048, batch=1)
    mb = ModuleBuilder(kernel_program(lower(m.compile_graph("train", m.train_config), 1), CPU.templates),
                       CPU.target({"threads": 2}))
    mb.build()
    assert not mb.gemms
    for name in ("sgd_momentum", "adam"):
        _check_against_reference(tmp_path, name, 2, inputs=600, hidden=2048, batch=1)


def test_training_and_evaluation_share_the_forward_gemm(tmp_path):
    """The evaluation step's first layer (the same product and bias + ReLU epilogue as
    the training step's) calls the training step's GEMM function: one GEMM is built for
    both entries, and their kernel functions are one."""
    m = _model(tmp_path, "adam")
    programs = {mode: kernel_program(lower(m.compile_graph(mode, m.train_config), 9), CPU.templates)
                for mode in ("train", "eval")}
    mb = ModuleBuilder(programs, CPU.target({"threads": 2}))
    mb.build()
    forward = [key for key in mb.gemms if (key[1].m, key[1].n, key[1].k, key[1].ta) == (9, 640, 200, False)]
    assert len(forward) == 1, list(mb.gemms)
    first = {entry: next(fn for _, name, fn, _ in parts if name.startswith("k0_"))
             for entry, parts in mb.entry_parts.items()}
    assert first["train"] is first["eval"] and mb.shared >= 1


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in FAST else [pytest.mark.slow]) for n in CASES])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_updates_match_reference(tmp_path, name, threads):
    _check_against_reference(tmp_path, name, threads)


@pytest.mark.parametrize("name", sorted(FAST))
def test_fused_updates_on_edge_tiles(tmp_path, name):
    """A weight gradient of 203 x 650: its last register tiles cross both edges of C (the
    edge kernel runs the update on the rows and columns inside)."""
    _check_against_reference(tmp_path, name, 2, inputs=203, hidden=650)


def _check_against_reference(tmp_path, name, threads, inputs=200, hidden=640, batch=9):
    m = _model(tmp_path, name, inputs, hidden, batch)
    graph = m.compile_graph("train", m.train_config)
    m.ensure_state(graph)
    ref_state = {k: v.copy() for k, v in m.state.items()}
    cpu_state = {k: v.copy() for k, v in m.state.items()}
    ref = make_program("reference", graph, ref_state)
    cpu = make_program("cpu", graph, cpu_state, options={"cache_dir": tmp_path, "threads": threads})
    rng = np.random.default_rng(0)
    steps, lr = 3, 0.01
    for step in range(steps):
        feeds = {"x": rng.standard_normal((batch, inputs), dtype=np.float32),
                 "label": rng.integers(0, 10, batch).astype(np.int32), "lr": np.float32(lr)}
        a, b = ref.run(feeds), cpu.run(feeds)
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4, err_msg=f"{name} step {step}")
    # Adagrad's, RMSprop's and Adam's first steps move each weight by about lr * g / |g|
    # (RMSprop: 10 lr), whatever the size of g: a gradient that cancels to about 1e-9 (on
    # Zen 5, one of the 128,000 in h.w at the first step) takes its sign from float32
    # rounding, which the GEMM and numpy's BLAS do in different orders, and the weight
    # moves the other way; the next steps carry that through its hidden unit (Adagrad:
    # 165 weights apart after three steps, RMSprop 608). A fault in an update shows on
    # most elements, so at most 1% of each tensor may differ, by no more than the steps
    # could move it.
    for k in ref_state:
        a, b = cpu_state[k], ref_state[k]
        apart = ~np.isclose(a, b, rtol=2e-3, atol=1e-5)
        assert apart.mean() <= 0.01, f"{name}: {k}: {apart.sum()} of {apart.size} apart"
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=steps * 10 * lr, err_msg=f"{name}: {k}")


def test_templates_see_their_own_entrys_program(tmp_path, monkeypatch):
    """Training and evaluation steps built as one unit (a ModuleBuilder with two entries):
    while a template is emitted, `mb.program` is the program it belongs to -- the register
    tile epilogue and the small matmul ask it whether anything else reads C, and the
    other entry's answer would be about other buffers."""
    from dlc.backends.llvm import codegen
    from dlc.core.kernel import Template
    m = _model(tmp_path, "adam")
    programs = {mode: kernel_program(lower(m.compile_graph(mode, m.train_config), 9), CPU.templates)
                for mode in ("train", "eval")}
    seen = []
    real = codegen.emit_template

    def spy(mb, em, part, tid, nthreads):
        seen.append((part.op, any(part is p for k in mb.program.kernels for p in k.parts)))
        return real(mb, em, part, tid, nthreads)
    monkeypatch.setattr(codegen, "emit_template", spy)
    ModuleBuilder(programs, CPU.target({"threads": 2})).build()
    templates = [p for prog in programs.values() for k in prog.kernels for p in k.parts if isinstance(p, Template)]
    assert any(isinstance(p, Template) and p.op == "matmul" for k in programs["eval"].kernels for p in k.parts)
    assert len(seen) == len(templates) and all(ok for _, ok in seen), seen
