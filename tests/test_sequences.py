"""Sequence models end to end: several results and unpacking, initial and final states,
masks of padded steps (in the recurrent layers, the losses and accuracy), per-step
losses, state carried from batch to batch, integer sequence data, and the two sequence
examples (sentiment_lstm, char_lm) training on both targets.

The layers' options against numpy, with finite-difference gradients, are op-table rows
(tests/op_table.py: state_row, the mask_zero and per-step cross_entropy rows); the
mistakes a program can make are in tests/errors/. Here: what the language and the
runtime make of them.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dlc
from dlc.data.sources import stream_batches
from dlc.language.syntax.parse import parse
from dlc.language.syntax.printer import format_ast
from dlc.runtime.prepare import prepare

import example_models
from op_table import np_cross_entropy, np_gru, np_lstm, np_recurrent

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES / "data"))
import make_sequences  # noqa: E402  (the examples' data generator)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DLC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def tokens(n, steps, vocab, seed=0, min_len=1):
    """i32 [n, steps]: 1..vocab-1 then 0 padding, lengths min_len..steps."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, steps + 1, n)
    x = rng.integers(1, vocab, (n, steps)).astype(np.int32)
    x[np.arange(steps)[None, :] >= lengths[:, None]] = 0
    return x


# --- syntax --------------------------------------------------------------------------------------------

SEVERAL = """
block enc(x: f32[B, T, F], h0: f32[B, H]) -> (f32[B, T, H], h: f32[B, H]) {
    y, h = gru(x, H, return_sequences=true, initial=h0, return_state=true)
    return y, h
}

model m(x: f32[B, 5, 3]) -> (f32[B, 4], h: f32[B, 4], c: f32[B, 4]) {
    pair = (x, x)
    h0 = x[:, 0] |> dense(4) |> tanh
    y, h = enc(x, h0)
    return lstm(y, 4, return_state=true)        # (out, (h, c)): flattened into three results
}
"""


def test_the_syntax_of_several_results_unpacking_tuples_and_state():
    program = parse(SEVERAL + "\nmodel s(x: f32[B, 2]) -> f32[B, 2] { state h: f32[B, 2] = constant(0.5)\n"
                    "h = h + x  return h }")
    text = format_ast(program)
    assert "block enc(x: f32[B, T, F], h0: f32[B, H]) -> (f32[B, T, H], h: f32[B, H])" in text
    assert "  unpack y, h  @" in text and "  assign pair" in text and "tuple  @" in text
    assert "  state h: f32[B, 2]  @" in text and "init=" in text
    d = program.defs[1]
    assert d.n_results == 3 and [r.name for r in d.more] == ["h", "c"]


def test_state_is_a_keyword_only_where_a_statement_starts():
    m = dlc.load("model m(state: f32[B, 3]) -> f32[B, 3] { h = state * 2.0  return h }")
    np.testing.assert_allclose(m.forward(np.ones((2, 3))), 2.0)


def test_a_model_returns_named_results_and_a_block_returns_a_tuple():
    m = dlc.load(SEVERAL, model="m")
    built = m.built("eval")
    assert [name for name, _ in built.results] == ["h", "c"]
    assert {"output", "output:h", "output:c"} <= set(built.graph.outputs)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 5, 3)).astype(np.float32)
    r = m.forward(x, results=True)
    assert set(r) == {"output", "h", "c"} and r["h"].shape == (3, 4)
    np.testing.assert_array_equal(r["output"], r["h"])  # an lstm's output is its last h
    p = {k: v.astype(np.float64) for k, v in m.params.items()}
    h0 = np.tanh(x[:, 0] @ p["h0.w"] + p["h0.b"])
    y = np_gru(x, p["y.y.w"], p["y.y.u"], p["y.y.b"], p["y.y.bh"], True, h0=h0)
    hs, (h, c) = np_lstm(y, p["out.w"], p["out.u"], p["out.b"], full=True)
    np.testing.assert_allclose(r["h"], h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["c"], c, rtol=1e-5, atol=1e-6)


def test_training_steps_compute_no_named_results():
    src = SEVERAL + "\ntrain m { data = arrays()  loss = mse(output, label) }"
    m = dlc.load(src, model="m")
    assert not [k for k in m.built("train").graph.outputs if k.startswith("output:")]
    assert not [k for k in m.compile_graph("train").outputs if k.startswith("output:")]


# --- masks ---------------------------------------------------------------------------------------------

