"""`dlc plot`: a metrics log's loss, accuracy and learning-rate curves per epoch (train and
validation), or the confusion matrix of a `dlc eval -o` report, drawn into an image file."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from dlc.core.diagnostics import DataError, UsageError
from dlc.core.optional import optional_module
from dlc.runtime.metrics_log import read_log

FORMATS = (".png", ".svg", ".pdf")
_METRICS = ("loss", "accuracy")
_SPLITS = ("train", "val", "test")

Curves = dict[str, dict[str, list[tuple[int, float]]]]  # metric -> split -> [(epoch, value)]


def plot_log(log_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """Draw the curves of `log_path` into `out_path`; the suffix picks PNG, SVG or PDF."""
    out_path = Path(out_path)
    if out_path.suffix.lower() not in FORMATS:
        raise UsageError(f"cannot draw a plot into `{out_path}`: unknown image format",
                         hint=f"name the output file with one of {', '.join(FORMATS)}")
    report = read_report(log_path)  # the file is read and checked before matplotlib is needed
    if report is not None:
        figure = _draw_confusion(_figure_class(), report, title=Path(log_path).name)
    else:
        curves = read_curves(log_path)
        figure = _draw(_figure_class(), curves, title=Path(log_path).name)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out_path)
    except OSError as e:
        raise DataError(f"cannot write plot `{out_path}`: {e.strerror or e}") from None


def read_curves(log_path: str | os.PathLike) -> Curves:
    """The loss and accuracy series of a log, e.g. {"loss": {"train": [(1, 0.9), ...]}}."""
    records = read_log(log_path)
    # A resumed run logs some epochs again: the latest record of an epoch wins.
    by_epoch = {r["epoch"]: r for r in records}
    curves: Curves = {}
    for metric in _METRICS:
        for split in _SPLITS:
            points = _series(log_path, by_epoch, f"{split}_{metric}")
            if points:
                curves.setdefault(metric, {})[split] = points
    rates = _series(log_path, by_epoch, "lr")
    if curves and rates:
        curves["learning rate"] = {"lr": rates}
    if not curves:
        what = "no epoch records yet" if not records else "no loss or accuracy values"
        raise DataError(f"metrics log `{log_path}` has {what}",
                        hint="a log gets one line per finished epoch of `dlc run`")
    return curves


def read_report(path: str | os.PathLike) -> dict | None:
    """A `dlc eval -o` report (one JSON object with a confusion matrix), or None for a log."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None  # read_log says what is wrong with it
    if not text.lstrip().startswith("{") or text.strip().count("\n{"):
        return None
    try:
        report = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(report, dict) or "event" in report or "epoch" in report:
        return None  # a metrics log of one line
    if "confusion" not in report:
        raise DataError(f"`{path}` is a `dlc eval -o` report without a confusion matrix (its model is no "
                        "classifier): there is nothing to plot",
                        hint="dlc plot draws a metrics log (dlc run --log or --csv) or a classifier's report")
    m = report.get("confusion")
    if not (isinstance(m, list) and m and all(isinstance(r, list) and len(r) == len(m) and
                                             all(isinstance(v, int) for v in r) for r in m)):
        raise DataError(f"`{path}`: `confusion` is not a square matrix of counts")
    return report


def _series(log_path, by_epoch: dict[int, dict], key: str) -> list[tuple[int, float]]:
    points = []
    for epoch in sorted(by_epoch):
        value = by_epoch[epoch].get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"metrics log `{log_path}`: `{key}` of epoch {epoch} is {value!r}, "
                            "not a number")
        points.append((epoch, float(value)))
    return points


def _figure_class():
    # matplotlib is an optional extra, imported only here. A bare Figure renders through
    # Agg (or the SVG/PDF writers) without pyplot: no display needed, and no global
    # backend switch behind the back of a notebook that called us.
    return optional_module("matplotlib.figure", "dlc plot", "matplotlib", "pip install 'dlc[plot]'").Figure


def _draw(figure_class, curves: Curves, title: str):
    figure = figure_class(figsize=(5.5 * len(curves), 4.0), layout="constrained")
    axes = figure.subplots(1, len(curves), squeeze=False)[0]
    for ax, (metric, series) in zip(axes, curves.items()):
        for split, points in series.items():
            epochs, values = zip(*points)
            ax.plot(epochs, values, marker="o" if len(epochs) <= 30 else None, label=split)
        if metric == "loss" and _spans_decades(series):
            ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
        ax.set(title=metric, xlabel="epoch", ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(title)
    return figure


def _draw_confusion(figure_class, report: dict, title: str):
    """The confusion matrix as a heat map, rows true classes, columns predicted, counts written in."""
    m = report["confusion"]
    k = len(m)
    size = min(3.0 + 0.45 * k, 12.0)
    figure = figure_class(figsize=(size + 1.0, size), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(m, cmap="Blues")
    figure.colorbar(image, ax=ax)
    top = max(max(r) for r in m) or 1
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(m[i][j]), ha="center", va="center", fontsize=8,
                        color="white" if m[i][j] > top / 2 else "black")
    ax.set(xlabel="predicted class", ylabel="true class", xticks=range(k), yticks=range(k),
           title=f"confusion matrix (accuracy {report.get('accuracy', 0):.4f})")
    figure.suptitle(title)
    return figure


def _spans_decades(series: dict[str, list[tuple[int, float]]]) -> bool:
    # A loss falling by orders of magnitude is flat on a linear axis after epoch 2.
    values = [v for points in series.values() for _, v in points if math.isfinite(v)]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 100
