"""Training end to end: accuracy targets, every example learns, resume is bit-identical,
checkpoints are checked, dropout and batchnorm behave in evaluation, Ctrl-C saves."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dlc
from dlc.core import ops
from dlc.core.diagnostics import CheckpointError, NumericsError
from dlc.runtime import trainer
from dlc.runtime.checkpoint import load_checkpoint, save_checkpoint
from dlc.runtime.trainer import Interrupted

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DLC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def test_digits_mlp_reaches_95_percent():
    m = dlc.load(EXAMPLES / "digits_mlp.dln")
    history = m.fit()
    assert history.test["accuracy"] >= 0.95, history.test


def test_lenet_reaches_97_percent():
    m = dlc.load(EXAMPLES / "lenet5.dln")
    history = m.fit()
    assert history.test["accuracy"] >= 0.97, history.test


# sequence models over their whole data take minutes on the reference interpreter: shortened,
# they learn on both targets in tests/test_sequences.py
LONG = ("sentiment_lstm", "char_lm")


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.stem in LONG else [])
                                  for p in sorted(EXAMPLES.glob("*.dln"))])
def test_every_example_learns(path):
    """Two epochs on the reference backend: the training loss falls."""
    m = dlc.load(path)
    history = m.fit(epochs=2, target="reference")
    first, last = history.epochs[0]["train_loss"], history.epochs[-1]["train_loss"]
    assert last < first, (first, last)


def test_resume_is_bit_identical(tmp_path):
    path = EXAMPLES / "digits_mlp.dln"  # dropout: the random stream must resume too
    straight = dlc.load(path)
    straight.fit(epochs=4)
    first = dlc.load(path)
    first.fit(epochs=2, save=tmp_path / "half.npz")
    second = dlc.load(path)
    history = second.fit(epochs=4, resume=tmp_path / "half.npz")
    assert [e["epoch"] for e in history.epochs] == [3, 4]
    for name, value in straight.params.items():
        np.testing.assert_array_equal(second.params[name], value, err_msg=name)


@pytest.mark.parametrize("damage", ["truncate", "flip", "other_model"])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    m = dlc.load(EXAMPLES / "digits_mlp.dln")
    ck = tmp_path / "ck.npz"
    m.save(ck)
    if damage == "truncate":
        ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(ck.read_bytes())
        data[len(data) // 2] ^= 0x5A
        ck.write_bytes(bytes(data))
    else:
        dlc.load(EXAMPLES / "lenet5.dln").save(ck)
    with pytest.raises(CheckpointError):
        dlc.load(EXAMPLES / "digits_mlp.dln").load_weights(ck)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """digits_mlp after one epoch of Adam: parameters, moments, step and normalization."""
    path = tmp_path_factory.mktemp("trained") / "ck.npz"
    cache = tmp_path_factory.getbasetemp() / "cache"  # the autouse _cache fixture is not set up yet
    dlc.load(EXAMPLES / "digits_mlp.dln").fit(epochs=1, save=path, cache_dir=str(cache))
    return path


def _edited(path, tmp_path, arrays=None, meta=None):
    """A copy of the checkpoint at `path` with some tensors and metadata replaced or removed."""
    old_arrays, old_meta = load_checkpoint(path)
    new = tmp_path / "edited.npz"
    save_checkpoint(new, {k: v for k, v in {**old_arrays, **(arrays or {})}.items() if v is not None},
                    {k: v for k, v in {**old_meta, **(meta or {})}.items() if v is not None})
    return new


@pytest.mark.parametrize("meta, shown", [({"epoch": None}, "`epoch` is missing"),
                                         ({"epoch": "3"}, "`epoch` is '3'"),
                                         ({"batch": -1}, "`batch` is -1"),
                                         ({"step": 2.5}, "`step` is 2.5"),
                                         ({"batch": True}, "`batch` is True")])
def test_resume_from_damaged_metadata_is_one_clear_error(trained_checkpoint, tmp_path, meta, shown):
    ck = _edited(trained_checkpoint, tmp_path, meta=meta)
    with pytest.raises(CheckpointError, match=f"{ck}` has damaged metadata: {shown}, not a non-negative"):
        dlc.load(EXAMPLES / "digits_mlp.dln").fit(epochs=2, resume=ck)


@pytest.mark.parametrize("tensor, shown", [
    (np.zeros((128, 64), np.float32), "tensor `h.w:m`: checkpoint has f32[128,64], model expects f32[64,128]"),
    (np.zeros((64, 128), np.float64), "tensor `h.w:m`: checkpoint has f64[64,128], model expects f32[64,128]"),
    (None, None),  # absent moments are allowed: weights saved before training with Adam
])
def test_resume_checks_optimizer_state_shapes_and_dtypes(trained_checkpoint, tmp_path, tensor, shown):
    ck = _edited(trained_checkpoint, tmp_path, arrays={"h.w:m": tensor})
    m = dlc.load(EXAMPLES / "digits_mlp.dln")
    if shown is None:
        assert m.fit(epochs=2, resume=ck).epochs[-1]["epoch"] == 2
        return
    before = {k: v.copy() for k, v in m.state.items()}
    with pytest.raises(CheckpointError, match=re.escape(shown)):
        m.fit(epochs=2, resume=ck)
    assert m.state.keys() == before.keys()  # nothing half-loaded
    for k, v in before.items():
        np.testing.assert_array_equal(m.state[k], v)


def test_weights_saved_before_training_resume_on_each_target_alike(tmp_path):
    """A checkpoint with no optimizer state and no step counter (what `dlc import` and
    Model.save before fit write) resumes: the reference target once refused it, since its
    session makes the counter before the checkpoint is read."""
    path = EXAMPLES / "logreg.dln"
    dlc.load(path).save(tmp_path / "w.npz")
    losses = [dlc.load(path).fit(epochs=2, resume=tmp_path / "w.npz", target=t).epochs[-1]["train_loss"]
              for t in ("reference", "cpu")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_optimizer_state_of_an_unknown_parameter_is_refused(trained_checkpoint, tmp_path):
    ck = _edited(trained_checkpoint, tmp_path, arrays={"hidden.w:m": np.zeros((64, 128), np.float32)})
    with pytest.raises(CheckpointError, match="unexpected tensor `hidden.w:m`"):
        dlc.load(EXAMPLES / "digits_mlp.dln").load_weights(ck)


@pytest.mark.parametrize("name, value, shown", [
    ("h.w", np.nan, "NaN values in `h.w`"),
    ("out.w:v", np.inf, "Inf values in `out.w:v`"),
    ("data:scale", 0.0, "zero input normalization scale (`data:scale`)"),
    ("data:scale", np.inf, "Inf values in `data:scale`"),
    ("data:shift", np.nan, "NaN values in `data:shift`"),
])
def test_unusable_weights_are_refused_on_load(trained_checkpoint, tmp_path, name, value, shown):
    arrays, _ = load_checkpoint(trained_checkpoint)
    arrays[name].flat[0] = value
    ck = _edited(trained_checkpoint, tmp_path, arrays={name: arrays[name]})
    with pytest.raises(CheckpointError, match=re.escape(shown)):
        dlc.load(EXAMPLES / "digits_mlp.dln").load_weights(ck)


def test_save_and_load_round_trip(tmp_path):
    m = dlc.load(EXAMPLES / "digits_mlp.dln")
    m.fit(epochs=1)
    m.save(tmp_path / "w.npz")
    n = dlc.load(EXAMPLES / "digits_mlp.dln")
    n.load_weights(tmp_path / "w.npz")
    x = np.random.default_rng(0).random((5, 64)) * 16
    np.testing.assert_array_equal(m.predict(x), n.predict(x))


def test_weights_of_a_model_without_dropout_load_for_evaluation(tmp_path):
    """The step counter is created by the optimizer pass when no dropout needs it: loaded
    from a checkpoint it stays a scalar (it became [1], and evaluation failed)."""
    m = dlc.load(EXAMPLES / "logreg.dln")
    m.fit(epochs=1, target="reference", save=tmp_path / "w.npz")
    n = dlc.load(EXAMPLES / "logreg.dln")
    n.load_weights(tmp_path / "w.npz")
    assert n.state["step"].shape == ()
    assert n.evaluate(target="reference") == pytest.approx(m.evaluate(target="reference"))


def test_dropout_is_identity_in_evaluation():
    m = dlc.load(EXAMPLES / "digits_mlp.dln")
    assert not any(m.built("eval").graph.node(n).op is ops.RANDOM for n in m.built("eval").graph.ids())
    assert any(m.built("train").graph.node(n).op is ops.RANDOM for n in m.built("train").graph.ids())
    x = np.random.default_rng(0).random((4, 64)).astype(np.float32)
    np.testing.assert_array_equal(m.forward(x), m.forward(x))


def test_batchnorm_uses_running_statistics_in_evaluation():
    src = """
    model bn(x: f32[B, 3]) -> f32[B, 3] {
        return batchnorm(x, momentum=0.5)
    }
    train bn { data = arrays()  loss = mse(output, label)  optimizer = sgd(lr=1e-6)  batch = 8  epochs = 3 }
    """
    m = dlc.load(src)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(64, 3)) * [1, 2, 3] + [5, -1, 0]).astype(np.float32)
    m.fit(x, x, test=0.0)
    mean, var = m.state["out.running_mean"], m.state["out.running_var"]
    assert np.all(mean != 0) and np.all(var != 1)  # training moved them
    probe = rng.normal(size=(5, 3)).astype(np.float32)
    expected = (probe - mean) / np.sqrt(var + 1e-5) * m.params["out.gamma"] + m.params["out.beta"]
    np.testing.assert_allclose(m.predict(probe), expected, rtol=1e-5, atol=1e-5)


def test_ctrl_c_saves_a_checkpoint_and_resumes(tmp_path):
    m = dlc.load(EXAMPLES / "digits_mlp.dln")
    ck = tmp_path / "ck.npz"

    def stop(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt, match="saved") as info:  # what a notebook's Ctrl-C expects
        m.fit(epochs=5, save=ck, on_epoch=stop)
    assert isinstance(info.value, Interrupted) and "epoch 2" in str(info.value)
    resumed = dlc.load(EXAMPLES / "digits_mlp.dln")
    history = resumed.fit(epochs=5, resume=ck)
    assert history.epochs[0]["epoch"] == 3


def _ctrl_c(*args):
    raise KeyboardInterrupt  # what Ctrl-C raises while the first step compiles


def test_ctrl_c_before_the_first_step_leaves_the_checkpoint_alone(tmp_path, monkeypatch):
    ck = tmp_path / "ck.npz"
    dlc.load(EXAMPLES / "digits_mlp.dln").save(ck)
    before = ck.read_bytes()
    monkeypatch.setattr(trainer.Session, "submit", _ctrl_c)
    with pytest.raises(Interrupted, match=f"before the first training step; {ck} left as it was"):
        dlc.load(EXAMPLES / "digits_mlp.dln").fit(epochs=1, save=ck)
    assert ck.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]


def test_fit_keeps_an_existing_checkpoint_as_prev(tmp_path):
    ck, prev = tmp_path / "ck.npz", tmp_path / "ck.prev.npz"
    dlc.load(EXAMPLES / "digits_mlp.dln").save(ck)
    before = ck.read_bytes()
    history = dlc.load(EXAMPLES / "digits_mlp.dln").fit(epochs=2, save=ck)
    assert history.previous == prev
    assert prev.read_bytes() == before  # the second epoch's save did not move the first one aside
    assert dlc.load(EXAMPLES / "digits_mlp.dln").load_weights(ck)["epoch"] == 2


def test_resuming_the_saved_file_moves_nothing_aside(tmp_path):
    ck = tmp_path / "ck.npz"
    dlc.load(EXAMPLES / "digits_mlp.dln").fit(epochs=1, save=ck)
    history = dlc.load(EXAMPLES / "digits_mlp.dln").fit(epochs=2, save=ck, resume=ck)
    assert history.previous is None and sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]


# Ctrl-C as the first step is submitted: the signal, then a wait the handler's
# KeyboardInterrupt ends (the interpreter runs handlers between bytecodes: without the
# wait, the code after the call could run first, with this fake's None for a step). The
# handler is set first: a process started in the background inherits SIGINT ignored.
_CTRL_C_WHILE_COMPILING = """
import os, signal, sys, time
from dlc.cli import main
from dlc.runtime.trainer import Session
signal.signal(signal.SIGINT, signal.default_int_handler)
Session.submit = lambda *args: (os.kill(os.getpid(), signal.SIGINT), time.sleep(60))
sys.exit(main(sys.argv[1:]))
"""


def test_cli_ctrl_c_while_compiling_keeps_the_trained_checkpoint(tmp_path):
    ck = tmp_path / "ck.npz"
    trained = dlc.load(EXAMPLES / "digits_mlp.dln")
    trained.fit(epochs=1, save=ck)
    before = ck.read_bytes()
    r = subprocess.run([sys.executable, "-c", _CTRL_C_WHILE_COMPILING, "run",
                        str(EXAMPLES / "digits_mlp.dln"), "--save", str(ck)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 130, r.stderr
    assert "before the first training step" in r.stderr and "Traceback" not in r.stderr
    assert ck.read_bytes() == before


def test_cli_save_onto_an_existing_checkpoint_keeps_it_as_prev(tmp_path):
    ck = tmp_path / "ck.npz"
    dlc.load(EXAMPLES / "digits_mlp.dln").save(ck)
    before = ck.read_bytes()
    r = subprocess.run([sys.executable, "-m", "dlc", "run", str(EXAMPLES / "digits_mlp.dln"),
                        "--epochs", "1", "--quiet", "--save", str(ck)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    prev = tmp_path / "ck.prev.npz"
    assert f"saved {ck} (the previous one is now {prev})" in r.stdout
    assert prev.read_bytes() == before and ck.read_bytes() != before


def test_nan_loss_on_cpu_names_the_step_and_the_op():
    src = """
    model bad(x: f32[B, 2]) -> f32[B, 2] {
        h = log(x)
        return h
    }
    train bad { data = arrays()  loss = mse(output, label)  optimizer = sgd(lr=0.1)  batch = 4 }
    """
    with pytest.warns(dlc.DlcWarning, match="`bad` has no trainable parameters"):
        m = dlc.load(src)
    session = m.session(m.train_config, "cpu")
    good = np.ones((4, 2), np.float32)
    session.train_step(good, good, 0.1)
    before = {k: v.copy() for k, v in m.state.items()}
    with pytest.raises(NumericsError) as info:
        session.train_step(-good, good, 0.1)
    assert "step 2" in info.value.message and info.value.span.line == 3
    for k, v in before.items():
        np.testing.assert_array_equal(m.state[k], v)  # the failed step changed nothing


def test_a_classification_loss_without_labels_trains_without_accuracy():
    """A bce or cross_entropy against a computed target never names `label`: the default
    metrics leave accuracy out (it built `label > 0.5` from no label: a TypeError traceback
    at load)."""
    for loss in ("bce(output, 0.0 * output + 0.5, from_logits=true)", "cross_entropy(output, softmax(output * 0.0))"):
        m = dlc.load("model m(x: f32[B, 4]) -> f32[B, 3] {\n    return dense(x, 3)\n}\n"
                     f"train m {{ data = iris()  loss = {loss}  epochs = 1 }}\n")
        assert m.train_config.metrics == ()
        history = m.fit(quiet=True)
        assert set(history.test) == {"loss"} and np.isfinite(history.test["loss"])


@pytest.mark.parametrize("loss", ["mae(output, label)", "huber(output, label)", "huber(output, label, delta=0.25)"])
def test_regression_losses_train_natively_as_on_the_reference(loss):
    """The robust regression losses (built from abs and minimum, whose gradients have kinks)
    train on the CPU as on the reference interpreter, and lower the loss."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(96, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]], np.float32) + 0.2 * rng.standard_cauchy((96, 1))).astype(np.float32)
    source = ("model reg(x: f32[B, 3]) -> f32[B, 1] { return x |> dense(8) |> elu |> dense(1) }\n"
              f"train reg {{ data = arrays()  loss = {loss}  optimizer = adam(lr=0.02)  batch = 16  epochs = 4 }}")
    runs = {}
    for target in ("cpu", "reference"):
        m = dlc.load(source)
        h = m.fit(x, y, target=target, quiet=True)
        runs[target] = h["train_loss"], m.params["out.dense.w"].copy()
    np.testing.assert_allclose(runs["cpu"][0], runs["reference"][0], rtol=1e-5)
    np.testing.assert_allclose(runs["cpu"][1], runs["reference"][1], rtol=1e-4, atol=1e-6)
    assert runs["cpu"][0][-1] < runs["cpu"][0][0]


