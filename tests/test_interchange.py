"""`dlc export` (ONNX, run in onnxruntime) and `dlc import` (ONNX -> .dln + checkpoint).

Tolerances: onnxruntime against `dlc predict` (the compiled evaluation step) within
atol 1e-4 + rtol 1e-4 (float32, different summation orders; the largest difference seen on
the examples is about 1e-6); round trips through ONNX and back within 1e-5.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx", reason="needs the onnx package: pip install 'dlc[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime: pip install 'dlc[onnx]'")

import dlc  # noqa: E402
from dlc.cli import main  # noqa: E402
from dlc.core.diagnostics import Source, Span  # noqa: E402
from dlc.interchange.onnx_export import ExportError, export_model  # noqa: E402
from dlc.interchange.onnx_import import ImportError_, import_model, write  # noqa: E402
from dlc.runtime.trainer import Normalizer  # noqa: E402
from test_fuzz import FUZZ, generated  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.dln"))
ATOL = RTOL = 1e-4


def cli(*args) -> int:
    return main([str(a) for a in args])


def trained_like(path, seed: int = 1):
    """A model whose weights, running statistics and input normalization are all
    non-trivial (as after training), without the time training takes."""
    m = dlc.load(path)
    rng = np.random.default_rng(seed)
    for name, v in m.state.items():
        if v.dtype != np.float32:
            continue
        if name.endswith("running_var"):
            v[...] = rng.uniform(0.5, 2.0, v.shape)
        elif name.endswith(("running_mean", ".b", ".bh", ".beta")):
            v[...] = rng.normal(0.0, 0.3, v.shape)
        elif name.endswith(".gamma"):
            v[...] = rng.uniform(0.5, 1.5, v.shape)
    t = m.input_types[0][1]
    features = int(np.prod(t.shape[1:]))
    if t.dtype.is_float:
        m.normalizer = Normalizer(rng.normal(0.0, 1.0, features).astype(np.float32),
                                  rng.uniform(2.0, 8.0, features).astype(np.float32))
    return m


def raw_inputs(m, n: int = 9, seed: int = 0) -> np.ndarray:
    t = m.input_types[0][1]
    rng = np.random.default_rng(seed)
    shape = (n,) + tuple(t.shape[1:])
    if t.dtype.value == "i32":
        return rng.integers(0, 10, shape).astype(np.int32)
    return rng.uniform(0.0, 16.0, shape).astype(t.dtype.np)


def run_onnx(path, feeds: dict) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


# --- export -----------------------------------------------------------------------------------

@pytest.mark.parametrize("example", EXAMPLES)
def test_every_example_exports_and_matches_dlc_predict(example, tmp_path):
    path = ROOT / "examples" / f"{example}.dln"
    m = trained_like(path)
    m.save(tmp_path / "w.npz")
    assert cli("export", path, "--weights", tmp_path / "w.npz", "-o", tmp_path / "m.onnx") == 0
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "B"  # the batch stays symbolic
    x = raw_inputs(m)
    feeds = {m.input_types[0][0]: x}
    for c in m.built().carries:  # a carried state is an input: dlc predict starts from its initial value
        feeds[c.input] = np.full((len(x),) + tuple(c.type.shape[1:]), c.value, np.float32)
    assert [i.name for i in proto.graph.input] == list(feeds)
    got = run_onnx(tmp_path / "m.onnx", feeds)
    want = dlc.load(path)
    want.load_weights(tmp_path / "w.npz")
    np.testing.assert_allclose(got, want.predict(x), atol=ATOL, rtol=RTOL)


def test_dlc_predict_on_the_command_line_agrees(tmp_path, capsys):
    path = ROOT / "examples" / "lenet5.dln"
    m = trained_like(path)
    m.save(tmp_path / "w.npz")
    x = raw_inputs(m, 5)
    np.save(tmp_path / "x.npy", x)
    assert cli("export", path, "--weights", tmp_path / "w.npz", "-o", tmp_path / "m.onnx") == 0
    assert cli("predict", path, "--weights", tmp_path / "w.npz", "--input", tmp_path / "x.npy",
               "-o", tmp_path / "p.npz") == 0
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", {"x": x}), np.load(tmp_path / "p.npz")["output"],
                               atol=ATOL, rtol=RTOL)
    assert "Conv 2" in capsys.readouterr().out


def _ops(proto) -> set[str]:
    return {n.op_type for n in proto.graph.node}


@pytest.mark.parametrize("example, expected", [
    ("digits_mlp", {"Gemm", "Relu"}),
    ("lenet5", {"Conv", "MaxPool", "Flatten", "Gemm", "Relu"}),
    ("resnet_bn", {"Conv", "BatchNormalization", "AveragePool"}),
    ("lstm_digits", {"LSTM"}),
    ("rnn_digits", {"RNN"}),
])
def test_layers_become_onnx_operators(example, expected):
    proto = export_model(trained_like(ROOT / "examples" / f"{example}.dln"))
    assert expected <= _ops(proto)
    assert "Scan" not in _ops(proto)


RECURRENT = """
model m(x: f32[B, 5, 3]) -> f32[B, 5, 16] {
    g = x |> gru(4, return_sequences=true, layers=2, bidirectional=true)
    r = x |> rnn(4, return_sequences=true, bidirectional=true)
    l = x |> lstm(4, bidirectional=true)
    l2 = reshape(concat([l, l], axis=1), [B, 1, 16])
    return concat([g, r], axis=2) + l2
}
"""

MISC = """
model m(x: f32[B, 6], tok: i32[B, 5]) -> f32[B, 6] {
    s = mean(embedding(tok, 10, 6), axis=1)
    a = softmax(x) + log_softmax(x, axis=0) + leaky_relu(x, 0.2) + gelu(x)
    d = mean(x, axis=1, keepdims=true) + max(x, axis=1, keepdims=true) + sum(x)
    v = reshape(reshape(transpose(reshape(x, [B, 2, 3]), [0, 2, 1]), [B * 3, 2]), [B, 6])
    w = clip(x, -0.5, 0.5) * abs(x) + sqrt(abs(x)) + exp(-x) + log(abs(x) + 1.0)
    k = x[:, 1:5:2]
    q = elu(x, 0.5) + selu(x) + softplus(x) + silu(x) + layernorm(x) + elu(layernorm(x, eps=0.1))
    e = gelu(x, approximate="none") + erf(x * 2.0) + reshape(layernorm(reshape(x, [B, 2, 3]), axis=1), [B, 6])
    return a + d + v + w + s + q + e + concat([k, k, k], axis=1) + minimum(x, 0.3) + x ** 2.0 + x / 3.0
}
"""


@pytest.mark.parametrize("source, loops", [(RECURRENT, True), (RECURRENT, False), (MISC, True),
                                           ("model m(x: f64[B, 4]) -> f64[B, 4] { return tanh(x) * 2.0 }", True),
                                           ("model m(x: i32[B, 4]) -> i32[B, 4] { return x / 3 + (x - 7) / 2 }",
                                            True)],
                         ids=["recurrent-ops", "recurrent-scan", "primitives", "f64", "i32-division"])
def test_models_match_the_reference_interpreter(source, loops, tmp_path):
    """Bidirectional and stacked gru/rnn/lstm as ONNX operators or as Scan loops, and the
    other primitives, against the reference interpreter in float64."""
    m = dlc.load(source)
    rng = np.random.default_rng(0)
    for v in m.state.values():
        if v.dtype.kind == "f":
            v[...] = rng.normal(0.0, 0.5, v.shape)
    proto = export_model(m, recognize=loops)
    if "gru" in source:
        assert ({"GRU", "RNN", "LSTM"} <= _ops(proto)) == loops and ("Scan" in _ops(proto)) != loops
        bidirectional = [n for n in proto.graph.node if n.op_type in ("GRU", "RNN", "LSTM")]
        assert all(onnx.helper.get_attribute_value(a) == b"bidirectional" for n in bidirectional
                   for a in n.attribute if a.name == "direction")
    feeds = {}
    for name, t in m.input_types:
        shape = (7,) + tuple(t.shape[1:])
        feeds[name] = (rng.integers(-20, 10, shape).astype(np.int32) if t.dtype.value == "i32"
                       else rng.normal(0.0, 1.0, shape).astype(t.dtype.np))
    if "tok" in feeds:
        feeds["tok"] = np.abs(feeds["tok"]) % 10  # onnxruntime refuses out-of-range indices (dlc clamps)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)[0]
    want = m.forward(*feeds.values(), float_dtype=np.float64)
    assert got.dtype == want.dtype or want.dtype == np.float64
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_a_primitive_without_onnx_counterpart_names_itself_and_its_line():
    from dlc.core import ops
    from dlc.core.builder import GraphBuilder
    from dlc.core.graph import Graph
    from dlc.core.types import DType, TensorType, sym
    from dlc.interchange.onnx_export import Names, _GraphExporter
    src = Source("m.dln", "model m(x: f32[B, 4]) -> f32[9, 4] {\n    return scatter(x)\n}\n")
    g = Graph("m")
    b = GraphBuilder(g)
    x = b.input("x", TensorType(DType.f32, (sym("B"), 4)), "data")
    idx = b.input("i", TensorType(DType.i32, (sym("B"),)), "data")
    with b.at(Span(src, 2, 12, 2, 22)):
        out = b.emit(ops.SCATTER_ADD, (x, idx), rows=9)
    g.outputs["output"] = out.id
    ex = _GraphExporter(g, {}, Names(), True, 28)
    ex.value[x.id], ex.value[idx.id] = "x", "i"
    with pytest.raises(ExportError) as e:
        ex.run([out.id])
    text = e.value.render()
    assert "`scatter_add` cannot be exported" in text and "m.dln:2:12" in text and "return scatter(x)" in text


def test_export_usage_errors(tmp_path, capsys):
    path = ROOT / "examples" / "digits_mlp.dln"
    dlc.load(path).save(tmp_path / "w.npz")
    assert cli("export", path, "--weights", tmp_path / "w.npz", "-o", tmp_path / "m.onnx", "--opset", "12") == 1
    assert "opset 12 is not supported" in capsys.readouterr().err
    assert cli("export", path, "--weights", tmp_path / "missing.npz", "-o", tmp_path / "m.onnx") == 1
    assert "does not exist" in capsys.readouterr().err


# --- import -----------------------------------------------------------------------------------

@pytest.mark.parametrize("example, layers", [
    ("digits_mlp", ["dense(128)", "dense(10)"]),
    ("lenet5", ["conv2d(6, 3, pad=1)", "maxpool(2)", "flatten", "dense(120)"]),
    ("lstm_digits", ["lstm(48, return_sequences=true)", "dense(10)"]),
    ("resnet_bn", ["batchnorm", "avgpool(2)"]),
    ("rnn_digits", ["rnn(64)"]),
    ("attention_digits", ["layernorm", "transpose(", " @ ", "softmax"]),
    ("char_transformer", ["embedding(", " @ ", "_keep + ", "softmax"]),  # causal: its mask is a Where
])
def test_round_trip_export_import_gives_the_same_outputs(example, layers, tmp_path, capsys):
    path = ROOT / "examples" / f"{example}.dln"
    m = trained_like(path)
    m.save(tmp_path / "w.npz")
    assert cli("export", path, "--weights", tmp_path / "w.npz", "-o", tmp_path / "m.onnx") == 0
    assert cli("import", tmp_path / "m.onnx", "-o", tmp_path / "back.dln") == 0
    assert f"wrote {tmp_path / 'back.dln'}" in capsys.readouterr().out
    text = (tmp_path / "back.dln").read_text()
    for layer in layers:
        assert layer in text, text
    back = dlc.load(tmp_path / "back.dln")
    back.load_weights(tmp_path / "back.npz")   # the checkpoint load_weights and --resume take
    x = raw_inputs(m)
    original = dlc.load(path)
    original.load_weights(tmp_path / "w.npz")
    np.testing.assert_allclose(back.predict(x), original.predict(x), atol=1e-5, rtol=1e-5)


def test_pools_rounding_up_and_averaging_the_input_alone_round_trip(tmp_path):
    """dlc exports them as pad, pools and arithmetic (the divisors from Range); onnxruntime
    and the model imported back give dlc's outputs."""
    src = """model m(x: f32[B, 2, 7, 7]) -> f32[B, 64] {
    a = maxpool(x, 2, ceil=true)
    b = avgpool(avgpool(x, 3, stride=1, pad=1, count_pad=false), 3, stride=2, pad=1, ceil=true, count_pad=false)
    return concat([flatten(a), flatten(b)], axis=1)
}
"""
    m = dlc.load(src)
    m.save(tmp_path / "w.npz")
    (tmp_path / "m.dln").write_text(src)
    assert cli("export", tmp_path / "m.dln", "--weights", tmp_path / "w.npz", "-o", tmp_path / "m.onnx") == 0
    assert cli("import", tmp_path / "m.onnx", "-o", tmp_path / "back.dln") == 0
    x = np.random.default_rng(0).normal(size=(3, 2, 7, 7)).astype(np.float32)
    want = m.predict(x)
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    text = (tmp_path / "back.dln").read_text()
    assert "pad(" in text and "= zeros, trainable=false" in text  # the divisors: constants, frozen
    assert "\ntrain " not in text and "No train block" in text  # nothing in it trains
    back = dlc.load(tmp_path / "back.dln")
    back.load_weights(tmp_path / "back.npz")
    np.testing.assert_allclose(back.predict(x), want, rtol=1e-6, atol=1e-6)