MASKED = """
model m(x: i32[B, {T}]) -> f32[B, {out}] {{
    e = embedding(x, 20, 6, mask_zero=true)
    e = e |> dense(5) |> relu
    e = dropout(e * 2.0 - 0.5, 0.3)
    return {layer}
}}
"""


@pytest.mark.parametrize("layer, out", [("gru(e, 4)", "4"), ("lstm(e, 3, bidirectional=true)", "6"),
                                        ("rnn(e, 3, layers=2)", "3")])
def test_the_mask_of_padding_travels_from_embedding_to_the_recurrent_layer(layer, out):
    """Through dense, relu, arithmetic and dropout (the identity in evaluation): the layer
    follows x != 0, as with an explicit mask=padding_mask(x)."""
    m = dlc.load(MASKED.format(T=7, out=out, layer=layer))
    x = tokens(5, 7, 20, seed=1)
    p = {k: v.astype(np.float64) for k, v in m.params.items()}
    e = np.maximum(p["e.table"][x] @ p["e_2.w"] + p["e_2.b"], 0.0) * 2.0 - 0.5
    name = layer.split("(")[0]
    params = {k.removeprefix("out."): v for k, v in p.items() if k.startswith("out.")}
    options = {"bidirectional": "bidirectional" in layer, "layers": 2 if "layers=2" in layer else 1}
    want = np_recurrent(name, e, params, mask=x != 0, **options)
    np.testing.assert_allclose(m.forward(x), want, rtol=1e-5, atol=1e-6)
    explicit = dlc.load(MASKED.format(T=7, out=out, layer=layer.replace(")", ", mask=padding_mask(x))"))
                        .replace("mask_zero=true", "mask_zero=false"))
    explicit.state.update(m.state)
    np.testing.assert_allclose(explicit.forward(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", ["lstm(e, 4)", "gru(e, 4, bidirectional=true)",
                                   "rnn(e, 3, return_sequences=true)[:, 0]"])
def test_padding_changes_nothing(layer):
    """The same reviews padded to 6 or to 15 steps give the same result."""
    src = "model m(x: i32[B, {T}]) -> f32[B, K] {{ e = embedding(x, 30, 5, mask_zero=true)  return " + layer + " }}"
    short, long = dlc.load(src.format(T=6)), dlc.load(src.format(T=15))
    long.state.update(short.state)
    x = tokens(4, 6, 30, seed=2)
    padded = np.concatenate([x, np.zeros((4, 9), np.int32)], axis=1)
    np.testing.assert_allclose(long.forward(padded), short.forward(x), rtol=1e-6, atol=1e-7)


def test_padded_steps_output_zeros_and_masked_sequences_keep_their_mask():
    src = """model m(x: i32[B, 6]) -> f32[B, 6, 3] {
        y = embedding(x, 10, 4, mask_zero=true) |> gru(5, return_sequences=true) |> lstm(3, return_sequences=true)
        return y
    }"""
    m = dlc.load(src)
    x = tokens(4, 6, 10, seed=3)
    y = m.forward(x)
    assert np.all(y[x == 0] == 0.0) and np.all(np.abs(y[x != 0]).sum(axis=-1) > 0)
    p = {k: v.astype(np.float64) for k, v in m.params.items()}
    g = np_gru(p["y.embedding.table"][x], *(p[f"y.gru.{k}"] for k in ("w", "u", "b", "bh")), True, mask=x != 0)
    want = np_lstm(g, *(p[f"y.lstm.{k}"] for k in ("w", "u", "b")), True, mask=x != 0)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