@pytest.mark.parametrize("loss", ["hinge(output, label)", "hinge(output, 2.0 * label - 1.0, squared=true)"])
def test_a_linear_svm_trains_with_the_hinge_loss(loss):
    """A linear model trained with the hinge loss (an SVM's) separates the two blobs; labels
    of 0/1 count as -1/+1 (or are made so in the loss). Accuracy is the sign's agreement,
    and the classification report reads the outputs as scores: positive is class 1."""
    m = dlc.load(f"""model svm(x: f32[B, 2]) -> f32[B, 1] {{ return x |> dense(1) }}
train svm {{ data = csv("{Path(__file__).parent.parent / "examples" / "data" / "two_blobs.csv"}", label="label", test=0.25)
            loss = {loss} + 0.01 * l2(weights)  optimizer = sgd(lr=0.1)  batch = 16  epochs = 10 }}""")
    h = m.fit(quiet=True)
    assert h.test["accuracy"] >= 0.85 and h["train_loss"][-1] < h["train_loss"][0]
    report = m.classification_report()
    assert report["classes"] == 2 and report["accuracy"] == pytest.approx(h.test["accuracy"], abs=1e-6)
    with pytest.raises(dlc.DlcError, match="`hinge` trains scores, which are no probabilities"):
        m.predict_proba(np.zeros((2, 2), np.float32))


