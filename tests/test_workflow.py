"""The training workflow users expect from Keras and Lightning: a validation split scored every
epoch and the test split once at the end, early stopping and keep_best, classification metrics,
Keras' keyword names, callbacks, predict_proba, the compiling line and the run's ETA, the
per-layer summary, warnings for likely mistakes, CSV and TensorBoard logs, the cyclic schedule,
frozen layers, and the perceptron (`step` + `perceptron()`)."""
from __future__ import annotations

import io
import json
import math
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

import dlc
from dlc.cli import main
from dlc.core.diagnostics import ArgumentError, DataError, DlcError, DlcWarning
from dlc.language import recipe
from dlc.runtime import metrics, trainer
from dlc.runtime.progress import Progress, format_duration, summary_line
from dlc.runtime.trainer import learning_rate

EXAMPLES = Path(__file__).parent.parent / "examples"

IRIS = """
model m(x: f32[B, 4]) -> f32[B, 3] {
    h = x |> dense(8) |> relu
    return dense(h, 3)
}
train m {
    data = iris(test=0.2)
    loss = cross_entropy(output, label)
    optimizer = adam(lr=0.02)
    batch = 16
    epochs = 4
    %s
}
"""


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DLC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def iris(extra: str = "") -> dlc.Model:
    return dlc.load(IRIS % extra)


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


# --- 1. validation, early stopping, keep_best, the test split once ---------------------------------

def test_validation_is_scored_every_epoch_and_the_test_split_once():
    m = iris("validation = 0.25")
    calls = []
    session_evaluate = trainer.Session.evaluate

    def counting(self, x, y, batch):
        calls.append(len(x))
        return session_evaluate(self, x, y, batch)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer.Session, "evaluate", counting)
        history = m.fit(target="reference")
    # iris: 150 samples, 30 held out for testing, 30 of the other 120 for validation
    assert calls == [30] * 4 + [30]
    assert all({"val_loss", "val_accuracy"} <= e.keys() and not any(k.startswith("test_") for k in e)
               for e in history.epochs)
    assert set(history.test) == {"loss", "accuracy"}
    assert history.test == pytest.approx(m.evaluate(target="reference"))


def test_validation_share_is_disjoint_and_the_normalization_ignores_it():
    from dlc.data.sources import Dataset
    from dlc.runtime.prepare import prepare, split_validation
    x = np.arange(100, dtype=np.float32)[:, None]
    data = split_validation(Dataset(x, x[:, 0], x[:0], x[:0, 0], "arrays", "none"), 0.2, Path("."), seed=5)
    train, val = set(data.x_train[:, 0]), set(data.x_val[:, 0])
    assert len(train) == 80 and len(val) == 20 and not train & val and train | val == set(x[:, 0])
    assert list(data.y_val) == list(data.x_val[:, 0])  # labels travel with their samples
    m = iris("validation = 0.25\n    normalize = \"standard\"")
    data, norm = prepare(m, m.train_config, None, m.base_dir, 0)
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (90, 30, 30)
    np.testing.assert_allclose(data.x_train.mean(axis=0), 0, atol=1e-5)  # fitted on the 90 only
    assert np.abs(data.x_val.mean(axis=0)).max() > 1e-3


def test_validation_from_another_data_source(tmp_path):
    rng = np.random.default_rng(3)
    xv, yv = rng.normal(size=(20, 4)).astype(np.float32), rng.integers(0, 3, 20)
    np.savez(tmp_path / "val.npz", x=xv, y=yv)
    m = dlc.load((IRIS % 'validation = npz("val.npz")\n    normalize = "none"').replace("epochs = 4", "epochs = 2"))
    m.base_dir = tmp_path
    history = m.fit(target="reference")
    assert history.epochs[-1]["val_loss"] == pytest.approx(m.evaluate(xv, yv, target="reference")["loss"])


def test_early_stop_stops_after_patience_epochs_without_improvement():
    # min_delta larger than any change: only the first epoch counts as an improvement
    m = iris("early_stop = early_stop(monitor=train_loss, patience=2, min_delta=100)")
    history = m.fit(epochs=10, target="reference")
    assert len(history) == 3
    assert history.stopped.startswith("stopped early: train_loss did not improve by more than 100 for 2 epochs")


