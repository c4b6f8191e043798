"""Bad input never gives a traceback, a hang or a blow-up (issue 10): each test reproduces one
report. Broken programs with a located message live in the corpus (tests/errors/); these
are the cases a corpus file cannot express: sizes, encodings, memory, the runtime."""
from __future__ import annotations

import cProfile
import os
import pstats
import subprocess
import sys
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

import dlc
from dlc.core.diagnostics import SHOWN_COLUMNS, ArgumentError, DataError, DlcError
from dlc.language import frontend
from dlc.language.initializers import Init

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DLC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def run_dlc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlc", *args], cwd=ROOT, capture_output=True,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), timeout=120)


MLP = """model m(x: f32[B, 4]) -> f32[B, 3] {
    return dense(x, 3)
}
"""


# --- seeds --------------------------------------------------------------------------------------

def test_seed_beyond_32_bits_is_a_usage_error_on_the_command_line():
    r = run_dlc("run", str(ROOT / "tests/errors/seed_too_large.dln"), "--seed", "2147483648")
    assert r.returncode == 2 and b"Traceback" not in r.stderr, r.stderr
    assert b"--seed" in r.stderr


def test_seed_beyond_32_bits_is_a_dlc_error_from_python():
    m = dlc.load(MLP + "train m {\n    data = iris()\n    loss = cross_entropy(output, label)\n}\n")
    with pytest.raises(ArgumentError, match="seed"):
        m.fit(seed=2 ** 31, epochs=1, target="reference")


# --- sizes: unrolling, block expansion, deep graphs, long programs --------------------------------

def test_blocks_that_multiply_stop_at_the_graph_budget(monkeypatch):
    """Each block calls the one below twice: 2^12 `relu`s from 40 lines (2^40 with 40 blocks)."""
    monkeypatch.setattr(frontend, "MAX_GRAPH_NODES", 2000)
    lines = ["block b0(x: f32[B, 4]) -> f32[B, 4] {", "    return relu(x)", "}"]
    for i in range(1, 13):
        lines += [f"block b{i}(x: f32[B, 4]) -> f32[B, 4] {{", f"    h = b{i - 1}(x)",
                  f"    return b{i - 1}(h)", "}"]
    lines += ["model m(x: f32[B, 4]) -> f32[B, 4] {", "    return b12(x)", "}"]
    with pytest.raises(ArgumentError, match="grows beyond 2,000 operations") as e:
        dlc.load("\n".join(lines) + "\n")
    assert (e.value.span.line, e.value.span.col) == (2, 12)  # the `relu` that crossed it


DENSE_500 = "model m(x: f32[B, 8]) -> f32[B, 8] {\n" + "    x = dense(x, 8)\n" * 500 + "    return x\n}\n"
CHAIN_1000 = ("model m(x: f32[B, 8]) -> f32[B, 8] {\n    param s: f32[8] = ones\n    x = x * s\n" +
              "    x = tanh(x + 1.0) * x\n" * 1000 + "    return x\n}\n")  # (s: the gradient runs back through it)
EPILOGUE_1000 = CHAIN_1000.replace("{\n", "{\n    x = dense(x, 8)\n", 1)  # the chain after a matmul
LSTM_1000 = "model m(x: f32[B, 1000, 8]) -> f32[B, 4] {\n    h = lstm(x, 16)\n    return dense(h, 4)\n}\n"
TRAIN = "train m {\n    data = arrays()\n    loss = mse(output, x)\n    optimizer = sgd(lr=0.1)\n}\n"


@pytest.mark.parametrize("source", [DENSE_500, CHAIN_1000, EPILOGUE_1000, LSTM_1000],
                         ids=["500-dense", "1000-ops", "1000-ops-after-a-matmul", "lstm-1000-steps"])