def test_an_imported_model_fine_tunes_with_its_train_block(tmp_path):
    path = ROOT / "examples" / "digits_mlp.dln"
    m = trained_like(path)
    m.save(tmp_path / "w.npz")
    export_model_path = tmp_path / "m.onnx"
    assert cli("export", path, "--weights", tmp_path / "w.npz", "-o", export_model_path) == 0
    assert cli("import", export_model_path, "-o", tmp_path / "mlp.dln", "--weights", tmp_path / "mlp.npz") == 0
    assert 'data      = npz("data.npz")' in (tmp_path / "mlp.dln").read_text()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.uniform(0, 16, (40, 64)).astype(np.float32),
             y=rng.integers(0, 10, 40))
    assert cli("run", tmp_path / "mlp.dln", "--resume", tmp_path / "mlp.npz", "--epochs", "1", "-q",
               "--save", tmp_path / "tuned.npz") == 0
    tuned = dlc.load(tmp_path / "mlp.dln")
    tuned.load_weights(tmp_path / "tuned.npz")
    assert tuned.normalizer.active  # the exported normalization came back into the checkpoint


def test_logical_operations_export_as_and_or_not_and_round_trip(tmp_path):
    """Selects between bools export as And, Or and Not (onnxruntime has no Where of bools),
    with no constant left unread, and import back as logical_and/or/not."""
    src = """model m(x: f32[B, 4]) -> f32[B, 4] {
    inside = logical_and(x > -0.5, x < 0.5)
    either = logical_or(x > 1, x[:, :1] < 0)
    return where(logical_not(inside), 1.0, x) + where(either, 2.0, 0.0)
}
"""
    m = dlc.load(src)
    proto = export_model(m)
    assert {"And", "Or", "Not"} <= {n.op_type for n in proto.graph.node}
    read = {i for n in proto.graph.node for i in n.input}
    assert all(i.name in read for i in proto.graph.initializer)
    onnx.save(proto, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    want = np.where(~((x > -0.5) & (x < 0.5)), 1.0, x) + np.where((x > 1) | (x[:, :1] < 0), 2.0, 0.0)
    np.testing.assert_allclose(m.predict(x), want, rtol=1e-6)
    np.testing.assert_allclose(ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0], want, rtol=1e-6)
    back = write(import_model(tmp_path / "m.onnx", train=False), tmp_path / "b.dln", tmp_path / "b.npz")
    text = (tmp_path / "b.dln").read_text()
    assert "logical_and(" in text and "logical_or(" in text and "logical_not(" in text, text
    np.testing.assert_allclose(back.predict(x), want, rtol=1e-6)


