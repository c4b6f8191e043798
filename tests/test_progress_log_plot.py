"""Training output: the progress display, the JSON-lines metrics log and `dlc plot`."""
from __future__ import annotations

import io
import json
import re
import sys

import numpy as np
import pytest

from dlc.core.diagnostics import DataError, UsageError
from dlc.runtime import progress
from dlc.runtime.metrics_log import MetricsLog, read_log
from dlc.runtime.plot import plot_log, read_curves
from dlc.runtime.progress import Progress, summary_line

EPOCH_METRICS = [
    {"train_loss": 0.9, "train_accuracy": 0.61, "test_loss": 0.95, "test_accuracy": 0.6},
    {"train_loss": 0.2134, "train_accuracy": 0.9412, "test_loss": 0.2561, "test_accuracy": 0.9306},
]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _train(display: Progress, steps: int = 50) -> None:
    for epoch, metrics in enumerate(EPOCH_METRICS, 1):
        display.start_epoch(epoch)
        for i in range(steps):
            display.step(1.0 / (i + 1))
        display.end_epoch(epoch, metrics, seconds=1.23)
    display.close()


# ---- progress ----

def test_pipe_gets_one_plain_line_per_epoch():
    stream = io.StringIO()
    _train(Progress(epochs=2, steps_per_epoch=50, stream=stream))
    assert stream.getvalue() == (
        "epoch 1/2  train loss 0.9000 acc 0.6100  test loss 0.9500 acc 0.6000  1.2s  eta 0:01\n"
        "epoch 2/2  train loss 0.2134 acc 0.9412  test loss 0.2561 acc 0.9306  1.2s\n")


def test_quiet_prints_nothing():
    for stream in (io.StringIO(), FakeTerminal()):
        _train(Progress(epochs=2, steps_per_epoch=50, quiet=True, stream=stream))
        assert stream.getvalue() == ""