def test_multi_hinge_and_kl_div_train_classifiers():
    """multi_hinge (a multi-class SVM's loss) trains the digits with integer labels; kl_div
    trains a student towards a teacher's probabilities. Both score accuracy by the argmax,
    and on the CPU as on the reference interpreter."""
    source = ("model m(x: f32[B, 64]) -> f32[B, 10] { return x |> dense(10) }\n"
              "train m { data = digits(test=0.2)  loss = multi_hinge(output, label)  optimizer = sgd(lr=0.05, momentum=0.9)"
              "  batch = 32  epochs = 4 }")
    runs = {}
    for target in ("cpu", "reference"):
        m = dlc.load(source)
        h = m.fit(target=target, quiet=True)
        runs[target] = h["train_loss"], h.test["accuracy"]
    np.testing.assert_allclose(runs["cpu"][0], runs["reference"][0], rtol=1e-4)
    assert runs["cpu"][1] >= 0.9
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    logits = x @ rng.normal(size=(8, 4)).astype(np.float32)
    soft = np.exp(logits - logits.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    student = dlc.load("model s(x: f32[B, 8]) -> f32[B, 4] { return x |> dense(4) }\n"
                       "train s { data = arrays()  loss = kl_div(output, label)  optimizer = adam(lr=0.05)"
                       "  batch = 32  epochs = 30 }")
    h = student.fit(x, soft.astype(np.float32), quiet=True)
    assert h["train_loss"][-1] < 0.05 * h["train_loss"][0] and h.test["accuracy"] >= 0.9
    np.testing.assert_allclose(student.predict_proba(x[:4]), soft[:4], atol=0.05)
