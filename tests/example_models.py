"""The examples as the generic tests load them (tests/test_pipeline.py, test_backends.py,
test_backend_cpu.py, the CUDA tests), at their full shapes: recurrent layers are loops on
every target, so a step compiles in the same time whatever its number of time steps.
SHORTER lists how to shorten the sequence examples' time axis, for tests/test_sequences.py
(which trains them shortened, on small generated data); their full shapes are also trained
with their own data (`-m slow`).
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


def load(path: Path, short: bool = False) -> dlc.Model:
    """The example (with `short`, shortened if it is a long sequence model: its data is then
    not read)."""
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