def test_upsampling_and_transposed_convolutions_round_trip(tmp_path):
    """upsample exports as Reshape, Expand (to a shape computed with the batch) and Reshape,
    which import back as broadcast_to; conv_transpose2d as ConvTranspose, with its
    dilations where it has them (onnxruntime gives dlc's outputs)."""
    src = """model m(x: f32[B, 2, 3, 4]) -> f32[B, 3, 12, 24] {
    return upsample(x, [2, 3]) |> conv_transpose2d(3, 3, stride=2, pad=1, output_pad=1)
}
model d(x: f32[B, 2, 3, 4]) -> f32[B, 2, 8, 7] {
    return conv_transpose2d(x, 2, [3, 2], stride=[2, 1], pad=[1, 0], output_pad=[1, 0], dilation=[2, 3])
}
"""
    x = np.random.default_rng(0).normal(size=(3, 2, 3, 4)).astype(np.float32)
    for name, written in (("m", "conv_transpose2d(3, 3, stride=2, pad=1, output_pad=1)"),
                          ("d", "conv_transpose2d(2, [3, 2], stride=[2, 1], pad=[1, 0], output_pad=[1, 0], "
                                "dilation=[2, 3])")):
        m = dlc.load(src, model=name)
        onnx.save(export_model(m), str(tmp_path / f"{name}.onnx"))
        np.testing.assert_allclose(ort.InferenceSession(str(tmp_path / f"{name}.onnx")).run(None, {"x": x})[0],
                                   m.predict(x), rtol=1e-5, atol=1e-5)
        back = write(import_model(tmp_path / f"{name}.onnx", train=False), tmp_path / "b.dln", tmp_path / "b.npz")
        text = (tmp_path / "b.dln").read_text()
        assert written in text and (name == "d" or "broadcast_to(" in text), text
        np.testing.assert_allclose(back.predict(x), m.predict(x), rtol=1e-6, atol=1e-6)