def test_terminal_gets_a_live_bar(monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(progress, "REFRESH_SECONDS", 0.0)  # refresh on every step
    stream = FakeTerminal()
    _train(Progress(epochs=2, steps_per_epoch=50, stream=stream))
    out = stream.getvalue()
    assert "\r" in out and "epoch 1/2:" in out and "/50" in out
    assert re.search(r"loss 0\.\d{4}(, run eta \d+:\d\d)?\]", out)  # running mean loss, after tqdm's ETA
    assert re.search(r"run eta \d+:\d\d\]", out)  # and the whole run's time left
    # The bar erases itself; each epoch's summary starts on a clean line.
    assert out.endswith("\repoch 2/2  train loss 0.2134 acc 0.9412  test loss 0.2561 acc 0.9306"
                        "  1.2s\n")


def test_bar_refreshes_are_throttled():
    pytest.importorskip("tqdm")
    stream = FakeTerminal()
    display = Progress(epochs=1, steps_per_epoch=100_000, stream=stream)
    display.start_epoch(1)
    for _ in range(100_000):
        display.step(0.5)
    display.close()
    assert stream.getvalue().count("\r") < 50  # not one redraw per step


def test_terminal_without_tqdm_falls_back_to_plain_lines(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now fails
    stream = FakeTerminal()
    _train(Progress(epochs=2, steps_per_epoch=50, stream=stream))
    assert "\r" not in stream.getvalue() and stream.getvalue().count("\n") == 2


def test_summary_line_shows_what_is_present():
    line = summary_line(3, 30, {"train_loss": 2.5e-5, "lr": 1e-3, "val_loss": 1234567.0,
                                "grad_norm": 0.5}, seconds=61.25)
    assert line == "epoch 3/30  train loss 2.500e-05  val loss 1.235e+06  grad_norm 0.5000" \
                   "  lr 0.001  61.2s"
    assert summary_line(1, 1, {}, 0.04) == "epoch 1/1  40ms"  # not 0.0s: a fast epoch still took time
    assert summary_line(1, 1, {}, 0.0013) == "epoch 1/1  1.3ms"


def test_default_stream_is_stderr_at_construction(capsys):
    _train(Progress(epochs=2, steps_per_epoch=5))
    assert capsys.readouterr().err.count("\n") == 2


# ---- metrics log ----

def _write_log(path, epochs=EPOCH_METRICS, append=False):
    with MetricsLog(path, {"model": "mlp", "backend": "llvm"}, append=append) as log:
        for epoch, metrics in enumerate(epochs, 1):
            log.write(epoch, step=epoch * 10, metrics=metrics, lr=np.float32(0.5), seconds=1.5)


def test_metrics_log_round_trip(tmp_path):
    path = tmp_path / "logs" / "run.jsonl"
    _write_log(path)
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["event"] == "start" and header["model"] == "mlp" and "dlc" in header
    records = read_log(path)
    assert records == [{"epoch": e, "step": e * 10, **m, "lr": 0.5, "seconds": 1.5}
                       for e, m in enumerate(EPOCH_METRICS, 1)]


def test_the_csv_log_reads_back_as_the_json_log_does(tmp_path):
    from dlc.runtime.loggers import CsvLog
    log = CsvLog(tmp_path / "run.csv")
    for epoch, metrics in enumerate(EPOCH_METRICS, 1):
        log.write(epoch, step=epoch * 10, metrics=metrics, lr=0.5, seconds=1.5)
    log.close()
    _write_log(tmp_path / "run.jsonl")
    assert read_log(tmp_path / "run.csv") == read_log(tmp_path / "run.jsonl")  # `dlc plot log.csv` failed
    (tmp_path / "early.csv").write_text("epoch,step,train_lo")  # the header still being written
    assert read_log(tmp_path / "early.csv") == []
    (tmp_path / "bad.csv").write_text("epoch,step,train_loss\n1,10,0.5\n2,20,oops\n")
    with pytest.raises(DataError, match="line 3 of metrics log .*`train_loss` is 'oops', not a number") as info:
        read_log(tmp_path / "bad.csv")
    assert info.value.span.line == 3


def test_metrics_log_lines_are_flushed_as_written(tmp_path):
    path = tmp_path / "run.jsonl"
    with MetricsLog(path, {"model": "mlp"}) as log:
        log.write(1, step=10, metrics={"train_loss": 0.5})
        assert read_log(path) == [{"epoch": 1, "step": 10, "train_loss": 0.5}]


def test_appended_log_skips_every_header(tmp_path):
    path = tmp_path / "run.jsonl"
    _write_log(path)
    _write_log(path, EPOCH_METRICS[:1], append=True)
    assert [r["epoch"] for r in read_log(path)] == [1, 2, 1]
    assert sum('"event": "start"' in line for line in path.read_text().splitlines()) == 2


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "run.jsonl"
    _write_log(path)
    lines = path.read_text().splitlines()
    lines.insert(2, '{"epoch": 2, "train_loss": 0.3')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        read_log(path)
    message = str(info.value)
    assert f"{path}:3:" in message and "line 3 of metrics log" in message
    assert "malformed JSON" in message


def test_record_without_epoch_is_an_error(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"event": "start"}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2 .* expected a JSON object"):
        read_log(path)
    path.write_text('{"event": "start"}\n{"step": 3}\n')
    with pytest.raises(DataError, match="integer `epoch`"):
        read_log(path)


def test_half_written_last_line_is_skipped(tmp_path):
    path = tmp_path / "run.jsonl"
    _write_log(path)
    with open(path, "a") as f:
        f.write('{"epoch": 3, "train_lo')
    assert [r["epoch"] for r in read_log(path)] == [1, 2]


def test_unwritable_log(tmp_path):
    (tmp_path / "logs").write_text("a file where the folder should be")
    with pytest.raises(DataError, match="cannot write metrics log"):
        MetricsLog(tmp_path / "logs" / "run.jsonl", {})


def test_missing_log(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_log(tmp_path / "nope.jsonl")


# ---- plot ----

def test_curves_from_a_resumed_run_keep_the_latest_epochs(tmp_path):
    path = tmp_path / "run.jsonl"
    _write_log(path)
    _write_log(path, [{"train_loss": 0.7}], append=True)  # epoch 1 again, after a resume
    curves = read_curves(path)
    assert curves["loss"]["train"] == [(1, 0.7), (2, 0.2134)]
    assert curves["accuracy"]["test"] == [(2, 0.9306)]


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_writes_an_image(tmp_path, suffix):
    pytest.importorskip("matplotlib")
    log, out = tmp_path / "run.jsonl", tmp_path / "plots" / f"curves{suffix}"
    _write_log(log)
    plot_log(log, out)
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in data


def test_plot_without_matplotlib_is_a_usage_error(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)
    log = tmp_path / "run.jsonl"
    _write_log(log)
    with pytest.raises(UsageError) as info:
        plot_log(log, tmp_path / "curves.png")
    assert info.value.message == "dlc plot needs matplotlib"
    assert info.value.hint == "pip install 'dlc[plot]'"


def test_an_installed_matplotlib_that_does_not_import_is_told_apart(tmp_path, monkeypatch):
    """A matplotlib built against numpy 1.x fails to import under numpy 2 (numpy prints why,
    then raises ImportError): the error says it is installed, gives numpy's reason, and
    says to reinstall or upgrade it -- not to install it -- and nothing numpy printed leaks
    out as a traceback. The same for each optional package."""
    import importlib

    from dlc.graphviz import _graphviz
    from dlc.interchange import require_onnx

    real = importlib.import_module

    def broken(name, *args):
        if name.split(".")[0] in ("matplotlib", "graphviz", "onnx"):
            sys.stderr.write("\nA module that was compiled using NumPy 1.x cannot be run in NumPy 2.4.6 as it may "
                             "crash.\nTraceback (most recent call last):  ...\n")
            raise ImportError("numpy.core.multiarray failed to import")
        return real(name, *args)
    monkeypatch.setattr(importlib, "import_module", broken)
    log = tmp_path / "run.jsonl"
    _write_log(log)
    for call, needs, package in ((lambda: plot_log(log, tmp_path / "curves.png"), "dlc plot needs matplotlib",
                                  "matplotlib"),
                                 (_graphviz, "`dlc graph` needs the graphviz Python package", "graphviz"),
                                 (require_onnx, "this command needs the `onnx` package", "onnx")):
        with pytest.raises(UsageError) as info:
            call()
        assert info.value.message == (f"{needs}, which is installed but does not import: A module that was "
                                       "compiled using NumPy 1.x cannot be run in NumPy 2.4.6 as it may crash.")
        assert info.value.hint == f"reinstall or upgrade it: pip install --upgrade {package}"


def test_an_optional_package_failing_without_a_message_names_the_error(monkeypatch):
    """An import that fails with no message and nothing printed still says what it raised."""
    import importlib

    from dlc.core.optional import optional_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: (_ for _ in ()).throw(AttributeError()))
    with pytest.raises(UsageError) as info:
        optional_module("somepkg", "x", "y", "pip install somepkg")
    assert info.value.message == "x needs y, which is installed but does not import: AttributeError"


def test_plot_of_an_empty_log(tmp_path):
    log = tmp_path / "run.jsonl"
    with MetricsLog(log, {"model": "mlp"}):
        pass
    with pytest.raises(DataError, match="has no epoch records yet"):
        plot_log(log, tmp_path / "curves.png")


def test_plot_of_a_report_without_a_confusion_matrix(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"model": "autoencoder", "loss": 0.08}, indent=1) + "\n")  # dlc eval -o's
    with pytest.raises(DataError, match="report without a confusion matrix .*nothing to plot"):
        plot_log(report, tmp_path / "curves.png")  # was: "malformed JSON" at line 1


def test_plot_of_a_non_numeric_value(tmp_path):
    log = tmp_path / "run.jsonl"
    log.write_text('{"epoch": 1, "train_loss": "low"}\n')
    with pytest.raises(DataError, match="`train_loss` of epoch 1 is 'low', not a number"):
        plot_log(log, tmp_path / "curves.png")


def test_plot_to_an_unknown_format(tmp_path):
    with pytest.raises(UsageError, match="unknown image format"):
        plot_log(tmp_path / "run.jsonl", tmp_path / "curves.jpg")