def test_deep_graphs_compile(source):
    """Guard rail (issue 12): chains of over a thousand dependent operations -- 500 stacked
    layers, 1000 chained ops of one shape and their gradients (fused: a kernel's values nest
    at most fuse.MAX_DEPTH deep), the same after a matmul (whose epilogue takes only that
    deep a chain), a recurrent layer over 1000 steps (a loop) -- lower to kernel IR that
    keeps the contract, to LLVM IR and to CUDA C, with no RecursionError."""
    from dlc import backends
    from dlc.backends.cuda.render import render_program
    from dlc.backends.llvm.codegen import ModuleBuilder
    from dlc.core.kernel import check_program
    from dlc.passes import fuse
    from dlc.pipeline import kernel_program
    m = dlc.load(source + TRAIN if source is CHAIN_1000 else source)
    lowered = m.lower("train" if source is CHAIN_1000 else "eval", batch=2)
    depths = _nesting(lowered)
    assert max(depths) <= 2 * fuse.MAX_DEPTH, max(depths)  # (siblings merged later add a few)
    cpu, cuda = backends.backend("cpu"), backends.backend("cuda", runnable=False)
    program = kernel_program(lowered, cpu.templates)
    check_program(program)
    ModuleBuilder(program, cpu.target({"threads": 2})).build()
    assert "__global__" in render_program(kernel_program(lowered, cuda.templates)).source


def _nesting(lowered) -> list[int]:
    """How deep each kernel's values nest: the longest chain of its nodes (F8)."""
    plan = lowered.meta["fusion"]
    group = {n: k.id for k in plan.kernels for n in k.nodes}
    depth = {}
    for nid in lowered.toposort():
        inside = [depth[o] for o in lowered.operands(nid) if group.get(o) == group.get(nid, -1)]
        depth[nid] = 1 + max(inside, default=0)
    return [max(depth[n] for n in k.nodes) for k in plan.kernels]


def test_a_graph_too_deep_for_a_pass_is_a_located_error(monkeypatch):
    """A pass that still recurses too deep gives a DlcError at the line making up most of the
    longest chain (here the 250th dense: the middle of 500 alike lines), not a traceback."""
    from dlc.passes import fuse

    def too_deep(graph, *args, **kwargs):
        raise RecursionError
    monkeypatch.setattr(fuse, "fuse", too_deep)
    m = dlc.load(DENSE_500)
    with pytest.raises(DlcError, match="too deep for the `fuse` pass") as e:
        m.lower("eval", batch=2)
    assert e.value.span is not None and e.value.span.line == 251, e.value.render()


def _generated(n: int) -> str:
    """n statements rebinding one name, half of them layers with parameters."""
    lines = ["model big(x: f32[B, 8]) -> f32[B, 8] {", "    h = x"]
    lines += ["    h = dense(h, 8)" if i % 2 else "    h = relu(h) + h" for i in range(n)]
    lines += ["    return h", "}", "train big {", "    data = arrays()",
              "    loss = mse(output, x) + 0.01 * l2(params)", "}"]
    return "\n".join(lines) + "\n"


def _calls_to_load(source: str) -> int:
    profile = cProfile.Profile()
    profile.enable()
    dlc.load(source)
    profile.disable()
    return pstats.Stats(profile).total_calls


def test_checking_is_linear_in_the_number_of_statements():
    """Work counted in Python function calls, not seconds: 4x the statements, ~4x the calls
    (it was ~7x at these sizes, and the summary's sums made 20,000 statements take minutes)."""
    _calls_to_load(_generated(10))  # the grammar and other one-time work
    small, large = _calls_to_load(_generated(250)), _calls_to_load(_generated(1000))
    assert large / small < 5, (small, large)


def test_automatic_layer_names_skip_taken_ones():
    """The `_k` search resumes where it stopped (linear) yet still finds the first free name."""
    m = dlc.load("""model m(x: f32[B, 4]) -> f32[B, 4] {
    h = dense(x, 4)
    h = dense(h, 4, name="h_3")
    h = dense(h, 4)
    h = dense(h, 4)
    h = dense(h, 4)
    return h
}
""")
    assert [k[:-2] for k in m.params if k.endswith(".w")] == ["h", "h_3", "h_2", "h_4", "h_5"]