def test_grouped_and_dilated_convolutions_round_trip(tmp_path):
    """Grouped, depthwise and dilated convolutions, whatever primitives dlc composes them
    of, export as one Conv each with its group and dilations. onnxruntime and the model
    imported back give dlc's outputs."""
    src = """model m(x: f32[B, 4, 9, 8]) -> f32[B, 4, 5, 4] {
    h = x |> conv2d(8, 3, pad=1, groups=4) |> relu |> conv2d(4, 3, stride=2, pad=2, dilation=2, groups=2)
    return h |> conv2d(4, [3, 1], dilation=[2, 1], pad=[2, 0])
}
"""
    m = dlc.load(src)
    proto = export_model(m)
    assert [n.op_type for n in proto.graph.node] == ["Conv", "Relu", "Conv", "Conv"]
    attrs = [{a.name: list(a.ints) or a.i for a in n.attribute} for n in proto.graph.node if n.op_type == "Conv"]
    assert [(a.get("group", 1), a.get("dilations"), a["pads"]) for a in attrs] == \
        [(4, None, [1, 1, 1, 1]), (2, [2, 2], [2, 2, 2, 2]), (1, [2, 1], [2, 0, 2, 0])]
    onnx.save(proto, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(0).normal(size=(3, 4, 9, 8)).astype(np.float32)
    want = m.predict(x)
    np.testing.assert_allclose(ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0], want,
                               rtol=1e-5, atol=1e-5)
    back = write(import_model(tmp_path / "m.onnx", train=False), tmp_path / "b.dln", tmp_path / "b.npz")
    assert "dilation=[2, 1]" in (tmp_path / "b.dln").read_text() and "groups=4" in (tmp_path / "b.dln").read_text()
    np.testing.assert_allclose(back.predict(x), want, rtol=1e-5, atol=1e-5)
    # over time: one 1-D Conv with its dilation, imported back as conv1d
    m = dlc.load("model m(x: f32[B, 3, 12]) -> f32[B, 4, 12] {\n"
                 "    return x |> conv1d(4, 3, pad=\"same\", dilation=3)\n}\n")
    proto = export_model(m)
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    assert {a.name: list(a.ints) for a in conv.attribute}["dilations"] == [3]
    onnx.save(proto, str(tmp_path / "c.onnx"))
    back = write(import_model(tmp_path / "c.onnx", train=False), tmp_path / "c.dln", tmp_path / "c.npz")
    assert "conv1d(4, 3, pad=3, dilation=3)" in (tmp_path / "c.dln").read_text()
    x = np.random.default_rng(1).normal(size=(2, 3, 12)).astype(np.float32)
    np.testing.assert_allclose(back.predict(x), m.predict(x), rtol=1e-5, atol=1e-5)


def test_an_imported_constant_stays_as_it_is_in_fine_tuning(tmp_path):
    """A frozen `param` exports as an initializer and imports back as a frozen `param`: a
    PyTorch buffer or a mask keeps its values while the layers around it train."""
    src = """model m(x: f32[B, 4]) -> f32[B, 3] {
    param scale: f32[4] = normal(1, 0.5), trainable=false
    return x * scale |> dense(3)
}
"""
    (tmp_path / "m.dln").write_text(src)
    m = dlc.load(src)
    m.save(tmp_path / "w.npz")
    assert cli("export", tmp_path / "m.dln", "--weights", tmp_path / "w.npz", "-o", tmp_path / "m.onnx") == 0
    assert cli("import", tmp_path / "m.onnx", "-o", tmp_path / "back.dln") == 0
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(40, 4)).astype(np.float32), y=rng.integers(0, 3, 40))
    assert cli("run", tmp_path / "back.dln", "--resume", tmp_path / "back.npz", "--epochs", "2", "-q",
               "--save", tmp_path / "tuned.npz") == 0
    before, after = np.load(tmp_path / "back.npz"), np.load(tmp_path / "tuned.npz")
    constant = next(k for k in before.files if "." not in k and k not in ("step", "__meta__"))
    np.testing.assert_array_equal(after[constant], before[constant])
    np.testing.assert_array_equal(before[constant], m.params["scale"])
    dense_w = next(k for k in before.files if k.endswith(".w"))
    assert not np.array_equal(after[dense_w], before[dense_w])


def _model(nodes, inputs, outputs, inits=(), opset=20):
    from onnx import helper
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_an_operator_without_dln_counterpart_is_named(tmp_path):
    from onnx import TensorProto, helper
    m = _model([helper.make_node("Relu", ["x"], ["r"], name="act"),
                helper.make_node("Cos", ["r"], ["y"], name="the_cos")],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    onnx.save(m, str(tmp_path / "m.onnx"))
    with pytest.raises(ImportError_) as e:
        import_model(tmp_path / "m.onnx")
    assert "node `the_cos` (Cos)" in e.value.message and "cannot import `Cos`" in e.value.message


@pytest.mark.parametrize("mode", ["reflect", "edge", "wrap"])
def test_a_pad_of_the_inputs_own_cells_imports_in_its_mode(mode, tmp_path):
    from onnx import TensorProto, helper
    pads = helper.make_tensor("pads", TensorProto.INT64, [6], [0, 2, 0, 0, 1, 3])
    m = _model([helper.make_node("Pad", ["x", "pads"], ["y"], mode=mode)],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 7])], [pads])
    onnx.save(m, str(tmp_path / "m.onnx"))
    back = write(import_model(tmp_path / "m.onnx", train=False), tmp_path / "b.dln", tmp_path / "b.npz")
    assert f'pad([0, 2, 0], [0, 1, 3], mode="{mode}")' in (tmp_path / "b.dln").read_text()
    x = np.random.default_rng(0).normal(size=(4, 3, 4)).astype(np.float32)
    want = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(back.predict(x), want)
    onnx.save(export_model(back), str(tmp_path / "again.onnx"))  # dlc's export: slices and a concat
    np.testing.assert_array_equal(ort.InferenceSession(str(tmp_path / "again.onnx")).run(None, {"x": x})[0], want)


def test_sign_and_the_math_primitives_round_trip(tmp_path):
    """Found by exporting and importing generated models (tests/test_fuzz.py's generator):
    `sign` exported as ONNX Sign and `step` as Greater cast to float, which the importer
    refused."""
    src = """model m(x: f32[B, 3]) -> f32[B, 2] {
    h = dense(x, 2)
    return sign(h) + abs(h) * sqrt(h * h + 1) - minimum(exp(-h), 0.5) + step(h) * 2 + step(h - 0.5)
}
"""
    m = dlc.load(src)
    m.state["h.b"][...] = [0.25, -0.5]
    onnx.save(export_model(m), str(tmp_path / "m.onnx"))
    back = write(import_model(tmp_path / "m.onnx"), tmp_path / "b.dln", tmp_path / "b.npz")
    text = (tmp_path / "b.dln").read_text()
    assert "|> sign" in text and "|> step" in text
    x = np.random.default_rng(0).normal(0.0, 1.0, (6, 3)).astype(np.float32)
    np.testing.assert_allclose(back.forward(x), m.forward(x), atol=1e-6, rtol=1e-6)


