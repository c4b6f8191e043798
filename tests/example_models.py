"""The examples as the generic tests load them (tests/test_pipeline.py, test_backends.py,
test_backend_cpu.py). Until native targets have loops, they unroll each recurrent layer
over its time steps (passes/unroll_scans.py), and compiling a step costs about a second
per time step: the sequence examples are loaded with a shorter time axis there (SHORTER).
Their full shapes are checked (`dlc check`), trained on both targets with their own data
(`-m slow`), and trained shortened on both targets in tests/test_sequences.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import dlc

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.dln"))

# example -> (written, shortened) pairs of its source text
SHORTER = {
    "sentiment_lstm": [("i32[B, 200]", "i32[B, 12]")],
    "char_lm": [("i32[B, 40]", "i32[B, 6]"), ("f32[B, 40, 29]", "f32[B, 6, 29]")],
}


def source(path: Path, short: bool = True) -> str:
    text = Path(path).read_text(encoding="utf-8")
    for old, new in SHORTER.get(Path(path).stem, []) if short else []:
        assert old in text, f"{path.name} no longer declares {old}: update SHORTER in {__file__}"
        text = text.replace(old, new)
    return text


def load(path: Path, short: bool = True) -> dlc.Model:
    """The example, shortened if it is a long sequence model (its data is then not read)."""
    if short and Path(path).stem in SHORTER:
        return dlc.load(source(path))
    return dlc.load(path)


def example_feeds(m: dlc.Model, batch: int, rng) -> dict:
    """Random inputs, labels (when the loss takes them), carried states and a learning rate
    for one training step. Integer inputs are tokens below the model's smallest vocabulary."""
    name, t = m.input_types[0]
    shape = (batch,) + tuple(int(d) for d in t.shape[1:])
    x = rng.integers(0, 17, shape).astype(np.int32) if t.dtype.value == "i32" else \
        rng.random(shape, dtype=np.float32)
    feeds = {name: x, "lr": np.float32(0.01), "valid_rows": np.int32(batch)}  # every row is real
    g = m.built("train").graph
    if g.inputs("label"):
        lt = g.node(g.inputs("label")[0]).attrs["type"]
        lshape = (batch,) + tuple(int(d) for d in lt.shape[1:])
        if lt.dtype.value == "i32":
            classes = m.built("eval").graph.node(m.built("eval").graph.outputs["output"]).type.shape[-1]
            feeds["label"] = rng.integers(0, classes, lshape).astype(np.int32)
        else:
            feeds["label"] = rng.random(lshape, dtype=np.float32)
    for c in m.built("train").carries:
        feeds[c.input] = rng.uniform(-0.5, 0.5, (batch,) + tuple(int(d) for d in c.type.shape[1:])).astype(np.float32)
    return feeds
