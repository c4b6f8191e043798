"""Where per-epoch metrics go besides the terminal: the JSON-lines log (`--log`, see
metrics_log.py), a CSV file (`--csv`) and TensorBoard event files (`--tensorboard`, through
the optional tensorboardX package: pip install 'dlc[tensorboard]').

Every logger has `write(epoch, step, metrics, lr, seconds)`, `write_test(epoch, metrics)` (the
test split, scored once after training) and `close()`."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Mapping

from dlc.core.diagnostics import DataError
from dlc.core.optional import optional_module
from dlc.runtime.metrics_log import MetricsLog


class JsonLog(MetricsLog):
    def write_test(self, epoch: int, metrics: Mapping[str, float]) -> None:
        # an event line, skipped by read_log's epoch records like the start header
        self._write_line({"event": "test", "epoch": epoch, **{f"test_{k}": v for k, v in metrics.items()}})


class CsvLog:
    """One row per epoch: epoch, step, the metrics (as in the first row), lr, seconds. A resumed
    run appends to the file without a second header."""

    def __init__(self, path: str | os.PathLike, append: bool = False):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            exists = append and self.path.exists() and self.path.stat().st_size > 0
            self._file = open(self.path, "a" if append else "w", encoding="utf-8", newline="")
        except OSError as e:
            raise DataError(f"cannot write CSV log `{path}`: {e.strerror or e}") from None
        self._writer = None
        self._fields = _header(self.path) if exists else None

    def write(self, epoch: int, step: int, metrics: Mapping[str, float], lr: float | None = None,
              seconds: float | None = None) -> None:
        row = {"epoch": epoch, "step": step, **metrics, "lr": lr, "seconds": seconds}
        if self._writer is None:
            fresh = self._fields is None
            self._fields = self._fields or list(row)
            self._writer = csv.DictWriter(self._file, self._fields, extrasaction="ignore")
            if fresh:
                self._writer.writeheader()
        self._writer.writerow({k: "" if v is None else v for k, v in row.items()})
        self._file.flush()  # each epoch visible as it ends, as with --log

    def write_test(self, epoch: int, metrics: Mapping[str, float]) -> None:
        pass  # one row per epoch: the test score is in the final line, --log and TensorBoard

    def close(self) -> None:
        self._file.close()


def _header(path: Path) -> list[str] | None:
    with open(path, encoding="utf-8", newline="") as f:
        return next(csv.reader(f), None)


class TensorBoardLog:
    """Scalars `train/loss`, `val/accuracy`, `lr`, ... per epoch, in event files under a folder
    (`tensorboard --logdir DIR` shows them)."""

    def __init__(self, folder: str | os.PathLike):
        tensorboardX = optional_module("tensorboardX", "--tensorboard", "the tensorboardX package",
                                       "pip install 'dlc[tensorboard]'")
        try:
            self._writer = tensorboardX.SummaryWriter(str(folder))
        except OSError as e:
            raise DataError(f"cannot write TensorBoard events into `{folder}`: {e.strerror or e}") from None

    def write(self, epoch: int, step: int, metrics: Mapping[str, float], lr: float | None = None,
              seconds: float | None = None) -> None:
        for key, value in metrics.items():
            split, _, name = key.partition("_")
            self._writer.add_scalar(f"{split}/{name}", value, epoch)
        if lr is not None:
            self._writer.add_scalar("lr", lr, epoch)
        self._writer.flush()

    def write_test(self, epoch: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(f"test/{name}", value, epoch)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def open_loggers(header: Mapping, append: bool, log: Path | None = None, csv_path: Path | None = None,
                 tensorboard: Path | None = None) -> list:
    loggers = []
    try:
        if log:
            loggers.append(JsonLog(log, header, append=append))
        if csv_path:
            loggers.append(CsvLog(csv_path, append=append))
        if tensorboard:
            loggers.append(TensorBoardLog(tensorboard))
    except BaseException:
        close_all(loggers)
        raise
    return loggers


def close_all(loggers) -> None:
    for lg in loggers:
        lg.close()