def test_early_stop_on_val_loss_without_a_validation_split_is_one_clear_error():
    m = iris("early_stop = early_stop(patience=2)")
    with pytest.raises(ArgumentError, match="monitors `val_loss`, but there is no validation split") as info:
        m.fit(target="reference")
    assert info.value.span.line == 12 and "validation = 0.1" in info.value.hint
    with pytest.raises(ArgumentError, match="did you mean `val_accuracy`"):
        iris("validation = 0.2").fit(early_stop="early_stop(monitor=val_acuracy)", target="reference")


def test_keep_best_ends_with_and_saves_the_best_epochs_weights(tmp_path):
    # with min_delta 100 only epoch 1 improves: keep_best must restore it, not the last epoch's
    m = iris("validation = 0.25\n    early_stop = early_stop(patience=10, min_delta=100)\n    keep_best = true")
    snapshots = {}

    class Snapshot(dlc.Callback):
        def on_epoch_end(self, epoch, logs):
            snapshots[epoch] = {k: v.copy() for k, v in m.params.items()}
    ck = tmp_path / "best.npz"
    history = m.fit(target="reference", callbacks=[Snapshot()], save=ck)
    assert history.best_epoch == 1 and len(history) == 4
    for k, v in m.params.items():
        np.testing.assert_array_equal(v, snapshots[1][k])
        assert not np.array_equal(snapshots[4][k], snapshots[1][k])
    assert dlc.load(IRIS % "").load_weights(ck)["epoch"] == 1  # the file holds the best epoch too


def test_ctrl_c_with_keep_best_leaves_the_best_checkpoint(tmp_path):
    m = iris("validation = 0.25\n    early_stop = early_stop(patience=10, min_delta=100)\n    keep_best = true")
    ck = tmp_path / "best.npz"

    def stop(record):
        if record["epoch"] == 3:
            raise KeyboardInterrupt
    with pytest.raises(trainer.Interrupted, match=f"{ck} holds the best epoch so far \\(1\\)"):
        m.fit(target="reference", save=ck, on_epoch=stop)
    assert dlc.load(IRIS % "").load_weights(ck)["epoch"] == 1


def test_cli_options_and_their_exit_codes(tmp_path, capsys):
    src = tmp_path / "m.dln"
    src.write_text(IRIS % "")
    code, _, err = run(capsys, "run", src, "--early-stop", "early_stop(patience=0)", "--target", "reference")
    assert code == 1 and "--early-stop:1:1: error: `patience` must be a positive" in err
    code, _, err = run(capsys, "run", src, "--validation", "2", "--target", "reference")
    assert code == 1 and "`validation` must be a share" in err
    with pytest.raises(SystemExit) as info:
        main(["run", str(src), "--keep-best=yes"])
    assert info.value.code == 2
    code, out, err = run(capsys, "run", src, "--epochs", "3", "--validation", "0.25", "--keep-best", "--early-stop",
                         "early_stop(monitor=val_accuracy, patience=1, min_delta=100)", "--target", "reference")
    assert code == 0 and "stopped early: val_accuracy did not improve" in err and "kept the weights of epoch 1" in err
    assert "weights of epoch 1, stopped early" in out
    code, _, err = run(capsys, "run", src, "--epochs", "3", "--validation", "0.25", "--early-stop", "val_acc",
                       "--target", "reference")  # a bare metric: early_stop(monitor=...)
    assert code == 1 and "monitors `val_acc`" in err and "did you mean `val_accuracy`?" in err


def test_train_block_options_are_checked():
    for extra, message in [("validation = 1.5", "`validation` must be a share"),
                           ("early_stop = early_stop(patience=0)", "`patience` must be a positive"),
                           ("early_stop = early_stop(monitor=loss)", "`monitor` must name a per-epoch metric"),
                           ("keep_best = 1", "`keep_best` must be true or false")]:
        with pytest.raises(dlc.DlcError, match=re.escape(message)):
            iris(extra)