PER_STEP = """
model tagger(x: i32[B, 8]) -> f32[B, 8, 5] {
    h = embedding(x, 12, 6, mask_zero=true) |> gru(7, return_sequences=true)
    return dense(h, 5)
}
train tagger {
    data = arrays()
    loss = cross_entropy(output, label)
    batch = 64
}
"""


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_per_step_cross_entropy_and_accuracy_count_the_real_steps_only(target):
    m = dlc.load(PER_STEP)
    label = m.built("train").graph.node(m.built("train").graph.inputs("label")[0]).attrs["type"]
    assert str(label) == "i32[B,8]"
    x = tokens(6, 8, 12, seed=4)
    y = np.random.default_rng(5).integers(0, 5, (6, 8)).astype(np.int32)
    z = m.forward(x).astype(np.float64)
    got = m.evaluate(x, y, target=target)
    keep = x != 0
    np.testing.assert_allclose(got["loss"], np_cross_entropy(z, y, keep), rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"], np.mean((z.argmax(-1) == y)[keep]), rtol=1e-6)
    # the padded steps' labels do not matter
    y2 = np.where(keep, y, (y + 1) % 5)
    assert m.evaluate(x, y2, target=target) == pytest.approx(got, rel=1e-6)


@pytest.mark.filterwarnings("ignore::dlc.core.diagnostics.DlcWarning")  # (cross_entropy of a softmax)
@pytest.mark.parametrize("norm, masked", [("layernorm", True), ("layernorm(axis=1)", False),
                                          ("softmax", True), ("softmax(axis=1)", False)])
def test_a_function_over_the_time_axis_drops_the_mask(norm, masked):
    """layernorm and softmax over the features keep the padding mask; over time they mix the
    padded steps into every step, so the mask (and the loss's skipping of them) is dropped."""
    m = dlc.load(PER_STEP.replace("return dense(h, 5)", f"return dense(h, 5) |> {norm}"))
    x = tokens(6, 8, 12, seed=4)
    y = np.random.default_rng(5).integers(0, 5, (6, 8)).astype(np.int32)
    y2 = np.where(x != 0, y, (y + 1) % 5)  # other labels on the padded steps only
    same = m.evaluate(x, y2) == pytest.approx(m.evaluate(x, y), rel=1e-6)
    assert same == masked


def test_a_loss_mask_given_explicitly():
    src = PER_STEP.replace("mask_zero=true", "mask_zero=false").replace(
        "cross_entropy(output, label)", "cross_entropy(output, label, mask=padding_mask(x, pad=3))")
    m = dlc.load(src)
    x = tokens(6, 8, 12, seed=6)
    y = np.random.default_rng(7).integers(0, 5, (6, 8)).astype(np.int32)
    z = m.forward(x).astype(np.float64)
    got = m.evaluate(x, y, target="reference")
    np.testing.assert_allclose(got["loss"], np_cross_entropy(z, y, x != 3), rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"], np.mean((z.argmax(-1) == y)[x != 3]), rtol=1e-6)


# --- state carried from batch to batch -----------------------------------------------------------------

COUNTER = """
model count(x: f32[B, 2]) -> (f32[B, 2], seen: f32[B, 1]) {
    state s: f32[B, 1] = constant(10)
    param w: f32[2] = ones
    s = s + 1.0
    return x * w, s
}
train count {
    data = arrays()
    loss = mse(output, label)
    optimizer = sgd(lr=1e-3)
    batch = 4
}
"""


def test_stream_batches_continue_each_other_row_by_row():
    assert [list(i) for i in stream_batches(10, 4)] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert [list(i) for i in stream_batches(10, 4, every=True)] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [list(i) for i in stream_batches(5, 4, every=True)] == [[0, 2, 4], [1, 3]]
    assert [list(i) for i in stream_batches(3, 8)] == [[0, 1, 2]]
    for n, b in [(7, 3), (64, 16), (50, 7)]:
        seen = np.concatenate(list(stream_batches(n, b, every=True)))
        assert sorted(seen) == list(range(n))


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_state_is_carried_between_batches_and_starts_again_every_epoch(target):
    m = dlc.load(COUNTER)
    assert m.train_config.shuffle is False  # a model with state reads its batches in order
    x = np.ones((10, 2), np.float32)
    seen = []
    m.fit(x, x, epochs=2, test=0.0, target=target,
          on_epoch=lambda r: seen.append(m.session(m.train_config, target)._carried["s"].copy()))
    # 10 samples in batches of 4: two full batches a pass, from 10 at each epoch's start
    for s in seen:
        np.testing.assert_array_equal(s, np.full((4, 1), 12.0))
    r = m.predict(np.zeros((10, 2)), results=True, target=target)  # streams [0, 3, 6, 9], ...
    np.testing.assert_array_equal(r["seen"][:, 0], [11, 12, 13, 11, 12, 13, 11, 12, 13, 11])
    np.testing.assert_array_equal(r["output"], np.zeros((10, 2)))


def test_a_held_out_share_of_a_model_with_state_is_the_end_of_the_data():
    m = dlc.load(COUNTER)
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    data, _ = prepare(m, m.train_config, None, Path.cwd(), 0, arrays=(x, x))
    np.testing.assert_array_equal(data.x_train, x[:10])  # arrays(): no share held out
    cfg = m.train_config
    cfg = type(cfg)(**{**cfg.__dict__, "data": dlc.language.recipe.Spec("data", "arrays", {"test": 0.3})})
    data, _ = prepare(m, cfg, None, Path.cwd(), 0, arrays=(x, x))
    np.testing.assert_array_equal(data.x_train, x[:7])
    np.testing.assert_array_equal(data.x_test, x[7:])


STATEFUL_GRU = """
model lm(x: i32[B, {T}]) -> (f32[B, {T}, 3], h: f32[B, 5]) {{
    state h: f32[B, 5]
    y, h = embedding(x, 9, 4) |> gru(5, return_sequences=true, initial=h, return_state=true)
    return dense(y, 3), h
}}
train lm {{ data = arrays()  loss = cross_entropy(output, label)  batch = 1 }}
"""


def test_windows_read_with_carried_state_equal_one_long_sequence():
    """Truncated BPTT's forward pass: a text cut into windows and read with the state
    carried from window to window gives what reading it at once gives."""
    windows, whole = dlc.load(STATEFUL_GRU.format(T=4)), dlc.load(STATEFUL_GRU.format(T=12))
    whole.state.update(windows.state)
    text = np.random.default_rng(8).integers(0, 9, (1, 12)).astype(np.int32)
    got = windows.predict(text.reshape(3, 4), batch=1, results=True, target="reference")
    want = whole.predict(text, batch=1, results=True, target="reference")
    np.testing.assert_allclose(got["output"].reshape(1, 12, 3), want["output"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["h"][-1], want["h"][0], rtol=1e-5, atol=1e-6)


# --- integer sequence data -----------------------------------------------------------------------------

def test_npz_of_padded_token_sequences_with_per_token_labels(tmp_path):
    x = tokens(20, 8, 12, seed=9)
    y = np.random.default_rng(10).integers(0, 5, (20, 8)).astype(np.int64)
    np.savez(tmp_path / "tags.npz", tokens=x, tags=y)
    (tmp_path / "t.dln").write_text(PER_STEP.replace("arrays()", 'npz("tags.npz", x="tokens", y="tags", test=0.25)'))
    m = dlc.load(tmp_path / "t.dln")
    session = m.session(m.train_config, "reference")
    data, _ = prepare(m, m.train_config, session._label_type(), tmp_path, 0)
    assert data.x_train.dtype == np.int32 and data.x_train.shape == (15, 8)
    assert data.y_train.dtype == np.int32 and data.y_train.shape == (15, 8)
    h = m.fit(epochs=3, target="reference")
    assert h.epochs[-1]["train_loss"] < h.epochs[0]["train_loss"]
    y[3, 2] = 7  # past the 5 classes
    np.savez(tmp_path / "tags.npz", tokens=x, tags=y)
    with pytest.raises(dlc.DlcError, match="class labels must lie in 0..4"):
        dlc.load(tmp_path / "t.dln").fit(epochs=1, target="reference")


def test_predict_writes_the_named_results(tmp_path):
    m = dlc.load(SEVERAL, model="m")
    (tmp_path / "m.dln").write_text(SEVERAL + "\ntrain m { data = arrays()  loss = mse(output, label) }")
    dlc.load(tmp_path / "m.dln").save(tmp_path / "w.npz")
    np.save(tmp_path / "x.npy", np.ones((3, 5, 3), np.float32))
    r = subprocess.run([sys.executable, "-m", "dlc", "predict", str(tmp_path / "m.dln"), "--weights",
                        str(tmp_path / "w.npz"), "--input", str(tmp_path / "x.npy"), "--target", "reference",
                        "-o", str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "out.npz") as z:
        assert {"output", "h", "c"} <= set(z.files) and z["h"].shape == (3, 4)
        assert "classes" not in z.files  # an mse model's outputs are no class scores
    assert m  # the model checks without a train block too


# --- the examples ------------------------------------------------------------------------------------

def _shortened(stem: str, steps: int) -> dlc.Model:
    text = example_models.source(EXAMPLES / f"{stem}.dln", short=False)
    for old, _ in example_models.SHORTER[stem]:
        text = text.replace(old, old.replace({"sentiment_lstm": "200", "char_lm": "40"}[stem], str(steps)))
    return dlc.load(text)


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_sentiment_example_learns_shortened(target):
    m = _shortened("sentiment_lstm", 10)
    x, y = make_sequences.reviews(n=96, steps=10, min_len=3, seed=1)
    h = m.fit(x, y, epochs=4, batch=16, test=0.0, target=target)
    losses = [e["train_loss"] for e in h.epochs]
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_char_lm_example_learns_shortened_with_its_state_carried(target):
    m = _shortened("char_lm", 6)
    x, y = make_sequences.char_windows(n=128, steps=6, seed=1)
    h = m.fit(x, y, epochs=3, test=0.0, target=target)
    losses = [e["train_loss"] for e in h.epochs]
    assert losses[-1] < losses[0], losses
    carried = m.session(m.train_config, target)._carried["h"]
    assert carried.shape == (16, 96) and np.any(carried != 0)


@pytest.mark.slow
@pytest.mark.parametrize("stem, target", [("sentiment_lstm", "reference"), ("sentiment_lstm", "cpu"),
                                          ("char_lm", "reference"), ("char_lm", "cpu")])
def test_sequence_examples_learn_on_their_data(stem, target):
    """The examples as written (200 and 40 steps): two epochs on their data."""
    m = dlc.load(EXAMPLES / f"{stem}.dln")
    h = m.fit(epochs=2, target=target)
    assert h.epochs[-1]["train_loss"] < h.epochs[0]["train_loss"], h.epochs


# --- with the training workflow: validation, reports, the pipelined fit loop, one compile per size ----

def test_the_validation_share_of_a_model_with_state_ends_its_training_split():
    m = dlc.load(COUNTER)
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    cfg = m.train_config
    cfg = type(cfg)(**{**cfg.__dict__, "data": dlc.language.recipe.Spec("data", "arrays", {"test": 0.3})})
    data, _ = prepare(m, cfg, None, Path.cwd(), 0, arrays=(x, x), validation=0.25)
    # in order: train x[:5], validation (round(7 * 0.25) = 2 samples) x[5:7], test x[7:]
    np.testing.assert_array_equal(data.x_train, x[:5])
    np.testing.assert_array_equal(data.x_val, x[5:7])
    np.testing.assert_array_equal(data.x_test, x[7:])


def test_fit_refuses_to_shuffle_a_model_with_state():
    x = np.ones((10, 2), np.float32)
    with pytest.raises(dlc.DlcError, match="reads its batches in order"):
        dlc.load(COUNTER).fit(x, x, test=0.0, shuffle=True, target="reference")


def test_carried_state_continues_from_the_step_submitted_before(monkeypatch):
    """The fit loop runs steps ahead of the results it has read (a GPU's results arrive late):
    each step's state still comes from the step before it, so training is the same."""
    from dlc.runtime import trainer
    x, y = make_sequences.char_windows(n=64, steps=4, seed=1)

    def train(late: bool):
        if late:  # 4 steps an epoch, all submitted before the first is read
            monkeypatch.setattr(trainer.Pending, "ready", lambda self: False)
        m = _shortened("char_lm", 4)
        h = m.fit(x, y, epochs=2, test=0.0, target="reference")
        return h["train_loss"], {k: v.copy() for k, v in m.params.items()}
    (now, params_now), (late, params_late) = train(False), train(True)
    assert late == now
    for k in params_now:
        np.testing.assert_array_equal(params_late[k], params_now[k], err_msg=k)


def test_the_classification_report_of_per_step_outputs_scores_every_position():
    m = _shortened("char_lm", 6)
    x, y = make_sequences.char_windows(n=40, steps=6, seed=2)
    report = m.classification_report(x, y, target="reference")
    assert report["samples"] == 40 * 6 and report["classes"] == 29
    assert report["accuracy"] == pytest.approx(m.evaluate(x, y, target="reference")["accuracy"], abs=1e-6)
    assert np.asarray(report["confusion"]).sum() == 40 * 6


def test_the_classification_report_refuses_a_loss_that_skips_masked_steps():
    m = dlc.load("""
model tagger(x: i32[B, 8]) -> f32[B, 8, 5] {
    h = embedding(x, 12, 4, mask_zero=true) |> lstm(4, return_sequences=true)
    return dense(h, 5)                            # masked: the loss skips the padding
}
train tagger { data = arrays()  loss = cross_entropy(output, label)  batch = 4 }
""")
    assert m.masks_positions and not dlc.load(COUNTER).masks_positions
    x = tokens(6, 8, 12, seed=3)
    y = np.zeros((6, 8), np.int32)
    with pytest.raises(dlc.DlcError, match="keeps only the unmasked steps"):
        m.classification_report(x, y, target="reference")


@pytest.mark.parametrize("masked", [True, False])
def test_every_batch_size_a_run_needs_is_compiled_before_the_first_step(monkeypatch, masked):
    """Every size a run needs is compiled before training starts, not in the middle of an
    epoch. A model with state is masked like any other (mask_batch follows the rows through
    its loops and its carried state): the last batches of the validation and test splits
    run padded on the training batch's program. Where the pass cannot prove a model (here
    made to give up), the training batch and those last batches are compiled at their own
    sizes, all before the first step."""
    from dlc.passes import mask_batch
    from dlc.program import CompiledProgram
    from dlc.runtime import trainer
    if not masked:
        monkeypatch.setattr(mask_batch, "mask_batch", lambda graph, ctx=None: graph)
    started, compiled = [], []
    submit, compile_ = trainer.Session.submit, CompiledProgram.compiled
    monkeypatch.setattr(trainer.Session, "submit", lambda self, *a: (started.append(1), submit(self, *a))[1])
    monkeypatch.setattr(CompiledProgram, "compiled", lambda self, batch, **kw: (
        compiled.append((batch, bool(started))), compile_(self, batch, **kw))[1])
    m = _shortened("char_lm", 4)
    x, y = make_sequences.char_windows(n=50, steps=4, seed=1)
    # in order: 40 to train on, 10 to test; validation: the last 8 of the 40; batches of 16
    h = m.fit(x, y, epochs=2, test=0.2, validation=0.2, target="cpu", no_cache=True)
    assert len(h) == 2 and h.test and "val_loss" in h.epochs[0]
    assert sorted(compiled) == ([(16, False)] if masked else [(8, False), (10, False), (16, False)])


def test_the_shipped_data_is_what_the_generator_writes(tmp_path):
    with np.load(EXAMPLES / "data" / "reviews.npz") as z:
        tokens_, label = make_sequences.reviews()
        np.testing.assert_array_equal(z["tokens"], tokens_)
        np.testing.assert_array_equal(z["label"], label)
        assert z["tokens"].dtype == np.int32 and z["tokens"].shape == (1000, 200)
    with np.load(EXAMPLES / "data" / "text.npz") as z:
        x, y = make_sequences.char_windows()
        np.testing.assert_array_equal(z["x"], x)
        np.testing.assert_array_equal(z["y"], y)
        np.testing.assert_array_equal(z["x"][1:, 0], z["y"][:-1, -1])  # window i+1 continues window i


LAYER_BEFORE_LSTM = """model net(x: f32[B, 6, 5]) -> f32[B, 3] {{
    param w: f32[5, 4] = normal(0, 0.5)
    h = {first} |> lstm(8{bidirectional})
    return dense(h, 3)
}}
train net {{
    data = arrays()
    loss = cross_entropy(output, label)
    optimizer = adam(lr=0.01)
    batch = 4
}}
"""


@pytest.mark.parametrize("first, bidirectional, threads", [
    ("dense(x, 4) |> relu", "", 1), ("dense(x, 4) |> relu", "", 2), ("x @ w", ", bidirectional=true", 2)])
def test_a_layer_before_a_recurrent_layer_trains_as_on_the_reference(first, bidirectional, threads):
    """A matmul over [B, T, F] read by a recurrent layer, which permutes it to [T, B, F]:
    the permuted bias add is no epilogue of the matmul's register tiles (it read other
    tiles' rows: every batch but the first row was wrong, the loss 1.080 for 1.004), so
    training and prediction on the CPU agree with the reference."""
    src = LAYER_BEFORE_LSTM.format(first=first, bidirectional=bidirectional)
    rng = np.random.default_rng(0)
    x = rng.random((4, 6, 5)).astype(np.float32)
    y = rng.integers(0, 3, 4).astype(np.int32)
    runs = {}
    for target in ("reference", "cpu"):
        m = dlc.load(src)
        options = {"no_cache": True, "threads": threads} if target == "cpu" else {}
        session = m.session(m.train_config, target, **options)
        losses = [session.train_step(x, y, 0.01)["loss"] for _ in range(3)]
        runs[target] = losses, m.predict(x, target=target, **options), {k: v.copy() for k, v in m.state.items()}
    np.testing.assert_allclose(runs["cpu"][0], runs["reference"][0], rtol=1e-5)
    np.testing.assert_allclose(runs["cpu"][1], runs["reference"][1], rtol=1e-4, atol=1e-5)
    for k, want in runs["reference"][2].items():
        np.testing.assert_allclose(runs["cpu"][2][k], want, rtol=1e-4, atol=1e-5, err_msg=k)
