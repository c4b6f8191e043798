"""`dlc graph`: the layer graph and the fused kernels as Graphviz DOT, rendered to SVG by `dot`."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

graphviz = pytest.importorskip("graphviz", reason="needs the graphviz Python package: pip install 'dlc[graph]'")

import dlc  # noqa: E402
from dlc.cli import main  # noqa: E402
from dlc.graphviz import layer_graph, record_layers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.dln"))
HAS_DOT = shutil.which("dot") is not None
NO_DOT = "Graphviz's `dot` program is not installed (apt-get install graphviz): the DOT text is checked instead"


def cli(*args) -> int:
    return main([str(a) for a in args])


def _called(path) -> list[str]:
    """Every function, layer and block the model's body calls, as the summary lists them."""
    m = dlc.load(path)
    return [what for row in m.built().summary for what in row.what.split(" → ")
            if what not in ("expression", "param")]


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_layer_graph_names_every_layer(example, tmp_path):
    path = ROOT / "examples" / f"{example}.dln"
    out = tmp_path / ("g.svg" if HAS_DOT else "g.dot")
    assert cli("graph", path, "-o", out) == 0
    text = out.read_text()
    if HAS_DOT:
        assert text.lstrip().startswith("<?xml") and "<svg" in text
    for name in _called(path):
        assert name in text, f"{name} is missing from the picture of {example}"
    m = dlc.load(path)
    assert str(m.built().graph.node(m.built().graph.outputs["output"]).type) in text


def test_one_node_per_call_and_edges_follow_the_data(tmp_path):
    path = ROOT / "examples" / "resnet_bn.dln"
    m = dlc.load(path)
    rec = record_layers(m.program, m.name)
    assert [c.name for c in rec.calls] == ["conv2d", "batchnorm", "relu", "residual", "residual", "avgpool",
                                           "flatten", "dense"]
    dot = layer_graph(m).source
    assert dot.count("peripheries=2") == 2  # the two block calls
    assert "call2 -> call3" in dot and "call3 -> call4" in dot and "in_x -> call0" in dot
    assert "h.residual_2.h · 4,704 params" in dot


def test_declared_params_and_expressions_get_nodes():
    m = dlc.load(ROOT / "examples" / "logreg.dln")
    dot = layer_graph(m).source
    assert "param w" in dot and "param b" in dot and "x @ w + b" in dot and "sigmoid" in dot


@pytest.mark.skipif(not HAS_DOT, reason=NO_DOT)
def test_the_fused_kernels_render_as_coloured_clusters(tmp_path):
    assert cli("graph", ROOT / "examples" / "lenet5.dln", "--stage", "fuse", "-o", tmp_path / "k.svg") == 0
    svg = (tmp_path / "k.svg").read_text()
    assert "k0 conv · lenet5.dln:5" in svg and "matmul" in svg and "#c9daf8" in svg


def test_the_fused_kernels_as_dot(tmp_path):
    assert cli("graph", ROOT / "examples" / "digits_mlp.dln", "--stage", "fuse", "--train", "--batch", "8",
               "-o", tmp_path / "k.dot") == 0
    dot = (tmp_path / "k.dot").read_text()
    assert "subgraph cluster_k0" in dot and "training step" in dot and "digits_mlp.dln:4" in dot


def test_a_recurrent_layer_is_one_loop_cluster(tmp_path):
    assert cli("graph", ROOT / "examples" / "rnn_digits.dln", "--stage", "fuse", "--train", "-o",
               tmp_path / "k.dot") == 0
    dot = (tmp_path / "k.dot").read_text()
    loops = re.findall(r"k\d+ scan over 8 steps \(body: \d+ kernels\) · rnn_digits.dln:6", dot)
    assert len(loops) == 2  # forward, and the backward pass's reverse loop


def test_svg_without_dot_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert cli("graph", ROOT / "examples" / "digits_mlp.dln", "-o", tmp_path / "g.svg") == 2
    err = capsys.readouterr().err
    assert "needs Graphviz's `dot` program" in err and "apt-get install graphviz" in err and "-o graph.dot" in err
    assert not (tmp_path / "g.svg").exists()
    assert cli("graph", ROOT / "examples" / "digits_mlp.dln", "-o", tmp_path / "g.dot") == 0


def test_usage_errors(tmp_path, capsys):
    assert cli("graph", ROOT / "examples" / "digits_mlp.dln", "-o", tmp_path / "g.txt") == 2
    assert "write .svg, .png or .pdf" in capsys.readouterr().err
    assert cli("graph", ROOT / "examples" / "digits_mlp.dln", "--train", "-o", tmp_path / "g.dot") == 2
    assert "--stage fuse" in capsys.readouterr().err


def test_state_and_named_results_get_nodes():
    """char_lm: the carried `state h` is an input whose value at the return goes to the next
    batch (a dashed edge from the gru), and the named result `h` is an output of its own."""
    m = dlc.load(ROOT / "examples" / "char_lm.dln")
    dot = layer_graph(m).source
    assert 'in_carry_h [label="state h\nf32[B,96]"' in dot
    assert 'result_h [label="result h\nf32[B,96]"' in dot
    gru = next(c for c in record_layers(m.program, m.name).calls if c.name == "gru")
    assert len(gru.more) == 1  # `y, h = gru(..., return_state=true)`: one node, both results
    assert "f32[B,40,96], f32[B,96]" in dot
    assert 'call1 -> in_carry_h [label="next batch"' in dot
    assert "call1 -> result_h" in dot and "call2 -> output" in dot