# --- parameters: none while checking, float32 when made ------------------------------------------

def test_checking_does_not_allocate_parameters():
    src = "model m(x: f32[B, 4096]) -> f32[B, 4096] {\n    return dense(x, 4096)\n}\n"  # 64 MB
    dlc.load(MLP)  # the grammar
    tracemalloc.start()
    try:
        m = dlc.load(src)
        checked = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        w = m.params["out.w"]  # made on first use
        made = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert w.dtype == np.float32 and w.nbytes == 64 << 20
    assert checked < 8 << 20, checked
    assert made < 1.25 * w.nbytes, made  # no float64 copy (that peaked at 3x)


def test_parameters_are_one_float64_draw_rounded_to_float32():
    """Drawn in chunks for memory, the values are those of one draw: same seeds, same weights."""
    shape = (3, 1 << 19)  # 1.5 chunks
    for init in (Init("normal", (0.5, 2.0)), Init("uniform", (-1.0, 1.0)), Init("glorot_uniform")):
        got = init.sample(np.random.default_rng([1, 2]), shape, 3, 1 << 19)
        rng = np.random.default_rng([1, 2])
        if init.name == "normal":
            want = rng.normal(0.5, 2.0, size=shape)
        elif init.name == "uniform":
            want = rng.uniform(-1.0, 1.0, size=shape)
        else:
            limit = np.sqrt(6.0 / (3 + (1 << 19)))
            want = rng.uniform(-limit, limit, size=shape)
        np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=str(init))


# --- what an error prints --------------------------------------------------------------------------

def test_an_error_on_a_huge_line_prints_a_clipped_line_with_the_caret_on_it():
    src = "model m(x: f32[B, 4]) -> f32[B, 3] {\n    return dense(x, 3)" + " " * 200_000 + "+ foo\n}\n"
    with pytest.raises(DlcError, match="unknown name `foo`") as e:
        dlc.load(src)
    text = e.value.render()
    assert len(text) < 1000, len(text)
    source_line, caret = text.splitlines()[1:3]
    assert source_line.startswith("   2 | …") and len(source_line) <= len("   2 | ") + SHOWN_COLUMNS + 2
    at = caret.index("^")
    assert source_line[at:at + 3] == "foo" and caret[at:] == "^^^"


def test_a_nul_byte_is_located_and_shown_escaped(tmp_path):
    path = tmp_path / "nul.dln"
    path.write_bytes(b"model m(x: f32[B, 4]) -> f32[B, 3] {\n    return dense(x,\x00 3)\n}\n")
    r = run_dlc("check", str(path))
    assert r.returncode == 1 and b"Traceback" not in r.stderr
    assert b"\x00" not in r.stderr
    lines = r.stderr.decode().splitlines()
    assert lines[0] == f"{path}:2:20: syntax error: unexpected character `\\x00`"
    assert lines[1] == "   2 |     return dense(x,\\x00 3)"
    assert lines[2] == "     |                    ^^^^"


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.dln"
    path.write_bytes(b"\xef\xbb\xbf" + MLP.encode())
    assert dlc.load(path).name == "m"
    r = run_dlc("check", str(path))
    assert r.returncode == 0, r.stderr


def test_a_byte_that_is_not_utf8_is_located(tmp_path):
    path = tmp_path / "latin1.dln"
    path.write_bytes(b"model m(x: f32[B, 4]) -> f32[B, 3] {\n    # caf\xe9 au lait\n    return dense(x, 3)\n}\n")
    r = run_dlc("check", str(path))
    assert r.returncode == 1 and b"Traceback" not in r.stderr, r.stderr
    first = r.stderr.decode().splitlines()[0]
    assert first == f"{path}:2:10: error: the file is not UTF-8: byte 0xe9 cannot be decoded", first
    assert "PosixPath" not in r.stderr.decode()