def test_classification_metrics_by_hand():
    outputs = np.array([[3, 1, 0], [0, 2, 1], [0, 3, 1], [1, 0, 2], [0, 1, 2]], np.float32)
    labels = np.array([0, 1, 2, 2, 1])
    r = metrics.classification_report(outputs, labels, "cross_entropy", top_k=2)
    assert r["confusion"] == [[1, 0, 0], [0, 1, 1], [0, 1, 1]]
    assert r["accuracy"] == pytest.approx(3 / 5)
    assert r["top_2_accuracy"] == pytest.approx(5 / 5)
    assert [c["precision"] for c in r["per_class"]] == pytest.approx([1, 0.5, 0.5])
    assert [c["recall"] for c in r["per_class"]] == pytest.approx([1, 0.5, 0.5])
    assert r["f1"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    binary = metrics.classification_report(np.array([[0.9], [0.2], [0.7]]), np.array([[1.0], [1.0], [0.0]]), "bce")
    assert binary["confusion"] == [[0, 1], [1, 1]] and "top_5_accuracy" not in binary


def test_cli_eval_reports_metrics_and_plot_draws_the_confusion_matrix(tmp_path, capsys):
    src = tmp_path / "m.dln"
    src.write_text(IRIS % "")
    ck, report, image = tmp_path / "w.npz", tmp_path / "r.json", tmp_path / "cm.png"
    assert run(capsys, "run", src, "--epochs", "2", "--save", ck, "-q", "--target", "reference")[0] == 0
    code, out, _ = run(capsys, "eval", src, "--weights", ck, "--top-k", "2", "-o", report, "--target", "reference")
    assert code == 0 and "top_2_accuracy" in out and "macro_f1" in out and "confusion matrix" in out
    saved = json.loads(report.read_text())
    assert np.sum(saved["confusion"]) == 30 and len(saved["per_class"]) == 3
    pytest.importorskip("matplotlib")
    assert run(capsys, "plot", report, "-o", image)[0] == 0 and image.stat().st_size > 1000


# --- 2. the Python API: Keras' names, callbacks, held-out data, probabilities -------------------------

def test_keras_names_mean_the_same_as_ours():
    a = iris().fit(batch=8, epochs=1, target="reference")
    b = iris().fit(batch_size=8, epochs=1, target="reference")
    assert a.epochs[0]["step"] == b.epochs[0]["step"] == 15 and a["train_loss"] == b["train_loss"]
    h = iris().fit(validation_split=0.25, epochs=1, target="reference")
    assert "val_loss" in h.epochs[0]
    with pytest.raises(ArgumentError, match="give `batch` or Keras' `batch_size`, not both"):
        iris().fit(batch=8, batch_size=8)
    with pytest.raises(ArgumentError, match="does not take Keras' `initial_epoch`") as info:
        iris().fit(initial_epoch=3)
    assert "resume=" in info.value.hint
    with pytest.raises(ArgumentError, match="unknown keyword `epoch`") as info:
        iris().fit(epoch=3)
    assert "`epochs`" in info.value.hint
    assert h.history["val_loss"] == h["val_loss"]  # History.history, Keras' dict of lists
    with pytest.raises(KeyError, match="dlc calls Keras' `loss` `train_loss`"):
        h["loss"]
    with pytest.raises(KeyError, match="did you mean `val_loss`"):
        h["val_los"]


def test_shuffle_keyword(monkeypatch):
    firsts = []
    step = trainer.Session.submit  # what the fit loop runs each step with
    monkeypatch.setattr(trainer.Session, "submit",
                        lambda self, x, y, lr: (firsts.append(x[0].copy()), step(self, x, y, lr))[1])
    m = iris()
    m.fit(epochs=2, shuffle=False, target="reference")
    np.testing.assert_array_equal(firsts[0], firsts[8])  # every epoch starts with the same sample
    firsts.clear()
    m.fit(epochs=2, target="reference")  # the train block's default: shuffled
    assert not np.array_equal(firsts[0], firsts[8])


def test_verbose_zero_is_quiet_and_one_shows_progress(capsys):
    iris().fit(epochs=1, verbose=0, target="reference")
    assert capsys.readouterr().err == ""
    iris().fit(epochs=1, verbose=1, target="reference")
    assert "epoch 1/1" in capsys.readouterr().err


def test_validation_data_arrays_and_fit_x_y_then_evaluate_scores_their_held_out_share():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)).astype(np.float32), rng.integers(0, 3, 40)
    xv, yv = rng.normal(size=(10, 4)).astype(np.float32), rng.integers(0, 3, 10)
    m = iris()
    h = m.fit(x, y, test=0.25, validation_data=(xv, yv), epochs=2, target="reference")
    assert h.epochs[-1]["val_loss"] == pytest.approx(m.evaluate(xv, yv, target="reference")["loss"])
    held = np.random.default_rng(0).permutation(40)[:10]  # the arrays' test share (seed 0)
    assert m.evaluate(target="reference") == pytest.approx(m.evaluate(x[held], y[held], target="reference"))
    assert h.test == pytest.approx(m.evaluate(target="reference"))
    other = iris()
    other.fit(x, y, test=0.0, epochs=1, target="reference")
    with pytest.raises(DataError, match="no held-out split"):
        other.evaluate(target="reference")


