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
])
def test_output_path_of_the_wrong_kind_is_a_usage_error(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    code, _, err = dlc_main(capsys, *args)
    assert code == 2 and f"dlc: usage error: {message}" in err, err
    assert (tmp_path / "file").read_text() == "keep me" and not any((tmp_path / "folder").iterdir())