@pytest.mark.filterwarnings("ignore::dlc.core.diagnostics.DlcWarning")  # (the silu model has no weights)
def test_activations_and_layernorm_become_onnx_operators_and_come_back(tmp_path):
    """elu, selu, softplus and layernorm are arithmetic in dlc's graph; the exporter writes
    ONNX's Elu, Selu, Softplus and LayerNormalization for them (onnxruntime agrees), and the
    importer turns those back into the functions and the layer."""
    src = """model m(x: f32[B, 6]) -> f32[B, 6] {
    h = x |> layernorm(eps=0.01) |> elu(0.5) |> softplus |> selu
    return layernorm(h) + elu(h) + selu(h * 2.0)
}
"""
    m = dlc.load(src)
    rng = np.random.default_rng(0)
    for name, value in m.params.items():
        m.params[name] = rng.normal(size=value.shape).astype(np.float32)
    proto = export_model(m)
    assert _ops(proto) == {"Elu", "Selu", "Softplus", "LayerNormalization", "Add", "Mul"}
    onnx.save(proto, str(tmp_path / "m.onnx"))
    x = rng.normal(0.0, 3.0, (5, 6)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", {"x": x}), m.predict(x), rtol=1e-5, atol=1e-5)
    back = write(import_model(tmp_path / "m.onnx"), tmp_path / "b.dln", tmp_path / "b.npz")
    text = (tmp_path / "b.dln").read_text()
    assert "layernorm(eps=0.01) |> elu(0.5) |> softplus |> selu" in text and "|> elu\n" in text, text
    np.testing.assert_allclose(back.predict(x), m.predict(x), rtol=1e-5, atol=1e-5)
    # silu exports as Sigmoid and Mul (onnxruntime runs no Swish); another tool's Swish imports as silu
    swish = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Swish", ["x"], ["y"]), onnx.helper.make_node("Swish", ["x"], ["z"], alpha=2.0),
         onnx.helper.make_node("Add", ["y", "z"], ["out"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", 6])],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["B", 6])]),
        opset_imports=[onnx.helper.make_opsetid("", 24)])
    onnx.save(swish, str(tmp_path / "s.onnx"))
    imported = import_model(tmp_path / "s.onnx")
    assert "|> silu" in imported.text and "sigmoid(x * 2.0)" in imported.text, imported.text
    back = write(imported, tmp_path / "s.dln", tmp_path / "s.npz")
    np.testing.assert_allclose(back.predict(x), x / (1 + np.exp(-x)) + x / (1 + np.exp(-2 * x)), rtol=1e-5, atol=1e-6)


def test_convolutions_and_pools_over_time_export_as_one_dimensional_operators(tmp_path):
    """conv1d and the pools over [N, C, T] are dlc's 2-D ones over [N, C, 1, T] with reshapes
    around them; the exporter writes ONNX's 1-D Conv, MaxPool and AveragePool, and the
    importer reads those back as conv1d and the pools."""
    src = """model m(x: f32[B, 3, 9]) -> f32[B, 4, 5] {
    h = conv1d(x, 4, 3, stride=2, pad=1) |> relu
    return h + maxpool(x, 3, stride=2, pad=1)[:, :1] + avgpool(conv1d(h, 4, 1, bias=false), 3, stride=1, pad=1)
}
"""
    m = dlc.load(src)
    rng = np.random.default_rng(0)
    for name, value in m.params.items():
        m.params[name] = rng.normal(size=value.shape).astype(np.float32)
    proto = export_model(m)
    assert "Reshape" not in _ops(proto) and {"Conv", "MaxPool", "AveragePool"} <= _ops(proto)
    onnx.save(proto, str(tmp_path / "m.onnx"))
    x = rng.normal(size=(5, 3, 9)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", {"x": x}), m.predict(x), rtol=1e-5, atol=1e-5)
    back = write(import_model(tmp_path / "m.onnx"), tmp_path / "b.dln", tmp_path / "b.npz")
    text = (tmp_path / "b.dln").read_text()
    assert "conv1d(4, 3, stride=2, pad=1)" in text and "maxpool(3, stride=2, pad=1)" in text, text
    np.testing.assert_allclose(back.predict(x), m.predict(x), rtol=1e-5, atol=1e-5)


INITIAL_STATES = [
    # found by exporting and importing generated models: the importer refused a given state
    """model net(x: f32[B, 2, 1]) -> f32[B, 2, 1] {
    h0 = tanh(dense(x[:, 0], 1))
    return rnn(x, 1, return_sequences=true, initial=h0)
}""", """model net(x: f32[B, 4, 3]) -> f32[B, 5] {
    return lstm(x, 5, initial=(tanh(dense(x[:, 0], 5)), dense(x[:, 1], 5)))
}""",
    # both directions' states: one bidirectional operator (it was a forward and a reverse one)
    """model net(x: f32[B, 4, 3]) -> f32[B, 4, 10] {
    y, h = gru(x, 5, initial=reshape(tanh(dense(x[:, 0], 20)), [4, B, 5]), bidirectional=true, layers=2,
               return_sequences=true, return_state=true)
    return y + mean(h)
}""", """model net(x: f32[B, 4, 3]) -> f32[B, 10] {
    h0 = reshape(tanh(dense(x[:, 0], 10)), [2, B, 5])
    return lstm(x, 5, initial=(h0, h0 * 2.0), bidirectional=true)
}"""]


@pytest.mark.parametrize("src", INITIAL_STATES)
def test_recurrent_layers_from_given_states_export_and_import(src, tmp_path):
    m = dlc.load(src)
    rng = np.random.default_rng(0)
    for name, value in m.params.items():
        m.params[name] = rng.normal(size=value.shape).astype(np.float32)
    proto = export_model(m)
    assert not {"Scan"} & _ops(proto)
    assert all(a.s != b"reverse" for n in proto.graph.node for a in n.attribute if a.name == "direction")
    onnx.save(proto, str(tmp_path / "m.onnx"))
    x = rng.normal(size=(3, 4 if "4, 3" in src else 2, 3 if "4, 3" in src else 1)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", {"x": x}), m.predict(x), rtol=1e-5, atol=1e-5)
    back = write(import_model(tmp_path / "m.onnx"), tmp_path / "b.dln", tmp_path / "b.npz")
    assert "initial=" in (tmp_path / "b.dln").read_text()
    np.testing.assert_allclose(back.predict(x), m.predict(x), rtol=1e-5, atol=1e-5)


def test_import_refuses_what_is_not_an_onnx_model(tmp_path, capsys):
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    assert cli("import", tmp_path / "bad.onnx", "-o", tmp_path / "x.dln") == 1
    err = capsys.readouterr().err
    assert "bad.onnx is not" in err and "ONNX model" in err


def test_import_recognizes_layers_in_a_hand_written_graph(tmp_path):
    """MatMul + Add -> dense with bias; Gemm with transB -> dense; Gather -> embedding."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    w2, b2 = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    m = _model([helper.make_node("MatMul", ["x", "enc.weight"], ["mm"]),
                helper.make_node("Add", ["mm", "enc.bias"], ["h"]),
                helper.make_node("Tanh", ["h"], ["t"]),
                helper.make_node("Gemm", ["t", "head.weight", "head.bias"], ["y"], transB=1)],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
               [numpy_helper.from_array(a, n) for a, n in ((w1, "enc.weight"), (b1, "enc.bias"),
                                                           (w2, "head.weight"), (b2, "head.bias"))])
    onnx.save(m, str(tmp_path / "m.onnx"))
    imported = import_model(tmp_path / "m.onnx", train=False)
    assert "enc = x |> dense(5) |> tanh" in imported.text and "head = enc |> dense(3)" in imported.text
    model = write(imported, tmp_path / "m.dln", tmp_path / "m.npz")
    x = rng.normal(size=(6, 4)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x), np.tanh(x @ w1 + b1) @ w2.T + b2, atol=1e-5)


# --- models made by PyTorch ------------------------------------------------------------------

def _torch():
    return pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch==2.13.0 gives a "
                                               "CPU build); the PyTorch import test needs it")


def _torch_models(torch):
    nn = torch.nn

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 5, 1)
            self.pool = nn.AvgPool2d(2)
            self.fc = nn.Linear(5 * 2 * 2 + 4, 3)

        def forward(self, x):
            h = torch.nn.functional.leaky_relu(self.bn(self.conv(x)), 0.1)
            g = nn.functional.adaptive_avg_pool2d(h, 1).view(h.size(0), -1)
            p = self.pool(torch.sigmoid(self.conv2(h))).flatten(1)
            return torch.log_softmax(self.fc(torch.cat([g, p], dim=1)), dim=1)

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(8, 16, batch_first=True)
            self.gru = nn.GRU(16, 6, batch_first=True, bidirectional=True)
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            h, _ = self.lstm(x)
            g, _ = self.gru(h)
            return self.fc(g[:, -1])

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 6)
            self.rnn = nn.RNN(6, 5, batch_first=True, num_layers=2)
            self.out = nn.Linear(5, 2)

        def forward(self, t):
            _, h = self.rnn(self.emb(t))
            return torch.softmax(self.out(h[-1]), dim=-1)

    class Acts(nn.Module):  # the activations and normalizations beyond the first models'
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.prelu = nn.PReLU(3)
            self.fc = nn.Linear(3 * 4 * 4, 8)
            self.ln = nn.LayerNorm(8)
            self.fc2 = nn.Linear(8, 4)
            self.tail = nn.Sequential(nn.ELU(0.5), nn.SELU(), nn.Softplus(), nn.SiLU(), nn.PReLU(),
                                      nn.Hardsigmoid(), nn.Hardswish(), nn.Mish(), nn.Softsign(), nn.ELU())

        def forward(self, x):
            h = self.prelu(self.conv(x)).flatten(1)
            return self.tail(self.fc2(self.ln(self.fc(h)) * 3.0))

    class ReluRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(4, 6, batch_first=True, nonlinearity="relu", bidirectional=True)
            self.fc = nn.Linear(12, 2)

        def forward(self, x):
            h0 = x[:, :2, :3].transpose(0, 1)
            y, _ = self.rnn(x, torch.tanh(torch.cat([h0, h0], dim=2)))  # a given h_0
            return self.fc(y[:, -1])

    class Conv1d(nn.Module):  # over time: [N, C, T]
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(3, 6, 5, padding=2)
            self.c2 = nn.Conv1d(6, 4, 3, stride=2, padding=1, bias=False)
            self.fc = nn.Linear(4 + 4, 2)

        def forward(self, x):
            h = nn.functional.max_pool1d(torch.relu(self.c1(x)), 2)
            h = nn.functional.avg_pool1d(self.c2(h), 3, stride=1, padding=1)
            g = nn.functional.adaptive_avg_pool1d(h, 1).flatten(1)
            return self.fc(torch.cat([g, nn.functional.max_pool1d(h, 2, stride=1).flatten(1)], dim=1))

    class Attention(nn.Module):  # one block of self-attention, two heads, its matmuls written out
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)
            self.out = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (h.reshape(b, t, 2, 4).transpose(1, 2) for h in self.qkv(x).split(8, dim=-1))
            a = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
            h = self.norm(x + self.out((a @ v).transpose(1, 2).reshape(b, t, 8)))
            return self.fc(h.mean(1))

    class Encoder(nn.Module):  # PyTorch's own block: its attention reshapes to [T, B*heads, d]
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True,
                                                  activation="gelu")
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.enc(x).mean(1))

    class Causal(nn.Module):  # its mask, of the exported length, folds to a constant holding -inf
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(4, 12)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            q, k, v = (h.unsqueeze(1) for h in self.qkv(x).chunk(3, dim=-1))
            return self.fc(nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)[:, 0, -1])

    class Norms(nn.Module):  # layer normalization over several axes: [C, H, W], and [T, F]
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.chw = nn.LayerNorm([3, 4, 4])
            self.tf = nn.LayerNorm([4, 12], eps=1e-3)
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            h = self.chw(self.conv(x))
            return self.fc(self.tf(h.reshape(-1, 4, 12)).mean(1))

    class Pools(nn.Module):  # output sizes rounded up, and averages of only the input's cells
        def __init__(self):
            super().__init__()
            self.max = nn.MaxPool2d(2, ceil_mode=True)
            self.avg = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)
            self.avg2 = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
            self.pad = nn.ConstantPad2d((1, 0, 0, 1), 0.5)  # (left, right, top, bottom)
            self.fc = nn.Linear(2 * (4 * 4 + 4 * 4), 3)

        def forward(self, x):
            a, b = self.max(self.pad(x)[:, :, :7, 1:]), self.avg(self.avg2(x))
            return self.fc(torch.cat([a.flatten(1), b.flatten(1)], 1))

    class Pads(nn.Module):  # pads with the input's own cells: mirrored, repeated, wrapped around
        def __init__(self):
            super().__init__()
            self.reflect = nn.ReflectionPad2d((2, 1, 0, 3))  # (left, right, top, bottom)
            self.edge = nn.ReplicationPad2d((0, 2, 1, 1))
            self.conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular")  # (exported as slices)
            self.fc = nn.Linear(3 * 7 * 7 + 2 * 10 * 10, 3)

        def forward(self, x):
            h = self.conv(self.edge(x))
            return self.fc(torch.cat([h.flatten(1), self.reflect(self.edge(x)).flatten(1)], 1))

    class Selects(nn.Module):  # comparisons, where, masked_fill, a comparison negated and cast
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            h = self.fc(x)
            h = h.masked_fill(h < -0.2, float("-inf")).clamp(min=-5)
            g = torch.where(x != 0.5, h, x) + (h >= 0.1).float() + (x > 0.3).float()
            band = ((x > -1) & (x < 1)) | ~(h < 0.5)
            return self.out(torch.where(~(h > 0), g * 2, g) + torch.where(band, 1.0, -1.0))

    class KeyMask(nn.Module):  # attention that skips the padding tokens (a mask computed at run time)
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, t):
            e = self.emb(t)
            h, _ = self.att(e, e, e, key_padding_mask=t == 0, need_weights=False)
            return self.fc(h.mean(1))

    class PosEmb(nn.Module):  # a parameter used in arithmetic: trainable after import too
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(5, 8))
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc((x + self.pos).mean(1))

    class GroupNorms(nn.Module):  # group and instance normalization, and reductions beyond sum/mean/max
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.gn = nn.GroupNorm(2, 4)
            self.inorm = nn.InstanceNorm2d(4, affine=True)
            self.inorm1 = nn.InstanceNorm1d(4)
            self.fc = nn.Linear(4 * 4 + 1 + 4, 3)
            with torch.no_grad():
                self.inorm.weight.uniform_(0.5, 1.5)
                self.inorm.bias.uniform_(-0.5, 0.5)
                self.gn.weight.uniform_(0.5, 1.5)

        def forward(self, x):
            h = torch.relu(self.gn(self.conv(x)))
            g = self.inorm(h)
            parts = [nn.functional.adaptive_max_pool2d(g, 1).flatten(1), g.amin(dim=(2, 3)),
                     torch.norm(h.flatten(2), dim=2), self.inorm1(g.amax(3)).mean(2),
                     torch.reciprocal(g.abs().sum((2, 3)) + 1).sum(1, keepdim=True), h.pow(2).sum((2, 3))]
            return self.fc(torch.cat(parts, 1))

    class Decoder(nn.Module):  # upsampling by transposed convolutions, and by repeating cells
        def __init__(self):
            super().__init__()
            self.down = nn.Conv2d(2, 4, 3, stride=2, padding=1)
            self.up = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)
            self.up2 = nn.ConvTranspose2d(3, 1, (2, 3), stride=(1, 2), dilation=(2, 1), bias=False)
            self.near = nn.Upsample(scale_factor=(2, 1))
            self.gn = nn.GroupNorm(1, 1)  # (reshapes the upsampled shape, which ONNX's inference leaves unknown)

        def forward(self, x):
            return torch.sigmoid(self.gn(self.near(self.up2(torch.relu(self.up(torch.relu(self.down(x))))))))

    class Mobile(nn.Module):  # depthwise-separable blocks, grouped and dilated convolutions
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
            self.pw = nn.Conv2d(4, 8, 1)
            self.mult = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8)  # two filters per channel
            self.grouped = nn.Conv2d(16, 8, 3, padding=2, dilation=2, groups=2)
            self.dilated = nn.Conv1d(8, 4, 3, padding=2, dilation=2)

        def forward(self, x):
            h = torch.relu(self.pw(torch.relu(self.dw(x))))
            h = torch.relu(self.grouped(torch.relu(self.mult(h))))
            return self.dilated(h.mean(2))

    return [("attention", Attention(), (5, 8), ["layernorm", " @ ", "softmax"]),
            ("mobile", Mobile(), (4, 7, 6), ["conv2d(4, 3, pad=1, groups=4, bias=false)", "conv2d(8, 1)",
                                             "conv2d(16, 3, stride=2, pad=1, groups=8)",
                                             "conv2d(8, 3, pad=2, dilation=2, groups=2)",
                                             "conv1d(4, 3, pad=2, dilation=2)"]),
            ("decoder", Decoder(), (2, 5, 6), ["conv_transpose2d(3, 3, stride=2, pad=1, output_pad=1)",
                                               "conv_transpose2d(1, [2, 3], stride=[1, 2], dilation=[2, 1], "
                                               "bias=false)",
                                               "upsample([2, 1])"]),
            ("groupnorms", GroupNorms(), (3, 5, 5), ["groupnorm(2, affine=false)", "groupnorm(4)",
                                                     "groupnorm(4, affine=false)", "min(axis=[2, 3])",
                                                     "1.0 / ", "sqrt(sum("]),
            ("posemb", PosEmb(), (5, 8), ["param pos: f32[5, 8] = zeros   # a weight"]),
            ("selects", Selects(), (6,), ["fc < (-0.2)", "where(c, -1e+30, fc)", "x != 0.5", "h <= 0.0",
                                          "step(x - 0.3)", "where(c_3, 1.0, 0.0)", "logical_and(", "logical_or("]),
            ("keymask", KeyMask(), (7,), ["x == 0", "broadcast_to(", "softmax"]),
            ("pads", Pads(), (2, 5, 5), ['mode="reflect"', 'mode="edge"', "conv2d(3, 3)"]),
            ("pools", Pools(), (2, 7, 7), ["maxpool(2, ceil=true)", "avgpool(3, stride=2, pad=1, ceil=true, "
                                           "count_pad=false)", "avgpool(3, stride=1, pad=1, count_pad=false)",
                                           "pad([0, 0, 0, 1], [0, 0, 1, 0], value=0.5)"]),
            ("norms", Norms(), (2, 4, 4), ["layernorm(axis=1)", "layernorm(eps=0.001, axis=1)"]),
            ("causal", Causal(), (5, 4), ["= zeros, trainable=false   # a constant of the ONNX model; its "
                                          "infinities are written as ±1e30", "softmax"]),  # (the mask: frozen)
            ("encoder", Encoder(), (5, 8), ["dense(24)", "reshape([5, -1, 4])", " @ ", "softmax", "layernorm",
                                                 'gelu(approximate="none")']),
            ("cnn", CNN(), (1, 8, 8), ["conv2d(4, 3, stride=2, pad=1)", "batchnorm", "global_avgpool"]),
            ("conv1d", Conv1d(), (3, 8), ["conv1d(6, 5, pad=2)", "maxpool(2)", "conv1d(4, 3, stride=2, pad=1, "
                                          "bias=false)", "avgpool(3, stride=1, pad=1)", "mean("]),
            ("relu_rnn", ReluRNN(), (5, 4), ['rnn(6, return_sequences=true, bidirectional=true, activation="relu", '
                                             'initial=']),
            ("acts", Acts(), (2, 4, 4), ["layernorm", "elu(0.5)", "selu", "softplus", "|> elu\n",
                                         "leaky_relu(0.25)", "softplus |> tanh",
                                         "param prelu_slope: f32[3, 1, 1] = zeros   # a weight"]),  # (trainable)
            ("seq", Seq(), (5, 8), ["lstm(16, return_sequences=true)", "gru(6, return_sequences=true, "
                                                                           "bidirectional=true)"]),
            ("tokens", Tokens(), (7,), ["embedding(20, 6)", "rnn(5"])]


@pytest.mark.parametrize("which", ["attention", "mobile", "decoder", "groupnorms", "posemb", "selects", "keymask", "encoder", "causal", "norms", "pools", "pads",
                                   "cnn", "conv1d", "acts",
                                   "relu_rnn", "seq", "tokens"])
def test_a_model_exported_by_pytorch_imports_with_its_outputs(which, tmp_path):
    torch = _torch()
    torch.manual_seed(0)
    name, net, shape, layers = next(t for t in _torch_models(torch) if t[0] == which)
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
    net.eval()
    tokens = shape == (7,)
    example = torch.randint(0, 20, (2,) + shape) if tokens else torch.randn((2,) + shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), str(tmp_path / "t.onnx"), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False,
                          do_constant_folding=False)
    assert cli("import", tmp_path / "t.onnx", "-o", tmp_path / "t.dln") == 0
    text = (tmp_path / "t.dln").read_text()
    for layer in layers:
        assert layer in text, text
    model = dlc.load(tmp_path / "t.dln")
    model.load_weights(tmp_path / "t.npz")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, (9,) + shape) if tokens else rng.normal(size=(9,) + shape).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.predict(x), want, atol=1e-5, rtol=1e-4)


def _torch_export(torch, net, shape, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn((2,) + shape),), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False,
                          do_constant_folding=False)


@pytest.mark.filterwarnings("ignore::dlc.core.diagnostics.DlcWarning")  # (no parameters to train)
def test_shape_arithmetic_is_evaluated_and_a_shape_read_as_data_is_refused(tmp_path, capsys):
    """PyTorch writes `e // heads` as Shape, Gather and Div feeding a Reshape: the importer
    computes it (numbers only, ONNX's truncating division, no warning about dlc's rounding).
    A number of the shape is a constant; the batch size multiplied into a tensor is refused
    by name (it was an AssertionError)."""
    torch = _torch()

    class Split(torch.nn.Module):
        def forward(self, x):
            b, t, e = x.shape
            return torch.tanh(x.reshape(b, t, e // 2, 2)).sum(-1)

    class AsData(torch.nn.Module):
        def forward(self, x):
            return x * x.shape[0]

    _torch_export(torch, Split(), (3, 6), tmp_path / "s.onnx")
    assert cli("import", tmp_path / "s.onnx", "-o", tmp_path / "s.dln") == 0
    assert "rounds down" not in capsys.readouterr().err
    assert "reshape([B, 3, 3, 2])" in (tmp_path / "s.dln").read_text()
    x = np.random.default_rng(0).normal(size=(4, 3, 6)).astype(np.float32)
    want = np.tanh(x.reshape(4, 3, 3, 2)).sum(-1)
    np.testing.assert_allclose(dlc.load(tmp_path / "s.dln").predict(x), want, rtol=1e-5, atol=1e-6)

    _torch_export(torch, AsData(), (3, 6), tmp_path / "d.onnx")
    assert cli("import", tmp_path / "d.onnx", "-o", tmp_path / "d.dln") == 1
    err = capsys.readouterr().err
    assert "computes with the model's shape (B) as a tensor" in err and "Traceback" not in err


def test_extras_are_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'onnx = ["onnx' in text and "onnxruntime" in text and 'graph = ["graphviz' in text


@settings(FUZZ, max_examples=FUZZ.max_examples // 4)
@given(generated(mistakes=False), st.booleans())
@pytest.mark.filterwarnings("ignore::dlc.core.diagnostics.DlcWarning")
def test_generated_models_export_and_import_back(tmp_path_factory, case, recognize):
    """The valid models of tests/test_fuzz.py's generator, with random weights: exported
    (layers as ONNX operators, or recurrent layers as Scan loops), they give in onnxruntime
    what the reference interpreter gives, and imported back (a model without `state`) the
    same again. The importer refuses a Scan loop (by name)."""
    text, dtype, in_shape, declared, vocab, bad_line = case
    rng = np.random.default_rng(0)
    shape = (6,) + tuple(in_shape[1:])
    x = rng.integers(0, vocab, shape).astype(np.int32) if dtype == "i32" else rng.random(shape, dtype=np.float32)
    m = dlc.load(text)
    for name, v in m.state.items():
        if v.dtype.kind == "f" and v.ndim:
            v[...] = rng.uniform(0.5, 2.0, v.shape) if name.endswith("running_var") else rng.normal(0.0, 0.5, v.shape)
    want = m.forward(x)
    proto = export_model(m, recognize=recognize)
    onnx.checker.check_model(proto, full_check=True)
    feeds = [x] + [np.full((len(x),) + tuple(c.type.shape[1:]), c.value, np.float32) for c in m.built().carries]
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, dict(zip([i.name for i in proto.graph.input], feeds)))[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=text)
    if m.built().carries:
        return
    path = tmp_path_factory.mktemp("generated") / "m.onnx"
    onnx.save(proto, str(path))
    try:
        imported = import_model(path)
    except ImportError_ as e:
        assert "(Scan) has a subgraph" in e.message, e.message
        event("imported: refused a Scan loop")
        return
    back = write(imported, path.with_suffix(".dln"), path.with_suffix(".npz"))
    np.testing.assert_allclose(back.forward(x), want, rtol=1e-4, atol=1e-4, err_msg=text)
    event("exported and imported back")