def test_a_callback_stops_training_and_fit_returns_the_history():
    seen = []

    class StopAt2:
        def on_epoch_end(self, epoch, logs):
            seen.append((epoch, sorted(logs)))
            return epoch == 2
    history = iris().fit(epochs=5, callbacks=[StopAt2()], target="reference")
    assert len(history) == 2 and history.stopped == "stopped by StopAt2"
    assert seen[0][0] == 1 and "train_loss" in seen[0][1]
    with pytest.raises(ArgumentError, match="has no on_epoch_end"):
        iris().fit(callbacks=[object()])
    early = dlc.EarlyStopping(monitor="train_loss", patience=1, min_delta=100)
    assert len(iris().fit(epochs=5, callbacks=[early], target="reference")) == 2


def test_predict_says_logits_and_predict_proba_gives_probabilities():
    m = iris()
    m.fit(epochs=1, target="reference")
    x = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    logits, p = m.predict(x, target="reference"), m.predict_proba(x, target="reference")
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(p, e / e.sum(axis=1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)
    assert "logits" in dlc.Model.predict.__doc__
    with pytest.raises(ArgumentError, match="needs a classifier"):
        dlc.load(EXAMPLES / "autoencoder.dln").predict_proba(x)


# --- 3. what the user sees -------------------------------------------------------------------------

def test_run_profile_reports_the_steps_it_trained_with_or_without_verbose(tmp_path, capsys):
    """--profile reads the training session's kernel times: --verbose (a print function
    among the options) must not make it ask a fresh session, which has run no step."""
    src = tmp_path / "m.dln"
    src.write_text(IRIS % "")
    for extra in ((), ("--verbose",)):
        code, out, err = run(capsys, "run", src, "--epochs", "2", "--profile", *extra)
        assert code == 0 and "no profile" not in out, out
        steps = int(re.search(r"profile of (\d+) training steps", out).group(1))
        assert steps >= 2 and re.search(r"m\.dln:\d+ +\d", out), out
        assert err.count("dlc: target cpu") == len(extra), err  # the target line once with --verbose


def test_compiling_line_comes_before_the_first_epoch(tmp_path, capsys):
    for expected in ("compiling… (", "compiling… (cached, "):
        iris().fit(epochs=1, quiet=False, cache_dir=str(tmp_path))
        err = capsys.readouterr().err
        assert err.index(expected) < err.index("epoch 1/1"), err
        assert ("cached" in err) == ("cached" in expected)


def test_eta_of_the_whole_run():
    assert format_duration(7) == "0:07" and format_duration(125) == "2:05" and format_duration(3725) == "1:02:05"
    assert summary_line(2, 10, {"train_loss": 0.5}, 3.0, eta=75) == "epoch 2/10  train loss 0.5000  3.0s  eta 1:15"
    stream = io.StringIO()
    p = Progress(epochs=3, steps_per_epoch=1, stream=stream)
    for epoch, seconds in ((1, 10.0), (2, 20.0), (3, 30.0)):
        p.start_epoch(epoch)
        p.end_epoch(epoch, {}, seconds)
    assert stream.getvalue().splitlines() == ["epoch 1/3  10.0s  eta 0:20", "epoch 2/3  20.0s  eta 0:15",
                                              "epoch 3/3  30.0s"]


def test_summary_has_one_row_per_layer_with_shapes_and_counts():
    text = dlc.load(EXAMPLES / "lenet5.dln").summary()
    rows = [line.split() for line in text.splitlines()[3:16]]
    assert [r[1] for r in rows] == ["input", "conv2d", "relu", "maxpool", "conv2d", "relu", "maxpool",
                                    "flatten", "dense", "relu", "dense", "relu", "dense"]
    assert rows[1][2] == "f32[B,6,8,8]" and rows[3][2] == "f32[B,6,4,4]"  # before and after pooling
    assert [r[0] for r in rows if r[1] == "dense"] == ["f.dense", "f.dense_2", "out"]
    frozen = dlc.load("""model m(x: f32[B, 4]) -> f32[B, 2] {
    h = x |> dense(8, trainable=false) |> batchnorm |> relu
    return dense(h, 2)
}""").summary()
    assert "dense (frozen)" in frozen
    assert "trainable params: 34\n" in frozen  # 16 of batchnorm's gamma and beta, 18 of the last dense
    assert "non-trainable params: 56 (frozen parameters, layer state such as batchnorm statistics)" in frozen


def test_softmax_fed_to_cross_entropy_is_a_warning_with_its_location():
    src = IRIS.replace("return dense(h, 3)", "return h |> dense(3) |> softmax") % ""
    with pytest.warns(DlcWarning, match="applies log-softmax") as record:
        m = dlc.load(src)
    assert record[0].message.diagnostic.span.line == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iris()  # logits: no warning
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(m.predict_proba(x, target="reference"), m.predict(x, target="reference"))


CNN = """
model c(x: f32[B, 3, 4, 5]) -> f32[B, 2] {
    return x |> flatten |> dense(2)
}
train c { data = arrays()  loss = cross_entropy(output, label)  epochs = 1 }
"""


def test_channels_last_arrays_for_an_nchw_model_are_a_warning():
    y = np.zeros(6, np.int64)
    with pytest.warns(DlcWarning, match=r"channels-last \(\[N, 4, 5, 3\]\)"):
        dlc.load(CNN).fit(np.zeros((6, 4, 5, 3), np.float32), y, target="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dlc.load(CNN).fit(np.zeros((6, 3, 4, 5), np.float32), y, target="reference")
        one = CNN.replace("f32[B, 3, 4, 5]", "f32[B, 1, 4, 5]")
        dlc.load(one).fit(np.zeros((6, 4, 5, 1), np.float32), y, target="reference")  # the same layout


# --- 4. loggers ------------------------------------------------------------------------------------

def test_csv_log_has_one_row_per_epoch_and_resume_appends(tmp_path):
    import csv
    log, ck = tmp_path / "m.csv", tmp_path / "ck.npz"
    iris("validation = 0.25").fit(epochs=2, csv=log, save=ck, target="reference")
    iris("validation = 0.25").fit(epochs=3, csv=log, resume=ck, target="reference")
    rows = list(csv.DictReader(log.read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert list(rows[0]) == ["epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                             "lr", "seconds"]


def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars from TensorBoard event files (TFRecord: length, crc, Event proto, crc)."""
    from tensorboardX.proto import event_pb2
    out: dict[str, list] = {}
    for f in folder.glob("events.out.tfevents.*"):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboardX")
    h = iris("validation = 0.25").fit(epochs=2, tensorboard=tmp_path / "tb", target="reference")
    scalars = _events(tmp_path / "tb")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2]
    assert [v for _, v in scalars["val/accuracy"]] == pytest.approx(h["val_accuracy"])
    assert scalars["lr"] == [(1, pytest.approx(0.02)), (2, pytest.approx(0.02))]
    assert scalars["test/loss"] == [(2, pytest.approx(h.test["loss"]))]


def test_plot_reads_the_learning_rate_and_validation_curves(tmp_path):
    from dlc.runtime.plot import read_curves
    log = tmp_path / "log.jsonl"
    iris("validation = 0.25\n    schedule = step(every=1, gamma=0.5)").fit(epochs=3, log=log, target="reference")
    curves = read_curves(log)
    assert set(curves["loss"]) == {"train", "val"} and set(curves["accuracy"]) == {"train", "val"}
    assert [v for _, v in curves["learning rate"]["lr"]] == pytest.approx([0.02, 0.01, 0.005])
    assert "test_loss" in log.read_text().splitlines()[-1]  # the test score: one event line at the end


# --- 5. the seed course: cyclic rates, frozen layers, the perceptron --------------------------------------

def test_cyclic_schedule_is_triangular_per_step():
    spec = recipe.cyclic(0.1, 1.0, 2)
    rates = [learning_rate(spec, 99.0, epoch=0, epochs=1, step=s) for s in range(9)]
    assert rates == pytest.approx([0.1, 0.55, 1.0, 0.55, 0.1, 0.55, 1.0, 0.55, 0.1])
    with pytest.raises(ArgumentError, match="`max` must be larger than `base`"):
        recipe.cyclic(0.1, 0.1, 2)


@pytest.mark.parametrize("results_late", [False, True])
def test_fit_feeds_the_cyclic_rate_to_every_step(monkeypatch, results_late):
    fed = []
    step = trainer.Session.submit  # what the fit loop runs each step with
    monkeypatch.setattr(trainer.Session, "submit", lambda self, x, y, lr: (fed.append(lr), step(self, x, y, lr))[1])
    if results_late:  # as a GPU's: the loop runs up to READ_BEHIND steps ahead of the results it has read
        monkeypatch.setattr(trainer.Pending, "ready", lambda self: False)
    m = iris("schedule = cyclic(0.001, 0.005, 3)")
    m.fit(epochs=2, target="reference")  # 120 samples, batch 16: 8 steps per epoch
    expected = [learning_rate(m.train_config.schedule, 0, 0, 0, s) for s in range(16)]
    assert fed == pytest.approx(expected) and fed[3] == pytest.approx(0.005)
    with pytest.raises(ArgumentError, match="`cyclic` sets the learning rate itself"):
        m.fit(lr=0.1)


def test_frozen_layer_gets_no_update_and_no_optimizer_state():
    m = dlc.load(IRIS.replace("dense(8)", "dense(8, trainable=false)") % "")
    before = {k: v.copy() for k, v in m.params.items()}
    m.fit(epochs=2, target="reference")
    np.testing.assert_array_equal(m.params["h.w"], before["h.w"])
    np.testing.assert_array_equal(m.params["h.b"], before["h.b"])
    assert not np.array_equal(m.params["out.w"], before["out.w"])
    assert "out.w:m" in m.state and not any(k.startswith("h.") and ":" in k for k in m.state)
    g = m.compile_graph("train", m.train_config)
    assert not any(k.startswith("h.") for k in g.updates)
    with pytest.raises(ArgumentError, match="`trainable` applies to layers and blocks; `relu` has no parameters"):
        dlc.load(IRIS.replace("|> relu", "|> relu(trainable=false)") % "")


FROZEN_PARAM = """model m(x: f32[B, 4]) -> f32[B, 3] {
    param scale: f32[4] = normal(1, 0.1)%s
    h = x * scale |> dense(8) |> relu
    return dense(h, 3)
}
train m { data = iris()  loss = cross_entropy(output, label)  optimizer = adam(lr=0.01)  batch = 16  epochs = 2 }
"""


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_a_frozen_param_keeps_its_values_and_gets_no_optimizer_state(target):
    m = dlc.load(FROZEN_PARAM % ", trainable=false")
    before = {k: v.copy() for k, v in m.params.items()}
    m.fit(target=target)
    np.testing.assert_array_equal(m.params["scale"], before["scale"])
    assert not np.array_equal(m.params["out.w"], before["out.w"])
    assert "out.w:m" in m.state and not any(k.startswith("scale:") for k in m.state)
    assert "scale  param (frozen)" in m.summary() and "trainable params: 67\n" in m.summary()
    trained = dlc.load(FROZEN_PARAM % ", trainable=true")  # the default, written out
    trained.fit(target=target)
    assert not np.array_equal(trained.params["scale"], before["scale"])


@pytest.mark.parametrize("option, message", [
    (", trainable=1", "`trainable` must be true or false, got the integer 1"),
    (", frozen=true", "a `param` takes one option, `trainable`; got `frozen`"),
    (", trainable=false, trainable=true", "`trainable` is given twice")])
def test_a_param_option_is_checked(option, message):
    with pytest.raises(ArgumentError, match=re.escape(message)) as e:
        dlc.load(FROZEN_PARAM % option)
    assert e.value.span.line == 2


COMPARED = """model m(x: f32[B, 4]) -> f32[B, 3] {
    h = x |> dense(8)
    g = where(h > 0, h, 0.1 * h) + where(x[:, :1] <= 0.25, 1.0, -1.0)
    return dense(g, 3) + where(h[:, :3] != 0, 0.0, h[:, :3])
}
train m { data = iris()  loss = cross_entropy(output, label)  optimizer = sgd(lr=0.1)  batch = 16  epochs = 2 }
"""


def test_comparisons_give_bool_tensors_that_where_selects_by():
    m = dlc.load(COMPARED)
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    h = x @ m.params["h.w"] + m.params["h.b"]
    g = np.where(h > 0, h, np.float32(0.1) * h) + np.where(x[:, :1] <= 0.25, 1.0, -1.0)
    want = g @ m.params["out.w"] + m.params["out.b"] + np.where(h[:, :3] != 0, 0.0, h[:, :3])
    for target in ("reference", "cpu"):
        np.testing.assert_allclose(m.predict(x, target=target), want, rtol=1e-5, atol=1e-5)
    trained = {}
    for target in ("reference", "cpu"):  # the gradient flows through the branch each element takes
        t = dlc.load(COMPARED)
        t.fit(target=target)
        trained[target] = t.params
    for k in trained["cpu"]:
        np.testing.assert_allclose(trained["cpu"][k], trained["reference"][k], rtol=1e-4, atol=1e-5)
    assert dlc.load(COMPARED.replace("epochs = 2", "shuffle = 2 > 3")).train_config.shuffle is False  # numbers


@pytest.mark.parametrize("body, message", [
    ("where(h, h, 0)", "`where`: argument `cond` must be a bool tensor (a comparison such as `x > 0`), got f32[B,3]"),
    ("(h > 0) * 2", "cannot apply `*` to bool[B,3]: arithmetic needs numbers"),
    ("where((h > 0) == (h < 1), h, 0)", "cannot compare bool[B,3] and bool[B,3] with `==`"),
    ("where(h > h[:, :2], h, 0)", "cannot compare f32[B,3] and f32[B,2] with `>`: dimensions 3 and 2 differ"),
    ("where(0 < h < 1, h, 0)", "unexpected `<`")])
def test_a_comparison_or_where_misused_is_a_located_error(body, message):
    with pytest.raises(DlcError, match=re.escape(message)) as e:
        dlc.load(f"model m(x: f32[B, 3]) -> f32[B, 3] {{\n    h = dense(x, 3)\n    return {body}\n}}\n")
    assert e.value.span.line == 3


def test_stop_gradient_keeps_the_layers_before_it_fixed():
    m = dlc.load(IRIS.replace("|> relu", "|> relu |> stop_gradient") % "")
    before = m.params["h.w"].copy()
    m.fit(epochs=1, target="reference")
    np.testing.assert_array_equal(m.params["h.w"], before)


PERCEPTRON = """
model p(x: f32[B, 2]) -> f32[B, 1] {
    return x |> dense(1, init=zeros) |> %s
}
train p { data = arrays()  loss = mse(output, label)  optimizer = perceptron(lr=%s)  batch = %d  epochs = 3
          shuffle = false }
"""


@pytest.mark.parametrize("activation, lr, batch", [("step", 1.0, 1), ("step", 0.5, 4), ("sign", 0.25, 1)])
def test_perceptron_is_the_textbook_rule(activation, lr, batch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2)).astype(np.float32)
    positive = x[:, 0] - 0.5 * x[:, 1] > 0.1
    y = (positive if activation == "step" else np.where(positive, 1, -1)).astype(np.float32)[:, None]
    m = dlc.load(PERCEPTRON % (activation, lr, batch))
    m.fit(x, y, test=0.0, target="reference")
    w, b = np.zeros(2, np.float32), np.float32(0)
    f = (lambda z: np.float32(z > 0)) if activation == "step" else np.sign
    for _ in range(3):  # Rosenblatt: w += lr * (y - y_hat) * x, summed over each batch
        for start in range(0, 40, batch):
            xb, yb = x[start:start + batch], y[start:start + batch, 0]
            err = yb - f(xb @ w + b)
            w, b = w + np.float32(lr) * (err @ xb), b + np.float32(lr) * err.sum()
    np.testing.assert_allclose(m.params["out.w"][:, 0], w, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m.params["out.b"], [b], rtol=1e-6, atol=1e-6)


def test_perceptron_needs_labels_shaped_like_the_output():
    src = IRIS.replace("optimizer = adam(lr=0.02)", "optimizer = perceptron()") % ""
    with pytest.raises(ArgumentError, match="needs labels shaped like the output") as info:
        dlc.load(src).fit(epochs=1, target="reference")
    assert info.value.span.line == 9  # the optimizer option


def test_a_checkpoint_loads_for_evaluation_in_a_fresh_model(tmp_path):
    """The optimizer's scalar `step` stays a scalar when a checkpoint brings it into a model that
    has none yet (it became [1] and evaluate() failed: `dlc eval` after `dlc run --save`)."""
    iris().fit(epochs=1, save=tmp_path / "w.npz", target="reference")
    m = iris()
    m.load_weights(tmp_path / "w.npz")
    assert m.state["step"].shape == ()
    assert math.isfinite(m.evaluate(target="reference")["loss"])


NO_TRAIN_BLOCK = """model m(x: f32[B, 6]) -> (f32[B, 3], h: f32[B, 4]) {
    h = tanh(dense(x, 4))
    return dense(h, 3), h
}
"""


def test_a_model_without_a_train_block_predicts_on_the_target_it_is_asked_for(monkeypatch):
    """An imported model, say, has no train block: predict(target="cpu") compiles its
    evaluation graph (it used to run the reference interpreter, while `dlc predict
    --verbose` said "target cpu"), in chunks of `batch` rows, and gives the interpreter's
    outputs and named results; no rows give empty outputs."""
    m = dlc.load(NO_TRAIN_BLOCK)
    x = np.random.default_rng(0).random((7, 6), dtype=np.float32)
    want = m.predict(x, target="reference", results=True)
    said = []
    monkeypatch.setattr(type(m), "forward", lambda *a, **k: pytest.fail("ran the interpreter"))
    for batch in (None, 3):
        got = m.predict(x, target="cpu", batch=batch, results=True, no_cache=True, verbose=said.append)
        assert sorted(got) == ["h", "output"]
        for k in got:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert any(line.startswith("compile cache off (m, batch 7)") for line in said), said
    assert any(line.startswith("compile cache off (m, batch 3)") for line in said), said
    monkeypatch.undo()
    assert m.predict(np.zeros((0, 6), np.float32), target="cpu").shape == (0, 3)


# --- overrides from Python and the command line train as the train block would ----------------------

def test_fit_and_run_overrides_of_optimizer_schedule_and_clip_equal_the_train_block(tmp_path, capsys):
    sgd = IRIS.replace("adam(lr=0.02)", "sgd(lr=0.1, momentum=0.9)")
    written = sgd % "schedule = step(every=1, gamma=0.5)\n clip = 0.05"
    want = dlc.load(written).fit(target="reference").epochs
    got = iris().fit(optimizer="sgd(lr=0.1, momentum=0.9)", schedule="step(every=1, gamma=0.5)", clip=0.05,
                     target="reference").epochs
    assert [e["train_loss"] for e in got] == [e["train_loss"] for e in want]
    assert [e["lr"] for e in got] == [0.1, 0.05, 0.025, 0.0125]
    unclipped = iris().fit(optimizer="sgd(lr=0.1, momentum=0.9)", schedule="step(every=1, gamma=0.5)",
                           target="reference").epochs
    assert unclipped[-1]["train_loss"] != got[-1]["train_loss"]  # the clip took effect
    path = tmp_path / "m.dln"
    path.write_text(sgd % "schedule = step(every=1, gamma=0.5)")
    code, _, err = run(capsys, "run", path, "--clip", "0.05", "--target", "reference", "--log", tmp_path / "l.jsonl")
    assert code == 0 and "clip 0.05" in err.splitlines()[0], err
    logged = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in logged if "event" not in r] == [e["train_loss"] for e in want]


def test_a_batch_far_above_the_data_warns_of_the_padding():
    """The steps are compiled for `batch` rows; `batch = 10000` on iris's 120 training
    samples would compute 9,880 rows of padding at every step, silently."""
    with pytest.warns(dlc.DlcWarning, match="`batch` is 10,000, but the training split holds 120 samples") as w:
        h = iris().fit(epochs=1, batch=10000, target="reference")
    assert "a full batch is `batch = 120`" in w[0].message.diagnostic.hint
    assert len(h.epochs) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iris().fit(epochs=1, batch=200, target="reference")  # under twice the size: no warning


def test_weights_are_needed_only_by_a_model_with_parameters(tmp_path, capsys):
    """predict runs a parameter-free model without --weights (eval and export share the check); a model with
    parameters refuses to run on freshly initialized ones, saying how to get weights."""
    (tmp_path / "pf.dln").write_text("model pf(x: f32[B, 4]) -> f32[B, 4] {\n    return softmax(x * 2.0)\n}\n")
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["predict", str(tmp_path / "pf.dln"), "--input", str(tmp_path / "x.npy"),
                 "-o", str(tmp_path / "y.npy")]) == 0
    e = np.exp(2 * x)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), e / e.sum(1, keepdims=True), rtol=1e-5)
    mlp = str(Path(__file__).parent.parent / "examples" / "digits_mlp.dln")
    capsys.readouterr()
    for command in (["predict", mlp, "--input", str(tmp_path / "x.npy")], ["eval", mlp]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"`dlc {command[0]}` needs --weights FILE: model mlp has parameters" in err
        assert "--save ck.npz" in err and "Traceback" not in err
