"""Mistakes in using the driver (Python API and CLI) are one diagnostic each, never a traceback:
unknown keywords, models training cannot feed, unreadable inputs, output paths of the wrong kind."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dlc
from dlc.cli import main
from dlc.core.diagnostics import ArgumentError, DataError
from dlc.runtime import trainer

EXAMPLES = Path(__file__).parent.parent / "examples"
MLP = EXAMPLES / "digits_mlp.dln"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DLC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def run_dlc(*args) -> subprocess.CompletedProcess:
    """The real command, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "dlc", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))


def dlc_main(capsys, *args) -> tuple[int, str, str]:
    """The command's main() in this process (what `python -m dlc` runs), for speed:
    (exit status, stdout, stderr)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- keywords of fit / evaluate / predict ----

@pytest.mark.parametrize("method, kwargs, message, hint", [
    ("fit", {"verbose": "yes"}, "fit(verbose='yes'): `verbose` takes 0, 1 or 2", "quiet=False"),
    ("fit", {"xyzzy": []}, "fit() got an unknown keyword `xyzzy`", "its keywords: x, y, epochs"),
    ("fit", {"epoch": 3}, "fit() got an unknown keyword `epoch`", "did you mean `epochs`?"),
    ("fit", {"callback": []}, "fit() got an unknown keyword `callback`", "did you mean `callbacks`?"),
    ("fit", {"threads": "2"}, "fit(threads='2'): `threads` takes a positive number", None),
    ("fit", {"steps_per_epoch": 10}, "fit() does not take Keras' `steps_per_epoch`", "`epochs` and `batch`"),
    ("evaluate", {"batch_sizes": 8}, "evaluate() got an unknown keyword `batch_sizes`", "did you mean `batch_size`?"),
    ("predict", {"verbose": 3}, "predict(verbose=3): `verbose` takes 0, 1 or 2", None),
])
def test_unknown_or_mistyped_keywords_are_clear_errors(method, kwargs, message, hint):
    m = dlc.load(MLP)
    args = (np.zeros((2, 64), np.float32),) if method == "predict" else ()
    with pytest.raises(ArgumentError) as info:
        getattr(m, method)(*args, **kwargs)
    assert info.value.message.startswith(message), info.value.message
    if hint:
        assert hint in info.value.hint


# ---- the values of fit / evaluate / predict keywords ----

@pytest.mark.parametrize("method, kwargs, message", [
    ("fit", {"epochs": 0}, "fit(epochs=0): `epochs` takes a whole number from 1"),  # was: the default
    ("fit", {"epochs": 2.5}, "fit(epochs=2.5): `epochs` takes a whole number"),
    ("fit", {"batch": -3}, "fit(batch=-3): `batch` takes a whole number from 1"),
    ("fit", {"batch_size": 0}, "fit(batch=0): `batch` takes a whole number from 1"),
    ("fit", {"lr": -0.1}, "fit(lr=-0.1): `lr` takes a positive finite number"),  # was: gradient ascent
    ("fit", {"lr": float("nan")}, "fit(lr=nan): `lr` takes a positive finite number"),
    ("fit", {"lr": "abc"}, "fit(lr='abc'): `lr` takes a positive finite number"),
    ("fit", {"seed": 1.5}, "fit(seed=1.5): `seed` takes a whole number from 0"),
    ("fit", {"test": 1.5}, "fit(test=1.5): `test` takes a share from 0 up to"),
    ("fit", {"optimizer": 3}, "fit(optimizer=3): `optimizer` takes an expression such as"),
    ("fit", {"world": 3}, "fit(world=3): `world` takes \"auto\""),
    ("fit", {"schedule": 3}, "fit(schedule=3): `schedule` takes an expression such as"),
    ("fit", {"clip": -1.0}, "fit(clip=-1.0): `clip` takes a positive finite number, or False"),
    ("fit", {"quiet": "no"}, "`quiet` takes True or False"),
    ("fit", {"on_epoch": 3}, "fit(on_epoch=3): `on_epoch` takes a function"),  # was: a TypeError after epoch 1
    ("compile_artifact", {"path": "m.dlcx", "batches": [0]}, "compile_artifact(batch=0): `batch` takes"),
    ("evaluate", {"batch": 0}, "evaluate(batch=0): `batch` takes a whole number from 1"),  # was: loss nan
    ("predict", {"batch": -1}, "predict(batch=-1): `batch` takes a whole number from 1"),
    ("classification_report", {"top_k": 0}, "classification_report(top_k=0): `top_k` takes a whole number"),
    ("ir", {"stage": "nope"}, "unknown IR stage `nope`"),  # was: the assembly
    ("ir", {"mode": "training"}, "mode='training': give \"train\""),
])
def test_keyword_values_are_checked_before_any_work(method, kwargs, message, monkeypatch):
    monkeypatch.setattr(trainer, "Session", lambda *a, **k: pytest.fail("compiled"))
    m = dlc.load(MLP)
    x, y = np.zeros((4, 64), np.float32), np.zeros(4, np.int32)
    args = {"fit": (x, y), "evaluate": (x, y), "predict": (x,), "classification_report": (x, y)}.get(method, ())
    with pytest.raises(ArgumentError) as info:
        getattr(m, method)(*args, **kwargs)
    assert info.value.message.startswith(message), info.value.message


@pytest.mark.parametrize("given", ["", 3, None])
def test_load_of_neither_a_path_nor_a_program(given):
    with pytest.raises(ArgumentError, match=r"dlc.load\(\) takes a .dln file's path or a program's text"):
        dlc.load(given)


def test_an_artifact_that_cannot_be_written_is_an_error_before_or_after_compiling(tmp_path):
    m = dlc.load(EXAMPLES / "logreg.dln")
    with pytest.raises(ArgumentError, match="that is a folder"):
        m.compile_artifact(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(dlc.DlcError, match="cannot write .*file/m.dlcx"):
        m.compile_artifact(tmp_path / "file" / "m.dlcx")  # its folder is a file: was a raw OSError


def test_errors_about_an_overridden_option_point_at_the_override(capsys):
    """A value from --data, --validation or --optimizer (or fit's keywords) is not the train
    block's line: errors about it used to show that line (`data = digits(test=0.2)`)."""
    code, _, err = dlc_main(capsys, "run", MLP, "--epochs", "1", "--data", "iris()")
    assert code == 1 and "\n--data:1:1: data error: the data's samples have shape [4]" in err, err
    assert "   1 | iris()" in err
    code, _, err = dlc_main(capsys, "run", MLP, "--epochs", "1", "--validation", 'npz("nothere.npz")')
    assert "--validation:1:1: data error: cannot read nothere.npz" in err, err
    m = dlc.load(MLP)
    with pytest.raises(DataError) as info:  # arrays from Python: no line of the file to show
        m.fit(np.ones((10, 64)), np.arange(10) + 0.5, epochs=1)
    assert info.value.span is None and "whole numbers" in info.value.message
    with pytest.raises(DataError) as info:  # validation arrays from Python: no line either, and which split
        m.fit(epochs=1, validation=(np.ones((3, 64)), np.arange(3) + 0.5))
    assert info.value.span is None and info.value.message.startswith("in the validation split: the labels")
    with pytest.raises(dlc.DlcError) as info:
        m.fit(epochs=1, optimizer="perceptron")  # it needs labels shaped like the output
    assert info.value.span.source.name == "optimizer" and "perceptron()" in info.value.message


def test_fit_takes_an_optimizer_expression_as_the_cli_does():
    m = dlc.load(MLP)
    x, y = np.random.default_rng(0).uniform(0, 16, (16, 64)), np.arange(16) % 10
    h = m.fit(x, y, epochs=1, optimizer="sgd(lr=0.05, momentum=0.9)", target="reference")
    assert h.epochs[0]["lr"] == 0.05
    with pytest.raises(dlc.DlcError, match="unknown optimizer `adamm`") as info:
        m.fit(x, y, epochs=1, optimizer="adamm")
    assert "did you mean" in info.value.hint or "adam" in info.value.hint


@pytest.mark.parametrize("x, message, hint", [
    (np.zeros(64), "the data's samples have shape [] (1 values)", "one sample of shape [64]: give a batch of one"),
    (np.array(["a", "b"]), "the inputs are not numbers (dtype <U1)", None),
    (np.float32(3), "the inputs are one number, not a batch of samples", None),
])
def test_predict_input_mistakes(x, message, hint):
    with pytest.raises(DataError) as info:
        dlc.load(MLP).predict(x)
    assert info.value.message.startswith(message), info.value.message
    assert hint is None or hint in info.value.hint


def test_no_rows_give_outputs_of_no_rows_and_scoring_none_is_an_error():
    m = dlc.load(MLP)
    empty = np.zeros((0, 64), np.float32)
    assert m.predict(empty).shape == (0, 10)  # was (0,)
    assert m.predict_proba(empty).shape == (0, 10)  # was a numpy ValueError
    with pytest.raises(DataError, match=r"the inputs are empty \(shape \[0, 64\]\)"):
        m.evaluate(empty, np.zeros(0, np.int32))  # was {}


def test_labels_are_optional_only_where_the_loss_reads_none():
    x = np.random.default_rng(0).uniform(0, 16, (16, 64))
    with pytest.raises(ArgumentError, match=r"fit\(x\) needs the labels too: fit\(x, y\)"):
        dlc.load(MLP).fit(x, epochs=1)
    auto = dlc.load(EXAMPLES / "autoencoder.dln")  # mse(output, x): no labels
    h = auto.fit(x, epochs=1, target="reference")
    assert np.isfinite(h.epochs[0]["train_loss"])
    assert set(auto.evaluate(x, target="reference")) == {"loss"}


def test_assigning_a_parameter_copies_it_in_checked():
    m = dlc.load(MLP)
    w = m.params["h.w"]
    m.params["h.w"] = np.full(w.shape, 0.5, np.float64)
    assert m.params["h.w"] is w and np.all(w == 0.5)  # the model's own array, written in place
    with pytest.raises(ArgumentError, match=r"parameter `h.w` has shape \[64, 128\], got .* \[128, 64\]"):
        m.params["h.w"] = np.zeros((128, 64))
    with pytest.raises(ArgumentError, match="takes finite float32 values"):
        m.params["h.w"] = np.full(w.shape, 1e300)  # infinite in float32
    with pytest.raises(KeyError, match="did you mean `h.w`"):
        m.params["h.ww"] = w
    assert np.all(w == 0.5)


# ---- models training cannot feed ----

TWO_INPUTS = """model m(x: f32[B, 64], y: f32[B, 64]) -> f32[B, 10] {
    return dense(x + y, 10)
}
train m { data = digits()  loss = cross_entropy(output, label)  epochs = 1 }
"""


@pytest.mark.parametrize("call", ["fit", "fit_arrays", "evaluate", "predict"])
def test_two_input_model_is_refused_before_compiling(call, monkeypatch):
    monkeypatch.setattr(trainer, "Session", lambda *a, **k: pytest.fail("compiled"))
    m = dlc.load(TWO_INPUTS)
    x, y = np.zeros((8, 64), np.float32), np.zeros(8, np.int32)
    with pytest.raises(DataError) as info:
        {"fit": lambda: m.fit(), "fit_arrays": lambda: m.fit(x, y), "evaluate": lambda: m.evaluate(),
         "predict": lambda: m.predict(x)}[call]()
    e = info.value
    assert "model `m` has 2 inputs (x, y), but training and prediction feed one input array" in e.message
    assert (e.span.line, e.span.col) == (1, 24)  # `y: f32[B, 64]`
    assert "x[:, 0]" in e.hint


def test_cli_run_of_a_two_input_model(tmp_path):
    path = tmp_path / "two.dln"
    path.write_text(TWO_INPUTS)
    r = run_dlc("run", path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{path}:1:24: data error: model `m` has 2 inputs" in r.stderr
    assert f"note: the data comes from `data = digits(test=0.2)` at {path}:4:" in r.stderr


# ---- dlc predict --input ----

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "w.npz"
    dlc.load(MLP).save(path)
    return path


def test_predict_reads_an_npy_file(tmp_path, weights, capsys):
    x = np.random.default_rng(0).random((3, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", x=x)
    code, out, err = dlc_main(capsys, "predict", MLP, "--weights", weights, "--input", tmp_path / "x.npy")
    assert code == 0, err
    assert out.count("class") == 3
    assert out == dlc_main(capsys, "predict", MLP, "--weights", weights, "--input", tmp_path / "x.npz")[1]


def test_predict_names_classes_only_for_a_classifier_and_writes_npy_or_npz(tmp_path, capsys):
    x = np.random.default_rng(0).random((3, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    auto = dlc.load(EXAMPLES / "autoencoder.dln")  # mse: its outputs are pixels, not class scores
    auto.save(tmp_path / "a.npz")
    code, out, err = dlc_main(capsys, "predict", EXAMPLES / "autoencoder.dln", "--weights", tmp_path / "a.npz",
                              "--input", tmp_path / "x.npy", "-o", tmp_path / "p.npy")
    assert code == 0 and (tmp_path / "p.npy").is_file(), err  # was: p.npy.npz, reported as p.npy
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), auto.predict(x), rtol=1e-6)
    code, out, err = dlc_main(capsys, "predict", EXAMPLES / "autoencoder.dln", "--weights", tmp_path / "a.npz",
                              "--input", tmp_path / "x.npy")
    assert code == 0 and len(out.splitlines()) == 3 and "class" not in out, out  # was: "class 60"
    blobs = dlc.load(EXAMPLES / "logreg.dln")  # bce on one probability: class 1 above 0.5
    blobs.save(tmp_path / "b.npz")
    xb = np.array([[-3.0, -3.0], [3.0, 3.0], [0.1, -0.2]], np.float32)
    np.save(tmp_path / "xb.npy", xb)
    code, out, err = dlc_main(capsys, "predict", EXAMPLES / "logreg.dln", "--weights", tmp_path / "b.npz",
                              "--input", tmp_path / "xb.npy", "-o", tmp_path / "b_out.npz")
    saved = np.load(tmp_path / "b_out.npz")
    np.testing.assert_array_equal(saved["classes"], (saved["output"][:, 0] > 0.5).astype(int))
    code, out, err = dlc_main(capsys, "predict", EXAMPLES / "logreg.dln", "--weights", tmp_path / "b.npz",
                              "--input", tmp_path / "xb.npy")
    assert [line.split()[1:3] for line in out.splitlines()] == [["class", str(c)] for c in saved["classes"]]


@pytest.mark.parametrize("name, content, args, message", [
    ("x.csv", b"1,2\n3,4\n", (), "x.csv is not a NumPy .npy or .npz file"),
    ("x.npy", None, ("--key", "a"), "x.npy is an .npy file, which holds one array: --key a picks"),
    ("x.npz", b"PK\x03\x04 not really", (), "cannot read"),
])
def test_predict_input_errors(tmp_path, weights, capsys, name, content, args, message):
    path = tmp_path / name
    if content is None:
        np.save(path, np.zeros((2, 64)))
    else:
        path.write_bytes(content)
    code, _, err = dlc_main(capsys, "predict", MLP, "--weights", weights, "--input", path, *args)
    assert code == 1 and message in err and "pickle" not in err, err


# ---- output paths of the wrong kind ----

@pytest.mark.parametrize("args, message", [
    (("compile", MLP, "-o", "folder"), "-o folder is a folder; give the name of the file to write"),
    (("compile", MLP, "-o", "file/m.dlcx"), "-o file/m.dlcx: file is a file, not a folder"),
    (("compile", MLP, "--dump-dir", "file"), "--dump-dir file is a file; give a folder"),
    (("compile", MLP, "--dump-dir", "file/stages"), "--dump-dir file/stages: file is a file, not a folder"),
    (("predict", MLP, "--weights", "w.npz", "--input", "x.npy", "-o", "folder"), "-o folder is a folder"),
    (("predict", MLP, "--weights", "w.npz", "--input", "x.npy", "-o", "out"),  # numpy wrote out.npz
     "-o out: give a .npz (the outputs, named results and classes) or .npy (the outputs alone) file name"),
    (("data", MLP, "-o", "d"), "-o d: give a .npz (x and y) file name"),
])
def test_output_path_of_the_wrong_kind_is_a_usage_error(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    code, _, err = dlc_main(capsys, *args)
    assert code == 2 and f"dlc: usage error: {message}" in err, err
    assert (tmp_path / "file").read_text() == "keep me" and not any((tmp_path / "folder").iterdir())