# --- training-time checks --------------------------------------------------------------------------

BATCHNORM = """model m(x: f32[B, 4]) -> f32[B, 3] {
    h = x |> dense(8) |> batchnorm |> relu
    return dense(h, 3)
}
train m {
    data = arrays()
    loss = cross_entropy(output, label)
    optimizer = sgd(lr=0.1)
    epochs = 1
}
"""


def _classes(n: int):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)


def test_batchnorm_refuses_batches_of_one():
    """A batch of one has no variance: batchnorm would output beta and train nothing."""
    x, y = _classes(8)
    with pytest.raises(ArgumentError, match="more than 1 value per channel") as e:
        dlc.load(BATCHNORM).fit(x, y, test=0.0, batch=1, target="reference")
    assert (e.value.span.line, e.value.span.col) == (2, 26)


def test_batchnorm_skips_a_last_batch_of_one():
    x, y = _classes(21)  # batches of 4, 4, 4, 4, 4 and 1
    history = dlc.load(BATCHNORM).fit(x, y, test=0.0, batch=4, target="reference")
    assert history.epochs[-1]["step"] == 5


def test_a_last_batch_of_one_is_kept_without_batchnorm():
    x, y = _classes(21)
    src = BATCHNORM.replace(" |> batchnorm", "")
    assert dlc.load(src).fit(x, y, test=0.0, batch=4, target="reference").epochs[-1]["step"] == 6


@pytest.mark.parametrize("how", ["fit", "evaluate", "predict", "forward"])
def test_inputs_beyond_float32_are_a_data_error(how):
    x, y = _classes(10)
    x = x.astype(np.float64)
    x[3, 2] = 1e300
    m = dlc.load(MLP + "train m {\n    data = arrays()\n    loss = cross_entropy(output, label)\n}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy overflow warning may leak either
        with pytest.raises(DataError, match=r"beyond float32's range .* first in sample 3") as e:
            if how == "fit":
                m.fit(x, y, test=0.0, epochs=1, target="reference")
            elif how == "evaluate":
                m.evaluate(x, y, target="reference")
            elif how == "predict":
                m.predict(x, target="reference")
            else:
                m.forward(x)
    assert ("input `x`" if how == "forward" else "the inputs") in e.value.message


def test_an_llvmlite_too_old_for_the_cpu_target_is_named(tmp_path):
    """An environment that installed around pyproject's llvmlite floor (--no-deps, a pinned
    llvmlite) gets an error naming the version it has and the one it needs, not an LLVM
    verifier message about masked loads; `dlc targets` says so too. The floor passes."""
    from dlc.backends.llvm.target import LLVMLITE_MIN, llvmlite_too_old

    floor = ".".join(map(str, LLVMLITE_MIN))
    assert llvmlite_too_old(floor + ".0") is None and llvmlite_too_old("0.50.0rc1") is None
    assert llvmlite_too_old("0.47.0") == ("it needs llvmlite >= 0.48 (LLVM 22); this Python has llvmlite 0.47.0 "
                                          "(pip install 'llvmlite>=0.48')")
    # the whole command, with the installed llvmlite reporting an old version
    for args, status in ((["run", str(ROOT / "examples" / "digits_mlp.dln"), "--epochs", "1"], 1), (["targets"], 0)):
        script = ("import sys, llvmlite; llvmlite.__version__ = '0.46.0'; from dlc import cli; "
                  f"sys.exit(cli.main({args!r}))")
        r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        assert r.returncode == status and "Traceback" not in r.stderr, r.stderr
        said = r.stderr + r.stdout
        assert "needs llvmlite >= 0.48 (LLVM 22); this Python has llvmlite 0.46.0" in said, said
